//! The in-memory broker's state and its rules: what RabbitMQ does with exchanges, queues,
//! consumers, acknowledgements, expiry and dead-lettering, and what it refuses.
//!
//! Everything happens under one lock, synchronously: an operation changes the state, then
//! [`State::deliver`] pushes what the change made deliverable to the consumers' streams.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use lapin::{
    BasicProperties, ExchangeKind,
    types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString},
};
use tokio::{
    sync::{mpsc, oneshot},
    time::Instant,
};

use super::route;
use crate::broker::{
    BrokerError, CONSISTENT_HASH, Confirmed, ConsumeOptions, Event, ExchangeOptions, Incoming,
    QueueOptions, QueueState,
};

pub(super) type ConnId = u64;
pub(super) type ChanId = u64;

/// A message as the broker holds it.
#[derive(Debug, Clone)]
pub(super) struct Message {
    /// The exchange it was published to.
    pub(super) exchange: ShortString,
    /// Its routing key.
    pub(super) routing_key: ShortString,
    /// Its properties and headers.
    pub(super) properties: BasicProperties,
    /// Its body.
    pub(super) body: Bytes,
    /// Delivered before without being settled.
    pub(super) redelivered: bool,
    /// Deliveries without a settlement so far (a quorum queue's `x-delivery-count`).
    pub(super) returns: u32,
    /// When it expires in its queue (`x-message-ttl`, or the message's `expiration`).
    pub(super) expires: Option<Instant>,
    /// Its place in its queue, in the order messages came in: a classic queue gives a
    /// message back to that place.
    pub(super) seq: u64,
}

/// Why a message is dead-lettered, as RabbitMQ writes it in `x-death`.
#[derive(Debug, Clone, Copy)]
pub(super) enum DeathReason {
    Rejected,
    Expired,
    DeliveryLimit,
    MaxLength,
}

impl DeathReason {
    fn as_str(self) -> &'static str {
        match self {
            DeathReason::Rejected => "rejected",
            DeathReason::Expired => "expired",
            DeathReason::DeliveryLimit => "delivery_limit",
            DeathReason::MaxLength => "maxlen",
        }
    }
}

/// An exchange and its bindings.
#[derive(Debug)]
pub(super) struct Exchange {
    pub(super) kind: ExchangeKind,
    pub(super) options: ExchangeOptions,
    pub(super) arguments: FieldTable,
    /// (queue, routing key, arguments).
    pub(super) bindings: Vec<(String, String, FieldTable)>,
}

/// A queue.
#[derive(Debug)]
pub(super) struct Queue {
    pub(super) options: QueueOptions,
    pub(super) arguments: FieldTable,
    /// Messages ready, in order.
    pub(super) ready: VecDeque<Message>,
    /// Its consumers, in the order they are served (round robin).
    pub(super) consumers: VecDeque<ConsumerKey>,
    /// The connection that declared it, if exclusive.
    pub(super) owner: Option<ConnId>,
    /// Messages delivered and not yet settled.
    pub(super) unacked: usize,
    /// Messages ever published to it (for tests' counts); also the next message's
    /// position.
    pub(super) published: u64,
    /// The place the next message takes ([`Message::seq`]).
    pub(super) next_seq: u64,
    /// A quorum queue's returns queue: how many of the messages at the front of `ready`
    /// came back from a consumer that went (or, with a delivery limit, were given back);
    /// they are served first, in the order they came back.
    pub(super) returned: usize,
}

impl Queue {
    fn argument(&self, name: &str) -> Option<&AMQPValue> {
        self.arguments.inner().get(name)
    }

    fn text_argument(&self, name: &str) -> Option<String> {
        match self.argument(name)? {
            AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            AMQPValue::ShortString(s) => Some(s.to_string()),
            _ => None,
        }
    }

    fn int_argument(&self, name: &str) -> Option<i64> {
        int(self.argument(name)?)
    }

    pub(super) fn is_quorum(&self) -> bool {
        self.text_argument("x-queue-type").as_deref() == Some("quorum")
    }

    /// A stream queue: consumed here as a classic one (destructively), its deliveries
    /// numbered by `x-stream-offset` in the order messages came in.
    fn is_stream(&self) -> bool {
        self.text_argument("x-queue-type").as_deref() == Some("stream")
    }

    fn ttl(&self) -> Option<Duration> {
        self.int_argument("x-message-ttl")
            .and_then(|ms| u64::try_from(ms).ok())
            .map(Duration::from_millis)
    }

    /// (exchange, routing key) dead letters go to, if the queue has a dead-letter exchange.
    fn dead_letter_target(&self) -> Option<(String, Option<String>)> {
        let exchange = self.text_argument("x-dead-letter-exchange")?;
        Some((exchange, self.text_argument("x-dead-letter-routing-key")))
    }

    fn delivery_limit(&self) -> Option<u32> {
        if !self.is_quorum() {
            return None;
        }
        self.int_argument("x-delivery-limit")
            .and_then(|n| u32::try_from(n).ok())
    }

    /// What it does at its `x-max-length` or `x-max-length-bytes` (`x-overflow`).
    fn overflow(&self) -> Overflow {
        match self.text_argument("x-overflow").as_deref() {
            Some("reject-publish") => Overflow::RejectPublish,
            Some("reject-publish-dlx") => Overflow::RejectPublishDeadLetter,
            _ => Overflow::DropHead,
        }
    }

    /// Its limits: ready messages (`x-max-length`) and their bodies' bytes
    /// (`x-max-length-bytes`). What is delivered and unacked does not count.
    fn limits(&self) -> (Option<usize>, Option<usize>) {
        let limit = |name| {
            self.int_argument(name)
                .and_then(|n| usize::try_from(n).ok())
        };
        (limit("x-max-length"), limit("x-max-length-bytes"))
    }

    /// Takes its next ready message (from its returns first).
    fn pop_ready(&mut self) -> Option<Message> {
        let message = self.ready.pop_front()?;
        self.returned = self.returned.saturating_sub(1);
        Some(message)
    }

    fn ready_bytes(&self) -> usize {
        self.ready.iter().map(|m| m.body.len()).sum()
    }

    /// True when one more message of `size` bytes would take it past a limit.
    fn would_overflow(&self, size: usize) -> bool {
        let (length, bytes) = self.limits();
        length.is_some_and(|max| self.ready.len() + 1 > max)
            || bytes.is_some_and(|max| self.ready_bytes() + size > max)
    }

    /// True while it holds more than its limits.
    fn over_limit(&self) -> bool {
        let (length, bytes) = self.limits();
        length.is_some_and(|max| self.ready.len() > max)
            || bytes.is_some_and(|max| self.ready_bytes() > max)
    }
}

/// What a queue at its maximum length does (`x-overflow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Overflow {
    /// Drops (dead-letters) its oldest ready messages: the default.
    DropHead,
    /// Refuses the new message: its publisher's confirm is a nack.
    RejectPublish,
    /// …and dead-letters it.
    RejectPublishDeadLetter,
}

/// Where a published message went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Routed {
    /// A queue took it.
    pub(super) queued: bool,
    /// A queue at its maximum length refused it (`x-overflow: reject-publish`): the
    /// confirm is a nack.
    pub(super) rejected: bool,
}

/// A consumer, by channel and tag.
pub(super) type ConsumerKey = (ChanId, String);

/// A consumer: where its deliveries go.
#[derive(Debug)]
pub(super) struct Consumer {
    pub(super) queue: String,
    pub(super) sender: mpsc::UnboundedSender<Result<Incoming, BrokerError>>,
    /// Unsettled deliveries to this consumer.
    pub(super) unacked: usize,
    pub(super) options: ConsumeOptions,
}

/// A delivery on a channel, not yet settled.
#[derive(Debug)]
pub(super) struct Unacked {
    pub(super) queue: String,
    pub(super) message: Message,
    /// The consumer it went to (`None` for a `basic.get`).
    pub(super) consumer: Option<String>,
}

