//! The broker boundary. Every operation conejo performs on a broker goes through the types
//! here — connect, open a channel, qos, declare, bind, consume, cancel, ack/nack, confirm
//! mode, publish and its confirm, get, close, and the connection's events — and nothing
//! else in the crate calls lapin's connection or channel.
//!
//! Behind the types is a transport: `amqp`, lapin on conejo's dedicated connection runtime,
//! in production; an in-memory broker in tests (feature `test-util`). Each type is an enum
//! over the transports, so a call is a `match`, never a virtual call, and the hot path (a
//! delivery from [`Deliveries`], an ack through [`Channel::ack`]) costs what lapin costs.
//!
//! **Where calls run.** The operations of [`Connection`] and [`Channel`] are futures to be
//! polled where the transport's own tasks live — for `amqp`, the connection runtime, where
//! lapin's heartbeat and internal RPC run and no handler code ever does. Code on the handler
//! runtime wraps a sequence of operations in [`Connection::run`] (or `run_within`), which
//! goes there once for the whole sequence; tasks started with [`Connection::spawn`] (a
//! channel's settle task, a publisher) call them directly.
//!
//! The values crossing the boundary are AMQP's own: [`BasicProperties`], field tables,
//! exchange kinds, and [`BrokerError`], lapin's error, which the in-memory broker builds
//! with the same reply codes RabbitMQ sends.
//!
//! May use: `error` (and nothing of conejo's engine, handlers or configuration).
//!
//! Why it is ~630 lines: the whole boundary in one place — each operation one `match` over
//! the transports — so that what conejo asks of a broker reads as one list.

pub(crate) mod amqp;
#[cfg(any(test, feature = "test-util"))]
#[cfg_attr(not(feature = "test-util"), allow(dead_code))] // the harness uses all of it
pub(crate) mod memory;
pub(crate) mod tls;
pub(crate) mod url;

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use lapin::{
    BasicProperties, ExchangeKind,
    types::{FieldTable, ShortString},
};
use tokio::task::JoinHandle;

use crate::Error;

pub(crate) use self::{tls::TlsSetup, url::AmqpUrl};

/// Default time one connection attempt (TCP, TLS, AMQP handshake) may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Default back-off between reconnection attempts: the first retry at once, then from
/// 100 ms, doubling, up to 5 s.
pub const DEFAULT_RECONNECT_DELAY: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(5));

/// What a broker operation fails with: lapin's error (a protocol error carries the broker's
/// reply code and text: 404 NOT_FOUND, 406 PRECONDITION_FAILED, 320 CONNECTION_FORCED…).
pub(crate) type BrokerError = lapin::Error;

/// The exchange type of RabbitMQ's consistent-hash exchange (a plugin's), which the
/// in-memory broker emulates.
pub(crate) const CONSISTENT_HASH: &str = "x-consistent-hash";

/// A broker conejo can connect to: the transport, and where its tasks run.
#[derive(Clone)]
pub(crate) enum Broker {
    /// RabbitMQ over AMQP 0-9-1, through lapin.
    Amqp(amqp::Amqp),
    /// The in-memory broker of tests.
    #[cfg(any(test, feature = "test-util"))]
    Memory(memory::Memory),
}

/// One open connection. Cheap to clone.
#[derive(Clone)]
pub(crate) enum Connection {
    /// A lapin connection.
    Amqp(amqp::AmqpConnection),
    /// A connection to the in-memory broker.
    #[cfg(any(test, feature = "test-util"))]
    Memory(memory::MemoryConnection),
}

/// One open channel. Cheap to clone: clones are the same channel.
#[derive(Clone)]
pub(crate) enum Channel {
    /// A lapin channel.
    Amqp(lapin::Channel),
    /// A channel of the in-memory broker.
    #[cfg(any(test, feature = "test-util"))]
    Memory(memory::MemoryChannel),
}

/// A consumer's stream of deliveries; ends after the consumer is cancelled.
pub(crate) enum Deliveries {
    /// A lapin consumer.
    Amqp(lapin::Consumer),
    /// A consumer of the in-memory broker.
    #[cfg(any(test, feature = "test-util"))]
    Memory(memory::MemoryDeliveries),
}

/// The broker's answer to one publish on a channel in confirm mode.
pub(crate) enum Confirm {
    /// lapin's publisher confirm.
    Amqp(lapin::PublisherConfirm),
    /// The in-memory broker's confirm.
    #[cfg(any(test, feature = "test-util"))]
    Memory(memory::MemoryConfirm),
}

