//! What a handler knows about the delivery it is handling.

use std::sync::Arc;

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, ShortString},
};
use tokio_util::sync::CancellationToken;

/// A delivery's metadata, given to the handler beside the decoded message.
///
/// It also carries the service's shutdown signal, so that a long handler can stop early:
/// a handler that returns an error because of shutdown has its message requeued (by the
/// default policy, [`HandlerError::retry`](crate::HandlerError::retry)).
#[derive(Debug, Clone)]
pub struct Context {
    /// The queue the message was consumed from (shared by all its deliveries).
    queue: Arc<str>,
    /// The broker's tag for this delivery, unique on its channel.
    delivery_tag: u64,
    /// The exchange the message was published to ("" for the default exchange).
    exchange: ShortString,
    /// The routing key it was published with.
    routing_key: ShortString,
    /// True when the broker delivered this message before (to this or another consumer).
    redelivered: bool,
    /// The AMQP properties: headers, ids, content type, timestamp…
    properties: BasicProperties,
    /// Cancelled when the service starts shutting down.
    shutdown: CancellationToken,
}

impl Context {
    pub(crate) fn from_delivery(
        queue: Arc<str>,
        delivery: &mut lapin::message::Delivery,
        shutdown: CancellationToken,
    ) -> Self {
        Context {
            queue,
            delivery_tag: delivery.delivery_tag,
            exchange: std::mem::replace(&mut delivery.exchange, ShortString::from("")),
            routing_key: std::mem::replace(&mut delivery.routing_key, ShortString::from("")),
            redelivered: delivery.redelivered,
            properties: std::mem::take(&mut delivery.properties),
            shutdown,
        }
    }

    /// A context for a message that did not come from a broker: for tests of handlers and
    /// codecs. Empty metadata, a shutdown signal that never fires.
    #[must_use]
    pub fn detached(queue: &str) -> Self {
        Context {
            queue: Arc::from(queue),
            delivery_tag: 0,
            exchange: ShortString::from(""),
            routing_key: ShortString::from(queue),
            redelivered: false,
            properties: BasicProperties::default(),
            shutdown: CancellationToken::new(),
        }
    }

    /// Replaces the properties (headers, ids, content type…): for tests.
    #[must_use]
    pub fn with_properties(mut self, properties: BasicProperties) -> Self {
        self.properties = properties;
        self
    }

    /// Marks the message as redelivered: for tests.
    #[must_use]
    pub fn with_redelivered(mut self, redelivered: bool) -> Self {
        self.redelivered = redelivered;
        self
    }

    /// The queue the message was consumed from.
    #[must_use]
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// The delivery tag (unique on the consuming channel; for logs).
    #[must_use]
    pub fn delivery_tag(&self) -> u64 {
        self.delivery_tag
    }

    /// The exchange the message was published to (empty for the default exchange).
    #[must_use]
    pub fn exchange(&self) -> &str {
        self.exchange.as_str()
    }

    /// The routing key the message was published with.
    #[must_use]
    pub fn routing_key(&self) -> &str {
        self.routing_key.as_str()
    }

    /// True when the broker has delivered this message before: a previous attempt failed,
    /// was requeued, or its consumer died before acknowledging it.
    #[must_use]
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// The `message-id` property.
    #[must_use]
    pub fn message_id(&self) -> Option<&str> {
        self.properties
            .message_id()
            .as_ref()
            .map(ShortString::as_str)
    }

    /// The `correlation-id` property.
    #[must_use]
    pub fn correlation_id(&self) -> Option<&str> {
        self.properties
            .correlation_id()
            .as_ref()
            .map(ShortString::as_str)
    }

    /// The `content-type` property.
    #[must_use]
    pub fn content_type(&self) -> Option<&str> {
        self.properties
            .content_type()
            .as_ref()
            .map(ShortString::as_str)
    }

    /// The `reply-to` property.
    #[must_use]
    pub fn reply_to(&self) -> Option<&str> {
        self.properties.reply_to().as_ref().map(ShortString::as_str)
    }

    /// The message headers, if any.
    #[must_use]
    pub fn headers(&self) -> Option<&FieldTable> {
        self.properties.headers().as_ref()
    }

    /// One header's value.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&AMQPValue> {
        self.headers()?.inner().get(name)
    }

    /// All AMQP properties of the message.
    #[must_use]
    pub fn properties(&self) -> &BasicProperties {
        &self.properties
    }

    /// True once the service has started shutting down.
    #[must_use]
    pub fn is_shutting_down(&self) -> bool {
        self.shutdown.is_cancelled()
    }

    /// Completes when the service starts shutting down: `select!` on it in long handlers to
    /// stop early (and return an error, so the message is requeued).
    pub async fn shutdown_requested(&self) {
        self.shutdown.cancelled().await;
    }
}
