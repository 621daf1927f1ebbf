//! Queue settings: which queue a setting names, and the values it sets.

use std::time::Duration;

use super::raw::Raw;
use crate::QueueConfig;

/// The keys of a queue's settings, for errors.
pub(super) const QUEUE_KEYS: &str = "concurrency, prefetch, timeout, poison_limit, retry.max_attempts, \
                          retry.initial_delay, retry.max_delay";

/// One queue setting, with the queue it is for and where it was written.
#[derive(Debug, Clone)]
pub(super) struct QueueEntry {
    /// The queue it tunes.
    pub(super) target: Target,
    /// The key as written, for errors.
    pub(super) key: String,
    /// The one value it sets.
    pub(super) settings: QueueSettings,
}

/// How a setting names its queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Target {
    /// A file key: the queue's exact name.
    Exact(String),
    /// A variable name: the queue's name in capitals, non-alphanumerics as `_`.
    Env(String),
}

impl Target {
    pub(super) fn matches(&self, queue: &str) -> bool {
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
    pub(super) fn merge(&mut self, other: &QueueSettings) {
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

/// A queue's setting at `path` (below `queues.<q>`).
pub(super) fn queue_setting(path: &[&str], raw: Raw<'_>) -> Result<QueueSettings, String> {
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
