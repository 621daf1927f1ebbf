//! What a test does through the harness's connection: declare, bind, publish with
//! confirms, take messages, count, delete.

use std::time::Duration;

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

use super::{TestBroker, TestError, TestMessage};
use crate::{
    Exchange, HeaderValue, Message,
    broker::{Confirmed, QueueOptions},
    publish::Encode,
};

/// A queue for the harness to declare: durable and classic unless said otherwise, with the
/// arguments RabbitMQ reads (TTL, dead-lettering, queue type, delivery limit, length).
///
/// ```
/// use std::time::Duration;
/// use conejo::testing::TestQueue;
///
/// let wait = TestQueue::new("orders.wait")
///     .message_ttl(Duration::from_secs(5))
///     .dead_letter_exchange("")
///     .dead_letter_routing_key("orders");
/// # let _ = wait;
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct TestQueue {
    name: String,
    options: QueueOptions,
    arguments: FieldTable,
}

impl TestQueue {
    /// A durable classic queue named `name`.
    pub fn new(name: impl Into<String>) -> Self {
        TestQueue {
            name: name.into(),
            options: QueueOptions {
                durable: true,
                ..QueueOptions::default()
            },
            arguments: FieldTable::default(),
        }
    }

    /// Its name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Not durable.
    pub fn transient(mut self) -> Self {
        self.options.durable = false;
        self
    }

    /// Used by the harness's connection only, deleted with it.
    pub fn exclusive(mut self) -> Self {
        self.options.exclusive = true;
        self
    }

    /// Deleted when its last consumer goes.
    pub fn auto_delete(mut self) -> Self {
        self.options.auto_delete = true;
        self
    }

    /// A quorum queue (`x-queue-type: quorum`): delivery counts and limits.
    pub fn quorum(self) -> Self {
        self.argument("x-queue-type", "quorum")
    }

    /// Messages expire after `ttl` in it (`x-message-ttl`).
    pub fn message_ttl(self, ttl: Duration) -> Self {
        let ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        self.argument("x-message-ttl", AMQPValue::LongLongInt(ms))
    }

    /// Rejected and expired messages go to `exchange` (`x-dead-letter-exchange`; `""` is
    /// the default exchange).
    pub fn dead_letter_exchange(self, exchange: &str) -> Self {
        self.argument("x-dead-letter-exchange", exchange)
    }

    /// …with this routing key instead of their own (`x-dead-letter-routing-key`).
    pub fn dead_letter_routing_key(self, key: &str) -> Self {
        self.argument("x-dead-letter-routing-key", key)
    }

    /// A quorum queue's delivery limit (`x-delivery-limit`).
    pub fn delivery_limit(self, limit: u32) -> Self {
        self.argument("x-delivery-limit", AMQPValue::LongLongInt(limit.into()))
    }

    /// Any other argument.
    pub fn argument(mut self, name: &str, value: impl Into<HeaderValue>) -> Self {
        self.arguments
            .insert(ShortString::from(name), value.into().0);
        self
    }
}

/// How the broker answered a message the harness published: check it (a returned message
/// reached no queue), or use [`TestBroker::send`], which makes a return an error.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
#[must_use = "a message the broker returned reached no queue"]
pub enum Published {
    /// Confirmed: routed to at least one queue (or, not `mandatory`, dropped).
    Accepted,
    /// `mandatory` and routed to no queue: returned, then confirmed.
    Returned {
        /// The broker's reply code (312 NO_ROUTE).
        code: u16,
        /// The broker's reply text.
        text: String,
    },
}

/// What a queue declaration answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Declared {
    /// Messages ready in the queue.
    pub messages: u32,
    /// Consumers on it.
    pub consumers: u32,
}

impl TestBroker {
    /// Declares `exchange` (as a service's [`Builder::exchange`](crate::Builder::exchange)
    /// does).
    ///
    /// # Errors
    /// 406 when it exists with other settings; 404 for a passive one that does not exist.
    pub async fn declare_exchange(&self, exchange: &Exchange) -> Result<(), TestError> {
        let what = format!("declare exchange '{}'", exchange.name());
        let declared = exchange.clone();
        let result = self
            .client()
            .await?
            .on_control(what, |channel| async move {
                channel
                    .declare_exchange(
                        declared.name(),
                        declared.kind.clone(),
                        declared.options(),
                        declared.arguments.clone(),
                    )
                    .await
            })
            .await;
        // For cleanup: unless nothing was created (a passive check, a refusal — of a
        // reserved `amq.` name, which cleanup could not delete either).
        if !exchange.options().passive && !is_refusal(&result) {
            self.created_exchange(exchange.name());
        }
        result
    }

    /// Declares `queue`.
    ///
    /// # Errors
    /// 406 PRECONDITION_FAILED when it exists with other arguments.
    pub async fn declare_queue(&self, queue: &TestQueue) -> Result<Declared, TestError> {
        let what = format!("declare queue '{}'", queue.name);
        let result = self
            .client()
            .await?
            .on_control(what, |channel| async move {
                channel
                    .declare_queue(&queue.name, queue.options, queue.arguments.clone())
                    .await
            })
            .await;
        // For cleanup, unless refused: then nothing was created.
        if !is_refusal(&result) {
            self.created_queue(&queue.name);
        }
        let state = result?;
        Ok(Declared {
            messages: state.messages,
            consumers: state.consumers,
        })
    }

    /// How many messages are ready in `queue` (a passive declaration).
    ///
    /// # Errors
    /// 404 NOT_FOUND when it does not exist.
    pub async fn ready(&self, queue: &str) -> Result<u32, TestError> {
        self.passive(queue).await.map(|d| d.messages)
    }

