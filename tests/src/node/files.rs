//! A private node's directory: its configuration files and cookie, written before its first
//! start; where the directories live; and the sweep of those left by dead processes.

use anyhow::{Context, ensure};
use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};

use super::process::{NodeProcess, process_exists, read_pid};
use super::{NodeOptions, PortBlock, PrivateNode};

/// Where the RabbitMQ scripts are, unless `CONEJO_RABBITMQ_BIN_DIR` says otherwise.
const DEFAULT_BIN_DIR: &str = "/usr/lib/rabbitmq/bin";

/// Environment variable overriding [`DEFAULT_BIN_DIR`].
const BIN_DIR_VAR: &str = "CONEJO_RABBITMQ_BIN_DIR";

/// Environment variable that, when set to anything but `0` or empty, keeps node directories.
const KEEP_DIRS_VAR: &str = "CONEJO_KEEP_NODE_DIRS";

/// A file in a node's directory that keeps it from being removed (by `Drop` and by the sweep of
/// dead processes' directories): written when a start fails.
pub(super) const KEEP_MARKER: &str = "KEPT-AFTER-FAILED-START";

impl PrivateNode {
    /// Creates the node's directory, files and port reservation, without starting it.
    pub(super) fn prepare(
        name_hint: &str,
        cookie: &str,
        options: &NodeOptions,
    ) -> anyhow::Result<PrivateNode> {
        static NODES: AtomicU64 = AtomicU64::new(0);
        let bin_dir = bin_dir();
        let server = bin_dir.join("rabbitmq-server");
        ensure!(
            server.is_file(),
            "{} not found: private nodes need the RabbitMQ server scripts there (Debian's \
             rabbitmq-server package), or their directory in {BIN_DIR_VAR}",
            server.display()
        );
        let n = NODES.fetch_add(1, Ordering::Relaxed);
        let hint = sanitize_hint(name_hint);
        let short = if hint.is_empty() {
            format!("conejo-t{}-{n}", std::process::id())
        } else {
            format!("conejo-t{}-{n}-{hint}", std::process::id())
        };
        let dir = nodes_root().join(&short);
        let node = PrivateNode {
            node_name: format!("{short}@localhost"),
            dir,
            bin_dir,
            ports: PortBlock::reserve()?,
            process: Mutex::new(NodeProcess::default()),
            keep_dir: keep_dirs(),
            tls: options.tls.is_some(),
        };
        node.write_files(cookie, options)
            .with_context(|| format!("failed to prepare {}", node.dir.display()))?;
        Ok(node)
    }

    /// Writes the node's configuration, environment, plugins and cookie into its (fresh)
    /// directory.
    fn write_files(&self, cookie: &str, options: &NodeOptions) -> anyhow::Result<()> {
        if self.dir.exists() {
            // Left by an earlier process that had the same pid.
            fs::remove_dir_all(&self.dir)?;
        }
        for sub in ["home", "mnesia", "log"] {
            fs::create_dir_all(self.dir.join(sub))?;
        }
        // A cookie readable by others is refused by Erlang; create it 0400 right away.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(self.dir.join("home/.erlang.cookie"))?;
        file.write_all(cookie.as_bytes())?;
        fs::write(
            self.dir.join("rabbitmq-env.conf"),
            "# Written by conejo-tests: distribution and epmd on loopback only.\n\
             export ERL_FLAGS=\"-kernel inet_dist_use_interface {127,0,0,1}\"\n\
             export ERL_EPMD_ADDRESS=127.0.0.1\n",
        )?;
        let tls = match &options.tls {
            Some(tls) => format!(
                "listeners.ssl.1 = 127.0.0.1:{}\n\
                 ssl_options.cacertfile = {}\n\
                 ssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\n\
                 ssl_options.verify = verify_peer\n\
                 ssl_options.fail_if_no_peer_cert = true\n\
                 ssl_options.versions.1 = tlsv1.3\n\
                 ssl_options.versions.2 = tlsv1.2\n",
                self.ports.amqps(),
                tls.ca_file.display(),
                tls.cert_file.display(),
                tls.key_file.display(),
            ),
            None => String::new(),
        };
        fs::write(
            self.dir.join("rabbitmq.conf"),
            format!(
                "# Written by conejo-tests.\n\
                 listeners.tcp.1 = 127.0.0.1:{}\n\
                 {tls}\
                 log.console = false\n\
                 log.file.level = info\n\
                 {}\n",
                self.ports.amqp(),
                options.config,
            ),
        )?;
        fs::write(
            self.dir.join("enabled_plugins"),
            format!("[{}].\n", options.plugins.join(",")),
        )?;
        // Channels check their consumer timeouts on each tick, every minute by default: a
        // second, so that a test's short consumer_timeout is enforced promptly.
        fs::write(
            self.dir.join("advanced.config"),
            "[{rabbit, [{channel_tick_interval, 1000}]}].\n",
        )?;
        Ok(())
    }

