//! What a handler knows about the delivery it is handling.

use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, ShortString},
};
use tokio_util::sync::CancellationToken;

use crate::{
    Message, PublishError, Publisher, broker::Incoming, handler::slot::Slot, headers,
    publish::Ledger,
};

/// A delivery's metadata, given to the handler beside the decoded message.
///
/// It also carries the service's shutdown signal, so that a long handler can stop early:
/// a handler that returns an error because of shutdown has its message retried (by the
/// default policy, [`HandlerError::retry`](crate::HandlerError::retry)).
///
/// Cloning is cheap (one reference count): the metadata is shared, not copied.
#[derive(Debug, Clone)]
pub struct Context {
    /// Shared by every copy of this delivery's context.
    inner: Arc<Inner>,
}

/// What a [`Context`] holds.
#[derive(Debug)]
struct Inner {
    /// The queue the message was consumed from (shared by all its deliveries).
    queue: Arc<str>,
    /// The broker's tag for this delivery, unique on its channel.
    delivery_tag: u64,
    /// The exchange the message was first published to ("" for the default exchange); for a
    /// retry, the original's, not the wait queue's.
    exchange: ShortString,
    /// The routing key it was first published with.
    routing_key: ShortString,
    /// Which attempt this delivery is (1 for the first), from `conejo-attempt`.
    attempt: u32,
    /// True when the broker delivered this message before (to this or another consumer).
    redelivered: bool,
    /// The AMQP properties: headers, ids, content type, timestamp…
    properties: BasicProperties,
    /// The signals of the delivery's channel, shared by all its deliveries.
    signals: Arc<Signals>,
    /// The queue's concurrency slot held by this delivery, released when the delivery is
    /// settled — whatever copies of the context live on. A blocking handler takes it into
    /// its thread, so that a thread abandoned at a timeout keeps the slot until it returns
    /// and the concurrency bound holds.
    slot: Mutex<Option<Slot>>,
    /// The publishes made through [`Context::publish`], awaited before the delivery is
    /// acked; made on the first such publish.
    ledger: OnceLock<Ledger>,
}

/// What every delivery of one channel can signal or be signalled: one per channel, so that
/// a delivery's context holds one reference to them rather than two tokens of its own.
#[derive(Debug)]
pub(crate) struct Signals {
    /// Cancelled when the service starts shutting down, or the channel or its connection
    /// is lost.
    pub(crate) shutdown: CancellationToken,
    /// The service's own shutdown, for [`Context::request_shutdown`].
    pub(crate) service: CancellationToken,
    /// The service's publisher, for [`Context::publish`].
    pub(crate) publisher: Option<Publisher>,
}

impl Signals {
    /// Signals that never fire, for messages that did not come from a broker.
    fn detached() -> Arc<Self> {
        Arc::new(Signals {
            shutdown: CancellationToken::new(),
            service: CancellationToken::new(),
            publisher: None,
        })
    }
}

impl Context {
    /// The context of a delivery as it came from the broker, and its body (both taken out
    /// of it, not copied).
    pub(crate) fn from_delivery(
        queue: Arc<str>,
        delivery: &mut Incoming,
        signals: Arc<Signals>,
        slot: Slot,
    ) -> (Self, Bytes) {
        let properties = std::mem::take(&mut delivery.properties);
        let mut exchange = std::mem::take(&mut delivery.exchange);
        let mut routing_key = std::mem::take(&mut delivery.routing_key);
        let mut attempt = 1;
        if let Some(found) = properties.headers() {
            attempt = headers::attempt(Some(found));
            // A retry comes back through its wait queue: report where it first came from.
            if let Some(original) = headers::text(Some(found), headers::ORIGINAL_EXCHANGE) {
                exchange = ShortString::from(original);
            }
            if let Some(original) = headers::text(Some(found), headers::ORIGINAL_ROUTING_KEY) {
                routing_key = ShortString::from(original);
            }
        }
        let ctx = Context {
            inner: Arc::new(Inner {
                queue,
                delivery_tag: delivery.delivery_tag,
                exchange,
                routing_key,
                attempt,
                redelivered: delivery.redelivered,
                properties,
                signals,
                slot: Mutex::new(Some(slot)),
                ledger: OnceLock::new(),
            }),
        };
        (ctx, Bytes::from(std::mem::take(&mut delivery.data)))
    }

