//! Per-queue counters: what was delivered and how each message was settled with the broker;
//! and the lag of the service's two runtimes.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use tokio_util::task::TaskTracker;

use crate::observe::lag::LagGauge;

/// What the metrics read of one queue.
#[derive(Debug, Clone)]
#[cfg_attr(not(feature = "metrics"), allow(dead_code))]
pub(crate) struct QueueInfo {
    /// The queue's name (the `queue` label).
    pub(crate) name: Arc<str>,
    /// Its prefetch (a gauge).
    pub(crate) prefetch: u16,
    /// Its counters.
    pub(crate) counters: Arc<QueueCounters>,
    /// It has a single active consumer (the `conejo_active_consumer` gauge).
    pub(crate) single_active: bool,
    /// It is ordered by key (the `conejo_ordering_*` gauges).
    pub(crate) ordered: bool,
    /// It is a partition of another replica's (`conejo_partition_hand_overs_total`).
    pub(crate) borrowed: bool,
    /// It is a stream queue (`conejo_stream_committed_offset`).
    pub(crate) stream: bool,
}

/// Live counters of a publisher, updated by its link.
#[derive(Debug, Default)]
pub(crate) struct PublishCounters {
    /// Messages sent to the broker.
    sent: AtomicU64,
    /// Confirmed by the broker (and routed, when `mandatory`).
    confirmed: AtomicU64,
    /// Returned: published `mandatory`, routed to no queue.
    returned: AtomicU64,
    /// Refused by the broker (`basic.nack`).
    nacked: AtomicU64,
    /// Sent, but their connection or channel was lost before the confirm.
    lost: AtomicU64,
    /// Never sent: refused by a closed channel, or the publisher closed.
    failed: AtomicU64,
    /// Handed to the publisher, not yet sent (waiting for a connection, or queued).
    waiting: AtomicU64,
    /// The confirm-latency histogram, once metrics are registered.
    #[cfg(feature = "metrics")]
    pub(crate) confirm_latency: std::sync::OnceLock<metrics::Histogram>,
}

impl PublishCounters {
    pub(crate) fn add_waiting(&self) {
        self.waiting.fetch_add(1, Relaxed);
    }

    pub(crate) fn take_waiting(&self) {
        let _ = self
            .waiting
            .fetch_update(Relaxed, Relaxed, |n| n.checked_sub(1));
    }

    pub(crate) fn count_sent(&self) {
        self.sent.fetch_add(1, Relaxed);
    }

    pub(crate) fn count_confirmed(&self) {
        self.confirmed.fetch_add(1, Relaxed);
    }

    pub(crate) fn count_returned(&self) {
        self.returned.fetch_add(1, Relaxed);
    }

    pub(crate) fn count_nacked(&self) {
        self.nacked.fetch_add(1, Relaxed);
    }

    pub(crate) fn count_lost(&self) {
        self.lost.fetch_add(1, Relaxed);
    }

    pub(crate) fn count_failed(&self) {
        self.failed.fetch_add(1, Relaxed);
    }

    /// Records how long a confirm took (into the histogram, with the `metrics` feature).
    pub(crate) fn confirm_latency(&self, latency: Duration) {
        #[cfg(feature = "metrics")]
        if let Some(histogram) = self.confirm_latency.get() {
            histogram.record(latency);
        }
        #[cfg(not(feature = "metrics"))]
        let _ = latency;
    }

    pub(crate) fn snapshot(&self) -> PublishStats {
        let sent = self.sent.load(Relaxed);
        let confirmed = self.confirmed.load(Relaxed);
        let returned = self.returned.load(Relaxed);
        let nacked = self.nacked.load(Relaxed);
        let lost = self.lost.load(Relaxed);
        PublishStats {
            sent,
            confirmed,
            returned,
            nacked,
            lost,
            failed: self.failed.load(Relaxed),
            waiting: self.waiting.load(Relaxed),
            in_flight: sent.saturating_sub(confirmed + returned + nacked + lost),
        }
    }
}

/// A snapshot of a publisher's counters ([`Publisher::stats`](crate::Publisher::stats)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublishStats {
    /// Messages sent to the broker.
    pub sent: u64,
    /// Confirmed by the broker (and routed to a queue, when published `mandatory`).
    pub confirmed: u64,
    /// Returned: published `mandatory` and routed to no queue.
    pub returned: u64,
    /// Refused by the broker (`basic.nack`).
    pub nacked: u64,
    /// Sent, and their connection or channel was lost before the confirm (they may or may
    /// not be on the broker).
    pub lost: u64,
    /// Never sent (a channel the broker had closed, a closed publisher).
    pub failed: u64,
    /// Handed to the publisher and not yet sent: waiting for a connection, or queued.
    pub waiting: u64,
    /// Sent and not yet confirmed.
    pub in_flight: u64,
}

