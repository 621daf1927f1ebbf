//! What a running service tells the outside: per-queue counters (`stats`), the connection's
//! status (`status`), the runtimes' lags (`lag`), metrics (`telemetry`, feature `metrics`)
//! and the health server (`health`, feature `health`) — started and stopped together by
//! [`start`]. The engine counts into [`stats::QueueCounters`] and reports to
//! [`status::StatusWriter`]; nothing here calls back into the engine.
//!
//! May use: `error`.

#[cfg(feature = "health")]
pub(crate) mod health;
pub(crate) mod journal;
pub(crate) mod lag;
pub(crate) mod stats;
pub(crate) mod status;
#[cfg(feature = "metrics")]
pub(crate) mod telemetry;
#[cfg(feature = "opentelemetry")]
pub(crate) mod trace_context;

use std::sync::Arc;

use tokio::{runtime::Handle, task::AbortHandle};
use tokio_util::sync::CancellationToken;

pub(crate) use self::stats::QueueInfo;
use self::{stats::Stats, status::StatusWriter};

/// What the builder asked for beyond the lag probes.
#[derive(Debug, Default)]
pub(crate) struct Observe {
    /// The health server's socket, bound by `build()`.
    #[cfg(feature = "health")]
    pub(crate) health: Option<health::HealthListener>,
}

/// The running probes, sampler and health server; dropping it stops them all.
#[derive(Debug)]
pub(crate) struct Observing {
    /// Probe and sampler tasks.
    tasks: Vec<AbortHandle>,
    /// Stops the health server gracefully.
    stop: CancellationToken,
}

impl Drop for Observing {
    fn drop(&mut self) {
        self.stop.cancel();
        self.tasks.iter().for_each(AbortHandle::abort);
    }
}

/// Starts the lag probes — one on the connection runtime, one on the current (handler)
/// runtime — and, with the features, the metrics sampler and the health server.
///
/// Called from the supervisor, on the handler runtime, once the connection runtime exists
/// and before the first connection attempt, so probes answer while conejo connects.
pub(crate) fn start(
    observe: Observe,
    runtime: &Handle,
    stats: &Stats,
    status: &StatusWriter,
    queues: Vec<QueueInfo>,
) -> Observing {
    let lags = stats.lags();
    let mut tasks = Vec::with_capacity(3);
    tasks.push(
        runtime
            .spawn(lag::probe(Arc::clone(&lags.connection)))
            .abort_handle(),
    );
    tasks.push(tokio::spawn(lag::probe(Arc::clone(&lags.handler))).abort_handle());
    let stop = CancellationToken::new();
    #[cfg(feature = "metrics")]
    {
        #[cfg(feature = "health")]
        let (recorder, health) = match observe.health {
            Some(listener) => {
                let recorder = health::prometheus_recorder();
                (Some(recorder), Some(listener))
            }
            None => (None, None),
        };
        #[cfg(not(feature = "health"))]
        let recorder: Option<metrics::NoopRecorder> = {
            let _ = observe;
            None
        };
        let telemetry = Arc::new(telemetry::Telemetry::register(
            recorder.as_ref().map(|r| r as &dyn metrics::Recorder),
            stats.clone(),
            status.subscribe(),
            &queues,
        ));
        // On the connection runtime, like the lag probe: the gauges (the handler runtime's
        // lag above all) keep being updated while handlers hog the handler runtime, which is
        // when they matter. A few atomic loads per queue once a second.
        tasks.push(
            runtime
                .spawn(Arc::clone(&telemetry).sample_every_second())
                .abort_handle(),
        );
        #[cfg(feature = "health")]
        if let (Some(listener), Some(recorder)) = (health, recorder) {
            health::serve(
                listener,
                runtime,
                health::Health {
                    status: status.subscribe(),
                    stats: stats.clone(),
                    telemetry,
                    prometheus: recorder.handle(),
                },
                stop.clone(),
            );
        }
    }
    #[cfg(not(feature = "metrics"))]
    let _ = (observe, status, queues);
    Observing { tasks, stop }
}
