//! How often and how late a failed message is tried again: the retry policy, and the
//! quantized delays that name the broker-side wait queues.

use std::time::Duration;

use crate::{Error, backoff::unit_random};

/// The longest delay a wait queue can hold a message for (a day): `x-message-ttl` is a
/// 32-bit millisecond count, and a longer delay is better served by a scheduler.
pub const MAX_RETRY_DELAY: Duration = Duration::from_secs(24 * 60 * 60);

/// How a queue retries a message whose handling failed with [`Outcome::Retry`](crate::Outcome).
///
/// Each retry waits in a broker-side wait queue (see the crate docs, *Retries*), never in the
/// process: no handler slot and no prefetch slot is held while a message waits, and a restart
/// loses nothing. The delay before attempt `n + 1` is `initial × multiplier^(n − 1)`, capped
/// at `max_delay`, spread by ± `jitter` so that messages which failed together do not all come
/// back together. A [`HandlerError::retry_after`](crate::HandlerError::retry_after) overrides
/// the computed delay for that one retry.
///
/// After `max_attempts` attempts the message is dead-lettered with reason
/// `attempts-exhausted`.
///
/// The default — 5 attempts, 1 s × 3ⁿ, capped at 60 s, ± 20 % — dead-letters a message that
/// always fails after about 40 s (1 + 3 + 9 + 27 s of waiting).
///
/// ```
/// use std::time::Duration;
/// use conejo::RetryPolicy;
///
/// let policy = RetryPolicy::default()
///     .max_attempts(3)
///     .initial_delay(Duration::from_millis(500))
///     .multiplier(2.0)
///     .max_delay(Duration::from_secs(10))
///     .jitter(0.1);
/// assert_eq!(policy.base_delay(1), Duration::from_millis(500));
/// assert_eq!(policy.base_delay(2), Duration::from_secs(1));
/// // A message is dead-lettered on its first failure:
/// let _ = RetryPolicy::none();
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
#[must_use]
pub struct RetryPolicy {
    /// Attempts in all, the first delivery included.
    max_attempts: u32,
    /// Delay after the first failure.
    initial: Duration,
    /// Growth of the delay from one retry to the next.
    multiplier: f64,
    /// Cap of the delay.
    max_delay: Duration,
    /// Relative spread of each delay, 0 to 0.5.
    jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial: Duration::from_secs(1),
            multiplier: 3.0,
            max_delay: Duration::from_secs(60),
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// No retry: a failure that would be retried dead-letters the message at once
    /// (`max_attempts(1)`).
    pub fn none() -> Self {
        RetryPolicy::default().max_attempts(1)
    }

    /// Attempts in all, the first delivery included (at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Delay before the second attempt (at least 1 ms).
    pub fn initial_delay(mut self, delay: Duration) -> Self {
        self.initial = delay;
        self
    }

    /// Growth factor of the delay from one retry to the next (1 or more).
    pub fn multiplier(mut self, multiplier: f64) -> Self {
        self.multiplier = multiplier;
        self
    }

    /// Cap of the delay (at most [`MAX_RETRY_DELAY`]).
    pub fn max_delay(mut self, delay: Duration) -> Self {
        self.max_delay = delay;
        self
    }

    /// Relative spread of each delay: 0.2 picks a delay within ± 20 % (0 to 0.5).
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Attempts in all, the first delivery included.
    #[must_use]
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The delay after failed attempt `attempt` (1-based), before jitter.
    #[must_use]
    pub fn base_delay(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(64);
        let factor = self.multiplier.powi(exponent as i32);
        let secs = self.initial.as_secs_f64() * factor;
        if !secs.is_finite() || secs >= self.max_delay.as_secs_f64() {
            self.max_delay
        } else {
            Duration::from_secs_f64(secs)
        }
    }

    /// The delay after failed attempt `attempt`, with jitter: `base × (1 ± jitter)`.
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        let base = self.base_delay(attempt).as_secs_f64();
        let spread = self.jitter * (2.0 * unit_random() - 1.0);
        Duration::from_secs_f64((base * (1.0 + spread)).max(0.001))
    }

    pub(crate) fn validate(&self, queue: &str) -> Result<(), Error> {
        let invalid = |reason: &str| Err(Error::config(Some(queue), reason));
        if self.max_attempts == 0 {
            return invalid("retry: max_attempts must be at least 1");
        }
        if self.initial < Duration::from_millis(1) {
            return invalid("retry: initial_delay must be at least 1 ms");
        }
        if !(self.multiplier >= 1.0 && self.multiplier <= 1000.0) {
            return invalid("retry: multiplier must be between 1 and 1000");
        }
        if self.max_delay < self.initial || self.max_delay > MAX_RETRY_DELAY {
            return invalid("retry: max_delay must be between initial_delay and 24 h");
        }
        if !(0.0..=0.5).contains(&self.jitter) {
            return invalid("retry: jitter must be between 0 and 0.5");
        }
        Ok(())
    }
}