/// A connection's events, as a stream.
pub(crate) enum Events {
    /// lapin's events listener.
    Amqp(Pin<Box<dyn Stream<Item = lapin::Event> + Send>>),
    /// The in-memory broker's events.
    #[cfg(any(test, feature = "test-util"))]
    Memory(memory::MemoryEvents),
}

/// A delivery as it comes from the broker, before conejo makes a [`Context`](crate::Context)
/// of it: lapin's own, so that the production path moves it as lapin made it (its acker is
/// never used: settlements go through the channel's settle task). The in-memory broker
/// makes them with [`incoming`].
pub(crate) type Incoming = lapin::message::Delivery;

/// A delivery made by conejo (the in-memory broker).
#[cfg(any(test, feature = "test-util"))]
pub(crate) fn incoming(
    tag: u64,
    exchange: ShortString,
    routing_key: ShortString,
    redelivered: bool,
    properties: BasicProperties,
    body: &[u8],
) -> Incoming {
    let mut delivery =
        lapin::message::Delivery::mock(tag, exchange, routing_key, redelivered, body.to_vec());
    delivery.properties = properties;
    delivery
}

/// A message taken with [`Channel::get`], and how many were left behind it.
#[derive(Debug)]
#[cfg_attr(not(feature = "admin"), allow(dead_code))]
pub(crate) struct Got {
    /// The message.
    pub(crate) message: Incoming,
    /// Messages still ready in the queue after this one.
    pub(crate) remaining: u32,
}

/// What a connection reports besides deliveries.
#[derive(Debug)]
pub(crate) enum Event {
    /// An error: the connection's when it is no longer connected (it is lost), else a
    /// channel's.
    Error(BrokerError),
    /// The broker stopped reading from the connection (a resource alarm), with its reason.
    Blocked(String),
    /// The broker reads from the connection again.
    Unblocked,
    /// Anything else (connected, flow…): nothing conejo acts on.
    Other,
}

/// How the broker answered a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Confirmed {
    /// Taken (and routed, if it was published `mandatory`).
    Ack,
    /// Published `mandatory` and routed to no queue: returned, then confirmed.
    Returned {
        /// The broker's reply code (312 NO_ROUTE).
        code: u16,
        /// The broker's reply text.
        text: String,
    },
    /// Refused (`basic.nack`): the broker could not take it.
    Nack,
    /// The channel is not in confirm mode: nothing was confirmed.
    NotRequested,
}

/// Flags of a queue declaration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct QueueOptions {
    /// Only check that the queue exists (404 when it does not).
    pub(crate) passive: bool,
    /// Survives a broker restart.
    pub(crate) durable: bool,
    /// Used by this connection only, deleted with it.
    pub(crate) exclusive: bool,
    /// Deleted when its last consumer goes.
    pub(crate) auto_delete: bool,
}

/// Flags of an exchange declaration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ExchangeOptions {
    /// Only check that the exchange exists (404 when it does not).
    pub(crate) passive: bool,
    /// Survives a broker restart.
    pub(crate) durable: bool,
    /// Deleted when its last binding goes.
    pub(crate) auto_delete: bool,
}

/// What the broker answered a queue declaration with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct QueueState {
    /// Messages ready in the queue.
    pub(crate) messages: u32,
    /// Consumers on it.
    pub(crate) consumers: u32,
}

/// How a consumer is registered.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConsumeOptions {
    /// The only consumer of the queue while it lives.
    pub(crate) exclusive: bool,
    /// The broker considers each delivery settled as it sends it (direct reply-to).
    pub(crate) no_ack: bool,
    /// Consumer arguments (`x-priority`, `x-stream-offset`…).
    pub(crate) arguments: FieldTable,
}

impl Broker {
    /// lapin over AMQP, its tasks on a dedicated connection runtime — or, when
    /// `dedicated_runtime` is false, on the current one: for the operator's tools, which run
    /// no handlers, and for the hazard tests.
    pub(crate) fn amqp(tls: TlsSetup, dedicated_runtime: bool) -> Result<Self, Error> {
        amqp::Amqp::new(tls, dedicated_runtime).map(Broker::Amqp)
    }

