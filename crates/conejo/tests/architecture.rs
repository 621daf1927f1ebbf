//! The crate's module structure, checked from its source: no import cycle between modules,
//! and each folder uses only the folders it may (the table in `ALLOWED`, which the crate's
//! top-level documentation explains).
//!
//! Every `use` of a crate path and every `crate::…`/`super::…` path in the code (test
//! modules excluded) is an edge from the module it is written in to the module that
//! *defines* the item, re-exports followed: `crate::Context` is an edge to
//! `handler::context`, not to the crate root. Items behind any feature count, so the check
//! covers every build.
//!
//! Why it is ~600 lines: a source parser (the `use` and path visitor), the allowed table
//! and its own tests of the checker; split, each part would be meaningless alone.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::{Path, PathBuf},
};

use syn::visit::Visit;

/// Each top-level module (folder or file) and the top-level modules it may use. A module may
/// always use itself; edges inside a folder are checked for cycles only.
const ALLOWED: &[(&str, &[&str])] = &[
    // leaves: the crate's error type and conejo's header vocabulary
    ("error", &[]),
    ("headers", &[]),
    ("backoff", &[]),
    // the broker boundary: addresses, TLS, the transports
    ("broker", &["error"]),
    // what users implement and what their handlers see
    // (a delivery arrives as the broker's `Incoming`)
    ("handler", &["broker", "publish", "error", "headers"]),
    // the pipeline around a handler: layers, decoding, panic isolation, timeout
    ("service", &["handler", "error"]),
    // what a service is configured with
    (
        "config",
        &[
            "broker", "handler", "service", "publish", "error", "headers", "backoff",
        ],
    ),
    // counters, status, lags, metrics, health
    ("observe", &["error"]),
    // publishing: confirmed publishes on conejo's own connections
    (
        "publish",
        &["broker", "observe", "error", "headers", "backoff"],
    ),
    // the running core
    (
        "engine",
        &[
            "broker", "handler", "service", "config", "observe", "publish", "error", "headers",
            "hooks", "backoff",
        ],
    ),
    // the builder and the service users run
    (
        "app",
        &[
            "engine", "broker", "handler", "service", "config", "observe", "publish", "error",
            "headers", "hooks",
        ],
    ),
    // operations features, on top of the application
    (
        "settings",
        &["app", "config", "broker", "log_format", "error", "handler"],
    ),
    ("log_format", &["error"]),
    ("logging", &["log_format", "error"]),
    (
        "cli",
        &["app", "settings", "logging", "log_format", "error"],
    ),
    ("admin", &["broker", "config", "headers", "error"]),
    (
        "testing",
        &[
            "app", "engine", "service", "config", "handler", "broker", "error", "publish",
            "headers", "observe",
        ],
    ),
    ("hooks", &["error"]),
];

/// One module of the crate, as written in its file.
#[derive(Default)]
struct Module {
    /// The file it is written in (for messages).
    file: PathBuf,
    /// Child modules, by name.
    children: BTreeSet<String>,
    /// Items it defines (types, functions, traits, constants, macros…).
    items: BTreeSet<String>,
    /// Names it brings in with `use`, with the absolute path each stands for.
    aliases: BTreeMap<String, Vec<String>>,
    /// Globs it imports (`use path::*`), absolute.
    globs: Vec<Vec<String>>,
    /// Absolute crate paths it refers to, with a line to show.
    references: Vec<(Vec<String>, String)>,
}

fn src_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The module path of a source file: `src/a/mod.rs` and `src/a.rs` are `a`.
fn module_path(file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src_dir()).unwrap();
    let mut parts: Vec<String> = relative
        .iter()
        .map(|part| part.to_string_lossy().into_owned())
        .collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if stem != "mod" && stem != "lib" {
        parts.push(stem.to_owned());
    }
    parts
}

fn is_test_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|attr| match &attr.meta {
        syn::Meta::List(list) if list.path.is_ident("cfg") => names_test(list.tokens.clone()),
        _ => false,
    })
}

/// True when a `cfg` predicate requires `test` (or `doctest`) outside a `not(…)`.
fn names_test(tokens: proc_macro2::TokenStream) -> bool {
    let mut previous_not = false;
    for token in tokens {
        match token {
            proc_macro2::TokenTree::Ident(ident) => {
                if (ident == "test" || ident == "doctest") && !previous_not {
                    return true;
                }
                previous_not = ident == "not";
            }
            proc_macro2::TokenTree::Group(group) => {
                if !previous_not && names_test(group.stream()) {
                    return true;
                }
                previous_not = false;
            }
            _ => previous_not = false,
        }
    }
    false
}

