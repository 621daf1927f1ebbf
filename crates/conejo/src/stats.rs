//! Per-queue counters: what was delivered and how each message was settled with the broker.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
};

/// Live counters of one queue, updated by the consumer and the settle task.
#[derive(Debug, Default)]
pub(crate) struct QueueCounters {
    pub(crate) delivered: AtomicU64,
    pub(crate) acked: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) requeued: AtomicU64,
    pub(crate) handler_errors: AtomicU64,
    pub(crate) decode_failures: AtomicU64,
    pub(crate) panics: AtomicU64,
    pub(crate) ack_failures: AtomicU64,
    pub(crate) late_settlements: AtomicU64,
}

impl QueueCounters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    fn snapshot(&self) -> QueueStats {
        QueueStats {
            delivered: self.delivered.load(Relaxed),
            acked: self.acked.load(Relaxed),
            retried: self.retried.load(Relaxed),
            rejected: self.rejected.load(Relaxed),
            requeued: self.requeued.load(Relaxed),
            handler_errors: self.handler_errors.load(Relaxed),
            decode_failures: self.decode_failures.load(Relaxed),
            panics: self.panics.load(Relaxed),
            ack_failures: self.ack_failures.load(Relaxed),
            late_settlements: self.late_settlements.load(Relaxed),
        }
    }
}

/// A snapshot of one queue's counters.
///
/// `acked`, `retried`, `rejected` and `requeued` count what was actually sent to the broker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStats {
    /// Deliveries received from the broker.
    pub delivered: u64,
    /// Deliveries acknowledged.
    pub acked: u64,
    /// Deliveries requeued because their handling failed with [`Outcome::Retry`](crate::Outcome::Retry).
    pub retried: u64,
    /// Deliveries rejected (dead-lettered or dropped).
    pub rejected: u64,
    /// Deliveries given back at shutdown: prefetched but not started, or still running at
    /// the deadline.
    pub requeued: u64,
    /// Handler errors.
    pub handler_errors: u64,
    /// Payloads that did not decode.
    pub decode_failures: u64,
    /// Handler panics.
    pub panics: u64,
    /// Acknowledgements (or requeues, rejects) that could not be sent: their channel was
    /// gone; the broker redelivers those messages.
    pub ack_failures: u64,
    /// Handlers that finished after their message had been given back (shutdown deadline):
    /// their result was dropped, never sent.
    pub late_settlements: u64,
}

/// Counters of every queue of a service; cheap to clone, readable while it runs.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Queue name → its counters; fixed once the service is built.
    queues: Arc<BTreeMap<String, Arc<QueueCounters>>>,
}

impl Stats {
    pub(crate) fn new(queues: impl IntoIterator<Item = String>) -> Self {
        Stats {
            queues: Arc::new(
                queues
                    .into_iter()
                    .map(|name| (name, Arc::default()))
                    .collect(),
            ),
        }
    }

    pub(crate) fn counters(&self, queue: &str) -> Arc<QueueCounters> {
        Arc::clone(&self.queues[queue])
    }

    /// A snapshot of one queue's counters (`None` for a queue the service does not consume).
    #[must_use]
    pub fn queue(&self, queue: &str) -> Option<QueueStats> {
        self.queues.get(queue).map(|counters| counters.snapshot())
    }

    /// Snapshots of every queue, by name.
    #[must_use]
    pub fn all(&self) -> BTreeMap<String, QueueStats> {
        self.queues
            .iter()
            .map(|(name, counters)| (name.clone(), counters.snapshot()))
            .collect()
    }
}
