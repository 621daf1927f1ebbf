//! Settings from a TOML file and `CONEJO_*` environment variables, applied onto the
//! [`Builder`](crate::Builder) (feature `config`).
//!
//! Code registers the queues and their handlers; the deployment tunes them. Each setting
//! is taken from, in increasing precedence:
//!
//! 1. the code: what the builder and each [`QueueConfig`](crate::QueueConfig) say (or
//!    conejo's defaults);
//! 2. the TOML file, if one is given;
//! 3. the environment: `CONEJO_` followed by the key in capitals, levels separated by a
//!    double underscore.
//!
//! | file key | environment variable | value |
//! |---|---|---|
//! | `url` | `CONEJO_URL` | AMQP URL, or several separated by commas (a cluster); a list in TOML. Never printed with its password |
//! | `connection_name` | `CONEJO_CONNECTION_NAME` | shown by the broker |
//! | `connect_timeout` | `CONEJO_CONNECT_TIMEOUT` | duration, 1 ns to 10 min |
//! | `wait_for_broker` | `CONEJO_WAIT_FOR_BROKER` | `true`/`false` (also `1`/`0`, `yes`/`no`, `on`/`off`) |
//! | `shutdown_timeout` | `CONEJO_SHUTDOWN_TIMEOUT` | duration, 1 ns to 24 h |
//! | `log_format` | `CONEJO_LOG_FORMAT` | `text` or `json` (read by `conejo::logging` and the CLI) |
//! | `log_level` | `CONEJO_LOG_LEVEL` | a `tracing` filter: `info`, `debug,lapin=off`… |
//! | `health_addr` | `CONEJO_HEALTH_ADDR` | socket address such as `0.0.0.0:8080` where the health endpoints listen (feature `health`; an error without it) |
//! | `queues.<q>.concurrency` | `CONEJO_QUEUES__<Q>__CONCURRENCY` | at least 1 |
//! | `queues.<q>.prefetch` | `CONEJO_QUEUES__<Q>__PREFETCH` | 1 to 65535 |
//! | `queues.<q>.timeout` | `CONEJO_QUEUES__<Q>__TIMEOUT` | duration, 1 ns to 7 days |
//! | `queues.<q>.poison_limit` | `CONEJO_QUEUES__<Q>__POISON_LIMIT` | at least 1, or `off` |
//! | `queues.<q>.retry.max_attempts` | `CONEJO_QUEUES__<Q>__RETRY__MAX_ATTEMPTS` | at least 1 |
//! | `queues.<q>.retry.initial_delay` | `CONEJO_QUEUES__<Q>__RETRY__INITIAL_DELAY` | duration, 1 ms to 24 h |
//! | `queues.<q>.retry.max_delay` | `CONEJO_QUEUES__<Q>__RETRY__MAX_DELAY` | duration, 1 ms to 24 h |
//!
//! Durations are written the human way: `"500ms"`, `"30s"`, `"2m"`, `"1h 30m"`. In a file,
//! `<q>` is the queue's name as registered (quoted when it has dots:
//! `[queues."shop.orders"]`); in a variable name, `<Q>` is the queue's name in capitals with
//! every character other than a letter or a digit written `_` (`shop.orders` →
//! `CONEJO_QUEUES__SHOP_ORDERS__CONCURRENCY`).
//!
//! Every value is checked when it is loaded, and the error names the key as it was written:
//! `invalid configuration: CONEJO_SHUTDOWN_TIMEOUT: invalid duration "5 parsecs" (…)`,
//! `invalid configuration: conejo.toml: queues.orders.concurrency: must be at least 1`. An
//! unknown key, or a `CONEJO_` variable that is none of the above, is an error too (a typo
//! must not be silently ignored), and so is a setting for a queue the code does not register
//! (reported by [`Builder::build`](crate::Builder::build)). An empty variable counts as
//! unset. `CONEJO_CONFIG` is left to the CLI, which reads the file it names.
//!
//! ```
//! use conejo::{Conejo, Context, HandlerError, QueueConfig, settings::Settings};
//!
//! # struct Orders;
//! # impl conejo::Handler for Orders {
//! #     type Message = Vec<u8>;
//! #     async fn handle(&self, _: Vec<u8>, _: &Context) -> Result<(), HandlerError> { Ok(()) }
//! # }
//! # fn main() -> Result<(), conejo::Error> {
//! let file = r#"
//!     url = "amqp://app:s3cret@rabbit:5672/%2f"
//!     shutdown_timeout = "25s"
//!     [queues.orders]
//!     concurrency = 8
//!     retry = { max_attempts = 3, initial_delay = "500ms" }
//! "#;
//! // The environment wins over the file (here a map; `Settings::load` reads the process's).
//! let env = [("CONEJO_QUEUES__ORDERS__CONCURRENCY", "32")];
//! let settings = Settings::from_toml("conejo.toml", file)?.with_env(env)?;
//! assert_eq!(settings.queue("orders").concurrency(), Some(32));
//! assert!(!format!("{settings:?}").contains("s3cret"));
//!
//! // Code registers the handlers; the settings tune them (and win over the code).
//! let service = Conejo::builder_from(&settings)
//!     .queue_with("orders", Orders, QueueConfig::new().concurrency(4))
//!     .build()?;
//! # let _ = service;
//! # Ok(())
//! # }
//! ```