/// Makes `path`, written in module `here`, absolute (`crate`-rooted, without `crate`).
/// `None` for paths outside the crate.
fn absolute(here: &[String], path: &[String], local: &BTreeSet<String>) -> Option<Vec<String>> {
    let first = path.first()?;
    match first.as_str() {
        "crate" => Some(path[1..].to_vec()),
        "self" => Some(here.iter().chain(&path[1..]).cloned().collect()),
        "super" => {
            let mut base = here.to_vec();
            let mut rest = path;
            while rest.first().map(String::as_str) == Some("super") {
                base.pop();
                rest = &rest[1..];
            }
            Some(base.into_iter().chain(rest.iter().cloned()).collect())
        }
        // A child module named in a `use` without `self::` (edition 2018+ allows it).
        name if local.contains(name) => Some(here.iter().chain(path).cloned().collect()),
        _ => None,
    }
}

/// Collects a module's items, uses and references; descends into inline child modules.
struct Collector<'a> {
    here: Vec<String>,
    modules: &'a mut BTreeMap<Vec<String>, Module>,
    file: PathBuf,
    source: &'a str,
    /// Set while a re-export's use tree is walked.
    reexport: bool,
    /// Modules declared `#[cfg(test)] mod x;`, whose files are left out.
    test_modules: &'a mut Vec<Vec<String>>,
}

impl Collector<'_> {
    fn module(&mut self) -> &mut Module {
        self.modules.entry(self.here.clone()).or_default()
    }

    fn line(&self, span: proc_macro2::Span) -> String {
        let line = span.start().line;
        let text = self
            .source
            .lines()
            .nth(line.saturating_sub(1))
            .unwrap_or("");
        format!("{}:{line}: {}", self.file.display(), text.trim())
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree, span: proc_macro2::Span) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree, span);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                let name = n.ident.to_string();
                let mut full = prefix.clone();
                if name != "self" {
                    full.push(name.clone());
                }
                let alias = if name == "self" {
                    prefix.last().cloned().unwrap_or_default()
                } else {
                    name
                };
                self.record_use(alias, full, span);
            }
            syn::UseTree::Rename(r) => {
                let mut full = prefix.clone();
                if r.ident != "self" {
                    full.push(r.ident.to_string());
                }
                self.record_use(r.rename.to_string(), full, span);
            }
            syn::UseTree::Glob(_) => {
                let line = self.line(span);
                let here = self.here.clone();
                let children = self.module().children.clone();
                let reexport = self.reexport;
                if let Some(path) = absolute(&here, prefix, &children) {
                    let module = self.module();
                    module.globs.push(path.clone());
                    if !reexport {
                        module.references.push((path, line));
                    }
                }
            }
            syn::UseTree::Group(g) => {
                for tree in &g.items {
                    self.use_tree(prefix, tree, span);
                }
            }
        }
    }

    fn record_use(&mut self, alias: String, full: Vec<String>, span: proc_macro2::Span) {
        let line = self.line(span);
        let here = self.here.clone();
        let children = self.module().children.clone();
        if let Some(path) = absolute(&here, &full, &children) {
            let reexport = self.reexport;
            let module = self.module();
            module.aliases.insert(alias, path.clone());
            if !reexport {
                module.references.push((path, line));
            }
        }
    }
}

impl<'ast> Visit<'ast> for Collector<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let (attrs, name): (&[syn::Attribute], Option<String>) = match item {
            syn::Item::Const(i) => (&i.attrs, Some(i.ident.to_string())),
            syn::Item::Enum(i) => (&i.attrs, Some(i.ident.to_string())),
            syn::Item::Fn(i) => (&i.attrs, Some(i.sig.ident.to_string())),
            syn::Item::Macro(i) => (&i.attrs, i.ident.as_ref().map(ToString::to_string)),
            syn::Item::Static(i) => (&i.attrs, Some(i.ident.to_string())),
            syn::Item::Struct(i) => (&i.attrs, Some(i.ident.to_string())),
            syn::Item::Trait(i) => (&i.attrs, Some(i.ident.to_string())),
            syn::Item::Type(i) => (&i.attrs, Some(i.ident.to_string())),
            syn::Item::Union(i) => (&i.attrs, Some(i.ident.to_string())),
            syn::Item::Impl(i) => (&i.attrs, None),
            syn::Item::Use(i) => (&i.attrs, None),
            syn::Item::Mod(i) => (&i.attrs, None),
            _ => (&[], None),
        };
        if is_test_only(attrs) {
            if let syn::Item::Mod(m) = item
                && m.content.is_none()
            {
                // `#[cfg(test)] mod tests;`: its file is a test module too.
                let mut path = self.here.clone();
                path.push(m.ident.to_string());
                self.test_modules.push(path);
            }
            return;
        }
        if let Some(name) = name {
            self.module().items.insert(name);
        }
        match item {
            syn::Item::Use(u) => {
                let span = u.use_token.span;
                // A re-export (`pub use`, `pub(crate) use`) names an item for others: it is
                // followed when they use it, but is no use of the item by this module.
                self.reexport = !matches!(u.vis, syn::Visibility::Inherited);
                self.use_tree(&mut Vec::new(), &u.tree, span);
                self.reexport = false;
            }
            syn::Item::Mod(m) => {
                let name = m.ident.to_string();
                self.module().children.insert(name.clone());
                if let Some((_, items)) = &m.content {
                    // An inline module: its items are its own.
                    self.here.push(name);
                    self.modules.entry(self.here.clone()).or_default().file = self.file.clone();
                    for item in items {
                        self.visit_item(item);
                    }
                    self.here.pop();
                }
            }
            other => syn::visit::visit_item(self, other),
        }
    }

    /// `pub(crate)` and `pub(super)` name no item.
    fn visit_visibility(&mut self, _: &'ast syn::Visibility) {}

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        if matches!(
            segments.first().map(String::as_str),
            Some("crate" | "super")
        ) {
            let here = self.here.clone();
            let line = self.line(path.segments[0].ident.span());
            if let Some(absolute) = absolute(&here, &segments, &BTreeSet::new()) {
                self.module().references.push((absolute, line));
            }
        }
        syn::visit::visit_path(self, path);
    }
}

