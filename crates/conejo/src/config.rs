//! Per-queue configuration: declaration, concurrency and prefetch, failure policy.

use std::{fmt, sync::Arc};

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::{Context, Error, Failure, Outcome, outcome::FailurePolicy};

/// How a queue is consumed and, unless [passive](QueueConfig::passive), declared.
///
/// **Concurrency and prefetch.** [`concurrency`](Self::concurrency) is the one knob most
/// services need: the number of messages handled at once on this queue. The prefetch (how many
/// unacknowledged messages the broker may push to conejo) is derived from it —
/// `2 × concurrency`, at least 10 — so a few messages wait locally while handlers run, and
/// the broker never pushes an unbounded amount (AMQP's default prefetch is unlimited, the
/// classic cause of consumer memory blow-ups). Override it with [`prefetch`](Self::prefetch).
///
/// ```
/// use conejo::{Outcome, QueueConfig};
///
/// let config = QueueConfig::new()
///     .concurrency(32)            // prefetch becomes 64
///     .quorum()                   // x-queue-type = quorum
///     .dead_letter_exchange("orders.dlx")
///     .on_failure(|failure, ctx| {
///         // retry once, then give up
///         if ctx.redelivered() { Outcome::Reject } else { failure.default_outcome() }
///     });
/// assert_eq!(config.effective_prefetch(), 64);
/// ```
#[derive(Clone)]
#[must_use]
pub struct QueueConfig {
    /// Messages handled at once; `None` takes the handler's default (16 async, cores blocking).
    pub(crate) concurrency: Option<usize>,
    /// Explicit prefetch; `None` derives it from the concurrency.
    pub(crate) prefetch: Option<u16>,
    /// False: the queue must already exist (passive declaration).
    pub(crate) declare: bool,
    /// Survives a broker restart.
    pub(crate) durable: bool,
    /// Deleted by the broker when its last consumer goes.
    pub(crate) auto_delete: bool,
    /// Queue arguments (x-queue-type, x-dead-letter-exchange, …).
    pub(crate) arguments: FieldTable,
    /// Maps failures to outcomes; `None` uses [`Failure::default_outcome`].
    pub(crate) on_failure: Option<FailurePolicy>,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            concurrency: None,
            prefetch: None,
            declare: true,
            durable: true,
            auto_delete: false,
            arguments: FieldTable::default(),
            on_failure: None,
        }
    }
}

