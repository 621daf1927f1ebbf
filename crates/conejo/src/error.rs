//! Errors that stop the service (startup and run), as opposed to per-message failures.

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

    /// The broker does not know an exchange's type: a plugin's type (such as
    /// `x-consistent-hash`, of [`Partitions`](crate::Partitions)) whose plugin is not
    /// enabled. RabbitMQ closes the whole connection over it; conejo stops rather than
    /// reconnect into the same refusal.
    #[error(
        "cannot declare exchange '{exchange}': the broker has no exchange type '{kind}'{}",
        plugin_hint(*.plugin)
    )]
    UnknownExchangeType {
        /// The exchange.
        exchange: String,
        /// Its type.
        kind: String,
        /// The RabbitMQ plugin that provides the type, when conejo knows it.
        plugin: Option<&'static str>,
    },

    /// A stream queue's [`OffsetStore`](crate::OffsetStore) could not load the offset to
    /// resume from: conejo does not guess where to start.
    #[error("cannot load the stored offset of stream queue '{queue}': {source}")]
    OffsetStore {
        /// The stream queue.
        queue: String,
        /// What the store reported.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
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

    /// One of conejo's own tasks failed (it panicked, or the runtime it ran on went away): a
    /// bug in conejo, or a runtime shut down under it. The service stops; in-flight work is
    /// given back first.
    #[error("internal failure: {what}")]
    Internal {
        /// Which task, and how it failed.
        what: String,
    },
}

fn queue_suffix(queue: &Option<String>) -> String {
    match queue {
        Some(queue) => format!(" for queue '{queue}'"),
        None => String::new(),
    }
}

impl Error {
    /// A task of conejo's that failed (`what`: which one, and how).
    pub(crate) fn internal(what: impl Into<String>) -> Self {
        Error::Internal { what: what.into() }
    }

    /// True for an error that another attempt cannot fix (the configuration's, or the
    /// broker's setup's), even when it came with the loss of the connection.
    pub(crate) fn is_fatal_on_any_connection(&self) -> bool {
        matches!(
            self,
            Error::UnknownExchangeType { .. } | Error::OffsetStore { .. }
        )
    }

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
            | Error::OffsetStore { queue, .. }
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
                ) || is_certificate_error(source)
            }
            _ => false,
        }
    }
}

/// True when a connection failed on a certificate: the broker's was not trusted, or the
/// broker refused (or did not get) ours. Waiting does not fix those.
fn is_certificate_error(error: &lapin::Error) -> bool {
    #[cfg(feature = "tls")]
    {
        use rustls::{AlertDescription as Alert, Error as Tls};
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
        while let Some(current) = source {
            if let Some(tls) = current.downcast_ref::<Tls>() {
                return matches!(
                    tls,
                    Tls::InvalidCertificate(_)
                        | Tls::NoCertificatesPresented
                        | Tls::AlertReceived(
                            Alert::BadCertificate
                                | Alert::UnsupportedCertificate
                                | Alert::CertificateRevoked
                                | Alert::CertificateExpired
                                | Alert::CertificateUnknown
                                | Alert::UnknownCA
                                | Alert::CertificateRequired
                                | Alert::HandshakeFailure
                        )
                );
            }
            // `io::Error::source` skips the error it wraps: look at that one first.
            source = match current.downcast_ref::<std::io::Error>() {
                Some(io) => io.get_ref().map(|inner| inner as _),
                None => current.source(),
            };
        }
        false
    }
    #[cfg(not(feature = "tls"))]
    {
        let _ = error;
        false
    }
}

/// How to enable the plugin of an exchange type, for [`Error::UnknownExchangeType`].
fn plugin_hint(plugin: Option<&'static str>) -> String {
    plugin.map_or_else(String::new, |plugin| {
        format!(" (enable its plugin on every node: rabbitmq-plugins enable {plugin})")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

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
