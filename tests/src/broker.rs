//! A plain lapin client for setting up and inspecting queues in tests.
//!
//! Why it is ~770 lines: the tests' plain lapin client — one method per broker operation a
//! test needs, each small.

use crate::{amqp_url, unique_name};
use anyhow::{Context, anyhow, bail};
use futures::{StreamExt, TryStreamExt, stream};
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
    QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind,
    ExchangeKind, PublisherConfirm, Queue,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::time::{Duration, Instant};
use tokio::sync::Mutex;

/// How long [`Broker::connect`] waits for the AMQP handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Interval of the `wait_for_*` polls.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// How many `basic.publish` calls [`Broker::publish_many_bytes`] keeps in
/// flight towards lapin's IO loop.
const PUBLISH_WINDOW: usize = 256;

/// [`Broker::drain`] acknowledges (with `multiple`) every this many messages.
const DRAIN_ACK_BATCH: usize = 256;

/// A lazily (re)opened channel: discarded after any error, since a channel
/// error (e.g. a passive declare of a missing queue) closes it broker-side.
#[derive(Debug)]
struct ChannelSlot {
    confirm: bool,
    channel: Mutex<Option<Channel>>,
}

impl ChannelSlot {
    fn new(confirm: bool) -> Self {
        Self {
            confirm,
            channel: Mutex::new(None),
        }
    }

    async fn get(&self, connection: &Connection) -> anyhow::Result<Channel> {
        let mut slot = self.channel.lock().await;
        if let Some(channel) = slot.as_ref()
            && channel.status().connected()
        {
            return Ok(channel.clone());
        }
        let channel = connection
            .create_channel()
            .await
            .context("failed to open a channel")?;
        if self.confirm {
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .context("confirm.select failed")?;
        }
        *slot = Some(channel.clone());
        Ok(channel)
    }

    async fn invalidate(&self, failed: &Channel) {
        let mut slot = self.channel.lock().await;
        if slot.as_ref().is_some_and(|c| c.id() == failed.id()) {
            *slot = None;
        }
    }
}

/// A message taken off a queue by [`Broker::drain`].
#[derive(Clone, Debug, PartialEq)]
pub struct DrainedMessage {
    /// The payload.
    pub body: Vec<u8>,
    /// The broker's `redelivered` flag.
    pub redelivered: bool,
    /// The AMQP headers table, if the message had one (dead-lettered messages
    /// carry `x-death` there).
    pub headers: Option<FieldTable>,
    /// The `message_id` property.
    pub message_id: Option<String>,
    /// The `content_type` property.
    pub content_type: Option<String>,
}

