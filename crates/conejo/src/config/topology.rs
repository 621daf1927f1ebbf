//! What conejo declares on the broker: the user's exchanges and bindings, each queue's
//! dead-letter exchange and queue, and the wait queues that hold retries.
//!
//! ```text
//!   publishers ──▶ [exchange] ──binding──▶ ( Q ) ──▶ conejo handler
//!                                           ▲  │ retry: republish, confirm, then ack
//!        x-message-ttl expires, dead-letter │  ▼
//!        back through "" with key Q    ( Q.retry.<ttl>ms )   one per delay step
//!                                              │ dead-letter: republish, confirm, then ack
//!                                              ▼
//!                                   [Q.dlx] fanout ──▶ ( Q.dlq )
//! ```

use lapin::{
    ExchangeKind,
    types::{AMQPValue, FieldTable, LongString, ShortString},
};

use crate::broker::{ExchangeOptions, QueueOptions};

/// An exchange conejo declares (or, [passive](Exchange::passive), checks) before consuming.
///
/// ```
/// use conejo::{Exchange, QueueConfig};
///
/// let orders = Exchange::topic("orders");               // durable topic exchange
/// let config = QueueConfig::new().bind("orders", "order.created.*");
/// # let _ = (orders, config);
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct Exchange {
    /// Its name.
    pub(crate) name: String,
    /// direct, topic, fanout, headers, or a plugin's type.
    pub(crate) kind: ExchangeKind,
    /// Survives a broker restart (default true).
    pub(crate) durable: bool,
    /// Deleted by the broker when its last binding goes (default false).
    pub(crate) auto_delete: bool,
    /// Only checked, never created: it belongs to someone else.
    pub(crate) passive: bool,
    /// `x-` arguments (e.g. `alternate-exchange`).
    pub(crate) arguments: FieldTable,
}

impl Exchange {
    /// An exchange of any type, a plugin's included.
    pub(crate) fn of_kind(name: &str, kind: ExchangeKind) -> Self {
        Exchange {
            name: name.to_owned(),
            kind,
            durable: true,
            auto_delete: false,
            passive: false,
            arguments: FieldTable::default(),
        }
    }

    /// A direct exchange: routes to the queues bound with exactly the routing key.
    pub fn direct(name: &str) -> Self {
        Self::of_kind(name, ExchangeKind::Direct)
    }

    /// A topic exchange: routes by pattern (`*` one word, `#` any number of words).
    pub fn topic(name: &str) -> Self {
        Self::of_kind(name, ExchangeKind::Topic)
    }

    /// A fanout exchange: routes to every bound queue.
    pub fn fanout(name: &str) -> Self {
        Self::of_kind(name, ExchangeKind::Fanout)
    }

    /// A headers exchange: routes on header values given as binding arguments.
    pub fn headers(name: &str) -> Self {
        Self::of_kind(name, ExchangeKind::Headers)
    }

    /// Whether the exchange survives a broker restart (default true).
    pub fn durable(mut self, durable: bool) -> Self {
        self.durable = durable;
        self
    }

    /// Whether the broker deletes the exchange when its last binding goes (default false).
    pub fn auto_delete(mut self, auto_delete: bool) -> Self {
        self.auto_delete = auto_delete;
        self
    }

    /// Do not declare it, only check that it exists (startup fails otherwise).
    pub fn passive(mut self) -> Self {
        self.passive = true;
        self
    }

    /// An exchange argument (`alternate-exchange`…).
    pub fn argument(mut self, name: &str, value: AMQPValue) -> Self {
        self.arguments.insert(ShortString::from(name), value);
        self
    }

    /// The exchange's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The declaration's flags.
    pub(crate) fn options(&self) -> ExchangeOptions {
        ExchangeOptions {
            passive: self.passive,
            durable: self.durable,
            auto_delete: self.auto_delete,
        }
    }
}

