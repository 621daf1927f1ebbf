//! Exponential back-off with jitter, for reconnecting and reopening channels.

use std::{
    hash::{BuildHasher, Hasher},
    time::Duration,
};

/// Delays between attempts: none before the first retry (a lost connection is usually
/// back at once, or another node answers), then `initial`, doubling up to `max`, each
/// spread by ± 20 %.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    /// The delay before the second retry.
    initial: Duration,
    /// The cap.
    max: Duration,
    /// Retries made since the last success.
    retries: u32,
}

impl Backoff {
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            retries: 0,
        }
    }

    /// The delay before the next retry.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.retries = self.retries.saturating_add(1);
        if self.retries == 1 {
            return Duration::ZERO;
        }
        let exponent = (self.retries - 2).min(32);
        let base = self
            .initial
            .saturating_mul(1u32 << exponent.min(31))
            .min(self.max);
        base.mul_f64(0.8 + 0.4 * unit_random()).min(self.max)
    }

    /// Retries made since the last [`reset`](Self::reset).
    pub(crate) fn retries(&self) -> u32 {
        self.retries
    }

    /// After a success: the next failure is retried at once again.
    pub(crate) fn reset(&mut self) {
        self.retries = 0;
    }

    /// Whether this retry deserves a log line at warning level: the first three, then one
    /// in ten, so an outage of hours does not flood the log.
    pub(crate) fn worth_logging(&self) -> bool {
        self.retries <= 3 || self.retries.is_multiple_of(10)
    }
}

/// A uniform number in [0, 1): std's randomly seeded hasher is random enough for jitter and
/// saves a dependency.
pub(crate) fn unit_random() -> f64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(0x5EED);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn immediate_then_doubling_then_capped() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(b.next_delay(), Duration::ZERO);
        let delays: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        for (delay, base) in delays
            .iter()
            .zip([100u64, 200, 400, 800, 1000, 1000, 1000, 1000])
        {
            let base = Duration::from_millis(base);
            assert!(
                *delay >= base.mul_f64(0.8)
                    && *delay <= base.min(Duration::from_secs(1)).mul_f64(1.2),
                "{delay:?} vs {base:?}"
            );
            assert!(*delay <= Duration::from_secs(1));
        }
        assert_eq!(b.retries(), 9);
        b.reset();
        assert_eq!(b.next_delay(), Duration::ZERO);
        for _ in 0..100 {
            assert!(b.next_delay() <= Duration::from_secs(1));
        }
    }

    #[test]
    fn logging_thins_out() {
        let mut b = Backoff::new(Duration::from_millis(1), Duration::from_millis(2));
        let mut logged = Vec::new();
        for _ in 1..=30 {
            b.next_delay();
            if b.worth_logging() {
                logged.push(b.retries());
            }
        }
        assert_eq!(logged, vec![1, 2, 3, 10, 20, 30]);
    }
}
