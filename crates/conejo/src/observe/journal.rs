//! How each delivery ended, as the test harness reports it ([`Handled`], feature
//! `test-util`): the engine says it at the one place a delivery's end is decided, which
//! also names the delivery span's `outcome`. Recorded only while a harness listens.

#[cfg(feature = "test-util")]
use std::sync::{
    Mutex,
    atomic::{AtomicBool, Ordering::Relaxed},
};

#[cfg(feature = "test-util")]
use bytes::Bytes;

/// How a delivery ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[cfg_attr(not(feature = "test-util"), allow(unreachable_pub))]
pub enum HandledAs {
    /// Acknowledged: handled, or dropped as the failure policy said ([`Outcome::Ack`]).
    ///
    /// [`Outcome::Ack`]: crate::Outcome::Ack
    Acked,
    /// A copy for the next attempt went to a wait queue (confirmed), then it was acked.
    Retried,
    /// A dead letter went to the dead-letter exchange (confirmed), then it was acked.
    DeadLettered,
    /// Given back to the queue: its retry copy or dead letter could not be published.
    Requeued,
    /// Its result was dropped: its delivery had been given back already (channel lost,
    /// shutdown deadline); the broker redelivers it.
    Dropped,
    /// Delivered too often without a result on a classic queue: republished with its
    /// redelivery count, then acked.
    RedeliveryCounted,
}

impl HandledAs {
    /// The name the delivery span's `outcome` field takes.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            HandledAs::Acked => "acked",
            HandledAs::Retried => "retried",
            HandledAs::DeadLettered => "dead-lettered",
            HandledAs::Requeued => "requeued",
            HandledAs::Dropped => "dropped",
            HandledAs::RedeliveryCounted => "redelivery-counted",
        }
    }
}

/// One delivery as a test sees it once it ended.
#[cfg(feature = "test-util")]
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Handled {
    /// The queue it was consumed from.
    pub queue: String,
    /// Its `message_id` property.
    pub message_id: Option<String>,
    /// The routing key it was first published with (a retried copy keeps it).
    pub routing_key: String,
    /// Its attempt (1 for the first delivery, 2 for the first retry…).
    pub attempt: u32,
    /// Whether the broker flagged it redelivered.
    pub redelivered: bool,
    /// How it ended.
    pub outcome: HandledAs,
    /// The failure that led there, if any (`kind: message`).
    pub failure: Option<String>,
    /// Where its copy went: the wait queue of a retry, the exchange of a dead letter.
    pub sent_to: Option<String>,
    /// Its body.
    pub body: Bytes,
}

/// The deliveries of one queue that ended while a harness listened.
#[cfg(feature = "test-util")]
#[derive(Debug, Default)]
pub(crate) struct Journal {
    listening: AtomicBool,
    entries: Mutex<Vec<Handled>>,
}

#[cfg(feature = "test-util")]
impl Journal {
    /// Starts recording.
    pub(crate) fn listen(&self) {
        self.listening.store(true, Relaxed);
    }

    /// Records `entry` (built only while listening).
    pub(crate) fn record(&self, entry: impl FnOnce() -> Handled) {
        if self.listening.load(Relaxed) {
            let entry = entry();
            self.entries
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(entry);
        }
    }

    /// What was recorded so far, in the order deliveries ended.
    pub(crate) fn entries(&self) -> Vec<Handled> {
        self.entries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