use std::{ffi::OsString, net::SocketAddr, path::Path, time::Duration};

mod apply;
mod queue;
mod raw;
#[cfg(test)]
mod tests;

use crate::{AmqpUrl, Error, LogFormat, broker::url::parse_list};

pub use self::queue::{QueueSettings, env_name};
use self::{
    queue::{QueueEntry, Target, queue_setting},
    raw::{Origin, Raw, dotted, flatten},
};

/// The prefix of conejo's environment variables.
pub const ENV_PREFIX: &str = "CONEJO_";

/// The variable naming the configuration file, read by the CLI (not by [`Settings::load`]).
pub const CONFIG_FILE_VAR: &str = "CONEJO_CONFIG";

/// The broker [`Conejo::builder_from`](crate::Conejo::builder_from) connects to when no
/// setting names one: a local RabbitMQ with its default user (which RabbitMQ only accepts from
/// localhost).
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The top-level keys, for error messages.
const KEYS: &str = "url, connection_name, connect_timeout, wait_for_broker, shutdown_timeout, \
                    log_format, log_level, health_addr, queues.<queue>.…";

/// Settings loaded from a TOML file and the environment; see the [module](self) for the keys.
///
/// Every field is optional: what is not set keeps the value the code gave the builder.
/// `Debug` never shows the URL's password.
#[derive(Debug, Clone, Default)]
pub struct Settings {
    /// The broker's addresses.
    urls: Option<Vec<AmqpUrl>>,
    /// Shown by the broker.
    connection_name: Option<String>,
    /// One connection attempt's limit.
    connect_timeout: Option<Duration>,
    /// Wait for the broker at startup, or fail at once.
    wait_for_broker: Option<bool>,
    /// Time in-flight handlers get at shutdown.
    shutdown_timeout: Option<Duration>,
    /// Text or JSON logs.
    log_format: Option<LogFormat>,
    /// A `tracing` filter.
    log_level: Option<String>,
    /// Where the health endpoints listen (feature `health`).
    health_addr: Option<SocketAddr>,
    /// One entry per queue setting, in precedence order (later wins).
    queues: Vec<QueueEntry>,
}

impl Settings {
    /// Reads the TOML file at `file` (if given: it must exist), then the process's `CONEJO_*`
    /// environment variables on top.
    ///
    /// # Errors
    /// [`Error::InvalidSetting`] naming the file or the variable and the key: an unreadable
    /// file, invalid TOML, an unknown key, a value of the wrong type or out of range.
    pub fn load(file: Option<&Path>) -> Result<Settings, Error> {
        let mut env = Vec::new();
        for (name, value) in std::env::vars_os() {
            let Some(name) = name.to_str().map(str::to_owned) else {
                continue;
            };
            if !name.starts_with(ENV_PREFIX) {
                continue;
            }
            match value.into_string() {
                Ok(value) => env.push((name, value)),
                Err(_) => {
                    return Err(Error::InvalidSetting {
                        key: name,
                        reason: "not valid UTF-8".to_owned(),
                    });
                }
            }
        }
        Self::load_from(file, env)
    }