/// A channel.
#[derive(Debug, Default)]
pub(super) struct Channel {
    pub(super) connection: ConnId,
    pub(super) open: bool,
    /// `basic.qos` prefetch per consumer; 0 is unlimited.
    pub(super) prefetch: u16,
    pub(super) confirm: bool,
    pub(super) next_tag: u64,
    pub(super) unacked: BTreeMap<u64, Unacked>,
    pub(super) consumers: HashMap<String, Consumer>,
    /// The channel's direct reply-to consumer (`amq.rabbitmq.reply-to`): its tag and stream.
    pub(super) reply: Option<(String, mpsc::UnboundedSender<Result<Incoming, BrokerError>>)>,
}

/// The pseudo-queue of RabbitMQ's direct reply-to.
pub(super) const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// A connection.
#[derive(Debug)]
pub(super) struct Connection {
    pub(super) name: String,
    pub(super) open: bool,
    pub(super) channels: HashSet<ChanId>,
    /// Listeners of its events.
    pub(super) events: Vec<mpsc::UnboundedSender<Event>>,
    /// Set while the broker blocks it (a resource alarm): its publishes wait.
    pub(super) blocked: Option<String>,
    /// Why it was closed, once it is.
    pub(super) closed_because: Option<BrokerError>,
    /// The test harness's own connection: faults pass it by.
    pub(super) exempt: bool,
    /// The heartbeat interval (none if disabled): a stalled connection is lost after two.
    pub(super) heartbeat: Option<Duration>,
}

/// Faults to inject, armed by tests. Each counts down and disarms itself.
#[derive(Debug, Default)]
pub(super) struct Faults {
    /// Connection attempts to refuse, with the error to refuse them with.
    pub(super) refuse_connections: Option<(u32, BrokerError)>,
    /// Publishes to nack (confirm mode) before confirming again.
    pub(super) nack_publishes: u32,
    /// Publishes to return as unroutable (312 NO_ROUTE), routed to no queue.
    pub(super) return_publishes: u32,
    /// Publishes whose confirm is withheld (the message is routed) until released.
    pub(super) withhold_confirms: u32,
    /// Deliveries before the connection that receives the last of them is dropped.
    pub(super) drop_after_deliveries: Option<u32>,
    /// Publishes before the connection that sends the last of them is dropped, the message
    /// routed and its confirm lost with the connection.
    pub(super) drop_after_publishes: Option<u32>,
}

/// A confirm withheld by a fault: the connection it belongs to, where it goes, and what it
/// will say.
pub(super) type Withheld = (
    ConnId,
    oneshot::Sender<Result<Confirmed, BrokerError>>,
    Result<Confirmed, BrokerError>,
);

/// A publish waiting for its blocked connection.
pub(super) type Parked = Box<dyn FnOnce(&mut State) + Send>;

/// The whole broker.
pub(super) struct State {
    pub(super) exchanges: HashMap<String, Exchange>,
    pub(super) queues: HashMap<String, Queue>,
    pub(super) connections: HashMap<ConnId, Connection>,
    pub(super) channels: HashMap<ChanId, Channel>,
    pub(super) next_id: u64,
    pub(super) faults: Faults,
    /// Publishes waiting while their connection is blocked: (connection, work).
    pub(super) parked: Vec<(ConnId, Parked)>,
    /// The earliest expiry of a message at the head of its queue, for the expiry task (one
    /// behind the head expires only once it is the head).
    pub(super) next_expiry: Option<Instant>,
    /// A resource alarm's reason while one is raised: connections that publish are blocked.
    pub(super) alarm: Option<String>,
    /// Confirms withheld by a fault.
    pub(super) withheld: Vec<Withheld>,
    /// While the network is stalled, which stall it is: nothing reaches the connections
    /// (faults aside) and nothing they send reaches the broker.
    pub(super) stall: Option<u64>,
    /// Stalls so far.
    pub(super) stalls: u64,
}

impl Default for State {
    fn default() -> Self {
        let mut exchanges = HashMap::new();
        for (name, kind) in [
            ("amq.direct", ExchangeKind::Direct),
            ("amq.fanout", ExchangeKind::Fanout),
            ("amq.topic", ExchangeKind::Topic),
            ("amq.headers", ExchangeKind::Headers),
        ] {
            exchanges.insert(
                name.to_owned(),
                Exchange {
                    kind,
                    options: ExchangeOptions {
                        durable: true,
                        ..ExchangeOptions::default()
                    },
                    arguments: FieldTable::default(),
                    bindings: Vec::new(),
                },
            );
        }
        State {
            exchanges,
            queues: HashMap::new(),
            connections: HashMap::new(),
            channels: HashMap::new(),
            next_id: 1,
            faults: Faults::default(),
            parked: Vec::new(),
            next_expiry: None,
            alarm: None,
            withheld: Vec::new(),
            stall: None,
            stalls: 0,
        }
    }
}

/// A protocol error with RabbitMQ's reply code and text.
pub(super) fn amqp_error(code: u16, text: String) -> BrokerError {
    match lapin::protocol::AMQPError::from_id(code, ShortString::from(text.clone())) {
        Some(error) => BrokerError::from(lapin::ErrorKind::ProtocolError(error)),
        None => crate::broker::other(text),
    }
}

fn int(value: &AMQPValue) -> Option<i64> {
    match *value {
        AMQPValue::ShortShortInt(n) => Some(n.into()),
        AMQPValue::ShortShortUInt(n) => Some(n.into()),
        AMQPValue::ShortInt(n) => Some(n.into()),
        AMQPValue::ShortUInt(n) => Some(n.into()),
        AMQPValue::LongInt(n) => Some(n.into()),
        AMQPValue::LongUInt(n) => Some(n.into()),
        AMQPValue::LongLongInt(n) => Some(n),
        _ => None,
    }
}

