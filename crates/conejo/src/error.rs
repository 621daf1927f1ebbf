//! Errors that stop the service (startup and run), as opposed to per-message failures.

use std::{fmt, time::Duration};

/// An error that prevents conejo from starting or makes a running service stop.
///
/// Per-message problems (a handler error, a payload that does not decode, a panic) are never
/// an `Error`: they become an [`Outcome`](crate::Outcome) for that one message. Nor is a lost
/// connection or channel: conejo reconnects. An `Error` means the service itself cannot go
/// on: bad configuration, refused credentials, a queue that does not exist at startup, an
/// unreachable broker when told not to wait for it.
///
/// Messages never contain the password of the AMQP URL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The AMQP URL could not be parsed. The reason never repeats the password.
    #[error("invalid AMQP URL: {reason}")]
    InvalidUrl {
        /// What is wrong with the URL.
        reason: String,
    },

    /// The configuration is inconsistent (no queue, zero concurrency, duplicate queue…).
    #[error("invalid configuration{}: {reason}", queue_suffix(.queue))]
    InvalidConfig {
        /// The queue the problem is about, if any.
        queue: Option<String>,
        /// What is wrong.
        reason: String,
    },

    /// A setting read from a configuration file or the environment is invalid, or tunes a
    /// queue that is not registered (feature `config`). `key` is the setting as it was
    /// written: the environment variable (`CONEJO_SHUTDOWN_TIMEOUT`), or the file and its
    /// dotted key (`conejo.toml: queues.orders.concurrency`). Never contains a password.
    #[error("invalid configuration: {key}: {reason}")]
    InvalidSetting {
        /// Where the setting was written: variable name, or file and key.
        key: String,
        /// What is wrong with it.
        reason: String,
    },

    /// Connecting to the broker failed (unreachable, refused credentials, TLS…).
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The URL, with its password redacted.
        url: String,
        /// What lapin reported.
        #[source]
        source: lapin::Error,
    },

    /// The queue does not exist and conejo was asked not to declare it (passive declaration).
    #[error("queue '{queue}' does not exist (declared passive: conejo does not create it)")]
    QueueNotFound {
        /// The missing queue.
        queue: String,
    },

    /// Setting up a queue's consumer failed (declaration refused, e.g. a queue that exists
    /// with other arguments; qos; basic.consume).
    #[error("cannot set up queue '{queue}' ({step}): {source}")]
    QueueSetup {
        /// The queue being set up.
        queue: String,
        /// What conejo was doing: "declare", "qos", "consume", "open channel".
        step: &'static str,
        /// What lapin reported.
        #[source]
        source: lapin::Error,
    },

    /// A queue's dead-letter exchange, named in its configuration, does not exist: conejo
    /// refuses to start rather than lose the messages it would dead-letter.
    #[error(
        "dead-letter exchange '{exchange}' of queue '{queue}' does not exist \
         (declare it, or let conejo declare '{queue}.dlx' by not naming one)"
    )]
    DeadLetterExchangeNotFound {
        /// The consumed queue.
        queue: String,
        /// The missing exchange.
        exchange: String,
    },

    /// Declaring an exchange, a binding or a dead-letter queue failed (a missing exchange,
    /// or one that exists with another type or other arguments).
    #[error("cannot declare {what}: {source}")]
    Topology {
        /// What conejo was declaring, e.g. "exchange 'orders'".
        what: String,
        /// What lapin reported.
        #[source]
        source: lapin::Error,
    },

    /// The health server's address could not be bound (in use, not local, not permitted):
    /// see `Builder::health` (feature `health`).
    #[error("cannot serve the health endpoints on {address}: {source}")]
    Health {
        /// The address asked for.
        address: std::net::SocketAddr,
        /// What the operating system reported.
        #[source]
        source: std::io::Error,
    },

    /// The dedicated connection runtime could not be started.
    #[error("cannot start the connection runtime: {0}")]
    Runtime(#[source] std::io::Error),
}

fn queue_suffix(queue: &Option<String>) -> String {
    match queue {
        Some(queue) => format!(" for queue '{queue}'"),
        None => String::new(),
    }
}

impl Error {
    pub(crate) fn config(queue: Option<&str>, reason: impl Into<String>) -> Self {
        Error::InvalidConfig {
            queue: queue.map(str::to_owned),
            reason: reason.into(),
        }
    }

    /// The queue this error is about, if it is about one.
    #[must_use]
    pub fn queue(&self) -> Option<&str> {
        match self {
            Error::InvalidConfig { queue, .. } => queue.as_deref(),
            Error::QueueNotFound { queue }
            | Error::DeadLetterExchangeNotFound { queue, .. }
            | Error::QueueSetup { queue, .. } => Some(queue),
            _ => None,
        }
    }

    /// True for errors about reaching the broker (as opposed to configuration or a queue's
    /// own setup).
    #[must_use]
    pub fn is_connection_error(&self) -> bool {
        matches!(self, Error::Connect { .. })
    }

