//! Per-queue configuration: declaration and bindings, concurrency and prefetch, retries,
//! dead letters, timeouts, failure policy.

use std::{fmt, sync::Arc, time::Duration};

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use crate::{
    Context, Error, Failure, Outcome, RetryPolicy,
    broker::QueueOptions,
    config::{
        ordering::{KeyFn, OrderKey},
        partitions::Borrowed,
        stream::{DynOffsetStore, OffsetStore, StreamOffset, StreamSettings},
        topology::{Binding, DeadLetterRoute, Durability, LONGEST_SUFFIX},
    },
    handler::outcome::FailurePolicy,
    service::{BoxService, Layer, Layers, Service},
};

/// Default number of deliveries without a result (the consumer crashed or lost its
/// connection while handling the message) after which a message is dead-lettered as poison.
pub const DEFAULT_POISON_LIMIT: u32 = 5;

/// The longest handler timeout accepted.
pub(crate) const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 60 * 60);

/// How a queue is consumed and, unless [passive](QueueConfig::passive), declared.
///
/// **Concurrency and prefetch.** [`concurrency`](Self::concurrency) is the one knob most
/// services need: the number of messages handled at once on this queue. The prefetch (how many
/// unacknowledged messages the broker may push to conejo) is derived from it, and bounded
/// (AMQP's default prefetch is unlimited, the classic cause of consumer memory blow-ups):
///
/// - async handlers: 16 per slot, at most 250 (Spring AMQP's default), at least 2 per slot —
///   250 with the default concurrency of 16. Fast handlers need a window this deep to keep
///   up with the broker (measured: 0.73× of a hand-written lapin loop's throughput with a
///   window of 32, 0.96× with 250);
/// - [`Blocking`](crate::Blocking) handlers: 2 per slot, at least 10 — their threads are
///   slow, a few messages waiting locally are enough.
///
/// Messages in the window are held by this process: for long jobs shared between several
/// replicas, set the prefetch to the concurrency so that none waits here while another
/// replica is idle. Override it with [`prefetch`](Self::prefetch).
///
/// **Failures.** A failed message is retried per its [`RetryPolicy`] (default: 5 attempts,
/// 1 s × 3ⁿ) through broker-side wait queues, then dead-lettered to `<queue>.dlx` →
/// `<queue>.dlq`, both declared by conejo (or to the exchange named with
/// [`dead_letter_exchange`](Self::dead_letter_exchange), which must exist).
///
/// ```
/// use std::time::Duration;
/// use conejo::{Failure, Outcome, QueueConfig, RetryPolicy};
///
/// let config = QueueConfig::new()
///     .concurrency(8)             // prefetch becomes 128 (16 per slot)
///     .quorum()                   // x-queue-type = quorum
///     .bind("orders", "order.created.*")
///     .retry(RetryPolicy::default().max_attempts(3))
///     .timeout(Duration::from_secs(30))
///     .on_failure(|failure, _ctx| match failure {
///         Failure::Timeout(_) => Outcome::Reject, // a timeout here is never worth a retry
///         _ => failure.default_outcome(),
///     });
/// assert_eq!(config.effective_prefetch(), 128);
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
    /// Queue arguments (x-queue-type, x-max-length, …).
    pub(crate) arguments: FieldTable,
    /// Bindings declared before consuming.
    pub(crate) bindings: Vec<Binding>,
    /// Maps failures to outcomes; `None` uses [`Failure::default_outcome`].
    pub(crate) on_failure: Option<FailurePolicy>,
    /// How failed messages are tried again.
    pub(crate) retry: RetryPolicy,
    /// A handler running longer fails with [`Failure::Timeout`].
    pub(crate) timeout: Option<Duration>,
    /// Deliveries without a result before a message is dead-lettered as poison.
    pub(crate) poison_limit: Option<u32>,
    /// The user's dead-letter exchange; `None` for conejo's `<queue>.dlx`.
    pub(crate) dead_letter_exchange: Option<String>,
    /// Routing key of dead letters; `None` keeps the message's own.
    pub(crate) dead_letter_routing_key: Option<String>,
    /// The user's layers around this queue's handler.
    pub(crate) layers: Layers,
    /// Per-key ordering: what a delivery's key is.
    pub(crate) ordered_by: Option<OrderKey>,
    /// One consumer at a time, cluster-wide (`x-single-active-consumer`).
    pub(crate) single_active: bool,
    /// Consumer arguments (`x-priority`).
    pub(crate) consumer_arguments: FieldTable,
    /// A partition of another replica's, held while that replica is away and handed back
    /// when it returns ([`Partitions::replica`](crate::Partitions::replica)).
    pub(crate) borrowed: Option<Borrowed>,
    /// A stream queue: where its consumer starts.
    pub(crate) stream_from: Option<StreamOffset>,
    /// A stream queue: where its committed offset is kept.
    pub(crate) offset_store: Option<Arc<dyn DynOffsetStore>>,
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
            bindings: Vec::new(),
            on_failure: None,
            retry: RetryPolicy::default(),
            timeout: None,
            poison_limit: Some(DEFAULT_POISON_LIMIT),
            dead_letter_exchange: None,
            dead_letter_routing_key: None,
            layers: Layers::default(),
            ordered_by: None,
            single_active: false,
            consumer_arguments: FieldTable::default(),
            borrowed: None,
            stream_from: None,
            offset_store: None,
        }
    }
}

