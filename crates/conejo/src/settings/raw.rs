//! Values as written, in the file or in a variable, and the keys they are written under.

use std::time::Duration;

/// A value as written: in the TOML file (typed), or in a variable (a string).
#[derive(Clone, Copy)]
pub(super) enum Raw<'a> {
    Toml(&'a toml::Value),
    Env(&'a str),
}

impl Raw<'_> {
    pub(super) fn string(&self, what: &str) -> Result<&str, String> {
        match self {
            Raw::Toml(toml::Value::String(s)) => Ok(s),
            Raw::Env(s) => Ok(s),
            Raw::Toml(other) => Err(format!("expected {what}, found {}", other.type_str())),
        }
    }

    pub(super) fn integer(&self) -> Result<i64, String> {
        match self {
            Raw::Toml(toml::Value::Integer(n)) => Ok(*n),
            Raw::Env(s) => s
                .trim()
                .parse()
                .map_err(|_| format!("invalid integer {s:?}")),
            Raw::Toml(other) => Err(format!("expected an integer, found {}", other.type_str())),
        }
    }

    pub(super) fn boolean(&self) -> Result<bool, String> {
        match self {
            Raw::Toml(toml::Value::Boolean(b)) => Ok(*b),
            Raw::Env(s) => match s.trim().to_ascii_lowercase().as_str() {
                "true" | "1" | "yes" | "on" => Ok(true),
                "false" | "0" | "no" | "off" => Ok(false),
                _ => Err(format!("invalid boolean {s:?} (true or false)")),
            },
            Raw::Toml(other) => Err(format!(
                "expected true or false, found {}",
                other.type_str()
            )),
        }
    }

    pub(super) fn duration(&self) -> Result<Duration, String> {
        let text = self.string("a duration such as \"30s\" or \"500ms\"")?;
        humantime::parse_duration(text.trim()).map_err(|_| {
            format!("invalid duration {text:?} (write e.g. \"500ms\", \"30s\", \"2m\")")
        })
    }

    pub(super) fn duration_within(
        &self,
        min: Duration,
        max: Duration,
        range: &str,
    ) -> Result<Duration, String> {
        let duration = self.duration()?;
        if duration < min || duration > max {
            return Err(format!("must be between {range}"));
        }
        Ok(duration)
    }

    pub(super) fn at_least_one<T: TryFrom<i64>>(&self, max: &str) -> Result<T, String> {
        let n = self.integer()?;
        if n < 1 {
            return Err("must be at least 1".to_owned());
        }
        T::try_from(n).map_err(|_| format!("must be at most {max}"))
    }
}

/// Where settings come from, for error messages.
#[derive(Clone, Copy)]
pub(super) enum Origin {
    /// A TOML file.
    File,
    /// The environment.
    Env,
}

/// The leaves of `table` (tables are walked, arrays and scalars are leaves), with their paths.
pub(super) fn flatten<'a>(
    table: &'a toml::Table,
    prefix: &mut Vec<String>,
    out: &mut Vec<(Vec<String>, &'a toml::Value)>,
) {
    for (key, value) in table {
        prefix.push(key.clone());
        match value {
            toml::Value::Table(inner) => flatten(inner, prefix, out),
            leaf => out.push((prefix.clone(), leaf)),
        }
        prefix.pop();
    }
}

/// `queues."shop.orders".concurrency`: a path as a TOML dotted key.
pub(super) fn dotted(path: &[&str]) -> String {
    path.iter()
        .map(|segment| {
            let bare = !segment.is_empty()
                && segment
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if bare {
                (*segment).to_owned()
            } else {
                format!("{segment:?}")
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}
