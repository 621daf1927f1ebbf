//! What is published: a [`Message`] (where it goes, its body, its properties) and the
//! [`Encode`] trait that turns a value into a body, the mirror of [`Decode`](crate::Decode).

use std::{fmt, time::Duration};

use bytes::Bytes;
use lapin::{
    BasicProperties,
    types::{AMQPValue, ShortString},
};

/// A value that can be a message's body: [`Json<T>`](crate::Json) for any `T: Serialize`
/// (content type `application/json`), [`Bytes`], `Vec<u8>` and `&'static [u8]`
/// (`application/octet-stream`), `String` and `&'static str` (`text/plain`), or your own
/// codec.
///
/// ```
/// use conejo::{Encode, EncodeError, types::Bytes};
///
/// /// Comma-separated values.
/// struct Csv(Vec<String>);
///
/// impl Encode for Csv {
///     fn encode(self) -> Result<Bytes, EncodeError> {
///         Ok(Bytes::from(self.0.join(",")))
///     }
///     fn content_type(&self) -> Option<&'static str> {
///         Some("text/csv")
///     }
/// }
/// ```
pub trait Encode {
    /// The body.
    fn encode(self) -> Result<Bytes, EncodeError>;

    /// The `content-type` property to publish with, unless the message sets one.
    fn content_type(&self) -> Option<&'static str> {
        None
    }
}

impl Encode for Bytes {
    fn encode(self) -> Result<Bytes, EncodeError> {
        Ok(self)
    }
    fn content_type(&self) -> Option<&'static str> {
        Some("application/octet-stream")
    }
}

impl Encode for Vec<u8> {
    fn encode(self) -> Result<Bytes, EncodeError> {
        Ok(Bytes::from(self))
    }
    fn content_type(&self) -> Option<&'static str> {
        Some("application/octet-stream")
    }
}

impl Encode for &'static [u8] {
    fn encode(self) -> Result<Bytes, EncodeError> {
        Ok(Bytes::from_static(self))
    }
    fn content_type(&self) -> Option<&'static str> {
        Some("application/octet-stream")
    }
}

impl Encode for String {
    fn encode(self) -> Result<Bytes, EncodeError> {
        Ok(Bytes::from(self))
    }
    fn content_type(&self) -> Option<&'static str> {
        Some("text/plain")
    }
}

impl Encode for &'static str {
    fn encode(self) -> Result<Bytes, EncodeError> {
        Ok(Bytes::from_static(self.as_bytes()))
    }
    fn content_type(&self) -> Option<&'static str> {
        Some("text/plain")
    }
}

/// A value that could not be encoded (a `Serialize` implementation that failed…).
#[derive(Debug)]
pub struct EncodeError {
    /// What was being encoded into ("json", "protobuf"…).
    format: &'static str,
    /// Why it failed.
    source: Box<dyn std::error::Error + Send + Sync + 'static>,
}

impl EncodeError {
    /// An error encoding into `format`.
    pub fn new(
        format: &'static str,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Self {
        EncodeError {
            format,
            source: source.into(),
        }
    }

    /// The format being encoded into.
    #[must_use]
    pub fn format(&self) -> &'static str {
        self.format
    }
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "cannot encode the body as {}: {}",
            self.format, self.source
        )
    }
}

impl std::error::Error for EncodeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&*self.source)
    }
}

/// A message to publish: the exchange and routing key it goes to, its body, its properties.
///
/// Persistent by default (`delivery-mode` 2: it survives a broker restart in a durable
/// queue), published `mandatory` (a message no queue takes is an error, not a silent drop),
/// and confirmed by the broker before [`Publisher::send`](crate::Publisher::send) returns.
///
/// ```
/// use std::time::Duration;
/// use conejo::{Json, Message};
///
/// #[derive(serde::Serialize)]
/// struct OrderStored { id: u64 }
///
/// let message = Message::new("shop", "order.stored", Json(OrderStored { id: 7 }))
///     .message_id("order-7-stored")
///     .header("x-tenant", "acme")
///     .expiration(Duration::from_secs(3600));
/// assert_eq!(message.routing_key(), "order.stored");
/// ```
#[derive(Clone)]
#[must_use]
pub struct Message {
    /// Where it goes ("" for the default exchange, which routes by queue name).
    pub(crate) exchange: String,
    /// The routing key.
    pub(crate) routing_key: String,
    /// The body, or why it could not be encoded (reported when it is sent).
    pub(crate) body: Result<Bytes, std::sync::Arc<EncodeError>>,
    /// Its AMQP properties.
    pub(crate) properties: BasicProperties,
    /// Returned as an error when no queue takes it.
    pub(crate) mandatory: bool,
}