    /// As [`load`](Self::load), with the environment given as `(name, value)` pairs instead of
    /// the process's: for tests, which then need not touch the process's environment.
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn load_from<I, K, V>(file: Option<&Path>, env: I) -> Result<Settings, Error>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<OsString>,
        V: AsRef<str>,
    {
        let settings = match file {
            Some(path) => Self::from_file(path)?,
            None => Settings::default(),
        };
        settings.with_env(env)
    }

    /// Reads the TOML file at `path`.
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn from_file(path: &Path) -> Result<Settings, Error> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|error| Error::InvalidSetting {
            key: name.clone(),
            reason: format!("cannot read the configuration file: {error}"),
        })?;
        Self::from_toml(&name, &text)
    }

    /// Parses `text`, the TOML of a file named `name` (used in error messages).
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn from_toml(name: &str, text: &str) -> Result<Settings, Error> {
        let table: toml::Table = text.parse().map_err(|error: toml::de::Error| {
            // Not the error's Display: it quotes the offending line, which may hold a password.
            let at = error
                .span()
                .map(|span| {
                    let before = &text[..span.start.min(text.len())];
                    let line = before.matches('\n').count() + 1;
                    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                    format!(" (line {line}, column {column})")
                })
                .unwrap_or_default();
            Error::InvalidSetting {
                key: name.to_owned(),
                reason: format!("invalid TOML{at}: {}", error.message().trim()),
            }
        })?;
        let mut leaves = Vec::new();
        flatten(&table, &mut Vec::new(), &mut leaves);
        let mut settings = Settings::default();
        for (path, value) in leaves {
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            let key = format!("{name}: {}", dotted(&path));
            settings.set(&path, Raw::Toml(value), &key, Origin::File)?;
        }
        Ok(settings)
    }

    /// These settings with the `CONEJO_*` variables among `env` on top (other variables, and
    /// empty ones, are ignored).
    ///
    /// # Errors
    /// As [`load`](Self::load).
    pub fn with_env<I, K, V>(mut self, env: I) -> Result<Settings, Error>
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<OsString>,
        V: AsRef<str>,
    {
        let mut vars: Vec<(String, V)> = env
            .into_iter()
            .filter_map(|(name, value)| {
                let name = name.into().into_string().ok()?;
                // An empty variable is an unset one (`FOO=` in a compose file or a shell).
                (name.starts_with(ENV_PREFIX)
                    && name != CONFIG_FILE_VAR
                    && !value.as_ref().trim().is_empty())
                .then_some((name, value))
            })
            .collect();
        // The first error found is the same whatever the order the environment is listed in.
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, value) in &vars {
            let rest = &name[ENV_PREFIX.len()..];
            let mut path: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
            // The queue's name keeps its case: it is matched against registered names.
            if path.len() >= 2 && path[0] == "queues" {
                path[1] = rest.split("__").nth(1).unwrap_or_default().to_owned();
            }
            let path: Vec<&str> = path.iter().map(String::as_str).collect();
            self.set(&path, Raw::Env(value.as_ref()), name, Origin::Env)?;
        }
        Ok(self)
    }

    /// Sets the value at `path`.
    fn set(&mut self, path: &[&str], raw: Raw<'_>, key: &str, origin: Origin) -> Result<(), Error> {
        let invalid = |reason: String| Error::InvalidSetting {
            key: key.to_owned(),
            reason,
        };
        match path {
            ["url"] => {
                let joined = match raw {
                    Raw::Toml(toml::Value::Array(items)) => items
                        .iter()
                        .map(|item| {
                            item.as_str().map(str::to_owned).ok_or_else(|| {
                                invalid("expected a URL or a list of URLs (strings)".to_owned())
                            })
                        })
                        .collect::<Result<Vec<_>, _>>()?
                        .join(","),
                    _ => raw
                        .string("a URL or a list of URLs")
                        .map_err(invalid)?
                        .to_owned(),
                };
                // parse_list's errors never repeat the password.
                let urls = parse_list(&joined).map_err(|error| invalid(error.to_string()))?;
                self.urls = Some(urls);
            }
            ["connection_name"] => {
                self.connection_name = Some(raw.string("a string").map_err(invalid)?.to_owned());
            }
            ["connect_timeout"] => {
                self.connect_timeout = Some(
                    raw.duration_within(
                        Duration::from_nanos(1),
                        crate::config::service::MAX_CONNECT_TIMEOUT,
                        "1 ns and 10 min",
                    )
                    .map_err(invalid)?,
                );
            }
            ["wait_for_broker"] => self.wait_for_broker = Some(raw.boolean().map_err(invalid)?),
            ["shutdown_timeout"] => {
                self.shutdown_timeout = Some(
                    raw.duration_within(
                        Duration::from_nanos(1),
                        crate::config::service::MAX_SHUTDOWN_TIMEOUT,
                        "1 ns and 24 h",
                    )
                    .map_err(invalid)?,
                );
            }
            ["log_format"] => {
                let text = raw.string("text or json").map_err(invalid)?;
                self.log_format = Some(text.parse().map_err(invalid)?);
            }
            ["log_level"] => {
                let level = raw.string("a filter such as \"info\"").map_err(invalid)?;
                if level.trim().is_empty() {
                    return Err(invalid("must not be empty".to_owned()));
                }
                self.log_level = Some(level.trim().to_owned());
            }
            ["health_addr"] => {
                let text = raw.string("a socket address").map_err(invalid)?;
                self.health_addr = Some(text.trim().parse().map_err(|_| {
                    invalid(format!(
                        "invalid socket address {text:?} (e.g. \"0.0.0.0:8080\")"
                    ))
                })?);
            }
            ["queues", queue, rest @ ..] if !rest.is_empty() => {
                if queue.is_empty() {
                    return Err(invalid("missing queue name".to_owned()));
                }
                let settings = queue_setting(rest, raw).map_err(invalid)?;
                let target = match origin {
                    Origin::File => Target::Exact((*queue).to_owned()),
                    Origin::Env => Target::Env(env_name(queue)),
                };
                self.queues.push(QueueEntry {
                    target,
                    key: key.to_owned(),
                    settings,
                });
            }
            _ => {
                return Err(invalid(format!(
                    "unknown setting (the settings are: {KEYS})"
                )));
            }
        }
        Ok(())
    }

    /// `url`: the broker's addresses.
    #[must_use]
    pub fn urls(&self) -> Option<&[AmqpUrl]> {
        self.urls.as_deref()
    }

    /// `connection_name`.
    #[must_use]
    pub fn connection_name(&self) -> Option<&str> {
        self.connection_name.as_deref()
    }

    /// `connect_timeout`.
    #[must_use]
    pub fn connect_timeout(&self) -> Option<Duration> {
        self.connect_timeout
    }

    /// `wait_for_broker`.
    #[must_use]
    pub fn wait_for_broker(&self) -> Option<bool> {
        self.wait_for_broker
    }

    /// `shutdown_timeout`.
    #[must_use]
    pub fn shutdown_timeout(&self) -> Option<Duration> {
        self.shutdown_timeout
    }

    /// `log_format`.
    #[must_use]
    pub fn log_format(&self) -> Option<LogFormat> {
        self.log_format
    }

    /// Sets the log format (e.g. from a command-line option, which wins over the rest).
    pub fn set_log_format(&mut self, format: LogFormat) {
        self.log_format = Some(format);
    }

    /// `log_level`: a `tracing` filter (`info`, `warn,conejo=debug`).
    #[must_use]
    pub fn log_level(&self) -> Option<&str> {
        self.log_level.as_deref()
    }

    /// `health_addr`: where the health endpoints listen (`/livez`, `/readyz`, `/metrics`;
    /// see [`Builder::health`](crate::Builder::health), feature `health`). Without that
    /// feature, setting it is an error.
    #[must_use]
    pub fn health_addr(&self) -> Option<SocketAddr> {
        self.health_addr
    }

    /// The settings of `queue` (registered under that name), from the file and the
    /// environment, the environment winning.
    pub fn queue(&self, queue: &str) -> QueueSettings {
        let mut merged = QueueSettings::default();
        for entry in self
            .queues
            .iter()
            .filter(|entry| entry.target.matches(queue))
        {
            merged.merge(&entry.settings);
        }
        merged
    }
}