    /// True when the broker refused the connection itself: wrong credentials
    /// (ACCESS_REFUSED) or a virtual host that does not exist or is not allowed
    /// (NOT_ALLOWED); and, over TLS, a certificate refused by either side (the broker's
    /// not trusted, ours missing or not accepted). Waiting does not fix those, so a startup
    /// stops at once (a running service retries them on reconnection, logging errors).
    #[must_use]
    pub fn is_refused(&self) -> bool {
        match self {
            Error::Connect { source, .. } => {
                matches!(
                    source.kind(),
                    lapin::ErrorKind::ProtocolError(amqp) if matches!(amqp.get_id(), 403 | 530)
                ) || crate::broker::tls::is_certificate_error(source)
            }
            _ => false,
        }
    }
}

/// Why a handler could not process a message; returned by [`Handler::handle`](crate::Handler).
///
/// Each error says what should happen to the message:
/// - [`HandlerError::retry`] (and any error converted with `?`): the message should be
///   tried again later, after the queue's [retry policy](crate::RetryPolicy)'s delay — or
///   after the delay given with [`HandlerError::retry_after`];
/// - [`HandlerError::reject`]: the message itself is bad and should not be tried again: it
///   is dead-lettered.
///
/// The queue's [error policy](crate::QueueConfig::on_failure) turns it into an
/// [`Outcome`](crate::Outcome); the default follows the error's own choice.
///
/// `HandlerError` deliberately does not implement [`std::error::Error`], so that `?` converts
/// into it from any error — a `std` error, an `anyhow::Error`, a `Box<dyn Error>`, even a
/// `String` or `&str` — as a retry.
///
/// ```
/// use std::time::Duration;
/// use conejo::HandlerError;
///
/// fn parse_quantity(raw: &str) -> Result<u32, HandlerError> {
///     // `?` on a std error: retry by default.
///     let n: u32 = raw.parse()?;
///     if n == 0 {
///         // A message that will never succeed: reject it.
///         return Err(HandlerError::reject("quantity must be positive"));
///     }
///     Ok(n)
/// }
/// assert!(parse_quantity("x").unwrap_err().is_retry());
/// assert!(parse_quantity("0").unwrap_err().is_reject());
///
/// fn call_inventory() -> anyhow::Result<()> {
///     anyhow::bail!("inventory service unavailable")
/// }
/// fn reserve() -> Result<(), HandlerError> {
///     call_inventory()?; // `?` on anyhow::Error: retry
///     Ok(())
/// }
/// assert!(reserve().unwrap_err().is_retry());
///
/// // The handler knows better than the backoff (a rate limit's Retry-After):
/// let err = HandlerError::retry_after("rate limited", Duration::from_secs(30));
/// assert_eq!(err.delay(), Some(Duration::from_secs(30)));
/// ```
pub struct HandlerError {
    /// Whether the handler wants the message tried again or given up.
    retry: bool,
    /// When to try again, if the handler knows better than the retry policy.
    delay: Option<Duration>,
    /// The underlying error, for logs and for the error policy.
    source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl HandlerError {
    /// A transient failure: the message should be tried again, after the retry policy's
    /// delay.
    pub fn retry(error: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        HandlerError {
            retry: true,
            delay: None,
            source: error.into(),
        }
    }

    /// A transient failure that should be tried again after `delay` (e.g. a rate limit's
    /// `Retry-After`), instead of the retry policy's delay. It still uses up an attempt;
    /// delays above 24 h are cut to 24 h.
    pub fn retry_after(
        error: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
        delay: Duration,
    ) -> Self {
        HandlerError {
            retry: true,
            delay: Some(delay),
            source: error.into(),
        }
    }

    /// A permanent failure: the message should not be tried again; it is dead-lettered.
    pub fn reject(error: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        HandlerError {
            retry: false,
            delay: None,
            source: error.into(),
        }
    }

    /// The delay asked for with [`retry_after`](Self::retry_after).
    #[must_use]
    pub fn delay(&self) -> Option<Duration> {
        self.delay
    }

    /// True when the handler asked for the message to be tried again.
    #[must_use]
    pub fn is_retry(&self) -> bool {
        self.retry
    }

    /// True when the handler asked for the message to be rejected.
    #[must_use]
    pub fn is_reject(&self) -> bool {
        !self.retry
    }

    /// The underlying error.
    #[must_use]
    pub fn inner(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }

    /// Takes the underlying error out.
    #[must_use]
    pub fn into_inner(self) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self.source
    }
}

impl<E> From<E> for HandlerError
where
    E: Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
{
    fn from(error: E) -> Self {
        HandlerError::retry(error)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("retry", &self.retry)
            .field("delay", &self.delay)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)?;
        let mut source = self.source.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_mark_means_retry_and_display_walks_the_chain() {
        fn fails() -> Result<(), HandlerError> {
            let _: u8 = "300".parse()?;
            Ok(())
        }
        let err = fails().unwrap_err();
        assert!(err.is_retry());
        assert_eq!(err.to_string(), "number too large to fit in target type");
    }

    #[test]
    fn config_error_names_the_queue() {
        let err = Error::config(Some("orders"), "concurrency must be at least 1");
        assert_eq!(
            err.to_string(),
            "invalid configuration for queue 'orders': concurrency must be at least 1"
        );
        assert_eq!(err.queue(), Some("orders"));
    }
}