/// A binding of a consumed queue to an exchange.
#[derive(Debug, Clone)]
pub(crate) struct Binding {
    /// The exchange messages come from.
    pub(crate) exchange: String,
    /// The routing key or pattern.
    pub(crate) routing_key: String,
    /// Binding arguments (headers exchanges match on them).
    pub(crate) arguments: FieldTable,
}

/// Where a queue's dead letters go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeadLetterRoute {
    /// The exchange conejo republishes dead letters to.
    pub(crate) exchange: String,
    /// The routing key; `None` keeps the message's own.
    pub(crate) routing_key: Option<String>,
    /// True when conejo owns (declares) the exchange and its queue, `<queue>.dlx` and
    /// `<queue>.dlq`; false for a user's exchange, which is only checked.
    pub(crate) owned: bool,
}

impl DeadLetterRoute {
    /// conejo's default for `queue`: `<queue>.dlx` (fanout) → `<queue>.dlq`.
    pub(crate) fn default_for(queue: &str) -> Self {
        DeadLetterRoute {
            exchange: dead_letter_exchange_name(queue),
            routing_key: None,
            owned: true,
        }
    }
}

/// `<queue>.dlx`.
pub(crate) fn dead_letter_exchange_name(queue: &str) -> String {
    format!("{queue}.dlx")
}

/// `<queue>.dlq`.
pub(crate) fn dead_letter_queue_name(queue: &str) -> String {
    format!("{queue}.dlq")
}

/// `<queue>.retry.<ttl>ms`.
pub(crate) fn wait_queue_name(queue: &str, ttl_ms: u32) -> String {
    format!("{queue}.retry.{ttl_ms}ms")
}

/// The longest suffix conejo adds to a queue's name (`.retry.86400000ms`).
pub(crate) const LONGEST_SUFFIX: usize = ".retry.86400000ms".len();

/// Flags of the queues conejo declares for a consumed queue (dead-letter and wait queues):
/// durable when it is, so a broker restart keeps the messages they hold, and replicated
/// (quorum) when it is, so that losing a node loses neither them nor the ability to
/// declare them.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Durability {
    /// Survive a broker restart.
    pub(crate) durable: bool,
    /// Quorum queues, like the consumed one.
    pub(crate) quorum: bool,
}

impl Durability {
    /// Flags of the dead-letter and wait queues.
    pub(crate) fn queue_options(self) -> QueueOptions {
        QueueOptions {
            durable: self.durable || self.quorum,
            ..QueueOptions::default()
        }
    }

    /// `x-queue-type = quorum` for replicated queues.
    pub(crate) fn arguments(self) -> FieldTable {
        let mut arguments = FieldTable::default();
        if self.quorum {
            arguments.insert(
                ShortString::from("x-queue-type"),
                AMQPValue::LongString(LongString::from("quorum")),
            );
        }
        arguments
    }
}

/// The arguments of the wait queue that holds `queue`'s retries for `ttl_ms`, then
/// dead-letters them back to `queue` through the default exchange.
pub(crate) fn wait_queue_arguments(queue: &str, ttl_ms: u32, durability: Durability) -> FieldTable {
    let mut arguments = durability.arguments();
    arguments.insert(
        ShortString::from("x-message-ttl"),
        AMQPValue::LongUInt(ttl_ms),
    );
    if durability.quorum {
        // A quorum queue dead-letters at most once unless told otherwise; a retry waiting
        // here must reach its queue even if a node fails at that moment.
        arguments.insert(
            ShortString::from("x-dead-letter-strategy"),
            AMQPValue::LongString(LongString::from("at-least-once")),
        );
        arguments.insert(
            ShortString::from("x-overflow"),
            AMQPValue::LongString(LongString::from("reject-publish")),
        );
    }
    arguments.insert(
        ShortString::from("x-dead-letter-exchange"),
        AMQPValue::LongString(LongString::from("")),
    );
    arguments.insert(
        ShortString::from("x-dead-letter-routing-key"),
        AMQPValue::LongString(LongString::from(queue)),
    );
    arguments
}