    /// This context's own metadata, to change (tests' `with_*`): copied first if shared,
    /// the copy without the concurrency slot.
    fn inner_mut(&mut self) -> &mut Inner {
        if Arc::get_mut(&mut self.inner).is_none() {
            let shared = &self.inner;
            self.inner = Arc::new(Inner {
                queue: Arc::clone(&shared.queue),
                delivery_tag: shared.delivery_tag,
                exchange: shared.exchange.clone(),
                routing_key: shared.routing_key.clone(),
                attempt: shared.attempt,
                redelivered: shared.redelivered,
                properties: shared.properties.clone(),
                signals: Arc::clone(&shared.signals),
                slot: Mutex::new(None),
                ledger: OnceLock::new(),
            });
        }
        Arc::get_mut(&mut self.inner).expect("not shared any more")
    }

    /// Gives the delivery a concurrency slot (one that waited for its key).
    pub(crate) fn put_slot(&self, slot: Slot) {
        *self.inner.slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(slot);
    }

    /// The context of the delivery's next attempt, handled in place (an ordered queue's
    /// retry): the same delivery, its attempt one more, its concurrency slot moved over, a
    /// fresh ledger for what the attempt publishes.
    pub(crate) fn next_attempt(&self) -> Context {
        let slot = self.take_slot();
        let next = self.clone().with_attempt(self.attempt() + 1);
        if let Some(slot) = slot {
            next.put_slot(slot);
        }
        next
    }

    /// Takes the delivery's concurrency slot (for a blocking handler's thread).
    pub(crate) fn take_slot(&self) -> Option<Slot> {
        self.inner
            .slot
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// A context for a message that did not come from a broker: for tests of handlers and
    /// codecs. Empty metadata, a shutdown signal that never fires.
    #[must_use]
    pub fn detached(queue: &str) -> Self {
        Context {
            inner: Arc::new(Inner {
                queue: Arc::from(queue),
                delivery_tag: 0,
                exchange: ShortString::from(""),
                routing_key: ShortString::from(queue),
                attempt: 1,
                redelivered: false,
                properties: BasicProperties::default(),
                signals: Signals::detached(),
                slot: Mutex::new(None),
                ledger: OnceLock::new(),
            }),
        }
    }

    /// Sets the attempt number: for tests.
    #[must_use]
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.inner_mut().attempt = attempt.max(1);
        self
    }

    /// Replaces the properties (headers, ids, content type…): for tests.
    #[must_use]
    pub fn with_properties(mut self, properties: BasicProperties) -> Self {
        self.inner_mut().properties = properties;
        self
    }

    /// Marks the message as redelivered: for tests.
    #[must_use]
    pub fn with_redelivered(mut self, redelivered: bool) -> Self {
        self.inner_mut().redelivered = redelivered;
        self
    }

    /// The queue the message was consumed from.
    #[must_use]
    pub fn queue(&self) -> &str {
        &self.inner.queue
    }

    /// The delivery tag (unique on the consuming channel; for logs).
    #[must_use]
    pub fn delivery_tag(&self) -> u64 {
        self.inner.delivery_tag
    }

    /// The exchange the message was published to (empty for the default exchange). For a
    /// retry, the exchange of the original message.
    #[must_use]
    pub fn exchange(&self) -> &str {
        self.inner.exchange.as_str()
    }

    /// The routing key the message was published with (for a retry, the original's).
    #[must_use]
    pub fn routing_key(&self) -> &str {
        self.inner.routing_key.as_str()
    }

