//! Settings from a TOML file and `CONEJO_*` environment variables, applied onto the
//! [`Builder`] (feature `config`).
//!
//! Code registers the queues and their handlers; the deployment tunes them. Each setting
//! is taken from, in increasing precedence:
//!
//! 1. the code: what the builder and each [`QueueConfig`] say (or
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

use crate::{
    AmqpUrl, Builder, Conejo, Error, LogFormat, QueueConfig, app::ApplySettings,
    broker::url::parse_list,
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

/// The keys of a queue, for error messages.
const QUEUE_KEYS: &str = "concurrency, prefetch, timeout, poison_limit, retry.max_attempts, \
                          retry.initial_delay, retry.max_delay";

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

/// One queue setting, with the queue it is for and where it was written.
#[derive(Debug, Clone)]
struct QueueEntry {
    /// The queue it tunes.
    target: Target,
    /// The key as written, for errors.
    key: String,
    /// The one value it sets.
    settings: QueueSettings,
}

/// How a setting names its queue.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Target {
    /// A file key: the queue's exact name.
    Exact(String),
    /// A variable name: the queue's name in capitals, non-alphanumerics as `_`.
    Env(String),
}

impl Target {
    fn matches(&self, queue: &str) -> bool {
        match self {
            Target::Exact(name) => name == queue,
            Target::Env(normalized) => *normalized == env_name(queue),
        }
    }
}