impl QueueConfig {
    /// The defaults: a durable classic queue, declared at start; concurrency 16 for async
    /// handlers and the number of cores for [`Blocking`](crate::Blocking) ones; prefetch
    /// derived from it; failures mapped by [`Failure::default_outcome`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Maximum number of messages handled at once (at least 1). With 1, messages are handled
    /// one after the other, in queue order.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = Some(concurrency);
        self
    }

    /// Overrides the prefetch derived from the concurrency (1 to 65535). A prefetch below the
    /// concurrency caps the concurrency.
    pub fn prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = Some(prefetch);
        self
    }

    /// Do not declare the queue: it must exist, else startup fails with
    /// [`Error::QueueNotFound`]. For queues owned by another team or by infrastructure code.
    pub fn passive(mut self) -> Self {
        self.declare = false;
        self
    }

    /// Whether the declared queue survives a broker restart (default: true).
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// Whether the broker deletes the queue when its last consumer goes (default: false).
    pub fn auto_delete(mut self, auto_delete: bool) -> Self {
        self.auto_delete = auto_delete;
        self
    }

    /// Declares a quorum queue (replicated, `x-queue-type = quorum`); must be durable.
    pub fn quorum(self) -> Self {
        self.argument(
            "x-queue-type",
            AMQPValue::LongString(LongString::from("quorum")),
        )
    }

    /// Messages rejected (or expired) are republished to this exchange.
    pub fn dead_letter_exchange(self, exchange: &str) -> Self {
        self.argument(
            "x-dead-letter-exchange",
            AMQPValue::LongString(LongString::from(exchange)),
        )
    }

    /// The routing key used when dead-lettering (default: the message's own).
    pub fn dead_letter_routing_key(self, routing_key: &str) -> Self {
        self.argument(
            "x-dead-letter-routing-key",
            AMQPValue::LongString(LongString::from(routing_key)),
        )
    }

    /// Any other queue argument (`x-max-length`, `x-message-ttl`, `x-delivery-limit`…).
    pub fn argument(mut self, name: &str, value: AMQPValue) -> Self {
        self.arguments.insert(ShortString::from(name), value);
        self
    }

    /// Decides what happens to a message whose handling failed (handler error, decode
    /// failure, panic). The default is [`Failure::default_outcome`].
    pub fn on_failure<F>(mut self, policy: F) -> Self
    where
        F: Fn(&Failure, &Context) -> Outcome + Send + Sync + 'static,
    {
        self.on_failure = Some(Arc::new(policy));
        self
    }

    /// The prefetch that will be applied, for a handler whose default concurrency is 16.
    #[must_use]
    pub fn effective_prefetch(&self) -> u16 {
        self.resolve(crate::handler::DEFAULT_ASYNC_CONCURRENCY).1
    }

    /// (concurrency, prefetch) once the handler's default concurrency is known.
    pub(crate) fn resolve(&self, default_concurrency: usize) -> (usize, u16) {
        let concurrency = self.concurrency.unwrap_or(default_concurrency);
        let prefetch = self
            .prefetch
            .unwrap_or_else(|| derive_prefetch(concurrency));
        (concurrency.min(usize::from(prefetch)), prefetch)
    }

    pub(crate) fn validate(&self, queue: &str) -> Result<(), Error> {
        let invalid = |reason: &str| Err(Error::config(Some(queue), reason));
        if queue.is_empty() {
            return Err(Error::config(None, "queue name must not be empty"));
        }
        if queue.len() > 255 {
            return invalid("queue name longer than 255 bytes");
        }
        if self.concurrency == Some(0) {
            return invalid("concurrency must be at least 1");
        }
        if self.prefetch == Some(0) {
            return invalid("prefetch must be at least 1 (0 would mean unlimited)");
        }
        let quorum = matches!(
            self.arguments.inner().get("x-queue-type"),
            Some(AMQPValue::LongString(kind)) if kind.as_bytes() == b"quorum"
        );
        if quorum && self.declare && (!self.durable || self.auto_delete) {
            return invalid("a quorum queue must be durable and not auto-delete");
        }
        Ok(())
    }

    /// What rejecting a message of this queue does, as far as conejo knows.
    pub(crate) fn reject_fate(&self) -> &'static str {
        if !self.declare {
            "rejected (dead-lettered if the queue has a dead-letter exchange, else dropped)"
        } else if self.arguments.contains_key("x-dead-letter-exchange") {
            "rejected and dead-lettered"
        } else {
            "rejected and dropped (the queue has no dead-letter exchange)"
        }
    }

    pub(crate) fn policy(&self) -> FailurePolicy {
        self.on_failure
            .clone()
            .unwrap_or_else(|| Arc::new(|failure: &Failure, _: &Context| failure.default_outcome()))
    }
}

/// Prefetch for a concurrency: twice of it so the next messages are already local when a
/// handler finishes, at least 10 so acknowledgements can be coalesced, never above AMQP's
/// 16-bit maximum.
fn derive_prefetch(concurrency: usize) -> u16 {
    u16::try_from(concurrency.saturating_mul(2).max(10)).unwrap_or(u16::MAX)
}

impl fmt::Debug for QueueConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueConfig")
            .field("concurrency", &self.concurrency)
            .field("prefetch", &self.prefetch)
            .field("declare", &self.declare)
            .field("durable", &self.durable)
            .field("auto_delete", &self.auto_delete)
            .field("arguments", &self.arguments)
            .field("on_failure", &self.on_failure.as_ref().map(|_| "custom"))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_is_derived_and_bounded() {
        assert_eq!(QueueConfig::new().concurrency(1).resolve(16), (1, 10));
        assert_eq!(QueueConfig::new().concurrency(8).resolve(16), (8, 16));
        assert_eq!(QueueConfig::new().resolve(16), (16, 32));
        assert_eq!(QueueConfig::new().resolve(2), (2, 10));
        assert_eq!(
            QueueConfig::new().concurrency(1 << 20).resolve(16).1,
            u16::MAX
        );
        // an explicit prefetch below the concurrency caps it
        assert_eq!(
            QueueConfig::new().concurrency(50).prefetch(20).resolve(16),
            (20, 20)
        );
    }

    #[test]
    fn invalid_configurations_are_named() {
        let err = QueueConfig::new().concurrency(0).validate("q").unwrap_err();
        assert!(
            err.to_string()
                .contains("'q': concurrency must be at least 1"),
            "{err}"
        );
        assert!(QueueConfig::new().prefetch(0).validate("q").is_err());
        assert!(
            QueueConfig::new()
                .quorum()
                .durable(false)
                .validate("q")
                .is_err()
        );
        assert!(QueueConfig::new().validate("").is_err());
        assert!(QueueConfig::new().quorum().validate("q").is_ok());
    }
}