    /// Keeps the directory when the node is dropped, and from the sweep, with `err` in
    /// [`KEEP_MARKER`].
    pub(super) fn keep_for_inspection(&mut self, err: &anyhow::Error) {
        self.keep_dir = true;
        let _ = fs::write(self.dir.join(KEEP_MARKER), format!("{err:#}\n"));
    }
}

/// [`DEFAULT_BIN_DIR`], or the directory [`BIN_DIR_VAR`] names.
fn bin_dir() -> PathBuf {
    match std::env::var_os(BIN_DIR_VAR) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(DEFAULT_BIN_DIR),
    }
}

/// Whether [`KEEP_DIRS_VAR`] asks to keep every node's directory.
fn keep_dirs() -> bool {
    std::env::var_os(KEEP_DIRS_VAR).is_some_and(|v| !v.is_empty() && v != OsStr::new("0"))
}

/// `$TMPDIR/conejo-nodes`.
fn nodes_root() -> PathBuf {
    std::env::temp_dir().join("conejo-nodes")
}

/// Removes, once per process, the node directories of processes that no longer exist (and
/// whose node is gone too). Best effort.
pub(super) fn sweep_stale_dirs() {
    static SWEEP: Once = Once::new();
    SWEEP.call_once(|| {
        let Ok(entries) = fs::read_dir(nodes_root()) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(owner) = name
                .to_str()
                .and_then(|n| n.strip_prefix("conejo-t"))
                .and_then(|rest| rest.split('-').next())
                .and_then(|pid| pid.parse::<u32>().ok())
            else {
                continue;
            };
            let path = entry.path();
            let beam_alive = read_pid(&path.join("pid")).is_some_and(process_exists);
            let kept = path.join(KEEP_MARKER).exists();
            if owner != std::process::id() && !process_exists(owner) && !beam_alive && !kept {
                let _ = fs::remove_dir_all(&path);
            }
        }
    });
}

/// `[A-Za-z0-9_-]` only (Erlang node names), at most 24 characters.
fn sanitize_hint(hint: &str) -> String {
    hint.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == '-')
        .take(24)
        .collect()
}

/// 32 random upper-case letters.
pub(super) fn random_cookie() -> String {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let mut cookie = String::with_capacity(32);
    for round in 0..4u8 {
        // Each RandomState has fresh random keys.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u8(round);
        hasher.write_u128(nanos);
        hasher.write_u32(std::process::id());
        let mut value = hasher.finish();
        for _ in 0..8 {
            cookie.push(char::from(b'A' + (value % 26) as u8));
            value /= 26;
        }
    }
    cookie
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_are_valid_node_name_parts() {
        assert_eq!(sanitize_hint("durable queue/1"), "durablequeue1");
        assert_eq!(sanitize_hint("a_b-c"), "a_b-c");
        assert_eq!(sanitize_hint(&"x".repeat(40)).len(), 24);
    }

    #[test]
    fn cookies_are_random_letters() {
        let a = random_cookie();
        let b = random_cookie();
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_uppercase()), "{a}");
        assert_ne!(a, b);
    }
}