/// The wait queue's TTL for a delay: delays are rounded to a ladder of quarter octaves
/// (steps of about 19 %), so that a queue needs only a few wait queues however its delays are
/// spread, while each delay stays within 10 % of the one asked for.
pub(crate) fn wait_ttl_ms(delay: Duration) -> u32 {
    let ms = delay
        .as_secs_f64()
        .max(0.001)
        .min(MAX_RETRY_DELAY.as_secs_f64())
        * 1000.0;
    let step = (ms.log2() * 4.0).round();
    let ttl = 2f64.powf(step / 4.0).round();
    ttl.clamp(1.0, MAX_RETRY_DELAY.as_millis() as f64) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_policy_dead_letters_within_about_a_minute() {
        let policy = RetryPolicy::default();
        let waited: Duration = (1..policy.attempts()).map(|a| policy.base_delay(a)).sum();
        assert_eq!(waited, Duration::from_secs(40));
        assert!(policy.attempts() >= 3);
        // even with the jitter at its top and the ladder rounding up
        let worst: f64 = (1..policy.attempts())
            .map(|a| policy.base_delay(a).as_secs_f64() * 1.2 * 1.1)
            .sum();
        assert!(worst < 60.0, "{worst}");
    }

    #[test]
    fn delays_grow_and_are_capped() {
        let policy = RetryPolicy::default()
            .initial_delay(Duration::from_millis(100))
            .multiplier(2.0)
            .max_delay(Duration::from_millis(500))
            .jitter(0.0);
        let delays: Vec<u128> = (1..=6).map(|a| policy.delay(a).as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 500, 500, 500]);
        assert_eq!(policy.base_delay(u32::MAX), Duration::from_millis(500));
    }

    #[test]
    fn jitter_stays_within_its_bounds_and_varies() {
        let policy = RetryPolicy::default().jitter(0.2);
        let delays: Vec<f64> = (0..200).map(|_| policy.delay(1).as_secs_f64()).collect();
        assert!(delays.iter().all(|d| (0.8..=1.2).contains(d)), "{delays:?}");
        let distinct = delays
            .iter()
            .map(|d| (d * 1000.0) as u64)
            .collect::<std::collections::BTreeSet<_>>();
        assert!(distinct.len() > 20, "jitter does not vary: {distinct:?}");
    }

    #[test]
    fn the_wait_ladder_is_close_and_small() {
        for ms in [1u64, 7, 100, 999, 1000, 1234, 60_000, 86_400_000] {
            let ttl = f64::from(wait_ttl_ms(Duration::from_millis(ms)));
            let ratio = ttl / ms as f64;
            assert!((0.9..=1.1).contains(&ratio), "{ms} ms -> {ttl}");
        }
        // ± 20 % around 1 s needs only a handful of wait queues
        let ttls: std::collections::BTreeSet<u32> = (800..=1200)
            .map(|ms| wait_ttl_ms(Duration::from_millis(ms)))
            .collect();
        assert!(ttls.len() <= 3, "{ttls:?}");
        assert!(wait_ttl_ms(Duration::MAX) <= 86_400_000);
        assert_eq!(wait_ttl_ms(Duration::ZERO), 1);
    }

    #[test]
    fn invalid_policies_are_named() {
        let bad = [
            RetryPolicy::default().max_attempts(0),
            RetryPolicy::default().initial_delay(Duration::ZERO),
            RetryPolicy::default().multiplier(0.5),
            RetryPolicy::default().multiplier(f64::NAN),
            RetryPolicy::default().max_delay(Duration::MAX),
            RetryPolicy::default().jitter(0.9),
        ];
        for policy in bad {
            let err = policy.validate("q").unwrap_err().to_string();
            assert!(err.contains("'q'") && err.contains("retry:"), "{err}");
        }
        assert!(RetryPolicy::default().validate("q").is_ok());
        assert!(RetryPolicy::none().validate("q").is_ok());
    }
}
