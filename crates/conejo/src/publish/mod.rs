//! Publishing, confirmed, on conejo's own connection: a [`Publisher`] hands each message to
//! a link task on the connection runtime — never the caller's runtime, so a caller burning
//! every core costs no heartbeat — which publishes it on a channel of its own in confirm
//! mode, `mandatory`, with many messages in flight at once.
//!
//! - `message`: what is published ([`Message`], [`Encode`]);
//! - `link`: the link task — its connection (made on the first publish, re-made when lost),
//!   its channel, the confirms in flight, the replies of requests;
//! - `state`, `completion`, `reply`, `error`: what the link shares with its handles.
//!
//! A service's publisher ([`Conejo::publisher`](crate::Conejo::publisher)) has its own
//! connection beside the consuming one: under a resource alarm RabbitMQ stops reading from
//! connections that publish, and acks must keep flowing. Its retry copies and dead letters
//! go through it too.
//!
//! May use: `broker`, `observe`, `error`, `headers`.
//!
//! Why it is ~790 lines: the public API of publishing (`Publisher`, its builder and
//! settings) with its documentation and examples; the machinery is in the submodules.

mod completion;
mod error;
mod link;
mod message;
mod reply;
mod state;
#[cfg(test)]
mod tests;

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use lapin::{BasicProperties, types::ShortString};
use tokio::{
    sync::{Semaphore, mpsc, oneshot},
    task::JoinHandle,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, field, info_span};

use self::link::{Ask, Done, Outgoing, REPLY_TO};
pub(crate) use self::{
    completion::{Completion, Ledger},
    link::{LinkTarget, Request},
    state::LinkShared,
};
pub use self::{
    error::{PublishError, RequestError},
    message::{Encode, EncodeError, HeaderValue, Message},
    reply::Reply,
    state::PublisherState,
};
use crate::{
    Error,
    broker::{AmqpUrl, Broker, BrokerError, Connection, TlsSetup, url::parse_list},
    observe::{
        stats::{PublishCounters, PublishStats},
        status::StatusWriter,
    },
};

/// Default time a publish may take, from the call to the broker's confirm: waiting for a
/// connection, a free place among the messages in flight, an unblocked connection, and the
/// confirm itself.
pub const DEFAULT_PUBLISH_TIMEOUT: Duration = Duration::from_secs(30);

/// Default number of messages a publisher keeps in flight (sent, or waiting to be, and not
/// yet confirmed); a publish beyond it waits for a place: memory stays bounded.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;

/// How a publisher publishes.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PublishSettings {
    /// The longest a publish may take, confirm included.
    pub(crate) timeout: Duration,
    /// Messages in flight at most.
    pub(crate) max_in_flight: usize,
}

impl Default for PublishSettings {
    fn default() -> Self {
        PublishSettings {
            timeout: DEFAULT_PUBLISH_TIMEOUT,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
        }
    }
}

impl PublishSettings {
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(3600) {
            return Err(Error::config(
                None,
                "publish timeout must be between 1 ns and 1 h",
            ));
        }
        if self.max_in_flight == 0 || self.max_in_flight > Semaphore::MAX_PERMITS {
            return Err(Error::config(
                None,
                "publisher max in flight must be at least 1",
            ));
        }
        Ok(())
    }
}

/// Publishes messages, confirmed by the broker. Cheap to clone: hand it to handlers (like a
/// database pool) and to the rest of the application.
///
/// A service's publisher comes from [`Conejo::publisher`](crate::Conejo::publisher), before
/// or while it runs; [`Publisher::connect`] makes one for a program that consumes nothing
/// (an HTTP service taking orders), with its own connection runtime.
///
/// ```no_run
/// use conejo::{Json, Message, Publisher};
///
/// #[derive(serde::Serialize)]
/// struct OrderPlaced { id: u64 }
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let publisher = Publisher::connect("amqp://guest:guest@127.0.0.1:5672/%2f").await?;
/// // Returns once the broker confirmed it: it is on the broker.
/// publisher.publish("shop", "order.placed", Json(OrderPlaced { id: 7 })).await?;
/// publisher
///     .send(Message::new("shop", "order.placed", Json(OrderPlaced { id: 8 })).message_id("order-8"))
///     .await?;
/// publisher.close().await;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
}