impl QueueConfig {
    /// The defaults: a durable classic queue, declared at start; concurrency 16 for async
    /// handlers and the number of cores for [`Blocking`](crate::Blocking) ones; prefetch
    /// derived from it; failures mapped by [`Failure::default_outcome`], retried per
    /// [`RetryPolicy::default`], then dead-lettered to `<queue>.dlx`; no handler timeout;
    /// poison messages dead-lettered after [`DEFAULT_POISON_LIMIT`] deliveries without a
    /// result.
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
    ///
    /// The prefetch bounds the unacknowledged messages of the channel the queue consumes on.
    /// When a long-running delivery holds its acks back, conejo moves the queue to a fresh
    /// channel and the old one keeps only its running deliveries: the messages a queue holds
    /// unacknowledged are then at most the prefetch plus those, which the concurrency bounds.
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

    /// Declares a quorum queue (replicated, `x-queue-type = quorum`); must be durable. With
    /// [`passive`](Self::passive), says that the existing queue is one: its dead-letter and
    /// wait queues are then quorum queues too.
    ///
    /// The broker counts a quorum queue's redeliveries (`x-delivery-count`): conejo reads
    /// that count for poison detection and, unless set, declares `x-delivery-limit` to the
    /// poison limit and `x-dead-letter-exchange` to the queue's dead-letter exchange, so the
    /// broker's own limit is a backstop that dead-letters instead of dropping.
    pub fn quorum(self) -> Self {
        self.argument(
            "x-queue-type",
            AMQPValue::LongString(LongString::from("quorum")),
        )
    }

    /// Dead letters go to this exchange, which must exist (checked at startup: a missing one
    /// is [`Error::DeadLetterExchangeNotFound`], never silent loss), instead of conejo's
    /// own `<queue>.dlx` → `<queue>.dlq`. They are published `mandatory`: one that no queue
    /// takes is not acked, it is retried later.
    pub fn dead_letter_exchange(mut self, exchange: &str) -> Self {
        self.dead_letter_exchange = Some(exchange.to_owned());
        self
    }

    /// The routing key of dead letters (default: the message's own).
    pub fn dead_letter_routing_key(mut self, routing_key: &str) -> Self {
        self.dead_letter_routing_key = Some(routing_key.to_owned());
        self
    }

    /// Binds the queue to `exchange` with `routing_key` (a pattern for topic exchanges)
    /// before consuming. May be called several times.
    pub fn bind(self, exchange: &str, routing_key: &str) -> Self {
        self.bind_with(exchange, routing_key, FieldTable::default())
    }

    /// As [`bind`](Self::bind), with binding arguments (headers exchanges match on them).
    pub fn bind_with(mut self, exchange: &str, routing_key: &str, arguments: FieldTable) -> Self {
        self.bindings.push(Binding {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            arguments,
        });
        self
    }

    /// Wraps this queue's handler in `layer` (inside the service's
    /// [layers](crate::Builder::layer)); a layer added later wraps the ones added before. A
    /// layer sees each delivery's raw body and [`Context`] before decoding, and its result:
    /// see [`service`](crate::service), and [`from_fn`](crate::service::from_fn) for a
    /// closure. The queue's [timeout](Self::timeout) and conejo's panic isolation wrap the
    /// layers.
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<BoxService> + Send + Sync + 'static,
        L::Service: Service,
    {
        self.layers.push(layer);
        self
    }

