//! conejo's metrics (feature `metrics`), registered once per service and set from its
//! counters' snapshots.
//!
//! Metrics cost nothing per message: conejo already counts everything in per-queue atomics
//! ([`QueueCounters`](super::stats::QueueCounters)), so a sampler copies those snapshots into
//! the `metrics` handles once a second (and right before each scrape of `/metrics`). The one
//! per-delivery measurement is the handler-duration histogram
//! ([`QueueCounters::timed`](super::stats::QueueCounters::timed)).

use std::sync::Arc;

use metrics::{
    Counter, Gauge, Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge,
    histogram,
};

use crate::{
    ConnectionState, Stats, Status,
    observe::stats::{QueueCounters, QueueInfo, QueueStats},
};

pub(crate) const DELIVERIES: &str = "conejo_deliveries_total";
pub(crate) const ACKS: &str = "conejo_acks_total";
pub(crate) const ACK_FRAMES: &str = "conejo_ack_frames_total";
pub(crate) const ROTATIONS: &str = "conejo_channel_rotations_total";
pub(crate) const OUTCOMES: &str = "conejo_outcomes_total";
pub(crate) const FAILURES: &str = "conejo_failures_total";
pub(crate) const ANOMALIES: &str = "conejo_anomalies_total";
pub(crate) const IN_FLIGHT: &str = "conejo_in_flight";
pub(crate) const PREFETCH: &str = "conejo_prefetch";
pub(crate) const CONSUMING: &str = "conejo_consuming";
pub(crate) const CONNECTION_STATE: &str = "conejo_connection_state";
pub(crate) const CONNECTION_BLOCKED: &str = "conejo_connection_blocked";
pub(crate) const RECONNECTS: &str = "conejo_reconnects_total";
pub(crate) const CONNECTION_LAG: &str = "conejo_connection_runtime_lag_seconds";
pub(crate) const HANDLER_LAG: &str = "conejo_handler_runtime_lag_seconds";
pub(crate) const HANDLER_DURATION: &str = "conejo_handler_duration_seconds";
pub(crate) const PUBLISHES: &str = "conejo_publishes_total";
pub(crate) const PUBLISH_IN_FLIGHT: &str = "conejo_publish_in_flight";
pub(crate) const PUBLISH_WAITING: &str = "conejo_publish_waiting";
pub(crate) const PUBLISH_CONFIRM: &str = "conejo_publish_confirm_seconds";
pub(crate) const ORDERING_WAITING: &str = "conejo_ordering_waiting";
pub(crate) const ORDERING_KEYS_BUSY: &str = "conejo_ordering_keys_busy";
pub(crate) const ORDERING_OLDEST_WAIT: &str = "conejo_ordering_oldest_wait_seconds";
pub(crate) const ACTIVE_CONSUMER: &str = "conejo_active_consumer";
pub(crate) const HAND_OVERS: &str = "conejo_partition_hand_overs_total";
pub(crate) const STREAM_OFFSET: &str = "conejo_stream_committed_offset";
pub(crate) const OFFSET_STORE_FAILURES: &str = "conejo_offset_store_failures_total";

/// The `outcome` label's values of [`PUBLISHES`].
const PUBLISH_OUTCOMES: [&str; 5] = ["confirmed", "returned", "nacked", "lost", "failed"];

/// The `outcome` label's values, in [`outcomes`] order.
const OUTCOME_KINDS: [&str; 4] = ["acked", "retried", "dead_lettered", "requeued"];
/// The `failure` label's values, as [`Failure::kind`](crate::Failure::kind) names them.
const FAILURE_KINDS: [&str; 5] = ["handler", "decode", "panic", "timeout", "publish"];
/// The `anomaly` label's values, in [`anomalies`] order.
const ANOMALY_KINDS: [&str; 6] = [
    "abandoned",
    "poison",
    "unsettled",
    "publish_failure",
    "ack_failure",
    "late_settlement",
];
/// The `state` label's values.
const STATES: [&str; 5] = ["idle", "connecting", "connected", "reconnecting", "stopped"];

/// One queue's handles.
struct QueueMetrics {
    counters: Arc<QueueCounters>,
    deliveries: Counter,
    acks: Counter,
    ack_frames: Counter,
    rotations: Counter,
    /// By [`OUTCOME_KINDS`].
    outcomes: [Counter; 4],
    /// By [`FAILURE_KINDS`].
    failures: [Counter; 5],
    /// By [`ANOMALY_KINDS`].
    anomalies: [Counter; 6],
    in_flight: Gauge,
    consuming: Gauge,
    /// Ordered queues: waiting deliveries, busy keys, the oldest wait.
    ordering: Option<[Gauge; 3]>,
    /// Single-active queues: whether this process holds the active role.
    active: Option<Gauge>,
    /// Borrowed partitions: hand-backs.
    hand_overs: Option<Counter>,
    /// Stream queues: the committed offset, and the offset store's failures.
    stream: Option<(Gauge, Counter)>,
    /// The queue's name, to ask the status whether it consumes.
    name: Arc<str>,
}