    /// Where the transport's tasks run: conejo's connection runtime for `amqp`. Probes and
    /// the health server run there too, so they answer while handlers hog their runtime.
    pub(crate) fn handle(&self) -> &tokio::runtime::Handle {
        match self {
            Broker::Amqp(amqp) => amqp.handle(),
            #[cfg(any(test, feature = "test-util"))]
            Broker::Memory(memory) => memory.handle(),
        }
    }

    /// Connects to `url`, naming the connection `name`, within `timeout`.
    pub(crate) async fn connect(
        &self,
        url: &AmqpUrl,
        name: &str,
        timeout: Duration,
    ) -> Result<Connection, Error> {
        match self {
            Broker::Amqp(amqp) => amqp.connect(url, name, timeout).await.map(Connection::Amqp),
            #[cfg(any(test, feature = "test-util"))]
            Broker::Memory(memory) => memory
                .connect(url, name, timeout)
                .await
                .map(Connection::Memory),
        }
    }
}

impl Connection {
    /// False once the connection failed or was closed.
    pub(crate) fn is_connected(&self) -> bool {
        match self {
            Connection::Amqp(c) => c.is_connected(),
            #[cfg(any(test, feature = "test-util"))]
            Connection::Memory(c) => c.is_connected(),
        }
    }

    /// Runs `future` where the connection's tasks run.
    pub(crate) fn spawn<F>(&self, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self {
            Connection::Amqp(c) => c.runtime().spawn(future),
            #[cfg(any(test, feature = "test-util"))]
            Connection::Memory(c) => c.handle().spawn(future),
        }
    }

    /// Runs a sequence of broker operations where the connection's tasks run, and waits for
    /// it from here.
    pub(crate) async fn run<F, T>(&self, future: F) -> Result<T, BrokerError>
    where
        F: Future<Output = Result<T, BrokerError>> + Send + 'static,
        T: Send + 'static,
    {
        match self.spawn(future).await {
            Ok(result) => result,
            Err(join) => Err(other(format!("connection task failed: {join}"))),
        }
    }

    /// As [`run`](Self::run), giving up after `limit`: a broker that stopped answering must
    /// not hang a shutdown or a publish.
    pub(crate) async fn run_within<F, T>(
        &self,
        limit: Duration,
        what: &str,
        future: F,
    ) -> Result<T, BrokerError>
    where
        F: Future<Output = Result<T, BrokerError>> + Send + 'static,
        T: Send + 'static,
    {
        match tokio::time::timeout(limit, self.run(future)).await {
            Ok(result) => result,
            Err(_) => Err(timed_out(what, limit)),
        }
    }

    /// Opens a channel.
    pub(crate) async fn open_channel(&self) -> Result<Channel, BrokerError> {
        match self {
            Connection::Amqp(c) => c.lapin().create_channel().await.map(Channel::Amqp),
            #[cfg(any(test, feature = "test-util"))]
            Connection::Memory(c) => c.open_channel().await.map(Channel::Memory),
        }
    }

    /// The connection's events from now on.
    pub(crate) fn events(&self) -> Events {
        match self {
            Connection::Amqp(c) => Events::Amqp(Box::pin(c.lapin().events_listener())),
            #[cfg(any(test, feature = "test-util"))]
            Connection::Memory(c) => Events::Memory(c.events()),
        }
    }

    /// Closes the connection (connection.close / close-ok).
    pub(crate) async fn close(&self, text: &str) -> Result<(), BrokerError> {
        match self {
            Connection::Amqp(c) => {
                if !c.is_connected() {
                    return Ok(());
                }
                c.lapin().close(200, ShortString::from(text)).await
            }
            #[cfg(any(test, feature = "test-util"))]
            Connection::Memory(c) => c.close().await,
        }
    }
}

impl Channel {
    /// False once the channel was closed, by either side, or its connection lost.
    pub(crate) fn is_open(&self) -> bool {
        match self {
            Channel::Amqp(c) => c.status().connected(),
            #[cfg(any(test, feature = "test-util"))]
            Channel::Memory(c) => c.is_open(),
        }
    }

    /// Limits the unacknowledged deliveries of the channel's consumers (`basic.qos`, per
    /// consumer).
    pub(crate) async fn qos(&self, prefetch: u16) -> Result<(), BrokerError> {
        match self {
            Channel::Amqp(c) => amqp::qos(c, prefetch).await,
            #[cfg(any(test, feature = "test-util"))]
            Channel::Memory(c) => c.qos(prefetch).await,
        }
    }