/// What every clone of a [`Publisher`] shares.
struct Inner {
    /// The link's queue.
    requests: mpsc::UnboundedSender<Request>,
    /// Places among the messages in flight (none until a service's publisher is
    /// configured by `build()`).
    permits: Arc<Semaphore>,
    /// Timeout and bound: a service's are set by `build()`, after the handlers that hold the
    /// publisher were registered.
    settings: std::sync::RwLock<PublishSettings>,
    /// The link's state and counters.
    shared: Arc<LinkShared>,
    /// The link's end of the queue, until a service starts the link (`run`).
    waiting_link: Mutex<Option<mpsc::UnboundedReceiver<Request>>>,
    /// A standalone publisher's link: stopped by [`Publisher::close`].
    owned: Option<Owned>,
}

/// The link a standalone publisher runs itself.
struct Owned {
    /// Stops the link.
    stop: CancellationToken,
    /// The link task, awaited by `close`.
    task: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("state", &self.inner.shared.state())
            .field("settings", &self.settings())
            .finish_non_exhaustive()
    }
}

/// Builds a standalone [`Publisher`]: its own connection (with its own connection runtime),
/// for a program that consumes nothing.
#[must_use]
#[derive(Debug)]
pub struct PublisherBuilder {
    urls: Result<Vec<AmqpUrl>, Error>,
    name: Option<String>,
    settings: PublishSettings,
    connect_timeout: Duration,
    backoff: (Duration, Duration),
    #[cfg(feature = "tls")]
    tls: Option<crate::TlsConfig>,
    #[cfg(any(test, feature = "test-util"))]
    memory: Option<crate::broker::memory::Memory>,
    /// Test-only: lapin on the caller's runtime (the hazard conejo exists to avoid).
    on_callers_runtime: bool,
}

impl PublisherBuilder {
    /// **Do not use.** Runs the publisher's lapin on the caller's runtime instead of a
    /// dedicated one (feature `test-hooks`): the setup that loses its connection when the
    /// application hogs that runtime. Exists so tests can show that hazard.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    pub fn lapin_on_the_callers_runtime(mut self) -> Self {
        self.on_callers_runtime = true;
        self
    }

    /// The connection's name as the broker shows it (default: the program's name, then
    /// `-publish`).
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// The longest a publish may take, confirm included (default 30 s).
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.settings.timeout = timeout;
        self
    }

    /// Messages in flight at most (default 1024): a publish beyond it waits for a place.
    pub fn max_in_flight(mut self, max: usize) -> Self {
        self.settings.max_in_flight = max;
        self
    }

    /// How long one connection attempt may take (default 15 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Back-off between reconnection attempts (default 100 ms doubling to 5 s).
    pub fn reconnect_delay(mut self, initial: Duration, max: Duration) -> Self {
        self.backoff = (initial, max);
        self
    }

    /// TLS settings for `amqps://` URLs (feature `tls`), as for a service.
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls(mut self, config: crate::TlsConfig) -> Self {
        self.tls = Some(config);
        self
    }

    /// Publishes to the in-memory broker `memory` (tests).
    #[cfg(any(test, feature = "test-util"))]
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn memory(mut self, memory: &crate::broker::memory::Memory) -> Self {
        self.memory = Some(memory.clone());
        self
    }

    /// Connects (each address once) and starts the publisher's link.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] or [`Error::InvalidConfig`] for bad settings; [`Error::Connect`]
    /// when no address answers, or the broker refuses the connection. Once connected, a lost
    /// connection is re-made in the background, and publishes wait for it.
    pub async fn connect(mut self) -> Result<Publisher, Error> {
        let urls = std::mem::replace(&mut self.urls, Ok(Vec::new()))?;
        self.settings.validate()?;
        #[cfg(feature = "tls")]
        let tls = match &self.tls {
            Some(config) => config.load()?,
            None => TlsSetup::default(),
        };
        #[cfg(not(feature = "tls"))]
        let tls = TlsSetup::default();
        if !cfg!(feature = "tls")
            && let Some(url) = urls.iter().find(|url| url.is_tls())
        {
            return Err(Error::config(
                None,
                format!("{url} needs TLS, which this build of conejo lacks"),
            ));
        }
        let broker = self.broker(tls)?;
        let name = self
            .name
            .unwrap_or_else(|| format!("{}-publish", crate::broker::program_name()));
        let mut first = None;
        let mut failure = None;
        for url in &urls {
            match broker.connect(url, &name, self.connect_timeout).await {
                Ok(connection) => {
                    first = Some(connection);
                    break;
                }
                Err(error) if error.is_refused() => return Err(error),
                Err(error) => failure = Some(error),
            }
        }
        let Some(first) = first else {
            return Err(failure.unwrap_or_else(|| Error::config(None, "no broker address")));
        };
        let target = LinkTarget {
            broker: broker.clone(),
            urls,
            name,
            connect_timeout: self.connect_timeout,
            backoff: self.backoff,
        };
        let counters = Arc::new(PublishCounters::default());
        let (publisher, requests) = Publisher::unstarted(counters);
        publisher.configure(self.settings, None);
        let stop = CancellationToken::new();
        let task = broker.handle().spawn(link::run(
            target,
            requests,
            Arc::clone(&publisher.inner.shared),
            stop.clone(),
            Some(first),
        ));
        let Publisher { inner } = publisher;
        let inner = Inner {
            owned: Some(Owned {
                stop,
                task: Mutex::new(Some(task)),
            }),
            ..Arc::into_inner(inner).expect("the only handle")
        };
        Ok(Publisher {
            inner: Arc::new(inner),
        })
    }

    fn broker(&self, tls: TlsSetup) -> Result<Broker, Error> {
        #[cfg(any(test, feature = "test-util"))]
        if let Some(memory) = &self.memory {
            let _ = tls;
            return Ok(Broker::Memory(memory.clone()));
        }
        Broker::amqp(tls, !self.on_callers_runtime)
    }
}