/// Live counters of one queue, updated by the consumer and the settle task.
#[derive(Debug, Default)]
pub(crate) struct QueueCounters {
    pub(crate) delivered: AtomicU64,
    pub(crate) acked: AtomicU64,
    pub(crate) ack_frames: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) requeued: AtomicU64,
    pub(crate) handler_errors: AtomicU64,
    pub(crate) decode_failures: AtomicU64,
    pub(crate) panics: AtomicU64,
    pub(crate) timeouts: AtomicU64,
    pub(crate) handler_publish_failures: AtomicU64,
    pub(crate) abandoned: AtomicU64,
    pub(crate) poison: AtomicU64,
    pub(crate) unsettled: AtomicU64,
    pub(crate) publish_failures: AtomicU64,
    pub(crate) ack_failures: AtomicU64,
    pub(crate) late_settlements: AtomicU64,
    pub(crate) rotations: AtomicU64,
    /// Ordered queues: deliveries waiting for their key (a gauge).
    pub(crate) key_waiting: AtomicU64,
    /// Ordered queues: keys with a delivery running or waiting (a gauge).
    pub(crate) keys_busy: AtomicU64,
    /// Ordered queues: since when the oldest waiting delivery waits.
    pub(crate) key_oldest_wait: std::sync::Mutex<Option<tokio::time::Instant>>,
    /// The queue has a single active consumer (set once, when the service is built).
    pub(crate) single_active: AtomicBool,
    /// Single-active queues: `delivered` when the current consumer registered;
    /// [`NO_CONSUMER`] while there is none.
    pub(crate) consumer_from: AtomicU64,
    /// Borrowed partitions handed back to their own replica.
    pub(crate) hand_overs: AtomicU64,
    /// Stream queues: the committed offset + 1 (0 while none is).
    pub(crate) stream_offset: AtomicU64,
    /// Stream queues: offsets the offset store failed to store.
    pub(crate) offset_store_failures: AtomicU64,
    /// Every delivery task of the queue (the consumer spawns them here): its length is the
    /// number of deliveries in flight, read without a counter on the hot path.
    pub(crate) tasks: TaskTracker,
    /// The handler-duration histogram, once the service registered its metrics.
    #[cfg(feature = "metrics")]
    pub(crate) handler_duration: std::sync::OnceLock<metrics::Histogram>,
    /// How deliveries ended, for the test harness.
    #[cfg(feature = "test-util")]
    pub(crate) journal: super::journal::Journal,
}

/// [`QueueCounters::consumer_from`] without a consumer.
const NO_CONSUMER: u64 = u64::MAX;

impl QueueCounters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Marks the queue as one with a single active consumer, not consumed yet.
    pub(crate) fn set_single_active(&self) {
        self.consumer_from.store(NO_CONSUMER, Relaxed);
        self.single_active.store(true, Relaxed);
    }

    /// A consumer of the queue registered (`true`) or went (`false`): a single-active
    /// queue's role is known from the deliveries after it registered.
    pub(crate) fn set_consumer(&self, registered: bool) {
        let from = if registered {
            self.delivered.load(Relaxed)
        } else {
            NO_CONSUMER
        };
        self.consumer_from.store(from, Relaxed);
    }

    /// Stream queues: every message up to `offset` is done.
    pub(crate) fn set_stream_offset(&self, offset: Option<u64>) {
        let encoded = offset.map_or(0, |offset| offset.saturating_add(1));
        self.stream_offset.store(encoded, Relaxed);
    }

    /// Single-active queues: whether this process's current consumer holds the active role
    /// (it got a delivery since it registered).
    fn active(&self) -> Option<bool> {
        self.single_active.load(Relaxed).then(|| {
            let from = self.consumer_from.load(Relaxed);
            from != NO_CONSUMER && self.delivered.load(Relaxed) > from
        })
    }

    /// Times `call` into the queue's handler-duration histogram, from its first poll until
    /// it completes or is dropped (a timeout drops it: the histogram then records the
    /// timeout). Before metrics are registered, `call` is polled without a clock read.
    #[cfg(feature = "metrics")]
    pub(crate) async fn timed<F: std::future::Future>(&self, call: F) -> F::Output {
        let _timer = self.handler_duration.get().map(|histogram| Timer {
            histogram,
            started: std::time::Instant::now(),
        });
        call.await
    }

    /// Without the `metrics` feature: `call` itself, nothing measured.
    #[cfg(not(feature = "metrics"))]
    #[inline(always)]
    pub(crate) fn timed<F: std::future::Future>(&self, call: F) -> F {
        call
    }

    pub(crate) fn snapshot(&self) -> QueueStats {
        QueueStats {
            delivered: self.delivered.load(Relaxed),
            acked: self.acked.load(Relaxed),
            ack_frames: self.ack_frames.load(Relaxed),
            retried: self.retried.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
            requeued: self.requeued.load(Relaxed),
            handler_errors: self.handler_errors.load(Relaxed),
            decode_failures: self.decode_failures.load(Relaxed),
            panics: self.panics.load(Relaxed),
            timeouts: self.timeouts.load(Relaxed),
            handler_publish_failures: self.handler_publish_failures.load(Relaxed),
            abandoned: self.abandoned.load(Relaxed),
            poison: self.poison.load(Relaxed),
            unsettled: self.unsettled.load(Relaxed),
            publish_failures: self.publish_failures.load(Relaxed),
            ack_failures: self.ack_failures.load(Relaxed),
            late_settlements: self.late_settlements.load(Relaxed),
            rotations: self.rotations.load(Relaxed),
            hand_overs: self.hand_overs.load(Relaxed),
            stream_offset: self.stream_offset.load(Relaxed).checked_sub(1),
            offset_store_failures: self.offset_store_failures.load(Relaxed),
            active: self.active(),
            in_flight: self.tasks.len() as u64,
            key_waiting: self.key_waiting.load(Relaxed),
            keys_busy: self.keys_busy.load(Relaxed),
            oldest_key_wait: self
                .key_oldest_wait
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .map(|since| since.elapsed()),
        }
    }
}