impl State {
    pub(super) fn id(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    /// The open channel `id`, or the error for using a closed one.
    pub(super) fn channel(&mut self, id: ChanId) -> Result<&mut Channel, BrokerError> {
        match self.channels.get_mut(&id) {
            Some(channel) if channel.open => Ok(channel),
            _ => Err(crate::broker::other(format!("channel {id} is closed"))),
        }
    }

    /// Closes `channel` on the broker's side for `error` (a soft error: 404, 406…): its
    /// consumers' streams yield the error and end, its unacked messages go back.
    pub(super) fn channel_error(&mut self, channel: ChanId, error: BrokerError) -> BrokerError {
        let connection = self.channels.get(&channel).map(|c| c.connection);
        self.close_channel(channel, Some(&error));
        if let Some(connection) = connection.and_then(|c| self.connections.get(&c)) {
            for listener in &connection.events {
                let _ = listener.send(Event::Error(error.clone()));
            }
        }
        error
    }

    /// Closes a channel: requeues what it holds unacked, ends its consumers' streams (with
    /// `error` when the broker closed it).
    pub(super) fn close_channel(&mut self, id: ChanId, error: Option<&BrokerError>) {
        let Some(channel) = self.channels.get_mut(&id) else {
            return;
        };
        if !channel.open {
            return;
        }
        channel.open = false;
        if let (Some((_, sender)), Some(error)) = (channel.reply.take(), error) {
            let _ = sender.send(Err(error.clone()));
        }
        let unacked = std::mem::take(&mut channel.unacked);
        let consumers = std::mem::take(&mut channel.consumers);
        let connection = channel.connection;
        let mut consumed = Vec::new();
        for (tag, consumer) in consumers {
            if let Some(error) = error {
                let _ = consumer.sender.send(Err(error.clone()));
            }
            if let Some(queue) = self.queues.get_mut(&consumer.queue) {
                queue.consumers.retain(|key| key != &(id, tag.clone()));
            }
            consumed.push(consumer.queue);
        }
        self.requeue_all(unacked);
        for queue in consumed {
            self.consumer_gone(&queue);
        }
        if let Some(connection) = self.connections.get_mut(&connection) {
            connection.channels.remove(&id);
        }
        self.deliver();
    }

    /// Closes a connection: every channel, then the exclusive queues it declared.
    pub(super) fn close_connection(&mut self, id: ConnId, error: Option<BrokerError>) {
        let Some(connection) = self.connections.get_mut(&id) else {
            return;
        };
        if !connection.open {
            return;
        }
        connection.open = false;
        connection.closed_because = error.clone();
        let channels: Vec<ChanId> = connection.channels.iter().copied().collect();
        let listeners = std::mem::take(&mut connection.events);
        for channel in channels {
            self.close_channel(channel, error.as_ref());
        }
        self.queues.retain(|_, queue| queue.owner != Some(id));
        self.parked.retain(|(connection, _)| *connection != id);
        self.withheld.retain(|(connection, _, _)| *connection != id);
        if let Some(error) = error {
            for listener in listeners {
                let _ = listener.send(Event::Error(error.clone()));
            }
        }
        self.deliver();
    }

    /// Puts the deliveries of a channel that closed back in their queues, in delivery order,
    /// marked redelivered.
    fn requeue_all(&mut self, unacked: BTreeMap<u64, Unacked>) {
        for (_, delivery) in unacked {
            self.requeue(delivery, false);
        }
    }

    /// Gives a delivery back to its queue (`nacked`: by a nack or reject with requeue; else
    /// because its channel closed), as RabbitMQ 3.10 does — unless that is once too many for
    /// a quorum queue's delivery limit, or it expired meanwhile:
    /// - a classic queue puts it back in its place, ahead of what came in after it;
    /// - a quorum queue serves it before what was never delivered, in the order messages
    ///   came back — except a nacked one on a queue without a delivery limit, which goes to
    ///   the back (3.10 republishes it, so that repeated requeues do not grow its log).
    fn requeue(&mut self, delivery: Unacked, nacked: bool) {
        let Unacked {
            queue, mut message, ..
        } = delivery;
        message.redelivered = true;
        message.returns += 1;
        let Some(target) = self.queues.get_mut(&queue) else {
            return;
        };
        target.unacked = target.unacked.saturating_sub(1);
        if let Some(limit) = target.delivery_limit()
            && message.returns > limit
        {
            self.dead_letter(&queue, message, DeathReason::DeliveryLimit);
            return;
        }
        if target.is_quorum() {
            if nacked && target.delivery_limit().is_none() {
                target.ready.push_back(message);
            } else {
                let place = target.returned.min(target.ready.len());
                target.ready.insert(place, message);
                target.returned = place + 1;
            }
        } else {
            let place = target
                .ready
                .iter()
                .position(|m| m.seq > message.seq)
                .unwrap_or(target.ready.len());
            target.ready.insert(place, message);
        }
        // Back in the count of ready messages, it may take the queue past its length: its
        // head goes (RabbitMQ drops after a requeue too).
        self.drop_over_limit(&queue);
        // A message keeps its expiry while delivered: back at the head past it, it expires
        // now (RabbitMQ drops expired messages from the head after a requeue; one further
        // back waits to be the head).
        self.expire_head(&queue, Instant::now());
    }

    pub(super) fn declare_exchange(
        &mut self,
        channel: ChanId,
        name: &str,
        kind: ExchangeKind,
        options: ExchangeOptions,
        arguments: FieldTable,
    ) -> Result<(), BrokerError> {
        self.channel(channel)?;
        if name.is_empty() {
            let text = "ACCESS_REFUSED - operation not permitted on the default exchange";
            return Err(self.channel_error(channel, amqp_error(403, text.to_owned())));
        }
        if let Some(existing) = self.exchanges.get(name) {
            if options.passive {
                return Ok(());
            }
            // RabbitMQ's order; of the arguments, only `alternate-exchange` is compared.
            let received = (kind_name(&kind), options.durable, options.auto_delete);
            let current = (
                kind_name(&existing.kind),
                existing.options.durable,
                existing.options.auto_delete,
            );
            let inequivalent = if received.0 != current.0 {
                Some(("type", quoted(received.0), quoted(current.0)))
            } else if received.1 != current.1 {
                Some(("durable", quoted(received.1), quoted(current.1)))
            } else if received.2 != current.2 {
                Some(("auto_delete", quoted(received.2), quoted(current.2)))
            } else {
                const ALTERNATE: &str = "alternate-exchange";
                let (current, received) = (
                    existing.arguments.inner().get(ALTERNATE),
                    arguments.inner().get(ALTERNATE),
                );
                inequivalent_argument(current, received).map(|(r, c)| (ALTERNATE, r, c))
            };
            if let Some((arg, received, current)) = inequivalent {
                let text = format!(
                    "PRECONDITION_FAILED - inequivalent arg '{arg}' for exchange '{name}' in \
                     vhost '/': received {received} but current is {current}"
                );
                return Err(self.channel_error(channel, amqp_error(406, text)));
            }
            return Ok(());
        }
        if options.passive {
            let text = format!("NOT_FOUND - no exchange '{name}' in vhost '/'");
            return Err(self.channel_error(channel, amqp_error(404, text)));
        }
        // Of the plugins' types, the consistent-hash exchange's (as if its plugin were
        // enabled); RabbitMQ closes the connection over any other it does not know.
        if let ExchangeKind::Custom(kind) = &kind
            && kind != CONSISTENT_HASH
        {
            let text = format!("COMMAND_INVALID - unknown exchange type '{kind}'");
            let error = amqp_error(503, text);
            if let Some(connection) = self.channels.get(&channel).map(|c| c.connection) {
                self.close_connection(connection, Some(error.clone()));
            }
            return Err(error);
        }
        if name.starts_with("amq.") {
            let text =
                format!("ACCESS_REFUSED - exchange name '{name}' contains reserved prefix 'amq.*'");
            return Err(self.channel_error(channel, amqp_error(403, text)));
        }
        self.exchanges.insert(
            name.to_owned(),
            Exchange {
                kind,
                options,
                arguments,
                bindings: Vec::new(),
            },
        );
        Ok(())
    }

    pub(super) fn declare_queue(
        &mut self,
        channel: ChanId,
        name: &str,
        options: QueueOptions,
        arguments: FieldTable,
    ) -> Result<QueueState, BrokerError> {
        let connection = self.channel(channel)?.connection;
        if !options.passive && name.starts_with("amq.") {
            let text =
                format!("ACCESS_REFUSED - queue name '{name}' contains reserved prefix 'amq.*'");
            return Err(self.channel_error(channel, amqp_error(403, text)));
        }
        if let Some(existing) = self.queues.get(name) {
            // A passive declaration needs access; any other the same exclusivity.
            let owner = options.exclusive.then_some(connection);
            let locked = if options.passive {
                existing.owner.is_some_and(|owner| owner != connection)
            } else {
                existing.owner != owner
            };
            if locked {
                let text = format!(
                    "RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{name}' in \
                     vhost '/'. It could be originally declared on another connection or the \
                     exclusive property value does not match that of the original declaration."
                );
                return Err(self.channel_error(channel, amqp_error(405, text)));
            }
            if !options.passive
                && let Some((arg, received, current)) =
                    queue_inequivalence(existing, options, &arguments)
            {
                let text = format!(
                    "PRECONDITION_FAILED - inequivalent arg '{arg}' for queue '{name}' in vhost \
                     '/': received {received} but current is {current}"
                );
                return Err(self.channel_error(channel, amqp_error(406, text)));
            }
            return Ok(QueueState {
                messages: u32::try_from(existing.ready.len()).unwrap_or(u32::MAX),
                consumers: u32::try_from(existing.consumers.len()).unwrap_or(u32::MAX),
            });
        }
        if options.passive {
            let text = format!("NOT_FOUND - no queue '{name}' in vhost '/'");
            return Err(self.channel_error(channel, amqp_error(404, text)));
        }
        if let Some(why) = invalid_arguments(name, &arguments) {
            let text = format!("PRECONDITION_FAILED - {why}");
            return Err(self.channel_error(channel, amqp_error(406, text)));
        }
        let queue = Queue {
            options,
            arguments,
            ready: VecDeque::new(),
            consumers: VecDeque::new(),
            owner: options.exclusive.then_some(connection),
            unacked: 0,
            published: 0,
            next_seq: 0,
            returned: 0,
        };
        if queue.is_quorum() {
            // RabbitMQ's checks, in its order.
            let invalid = if options.auto_delete {
                Some("auto-delete")
            } else if options.exclusive {
                Some("exclusive-owner")
            } else if !options.durable {
                Some("non-durable")
            } else {
                None
            };
            if let Some(property) = invalid {
                let text = format!(
                    "PRECONDITION_FAILED - invalid property '{property}' for queue '{name}' in \
                     vhost '/'"
                );
                return Err(self.channel_error(channel, amqp_error(406, text)));
            }
        }
        self.queues.insert(name.to_owned(), queue);
        Ok(QueueState {
            messages: 0,
            consumers: 0,
        })
    }

    pub(super) fn bind_queue(
        &mut self,
        channel: ChanId,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), BrokerError> {
        self.channel(channel)?;
        if exchange.is_empty() {
            let text = "ACCESS_REFUSED - operation not permitted on the default exchange";
            return Err(self.channel_error(channel, amqp_error(403, text.to_owned())));
        }
        // The exchange first: with both missing, RabbitMQ names the exchange.
        if !self.exchanges.contains_key(exchange) {
            let text = format!("NOT_FOUND - no exchange '{exchange}' in vhost '/'");
            return Err(self.channel_error(channel, amqp_error(404, text)));
        }
        if !self.queues.contains_key(queue) {
            let text = format!("NOT_FOUND - no queue '{queue}' in vhost '/'");
            return Err(self.channel_error(channel, amqp_error(404, text)));
        }
        let target = self.exchanges.get_mut(exchange).expect("the exchange");
        let binding = (queue.to_owned(), routing_key.to_owned(), arguments);
        if !target.bindings.contains(&binding) {
            target.bindings.push(binding);
        }
        Ok(())
    }

    /// Deletes a queue (a test's, or an operator's): its consumers are cancelled by the
    /// broker (their streams end), its messages are gone.
    pub(super) fn delete_queue(&mut self, name: &str) -> bool {
        let Some(queue) = self.queues.remove(name) else {
            return false;
        };
        for (channel, tag) in queue.consumers {
            if let Some(channel) = self.channels.get_mut(&channel) {
                // Dropping the sender ends the stream: what lapin does on a broker-side
                // basic.cancel.
                channel.consumers.remove(&tag);
            }
        }
        for exchange in self.exchanges.values_mut() {
            exchange.bindings.retain(|(queue, _, _)| queue != name);
        }
        true
    }

    pub(super) fn consume(
        &mut self,
        channel: ChanId,
        queue: &str,
        tag: &str,
        options: ConsumeOptions,
        sender: mpsc::UnboundedSender<Result<Incoming, BrokerError>>,
    ) -> Result<(), BrokerError> {
        let open = self.channel(channel)?;
        if queue == REPLY_TO {
            if !options.no_ack {
                let text = "PRECONDITION_FAILED - reply consumer cannot acknowledge".to_owned();
                return Err(self.channel_error(channel, amqp_error(406, text)));
            }
            if open.reply.is_some() {
                let text = "PRECONDITION_FAILED - reply consumer already set".to_owned();
                return Err(self.channel_error(channel, amqp_error(406, text)));
            }
            open.reply = Some((tag.to_owned(), sender));
            return Ok(());
        }
        let Some(target) = self.queues.get(queue) else {
            let text = format!("NOT_FOUND - no queue '{queue}' in vhost '/'");
            return Err(self.channel_error(channel, amqp_error(404, text)));
        };
        let exclusive_taken = target.consumers.iter().any(|key| {
            self.channels
                .get(&key.0)
                .and_then(|c| c.consumers.get(&key.1))
                .is_some_and(|c| c.options.exclusive)
        });
        if exclusive_taken || (options.exclusive && !target.consumers.is_empty()) {
            let text = format!("ACCESS_REFUSED - queue '{queue}' in vhost '/' in exclusive use");
            return Err(self.channel_error(channel, amqp_error(403, text)));
        }
        let open = self.channel(channel)?;
        if open.consumers.contains_key(tag) {
            let text = format!("NOT_ALLOWED - attempt to reuse consumer tag '{tag}'");
            return Err(self.channel_error(channel, amqp_error(530, text)));
        }
        open.consumers.insert(
            tag.to_owned(),
            Consumer {
                queue: queue.to_owned(),
                sender,
                unacked: 0,
                options,
            },
        );
        if let Some(target) = self.queues.get_mut(queue) {
            target.consumers.push_back((channel, tag.to_owned()));
        }
        self.deliver();
        Ok(())
    }

    pub(super) fn cancel(&mut self, channel: ChanId, tag: &str) -> Result<(), BrokerError> {
        let open = self.channel(channel)?;
        if open.reply.as_ref().is_some_and(|(reply, _)| reply == tag) {
            open.reply = None;
            return Ok(());
        }
        if let Some(consumer) = open.consumers.remove(tag)
            && let Some(queue) = self.queues.get_mut(&consumer.queue)
        {
            queue
                .consumers
                .retain(|key| key != &(channel, tag.to_owned()));
            self.consumer_gone(&consumer.queue);
        }
        Ok(())
    }

    /// A consumer of `queue` went: an auto-delete queue goes with its last consumer (it had
    /// one, as this one was), messages and all, as RabbitMQ deletes it.
    fn consumer_gone(&mut self, queue: &str) {
        if self
            .queues
            .get(queue)
            .is_some_and(|q| q.options.auto_delete && q.consumers.is_empty())
        {
            self.delete_queue(queue);
        }
    }

    /// Settles `tag` (and, with `multiple`, every earlier unsettled one) on `channel`.
    /// `requeue` gives them back; `ack` false without requeue dead-letters (or drops) them.
    pub(super) fn settle(
        &mut self,
        channel: ChanId,
        tag: u64,
        multiple: bool,
        ack: bool,
        requeue: bool,
    ) -> Result<(), BrokerError> {
        let open = self.channel(channel)?;
        let tags: Vec<u64> = if multiple {
            open.unacked.range(..=tag).map(|(&t, _)| t).collect()
        } else if open.unacked.contains_key(&tag) {
            vec![tag]
        } else {
            Vec::new()
        };
        if tags.is_empty() && !(multiple && tag == 0) {
            // An ack has no answer: the broker closes the channel, and the client learns of
            // it from the channel (its consumers, its next operation), not from the ack.
            let text = format!("PRECONDITION_FAILED - unknown delivery tag {tag}");
            self.channel_error(channel, amqp_error(406, text));
            return Ok(());
        }
        let mut settled = Vec::with_capacity(tags.len());
        for tag in tags {
            if let Some(delivery) = open.unacked.remove(&tag) {
                if let Some(consumer) = delivery
                    .consumer
                    .as_ref()
                    .and_then(|c| open.consumers.get_mut(c))
                {
                    consumer.unacked = consumer.unacked.saturating_sub(1);
                }
                settled.push(delivery);
            }
        }
        for delivery in settled {
            if requeue {
                self.requeue(delivery, true);
                continue;
            }
            if let Some(queue) = self.queues.get_mut(&delivery.queue) {
                queue.unacked = queue.unacked.saturating_sub(1);
            }
            if !ack {
                self.dead_letter(&delivery.queue, delivery.message, DeathReason::Rejected);
            }
        }
        self.deliver();
        Ok(())
    }

    /// Routes a published message; returns whether any queue took it. A missing exchange is
    /// the broker's 404, which closes the channel.
    pub(super) fn publish(
        &mut self,
        channel: Option<ChanId>,
        exchange: &str,
        routing_key: &str,
        body: Bytes,
        properties: BasicProperties,
    ) -> Result<Routed, BrokerError> {
        let mut properties = properties;
        if properties.reply_to().as_ref().map(ShortString::as_str) == Some(REPLY_TO) {
            let Some(id) =
                channel.filter(|id| self.channels.get(id).is_some_and(|c| c.reply.is_some()))
            else {
                let text = "PRECONDITION_FAILED - fast reply consumer does not exist".to_owned();
                let error = amqp_error(406, text);
                return Err(match channel {
                    Some(channel) => self.channel_error(channel, error),
                    None => error,
                });
            };
            properties = properties.with_reply_to(ShortString::from(format!("{REPLY_TO}.{id}")));
        }
        if exchange.is_empty()
            && let Some(id) = routing_key
                .strip_prefix(REPLY_TO)
                .and_then(|rest| rest.strip_prefix('.'))
        {
            // A direct reply: straight to the channel that asked, or nowhere.
            let target = id.parse::<ChanId>().ok().and_then(|id| {
                self.channels
                    .get(&id)
                    .filter(|c| c.open)
                    .and_then(|c| c.reply.as_ref())
            });
            let Some((_, sender)) = target else {
                return Ok(Routed::default());
            };
            let reply = crate::broker::incoming(
                0,
                ShortString::from(""),
                ShortString::from(routing_key),
                false,
                properties,
                &body,
            );
            return Ok(Routed {
                queued: sender.send(Ok(reply)).is_ok(),
                rejected: false,
            });
        }
        let queues = match self.route(exchange, routing_key, &properties) {
            Some(queues) => queues,
            None => {
                let text = format!("NOT_FOUND - no exchange '{exchange}' in vhost '/'");
                let error = amqp_error(404, text);
                return Err(match channel {
                    Some(channel) => self.channel_error(channel, error),
                    None => error,
                });
            }
        };
        let message = Message {
            exchange: ShortString::from(exchange),
            routing_key: ShortString::from(routing_key),
            properties,
            body,
            redelivered: false,
            returns: 0,
            expires: None,
            seq: 0,
        };
        let mut routed = Routed::default();
        for queue in &queues {
            if self.offer(queue, message.clone()) {
                routed.queued = true;
            } else {
                routed.rejected = true;
            }
        }
        self.deliver();
        for queue in &queues {
            self.drop_over_limit(queue);
        }
        Ok(routed)
    }

    /// Offers a message to `queue`: enqueued, or refused by a queue at its maximum length
    /// that rejects publishes (and dead-lettered if it says so). Returns whether it took it.
    fn offer(&mut self, queue: &str, message: Message) -> bool {
        let Some(target) = self.queues.get(queue) else {
            return true;
        };
        if target.would_overflow(message.body.len()) {
            match target.overflow() {
                Overflow::DropHead => {}
                Overflow::RejectPublish => return false,
                Overflow::RejectPublishDeadLetter => {
                    self.dead_letter(queue, message, DeathReason::MaxLength);
                    return false;
                }
            }
        }
        self.enqueue(queue, message);
        true
    }

    /// Dead-letters (or drops) the oldest ready messages of a queue past its maximum length
    /// that drops its head.
    fn drop_over_limit(&mut self, name: &str) {
        while let Some(queue) = self.queues.get_mut(name)
            && queue.overflow() == Overflow::DropHead
            && queue.over_limit()
        {
            let message = queue.pop_ready().expect("a ready message");
            self.dead_letter(name, message, DeathReason::MaxLength);
        }
    }

    /// The queues `exchange` routes the message to; `None` when the exchange does not exist.
    fn route(
        &self,
        exchange: &str,
        routing_key: &str,
        properties: &BasicProperties,
    ) -> Option<Vec<String>> {
        if exchange.is_empty() {
            return Some(
                self.queues
                    .contains_key(routing_key)
                    .then(|| routing_key.to_owned())
                    .into_iter()
                    .collect(),
            );
        }
        let target = self.exchanges.get(exchange)?;
        if matches!(&target.kind, ExchangeKind::Custom(kind) if kind == CONSISTENT_HASH) {
            let queue = route::consistent_hash(
                &target.arguments,
                &target.bindings,
                routing_key,
                properties,
            );
            return Some(queue.map(str::to_owned).into_iter().collect());
        }
        let mut queues: Vec<String> = Vec::new();
        for (queue, key, arguments) in &target.bindings {
            let matches = match &target.kind {
                ExchangeKind::Direct => key == routing_key,
                ExchangeKind::Fanout => true,
                ExchangeKind::Topic => route::topic_matches(key, routing_key),
                ExchangeKind::Headers => route::headers_match(arguments, properties.headers()),
                ExchangeKind::Custom(_) => false,
            };
            if matches && !queues.contains(queue) {
                queues.push(queue.clone());
            }
        }
        Some(queues)
    }

    /// Puts a message at the end of `queue`, with its expiry.
    fn enqueue(&mut self, queue: &str, mut message: Message) {
        let Some(target) = self.queues.get_mut(queue) else {
            return;
        };
        let per_message = message
            .properties
            .expiration()
            .as_ref()
            .and_then(|ms| ms.as_str().parse::<u64>().ok())
            .map(Duration::from_millis);
        let ttl = match (target.ttl(), per_message) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        message.expires = ttl.map(|ttl| Instant::now() + ttl);
        message.seq = target.next_seq;
        target.next_seq += 1;
        target.published += 1;
        target.ready.push_back(message);
    }

    /// Dead-letters `message` from `queue` (to its dead-letter exchange, with `x-death`), or
    /// drops it when the queue has none, its exchange is missing, or it would come back to a
    /// queue it died in with no reject since (RabbitMQ's cycle detection: an expiry loop
    /// ends).
    fn dead_letter(&mut self, queue: &str, message: Message, reason: DeathReason) {
        let Some(target) = self.queues.get(queue) else {
            return;
        };
        let Some((exchange, routing_key)) = target.dead_letter_target() else {
            return;
        };
        let routing_key = routing_key.unwrap_or_else(|| message.routing_key.to_string());
        let mut headers = message.properties.headers().clone().unwrap_or_default();
        record_death(&mut headers, queue, reason, &message);
        // A dead letter loses its own expiration, as with RabbitMQ.
        let properties = strip_expiration(message.properties.clone().with_headers(headers));
        let Some(queues) = self.route(&exchange, &routing_key, &properties) else {
            return;
        };
        let dead = Message {
            exchange: ShortString::from(exchange),
            routing_key: ShortString::from(routing_key),
            properties,
            body: message.body,
            redelivered: false,
            returns: 0,
            expires: None,
            seq: 0,
        };
        let queues: Vec<String> = queues
            .into_iter()
            .filter(|queue| {
                matches!(reason, DeathReason::Rejected)
                    || !is_cycle(queue, dead.properties.headers())
            })
            .collect();
        for queue in &queues {
            self.offer(queue, dead.clone());
        }
        self.deliver();
        for queue in &queues {
            self.drop_over_limit(queue);
        }
    }

    /// Dead-letters (or drops) the messages at the head of `queue` whose expiry passed, as
    /// RabbitMQ does: a classic queue expires messages at its head only.
    fn expire_head(&mut self, name: &str, now: Instant) {
        while let Some(queue) = self.queues.get_mut(name)
            && queue
                .ready
                .front()
                .and_then(|m| m.expires)
                .is_some_and(|at| at <= now)
        {
            let message = queue.pop_ready().expect("a front message");
            self.dead_letter(name, message, DeathReason::Expired);
        }
    }

    /// Expires what is due at the head of each queue; returns the next expiry pending.
    pub(super) fn expire(&mut self, now: Instant) -> Option<Instant> {
        let names: Vec<String> = self.queues.keys().cloned().collect();
        for name in names {
            self.expire_head(&name, now);
        }
        self.deliver();
        self.refresh_expiry()
    }

    /// The earliest expiry of a message at the head of a queue — the one the expiry task
    /// waits for: one behind the head waits for the head to go, as with RabbitMQ.
    pub(super) fn refresh_expiry(&mut self) -> Option<Instant> {
        self.next_expiry = self
            .queues
            .values()
            .filter_map(|q| q.ready.front().and_then(|m| m.expires))
            .min();
        self.next_expiry
    }

    /// True while the network is stalled for `connection` (the harness's own is exempt).
    pub(super) fn is_stalled(&self, connection: ConnId) -> bool {
        self.stall.is_some()
            && self
                .connections
                .get(&connection)
                .is_some_and(|c| c.open && !c.exempt)
    }

    /// True for a channel of the harness's own connection.
    pub(super) fn is_exempt_channel(&self, channel: ChanId) -> bool {
        self.channels
            .get(&channel)
            .and_then(|c| self.connections.get(&c.connection))
            .is_some_and(|c| c.exempt)
    }

    /// Cancels `queue`'s consumers from the broker's side (`basic.cancel` to the client, as
    /// when a queue is deleted or its leader moves): their streams end, what they hold stays
    /// unacked on their channels. Returns how many.
    pub(super) fn cancel_consumers(&mut self, queue: &str) -> usize {
        let Some(target) = self.queues.get_mut(queue) else {
            return 0;
        };
        let (consumers, kept): (Vec<ConsumerKey>, Vec<ConsumerKey>) =
            target.consumers.drain(..).partition(|(channel, _)| {
                !self
                    .channels
                    .get(channel)
                    .and_then(|c| self.connections.get(&c.connection))
                    .is_some_and(|c| c.exempt)
            });
        target.consumers.extend(kept);
        for (channel, tag) in &consumers {
            if let Some(channel) = self.channels.get_mut(channel) {
                // Dropping the sender ends the stream: what lapin does on a broker-side
                // basic.cancel.
                channel.consumers.remove(tag);
            }
        }
        consumers.len()
    }

    /// Pushes ready messages to consumers with room in their prefetch, round robin.
    pub(super) fn deliver(&mut self) {
        // Connections a fault drops once their delivery is sent.
        let mut to_drop: Vec<ConnId> = Vec::new();
        let names: Vec<String> = self
            .queues
            .iter()
            .filter(|(_, q)| !q.ready.is_empty() && !q.consumers.is_empty())
            .map(|(name, _)| name.clone())
            .collect();
        let now = Instant::now();
        for name in names {
            // What expired at the head is dead-lettered, not delivered.
            self.expire_head(&name, now);
            while let Some(queue) = self.queues.get_mut(&name)
                && !queue.ready.is_empty()
            {
                // The next consumer with room, in turn.
                let mut chosen = None;
                for _ in 0..queue.consumers.len() {
                    let key = queue.consumers.pop_front().expect("a consumer");
                    queue.consumers.push_back(key.clone());
                    let room = self.channels.get(&key.0).is_some_and(|channel| {
                        let stalled = self.stall.is_some()
                            && self
                                .connections
                                .get(&channel.connection)
                                .is_some_and(|c| !c.exempt);
                        channel.open
                            && !stalled
                            && channel.consumers.get(&key.1).is_some_and(|consumer| {
                                consumer.options.no_ack
                                    || channel.prefetch == 0
                                    || consumer.unacked < usize::from(channel.prefetch)
                            })
                    });
                    if room {
                        chosen = Some(key);
                        break;
                    }
                }
                let Some((channel_id, tag)) = chosen else {
                    break;
                };
                let queue = self.queues.get_mut(&name).expect("the queue");
                let message = queue.pop_ready().expect("a ready message");
                queue.unacked += 1;
                let (quorum, stream) = (queue.is_quorum(), queue.is_stream());
                let channel = self.channels.get_mut(&channel_id).expect("the channel");
                channel.next_tag += 1;
                let tag_number = channel.next_tag;
                let consumer = channel.consumers.get_mut(&tag).expect("the consumer");
                consumer.unacked += 1;
                let mut properties = message.properties.clone();
                if quorum && message.returns > 0 {
                    let mut headers = properties.headers().clone().unwrap_or_default();
                    headers.insert(
                        ShortString::from("x-delivery-count"),
                        AMQPValue::LongLongInt(i64::from(message.returns)),
                    );
                    properties = properties.with_headers(headers);
                }
                if stream {
                    let mut headers = properties.headers().clone().unwrap_or_default();
                    headers.insert(
                        ShortString::from("x-stream-offset"),
                        AMQPValue::LongLongInt(i64::try_from(message.seq).unwrap_or(i64::MAX)),
                    );
                    properties = properties.with_headers(headers);
                }
                let incoming = crate::broker::incoming(
                    tag_number,
                    message.exchange.clone(),
                    message.routing_key.clone(),
                    message.redelivered,
                    properties,
                    &message.body,
                );
                let sent = consumer.sender.send(Ok(incoming)).is_ok();
                let connection = channel.connection;
                if sent
                    && let Some(left) = &mut self.faults.drop_after_deliveries
                    && self.connections.get(&connection).is_some_and(|c| !c.exempt)
                {
                    *left -= 1;
                    if *left == 0 {
                        self.faults.drop_after_deliveries = None;
                        to_drop.push(connection);
                    }
                }
                if consumer.options.no_ack {
                    // Settled as sent.
                    consumer.unacked -= 1;
                    if let Some(queue) = self.queues.get_mut(&name) {
                        queue.unacked -= 1;
                    }
                    if !sent {
                        let channel = self.channels.get_mut(&channel_id).expect("the channel");
                        channel.consumers.remove(&tag);
                        if let Some(queue) = self.queues.get_mut(&name) {
                            queue
                                .consumers
                                .retain(|key| key != &(channel_id, tag.clone()));
                        }
                        self.consumer_gone(&name);
                    }
                    continue;
                }
                // It keeps its expiry: given back past it, it expires then.
                channel.unacked.insert(
                    tag_number,
                    Unacked {
                        queue: name.clone(),
                        message,
                        consumer: Some(tag.clone()),
                    },
                );
                if !sent {
                    // The stream is gone: the consumer is, for the broker, cancelled.
                    channel.consumers.remove(&tag);
                    if let Some(queue) = self.queues.get_mut(&name) {
                        queue
                            .consumers
                            .retain(|key| key != &(channel_id, tag.clone()));
                    }
                    self.consumer_gone(&name);
                }
            }
        }
        for connection in to_drop {
            let text = "CONNECTION_FORCED - dropped by the test after a delivery".to_owned();
            self.close_connection(connection, Some(amqp_error(320, text)));
        }
    }

    /// `basic.get`: the next ready message of `queue`, unacked on `channel`.
    pub(super) fn get(
        &mut self,
        channel: ChanId,
        queue: &str,
    ) -> Result<Option<(Incoming, u32)>, BrokerError> {
        self.channel(channel)?;
        if !self.queues.contains_key(queue) {
            let text = format!("NOT_FOUND - no queue '{queue}' in vhost '/'");
            return Err(self.channel_error(channel, amqp_error(404, text)));
        }
        let now = Instant::now();
        self.expire_head(queue, now);
        let target = self.queues.get_mut(queue).expect("the queue");
        let Some(message) = target.pop_ready() else {
            return Ok(None);
        };
        target.unacked += 1;
        // A quorum queue's basic.get always says the count, 0 included (a consumer's
        // deliveries only from the first return on).
        let mut properties = message.properties.clone();
        if target.is_quorum() {
            let mut headers = properties.headers().clone().unwrap_or_default();
            headers.insert(
                ShortString::from("x-delivery-count"),
                AMQPValue::LongLongInt(i64::from(message.returns)),
            );
            properties = properties.with_headers(headers);
        }
        // What expired behind it is at the head now: RabbitMQ drops it after the fetch, and
        // counts what remains.
        self.expire_head(queue, now);
        let remaining = self
            .queues
            .get(queue)
            .map_or(0, |q| u32::try_from(q.ready.len()).unwrap_or(u32::MAX));
        let open = self.channel(channel)?;
        open.next_tag += 1;
        let tag = open.next_tag;
        let incoming = crate::broker::incoming(
            tag,
            message.exchange.clone(),
            message.routing_key.clone(),
            message.redelivered,
            properties,
            &message.body,
        );
        open.unacked.insert(
            tag,
            Unacked {
                queue: queue.to_owned(),
                message,
                consumer: None,
            },
        );
        Ok(Some((incoming, remaining)))
    }
}

/// The message's properties without an `expiration` (dead letters lose theirs).
fn strip_expiration(properties: BasicProperties) -> BasicProperties {
    let mut stripped = BasicProperties::default();
    macro_rules! copy {
        ($($getter:ident => $setter:ident),* $(,)?) => {
            $( if let Some(value) = properties.$getter().clone() { stripped = stripped.$setter(value); } )*
        };
    }
    copy!(
        content_type => with_content_type,
        content_encoding => with_content_encoding,
        headers => with_headers,
        delivery_mode => with_delivery_mode,
        priority => with_priority,
        correlation_id => with_correlation_id,
        reply_to => with_reply_to,
        message_id => with_message_id,
        timestamp => with_timestamp,
        kind => with_type,
        user_id => with_user_id,
        app_id => with_app_id,
        cluster_id => with_cluster_id,
    );
    stripped
}

/// Adds (or counts) `queue`'s entry in the message's `x-death` header, as RabbitMQ 3.10 does:
/// a first death there for that reason gets a new entry (with the message's
/// `original-expiration`, if it had one); a later one counts in the existing entry, which
/// keeps its time, exchange and routing keys. Either way the entry moves to the front.
fn record_death(headers: &mut FieldTable, queue: &str, reason: DeathReason, message: &Message) {
    let mut deaths: Vec<AMQPValue> = match headers.inner().get("x-death") {
        Some(AMQPValue::FieldArray(array)) => array.as_slice().to_vec(),
        _ => Vec::new(),
    };
    let same = |entry: &FieldTable| {
        text_of(entry.inner().get("queue")) == Some(queue.to_owned())
            && text_of(entry.inner().get("reason")) == Some(reason.as_str().to_owned())
    };
    let position = deaths.iter().position(|entry| match entry {
        AMQPValue::FieldTable(table) => same(table),
        _ => false,
    });
    let entry = match position.map(|i| deaths.remove(i)) {
        Some(AMQPValue::FieldTable(mut entry)) => {
            let count = entry.inner().get("count").and_then(int).unwrap_or(0) + 1;
            entry.insert(ShortString::from("count"), AMQPValue::LongLongInt(count));
            entry
        }
        _ => {
            let mut entry = FieldTable::default();
            let text = |value: &str| AMQPValue::LongString(LongString::from(value));
            entry.insert(ShortString::from("queue"), text(queue));
            entry.insert(ShortString::from("reason"), text(reason.as_str()));
            entry.insert(
                ShortString::from("exchange"),
                text(message.exchange.as_str()),
            );
            entry.insert(
                ShortString::from("routing-keys"),
                AMQPValue::FieldArray(FieldArray::from(vec![text(message.routing_key.as_str())])),
            );
            entry.insert(ShortString::from("count"), AMQPValue::LongLongInt(1));
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            entry.insert(ShortString::from("time"), AMQPValue::Timestamp(now));
            if let Some(expiration) = message.properties.expiration() {
                entry.insert(
                    ShortString::from("original-expiration"),
                    text(expiration.as_str()),
                );
            }
            entry
        }
    };
    deaths.insert(0, AMQPValue::FieldTable(entry));
    headers.insert(
        ShortString::from("x-death"),
        AMQPValue::FieldArray(FieldArray::from(deaths)),
    );
    if !headers.contains_key("x-first-death-queue") {
        headers.insert(
            ShortString::from("x-first-death-queue"),
            AMQPValue::LongString(LongString::from(queue)),
        );
        headers.insert(
            ShortString::from("x-first-death-reason"),
            AMQPValue::LongString(LongString::from(reason.as_str())),
        );
        headers.insert(
            ShortString::from("x-first-death-exchange"),
            AMQPValue::LongString(LongString::from(message.exchange.as_str())),
        );
    }
}

/// True when a dead letter (its `x-death` written) going to `queue` would close a cycle
/// without a reject in it: `queue` is among the queues it died in, and neither that death nor
/// any since is a reject — RabbitMQ then drops it rather than loop forever.
fn is_cycle(queue: &str, headers: &Option<FieldTable>) -> bool {
    let Some(AMQPValue::FieldArray(deaths)) =
        headers.as_ref().and_then(|h| h.inner().get("x-death"))
    else {
        return false;
    };
    let field = |entry: &AMQPValue, name: &str| match entry {
        AMQPValue::FieldTable(table) => text_of(table.inner().get(name)),
        _ => None,
    };
    let deaths = deaths.as_slice();
    let Some(at) = deaths
        .iter()
        .position(|entry| field(entry, "queue").as_deref() == Some(queue))
    else {
        return false;
    };
    // An entry that is not a table was put there by a client: not a cycle of the broker's.
    deaths[..=at].iter().all(|entry| match entry {
        AMQPValue::FieldTable(table) => {
            text_of(table.inner().get("reason")).as_deref() != Some(DeathReason::Rejected.as_str())
        }
        _ => false,
    })
}

/// RabbitMQ's name of an exchange type.
fn kind_name(kind: &ExchangeKind) -> &str {
    match kind {
        ExchangeKind::Direct => "direct",
        ExchangeKind::Fanout => "fanout",
        ExchangeKind::Topic => "topic",
        ExchangeKind::Headers => "headers",
        ExchangeKind::Custom(name) => name.as_str(),
    }
}

/// A value as RabbitMQ quotes it in an inequivalence (`'true'`, `'topic'`, `'100'`).
fn quoted(value: impl std::fmt::Display) -> String {
    format!("'{value}'")
}

/// The arguments RabbitMQ compares when a classic queue is redeclared, in its order (its
/// `queue_arguments`); the others it does not compare.
const CLASSIC_ARGUMENTS: &[&str] = &[
    "x-expires",
    "x-message-ttl",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-in-memory-length",
    "x-max-in-memory-bytes",
    "x-max-priority",
    "x-overflow",
    "x-queue-mode",
    "x-single-active-consumer",
    "x-queue-type",
    "x-queue-master-locator",
    "x-queue-version",
];

/// …and a quorum queue.
const QUORUM_ARGUMENTS: &[&str] = &[
    "x-expires",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-in-memory-length",
    "x-max-in-memory-bytes",
    "x-overflow",
    "x-single-active-consumer",
    "x-queue-type",
    "x-quorum-initial-group-size",
    "x-delivery-limit",
    "x-dead-letter-strategy",
    "x-message-ttl",
    "x-queue-leader-locator",
];

/// What differs, for RabbitMQ, between `existing` and a redeclaration of it: (what,
/// received, current) — `durable`, `auto_delete`, then the arguments its type compares.
fn queue_inequivalence(
    existing: &Queue,
    options: QueueOptions,
    arguments: &FieldTable,
) -> Option<(&'static str, String, String)> {
    if existing.options.durable != options.durable {
        let (received, current) = (quoted(options.durable), quoted(existing.options.durable));
        return Some(("durable", received, current));
    }
    if existing.options.auto_delete != options.auto_delete {
        let (received, current) = (
            quoted(options.auto_delete),
            quoted(existing.options.auto_delete),
        );
        return Some(("auto_delete", received, current));
    }
    let compared = if existing.is_quorum() {
        QUORUM_ARGUMENTS
    } else {
        CLASSIC_ARGUMENTS
    };
    compared.iter().find_map(|&name| {
        let (current, received) = (existing.argument(name), arguments.inner().get(name));
        // A classic queue is one whether it says so or not.
        let classic = |value: Option<&AMQPValue>| {
            value
                .is_none_or(|v| matches!(v, AMQPValue::LongString(t) if t.as_bytes() == b"classic"))
        };
        if name == "x-queue-type" && classic(current) && classic(received) {
            return None;
        }
        inequivalent_argument(current, received)
            .map(|(received, current)| (name, received, current))
    })
}

/// The arguments only another queue type takes, which RabbitMQ refuses on a classic queue…
const NOT_CLASSIC: &[&str] = &[
    "x-delivery-limit",
    "x-quorum-initial-group-size",
    "x-dead-letter-strategy",
    "x-queue-leader-locator",
    "x-max-in-memory-length",
    "x-max-in-memory-bytes",
    "x-max-age",
    "x-stream-max-segment-size-bytes",
    "x-initial-cluster-size",
];

/// …and on a quorum queue.
const NOT_QUORUM: &[&str] = &[
    "x-max-priority",
    "x-queue-mode",
    "x-queue-version",
    "x-queue-master-locator",
    "x-max-age",
    "x-stream-max-segment-size-bytes",
    "x-initial-cluster-size",
];

/// A check of one argument's value (all the arguments at hand): RabbitMQ's complaint.
type ArgumentCheck = fn(&AMQPValue, &FieldTable) -> Result<(), String>;

/// Why RabbitMQ refuses a new queue's `arguments`, if it does, in the order it checks them:
/// the dead-letter exchange's type, the queue type, the values of the arguments it knows,
/// then the arguments the queue's type does not take.
fn invalid_arguments(name: &str, arguments: &FieldTable) -> Option<String> {
    let args = arguments.inner();
    let queue = format!("queue '{name}' in vhost '/'");
    let invalid = |arg: &str, why: String| Some(format!("invalid arg '{arg}' for {queue}: {why}"));
    const DLX: &str = "x-dead-letter-exchange";
    if let Some(exchange) = args.get(DLX)
        && !is_text(exchange)
    {
        let kind = type_name(exchange);
        return Some(format!("invalid type '{kind}' for arg '{DLX}' in {queue}"));
    }
    let quorum = match args.get("x-queue-type") {
        None => false,
        Some(AMQPValue::LongString(kind)) => match kind.as_bytes() {
            b"classic" => false,
            b"quorum" => true,
            // Consumed as a classic queue, its deliveries numbered (`Queue::is_stream`).
            b"stream" => false,
            other => {
                let other = String::from_utf8_lossy(other);
                return invalid(
                    "x-queue-type",
                    format!("\"unsupported queue type '{other}'\""),
                );
            }
        },
        Some(other) => return invalid("x-queue-type", unacceptable(other)),
    };
    let checks: [(&str, ArgumentCheck); 10] = [
        ("x-expires", |v, _| match integer(v)? {
            0 => Err("{value_zero,0}".to_owned()),
            n => non_negative(n),
        }),
        ("x-message-ttl", |v, _| non_negative(integer(v)?)),
        ("x-dead-letter-routing-key", |v, args| {
            if !is_text(v) {
                Err(unacceptable(v))
            } else if args.contains_key(DLX) {
                Ok(())
            } else {
                Err("routing_key_but_no_dlx_defined".to_owned())
            }
        }),
        ("x-max-length", |v, _| non_negative(integer(v)?)),
        ("x-max-length-bytes", |v, _| non_negative(integer(v)?)),
        ("x-max-in-memory-length", |v, _| non_negative(integer(v)?)),
        ("x-max-in-memory-bytes", |v, _| non_negative(integer(v)?)),
        ("x-max-priority", |v, _| match integer(v)? {
            n if n > 255 => Err(format!("{{max_value_exceeded,{n}}}")),
            n => non_negative(n),
        }),
        ("x-overflow", |v, _| match v {
            AMQPValue::LongString(mode)
                if [&b"drop-head"[..], b"reject-publish", b"reject-publish-dlx"]
                    .contains(&mode.as_bytes()) =>
            {
                Ok(())
            }
            AMQPValue::LongString(_) => Err("invalid_overflow".to_owned()),
            other => Err(unacceptable(other)),
        }),
        ("x-single-active-consumer", |v, _| match v {
            AMQPValue::Boolean(_) => Ok(()),
            other => Err(unacceptable(other)),
        }),
    ];
    for (arg, check) in checks {
        if let Some(value) = args.get(arg)
            && let Err(why) = check(value, arguments)
        {
            return invalid(arg, why);
        }
    }
    let (refused, kind) = if quorum {
        (NOT_QUORUM, "rabbit_quorum_queue")
    } else {
        (NOT_CLASSIC, "rabbit_classic_queue")
    };
    let arg = refused.iter().find(|arg| args.contains_key(**arg))?;
    Some(format!(
        "invalid arg '{arg}' for {queue} of queue type {kind}"
    ))
}

fn is_text(value: &AMQPValue) -> bool {
    matches!(value, AMQPValue::LongString(_) | AMQPValue::ShortString(_))
}

/// An integer argument's value, or RabbitMQ's complaint.
fn integer(value: &AMQPValue) -> Result<i64, String> {
    match value {
        AMQPValue::Timestamp(_) => None,
        other => int(other),
    }
    .ok_or_else(|| format!("\"expected integer, got {}\"", type_name(value)))
}

fn non_negative(n: i64) -> Result<(), String> {
    if n < 0 {
        Err(format!("{{value_negative,{n}}}"))
    } else {
        Ok(())
    }
}

/// RabbitMQ's complaint of an argument of the wrong type.
fn unacceptable(value: &AMQPValue) -> String {
    format!("{{unacceptable_type,{}}}", type_name(value))
}

/// Whether an argument differs as RabbitMQ compares it — integers of any width are one type,
/// floats another — and if so how its text gives the two: the bare values when both are set,
/// `none` or `the value '…' of type '…'` when one is not.
fn inequivalent_argument(
    current: Option<&AMQPValue>,
    received: Option<&AMQPValue>,
) -> Option<(String, String)> {
    match (current, received) {
        (None, None) => None,
        (Some(current), Some(received)) => {
            let same = match (int(current), int(received)) {
                (Some(a), Some(b)) => a == b,
                _ => current == received,
            };
            (!same).then(|| (quoted(value_text(received)), quoted(value_text(current))))
        }
        (current, received) => Some((described(received), described(current))),
    }
}

/// `none`, or `the value '…' of type '…'`.
fn described(value: Option<&AMQPValue>) -> String {
    match value {
        None => "none".to_owned(),
        Some(value) => format!(
            "the value '{}' of type '{}'",
            value_text(value),
            type_name(value)
        ),
    }
}

/// A value as RabbitMQ prints it.
fn value_text(value: &AMQPValue) -> String {
    match value {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::Float(f) => format!("{f:?}"),
        AMQPValue::Double(f) => format!("{f:?}"),
        other => match int(other) {
            Some(n) => n.to_string(),
            None => format!("{other:?}"),
        },
    }
}

/// RabbitMQ's name of a field's type.
fn type_name(value: &AMQPValue) -> &'static str {
    match value {
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::ShortShortInt(_) => "byte",
        AMQPValue::ShortShortUInt(_) => "unsignedbyte",
        AMQPValue::ShortInt(_) => "short",
        AMQPValue::ShortUInt(_) => "unsignedshort",
        AMQPValue::LongInt(_) => "signedint",
        AMQPValue::LongUInt(_) => "unsignedint",
        AMQPValue::LongLongInt(_) => "long",
        AMQPValue::Float(_) => "float",
        AMQPValue::Double(_) => "double",
        AMQPValue::DecimalValue(_) => "decimal",
        AMQPValue::ShortString(_) | AMQPValue::LongString(_) => "longstr",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Timestamp(_) => "timestamp",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::ByteArray(_) => "binary",
        AMQPValue::Void => "void",
    }
}

fn text_of(value: Option<&AMQPValue>) -> Option<String> {
    match value? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}