impl Publisher {
    /// Starts building a standalone publisher connecting to `url` (a comma-separated list
    /// for a cluster, as for [`Conejo::builder`](crate::Conejo::builder)).
    pub fn builder(url: impl AsRef<str>) -> PublisherBuilder {
        PublisherBuilder {
            urls: parse_list(url.as_ref()),
            name: None,
            settings: PublishSettings::default(),
            connect_timeout: crate::broker::DEFAULT_CONNECT_TIMEOUT,
            backoff: crate::broker::DEFAULT_RECONNECT_DELAY,
            #[cfg(feature = "tls")]
            tls: None,
            #[cfg(any(test, feature = "test-util"))]
            memory: None,
            on_callers_runtime: false,
        }
    }

    /// A standalone publisher with the defaults: `Publisher::builder(url).connect()`.
    ///
    /// # Errors
    /// As [`PublisherBuilder::connect`].
    pub async fn connect(url: impl AsRef<str>) -> Result<Publisher, Error> {
        Publisher::builder(url).connect().await
    }

    /// A publisher whose link is not running yet, and the link's end of its queue; it takes
    /// no message until [`configure`](Self::configure)d.
    fn unstarted(counters: Arc<PublishCounters>) -> (Publisher, mpsc::UnboundedReceiver<Request>) {
        let (requests, receiver) = mpsc::unbounded_channel();
        let publisher = Publisher {
            inner: Arc::new(Inner {
                requests,
                permits: Arc::new(Semaphore::new(0)),
                settings: std::sync::RwLock::new(PublishSettings::default()),
                shared: Arc::new(LinkShared::new(counters)),
                waiting_link: Mutex::new(None),
                owned: None,
            }),
        };
        (publisher, receiver)
    }

    /// A service's publisher, handed out by the builder before the service is built; its link
    /// is started by the service's run.
    pub(crate) fn for_service() -> Publisher {
        let (publisher, receiver) = Publisher::unstarted(Arc::default());
        *publisher
            .inner
            .waiting_link
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some(receiver);
        publisher
    }