impl Message {
    /// A message of `body` to `exchange` with `routing_key`: persistent, `mandatory`, with
    /// the body's content type.
    pub fn new(exchange: &str, routing_key: &str, body: impl Encode) -> Self {
        let content_type = body.content_type();
        let mut properties = BasicProperties::default().with_delivery_mode(2);
        if let Some(content_type) = content_type {
            properties = properties.with_content_type(ShortString::from(content_type));
        }
        Message {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            body: body.encode().map_err(std::sync::Arc::new),
            properties,
            mandatory: true,
        }
    }

    /// A message straight to `queue`, through the default exchange.
    pub fn to_queue(queue: &str, body: impl Encode) -> Self {
        Message::new("", queue, body)
    }

    /// The exchange it goes to.
    #[must_use]
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// Its routing key.
    #[must_use]
    pub fn routing_key(&self) -> &str {
        &self.routing_key
    }

    /// Its properties.
    #[must_use]
    pub fn properties(&self) -> &BasicProperties {
        &self.properties
    }

    /// The `message-id` property (what consumers deduplicate on).
    pub fn message_id(mut self, id: impl Into<String>) -> Self {
        self.properties = self
            .properties
            .with_message_id(ShortString::from(id.into()));
        self
    }

    /// The `correlation-id` property.
    pub fn correlation_id(mut self, id: impl Into<String>) -> Self {
        self.properties = self
            .properties
            .with_correlation_id(ShortString::from(id.into()));
        self
    }

    /// The `content-type` property, instead of the body's.
    pub fn content_type(mut self, content_type: &str) -> Self {
        self.properties = self
            .properties
            .with_content_type(ShortString::from(content_type));
        self
    }

    /// The `reply-to` property: where the consumer should send its answer.
    pub fn reply_to(mut self, queue: &str) -> Self {
        self.properties = self.properties.with_reply_to(ShortString::from(queue));
        self
    }

    /// How long the message may wait in a queue before the broker drops (or dead-letters)
    /// it: the `expiration` property, in milliseconds.
    pub fn expiration(mut self, ttl: Duration) -> Self {
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        self.properties = self
            .properties
            .with_expiration(ShortString::from(ms.to_string()));
        self
    }

    /// The `priority` property (0 to 9 on a priority queue).
    pub fn priority(mut self, priority: u8) -> Self {
        self.properties = self.properties.with_priority(priority);
        self
    }

    /// Whether the broker keeps it on disk (default true; `false` is `delivery-mode` 1).
    pub fn persistent(mut self, persistent: bool) -> Self {
        self.properties = self
            .properties
            .with_delivery_mode(if persistent { 2 } else { 1 });
        self
    }

    /// Sets a header (`value`: a string, an integer, a boolean, or any [`AMQPValue`]).
    pub fn header(mut self, name: &str, value: impl Into<HeaderValue>) -> Self {
        let mut headers = self.properties.headers().clone().unwrap_or_default();
        headers.insert(ShortString::from(name), value.into().0);
        self.properties = self.properties.with_headers(headers);
        self
    }

    /// Replaces every property (headers included).
    pub fn with_properties(mut self, properties: BasicProperties) -> Self {
        self.properties = properties;
        self
    }

    /// Whether a message no queue takes is an error (default true). With `false` it is
    /// dropped silently by the broker, and confirmed.
    pub fn mandatory(mut self, mandatory: bool) -> Self {
        self.mandatory = mandatory;
        self
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Message")
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("body", &self.body.as_ref().map(Bytes::len))
            .field("mandatory", &self.mandatory)
            .finish_non_exhaustive()
    }
}

/// A header's value: from a string, an integer, a boolean, or any [`AMQPValue`].
#[derive(Debug, Clone)]
pub struct HeaderValue(pub(crate) AMQPValue);

impl From<&str> for HeaderValue {
    fn from(value: &str) -> Self {
        HeaderValue(AMQPValue::LongString(value.into()))
    }
}

impl From<String> for HeaderValue {
    fn from(value: String) -> Self {
        HeaderValue(AMQPValue::LongString(value.into()))
    }
}

impl From<i64> for HeaderValue {
    fn from(value: i64) -> Self {
        HeaderValue(AMQPValue::LongLongInt(value))
    }
}

impl From<bool> for HeaderValue {
    fn from(value: bool) -> Self {
        HeaderValue(AMQPValue::Boolean(value))
    }
}

impl From<AMQPValue> for HeaderValue {
    fn from(value: AMQPValue) -> Self {
        HeaderValue(value)
    }
}