/// Every handle of a service, set by [`sample`](Self::sample).
pub(crate) struct Telemetry {
    queues: Vec<QueueMetrics>,
    stats: Stats,
    status: Status,
    /// By [`STATES`].
    states: [Gauge; 5],
    blocked: Gauge,
    reconnects: Counter,
    connection_lag: Gauge,
    handler_lag: Gauge,
    /// The publisher's, by [`PUBLISH_OUTCOMES`].
    publishes: [Counter; 5],
    publish_in_flight: Gauge,
    publish_waiting: Gauge,
}

impl Telemetry {
    /// Registers conejo's metrics with `recorder`, or with the global recorder (the
    /// application's, if it installed one before `run`) when `None`.
    pub(crate) fn register(
        recorder: Option<&dyn metrics::Recorder>,
        stats: Stats,
        status: Status,
        queues: &[QueueInfo],
    ) -> Self {
        let build = || {
            describe();
            // A service is run once: the histogram is set once.
            let _ = stats
                .publish_counters()
                .confirm_latency
                .set(histogram!(PUBLISH_CONFIRM));
            let queues = queues
                .iter()
                .map(|queue| {
                    let name = queue.name.to_string();
                    let counters = Arc::clone(&queue.counters);
                    // A service is run once: the histogram is set once.
                    let _ = counters
                        .handler_duration
                        .set(histogram!(HANDLER_DURATION, "queue" => name.clone()));
                    gauge!(PREFETCH, "queue" => name.clone()).set(queue.prefetch);
                    QueueMetrics {
                        counters,
                        deliveries: counter!(DELIVERIES, "queue" => name.clone()),
                        acks: counter!(ACKS, "queue" => name.clone()),
                        ack_frames: counter!(ACK_FRAMES, "queue" => name.clone()),
                        rotations: counter!(ROTATIONS, "queue" => name.clone()),
                        outcomes: OUTCOME_KINDS.map(|outcome| {
                            counter!(OUTCOMES, "queue" => name.clone(), "outcome" => outcome)
                        }),
                        failures: FAILURE_KINDS.map(|failure| {
                            counter!(FAILURES, "queue" => name.clone(), "failure" => failure)
                        }),
                        anomalies: ANOMALY_KINDS.map(|anomaly| {
                            counter!(ANOMALIES, "queue" => name.clone(), "anomaly" => anomaly)
                        }),
                        in_flight: gauge!(IN_FLIGHT, "queue" => name.clone()),
                        ordering: queue.ordered.then(|| {
                            [ORDERING_WAITING, ORDERING_KEYS_BUSY, ORDERING_OLDEST_WAIT]
                                .map(|metric| gauge!(metric, "queue" => name.clone()))
                        }),
                        active: queue
                            .single_active
                            .then(|| gauge!(ACTIVE_CONSUMER, "queue" => name.clone())),
                        hand_overs: queue
                            .borrowed
                            .then(|| counter!(HAND_OVERS, "queue" => name.clone())),
                        stream: queue.stream.then(|| {
                            (
                                gauge!(STREAM_OFFSET, "queue" => name.clone()),
                                counter!(OFFSET_STORE_FAILURES, "queue" => name.clone()),
                            )
                        }),
                        consuming: gauge!(CONSUMING, "queue" => name),
                        name: Arc::clone(&queue.name),
                    }
                })
                .collect();
            Telemetry {
                queues,
                stats,
                status,
                states: STATES.map(|state| gauge!(CONNECTION_STATE, "state" => state)),
                blocked: gauge!(CONNECTION_BLOCKED),
                reconnects: counter!(RECONNECTS),
                connection_lag: gauge!(CONNECTION_LAG),
                handler_lag: gauge!(HANDLER_LAG),
                publishes: PUBLISH_OUTCOMES
                    .map(|outcome| counter!(PUBLISHES, "outcome" => outcome)),
                publish_in_flight: gauge!(PUBLISH_IN_FLIGHT),
                publish_waiting: gauge!(PUBLISH_WAITING),
            }
        };
        let telemetry = match recorder {
            Some(recorder) => metrics::with_local_recorder(recorder, build),
            None => build(),
        };
        telemetry.sample();
        telemetry
    }