    /// Sets the publisher's timeout and bound (once; later calls change nothing), and the
    /// service status it reports a blocked connection to.
    pub(crate) fn configure(&self, settings: PublishSettings, status: Option<Arc<StatusWriter>>) {
        if let Some(status) = status {
            self.inner.shared.report_to(status);
        }
        let mut current = self
            .inner
            .settings
            .write()
            .unwrap_or_else(|e| e.into_inner());
        if self.inner.permits.available_permits() == 0 && !self.inner.shared.configured() {
            *current = settings;
            self.inner.permits.add_permits(settings.max_in_flight);
            self.inner.shared.mark_configured();
        }
    }

    /// The publisher's counters, shared with the service's stats.
    pub(crate) fn counters(&self) -> Arc<PublishCounters> {
        Arc::clone(self.inner.shared.counters_arc())
    }

    fn settings(&self) -> PublishSettings {
        *self
            .inner
            .settings
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the service's link on `target`'s runtime (once: `None` after).
    pub(crate) fn start_link(
        &self,
        target: LinkTarget,
        stop: CancellationToken,
    ) -> Option<JoinHandle<()>> {
        let receiver = self
            .inner
            .waiting_link
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()?;
        let handle = target.broker.handle().clone();
        Some(handle.spawn(link::run(
            target,
            receiver,
            Arc::clone(&self.inner.shared),
            stop,
            None,
        )))
    }

    /// Where the publisher stands.
    #[must_use]
    pub fn state(&self) -> PublisherState {
        self.inner.shared.state()
    }

    /// Waits until the state changes.
    pub async fn state_changed(&self) -> PublisherState {
        let mut states = self.inner.shared.subscribe();
        let _ = states.changed().await;
        states.borrow().clone()
    }

    /// The publisher's counters.
    #[must_use]
    pub fn stats(&self) -> PublishStats {
        self.inner.shared.counters().snapshot()
    }

    /// Incremented at each connection of the link (what it declared may be gone).
    pub(crate) fn generation(&self) -> u64 {
        self.inner.shared.generation()
    }

    /// Publishes `body` to `exchange` with `routing_key` and waits for the broker's confirm:
    /// [`send`](Self::send) of a [`Message::new`].
    ///
    /// # Errors
    /// As [`send`](Self::send).
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: impl Encode,
    ) -> Result<(), PublishError> {
        self.send(Message::new(exchange, routing_key, body)).await
    }

    /// Publishes `message` and waits for the broker's confirm: `Ok` means it is on the
    /// broker (routed to a queue, since it is `mandatory` unless said otherwise). Waits, up
    /// to the publish timeout, for a connection while there is none, for a place among the
    /// messages in flight, and while the broker blocks the connection.
    ///
    /// # Errors
    /// A [`PublishError`] saying what happened; after some the message may be on the broker
    /// anyway ([`PublishError::may_have_been_published`]).
    pub async fn send(&self, message: Message) -> Result<(), PublishError> {
        let span = publish_span(&message);
        async {
            let deadline = Instant::now() + self.settings().timeout;
            let (done, answer) = oneshot::channel();
            let result = match self
                .enqueue(message, Done::caller(done), deadline, true)
                .await
            {
                Err(error) => Err(error),
                Ok(()) => match tokio::time::timeout_at(deadline, answer).await {
                    Ok(Ok(result)) => result,
                    Ok(Err(_)) => Err(PublishError::Closed),
                    Err(_) => Err(PublishError::Timeout(self.settings().timeout)),
                },
            };
            record(&result);
            result
        }
        .instrument(span)
        .await
    }

    /// Hands `message` over without waiting for its confirm: **fire-and-forget**. Returns
    /// once the publisher took it (waiting, if need be, for a place among the messages in
    /// flight); whether the broker confirmed it is only logged. For messages whose loss is
    /// acceptable (metrics, notifications); use [`send`](Self::send) otherwise.
    ///
    /// # Errors
    /// [`PublishError::Encode`], [`PublishError::Closed`], or [`PublishError::Timeout`] when
    /// no place came free in time.
    pub async fn send_fire_and_forget(&self, message: Message) -> Result<(), PublishError> {
        let deadline = Instant::now() + self.settings().timeout;
        self.enqueue(message, Done::nobody(), deadline, true).await
    }

