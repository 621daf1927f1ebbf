//! The per-message error a handler returns: retry, retry after a delay, or reject.

use std::{fmt, time::Duration};

/// Why a handler could not process a message; returned by [`Handler::handle`](crate::Handler).
///
/// Each error says what should happen to the message:
/// - [`HandlerError::retry`] (and any error converted with `?`): the message should be
///   tried again later, after the queue's [retry policy](crate::RetryPolicy)'s delay — or
///   after the delay given with [`HandlerError::retry_after`];
/// - [`HandlerError::reject`]: the message itself is bad and should not be tried again: it
///   is dead-lettered.
///
/// The queue's [error policy](crate::QueueConfig::on_failure) turns it into an
/// [`Outcome`](crate::Outcome); the default follows the error's own choice.
///
/// `HandlerError` deliberately does not implement [`std::error::Error`], so that `?` converts
/// into it from any error — a `std` error, an `anyhow::Error`, a `Box<dyn Error>`, even a
/// `String` or `&str` — as a retry.
///
/// ```
/// use std::time::Duration;
/// use conejo::HandlerError;
///
/// fn parse_quantity(raw: &str) -> Result<u32, HandlerError> {
///     // `?` on a std error: retry by default.
///     let n: u32 = raw.parse()?;
///     if n == 0 {
///         // A message that will never succeed: reject it.
///         return Err(HandlerError::reject("quantity must be positive"));
///     }
///     Ok(n)
/// }
/// assert!(parse_quantity("x").unwrap_err().is_retry());
/// assert!(parse_quantity("0").unwrap_err().is_reject());
///
/// fn call_inventory() -> anyhow::Result<()> {
///     anyhow::bail!("inventory service unavailable")
/// }
/// fn reserve() -> Result<(), HandlerError> {
///     call_inventory()?; // `?` on anyhow::Error: retry
///     Ok(())
/// }
/// assert!(reserve().unwrap_err().is_retry());
///
/// // The handler knows better than the backoff (a rate limit's Retry-After):
/// let err = HandlerError::retry_after("rate limited", Duration::from_secs(30));
/// assert_eq!(err.delay(), Some(Duration::from_secs(30)));
/// ```
pub struct HandlerError {
    /// Whether the handler wants the message tried again or given up.
    retry: bool,
    /// When to try again, if the handler knows better than the retry policy.
    delay: Option<Duration>,
    /// The underlying error, for logs and for the error policy.
    source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl HandlerError {
    /// A transient failure: the message should be tried again, after the retry policy's
    /// delay.
    pub fn retry(error: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        HandlerError {
            retry: true,
            delay: None,
            source: error.into(),
        }
    }

    /// A transient failure that should be tried again after `delay` (e.g. a rate limit's
    /// `Retry-After`), instead of the retry policy's delay. It still uses up an attempt;
    /// delays above 24 h are cut to 24 h.
    pub fn retry_after(
        error: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
        delay: Duration,
    ) -> Self {
        HandlerError {
            retry: true,
            delay: Some(delay),
            source: error.into(),
        }
    }

    /// A permanent failure: the message should not be tried again; it is dead-lettered.
    pub fn reject(error: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>) -> Self {
        HandlerError {
            retry: false,
            delay: None,
            source: error.into(),
        }
    }

    /// The delay asked for with [`retry_after`](Self::retry_after).
    #[must_use]
    pub fn delay(&self) -> Option<Duration> {
        self.delay
    }

    /// True when the handler asked for the message to be tried again.
    #[must_use]
    pub fn is_retry(&self) -> bool {
        self.retry
    }

    /// True when the handler asked for the message to be rejected.
    #[must_use]
    pub fn is_reject(&self) -> bool {
        !self.retry
    }

    /// The underlying error.
    #[must_use]
    pub fn inner(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        &*self.source
    }

    /// Takes the underlying error out.
    #[must_use]
    pub fn into_inner(self) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self.source
    }
}

impl<E> From<E> for HandlerError
where
    E: Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
{
    fn from(error: E) -> Self {
        HandlerError::retry(error)
    }
}

impl fmt::Debug for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HandlerError")
            .field("retry", &self.retry)
            .field("delay", &self.delay)
            .field("source", &self.source)
            .finish()
    }
}

impl fmt::Display for HandlerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.source, f)?;
        let mut source = self.source.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_mark_means_retry_and_display_walks_the_chain() {
        fn fails() -> Result<(), HandlerError> {
            let _: u8 = "300".parse()?;
            Ok(())
        }
        let err = fails().unwrap_err();
        assert!(err.is_retry());
        assert_eq!(err.to_string(), "number too large to fit in target type");
    }
}