/// Every module of the crate, parsed from `src/`.
fn parse_crate() -> BTreeMap<Vec<String>, Module> {
    let mut files = Vec::new();
    let mut dirs = vec![src_dir()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    let mut modules = BTreeMap::new();
    let mut test_modules = Vec::new();
    for file in files {
        let source = std::fs::read_to_string(&file).unwrap();
        let parsed = syn::parse_file(&source)
            .unwrap_or_else(|e| panic!("{}: does not parse: {e}", file.display()));
        let here = module_path(&file);
        let relative = file.strip_prefix(src_dir()).unwrap().to_path_buf();
        modules
            .entry(here.clone())
            .or_insert_with(Module::default)
            .file = relative.clone();
        // Child module names first: `use child::X` without `self::` needs them.
        for item in &parsed.items {
            if let syn::Item::Mod(m) = item {
                modules
                    .entry(here.clone())
                    .or_insert_with(Module::default)
                    .children
                    .insert(m.ident.to_string());
            }
        }
        let mut collector = Collector {
            here,
            modules: &mut modules,
            file: relative,
            source: &source,
            reexport: false,
            test_modules: &mut test_modules,
        };
        for item in &parsed.items {
            collector.visit_item(item);
        }
    }
    modules.retain(|path, _| !test_modules.iter().any(|test| path.starts_with(test)));
    modules
}

/// The module that defines what `path` names, following re-exports; `None` when it leaves the
/// crate (an external item through an alias) or names nothing found.
fn defining_module(
    modules: &BTreeMap<Vec<String>, Module>,
    path: &[String],
    depth: usize,
) -> Option<Vec<String>> {
    if depth > 32 {
        return None;
    }
    let mut current: Vec<String> = Vec::new();
    for (index, segment) in path.iter().enumerate() {
        let module = modules.get(&current)?;
        if module.children.contains(segment) {
            current.push(segment.clone());
            continue;
        }
        if module.items.contains(segment) {
            return Some(current);
        }
        if let Some(target) = module.aliases.get(segment) {
            let rest = &path[index + 1..];
            let full: Vec<String> = target.iter().chain(rest).cloned().collect();
            return defining_module(modules, &full, depth + 1);
        }
        for glob in &module.globs {
            let full: Vec<String> = glob.iter().chain(&path[index..]).cloned().collect();
            if let Some(found) = defining_module(modules, &full, depth + 1) {
                return Some(found);
            }
        }
        // An enum variant, an associated item, a macro-made name: the module itself.
        return Some(current);
    }
    Some(current)
}

/// Edges between modules (from, to) with the line that makes each.
fn edges(modules: &BTreeMap<Vec<String>, Module>) -> BTreeMap<(Vec<String>, Vec<String>), String> {
    let mut edges = BTreeMap::new();
    for (here, module) in modules {
        for (path, line) in &module.references {
            let Some(target) = defining_module(modules, path, 0) else {
                continue;
            };
            // A module using its own descendants' items, or an ancestor naming a child: fine
            // only one way, which the cycle check sees; self-references are not edges.
            if &target == here {
                continue;
            }
            edges
                .entry((here.clone(), target))
                .or_insert_with(|| line.clone());
        }
    }
    edges
}

fn name(path: &[String]) -> String {
    if path.is_empty() {
        "crate".to_owned()
    } else {
        path.join("::")
    }
}

/// Strongly connected components with more than one module (Tarjan).
fn cycles(
    nodes: &[Vec<String>],
    edges: &BTreeMap<(Vec<String>, Vec<String>), String>,
) -> Vec<Vec<Vec<String>>> {
    struct State<'a> {
        index: BTreeMap<&'a Vec<String>, usize>,
        low: BTreeMap<&'a Vec<String>, usize>,
        stack: Vec<&'a Vec<String>>,
        on_stack: BTreeSet<&'a Vec<String>>,
        next: usize,
        found: Vec<Vec<Vec<String>>>,
    }
    fn connect<'a>(
        node: &'a Vec<String>,
        out: &BTreeMap<&'a Vec<String>, Vec<&'a Vec<String>>>,
        state: &mut State<'a>,
    ) {
        state.index.insert(node, state.next);
        state.low.insert(node, state.next);
        state.next += 1;
        state.stack.push(node);
        state.on_stack.insert(node);
        for &next in out.get(node).into_iter().flatten() {
            if !state.index.contains_key(next) {
                connect(next, out, state);
                let low = state.low[node].min(state.low[next]);
                state.low.insert(node, low);
            } else if state.on_stack.contains(next) {
                let low = state.low[node].min(state.index[next]);
                state.low.insert(node, low);
            }
        }
        if state.low[node] == state.index[node] {
            let mut component = Vec::new();
            while let Some(top) = state.stack.pop() {
                state.on_stack.remove(top);
                component.push(top.clone());
                if top == node {
                    break;
                }
            }
            if component.len() > 1 {
                component.sort();
                state.found.push(component);
            }
        }
    }
    let mut out: BTreeMap<&Vec<String>, Vec<&Vec<String>>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        out.entry(from).or_default().push(to);
    }
    let mut state = State {
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        found: Vec::new(),
    };
    for node in nodes {
        if !state.index.contains_key(node) {
            connect(node, &out, &mut state);
        }
    }
    state.found
}

