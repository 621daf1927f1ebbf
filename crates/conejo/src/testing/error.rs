//! What a harness operation fails with.

use std::time::Duration;

use crate::broker::{self, BrokerError};

/// A harness operation that failed: the broker refused it (with RabbitMQ's reply code), it
/// got no answer in time, the service under test failed, or a wait ran out.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestError {
    /// The broker refused the operation and closed the channel it was made on (404
    /// NOT_FOUND, 406 PRECONDITION_FAILED, 403 ACCESS_REFUSED, 405 RESOURCE_LOCKED…). The
    /// harness opens a fresh channel for its next operation, as a client must.
    #[error("{operation}: refused by the broker ({code} {text})")]
    Refused {
        /// What was asked (`declare queue 'orders'`).
        operation: String,
        /// The broker's reply code.
        code: u16,
        /// The broker's reply text.
        text: String,
    },
    /// The connection or channel failed otherwise (the connection was lost, for one).
    #[error("{operation}: {message}")]
    Broker {
        /// What was asked.
        operation: String,
        /// What went wrong.
        message: String,
    },
    /// The broker nacked a message the harness published.
    #[error("{operation}: nacked by the broker")]
    Nacked {
        /// What was asked.
        operation: String,
    },
    /// A wait ran out: the broker did not answer, or the condition waited for did not hold
    /// (the message says what was still pending).
    #[error("{what}: not within {limit:?}")]
    Timeout {
        /// What was waited for, and what was still pending.
        what: String,
        /// How long it waited (tokio's time: under a paused clock, no real time).
        limit: Duration,
    },
    /// The service under test could not start, or stopped with an error.
    #[error("the service under test: {0}")]
    Service(#[from] crate::Error),
    /// The service under test stopped while the harness waited on it.
    #[error("the service under test stopped while waiting for {0}")]
    Stopped(String),
    /// A message could not be encoded.
    #[error(transparent)]
    Encode(std::sync::Arc<crate::EncodeError>),
    /// Fault injection asked of a real broker: only the in-memory broker takes faults
    /// ([`TestBroker::faults`](super::TestBroker::faults) is `None` in live mode).
    #[error("{0}: fault injection needs the in-memory broker")]
    Unsupported(String),
}

impl TestError {
    /// The broker's reply code, when it refused the operation.
    #[must_use]
    pub fn reply_code(&self) -> Option<u16> {
        match self {
            TestError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    pub(crate) fn broker(operation: impl Into<String>, error: &BrokerError) -> Self {
        let operation = operation.into();
        match (broker::reply_code(error), error.kind()) {
            (Some(code), lapin::ErrorKind::ProtocolError(amqp)) => TestError::Refused {
                operation,
                code,
                text: amqp.get_message().to_string(),
            },
            _ => TestError::Broker {
                operation,
                message: error.to_string(),
            },
        }
    }
}
