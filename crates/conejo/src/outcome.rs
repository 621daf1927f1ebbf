//! What happens to a message once its handler is done, and the policy that decides it on
//! failure.

use std::{fmt, sync::Arc};

use crate::{Context, HandlerError, message::DecodeError};

/// What conejo does with a message after handling it.
///
/// | outcome | sent to the broker | effect |
/// |---|---|---|
/// | `Ack` | `basic.ack` (coalesced) | the message is done |
/// | `Retry` | `basic.nack(requeue = true)` | the message goes back to its queue and is delivered again (with `redelivered = true`) |
/// | `Reject` | `basic.reject(requeue = false)` | the message is dead-lettered if the queue has a dead-letter exchange, else dropped (and logged) |
///
/// `Retry` requeues at once: a message that keeps failing comes back immediately. Give such
/// queues a dead-letter exchange and an [error policy](crate::QueueConfig::on_failure) that
/// rejects after a redelivery, or a quorum queue with `x-delivery-limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// Processed: acknowledge it.
    Ack,
    /// Not processed, try again: requeue it.
    Retry,
    /// Not processable: dead-letter it (or drop it when the queue has no dead-letter exchange).
    Reject,
}

/// Why a message was not processed. The queue's failure policy maps it to an [`Outcome`].
#[derive(Debug)]
#[non_exhaustive]
pub enum Failure {
    /// The handler returned an error.
    Handler(HandlerError),
    /// The payload could not be decoded into the handler's message type.
    Decode(DecodeError),
    /// The handler panicked; the text is the panic's message.
    Panic(String),
}

impl Failure {
    /// The outcome conejo applies when the queue has no policy of its own:
    ///
    /// - a handler error follows its own choice ([`HandlerError::retry`] → [`Outcome::Retry`],
    ///   [`HandlerError::reject`] → [`Outcome::Reject`]);
    /// - a payload that does not decode is rejected: it would fail again on every delivery;
    /// - a panic is rejected: a panic is a bug, and requeueing it would loop hot.
    #[must_use]
    pub fn default_outcome(&self) -> Outcome {
        match self {
            Failure::Handler(error) if error.is_retry() => Outcome::Retry,
            Failure::Handler(_) | Failure::Decode(_) | Failure::Panic(_) => Outcome::Reject,
        }
    }

    /// A short name for logs and metrics: `handler`, `decode` or `panic`.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Handler(_) => "handler",
            Failure::Decode(_) => "decode",
            Failure::Panic(_) => "panic",
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Handler(error) => write!(f, "handler error: {error}"),
            Failure::Decode(error) => write!(f, "{error}"),
            Failure::Panic(message) => write!(f, "handler panicked: {message}"),
        }
    }
}

/// Maps a [`Failure`] to an [`Outcome`]; set per queue with
/// [`QueueConfig::on_failure`](crate::QueueConfig::on_failure).
pub(crate) type FailurePolicy = Arc<dyn Fn(&Failure, &Context) -> Outcome + Send + Sync>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_outcomes() {
        assert_eq!(
            Failure::Handler(HandlerError::retry("db down")).default_outcome(),
            Outcome::Retry
        );
        assert_eq!(
            Failure::Handler(HandlerError::reject("bad sku")).default_outcome(),
            Outcome::Reject
        );
        assert_eq!(
            Failure::Panic("boom".into()).default_outcome(),
            Outcome::Reject
        );
    }
}