    /// Which attempt at handling this message this delivery is: 1 for the first, 2 for the
    /// first retry… Counted by conejo across retries, restarts and redeliveries; a delivery
    /// given back at shutdown or lost with a connection does not use up an attempt.
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.inner.attempt
    }

    /// The broker's redelivered flag: this very message was delivered before without being
    /// settled (a consumer stopped or crashed, or gave it back at shutdown). Retries are new
    /// copies, so for them it is false: see [`attempt`](Self::attempt).
    #[must_use]
    pub fn redelivered(&self) -> bool {
        self.inner.redelivered
    }

    /// The `message-id` property.
    #[must_use]
    pub fn message_id(&self) -> Option<&str> {
        self.inner
            .properties
            .message_id()
            .as_ref()
            .map(ShortString::as_str)
    }

    /// The `correlation-id` property.
    #[must_use]
    pub fn correlation_id(&self) -> Option<&str> {
        self.inner
            .properties
            .correlation_id()
            .as_ref()
            .map(ShortString::as_str)
    }

    /// The `content-type` property.
    #[must_use]
    pub fn content_type(&self) -> Option<&str> {
        self.inner
            .properties
            .content_type()
            .as_ref()
            .map(ShortString::as_str)
    }

    /// The `reply-to` property.
    #[must_use]
    pub fn reply_to(&self) -> Option<&str> {
        self.inner
            .properties
            .reply_to()
            .as_ref()
            .map(ShortString::as_str)
    }

    /// On a [stream](crate::QueueConfig::stream) queue, the message's offset in the stream
    /// (`x-stream-offset`: messages are numbered from 0 in the order the stream took them);
    /// `None` on other queues. Store it with the handler's own effects, in one transaction,
    /// for exactly-once processing across restarts.
    #[must_use]
    pub fn stream_offset(&self) -> Option<u64> {
        crate::headers::stream_offset(self.headers())
    }

    /// The message headers, if any.
    #[must_use]
    pub fn headers(&self) -> Option<&FieldTable> {
        self.inner.properties.headers().as_ref()
    }

    /// One header's value.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&AMQPValue> {
        self.headers()?.inner().get(name)
    }

    /// All AMQP properties of the message.
    #[must_use]
    pub fn properties(&self) -> &BasicProperties {
        &self.inner.properties
    }

    /// True once the service has started shutting down.
    #[must_use]
    pub fn is_shutting_down(&self) -> bool {
        self.inner.signals.shutdown.is_cancelled()
    }

    /// Completes when the service starts shutting down: `select!` on it in long handlers to
    /// stop early (and return an error, so the message is retried later).
    pub async fn shutdown_requested(&self) {
        self.inner.signals.shutdown.cancelled().await;
    }

    /// Starts the service's graceful shutdown, as SIGTERM would: for a handler that finds the
    /// service cannot go on (a required resource gone for good, a fatal misconfiguration).
    /// The handler should still return: its own message is settled by what it returns.
    ///
    /// ```
    /// use conejo::{Context, Handler, HandlerError};
    ///
    /// struct Migrations;
    /// impl Handler for Migrations {
    ///     type Message = String;
    ///     async fn handle(&self, version: String, ctx: &Context) -> Result<(), HandlerError> {
    ///         if version != "v2" {
    ///             ctx.request_shutdown(); // this build cannot serve the new schema
    ///             return Err(HandlerError::retry(format!("schema {version} unsupported")));
    ///         }
    ///         Ok(())
    ///     }
    /// }
    /// ```
    pub fn request_shutdown(&self) {
        self.inner.signals.service.cancel();
    }

    /// Publishes `message` through the service's publisher **for this delivery**: this
    /// delivery is acked only once every message it published this way is confirmed by the
    /// broker, and a publish that is not confirmed fails the delivery
    /// ([`Failure::Publish`](crate::Failure::Publish), retried by default) even though the
    /// handler returned `Ok` — no input is acked whose outputs are lost. Await it to see its
    /// result (several at once with `tokio::join!`); one whose future is dropped after it
    /// was handed over (a timeout around it) still holds the ack.
    ///
    /// ```no_run
    /// use conejo::{Context, Handler, HandlerError, Json, Message};
    ///
    /// #[derive(serde::Deserialize, serde::Serialize)]
    /// struct Order { id: u64 }
    ///
    /// struct Orders;
    /// impl Handler for Orders {
    ///     type Message = Json<Order>;
    ///     async fn handle(&self, Json(order): Json<Order>, ctx: &Context) -> Result<(), HandlerError> {
    ///         // store(order) in the database, then announce it:
    ///         ctx.publish(Message::new("shop", "order.stored", Json(order))).await?;
    ///         Ok(()) // acked once the event is confirmed
    ///     }
    /// }
    /// ```
    ///
    /// # Errors
    /// As [`Publisher::send`]; [`PublishError::Closed`] for a context without a service (a
    /// test's [`Context::detached`]).
    pub async fn publish(&self, message: Message) -> Result<(), PublishError> {
        let Some(publisher) = &self.inner.signals.publisher else {
            return Err(PublishError::Closed);
        };
        let ledger = self.inner.ledger.get_or_init(Ledger::default);
        publisher.send_tracked(message, ledger).await
    }

    /// The service's publisher (`None` for a context without a service): for publishes that
    /// must not hold this delivery's ack.
    #[must_use]
    pub fn publisher(&self) -> Option<&Publisher> {
        self.inner.signals.publisher.as_ref()
    }

    /// The publishes this delivery made through [`publish`](Self::publish), if any.
    pub(crate) fn ledger(&self) -> Option<&Ledger> {
        self.inner.ledger.get()
    }
}
