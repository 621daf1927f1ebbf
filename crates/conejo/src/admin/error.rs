//! Why an operation on a dead-letter queue failed.

use std::time::Duration;

/// Why an operation on a dead-letter queue failed. Never contains the URL's password.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// Connecting to the broker failed (unreachable, refused credentials, TLS…).
    #[error("cannot connect to {url}: {source}")]
    Connect {
        /// The URL, with its password redacted.
        url: String,
        /// What lapin reported.
        #[source]
        source: lapin::Error,
    },

    /// The queue does not exist.
    #[error("queue '{queue}' does not exist")]
    QueueNotFound {
        /// The missing queue.
        queue: String,
    },

    /// The broker refused an operation, or the connection failed during it.
    #[error("{step} on queue '{queue}' failed: {source}")]
    Broker {
        /// The queue being worked on.
        queue: String,
        /// What was being done: "basic.get", "publish", "confirm"…
        step: &'static str,
        /// What lapin reported.
        #[source]
        source: lapin::Error,
    },

    /// The broker did not answer in time (e.g. it blocks publishers under a resource alarm).
    #[error("{step} on queue '{queue}': no answer from the broker within {after:?}")]
    Timeout {
        /// The queue being worked on.
        queue: String,
        /// What was being waited for.
        step: &'static str,
        /// How long it was waited for.
        after: Duration,
    },

    /// The request cannot be carried out as asked (e.g. replaying a queue into itself).
    #[error("{reason}")]
    Invalid {
        /// What is wrong.
        reason: String,
    },

    /// Writing the human-readable output failed.
    #[error("cannot write the output: {0}")]
    Output(#[source] std::io::Error),
}