    /// Publishes a request with RabbitMQ's direct reply-to (`reply-to` set to
    /// `amq.rabbitmq.reply-to`, a correlation id unless the message has one) and waits, up
    /// to `timeout`, for its reply. Many requests can be in flight at once over the
    /// publisher's one reply consumer. The server side is a
    /// [`Responder`](crate::Responder).
    ///
    /// ```no_run
    /// # async fn run(publisher: conejo::Publisher) -> Result<(), Box<dyn std::error::Error>> {
    /// use std::time::Duration;
    /// use conejo::{Json, Message};
    ///
    /// let reply = publisher
    ///     .request(Message::to_queue("prices", Json("SKU-1")), Duration::from_secs(5))
    ///     .await?;
    /// let Json(price): Json<u64> = reply.decode()?;
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`RequestError::Publish`] when the request itself was not confirmed (e.g. no queue
    /// took it), [`RequestError::NoReply`] after `timeout`, [`RequestError::ConnectionLost`].
    pub async fn request(
        &self,
        message: Message,
        timeout: Duration,
    ) -> Result<Reply, RequestError> {
        let span = publish_span(&message);
        async {
            let deadline = Instant::now() + timeout;
            let correlation = message
                .properties
                .correlation_id()
                .as_ref()
                .map(ShortString::to_string)
                .unwrap_or_else(correlation_id);
            let message = message
                .correlation_id(correlation.clone())
                .reply_to(REPLY_TO);
            let (reply, answer) = oneshot::channel();
            let outgoing = self
                .prepare(message, Done::nobody(), deadline, true)
                .await?;
            let ask = Ask {
                message: outgoing,
                correlation,
                reply,
            };
            self.hand_over(Request::Ask(ask))?;
            match tokio::time::timeout_at(deadline, answer).await {
                Ok(Ok(result)) => result,
                Ok(Err(_)) => Err(RequestError::Publish(PublishError::Closed)),
                Err(_) => Err(RequestError::NoReply(timeout)),
            }
        }
        .instrument(span)
        .await
    }

    /// Publishes `message` for a delivery: `completion` learns the confirm, and so does the
    /// delivery's ledger. Internal to handlers' publishes.
    pub(crate) async fn send_tracked(
        &self,
        message: Message,
        ledger: &Ledger,
    ) -> Result<(), PublishError> {
        let span = publish_span(&message);
        async {
            let deadline = Instant::now() + self.settings().timeout;
            let completion = Arc::new(Completion::new(deadline));
            let enqueued = self
                .enqueue(
                    message,
                    Done::shared(Arc::clone(&completion)),
                    deadline,
                    true,
                )
                .await;
            let result = match enqueued {
                Err(error) => Err(error),
                Ok(()) => {
                    ledger.track(Arc::clone(&completion));
                    completion.wait().await
                }
            };
            record(&result);
            result
        }
        .instrument(span)
        .await
    }

    /// Publishes a copy conejo makes (a retry, a dead letter, a counted redelivery): its
    /// properties as they are, `mandatory`, confirmed.
    pub(crate) async fn send_copy(
        &self,
        exchange: &str,
        routing_key: &str,
        body: Bytes,
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let message = Message {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            body: Ok(body),
            properties,
            mandatory: true,
        };
        let deadline = Instant::now() + self.settings().timeout;
        let (done, answer) = oneshot::channel();
        self.enqueue(message, Done::caller(done), deadline, false)
            .await?;
        match tokio::time::timeout_at(deadline, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(PublishError::Closed),
            Err(_) => Err(PublishError::Timeout(self.settings().timeout)),
        }
    }

    /// Runs `work` on the publisher's connection (declarations conejo needs before a copy),
    /// within the publish timeout; returns the generation of the connection it ran on.
    pub(crate) async fn on_connection<F, Fut>(&self, work: F) -> Result<u64, PublishError>
    where
        F: FnOnce(Connection) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<(), BrokerError>> + Send + 'static,
    {
        let (done, answer) = oneshot::channel();
        let run = move |connection: Connection, generation: u64| -> link::BoxFuture {
            Box::pin(async move {
                let _ = done.send(work(connection).await.map(|()| generation));
            })
        };
        self.hand_over(Request::Run(Box::new(run)))?;
        match tokio::time::timeout(self.settings().timeout, answer).await {
            Ok(Ok(Ok(generation))) => Ok(generation),
            Ok(Ok(Err(error))) => Err(PublishError::Channel(Arc::new(error))),
            Ok(Err(_)) => Err(PublishError::Closed),
            Err(_) => Err(PublishError::Timeout(self.settings().timeout)),
        }
    }

    /// Closes the publisher: stops taking messages, waits (a few seconds at most) for the
    /// confirms in flight, closes the connection. Publishes after it fail with
    /// [`PublishError::Closed`]. A service's publisher closes with the service; closing it
    /// from a handle only stops that handle's link if it is a standalone one.
    pub async fn close(&self) {
        if let Some(owned) = &self.inner.owned {
            owned.stop.cancel();
            let task = owned.task.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(task) = task {
                let _ = task.await;
            }
        }
    }

    /// Encodes, injects the trace context, waits for a place, and queues the message.
    async fn enqueue(
        &self,
        message: Message,
        done: Done,
        deadline: Instant,
        traced: bool,
    ) -> Result<(), PublishError> {
        let outgoing = self.prepare(message, done, deadline, traced).await?;
        self.hand_over(Request::Publish(outgoing))
    }

    async fn prepare(
        &self,
        message: Message,
        done: Done,
        deadline: Instant,
        traced: bool,
    ) -> Result<Outgoing, PublishError> {
        let Message {
            exchange,
            routing_key,
            body,
            mut properties,
            mandatory,
        } = message;
        let body = body.map_err(PublishError::Encode)?;
        if traced {
            properties = with_trace_context(properties);
        }
        let permits = Arc::clone(&self.inner.permits);
        let permit = match tokio::time::timeout_at(deadline, permits.acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Err(PublishError::Closed),
            Err(_) => return Err(PublishError::Timeout(self.settings().timeout)),
        };
        Ok(Outgoing {
            exchange,
            routing_key,
            body,
            properties,
            mandatory,
            done,
            permit,
        })
    }

    fn hand_over(&self, request: Request) -> Result<(), PublishError> {
        let counters = self.inner.shared.counters();
        counters.add_waiting();
        self.inner.requests.send(request).map_err(|_| {
            counters.take_waiting();
            counters.count_failed();
            PublishError::Closed
        })
    }
}

