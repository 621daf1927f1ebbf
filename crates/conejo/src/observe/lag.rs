//! Runtime lag: how late a timer fires on a runtime. One probe task per runtime ticks every
//! [`PERIOD`]; a tick that fires late means every task on that runtime waited as long. On the
//! connection runtime that is the delay of heartbeats and acks; on the handler runtime, the
//! delay of every handler's next step.
//!
//! Readers see the larger of the recent maximum (the last [`WINDOW`] ticks) and how overdue
//! the pending tick already is, so a runtime wedged right now shows a lag that grows while it
//! stays wedged, even though its probe cannot run.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

/// Interval between two ticks of a probe.
pub(crate) const PERIOD: Duration = Duration::from_millis(100);

/// Ticks over which the recent maximum is kept: 2 s at [`PERIOD`], so a scrape every second
/// or two sees every stall.
const WINDOW: usize = 20;

/// The lag of one runtime, written by its probe, read from anywhere.
#[derive(Debug)]
pub(crate) struct LagGauge {
    /// Origin of the nanosecond timestamps below.
    base: Instant,
    /// Largest lag of the last [`WINDOW`] ticks, in nanoseconds.
    recent_max: AtomicU64,
    /// When the pending tick is due, in nanoseconds since `base`; 0 while no probe runs.
    due: AtomicU64,
}

impl Default for LagGauge {
    fn default() -> Self {
        LagGauge {
            base: Instant::now(),
            recent_max: AtomicU64::new(0),
            due: AtomicU64::new(0),
        }
    }
}

impl LagGauge {
    /// The runtime's recent lag: the largest of the last ticks', or how overdue the pending
    /// tick is, whichever is larger. Zero before the probe starts.
    pub(crate) fn lag(&self) -> Duration {
        self.lag_at(Instant::now())
    }

    fn lag_at(&self, now: Instant) -> Duration {
        let recent = self.recent_max.load(Relaxed);
        let due = self.due.load(Relaxed);
        let overdue = if due == 0 {
            0
        } else {
            self.nanos(now).saturating_sub(due)
        };
        Duration::from_nanos(recent.max(overdue))
    }

    fn nanos(&self, at: Instant) -> u64 {
        // Saturates after 584 years.
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    /// Records that the next tick is due at `due` (kept at least 1 ns after `base`: 0 means
    /// "no probe").
    fn expect(&self, due: Instant) {
        self.due.store(self.nanos(due).max(1), Relaxed);
    }
}

/// Keeps the recent maximum of the probe's ticks.
#[derive(Debug, Default)]
struct Window {
    lags: [u64; WINDOW],
    next: usize,
}

impl Window {
    /// Adds a tick's lag; returns the maximum over the window.
    fn push(&mut self, lag: Duration) -> u64 {
        self.lags[self.next] = u64::try_from(lag.as_nanos()).unwrap_or(u64::MAX);
        self.next = (self.next + 1) % WINDOW;
        self.lags.iter().copied().max().unwrap_or(0)
    }
}

/// Clears the gauge's pending tick when the probe stops (aborted, or its runtime dropped), so
/// a stopped probe does not read as an ever-growing lag.
struct Stopped(Arc<LagGauge>);

impl Drop for Stopped {
    fn drop(&mut self) {
        self.0.due.store(0, Relaxed);
    }
}

/// The probe: one timer, ticking every [`PERIOD`] on the runtime it is spawned on, until
/// aborted. Costs one timer wake-up per tick.
pub(crate) async fn probe(gauge: Arc<LagGauge>) {
    let stopped = Stopped(gauge);
    let gauge = &stopped.0;
    let mut window = Window::default();
    loop {
        let due = Instant::now() + PERIOD;
        gauge.expect(due);
        tokio::time::sleep(PERIOD).await;
        let late = Instant::now().saturating_duration_since(due);
        gauge.recent_max.store(window.push(late), Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lag_is_the_recent_max_or_the_overdue_tick() {
        let gauge = LagGauge::default();
        let start = gauge.base;
        assert_eq!(gauge.lag_at(start + Duration::from_secs(5)), Duration::ZERO);
        // A tick due at 1 s: not overdue at 1 s, 3 s overdue at 4 s.
        gauge.expect(start + Duration::from_secs(1));
        assert_eq!(gauge.lag_at(start + Duration::from_secs(1)), Duration::ZERO);
        assert_eq!(
            gauge.lag_at(start + Duration::from_secs(4)),
            Duration::from_secs(3)
        );
        // A recent maximum larger than the overdue time wins.
        gauge.recent_max.store(7_000_000_000, Relaxed);
        assert_eq!(
            gauge.lag_at(start + Duration::from_secs(4)),
            Duration::from_secs(7)
        );
    }

    #[test]
    fn the_window_forgets_a_stall_after_its_ticks() {
        let mut window = Window::default();
        assert_eq!(window.push(Duration::from_millis(900)), 900_000_000);
        for _ in 0..WINDOW - 1 {
            assert_eq!(window.push(Duration::from_millis(1)), 900_000_000);
        }
        assert_eq!(window.push(Duration::from_millis(1)), 1_000_000);
    }

    #[tokio::test]
    async fn a_blocked_runtime_shows_its_lag_and_a_stopped_probe_none() {
        let gauge = Arc::new(LagGauge::default());
        let probe = tokio::spawn(probe(Arc::clone(&gauge)));
        // Let the probe tick a few times, then block this (current-thread) runtime.
        for _ in 0..3 {
            tokio::time::sleep(PERIOD).await;
        }
        // Generous: other tests load the machine meanwhile.
        let idle = gauge.lag();
        assert!(idle < Duration::from_millis(300), "{idle:?}");
        std::thread::sleep(Duration::from_millis(800));
        // Overdue (by at least 800 ms - PERIOD), while the probe still cannot run.
        let blocked = gauge.lag();
        assert!(blocked >= Duration::from_millis(650), "{blocked:?}");
        // Once it runs again, the stall stays in the recent maximum.
        tokio::time::sleep(PERIOD * 2).await;
        let after = gauge.lag();
        assert!(after >= Duration::from_millis(650), "{after:?}");
        probe.abort();
        let _ = probe.await;
        assert_eq!(gauge.due.load(Relaxed), 0);
    }
}