impl DrainedMessage {
    /// Deserializes the body as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> anyhow::Result<T> {
        serde_json::from_slice(&self.body).with_context(|| {
            format!(
                "message {:?} is not the expected JSON: {}",
                self.message_id,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The header `key`, if present.
    pub fn header(&self, key: &str) -> Option<&AMQPValue> {
        self.headers.as_ref()?.inner().get(key)
    }

    /// The header `key` as an integer, if present and of an integer type.
    pub fn header_int(&self, key: &str) -> Option<i64> {
        self.header(key).and_then(amqp_int)
    }

    /// The header `key` as text, if present and a (long or short) string.
    pub fn header_str(&self, key: &str) -> Option<String> {
        self.header(key).and_then(amqp_string)
    }

    /// The entries of the `x-death` header that RabbitMQ adds when
    /// dead-lettering (most recent first); empty if there is none.
    pub fn x_death(&self) -> Vec<XDeath> {
        let Some(AMQPValue::FieldArray(entries)) = self.header("x-death") else {
            return Vec::new();
        };
        entries
            .as_slice()
            .iter()
            .filter_map(|entry| match entry {
                AMQPValue::FieldTable(table) => Some(XDeath::from_table(table)),
                _ => None,
            })
            .collect()
    }
}

/// One entry of RabbitMQ's `x-death` header (see [`DrainedMessage::x_death`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XDeath {
    /// The queue the message was dead-lettered from.
    pub queue: String,
    /// Why: `"rejected"`, `"expired"`, `"maxlen"` or `"delivery_limit"`.
    pub reason: String,
    /// How many times it was dead-lettered from that queue for that reason.
    pub count: i64,
    /// The exchange the message had been published to.
    pub exchange: String,
    /// The routing keys it had been published with.
    pub routing_keys: Vec<String>,
}

impl XDeath {
    fn from_table(table: &FieldTable) -> XDeath {
        let get = |key: &str| table.inner().get(key);
        let text = |key: &str| get(key).and_then(amqp_string).unwrap_or_default();
        XDeath {
            queue: text("queue"),
            reason: text("reason"),
            count: get("count").and_then(amqp_int).unwrap_or_default(),
            exchange: text("exchange"),
            routing_keys: match get("routing-keys") {
                Some(AMQPValue::FieldArray(keys)) => {
                    keys.as_slice().iter().filter_map(amqp_string).collect()
                }
                _ => Vec::new(),
            },
        }
    }
}

fn amqp_string(value: &AMQPValue) -> Option<String> {
    match value {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn amqp_int(value: &AMQPValue) -> Option<i64> {
    Some(match *value {
        AMQPValue::LongLongInt(v) => v,
        AMQPValue::LongInt(v) => i64::from(v),
        AMQPValue::LongUInt(v) => i64::from(v),
        AMQPValue::ShortInt(v) => i64::from(v),
        AMQPValue::ShortUInt(v) => i64::from(v),
        AMQPValue::ShortShortInt(v) => i64::from(v),
        AMQPValue::ShortShortUInt(v) => i64::from(v),
        AMQPValue::Timestamp(v) => i64::try_from(v).ok()?,
        _ => return None,
    })
}

/// A lapin connection to the test broker, made on the caller's (ambient)
/// tokio runtime, with helpers to declare, fill, inspect and clean up queues.
///
/// Publishing goes through one channel in publisher-confirm mode; queue
/// operations go through a second channel that is transparently reopened
/// after an error (e.g. a passive declare of a missing queue), so one failed
/// call does not poison the next. All methods take `&self` and may be called
/// concurrently.
///
/// Dropping the `Broker` closes the connection; [`Broker::close`] does so
/// gracefully and waits for it.
#[derive(Debug)]
pub struct Broker {
    connection: Connection,
    connection_name: String,
    publish: ChannelSlot,
    ops: ChannelSlot,
}

impl Broker {
    /// Connects to [`amqp_url`] with a unique `connection_name`
    /// (`conejo-tests.support.…`). Must be called within a tokio runtime;
    /// fails after 15 s if the broker does not answer.
    pub async fn connect() -> anyhow::Result<Broker> {
        Self::connect_to(&amqp_url()).await
    }

    /// Like [`Broker::connect`], to the broker at `url` (e.g. a
    /// [`PrivateNode::amqp_url`](crate::PrivateNode::amqp_url), or a
    /// [`TcpProxy::url`](crate::TcpProxy::url)).
    pub async fn connect_to(url: &str) -> anyhow::Result<Broker> {
        let connection_name = unique_name("conejo-tests.support");
        let props =
            ConnectionProperties::default().with_connection_name(connection_name.clone().into());
        let connection = tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(url, props))
            .await
            .map_err(|_| anyhow!("timed out after {CONNECT_TIMEOUT:?} connecting to {url}"))?
            .with_context(|| format!("failed to connect to {url}"))?;
        let broker = Broker {
            connection,
            connection_name,
            publish: ChannelSlot::new(true),
            ops: ChannelSlot::new(false),
        };
        // Open the publishing channel eagerly so a broken setup fails here.
        broker.publish.get(&broker.connection).await?;
        Ok(broker)
    }

    /// The underlying lapin connection.
    pub fn connection(&self) -> &Connection {
        &self.connection
    }

    /// The `connection_name` client property of this support connection (so
    /// broker-side listings can tell it apart from the connections under test).
    pub fn connection_name(&self) -> &str {
        &self.connection_name
    }

    /// Opens a new, independent channel on this connection, for tests that
    /// need raw AMQP (e.g. `basic_get` + `basic_reject`). Closed when dropped.
    pub async fn open_channel(&self) -> anyhow::Result<Channel> {
        self.connection
            .create_channel()
            .await
            .context("failed to open a channel")
    }

    /// Runs `op` on the ops channel, discarding the channel if `op` fails.
    /// A failure of `op` keeps its `lapin::Error` (see [`is_not_found`]).
    async fn with_ops<T, F, Fut>(&self, op: F) -> anyhow::Result<T>
    where
        F: FnOnce(Channel) -> Fut,
        Fut: Future<Output = lapin::Result<T>>,
    {
        let channel = self.ops.get(&self.connection).await?;
        match op(channel.clone()).await {
            Ok(value) => Ok(value),
            Err(err) => {
                self.ops.invalidate(&channel).await;
                Err(err.into())
            }
        }
    }

    /// Declares the queue `name`: not durable, not auto-delete, not exclusive,
    /// no arguments. Idempotent for an identical existing queue.
    pub async fn declare_queue(&self, name: &str) -> anyhow::Result<()> {
        self.declare_queue_with_args(name, FieldTable::default())
            .await
    }

    /// Declares the queue `name` (not durable, not auto-delete, not exclusive)
    /// with the given `x-…` arguments.
    pub async fn declare_queue_with_args(
        &self,
        name: &str,
        args: FieldTable,
    ) -> anyhow::Result<()> {
        self.with_ops(|ch| async move {
            ch.queue_declare(name.into(), plain_queue_options(), args)
                .await
        })
        .await
        .with_context(|| format!("failed to declare queue {name:?}"))?;
        Ok(())
    }

    /// Declares the durable queue `name` (not auto-delete, not exclusive)
    /// with the given `x-…` arguments: it survives a broker restart, and so do
    /// the persistent messages (`delivery_mode` 2) in it. Quorum queues
    /// (`x-queue-type = "quorum"`) must be durable.
    pub async fn declare_durable_queue_with_args(
        &self,
        name: &str,
        args: FieldTable,
    ) -> anyhow::Result<()> {
        let options = QueueDeclareOptions {
            durable: true,
            ..plain_queue_options()
        };
        self.with_ops(|ch| async move { ch.queue_declare(name.into(), options, args).await })
            .await
            .with_context(|| format!("failed to declare durable queue {name:?}"))?;
        Ok(())
    }

    /// Declares `<name>.dlq`, then `name` with `x-dead-letter-exchange = ""`
    /// and `x-dead-letter-routing-key = "<name>.dlq"`, so that messages
    /// rejected/nacked without requeue (or expired) from `name` land in the
    /// DLQ. Returns the DLQ's name.
    pub async fn declare_dead_lettered_queue(&self, name: &str) -> anyhow::Result<String> {
        let dlq = format!("{name}.dlq");
        self.declare_queue(&dlq).await?;
        let mut args = FieldTable::default();
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(LongString::from("")),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(LongString::from(dlq.as_str())),
        );
        self.declare_queue_with_args(name, args).await?;
        Ok(dlq)
    }

    /// Publishes `value` as JSON (`content_type: application/json`) to
    /// `queue` through the default exchange, and waits for the broker's
    /// confirm. Returns the generated `message_id`.
    pub async fn publish_json<T: Serialize>(
        &self,
        queue: &str,
        value: &T,
    ) -> anyhow::Result<String> {
        let body = serde_json::to_vec(value).context("failed to serialize the message")?;
        let props = BasicProperties::default().with_content_type("application/json".into());
        self.publish_with_properties(queue, &body, props).await
    }

    /// Publishes raw `body` to `queue` through the default exchange, and waits
    /// for the broker's confirm. Returns the generated `message_id`.
    pub async fn publish_bytes(&self, queue: &str, body: &[u8]) -> anyhow::Result<String> {
        self.publish_with_properties(queue, body, BasicProperties::default())
            .await
    }

    /// Publishes `body` with `properties` to `queue` through the default
    /// exchange (with `mandatory`, so an unroutable message is an error) and
    /// waits for the confirm. A unique `message_id` is added unless
    /// `properties` has one; it is returned. Ok only on a confirmed Ack.
    pub async fn publish_with_properties(
        &self,
        queue: &str,
        body: &[u8],
        properties: BasicProperties,
    ) -> anyhow::Result<String> {
        let message_id = match properties.message_id() {
            Some(id) => id.to_string(),
            None => unique_name("msg"),
        };
        let properties = properties.with_message_id(message_id.as_str().into());
        let channel = self.publish.get(&self.connection).await?;
        let result = async {
            let confirm = channel
                .basic_publish("".into(), queue.into(), mandatory(), body, properties)
                .await?;
            confirm.await
        }
        .await;
        let confirmation = match result {
            Ok(confirmation) => confirmation,
            Err(err) => {
                self.publish.invalidate(&channel).await;
                return Err(anyhow!(err).context(format!("failed to publish to {queue:?}")));
            }
        };
        match confirmation {
            Confirmation::Ack(None) => Ok(message_id),
            Confirmation::Ack(Some(returned)) => bail!(
                "message {message_id} to {queue:?} was returned unroutable ({} {}): does the queue exist?",
                returned.reply_code,
                returned.reply_text
            ),
            Confirmation::Nack(_) => bail!("broker nacked message {message_id} to {queue:?}"),
            Confirmation::NotRequested => {
                bail!("publisher confirms are not enabled on the publishing channel")
            }
        }
    }

    /// Publishes every body to `queue` (default exchange, `mandatory`,
    /// `message_id` = `<batch>.<index>`), keeping many publishes in flight,
    /// then awaits all confirms. Ok only if every message was confirmed with
    /// an Ack and none was returned. Meant for prefilling large queues fast.
    pub async fn publish_many_bytes(
        &self,
        queue: &str,
        bodies: Vec<Vec<u8>>,
    ) -> anyhow::Result<()> {
        self.publish_many(queue, bodies, BasicProperties::default())
            .await
    }

    /// As [`Broker::publish_many_bytes`], persistent (`delivery_mode = 2`): the messages
    /// of a durable queue survive a broker restart.
    pub async fn publish_many_persistent(
        &self,
        queue: &str,
        bodies: Vec<Vec<u8>>,
    ) -> anyhow::Result<()> {
        self.publish_many(
            queue,
            bodies,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
    }

    async fn publish_many(
        &self,
        queue: &str,
        bodies: Vec<Vec<u8>>,
        properties: BasicProperties,
    ) -> anyhow::Result<()> {
        let total = bodies.len();
        let batch = unique_name("bulk");
        let channel = self.publish.get(&self.connection).await?;
        let result = publish_pipelined(&channel, queue, &batch, bodies, &properties).await;
        let confirms = match result {
            Ok(confirms) => confirms,
            Err(err) => {
                self.publish.invalidate(&channel).await;
                return Err(anyhow!(err).context(format!(
                    "failed to publish a batch of {total} messages to {queue:?}"
                )));
            }
        };
        let (mut nacked, mut returned) = (0usize, 0usize);
        for confirm in confirms {
            match confirm.await {
                Ok(Confirmation::Ack(None)) => {}
                Ok(Confirmation::Ack(Some(_))) => returned += 1,
                Ok(Confirmation::Nack(_)) => nacked += 1,
                Ok(Confirmation::NotRequested) => {
                    bail!("publisher confirms are not enabled on the publishing channel")
                }
                Err(err) => {
                    self.publish.invalidate(&channel).await;
                    return Err(anyhow!(err)
                        .context(format!("waiting for the confirms of {total} messages")));
                }
            }
        }
        if nacked > 0 || returned > 0 {
            bail!(
                "batch of {total} messages to {queue:?}: {nacked} nacked, {returned} returned unroutable"
            );
        }
        Ok(())
    }

    async fn declare_passive(&self, queue: &str) -> anyhow::Result<Queue> {
        self.with_ops(|ch| async move {
            ch.queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
        })
        .await
        .with_context(|| format!("passive declare of queue {queue:?} failed"))
    }

    /// The number of messages ready for delivery in `queue` (not counting
    /// unacknowledged ones), from a passive `queue.declare`.
    pub async fn message_count(&self, queue: &str) -> anyhow::Result<u32> {
        Ok(self.declare_passive(queue).await?.message_count())
    }

    /// The number of consumers on `queue`, from a passive `queue.declare`.
    pub async fn consumer_count(&self, queue: &str) -> anyhow::Result<u32> {
        Ok(self.declare_passive(queue).await?.consumer_count())
    }

    /// Polls [`Broker::message_count`] every 50 ms until it equals `expected`;
    /// errors after `timeout` with the last count (or error) seen.
    pub async fn wait_for_count(
        &self,
        queue: &str,
        expected: u32,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        self.wait_until(queue, "ready messages", expected, timeout, |q| {
            self.message_count(q)
        })
        .await
    }

    /// Polls [`Broker::consumer_count`] every 50 ms until it equals `expected`;
    /// errors after `timeout` with the last count (or error) seen.
    pub async fn wait_for_consumer_count(
        &self,
        queue: &str,
        expected: u32,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        self.wait_until(queue, "consumers", expected, timeout, |q| {
            self.consumer_count(q)
        })
        .await
    }

    async fn wait_until<'a, F, Fut>(
        &self,
        queue: &'a str,
        what: &str,
        expected: u32,
        timeout: Duration,
        mut count: F,
    ) -> anyhow::Result<()>
    where
        F: FnMut(&'a str) -> Fut,
        Fut: Future<Output = anyhow::Result<u32>>,
    {
        let start = Instant::now();
        let deadline = start + timeout;
        let mut ticker = tokio::time::interval(POLL_INTERVAL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let last = match count(queue).await {
                Ok(n) if n == expected => return Ok(()),
                Ok(n) => format!("last seen {n}"),
                Err(err) => format!("last poll failed: {err:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "queue {queue:?}: expected {expected} {what} within {timeout:?}, {last} (after {:?})",
                    start.elapsed()
                );
            }
        }
    }

    /// Takes every ready message off `queue` with `basic.get` (acknowledging
    /// them) until it reports empty, on a dedicated channel that is closed
    /// before returning (so the acks have reached the broker). Competes with
    /// any active consumer of the queue.
    pub async fn drain(&self, queue: &str) -> anyhow::Result<Vec<DrainedMessage>> {
        let channel = self.open_channel().await?;
        let mut drained = Vec::new();
        let mut unacked = 0usize;
        let mut last_tag = None;
        loop {
            let got = channel
                .basic_get(queue.into(), BasicGetOptions { no_ack: false })
                .await
                .with_context(|| format!("basic.get on {queue:?} failed"))?;
            let Some(message) = got else { break };
            let delivery = message.delivery;
            let props = &delivery.properties;
            drained.push(DrainedMessage {
                redelivered: delivery.redelivered,
                headers: props.headers().clone(),
                message_id: props.message_id().as_ref().map(ToString::to_string),
                content_type: props.content_type().as_ref().map(ToString::to_string),
                body: delivery.data.clone(),
            });
            unacked += 1;
            last_tag = Some(delivery);
            if unacked >= DRAIN_ACK_BATCH
                && let Some(delivery) = last_tag.take()
            {
                ack_up_to(&delivery).await?;
                unacked = 0;
            }
        }
        if let Some(delivery) = last_tag.take() {
            ack_up_to(&delivery).await?;
        }
        channel
            .close(200, "drained".into())
            .await
            .context("failed to close the drain channel")?;
        Ok(drained)
    }

    /// Removes every ready message from `queue`; returns how many there were.
    pub async fn purge(&self, queue: &str) -> anyhow::Result<u32> {
        self.with_ops(|ch| async move {
            ch.queue_purge(queue.into(), QueuePurgeOptions::default())
                .await
        })
        .await
        .with_context(|| format!("failed to purge queue {queue:?}"))
    }

    /// Deletes the queue `name` (whatever its consumers and messages); a
    /// queue that does not exist is not an error.
    pub async fn delete_queue(&self, name: &str) -> anyhow::Result<()> {
        let result = self
            .with_ops(|ch| async move {
                ch.queue_delete(name.into(), QueueDeleteOptions::default())
                    .await
            })
            .await;
        match result {
            Ok(_) => Ok(()),
            Err(err) if is_not_found(&err) => Ok(()),
            Err(err) => Err(err.context(format!("failed to delete queue {name:?}"))),
        }
    }

    /// Deletes every queue in `names`, ignoring missing ones; reports the first
    /// failure after trying them all.
    pub async fn delete_queues<S: AsRef<str>>(&self, names: &[S]) -> anyhow::Result<()> {
        let mut first_err = None;
        for name in names {
            if let Err(err) = self.delete_queue(name.as_ref()).await {
                first_err.get_or_insert(err);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Deletes the exchange `name`; a missing one is not an error.
    pub async fn delete_exchange(&self, name: &str) -> anyhow::Result<()> {
        let result = self
            .with_ops(|ch| async move {
                ch.exchange_delete(name.into(), ExchangeDeleteOptions::default())
                    .await
            })
            .await;
        match result {
            Ok(()) => Ok(()),
            Err(err) if is_not_found(&err) => Ok(()),
            Err(err) => Err(err.context(format!("failed to delete exchange {name:?}"))),
        }
    }

    /// Declares the exchange `name` of `kind` (not durable).
    pub async fn declare_exchange(&self, name: &str, kind: ExchangeKind) -> anyhow::Result<()> {
        self.with_ops(|ch| async move {
            ch.exchange_declare(
                name.into(),
                kind,
                ExchangeDeclareOptions::default(),
                FieldTable::default(),
            )
            .await
        })
        .await
        .with_context(|| format!("failed to declare exchange {name:?}"))
    }

    /// Deletes `queue` and everything conejo declares for it: its dead-letter queue
    /// `<queue>.dlq` and exchange `<queue>.dlx`, and its wait queues `<queue>.retry.*`
    /// (found through `rabbitmqctl list_queues`).
    pub async fn delete_consumed_queue(&self, queue: &str) -> anyhow::Result<()> {
        self.delete_consumed_queues(&[queue]).await
    }

    /// [`Broker::delete_consumed_queue`] for each of `queues`, listing the broker's queues
    /// once; reports the first failure after trying them all.
    pub async fn delete_consumed_queues<S: AsRef<str>>(&self, queues: &[S]) -> anyhow::Result<()> {
        let existing = crate::rabbitmqctl_queue_names().await?;
        let mut first_err = None;
        for queue in queues {
            let queue = queue.as_ref();
            let prefix = format!("{queue}.retry.");
            let mut names: Vec<&str> = existing
                .iter()
                .map(String::as_str)
                .filter(|name| name.starts_with(&prefix))
                .collect();
            let dlq = format!("{queue}.dlq");
            names.push(queue);
            names.push(&dlq);
            let deleted = match self.delete_queues(&names).await {
                Ok(()) => self.delete_exchange(&format!("{queue}.dlx")).await,
                Err(err) => Err(err),
            };
            if let Err(err) = deleted {
                first_err.get_or_insert(err);
            }
        }
        first_err.map_or(Ok(()), Err)
    }

    /// Closes the connection gracefully (200 OK) and waits for the broker's
    /// close-ok.
    pub async fn close(self) -> anyhow::Result<()> {
        self.connection
            .close(200, "OK".into())
            .await
            .context("failed to close the support connection")
    }
}

fn plain_queue_options() -> QueueDeclareOptions {
    QueueDeclareOptions {
        passive: false,
        durable: false,
        exclusive: false,
        auto_delete: false,
        nowait: false,
    }
}

fn mandatory() -> BasicPublishOptions {
    BasicPublishOptions {
        mandatory: true,
        immediate: false,
    }
}

/// Whether `err` is the broker's 404 NOT_FOUND channel error.
fn is_not_found(err: &anyhow::Error) -> bool {
    err.downcast_ref::<lapin::Error>()
        .is_some_and(|e| matches!(e.kind(), ErrorKind::ProtocolError(e) if e.get_id() == 404))
}

async fn ack_up_to(delivery: &lapin::message::Delivery) -> anyhow::Result<()> {
    delivery
        .acker
        .ack(BasicAckOptions { multiple: true })
        .await
        .context("basic.ack failed")?;
    Ok(())
}

async fn publish_pipelined(
    channel: &Channel,
    queue: &str,
    batch: &str,
    bodies: Vec<Vec<u8>>,
    properties: &BasicProperties,
) -> lapin::Result<Vec<PublisherConfirm>> {
    stream::iter(bodies.into_iter().enumerate())
        .map(|(i, body)| async move {
            let props = properties
                .clone()
                .with_message_id(format!("{batch}.{i}").into());
            channel
                .basic_publish("".into(), queue.into(), mandatory(), &body, props)
                .await
        })
        .buffered(PUBLISH_WINDOW)
        .try_collect()
        .await
}