    /// Declares an exchange (or, passive, checks it exists).
    pub(crate) async fn declare_exchange(
        &self,
        name: &str,
        kind: ExchangeKind,
        options: ExchangeOptions,
        arguments: FieldTable,
    ) -> Result<(), BrokerError> {
        match self {
            Channel::Amqp(c) => amqp::declare_exchange(c, name, kind, options, arguments).await,
            #[cfg(any(test, feature = "test-util"))]
            Channel::Memory(c) => c.declare_exchange(name, kind, options, arguments).await,
        }
    }

    /// Declares a queue (or, passive, checks it exists).
    pub(crate) async fn declare_queue(
        &self,
        name: &str,
        options: QueueOptions,
        arguments: FieldTable,
    ) -> Result<QueueState, BrokerError> {
        match self {
            Channel::Amqp(c) => amqp::declare_queue(c, name, options, arguments).await,
            #[cfg(any(test, feature = "test-util"))]
            Channel::Memory(c) => c.declare_queue(name, options, arguments).await,
        }
    }

    /// Deletes a queue (its consumers are cancelled, its messages gone); deleting one that
    /// does not exist succeeds.
    #[cfg_attr(not(feature = "test-util"), allow(dead_code))]
    pub(crate) async fn delete_queue(&self, name: &str) -> Result<(), BrokerError> {
        match self {
            Channel::Amqp(c) => amqp::delete_queue(c, name).await,
            #[cfg(any(test, feature = "test-util"))]
            Channel::Memory(c) => c.delete_queue(name).await,
        }
    }

    /// Deletes an exchange and its bindings; deleting one that does not exist succeeds.
    #[cfg_attr(not(feature = "test-util"), allow(dead_code))]
    pub(crate) async fn delete_exchange(&self, name: &str) -> Result<(), BrokerError> {
        match self {
            Channel::Amqp(c) => amqp::delete_exchange(c, name).await,
            #[cfg(any(test, feature = "test-util"))]
            Channel::Memory(c) => c.delete_exchange(name).await,
        }
    }

    /// Binds `queue` to `exchange` with `routing_key`.
    pub(crate) async fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), BrokerError> {
        match self {
            Channel::Amqp(c) => amqp::bind_queue(c, queue, exchange, routing_key, arguments).await,
            #[cfg(any(test, feature = "test-util"))]
            Channel::Memory(c) => c.bind_queue(queue, exchange, routing_key, arguments).await,
        }
    }

    /// Starts consuming `queue` as `tag`, acknowledging manually.
    pub(crate) async fn consume(
        &self,
        queue: &str,
        tag: &str,
        options: ConsumeOptions,
    ) -> Result<Deliveries, BrokerError> {
        match self {
            Channel::Amqp(c) => amqp::consume(c, queue, tag, options)
                .await
                .map(Deliveries::Amqp),
            #[cfg(any(test, feature = "test-util"))]
            Channel::Memory(c) => c.consume(queue, tag, options).await.map(Deliveries::Memory),
        }
    }

    /// Cancels the consumer `tag` (`basic.cancel`, waiting for cancel-ok). Its stream then
    /// yields what was already delivered, and ends.
    pub(crate) async fn cancel(&self, tag: &str) -> Result<(), BrokerError> {
        match self {
            Channel::Amqp(c) => amqp::cancel(c, tag).await,
            #[cfg(any(test, feature = "test-util"))]
            Channel::Memory(c) => c.cancel(tag).await,
        }
    }

    /// `basic.ack`. The frame is queued, in order, when the future is first polled; the
    /// future resolves once it is written (what lets the settle task queue many frames
    /// before it waits for any).
    pub(crate) async fn ack(&self, tag: u64, multiple: bool) -> Result<(), BrokerError> {
        match self {
            Channel::Amqp(c) => amqp::ack(c, tag, multiple).await,
            #[cfg(any(test, feature = "test-util"))]
            Channel::Memory(c) => c.ack(tag, multiple).await,
        }
    }

    /// `basic.nack`, as [`ack`](Self::ack); `requeue` gives the messages back.
    pub(crate) async fn nack(
        &self,
        tag: u64,
        multiple: bool,
        requeue: bool,
    ) -> Result<(), BrokerError> {
        match self {
            Channel::Amqp(c) => amqp::nack(c, tag, multiple, requeue).await,
            #[cfg(any(test, feature = "test-util"))]
            Channel::Memory(c) => c.nack(tag, multiple, requeue).await,
        }
    }

    /// Puts the channel in confirm mode: every later publish is confirmed by the broker.
    pub(crate) async fn confirm_select(&self) -> Result<(), BrokerError> {
        match self {
            Channel::Amqp(c) => amqp::confirm_select(c).await,
            #[cfg(any(test, feature = "test-util"))]
            Channel::Memory(c) => c.confirm_select().await,
        }
    }

    /// Publishes a message; `mandatory` has it returned when no queue takes it. Resolves
    /// once the frames are sent; the [`Confirm`] resolves when the broker confirmed it.
    pub(crate) async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<Confirm, BrokerError> {
        match self {
            Channel::Amqp(c) => {
                amqp::publish(c, exchange, routing_key, mandatory, body, properties)
                    .await
                    .map(Confirm::Amqp)
            }
            #[cfg(any(test, feature = "test-util"))]
            Channel::Memory(c) => c
                .publish(exchange, routing_key, mandatory, body, properties)
                .await
                .map(Confirm::Memory),
        }
    }

    /// Takes one message from `queue` (`basic.get`, manual ack); `None` when it is empty.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) async fn get(&self, queue: &str) -> Result<Option<Got>, BrokerError> {
        match self {
            Channel::Amqp(c) => amqp::get(c, queue).await,
            #[cfg(any(test, feature = "test-util"))]
            Channel::Memory(c) => c.get(queue).await,
        }
    }

    /// Closes the channel (channel.close / close-ok): what it holds unacknowledged goes back
    /// to its queues.
    pub(crate) async fn close(&self, text: &str) -> Result<(), BrokerError> {
        match self {
            Channel::Amqp(c) => c.close(200, ShortString::from(text)).await,
            #[cfg(any(test, feature = "test-util"))]
            Channel::Memory(c) => c.close().await,
        }
    }
}