/// `shop.orders` → `SHOP_ORDERS`: how a queue is named in a variable name.
#[must_use]
pub fn env_name(queue: &str) -> String {
    queue
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// The settings of one queue, each optional: what is not set keeps the queue's
/// [`QueueConfig`].
#[derive(Debug, Clone, Default, PartialEq)]
#[must_use]
pub struct QueueSettings {
    concurrency: Option<usize>,
    prefetch: Option<u16>,
    timeout: Option<Duration>,
    poison_limit: Option<Option<u32>>,
    max_attempts: Option<u32>,
    initial_delay: Option<Duration>,
    max_delay: Option<Duration>,
}

impl QueueSettings {
    /// `concurrency`: messages handled at once.
    #[must_use]
    pub fn concurrency(&self) -> Option<usize> {
        self.concurrency
    }

    /// `prefetch`: unacknowledged messages the broker may push.
    #[must_use]
    pub fn prefetch(&self) -> Option<u16> {
        self.prefetch
    }

    /// `timeout`: the longest a handler may take.
    #[must_use]
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// `poison_limit`: `Some(None)` when set to `off`.
    #[must_use]
    pub fn poison_limit(&self) -> Option<Option<u32>> {
        self.poison_limit
    }

    /// `retry.max_attempts`.
    #[must_use]
    pub fn max_attempts(&self) -> Option<u32> {
        self.max_attempts
    }

    /// `retry.initial_delay`.
    #[must_use]
    pub fn initial_delay(&self) -> Option<Duration> {
        self.initial_delay
    }

    /// `retry.max_delay`.
    #[must_use]
    pub fn max_delay(&self) -> Option<Duration> {
        self.max_delay
    }

    /// Overlays `other`'s values onto these.
    fn merge(&mut self, other: &QueueSettings) {
        macro_rules! take {
            ($($field:ident),*) => { $( if other.$field.is_some() { self.$field = other.$field; } )* };
        }
        take!(
            concurrency,
            prefetch,
            timeout,
            poison_limit,
            max_attempts,
            initial_delay,
            max_delay
        );
    }

    /// Applies the values set onto `config`.
    pub fn apply(&self, config: QueueConfig) -> QueueConfig {
        let mut config = config;
        if let Some(concurrency) = self.concurrency {
            config.concurrency = Some(concurrency);
        }
        if let Some(prefetch) = self.prefetch {
            config.prefetch = Some(prefetch);
        }
        if let Some(timeout) = self.timeout {
            config.timeout = Some(timeout);
        }
        if let Some(limit) = self.poison_limit {
            config.poison_limit = limit;
        }
        if let Some(attempts) = self.max_attempts {
            config.retry = config.retry.max_attempts(attempts);
        }
        if let Some(delay) = self.initial_delay {
            config.retry = config.retry.initial_delay(delay);
        }
        if let Some(delay) = self.max_delay {
            config.retry = config.retry.max_delay(delay);
        }
        config
    }
}

/// A value as written: in the TOML file (typed), or in a variable (a string).
#[derive(Clone, Copy)]
enum Raw<'a> {
    Toml(&'a toml::Value),
    Env(&'a str),
}

impl Raw<'_> {
    fn string(&self, what: &str) -> Result<&str, String> {
        match self {
            Raw::Toml(toml::Value::String(s)) => Ok(s),
            Raw::Env(s) => Ok(s),
            Raw::Toml(other) => Err(format!("expected {what}, found {}", other.type_str())),
        }
    }

    fn integer(&self) -> Result<i64, String> {
        match self {
            Raw::Toml(toml::Value::Integer(n)) => Ok(*n),
            Raw::Env(s) => s
                .trim()
                .parse()
                .map_err(|_| format!("invalid integer {s:?}")),
            Raw::Toml(other) => Err(format!("expected an integer, found {}", other.type_str())),
        }
    }

    fn boolean(&self) -> Result<bool, String> {
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

    fn duration(&self) -> Result<Duration, String> {
        let text = self.string("a duration such as \"30s\" or \"500ms\"")?;
        humantime::parse_duration(text.trim()).map_err(|_| {
            format!("invalid duration {text:?} (write e.g. \"500ms\", \"30s\", \"2m\")")
        })
    }

    fn duration_within(
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

    fn at_least_one<T: TryFrom<i64>>(&self, max: &str) -> Result<T, String> {
        let n = self.integer()?;
        if n < 1 {
            return Err("must be at least 1".to_owned());
        }
        T::try_from(n).map_err(|_| format!("must be at most {max}"))
    }
}

/// Where settings come from, for error messages.
#[derive(Clone, Copy)]
enum Origin {
    /// A TOML file.
    File,
    /// The environment.
    Env,
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

    /// Applies these settings onto `builder` (called by `build()`, so that the settings win
    /// over the code whatever the order of the calls). A queue setting must tune a
    /// registered queue.
    fn apply(&self, builder: &mut Builder) -> Result<(), Error> {
        if let Some(urls) = &self.urls {
            builder.given.urls = Ok(urls.clone());
        }
        if let Some(name) = &self.connection_name {
            builder.given.connection_name = Some(name.clone());
        }
        if let Some(timeout) = self.connect_timeout {
            builder.config.connect.timeout = timeout;
        }
        if let Some(wait) = self.wait_for_broker {
            builder.config.connect.wait_for_broker = wait;
        }
        if let Some(timeout) = self.shutdown_timeout {
            builder.config.timing.shutdown_timeout = timeout;
        }
        #[cfg(feature = "health")]
        if let Some(address) = self.health_addr {
            builder.health = Some(address);
        }
        #[cfg(not(feature = "health"))]
        if self.health_addr.is_some() {
            return Err(Error::InvalidSetting {
                key: "health_addr (CONEJO_HEALTH_ADDR)".to_owned(),
                reason: "this build of conejo serves no health endpoint: enable its `health` \
                         feature"
                    .to_owned(),
            });
        }
        for entry in &self.queues {
            let matching: Vec<&str> = builder
                .queues
                .iter()
                .filter(|spec| entry.target.matches(&spec.name))
                .map(|spec| &*spec.name)
                .collect();
            match matching.as_slice() {
                [_] => {}
                [] => {
                    let registered: Vec<String> = builder
                        .queues
                        .iter()
                        .map(|spec| match entry.target {
                            Target::Exact(_) => format!("'{}'", spec.name),
                            Target::Env(_) => {
                                format!("'{}' as {}", spec.name, env_name(&spec.name))
                            }
                        })
                        .collect();
                    return Err(Error::InvalidSetting {
                        key: entry.key.clone(),
                        reason: format!(
                            "no such queue is registered (registered: {})",
                            if registered.is_empty() {
                                "none".to_owned()
                            } else {
                                registered.join(", ")
                            }
                        ),
                    });
                }
                several if matches!(entry.target, Target::Env(_)) => {
                    return Err(Error::InvalidSetting {
                        key: entry.key.clone(),
                        reason: format!(
                            "names several queues ({}): set it in the file, by exact name",
                            several.join(", ")
                        ),
                    });
                }
                // The same name twice: `build()` reports it.
                _ => {}
            }
        }
        for spec in &mut builder.queues {
            let settings = self.queue(&spec.name);
            if settings != QueueSettings::default() {
                spec.config = settings.apply(spec.config.clone());
            }
        }
        Ok(())
    }
}

/// A queue's setting at `path` (below `queues.<q>`).
fn queue_setting(path: &[&str], raw: Raw<'_>) -> Result<QueueSettings, String> {
    let mut settings = QueueSettings::default();
    let day = crate::config::retry::MAX_RETRY_DELAY;
    match path {
        ["concurrency"] => settings.concurrency = Some(raw.at_least_one("the platform's usize")?),
        ["prefetch"] => {
            let n = raw.integer()?;
            if !(1..=i64::from(u16::MAX)).contains(&n) {
                return Err("must be 1 to 65535 (0 would mean unlimited)".to_owned());
            }
            settings.prefetch = Some(n as u16);
        }
        ["timeout"] => {
            settings.timeout = Some(raw.duration_within(
                Duration::from_nanos(1),
                crate::config::queue::MAX_TIMEOUT,
                "1 ns and 7 days",
            )?);
        }
        ["poison_limit"] => {
            let off = match raw {
                Raw::Toml(toml::Value::Boolean(false)) => true,
                Raw::Toml(toml::Value::String(s)) => s.trim().eq_ignore_ascii_case("off"),
                Raw::Env(s) => s.trim().eq_ignore_ascii_case("off"),
                Raw::Toml(_) => false,
            };
            settings.poison_limit = Some(if off {
                None
            } else {
                Some(
                    raw.at_least_one("4294967295")
                        .map_err(|reason| format!("{reason} (or \"off\")"))?,
                )
            });
        }
        ["retry", "max_attempts"] => settings.max_attempts = Some(raw.at_least_one("4294967295")?),
        ["retry", "initial_delay"] => {
            settings.initial_delay =
                Some(raw.duration_within(Duration::from_millis(1), day, "1 ms and 24 h")?);
        }
        ["retry", "max_delay"] => {
            settings.max_delay =
                Some(raw.duration_within(Duration::from_millis(1), day, "1 ms and 24 h")?);
        }
        _ => {
            return Err(format!(
                "unknown queue setting (a queue's settings are: {QUEUE_KEYS})"
            ));
        }
    }
    Ok(settings)
}

/// The leaves of `table` (tables are walked, arrays and scalars are leaves), with their paths.
fn flatten<'a>(
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
fn dotted(path: &[&str]) -> String {
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

impl ApplySettings for Settings {
    fn apply_to(&self, builder: &mut Builder) -> Result<(), Error> {
        self.apply(builder)
    }
}

impl Builder {
    /// Settings from a file and the environment ([`settings`](crate::settings)): applied by
    /// [`build`](Self::build) over what the code set, whatever the order of the calls, and
    /// checked there: a queue setting must name a registered queue. Replaces settings given
    /// before.
    #[cfg(feature = "config")]
    #[cfg_attr(docsrs, doc(cfg(feature = "config")))]
    pub fn settings(mut self, settings: &crate::settings::Settings) -> Self {
        self.settings = Some(Box::new(settings.clone()));
        self
    }
}

impl Conejo {
    /// Starts building a service configured by `settings` (from a file and the environment,
    /// see [`settings`](crate::settings)): it connects to their `url`, or to
    /// [`DEFAULT_URL`](crate::settings::DEFAULT_URL) when they name none. Same as
    /// `Conejo::builder(url).settings(settings)`.
    ///
    /// ```no_run
    /// # struct Orders;
    /// # impl conejo::Handler for Orders {
    /// #     type Message = Vec<u8>;
    /// #     async fn handle(&self, _: Vec<u8>, _: &conejo::Context) -> Result<(), conejo::HandlerError> { Ok(()) }
    /// # }
    /// # async fn run() -> Result<(), conejo::Error> {
    /// use conejo::{Conejo, settings::Settings};
    ///
    /// // CONEJO_URL, CONEJO_QUEUES__ORDERS__CONCURRENCY=8, …
    /// let settings = Settings::load(None)?;
    /// Conejo::builder_from(&settings).queue("orders", Orders).build()?.run().await
    /// # }
    /// ```
    #[cfg(feature = "config")]
    #[cfg_attr(docsrs, doc(cfg(feature = "config")))]
    pub fn builder_from(settings: &crate::settings::Settings) -> Builder {
        Conejo::builder(crate::settings::DEFAULT_URL).settings(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Conejo, Context, Handler, HandlerError};

    struct Noop;
    impl Handler for Noop {
        type Message = Vec<u8>;
        async fn handle(&self, _: Vec<u8>, _: &Context) -> Result<(), HandlerError> {
            Ok(())
        }
    }

    const FILE: &str = r#"
        url = ["amqp://app:file-secret@n1:5672/%2f", "amqp://app:file-secret@n2:5672/%2f"]
        connection_name = "from-file"
        shutdown_timeout = "25s"
        wait_for_broker = false
        log_format = "json"

        [queues."shop.orders"]
        concurrency = 4
        prefetch = 20
        poison_limit = "off"
        retry = { max_attempts = 3, initial_delay = "500ms", max_delay = "10s" }

        [queues.thumbnails]
        timeout = "2m"
    "#;

    fn env(vars: &[(&str, &str)]) -> Vec<(String, String)> {
        vars.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn error(result: Result<Settings, Error>) -> String {
        match result {
            Ok(settings) => panic!("expected an error, got {settings:?}"),
            Err(error) => {
                assert!(matches!(error, Error::InvalidSetting { .. }), "{error:?}");
                error.to_string()
            }
        }
    }

    #[test]
    fn the_environment_wins_over_the_file() {
        let settings = Settings::from_toml("conejo.toml", FILE)
            .unwrap()
            .with_env(env(&[
                ("CONEJO_SHUTDOWN_TIMEOUT", "5s"),
                ("CONEJO_QUEUES__SHOP_ORDERS__CONCURRENCY", "8"),
                ("CONEJO_QUEUES__shop_orders__RETRY__MAX_ATTEMPTS", "7"),
                ("CONEJO_LOG_LEVEL", "debug,lapin=off"),
                ("PATH", "/usr/bin"),
                ("CONEJO_CONFIG", "ignored.toml"),
                ("CONEJO_CONNECTION_NAME", " "), // empty: unset
            ]))
            .unwrap();
        assert_eq!(settings.shutdown_timeout(), Some(Duration::from_secs(5)));
        assert_eq!(settings.connection_name(), Some("from-file"));
        assert_eq!(settings.wait_for_broker(), Some(false));
        assert_eq!(settings.log_format(), Some(LogFormat::Json));
        assert_eq!(settings.log_level(), Some("debug,lapin=off"));
        assert_eq!(settings.urls().map(<[_]>::len), Some(2));
        let orders = settings.queue("shop.orders");
        assert_eq!(orders.concurrency(), Some(8)); // env
        assert_eq!(orders.prefetch(), Some(20)); // file
        assert_eq!(orders.max_attempts(), Some(7)); // env
        assert_eq!(orders.initial_delay(), Some(Duration::from_millis(500)));
        assert_eq!(orders.poison_limit(), Some(None));
        assert_eq!(
            settings.queue("thumbnails").timeout(),
            Some(Duration::from_secs(120))
        );
        assert_eq!(settings.queue("other"), QueueSettings::default());
        let shown = format!("{settings:?}");
        assert!(!shown.contains("file-secret"), "{shown}");
    }

    #[test]
    fn settings_win_over_the_code_whatever_the_order() {
        let settings = Settings::from_toml("conejo.toml", FILE)
            .unwrap()
            .with_env(env(&[("CONEJO_CONNECT_TIMEOUT", "3s")]))
            .unwrap();
        let builder = Conejo::builder("amqp://localhost")
            .settings(&settings)
            .shutdown_timeout(Duration::from_secs(1)) // the file's 25 s wins
            .queue_with(
                "shop.orders",
                Noop,
                QueueConfig::new()
                    .concurrency(1)
                    .timeout(Duration::from_secs(9)),
            )
            .queue("thumbnails", Noop)
            .queue("untouched", Noop);
        let conejo = builder.build().unwrap();
        let shown = format!("{conejo:?}");
        assert!(shown.contains("concurrency: Some(4)"), "{shown}");
        assert!(shown.contains("prefetch: Some(20)"), "{shown}");
        // the code's timeout stays where no setting replaces it
        assert!(shown.contains("timeout: Some(9s)"), "{shown}");
        assert!(shown.contains("timeout: Some(120s)"), "{shown}");
        assert!(shown.contains("shutdown_timeout: 25s"), "{shown}");
        assert!(shown.contains("timeout: 3s"), "{shown}");
        assert!(shown.contains("from-file"), "{shown}");
        assert!(shown.contains("amqp://app:***@n1:5672"), "{shown}");
        assert!(!shown.contains("file-secret"), "{shown}");
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&str, &str)] = &[
            (
                "[queues.orders]\nconcurrency = 0",
                "invalid configuration: conejo.toml: queues.orders.concurrency: must be at least 1",
            ),
            (
                "[queues.\"shop.orders\"]\nprefetch = 0",
                "invalid configuration: conejo.toml: queues.\"shop.orders\".prefetch: must be 1 to 65535 (0 would mean unlimited)",
            ),
            (
                "shutdown_timeout = 5",
                "invalid configuration: conejo.toml: shutdown_timeout: expected a duration such as \"30s\" or \"500ms\", found integer",
            ),
            (
                "[queues.orders.retry]\nmax_delay = \"2d\"",
                "invalid configuration: conejo.toml: queues.orders.retry.max_delay: must be between 1 ms and 24 h",
            ),
            (
                "[queues.orders]\nconcurency = 3",
                "invalid configuration: conejo.toml: queues.orders.concurency: unknown queue setting",
            ),
            (
                "shutdown-timeout = \"3s\"",
                "invalid configuration: conejo.toml: shutdown-timeout: unknown setting",
            ),
            (
                "log_format = \"yaml\"",
                "invalid configuration: conejo.toml: log_format: unknown log format \"yaml\" (text or json)",
            ),
        ];
        for (file, expected) in cases {
            let message = error(Settings::from_toml("conejo.toml", file));
            assert!(message.starts_with(expected), "{file}: {message}");
        }
        let cases: &[(&str, &str, &str)] = &[
            (
                "CONEJO_SHUTDOWN_TIMEOUT",
                "5 parsecs",
                "invalid configuration: CONEJO_SHUTDOWN_TIMEOUT: invalid duration \"5 parsecs\" (write e.g. \"500ms\", \"30s\", \"2m\")",
            ),
            (
                "CONEJO_QUEUES__ORDERS__CONCURRENCY",
                "eight",
                "invalid configuration: CONEJO_QUEUES__ORDERS__CONCURRENCY: invalid integer \"eight\"",
            ),
            (
                "CONEJO_QUEUES__ORDERS__POISON_LIMIT",
                "0",
                "invalid configuration: CONEJO_QUEUES__ORDERS__POISON_LIMIT: must be at least 1 (or \"off\")",
            ),
            (
                "CONEJO_WAIT_FOR_BROKER",
                "maybe",
                "invalid configuration: CONEJO_WAIT_FOR_BROKER: invalid boolean \"maybe\" (true or false)",
            ),
            (
                "CONEJO_CONNECT_TIMEOUT",
                "0s",
                "invalid configuration: CONEJO_CONNECT_TIMEOUT: must be between 1 ns and 10 min",
            ),
            (
                "CONEJO_HEALTH_ADDR",
                "localhost",
                "invalid configuration: CONEJO_HEALTH_ADDR: invalid socket address \"localhost\"",
            ),
            (
                "CONEJO_QUEUE__ORDERS__CONCURRENCY",
                "1",
                "invalid configuration: CONEJO_QUEUE__ORDERS__CONCURRENCY: unknown setting",
            ),
            (
                "CONEJO_QUEUES____CONCURRENCY",
                "1",
                "invalid configuration: CONEJO_QUEUES____CONCURRENCY: missing queue name",
            ),
        ];
        for (name, value, expected) in cases {
            let message = error(Settings::default().with_env(env(&[(name, value)])));
            assert!(message.starts_with(expected), "{name}={value}: {message}");
        }
    }

    #[test]
    fn passwords_never_appear_in_errors() {
        let message = error(Settings::default().with_env(env(&[(
            "CONEJO_URL",
            "amqp://app:env-secret@host:notaport/",
        )])));
        assert!(
            message.starts_with("invalid configuration: CONEJO_URL: invalid AMQP URL"),
            "{message}"
        );
        assert!(!message.contains("env-secret"), "{message}");
        // A TOML syntax error on the URL's line: the parser's message quotes the line, ours not.
        let message = error(Settings::from_toml(
            "conejo.toml",
            "log_level = \"info\"\nurl = \"amqp://app:file-secret@host/\n",
        ));
        assert!(
            message.contains("conejo.toml: invalid TOML (line 2, column"),
            "{message}"
        );
        assert!(!message.contains("file-secret"), "{message}");
        let message = error(Settings::from_toml("conejo.toml", "url = 5"));
        assert!(
            message.contains("conejo.toml: url: expected a URL"),
            "{message}"
        );
    }

    #[test]
    fn a_setting_for_an_unregistered_queue_is_an_error() {
        let settings =
            Settings::from_toml("conejo.toml", "[queues.ordrs]\nconcurrency = 2").unwrap();
        let err = Conejo::builder("amqp://localhost")
            .settings(&settings)
            .queue("orders", Noop)
            .build()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: conejo.toml: queues.ordrs.concurrency: no such queue is \
             registered (registered: 'orders')"
        );
        let settings = Settings::default()
            .with_env(env(&[("CONEJO_QUEUES__SHOP_ORDER__PREFETCH", "5")]))
            .unwrap();
        let err = Conejo::builder("amqp://localhost")
            .settings(&settings)
            .queue("shop.orders", Noop)
            .build()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: CONEJO_QUEUES__SHOP_ORDER__PREFETCH: no such queue is \
             registered (registered: 'shop.orders' as SHOP_ORDERS)"
        );
        let settings = Settings::default()
            .with_env(env(&[("CONEJO_QUEUES__A_B__PREFETCH", "5")]))
            .unwrap();
        let err = Conejo::builder("amqp://localhost")
            .settings(&settings)
            .queue("a.b", Noop)
            .queue("a-b", Noop)
            .build()
            .unwrap_err();
        assert!(
            err.to_string().contains("names several queues (a.b, a-b)"),
            "{err}"
        );
    }

    #[test]
    fn builder_from_defaults_to_a_local_broker() {
        let conejo = Conejo::builder_from(&Settings::default())
            .queue("orders", Noop)
            .build()
            .unwrap();
        assert!(format!("{conejo:?}").contains("amqp://guest:***@127.0.0.1:5672/%2f"));
        // Files are read from disk; a missing one names its path.
        let message = error(Settings::load_from(
            Some(Path::new("/nonexistent/conejo.toml")),
            env(&[]),
        ));
        assert!(
            message.starts_with("invalid configuration: /nonexistent/conejo.toml: cannot read"),
            "{message}"
        );
    }
}