#[test]
fn no_module_imports_another_that_imports_it_back() {
    let modules = parse_crate();
    let edges = edges(&modules);
    let nodes: Vec<Vec<String>> = modules.keys().cloned().collect();
    let found = cycles(&nodes, &edges);
    let mut report = String::new();
    for component in &found {
        let members: BTreeSet<&Vec<String>> = component.iter().collect();
        let _ = writeln!(
            report,
            "cycle: {}",
            component
                .iter()
                .map(|m| name(m))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for ((from, to), line) in &edges {
            if members.contains(from) && members.contains(to) {
                let _ = writeln!(report, "  {} -> {}   ({line})", name(from), name(to));
            }
        }
    }
    assert!(found.is_empty(), "import cycles between modules:\n{report}");
}

#[test]
fn each_folder_uses_only_what_it_may() {
    let modules = parse_crate();
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut report = String::new();
    for ((from, to), line) in edges(&modules) {
        let (Some(from_top), Some(to_top)) = (from.first(), to.first()) else {
            // the crate root (re-exports) or a reference to it
            continue;
        };
        if from_top == to_top {
            continue;
        }
        match allowed.get(from_top.as_str()) {
            None => {
                let _ = writeln!(report, "{from_top} is not in ALLOWED ({line})");
            }
            Some(may) if !may.contains(&to_top.as_str()) => {
                let _ = writeln!(
                    report,
                    "{} uses {}, which {from_top} may not use   ({line})",
                    name(&from),
                    name(&to)
                );
            }
            Some(_) => {}
        }
    }
    assert!(report.is_empty(), "{report}");
}

#[test]
fn the_checker_sees_a_cycle_and_a_forbidden_use() {
    // A crate in miniature: a ↔ b through a re-export, c using a.
    let mut modules = BTreeMap::new();
    let path = |p: &str| -> Vec<String> {
        if p.is_empty() {
            Vec::new()
        } else {
            p.split("::").map(str::to_owned).collect()
        }
    };
    let mut root = Module::default();
    root.children.extend(["a".to_owned(), "b".to_owned()]);
    root.aliases.insert("Thing".to_owned(), path("b::Thing"));
    modules.insert(path(""), root);
    let mut a = Module::default();
    a.items.insert("Helper".to_owned());
    a.references
        .push((path("Thing"), "a uses crate::Thing".to_owned()));
    modules.insert(path("a"), a);
    let mut b = Module::default();
    b.items.insert("Thing".to_owned());
    b.references
        .push((path("a::Helper"), "b uses crate::a::Helper".to_owned()));
    modules.insert(path("b"), b);
    let edges = edges(&modules);
    assert!(
        edges.contains_key(&(path("a"), path("b"))),
        "through the re-export"
    );
    let nodes: Vec<Vec<String>> = modules.keys().cloned().collect();
    assert_eq!(cycles(&nodes, &edges), vec![vec![path("a"), path("b")]]);
}