impl Deliveries {
    /// The consumer's tag.
    pub(crate) fn tag(&self) -> String {
        match self {
            Deliveries::Amqp(consumer) => consumer.tag().to_string(),
            #[cfg(any(test, feature = "test-util"))]
            Deliveries::Memory(deliveries) => deliveries.tag().to_owned(),
        }
    }
}

impl Stream for Deliveries {
    type Item = Result<Incoming, BrokerError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match self.get_mut() {
            Deliveries::Amqp(consumer) => Pin::new(consumer).poll_next(cx),
            #[cfg(any(test, feature = "test-util"))]
            Deliveries::Memory(deliveries) => Pin::new(deliveries).poll_next(cx),
        }
    }
}

impl Future for Confirm {
    type Output = Result<Confirmed, BrokerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Confirm::Amqp(confirm) => Pin::new(confirm)
                .poll(cx)
                .map(|confirmation| confirmation.map(amqp::confirmed)),
            #[cfg(any(test, feature = "test-util"))]
            Confirm::Memory(confirm) => Pin::new(confirm).poll(cx),
        }
    }
}

impl Stream for Events {
    type Item = Event;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        match self.get_mut() {
            Events::Amqp(events) => events
                .as_mut()
                .poll_next(cx)
                .map(|next| next.map(amqp::event)),
            #[cfg(any(test, feature = "test-util"))]
            Events::Memory(events) => Pin::new(events).poll_next(cx),
        }
    }
}

/// The program's name: the default name of its connections.
pub(crate) fn program_name() -> String {
    std::env::args_os()
        .next()
        .and_then(|arg0| {
            std::path::Path::new(&arg0)
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "conejo".to_owned())
}

/// An error of conejo's own making at the boundary (a task that failed).
pub(crate) fn other(message: String) -> BrokerError {
    BrokerError::from(std::io::Error::other(message))
}

/// The error of an operation that got no answer within `limit`.
pub(crate) fn timed_out(what: &str, limit: Duration) -> BrokerError {
    BrokerError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("{what}: no answer from the broker within {limit:?}"),
    ))
}

/// The broker's reply code, for a protocol error (404, 406, 320…).
pub(crate) fn reply_code(error: &BrokerError) -> Option<u16> {
    match error.kind() {
        lapin::ErrorKind::ProtocolError(amqp) => Some(amqp.get_id()),
        _ => None,
    }
}

/// True for the broker's 404 NOT_FOUND (a passive declaration of something missing).
pub(crate) fn is_not_found(error: &BrokerError) -> bool {
    reply_code(error) == Some(404)
}