    /// A passive declaration of `queue`: its ready messages and consumers.
    ///
    /// # Errors
    /// 404 NOT_FOUND when it does not exist.
    pub async fn passive(&self, queue: &str) -> Result<Declared, TestError> {
        let what = format!("check queue '{queue}'");
        let state = self
            .client()
            .await?
            .on_control(what, |channel| async move {
                let options = QueueOptions {
                    passive: true,
                    ..QueueOptions::default()
                };
                channel
                    .declare_queue(queue, options, FieldTable::default())
                    .await
            })
            .await?;
        Ok(Declared {
            messages: state.messages,
            consumers: state.consumers,
        })
    }

    /// Binds `queue` to `exchange` with `routing_key`.
    ///
    /// # Errors
    /// 404 when either does not exist.
    pub async fn bind(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
    ) -> Result<(), TestError> {
        self.bind_with(queue, exchange, routing_key, FieldTable::default())
            .await
    }

    /// Binds with arguments (a headers exchange's `x-match` and headers).
    ///
    /// # Errors
    /// 404 when either does not exist.
    pub async fn bind_with(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), TestError> {
        let what = format!("bind queue '{queue}' to '{exchange}' with '{routing_key}'");
        self.client()
            .await?
            .on_control(what, |channel| async move {
                channel
                    .bind_queue(queue, exchange, routing_key, arguments)
                    .await
            })
            .await
    }

    /// Publishes `message` with a confirm, as a producer would.
    ///
    /// # Errors
    /// 404 for a missing exchange; [`TestError::Nacked`]; a body that did not encode.
    pub async fn publish(&self, message: Message) -> Result<Published, TestError> {
        let what = format!(
            "publish to '{}' with '{}'",
            message.exchange, message.routing_key
        );
        let body = message.body.map_err(TestError::Encode)?;
        let confirmed = self
            .client()
            .await?
            .on_control(what.clone(), |channel| async move {
                channel
                    .publish(
                        &message.exchange,
                        &message.routing_key,
                        message.mandatory,
                        &body,
                        message.properties,
                    )
                    .await?
                    .await
            })
            .await?;
        match confirmed {
            Confirmed::Ack | Confirmed::NotRequested => Ok(Published::Accepted),
            Confirmed::Returned { code, text } => Ok(Published::Returned { code, text }),
            Confirmed::Nack => Err(TestError::Nacked { operation: what }),
        }
    }

    /// Publishes `body` straight to `queue` (the default exchange), confirmed.
    ///
    /// # Errors
    /// When the queue does not exist (the message is returned), or as
    /// [`publish`](Self::publish).
    pub async fn send(&self, queue: &str, body: impl Encode) -> Result<(), TestError> {
        match self.publish(Message::to_queue(queue, body)).await? {
            Published::Accepted => Ok(()),
            Published::Returned { code, text } => Err(TestError::Refused {
                operation: format!("send to queue '{queue}'"),
                code,
                text,
            }),
        }
    }

    /// Takes the next ready message of `queue` (`basic.get`, acknowledged), if any.
    ///
    /// # Errors
    /// 404 when the queue does not exist.
    pub async fn get(&self, queue: &str) -> Result<Option<TestMessage>, TestError> {
        let what = format!("get from '{queue}'");
        self.client()
            .await?
            .on_control(what, |channel| async move {
                let Some(got) = channel.get(queue).await? else {
                    return Ok(None);
                };
                channel.ack(got.message.delivery_tag, false).await?;
                Ok(Some(TestMessage::from_incoming(got.message)))
            })
            .await
    }

    /// Takes every ready message of `queue`, in order.
    ///
    /// # Errors
    /// 404 when the queue does not exist.
    pub async fn take(&self, queue: &str) -> Result<Vec<TestMessage>, TestError> {
        let mut taken = Vec::new();
        while let Some(message) = self.get(queue).await? {
            taken.push(message);
        }
        Ok(taken)
    }

    /// Deletes `queue` (its consumers are cancelled by the broker); a missing one is no
    /// error.
    ///
    /// # Errors
    /// When the broker refuses.
    pub async fn delete_queue(&self, queue: &str) -> Result<(), TestError> {
        let what = format!("delete queue '{queue}'");
        self.client()
            .await?
            .on_control(
                what,
                |channel| async move { channel.delete_queue(queue).await },
            )
            .await
    }

    /// Deletes `exchange`; a missing one is no error.
    ///
    /// # Errors
    /// When the broker refuses.
    pub async fn delete_exchange(&self, exchange: &str) -> Result<(), TestError> {
        let what = format!("delete exchange '{exchange}'");
        self.client()
            .await?
            .on_control(what, |channel| async move {
                channel.delete_exchange(exchange).await
            })
            .await
    }
}

/// True when the broker refused the operation (nothing was created).
fn is_refusal<T>(result: &Result<T, TestError>) -> bool {
    matches!(result, Err(TestError::Refused { .. }))
}

/// A headers-exchange binding's arguments: `x-match` (`all` or `any`) and the headers.
#[must_use]
pub fn header_binding<'a>(
    match_all: bool,
    headers: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> FieldTable {
    let mut table = FieldTable::default();
    table.insert(
        ShortString::from("x-match"),
        AMQPValue::LongString(LongString::from(if match_all { "all" } else { "any" })),
    );
    for (name, value) in headers {
        table.insert(
            ShortString::from(name),
            AMQPValue::LongString(LongString::from(value)),
        );
    }
    table
}