/// A correlation id unique to this process and run.
fn correlation_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("conejo-{}-{n}", std::process::id())
}

/// The producer span of one publish, with OpenTelemetry's messaging attributes.
fn publish_span(message: &Message) -> tracing::Span {
    info_span!(
        "publish",
        otel.kind = "producer",
        messaging.system = "rabbitmq",
        messaging.operation.type = "send",
        messaging.destination.name = %message.exchange,
        messaging.rabbitmq.destination.routing_key = %message.routing_key,
        messaging.message.id = message.properties.message_id().as_ref().map(ShortString::as_str),
        outcome = field::Empty,
        error.type = field::Empty,
    )
}

/// Records a publish's outcome in its span.
fn record(result: &Result<(), PublishError>) {
    let span = tracing::Span::current();
    match result {
        Ok(()) => {
            span.record("outcome", "confirmed");
        }
        Err(error) => {
            span.record("outcome", "failed");
            span.record("error.type", error.kind());
        }
    }
}

/// The current span's trace context in the message's headers (feature `opentelemetry`), so
/// that a trace crosses the hop.
fn with_trace_context(properties: BasicProperties) -> BasicProperties {
    #[cfg(feature = "opentelemetry")]
    {
        let mut headers = properties.headers().clone().unwrap_or_default();
        crate::observe::trace_context::inject_current(&mut headers);
        properties.with_headers(headers)
    }
    #[cfg(not(feature = "opentelemetry"))]
    properties
}
