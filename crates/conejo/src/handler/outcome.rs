//! What happens to a message once its handler is done, and the policy that decides it on
//! failure.

use std::{fmt, sync::Arc, time::Duration};

use crate::{Context, HandlerError, PublishError, handler::message::DecodeError};

/// What conejo does with a message after handling it.
///
/// | outcome | what conejo does | effect |
/// |---|---|---|
/// | `Ack` | `basic.ack` (coalesced) | the message is done |
/// | `Retry` | republishes a copy to a wait queue (confirmed), then acks | the copy comes back after the [retry policy](crate::RetryPolicy)'s delay, as the next attempt; once the attempts are used up, it is dead-lettered instead |
/// | `Reject` | republishes a copy to the dead-letter exchange with reason headers (confirmed), then acks | the message waits in the dead-letter queue for an operator |
///
/// Nothing waits in the process: no handler slot and no prefetch slot is held while a retry
/// waits, and a crash between the copy and the ack yields a duplicate at worst, never a loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// Processed: acknowledge it.
    Ack,
    /// Not processed, try again later (until the attempts are used up).
    Retry,
    /// Not processable: dead-letter it.
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
    /// The handler did not finish within the queue's [timeout](crate::QueueConfig::timeout)
    /// (an async handler was cancelled; a blocking one was abandoned to finish on its own).
    Timeout(Duration),
    /// The handler returned `Ok`, but a message it published through
    /// [`Context::publish`](crate::Context::publish) was not confirmed: its input is not
    /// acked as done (retried by default).
    Publish(PublishError),
}

impl Failure {
    /// The outcome conejo applies when the queue has no policy of its own:
    ///
    /// - a handler error follows its own choice ([`HandlerError::retry`] → [`Outcome::Retry`],
    ///   [`HandlerError::reject`] → [`Outcome::Reject`]);
    /// - a timeout is retried: the dependency that hung may answer next time;
    /// - a payload that does not decode is rejected at once: it would fail on every attempt;
    /// - a panic is rejected: a panic is a bug, and retrying it rarely helps.
    #[must_use]
    pub fn default_outcome(&self) -> Outcome {
        match self {
            Failure::Handler(error) if error.is_retry() => Outcome::Retry,
            Failure::Timeout(_) | Failure::Publish(_) => Outcome::Retry,
            Failure::Handler(_) | Failure::Decode(_) | Failure::Panic(_) => Outcome::Reject,
        }
    }

    /// A short name for logs, metrics and the `conejo-failure` header: `handler`, `decode`,
    /// `panic` or `timeout`.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            Failure::Handler(_) => "handler",
            Failure::Decode(_) => "decode",
            Failure::Panic(_) => "panic",
            Failure::Timeout(_) => "timeout",
            Failure::Publish(_) => "publish",
        }
    }

    /// The delay the handler asked for ([`HandlerError::retry_after`]), if any.
    #[must_use]
    pub fn retry_delay(&self) -> Option<Duration> {
        match self {
            Failure::Handler(error) => error.delay(),
            _ => None,
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Handler(error) => write!(f, "handler error: {error}"),
            Failure::Decode(error) => write!(f, "{error}"),
            Failure::Panic(message) => write!(f, "handler panicked: {message}"),
            Failure::Timeout(limit) => write!(f, "handler timed out after {limit:?}"),
            Failure::Publish(error) => write!(f, "a message the handler published: {error}"),
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
        assert_eq!(
            Failure::Timeout(Duration::from_secs(1)).default_outcome(),
            Outcome::Retry
        );
    }
}