/// A snapshot of one queue's counters.
///
/// `acked`, `retried`, `dead_lettered` and `requeued` count what the broker accepted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStats {
    /// Deliveries received from the broker.
    pub delivered: u64,
    /// Deliveries acknowledged: handled, or whose retry copy or dead letter was confirmed.
    pub acked: u64,
    /// `basic.ack` frames sent: `acked / ack_frames` is how many deliveries one frame settled
    /// on average (coalescing).
    pub ack_frames: u64,
    /// Retry copies published to a wait queue (and confirmed): failures that will be tried again.
    pub retried: u64,
    /// Dead letters published (and confirmed): rejected, out of attempts, or poison.
    pub dead_lettered: u64,
    /// Deliveries given back to the queue (`basic.nack`, requeue): prefetched but not started at shutdown, still running at the shutdown deadline, ended without a result, or whose copy could not be published.
    pub requeued: u64,
    /// Handler errors.
    pub handler_errors: u64,
    /// Payloads that did not decode.
    pub decode_failures: u64,
    /// Handler panics.
    pub panics: u64,
    /// Handlers that passed the queue's timeout.
    pub timeouts: u64,
    /// Deliveries whose handler returned `Ok` while a message it published through
    /// [`Context::publish`](crate::Context::publish) was not confirmed.
    pub handler_publish_failures: u64,
    /// Blocking handlers abandoned at their timeout (their thread ran on).
    pub abandoned: u64,
    /// Messages found delivered too often without a result (dead-lettered as poison).
    pub poison: u64,
    /// Deliveries whose task ended without a result (a panic outside the handler, a dropped task): given back.
    pub unsettled: u64,
    /// Retry copies or dead letters the broker did not confirm (the delivery was given back instead).
    pub publish_failures: u64,
    /// Acknowledgements (or requeues) that could not be sent: their channel was gone; the broker redelivers those messages.
    pub ack_failures: u64,
    /// Handlers that finished after their message had been given back (the shutdown deadline
    /// passed, or their channel was lost): their result was dropped, never sent, and no retry
    /// copy or dead letter was published for it (the broker redelivers the original).
    pub late_settlements: u64,
    /// Moves to a fresh channel: a delivery ran so long that acks behind it went one frame
    /// each, so the queue consumed on a new channel while the old one kept its running
    /// deliveries until they ended.
    pub rotations: u64,
    /// [Partitions](crate::Partitions): times this replica handed the partition back to its
    /// own replica (the partition had been taken over while that replica was away).
    pub hand_overs: u64,
    /// [Stream](crate::QueueConfig::stream) queues: the committed offset — every message up
    /// to it has been handled (acked, or dead-lettered) by this process — or `None` while
    /// none is (and for other queues). What the [`OffsetStore`](crate::OffsetStore) is given.
    pub stream_offset: Option<u64>,
    /// Stream queues: calls of the [`OffsetStore`](crate::OffsetStore) that failed (the
    /// next offset is stored as usual).
    pub offset_store_failures: u64,
    /// Queues with a [single active consumer](crate::QueueConfig::single_active_consumer)
    /// (partitions too): `Some(true)` while this process holds the active role — a delivery
    /// came on its current consumer; `Some(false)` while none has: it waits behind another
    /// process's consumer, or the queue has been empty since it registered (AMQP tells a
    /// consumer nothing else). `None` for other queues.
    pub active: Option<bool>,
    /// Deliveries in flight right now (a gauge, not a counter): started and not yet settled —
    /// their handler running, or their retry copy or dead letter being published (on an
    /// [ordered](crate::QueueConfig::ordered_by) queue, also those waiting for their key).
    pub in_flight: u64,
    /// [Ordered](crate::QueueConfig::ordered_by) queues: deliveries waiting for their key
    /// (a gauge). A hot key shows here: its waiting deliveries hold the prefetch.
    pub key_waiting: u64,
    /// Ordered queues: keys with a delivery running or waiting (a gauge).
    pub keys_busy: u64,
    /// Ordered queues: how long the oldest waiting delivery has waited.
    pub oldest_key_wait: Option<Duration>,
}

