//! A message as a test reads it back from a queue.

use std::fmt;

use bytes::Bytes;
use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable},
};
use serde::de::DeserializeOwned;

use crate::{broker::Incoming, headers};

/// A message taken from a queue by the harness (or delivered to a [`TestConsumer`]): its
/// body, route, properties and headers — conejo's dead-letter headers and RabbitMQ's
/// `x-death` read out.
///
/// [`TestConsumer`]: super::TestConsumer
#[derive(Clone)]
pub struct TestMessage {
    exchange: String,
    routing_key: String,
    redelivered: bool,
    properties: BasicProperties,
    body: Bytes,
}

/// One entry of RabbitMQ's `x-death` header: a queue the message died in, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Death {
    /// The queue it was dead-lettered from.
    pub queue: String,
    /// `rejected`, `expired`, `maxlen` or `delivery_limit`.
    pub reason: String,
    /// How often it died there for that reason.
    pub count: i64,
    /// The exchange it had been published to.
    pub exchange: String,
    /// Its routing keys.
    pub routing_keys: Vec<String>,
}

impl TestMessage {
    pub(crate) fn from_incoming(incoming: Incoming) -> Self {
        TestMessage {
            exchange: incoming.exchange.to_string(),
            routing_key: incoming.routing_key.to_string(),
            redelivered: incoming.redelivered,
            properties: incoming.properties,
            body: Bytes::from(incoming.data),
        }
    }

    /// The body.
    #[must_use]
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// The body as UTF-8 text (lossy).
    #[must_use]
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body decoded from JSON.
    ///
    /// # Errors
    /// When it is not JSON of that shape.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }

    /// The exchange it was published to (`""` for the default exchange).
    #[must_use]
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// Its routing key.
    #[must_use]
    pub fn routing_key(&self) -> &str {
        &self.routing_key
    }

    /// Whether the broker delivered it before without a settlement.
    #[must_use]
    pub fn redelivered(&self) -> bool {
        self.redelivered
    }

    /// Its AMQP properties.
    #[must_use]
    pub fn properties(&self) -> &BasicProperties {
        &self.properties
    }

    /// Its `message_id` property.
    #[must_use]
    pub fn message_id(&self) -> Option<&str> {
        self.properties.message_id().as_ref().map(|s| s.as_str())
    }

    /// Its `correlation_id` property.
    #[must_use]
    pub fn correlation_id(&self) -> Option<&str> {
        self.properties
            .correlation_id()
            .as_ref()
            .map(|s| s.as_str())
    }

    /// Its `content_type` property.
    #[must_use]
    pub fn content_type(&self) -> Option<&str> {
        self.properties.content_type().as_ref().map(|s| s.as_str())
    }

    /// Its headers.
    #[must_use]
    pub fn headers(&self) -> Option<&FieldTable> {
        self.properties.headers().as_ref()
    }

    /// One header.
    #[must_use]
    pub fn header(&self, name: &str) -> Option<&AMQPValue> {
        self.headers().and_then(|h| h.inner().get(name))
    }

    /// A text header (`None` if missing or not text).
    #[must_use]
    pub fn header_str(&self, name: &str) -> Option<&str> {
        headers::text(self.headers(), name)
    }

    /// An integer header (`None` if missing or not an integer).
    #[must_use]
    pub fn header_int(&self, name: &str) -> Option<i64> {
        headers::int(self.headers(), name)
    }

    /// Why conejo dead-lettered it (`conejo-reason`: `rejected`, `attempts-exhausted`,
    /// `poison`).
    #[must_use]
    pub fn dead_letter_reason(&self) -> Option<&str> {
        self.header_str(headers::REASON)
    }

    /// The kind of failure that dead-lettered it (`conejo-failure`: `handler`, `decode`,
    /// `panic`, `timeout`, `publish`).
    #[must_use]
    pub fn failure(&self) -> Option<&str> {
        self.header_str(headers::FAILURE)
    }

    /// The failure's message (`conejo-error`).
    #[must_use]
    pub fn error(&self) -> Option<&str> {
        self.header_str(headers::ERROR)
    }

    /// The attempt conejo's headers carry (`conejo-attempt`): the next attempt's number on a
    /// retry copy, the last attempt's on a dead letter; 1 without the header.
    #[must_use]
    pub fn attempt(&self) -> u32 {
        headers::attempt(self.headers())
    }

    /// RabbitMQ's `x-death` entries, most recent first.
    #[must_use]
    pub fn deaths(&self) -> Vec<Death> {
        let Some(AMQPValue::FieldArray(entries)) = self.header("x-death") else {
            return Vec::new();
        };
        entries
            .as_slice()
            .iter()
            .filter_map(|entry| match entry {
                AMQPValue::FieldTable(table) => Some(death(table)),
                _ => None,
            })
            .collect()
    }
}

fn death(table: &FieldTable) -> Death {
    let text = |name: &str| {
        headers::text(Some(table), name)
            .unwrap_or_default()
            .to_owned()
    };
    let routing_keys = match table.inner().get("routing-keys") {
        Some(AMQPValue::FieldArray(keys)) => keys
            .as_slice()
            .iter()
            .filter_map(|key| match key {
                AMQPValue::LongString(s) => {
                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                }
                AMQPValue::ShortString(s) => Some(s.to_string()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    Death {
        queue: text("queue"),
        reason: text("reason"),
        count: headers::int(Some(table), "count").unwrap_or(0),
        exchange: text("exchange"),
        routing_keys,
    }
}

impl fmt::Debug for TestMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestMessage")
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .field("redelivered", &self.redelivered)
            .field("body", &String::from_utf8_lossy(&self.body))
            .field("headers", &self.headers())
            .finish_non_exhaustive()
    }
}