    /// Copies the counters' and the status' current values into the handles.
    pub(crate) fn sample(&self) {
        for queue in &self.queues {
            let stats = queue.counters.snapshot();
            queue.deliveries.absolute(stats.delivered);
            queue.acks.absolute(stats.acked);
            queue.ack_frames.absolute(stats.ack_frames);
            queue.rotations.absolute(stats.rotations);
            for (counter, value) in queue.outcomes.iter().zip(outcomes(&stats)) {
                counter.absolute(value);
            }
            let failures = [
                stats.handler_errors,
                stats.decode_failures,
                stats.panics,
                stats.timeouts,
                stats.handler_publish_failures,
            ];
            for (counter, value) in queue.failures.iter().zip(failures) {
                counter.absolute(value);
            }
            for (counter, value) in queue.anomalies.iter().zip(anomalies(&stats)) {
                counter.absolute(value);
            }
            queue.in_flight.set(stats.in_flight as f64);
            if let Some([waiting, busy, oldest]) = &queue.ordering {
                waiting.set(stats.key_waiting as f64);
                busy.set(stats.keys_busy as f64);
                oldest.set(stats.oldest_key_wait.unwrap_or_default().as_secs_f64());
            }
            if let Some(active) = &queue.active {
                active.set(if stats.active == Some(true) { 1.0 } else { 0.0 });
            }
            if let Some(hand_overs) = &queue.hand_overs {
                hand_overs.absolute(stats.hand_overs);
            }
            if let Some((offset, store_failures)) = &queue.stream {
                // -1 until an offset is committed.
                offset.set(stats.stream_offset.map_or(-1.0, |offset| offset as f64));
                store_failures.absolute(stats.offset_store_failures);
            }
            let consuming = self.status.is_consuming(&queue.name).unwrap_or(false);
            queue.consuming.set(if consuming { 1.0 } else { 0.0 });
        }
        let current = state_index(self.status.state());
        for (index, gauge) in self.states.iter().enumerate() {
            gauge.set(if index == current { 1.0 } else { 0.0 });
        }
        self.blocked.set(if self.status.blocked().is_some() {
            1.0
        } else {
            0.0
        });
        self.reconnects.absolute(self.status.reconnects());
        self.connection_lag
            .set(self.stats.connection_runtime_lag().as_secs_f64());
        self.handler_lag
            .set(self.stats.handler_runtime_lag().as_secs_f64());
        let publisher = self.stats.publisher();
        let outcomes = [
            publisher.confirmed,
            publisher.returned,
            publisher.nacked,
            publisher.lost,
            publisher.failed,
        ];
        for (counter, value) in self.publishes.iter().zip(outcomes) {
            counter.absolute(value);
        }
        self.publish_in_flight.set(publisher.in_flight as f64);
        self.publish_waiting.set(publisher.waiting as f64);
    }

    /// Samples once a second, until aborted.
    pub(crate) async fn sample_every_second(self: Arc<Self>) {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            self.sample();
        }
    }
}

/// Deliveries by how they were settled: acked as done (handled, or acked by the failure
/// policy), retried, dead-lettered, requeued. A retry or dead letter is acked too, once
/// its copy is confirmed: it counts under its own kind only, so the four add up to the
/// deliveries settled.
fn outcomes(stats: &QueueStats) -> [u64; 4] {
    [
        stats
            .acked
            .saturating_sub(stats.retried)
            .saturating_sub(stats.dead_lettered),
        stats.retried,
        stats.dead_lettered,
        stats.requeued,
    ]
}

fn state_index(state: ConnectionState) -> usize {
    match state {
        ConnectionState::Idle => 0,
        ConnectionState::Connecting { .. } => 1,
        ConnectionState::Connected => 2,
        ConnectionState::Reconnecting { .. } => 3,
        ConnectionState::Stopped => 4,
    }
}

/// What should not happen in a healthy service, by [`ANOMALY_KINDS`]: blocking handlers
/// abandoned at their timeout, poison messages, deliveries ended without a result, copies
/// the broker did not confirm, acks that found their channel gone, results dropped after
/// their message was given back.
fn anomalies(stats: &QueueStats) -> [u64; 6] {
    [
        stats.abandoned,
        stats.poison,
        stats.unsettled,
        stats.publish_failures,
        stats.ack_failures,
        stats.late_settlements,
    ]
}