    /// How failed messages are retried (default [`RetryPolicy::default`]).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The longest a handler may take (default: no limit). An async handler past it is
    /// cancelled; a [`Blocking`](crate::Blocking) one is abandoned (its thread keeps its
    /// concurrency slot until it returns). Either way the message fails with
    /// [`Failure::Timeout`], retried by default. Keep it well below the broker's
    /// `consumer_timeout` (see [`Builder::consumer_timeout`](crate::Builder::consumer_timeout)).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Deliveries without a result — the consumer crashed, was killed or lost its connection
    /// while the message was in its hands — after which the message is dead-lettered with
    /// reason `poison` instead of being handled again (default [`DEFAULT_POISON_LIMIT`]);
    /// `None` turns the detection off.
    ///
    /// On quorum queues the broker counts (`x-delivery-count`). On classic queues conejo
    /// counts: a redelivered message is republished with its count in `conejo-redeliveries`
    /// (confirmed, then acked), which puts it at the back of the queue — turn the detection
    /// off for a classic queue whose order matters. A shutdown give-back counts as a delivery
    /// without a result, but never uses up a retry attempt.
    pub fn poison_limit(mut self, limit: Option<u32>) -> Self {
        self.poison_limit = limit;
        self
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

    /// Handles deliveries with the same [`OrderKey`] one at a time, in the order the broker
    /// delivered them, and different keys in parallel up to the
    /// [concurrency](Self::concurrency) — "all events of order 42 in order, different
    /// orders at once".
    ///
    /// - **Waiting.** A delivery whose key is busy waits in this process, unacknowledged,
    ///   without a concurrency slot; it counts against the prefetch, so a hot key that fills
    ///   the window stalls the queue (visible as `key_waiting` in [`QueueStats`] and the
    ///   `conejo_ordering_waiting` metric, with the oldest wait's age).
    /// - **Retries happen in place.** A failure to be retried is retried by this process,
    ///   after the policy's delay, holding its key (later deliveries of the key wait behind
    ///   it) and its concurrency slot, the delivery unacknowledged meanwhile — never through
    ///   a wait queue, which would let later messages of the key overtake it. Keep the
    ///   delays well below the broker's `consumer_timeout`. A crash during the wait
    ///   redelivers the message (at its first attempt again).
    /// - **Dead letters** leave the sequence: a message dead-lettered (rejected, out of
    ///   attempts, poison) is acked once its dead letter is confirmed, and its key goes on
    ///   with the next message.
    /// - **Order holds per queue**, between deliveries of this process; across replicas of a
    ///   service, consume partition queues with a single active consumer each (the
    ///   consistent-hash partitioning of the README's "Scaling out").
    ///
    /// - **Across redeliveries** (a lost connection, a shutdown, a hand-over) order is the
    ///   broker's: a classic queue puts a given-back message back in its place, so the order
    ///   holds; a quorum queue (RabbitMQ 3.x, measured on 3.10.8) puts it at the *back*, behind
    ///   the key's later messages that were never delivered. For strict order through
    ///   faults, use a classic queue with [`poison_limit(None)`](Self::poison_limit) —
    ///   conejo's redelivery counting republishes a redelivered message to the back of a
    ///   classic queue, so `build()` refuses an ordered classic queue with it on.
    ///
    /// [`QueueStats`]: crate::QueueStats
    pub fn ordered_by(mut self, key: OrderKey) -> Self {
        self.ordered_by = Some(key);
        self
    }

    /// One consumer at a time for the whole queue (`x-single-active-consumer`): among the
    /// replicas of a service consuming it, the broker delivers to the first registered
    /// only; when it goes (its process dies or stops, its connection drops) the next one
    /// takes over. With [`ordered_by`](Self::ordered_by) — or a concurrency of 1 — that is
    /// one queue's order kept across replicas.
    ///
    /// What conejo does about it: it never moves the queue to a fresh channel (a rotation
    /// would register a new consumer behind the others and hand the active role away); at
    /// shutdown it keeps the active role until its running deliveries end, and only then
    /// cancels and gives back what it had not started — so the next consumer starts after
    /// them, in order. A lost connection loses the role at once (the broker requeues what
    /// was unacked, and the next consumer gets it). What a hand-over gives back keeps its
    /// place in a classic queue with [`poison_limit(None)`](Self::poison_limit) (redelivery
    /// counting republishes it to the back); a quorum queue (RabbitMQ 3.x) puts it at the
    /// back. With [`passive`](Self::passive), says that the existing queue is one.
    pub fn single_active_consumer(mut self) -> Self {
        self.single_active = true;
        self
    }

    /// This consumer's priority (`x-priority`): the broker delivers to the highest-priority
    /// consumers of the queue that have room in their prefetch, and to lower ones only when
    /// those are full or gone. Default 0; negative values are allowed.
    pub fn consumer_priority(mut self, priority: i32) -> Self {
        self.consumer_arguments.insert(
            ShortString::from("x-priority"),
            AMQPValue::LongInt(priority),
        );
        self
    }

    /// Declares a stream queue (`x-queue-type = stream`: an append-only, replicated log that
    /// consumers read without removing anything) and consumes it from `from` — or, when the
    /// [`offset_store`](Self::offset_store) holds an offset for the queue, from the one after
    /// it. Must be durable. With [`passive`](Self::passive), says that the existing queue is
    /// one.
    ///
    /// What changes on a stream, which RabbitMQ gives no requeue (a `basic.nack` closes the
    /// connection) and no redelivery:
    ///
    /// - **Retries are in place**: the delivery waits the [`RetryPolicy`]'s delay and is
    ///   handled again in its slot, as on an [ordered](Self::ordered_by) queue; a copy in a
    ///   wait queue would be a second message in the log, seen by every other reader.
    /// - **Dead letters** go to `<queue>.dlx` → `<queue>.dlq` (or your
    ///   [`dead_letter_exchange`](Self::dead_letter_exchange)), confirmed before the
    ///   offset moves past the message; if the broker does not confirm, conejo tries again
    ///   after a pause, holding the message.
    /// - **No poison detection**: a stream never marks a delivery redelivered. A message
    ///   that crashes the process comes again after each restart from the stored offset.
    /// - **Resuming**: a lost connection or channel resumes after the committed offset (the
    ///   highest one below which every message is done), so what was running is handled
    ///   again, never skipped. A restarted process resumes after the offset its
    ///   [`OffsetStore`] holds; without a store, from `from` again.
    /// - **Shutdown** lets running handlers finish (up to the shutdown timeout) and stores
    ///   the committed offset; nothing is given back, a stream has nothing to give back to.
    /// - Not with [`single_active_consumer`](Self::single_active_consumer) (RabbitMQ offers
    ///   it on streams to its stream protocol only) or [`Partitions`](crate::Partitions).
    ///
    /// [`Context::stream_offset`] is each message's offset; [`QueueStats::stream_offset`]
    /// the committed one.
    ///
    /// ```
    /// use conejo::{QueueConfig, StreamOffset, types::AMQPValue};
    ///
    /// let events = QueueConfig::new()
    ///     .stream(StreamOffset::First)
    ///     .argument("x-max-age", AMQPValue::LongString("7D".into())) // retention
    ///     .concurrency(8);
    /// # let _ = events;
    /// ```
    ///
    /// [`QueueStats::stream_offset`]: crate::QueueStats::stream_offset
    pub fn stream(mut self, from: StreamOffset) -> Self {
        self.stream_from = Some(from);
        self.argument(
            "x-queue-type",
            AMQPValue::LongString(LongString::from("stream")),
        )
    }

    /// Where a [stream](Self::stream) queue's committed offset is kept, so that a restarted
    /// service resumes after it (see [`OffsetStore`]).
    pub fn offset_store(mut self, store: impl OffsetStore) -> Self {
        self.offset_store = Some(Arc::new(store));
        self
    }

    /// The prefetch that will be applied for an async handler (whose default concurrency
    /// is 16).
    #[must_use]
    pub fn effective_prefetch(&self) -> u16 {
        self.resolve(false).1
    }

    /// (concurrency, prefetch) once it is known whether the handler is blocking.
    pub(crate) fn resolve(&self, blocking: bool) -> (usize, u16) {
        let concurrency = self
            .concurrency
            .unwrap_or_else(|| default_concurrency(blocking));
        let prefetch = self
            .prefetch
            .unwrap_or_else(|| derive_prefetch(concurrency, blocking));
        (concurrency.min(usize::from(prefetch)), prefetch)
    }

    pub(crate) fn validate(&self, queue: &str) -> Result<(), Error> {
        let invalid = |reason: &str| Err(Error::config(Some(queue), reason));
        if queue.is_empty() {
            return Err(Error::config(None, "queue name must not be empty"));
        }
        if queue.len() + LONGEST_SUFFIX > 255 {
            return invalid(&format!(
                "queue name longer than {} bytes (conejo names its wait queues \
                 '<queue>.retry.<ttl>ms', and AMQP names are at most 255 bytes)",
                255 - LONGEST_SUFFIX
            ));
        }
        self.retry.validate(queue)?;
        if let Some(timeout) = self.timeout
            && (timeout.is_zero() || timeout > MAX_TIMEOUT)
        {
            return invalid("timeout must be between 1 ns and 7 days");
        }
        if self.poison_limit == Some(0) {
            return invalid("poison limit must be at least 1 (or None to turn it off)");
        }
        if self.dead_letter_exchange.as_deref() == Some("") {
            return invalid(
                "dead-letter exchange must not be the default exchange \
                 (name an exchange, or leave it unset for '<queue>.dlx')",
            );
        }
        if self.concurrency == Some(0) {
            return invalid("concurrency must be at least 1");
        }
        if self.prefetch == Some(0) {
            return invalid("prefetch must be at least 1 (0 would mean unlimited)");
        }
        if self.is_quorum() && self.declare && (!self.durable || self.auto_delete) {
            return invalid("a quorum queue must be durable and not auto-delete");
        }
        if self.is_stream() {
            if self.declare && (!self.durable || self.auto_delete) {
                return invalid("a stream queue must be durable and not auto-delete");
            }
            if self.single_active || self.borrowed.is_some() {
                return invalid(
                    "a stream queue cannot have a single active consumer (RabbitMQ offers it \
                     on streams to stream-protocol consumers only), nor be a partition",
                );
            }
        } else if self.offset_store.is_some() {
            return invalid("an offset store is for stream queues (QueueConfig::stream)");
        }
        if self.ordered_by.is_some()
            && !self.is_quorum()
            && !self.is_stream()
            && self.poison_limit.is_some()
        {
            return invalid(
                "ordered_by on a classic queue needs .poison_limit(None): counting \
                 redeliveries republishes a message to the back of the queue, out of its \
                 key's order (or use a quorum queue, whose broker counts them — but which \
                 gives a redelivered message back at the back of the queue)",
            );
        }
        Ok(())
    }

    /// Where this queue's dead letters go.
    pub(crate) fn dead_letter_route(&self, queue: &str) -> DeadLetterRoute {
        match &self.dead_letter_exchange {
            Some(exchange) => DeadLetterRoute {
                exchange: exchange.clone(),
                routing_key: self.dead_letter_routing_key.clone(),
                owned: false,
            },
            None => DeadLetterRoute {
                routing_key: self.dead_letter_routing_key.clone(),
                ..DeadLetterRoute::default_for(queue)
            },
        }
    }

    /// Flags of the dead-letter and wait queues conejo declares for this queue: durable
    /// unless the queue is declared transient, quorum when the queue is one.
    pub(crate) fn durability(&self) -> Durability {
        Durability {
            durable: self.durable || !self.declare,
            quorum: self.is_quorum(),
        }
    }

    /// True when the queue is declared as a quorum queue.
    pub(crate) fn is_quorum(&self) -> bool {
        matches!(
            self.arguments.inner().get("x-queue-type"),
            Some(AMQPValue::LongString(kind)) if kind.as_bytes() == b"quorum"
        )
    }

    /// True when the queue is a stream queue.
    pub(crate) fn is_stream(&self) -> bool {
        matches!(
            self.arguments.inner().get("x-queue-type"),
            Some(AMQPValue::LongString(kind)) if kind.as_bytes() == b"stream"
        )
    }

    /// The arguments the queue is declared with: the user's, plus for a quorum queue the
    /// delivery limit and dead-letter exchange that back conejo's poison detection.
    pub(crate) fn declared_arguments(&self, queue: &str) -> FieldTable {
        let mut arguments = self.arguments.clone();
        if self.single_active && !arguments.contains_key("x-single-active-consumer") {
            arguments.insert(
                ShortString::from("x-single-active-consumer"),
                AMQPValue::Boolean(true),
            );
        }
        if !self.is_quorum() {
            return arguments;
        }
        // Always a delivery limit, said explicitly, rather than the broker's default (none on
        // RabbitMQ 3, 20 on RabbitMQ 4, past which a message without a dead-letter exchange
        // is dropped): the poison limit, or with detection off, none (-1 would say
        // "unlimited" only to RabbitMQ 4).
        if !arguments.contains_key("x-delivery-limit") {
            let limit = self
                .poison_limit
                .map_or(i32::MAX, |limit| i32::try_from(limit).unwrap_or(i32::MAX));
            arguments.insert(
                ShortString::from("x-delivery-limit"),
                AMQPValue::LongInt(limit),
            );
        }
        if self.poison_limit.is_some() && !arguments.contains_key("x-dead-letter-exchange") {
            let route = self.dead_letter_route(queue);
            arguments.insert(
                ShortString::from("x-dead-letter-exchange"),
                AMQPValue::LongString(LongString::from(route.exchange.as_str())),
            );
        }
        arguments
    }

    /// The queue's settings as it runs, every derived value worked out once: concurrency
    /// and prefetch, the declaration's flags and arguments, the dead-letter route, the flags
    /// of the queues conejo declares for it, the failure policy.
    pub(crate) fn settings(&self, name: Arc<str>, blocking: bool) -> ResolvedQueue {
        let (concurrency, prefetch) = self.resolve(blocking);
        // A stream queue set up through `argument` only is still consumed as one: RabbitMQ's
        // default start is `next`.
        let stream = self.is_stream().then(|| StreamSettings {
            from: self.stream_from.unwrap_or(StreamOffset::Next),
            store: self.offset_store.clone(),
        });
        let single_active = self.single_active
            || matches!(
                self.arguments.inner().get("x-single-active-consumer"),
                Some(AMQPValue::Boolean(true))
            );
        ResolvedQueue {
            concurrency,
            prefetch,
            blocking,
            options: QueueOptions {
                passive: !self.declare,
                durable: self.durable,
                exclusive: false,
                auto_delete: self.auto_delete,
            },
            arguments: if self.declare {
                self.declared_arguments(&name)
            } else {
                FieldTable::default()
            },
            bindings: self.bindings.clone(),
            dead_letter: self.dead_letter_route(&name),
            durability: self.durability(),
            retry: self.retry,
            // A stream never redelivers: nothing to count.
            poison_limit: self.poison_limit.filter(|_| stream.is_none()),
            policy: self.policy(),
            timeout: self.timeout,
            ordered_by: self.ordered_by.as_ref().map(|key| Arc::clone(&key.key)),
            retry_in_place: self.ordered_by.is_some() || stream.is_some(),
            keeps_consumer: single_active || stream.is_some(),
            single_active,
            stream,
            consumer_arguments: self.consumer_arguments.clone(),
            borrowed: self.borrowed,
            name,
        }
    }

    pub(crate) fn policy(&self) -> FailurePolicy {
        self.on_failure
            .clone()
            .unwrap_or_else(|| Arc::new(|failure: &Failure, _: &Context| failure.default_outcome()))
    }
}

/// A queue's settings as it runs: its [`QueueConfig`] with every derived value worked out
/// once, when the service is built.
pub(crate) struct ResolvedQueue {
    /// The queue's name.
    pub(crate) name: Arc<str>,
    /// Messages handled at once.
    pub(crate) concurrency: usize,
    /// Unacknowledged messages the broker may push on the queue's channel.
    pub(crate) prefetch: u16,
    /// True for a blocking handler, whose thread outlives a timeout.
    pub(crate) blocking: bool,
    /// The declaration's flags.
    pub(crate) options: QueueOptions,
    /// The declaration's arguments: the user's, plus what backs poison detection on a
    /// quorum queue (none for a passive declaration).
    pub(crate) arguments: FieldTable,
    /// Bindings declared before consuming.
    pub(crate) bindings: Vec<Binding>,
    /// Where dead letters go.
    pub(crate) dead_letter: DeadLetterRoute,
    /// Flags of the dead-letter and wait queues conejo declares for it.
    pub(crate) durability: Durability,
    /// Attempts and delays of retries.
    pub(crate) retry: RetryPolicy,
    /// Deliveries without a result before a message is poison.
    pub(crate) poison_limit: Option<u32>,
    /// Maps failures to outcomes.
    pub(crate) policy: FailurePolicy,
    /// A handler running longer fails with [`Failure::Timeout`].
    pub(crate) timeout: Option<Duration>,
    /// Per-key ordering: what a delivery's key is.
    pub(crate) ordered_by: Option<KeyFn>,
    /// Failures are retried in place, never through a wait queue: an ordered queue's (a copy
    /// would let later messages of its key overtake it) and a stream's (a copy would be a
    /// second message in the log).
    pub(crate) retry_in_place: bool,
    /// One consumer at a time, cluster-wide.
    pub(crate) single_active: bool,
    /// The queue's consumer is never moved to a fresh channel, and a shutdown lets running
    /// deliveries end before it goes: a single-active queue's (a new consumer would register
    /// behind the others, handing the role away) and a stream's (a new subscription would
    /// start from an offset, delivering the running ones again).
    pub(crate) keeps_consumer: bool,
    /// A stream queue: where it starts, where its offset is kept.
    pub(crate) stream: Option<StreamSettings>,
    /// Consumer arguments (`x-priority`).
    pub(crate) consumer_arguments: FieldTable,
    /// Another replica's partition, handed back when that replica returns.
    pub(crate) borrowed: Option<Borrowed>,
}

impl fmt::Debug for ResolvedQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ResolvedQueue")
            .field("name", &self.name)
            .field("concurrency", &self.concurrency)
            .field("prefetch", &self.prefetch)
            .field("blocking", &self.blocking)
            .field("options", &self.options)
            .field("dead_letter", &self.dead_letter)
            .finish_non_exhaustive()
    }
}