/// Counters of every queue of a service; cheap to clone, readable while it runs.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Queue name → its counters; fixed once the service is built.
    queues: Arc<BTreeMap<String, Arc<QueueCounters>>>,
    /// How late timers fire on the connection runtime and on the handler runtime.
    lags: Arc<RuntimeLags>,
    /// The service's publisher's counters.
    publisher: Arc<PublishCounters>,
}

/// The lag gauges of the service's two runtimes, written by their probes while it runs.
#[derive(Debug, Default)]
pub(crate) struct RuntimeLags {
    /// The dedicated runtime of lapin and the settle tasks.
    pub(crate) connection: Arc<LagGauge>,
    /// The runtime `run` is awaited on, where handlers run.
    pub(crate) handler: Arc<LagGauge>,
}

impl Stats {
    pub(crate) fn new(
        queues: impl IntoIterator<Item = String>,
        publisher: Arc<PublishCounters>,
    ) -> Self {
        Stats {
            queues: Arc::new(
                queues
                    .into_iter()
                    .map(|name| (name, Arc::default()))
                    .collect(),
            ),
            lags: Arc::default(),
            publisher,
        }
    }

    pub(crate) fn lags(&self) -> &RuntimeLags {
        &self.lags
    }

    #[cfg(feature = "metrics")]
    pub(crate) fn publish_counters(&self) -> &Arc<PublishCounters> {
        &self.publisher
    }

    /// The counters of the service's publisher (handlers' publishes, retry copies and dead
    /// letters).
    #[must_use]
    pub fn publisher(&self) -> PublishStats {
        self.publisher.snapshot()
    }

    /// How late timers fire on the **connection runtime** (the dedicated runtime that runs
    /// lapin, answers heartbeats and sends acks): the largest lag of a 100 ms probe timer over
    /// the last 2 s, or how overdue its pending tick is if larger. Zero while the service is
    /// not running.
    ///
    /// A few milliseconds is normal. Hundreds mean something runs on that runtime that
    /// should not; seconds put heartbeats at risk.
    #[must_use]
    pub fn connection_runtime_lag(&self) -> Duration {
        self.lags.connection.lag()
    }

    /// How late timers fire on the **handler runtime** (the one [`run`](crate::Conejo::run) is
    /// awaited on), measured like [`connection_runtime_lag`](Self::connection_runtime_lag).
    ///
    /// High while handlers hog the runtime's workers (CPU-heavy code, blocking calls): every
    /// other task there waits as long. The connection keeps its heartbeats either way; this
    /// tells you that handlers should be [`Blocking`](crate::Blocking) or the runtime bigger.
    ///
    /// ```
    /// # fn f(service: &conejo::Conejo) {
    /// use std::time::Duration;
    ///
    /// let stats = service.stats(); // before `run`, read from another task while it runs
    /// if stats.handler_runtime_lag() > Duration::from_millis(500) {
    ///     eprintln!("handlers hog the runtime: make CPU-heavy ones `Blocking`");
    /// }
    /// assert!(stats.connection_runtime_lag() < Duration::from_secs(1));
    /// # }
    /// ```
    #[must_use]
    pub fn handler_runtime_lag(&self) -> Duration {
        self.lags.handler.lag()
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

/// Records a handler's duration when dropped.
#[cfg(feature = "metrics")]
struct Timer<'a> {
    histogram: &'a metrics::Histogram,
    started: std::time::Instant,
}

#[cfg(feature = "metrics")]
impl Drop for Timer<'_> {
    fn drop(&mut self) {
        self.histogram.record(self.started.elapsed());
    }
}