fn describe() {
    describe_counter!(
        PUBLISHES,
        "Messages the service's publisher handled, by outcome: confirmed, returned (unroutable), \
         nacked, lost (connection or channel lost before the confirm), failed (never sent)."
    );
    describe_gauge!(
        PUBLISH_IN_FLIGHT,
        "Messages the publisher sent that the broker has not confirmed yet."
    );
    describe_gauge!(
        PUBLISH_WAITING,
        "Messages handed to the publisher and not yet sent (waiting for its connection)."
    );
    describe_histogram!(
        PUBLISH_CONFIRM,
        Unit::Seconds,
        "Time from sending a message to the broker's confirm."
    );
    describe_counter!(DELIVERIES, "Deliveries received from the broker.");
    describe_gauge!(
        ORDERING_WAITING,
        "Ordered queues: deliveries waiting in the process for their key (a hot key shows here)."
    );
    describe_gauge!(
        ORDERING_KEYS_BUSY,
        "Ordered queues: keys with a delivery running or waiting."
    );
    describe_gauge!(
        ORDERING_OLDEST_WAIT,
        Unit::Seconds,
        "Ordered queues: how long the oldest delivery waiting for its key has waited (0: none)."
    );
    describe_gauge!(
        ACTIVE_CONSUMER,
        "Single-active queues and partitions: 1 while this process holds the active role (a \
         delivery came on its current consumer), 0 while it waits or the queue is empty."
    );
    describe_counter!(
        HAND_OVERS,
        "Partitions of another replica's handed back to it once it returned."
    );
    describe_gauge!(
        STREAM_OFFSET,
        "Stream queues: the committed offset (every message up to it handled), -1 before \
         the first; what the offset store is given."
    );
    describe_counter!(
        OFFSET_STORE_FAILURES,
        "Stream queues: calls of the offset store that failed (the next offset is stored)."
    );
    describe_counter!(
        ACKS,
        "Deliveries acknowledged (handled, or their retry copy or dead letter confirmed)."
    );
    describe_counter!(
        ACK_FRAMES,
        "basic.ack frames sent; acks / ack frames is the coalescing ratio."
    );
    describe_counter!(
        ROTATIONS,
        "Moves to a fresh channel because a long-running delivery held acks behind it."
    );
    describe_counter!(
        OUTCOMES,
        "Deliveries settled, by outcome: acked (done), retried, dead_lettered, requeued."
    );
    describe_counter!(
        FAILURES,
        "Failed deliveries, by failure: handler (error), decode, panic, timeout."
    );
    describe_counter!(
        ANOMALIES,
        "What a healthy service does not see, by anomaly: abandoned (blocking handler past its \
         timeout), poison, unsettled (task ended without a result), publish_failure, \
         ack_failure, late_settlement (result dropped: its message was given back)."
    );
    describe_gauge!(
        IN_FLIGHT,
        "Deliveries started and not yet settled (handler running, or copy being published)."
    );
    describe_gauge!(
        PREFETCH,
        "The queue's prefetch: unacknowledged messages the broker may push."
    );
    describe_gauge!(CONSUMING, "1 while the queue is being consumed.");
    describe_gauge!(
        CONNECTION_STATE,
        "1 for the connection's current state (idle, connecting, connected, reconnecting, stopped)."
    );
    describe_gauge!(
        CONNECTION_BLOCKED,
        "1 while the broker blocks the connection (resource alarm)."
    );
    describe_counter!(RECONNECTS, "Connections re-established after a loss.");
    describe_gauge!(
        CONNECTION_LAG,
        Unit::Seconds,
        "Recent maximum lateness of a 100 ms timer on the connection runtime (lapin, heartbeats, acks)."
    );
    describe_gauge!(
        HANDLER_LAG,
        Unit::Seconds,
        "Recent maximum lateness of a 100 ms timer on the handler runtime."
    );
    describe_histogram!(
        HANDLER_DURATION,
        Unit::Seconds,
        "Time in the handler (decode included), up to its timeout."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_add_up_to_the_settled_deliveries() {
        let stats = QueueStats {
            acked: 50,
            retried: 4,
            dead_lettered: 1,
            requeued: 2,
            ..QueueStats::default()
        };
        let settled = outcomes(&stats);
        assert_eq!(settled, [45, 4, 1, 2]);
        assert_eq!(settled.iter().sum::<u64>(), stats.acked + stats.requeued);
        // A retry counted before its ack went out: never an underflow.
        let early = QueueStats {
            acked: 3,
            retried: 4,
            ..QueueStats::default()
        };
        assert_eq!(outcomes(&early)[0], 0);
    }
}