/// Concurrency of an async handler when the queue does not set one.
pub(crate) const DEFAULT_ASYNC_CONCURRENCY: usize = 16;

/// The concurrency when the queue does not set one: 16 for async handlers, the number of
/// cores for blocking ones (their threads compete for the cores).
pub(crate) fn default_concurrency(blocking: bool) -> usize {
    if blocking {
        std::thread::available_parallelism().map_or(2, usize::from)
    } else {
        DEFAULT_ASYNC_CONCURRENCY
    }
}

/// Most messages an async handler's window holds unless its concurrency asks for more.
const ASYNC_PREFETCH_CAP: usize = 250;

/// Prefetch for a concurrency. Always at least twice of it, so the next messages are local
/// when a handler finishes. Async handlers, which can be fast, get 16 per slot up to 250, so
/// that acks in flight and messages on the wire never leave the broker without window;
/// blocking ones at least 10, so acknowledgements can still be coalesced. Never above AMQP's
/// 16-bit maximum.
fn derive_prefetch(concurrency: usize, blocking: bool) -> u16 {
    let floor = if blocking {
        10
    } else {
        concurrency.saturating_mul(16).min(ASYNC_PREFETCH_CAP)
    };
    u16::try_from(concurrency.saturating_mul(2).max(floor)).unwrap_or(u16::MAX)
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
            .field("bindings", &self.bindings)
            .field("on_failure", &self.on_failure.as_ref().map(|_| "custom"))
            .field("retry", &self.retry)
            .field("timeout", &self.timeout)
            .field("poison_limit", &self.poison_limit)
            .field("dead_letter_exchange", &self.dead_letter_exchange)
            .field("dead_letter_routing_key", &self.dead_letter_routing_key)
            .field("layers", &self.layers)
            .field("ordered_by", &self.ordered_by)
            .field("single_active", &self.single_active)
            .field("consumer_arguments", &self.consumer_arguments)
            .field("borrowed", &self.borrowed)
            .field("stream_from", &self.stream_from)
            .field(
                "offset_store",
                &self.offset_store.as_ref().map(|_| "custom"),
            )
            .finish()
    }
}

#[cfg(test)]
mod tests;
