//! The service: a builder to register queues, and `run` to consume them until shutdown.

pub(crate) mod check;
pub(crate) mod signal;

use std::{future::Future, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{
    AmqpUrl, Error, Exchange, Handler, QueueConfig,
    app::check::CheckReport,
    broker::tls::TlsSetup,
    broker::url::parse_list,
    engine::consumer::{Queue, QueueSpec, Timing},
    engine::supervisor::{ConnectPolicy, Supervisor},
    observe::stats::Stats,
    observe::status::{Status, StatusWriter},
    observe::telemetry::Observe,
    service::{BoxService, Layer, Layers, Registration, Service},
};

/// Default time in-flight handlers get to finish at shutdown: well under Kubernetes' 30 s
/// grace period, leaving time to give messages back and close the connection.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);

/// Default time a finished ack may wait to share its frame with others.
pub const DEFAULT_ACK_LINGER: Duration = Duration::from_millis(5);

/// RabbitMQ's default `consumer_timeout` (30 min): a delivery left unacked longer closes its
/// channel.
pub const DEFAULT_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);

/// Longest accepted shutdown timeout.
pub(crate) const MAX_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

/// Longest accepted ack linger.
const MAX_ACK_LINGER: Duration = Duration::from_secs(10);

/// Longest accepted connect timeout.
pub(crate) const MAX_CONNECT_TIMEOUT: Duration = Duration::from_secs(600);

/// Default time one connection attempt (TCP, TLS, AMQP handshake) may take.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);

/// Default back-off between reconnection attempts: the first retry at once, then from
/// 100 ms, doubling, up to 5 s.
pub const DEFAULT_RECONNECT_DELAY: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(5));

/// A RabbitMQ consumer service: queues, their handlers, and the connection conejo owns.
///
/// Build it with [`Conejo::builder`], then [`run`](Conejo::run) it.
///
/// ```no_run
/// use conejo::{Conejo, Context, Handler, HandlerError, Json, QueueConfig};
/// use serde::Deserialize;
///
/// #[derive(Deserialize)]
/// struct Order {
///     id: u64,
/// }
///
/// struct Orders;
///
/// impl Handler for Orders {
///     type Message = Json<Order>;
///
///     async fn handle(&self, Json(order): Json<Order>, _ctx: &Context) -> Result<(), HandlerError> {
///         println!("order {}", order.id);
///         Ok(())
///     }
/// }
///
/// #[tokio::main]
/// async fn main() -> Result<(), conejo::Error> {
///     Conejo::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
///         .queue_with("orders", Orders, QueueConfig::new().concurrency(32))
///         .build()?
///         .run() // until SIGINT or SIGTERM
///         .await
/// }
/// ```
#[derive(Debug)]
pub struct Conejo {
    /// Where the broker is: one address, or a cluster's nodes tried in turn.
    urls: Vec<AmqpUrl>,
    /// Shown by the broker (management UI, `rabbitmqctl list_connections`).
    connection_name: String,
    /// Registered queues, in registration order.
    queues: Vec<QueueSpec>,
    /// Exchanges declared before the queues.
    exchanges: Vec<Exchange>,
    /// Layers around every queue's pipeline.
    layers: Layers,
    timing: Timing,
    /// Fired by [`ShutdownHandle::shutdown`] or by `run`'s signal.
    shutdown: CancellationToken,
    stats: Stats,
    /// Connection attempts and back-off.
    connect: ConnectPolicy,
    /// The live state the application can watch.
    status: Arc<StatusWriter>,
    /// Test-only: lapin on the handler runtime (the hazard conejo exists to avoid).
    shared_runtime: bool,
    /// Test-only: the connection runtime's handle, once it exists.
    #[cfg(feature = "test-util")]
    wedge: crate::testing::RuntimeWedge,
    /// TLS material (CA, client certificate), read once by `build()`.
    tls: TlsSetup,
    /// Metrics and the health server's socket.
    observe: Observe,
}

impl std::fmt::Debug for QueueSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueSpec")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Registers queues and settings; [`build`](Builder::build) validates everything before any
/// connection is made.
#[must_use]
#[derive(Debug)]
pub struct Builder {
    pub(crate) urls: Result<Vec<AmqpUrl>, Error>,
    pub(crate) connection_name: Option<String>,
    pub(crate) queues: Vec<QueueSpec>,
    exchanges: Vec<Exchange>,
    layers: Layers,
    pub(crate) timing: Timing,
    /// The broker's `consumer_timeout`, as the user declares it (for a startup warning).
    consumer_timeout: Duration,
    pub(crate) connect: ConnectPolicy,
    shared_runtime: bool,
    #[cfg(feature = "tls")]
    tls: Option<crate::TlsConfig>,
    /// Settings from a file and the environment, applied by `build()` over the code's.
    #[cfg(feature = "config")]
    settings: Option<crate::settings::Settings>,
    /// Where to serve the health endpoints, bound by `build()`.
    #[cfg(feature = "health")]
    pub(crate) health: Option<std::net::SocketAddr>,
    /// Built for `check` only: no health server (its port may be the running service's).
    #[cfg(feature = "cli")]
    pub(crate) checking: bool,
}

impl Conejo {
    /// Starts building a service that connects to `url`
    /// (`amqp://user:password@host:port/vhost`, `amqps://` for TLS; `?heartbeat=N` sets
    /// the heartbeat interval in seconds).
    ///
    /// A cluster's nodes are given as a comma-separated list, either of URLs
    /// (`amqp://u:p@node1:5672,amqp://u:p@node2:5672`) or of hosts in one URL
    /// (`amqp://u:p@node1:5672,node2:5672,node3:5672/vhost`): conejo connects to the first
    /// that answers and, when a connection is lost, tries the next one first.
    pub fn builder(url: impl AsRef<str>) -> Builder {
        Builder {
            urls: parse_list(url.as_ref()),
            connection_name: None,
            queues: Vec::new(),
            exchanges: Vec::new(),
            layers: Layers::default(),
            timing: Timing {
                shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
                ack_linger: DEFAULT_ACK_LINGER,
            },
            consumer_timeout: DEFAULT_CONSUMER_TIMEOUT,
            connect: ConnectPolicy {
                timeout: DEFAULT_CONNECT_TIMEOUT,
                wait_for_broker: true,
                backoff: DEFAULT_RECONNECT_DELAY,
            },
            shared_runtime: false,
            #[cfg(feature = "tls")]
            tls: None,
            #[cfg(feature = "config")]
            settings: None,
            #[cfg(feature = "health")]
            health: None,
            #[cfg(feature = "cli")]
            checking: false,
        }
    }

    /// Starts building a service configured by `settings` (from a file and the environment,
    /// see [`settings`](crate::settings)): it connects to their `url`, or to
    /// [`DEFAULT_URL`](crate::settings::DEFAULT_URL) when they name none. Same as
    /// `Conejo::builder(url).settings(settings)`.
    ///
    /// ```no_run
    /// # struct Orders;
    /// # impl conejo::Handler for Orders {
    /// #     type Message = Vec<u8>;
    /// #     async fn handle(&self, _: Vec<u8>, _: &conejo::Context) -> Result<(), conejo::HandlerError> { Ok(()) }
    /// # }
    /// # async fn run() -> Result<(), conejo::Error> {
    /// use conejo::{Conejo, settings::Settings};
    ///
    /// // CONEJO_URL, CONEJO_QUEUES__ORDERS__CONCURRENCY=8, …
    /// let settings = Settings::load(None)?;
    /// Conejo::builder_from(&settings).queue("orders", Orders).build()?.run().await
    /// # }
    /// ```
    #[cfg(feature = "config")]
    #[cfg_attr(docsrs, doc(cfg(feature = "config")))]
    pub fn builder_from(settings: &crate::settings::Settings) -> Builder {
        Conejo::builder(crate::settings::DEFAULT_URL).settings(settings)
    }

    /// Test-only (feature `test-util`): a hook that blocks the connection runtime.
    #[cfg(feature = "test-util")]
    #[doc(hidden)]
    #[must_use]
    pub fn connection_runtime_wedge(&self) -> crate::testing::RuntimeWedge {
        self.wedge.clone()
    }

    /// A handle that stops the service from elsewhere (a test, an admin endpoint).
    #[must_use]
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            token: self.shutdown.clone(),
        }
    }

    /// The address the health server is bound to (see [`Builder::health`]): the real port
    /// when port 0 was asked. `None` without a health server.
    ///
    /// ```
    /// # struct Orders;
    /// # impl conejo::Handler for Orders {
    /// #     type Message = Vec<u8>;
    /// #     async fn handle(&self, _: Vec<u8>, _: &conejo::Context) -> Result<(), conejo::HandlerError> { Ok(()) }
    /// # }
    /// # fn main() -> Result<(), conejo::Error> {
    /// let service = conejo::Conejo::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
    ///     .queue("orders", Orders)
    ///     .health_port(0) // any free port, on 127.0.0.1
    ///     .build()?;
    /// let address = service.health_addr().expect("a health server was asked for");
    /// assert!(address.ip().is_loopback() && address.port() != 0);
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "health")]
    #[cfg_attr(docsrs, doc(cfg(feature = "health")))]
    #[must_use]
    pub fn health_addr(&self) -> Option<std::net::SocketAddr> {
        self.observe.health.as_ref().map(|h| h.address())
    }

    /// Live counters of every queue, and the lag of the service's runtimes.
    #[must_use]
    pub fn stats(&self) -> Stats {
        self.stats.clone()
    }

    /// The live connection state (connecting, connected, reconnecting, stopped), whether
    /// each queue is consuming, and the reconnection count: for health checks and metrics.
    #[must_use]
    pub fn status(&self) -> Status {
        self.status.subscribe()
    }

    /// Runs until SIGINT (Ctrl-C) or SIGTERM, or until a [`ShutdownHandle`] fires, then shuts
    /// down gracefully. Returns `Ok(())` after a clean shutdown — also when the signal comes
    /// while conejo is still connecting or reconnecting.
    ///
    /// A lost connection is re-established (see [`Builder::reconnect_delay`]), a channel
    /// closed by the broker is reopened, a consumer cancelled by the broker is consumed
    /// again: none of these ends `run`.
    ///
    /// # Errors
    /// Startup failures (refused credentials, a missing passive queue or dead-letter
    /// exchange, a declaration conflict; an unreachable broker with
    /// [`wait_for_broker(false)`](Builder::wait_for_broker)); in-flight work is still given
    /// back before returning.
    pub async fn run(self) -> Result<(), Error> {
        self.run_until(signal::terminate()).await
    }

    /// Runs until `signal` completes (or a [`ShutdownHandle`] fires), then shuts down
    /// gracefully: stop consuming (`basic.cancel`), give back at once the messages prefetched
    /// but not started (requeued), let in-flight handlers finish and ack them — up to the
    /// [shutdown timeout](Builder::shutdown_timeout), after which unfinished messages are
    /// requeued — then close channels and the connection.
    ///
    /// # Errors
    /// As [`run`](Self::run).
    pub async fn run_until(self, signal: impl Future<Output = ()> + Send) -> Result<(), Error> {
        self.into_supervisor().run(signal).await
    }

    /// Checks the service against the broker without consuming: connects (each address
    /// once, failing at once rather than waiting for the broker), then declares the
    /// exchanges, each queue's dead-letter topology, the queue and its bindings — the same
    /// declarations, by the same code, as [`run`](Self::run) at startup — and disconnects.
    ///
    /// Declaring is the only way AMQP offers to check that a queue or exchange can exist
    /// with the arguments the service asks for, so what is missing gets created, as `run`
    /// would create it; nothing is consumed. A passive queue or exchange is only looked up.
    /// The wait queues of retries are declared on first use by `run`, not here.
    ///
    /// ```no_run
    /// # struct Orders;
    /// # impl conejo::Handler for Orders {
    /// #     type Message = Vec<u8>;
    /// #     async fn handle(&self, _: Vec<u8>, _: &conejo::Context) -> Result<(), conejo::HandlerError> { Ok(()) }
    /// # }
    /// # async fn check() -> Result<(), conejo::Error> {
    /// use conejo::{Conejo, QueueConfig};
    ///
    /// let report = Conejo::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
    ///     .queue_with("orders", Orders, QueueConfig::new().dead_letter_exchange("errors"))
    ///     .build()?
    ///     .check()
    ///     .await?; // Err(DeadLetterExchangeNotFound) when `errors` does not exist
    /// print!("{report}");
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// As [`run`](Self::run) at startup: [`Error::Connect`] when no address answers within
    /// the [connect timeout](Builder::connect_timeout), refused credentials,
    /// [`Error::QueueNotFound`], [`Error::DeadLetterExchangeNotFound`], [`Error::Topology`]
    /// and [`Error::QueueSetup`] (e.g. a queue that exists with other arguments).
    pub async fn check(self) -> Result<CheckReport, Error> {
        self.into_supervisor().check().await
    }

    fn into_supervisor(self) -> Supervisor {
        let queues = self
            .queues
            .into_iter()
            .enumerate()
            .map(|(index, spec)| {
                let counters = self.stats.counters(&spec.name);
                Arc::new(Queue::new(spec, &self.layers, index, counters))
            })
            .collect();
        Supervisor {
            urls: self.urls,
            connection_name: self.connection_name,
            queues,
            exchanges: self.exchanges,
            timing: self.timing,
            connect: self.connect,
            shutdown: self.shutdown,
            status: self.status,
            shared_runtime: self.shared_runtime,
            tls: self.tls,
            #[cfg(feature = "test-util")]
            wedge: self.wedge,
            stats: self.stats,
            observe: self.observe,
        }
    }
}

impl Builder {
    /// Consumes `queue` with `handler` and the default [`QueueConfig`].
    pub fn queue<H: Handler>(self, queue: &str, handler: H) -> Self {
        self.queue_with(queue, handler, QueueConfig::new())
    }

    /// Consumes `queue` with `handler` and `config`.
    pub fn queue_with<H: Handler>(mut self, queue: &str, handler: H, config: QueueConfig) -> Self {
        self.queues.push(QueueSpec {
            name: Arc::from(queue),
            handler: Registration::new(handler),
            config,
        });
        self
    }

    /// Wraps the pipeline of every queue in `layer`, outside the queues' own
    /// [layers](QueueConfig::layer); a layer added later wraps the ones added before. See
    /// [`service`](crate::service) for writing one, and [`from_fn`](crate::service::from_fn)
    /// for a closure.
    ///
    /// ```no_run
    /// use conejo::{Conejo, Context, HandlerError, handler_fn};
    /// use conejo::service::{Delivery, Next, from_fn};
    ///
    /// # async fn run() -> Result<(), conejo::Error> {
    /// Conejo::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
    ///     .queue("audit", handler_fn(|line: String, _ctx: Context| async move {
    ///         println!("{line}");
    ///         Ok::<(), HandlerError>(())
    ///     }))
    ///     // Every message of every queue: log who sent it.
    ///     .layer(from_fn(|delivery: Delivery, next: Next| async move {
    ///         let app = delivery.context().properties().app_id().clone();
    ///         tracing::debug!(app = ?app, "received");
    ///         next.run(delivery).await
    ///     }))
    ///     .build()?
    ///     .run()
    ///     .await
    /// # }
    /// ```
    pub fn layer<L>(mut self, layer: L) -> Self
    where
        L: Layer<BoxService> + Send + Sync + 'static,
        L::Service: Service,
    {
        self.layers.push(layer);
        self
    }

    /// Declares `exchange` (or checks it, if [passive](Exchange::passive)) before the queues,
    /// so that their [bindings](QueueConfig::bind) find it.
    pub fn exchange(mut self, exchange: Exchange) -> Self {
        self.exchanges.push(exchange);
        self
    }

    /// The broker's `consumer_timeout` (default 30 min, RabbitMQ's default): a delivery
    /// unacked for longer closes its channel (conejo then reopens it, and the message is
    /// redelivered). conejo warns at startup about a queue whose handler
    /// [timeout](QueueConfig::timeout) is not below it.
    pub fn consumer_timeout(mut self, timeout: Duration) -> Self {
        self.consumer_timeout = timeout;
        self
    }

    /// How long one connection attempt (TCP, TLS, AMQP handshake) may take (default 15 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect.timeout = timeout;
        self
    }

    /// At startup, wait for the broker with back-off (`true`, the default: services often
    /// start before their broker) or fail once every address of the URL list has been tried
    /// once and none could be reached. Refused credentials, an unknown virtual host and a
    /// refused TLS certificate fail startup at once either way; once the service has run,
    /// a refusal on a reconnection is logged as an error and retried with back-off (a
    /// password being rotated, a node rejoining its cluster).
    pub fn wait_for_broker(mut self, wait: bool) -> Self {
        self.connect.wait_for_broker = wait;
        self
    }

    /// Back-off between reconnection attempts, and between attempts to reopen a queue's
    /// channel: the first retry at once, then `initial`, doubling up to `max`, ± 20 %
    /// (default 100 ms to 5 s).
    pub fn reconnect_delay(mut self, initial: Duration, max: Duration) -> Self {
        self.connect.backoff = (initial, max);
        self
    }

    /// The connection's name as the broker shows it (default: the program's name).
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.connection_name = Some(name.into());
        self
    }

    /// How long in-flight handlers may run once shutdown starts (default 20 s, at most a
    /// day). Messages still running after it are requeued.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.timing.shutdown_timeout = timeout;
        self
    }

    /// How long a finished message's ack may wait to be sent together with others
    /// (default 5 ms, at most 10 s). Acks are sent earlier once a quarter of the prefetch is
    /// waiting.
    pub fn ack_linger(mut self, linger: Duration) -> Self {
        self.timing.ack_linger = linger;
        self
    }

    /// TLS settings for the `amqps://` URL(s): a CA to trust on top of the OS roots, a client
    /// certificate (mutual TLS), SASL EXTERNAL. Its files are read and checked by
    /// [`build`](Self::build), and used for every reconnection. Requires the `tls` feature;
    /// without this call an `amqps://` URL trusts the OS roots and sends no client
    /// certificate.
    ///
    /// ```no_run
    /// # struct Orders;
    /// # impl conejo::Handler for Orders {
    /// #     type Message = Vec<u8>;
    /// #     async fn handle(&self, _: Vec<u8>, _: &conejo::Context) -> Result<(), conejo::HandlerError> { Ok(()) }
    /// # }
    /// # fn main() -> Result<(), conejo::Error> {
    /// let service = conejo::Conejo::builder("amqps://app:secret@rabbit.internal:5671/%2f")
    ///     .tls(conejo::TlsConfig::new().ca_file("/etc/conejo/ca.pem"))
    ///     .queue("orders", Orders)
    ///     .build()?;
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "tls")]
    #[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
    pub fn tls(mut self, config: crate::TlsConfig) -> Self {
        self.tls = Some(config);
        self
    }

    /// Settings from a file and the environment ([`settings`](crate::settings)): applied by
    /// [`build`](Self::build) over what the code set, whatever the order of the calls, and
    /// checked there: a queue setting must name a registered queue. Replaces settings given
    /// before.
    #[cfg(feature = "config")]
    #[cfg_attr(docsrs, doc(cfg(feature = "config")))]
    pub fn settings(mut self, settings: &crate::settings::Settings) -> Self {
        self.settings = Some(settings.clone());
        self
    }

    /// Serves health and metrics endpoints over HTTP on `address` for the service's whole
    /// life (feature `health`):
    /// - `GET /livez` — liveness: 200 while the connection runtime (lapin, heartbeats, acks)
    ///   answers and keeps time ([`Stats::connection_runtime_lag`] at most 5 s); 503
    ///   otherwise. The server runs on that runtime, so a wedged one does not answer at all:
    ///   the probe's own timeout is the other bound. Busy handlers never fail it.
    /// - `GET /readyz` — readiness: 200 when [`Status::is_ready`] (connected, not blocked,
    ///   every queue consumed); 503 with one line per missing piece otherwise.
    /// - `GET /metrics` — conejo's metrics in the Prometheus text format (see the README's
    ///   "Observability" section for the names), sampled at the scrape.
    ///
    /// [`build`](Self::build) binds the address, so a port in use is a startup error
    /// ([`Error::Health`]); port 0 picks a free one ([`Conejo::health_addr`] tells which).
    /// Bind `127.0.0.1` to keep the endpoints on the machine; in a container probed by an
    /// orchestrator, bind `0.0.0.0`.
    ///
    /// ```no_run
    /// # struct Orders;
    /// # impl conejo::Handler for Orders {
    /// #     type Message = Vec<u8>;
    /// #     async fn handle(&self, _: Vec<u8>, _: &conejo::Context) -> Result<(), conejo::HandlerError> { Ok(()) }
    /// # }
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// let service = conejo::Conejo::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
    ///     .queue("orders", Orders)
    ///     .health("0.0.0.0:8080".parse::<std::net::SocketAddr>()?)
    ///     .build()?;
    /// # Ok(())
    /// # }
    /// ```
    #[cfg(feature = "health")]
    #[cfg_attr(docsrs, doc(cfg(feature = "health")))]
    pub fn health(mut self, address: impl Into<std::net::SocketAddr>) -> Self {
        self.health = Some(address.into());
        self
    }

    /// As [`health`](Self::health) on `127.0.0.1:port`: the endpoints reachable from this
    /// machine only.
    #[cfg(feature = "health")]
    #[cfg_attr(docsrs, doc(cfg(feature = "health")))]
    pub fn health_port(self, port: u16) -> Self {
        self.health((std::net::Ipv4Addr::LOCALHOST, port))
    }

    /// **Do not use in services.** Runs lapin (its heartbeat and internal RPC) on the
    /// application's runtime instead of conejo's dedicated one — the setup that loses its
    /// connection when handlers hog the runtime. Exists so tests can show that hazard.
    #[cfg(feature = "test-util")]
    pub fn lapin_on_handler_runtime(mut self) -> Self {
        self.shared_runtime = true;
        self
    }

    /// Validates the configuration.
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] or [`Error::InvalidConfig`] (no queue, a queue registered twice,
    /// zero concurrency or prefetch, a zero shutdown timeout…; an `amqps://` URL without the
    /// `tls` feature; a TLS file that is missing, not PEM, or a key that does not match its
    /// certificate).
    pub fn build(mut self) -> Result<Conejo, Error> {
        #[cfg(feature = "config")]
        if let Some(settings) = self.settings.take() {
            settings.apply_to(&mut self)?;
        }
        let mut urls = std::mem::replace(&mut self.urls, Ok(Vec::new()))?;
        let tls = self.tls_setup(&mut urls)?;
        if self.queues.is_empty() {
            return Err(Error::config(None, "no queue registered"));
        }
        for (index, spec) in self.queues.iter().enumerate() {
            spec.config.validate(&spec.name)?;
            if self.queues[..index]
                .iter()
                .any(|other| other.name == spec.name)
            {
                return Err(Error::config(Some(&spec.name), "queue registered twice"));
            }
        }
        if self.timing.shutdown_timeout.is_zero()
            || self.timing.shutdown_timeout > MAX_SHUTDOWN_TIMEOUT
        {
            return Err(Error::config(
                None,
                "shutdown timeout must be between 1 ns and 24 h",
            ));
        }
        if self.timing.ack_linger > MAX_ACK_LINGER {
            return Err(Error::config(None, "ack linger must be at most 10 s"));
        }
        if self.consumer_timeout.is_zero() {
            return Err(Error::config(None, "consumer timeout must be positive"));
        }
        if self.connect.timeout.is_zero() || self.connect.timeout > MAX_CONNECT_TIMEOUT {
            return Err(Error::config(
                None,
                "connect timeout must be between 1 ns and 10 min",
            ));
        }
        let (initial, max) = self.connect.backoff;
        if initial.is_zero() || max < initial || max > Duration::from_secs(3600) {
            return Err(Error::config(
                None,
                "reconnect delay: initial must be positive and at most max, max at most 1 h",
            ));
        }
        for (index, exchange) in self.exchanges.iter().enumerate() {
            if exchange.name.is_empty() || exchange.name.len() > 255 {
                return Err(Error::config(
                    None,
                    format!("exchange name '{}' must be 1 to 255 bytes", exchange.name),
                ));
            }
            if self.exchanges[..index]
                .iter()
                .any(|other| other.name == exchange.name)
            {
                return Err(Error::config(
                    None,
                    format!("exchange '{}' registered twice", exchange.name),
                ));
            }
        }
        for spec in &self.queues {
            match spec.config.timeout {
                Some(timeout) if timeout >= self.consumer_timeout => warn!(
                    queue = %spec.name,
                    ?timeout,
                    consumer_timeout = ?self.consumer_timeout,
                    "the handler timeout is not below the broker's consumer_timeout: a handler \
                     that long makes the broker close the channel"
                ),
                _ => {}
            }
        }
        #[cfg(all(feature = "health", feature = "cli"))]
        if self.checking {
            self.health = None;
        }
        let observe = Observe {
            #[cfg(feature = "health")]
            health: self
                .health
                .map(crate::observe::health::HealthListener::bind)
                .transpose()?,
        };
        let stats = Stats::new(self.queues.iter().map(|spec| spec.name.to_string()));
        let status = StatusWriter::new(self.queues.iter().map(|spec| spec.name.to_string()));
        Ok(Conejo {
            urls,
            connect: self.connect,
            status: Arc::new(status),
            connection_name: self.connection_name.unwrap_or_else(program_name),
            queues: self.queues,
            exchanges: self.exchanges,
            layers: self.layers,
            timing: self.timing,
            shutdown: CancellationToken::new(),
            stats,
            shared_runtime: self.shared_runtime,
            #[cfg(feature = "test-util")]
            wedge: crate::testing::RuntimeWedge::default(),
            tls,
            observe,
        })
    }

    /// Checks that the URLs and the TLS settings agree, and reads the TLS files.
    #[cfg(feature = "tls")]
    fn tls_setup(&self, urls: &mut [AmqpUrl]) -> Result<TlsSetup, Error> {
        let Some(config) = &self.tls else {
            return Ok(TlsSetup::default());
        };
        if let Some(plain) = urls.iter().find(|url| !url.is_tls()) {
            return Err(Error::config(
                None,
                format!("TLS settings given, but {plain} is not an amqps:// URL"),
            ));
        }
        let setup = config.load()?;
        if config.uses_external_auth() {
            urls.iter_mut().for_each(AmqpUrl::use_external_auth);
        }
        Ok(setup)
    }

    /// Without the `tls` feature, an `amqps://` URL cannot work: say so now.
    #[cfg(not(feature = "tls"))]
    fn tls_setup(&self, urls: &mut [AmqpUrl]) -> Result<TlsSetup, Error> {
        match urls.iter().find(|url| url.is_tls()) {
            Some(url) => Err(Error::config(
                None,
                format!(
                    "{url} needs TLS, which this build of conejo lacks: enable conejo's `tls` \
                     feature (conejo = {{ version = \"…\", features = [\"tls\"] }})"
                ),
            )),
            None => Ok(TlsSetup::default()),
        }
    }
}

fn program_name() -> String {
    std::env::args_os()
        .next()
        .and_then(|arg0| {
            std::path::Path::new(&arg0)
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "conejo".to_owned())
}

/// Stops a running service gracefully; cheap to clone.
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    token: CancellationToken,
}

impl ShutdownHandle {
    /// Starts the graceful shutdown. Idempotent.
    pub fn shutdown(&self) {
        self.token.cancel();
    }

    /// True once shutdown has started.
    #[must_use]
    pub fn is_shutdown(&self) -> bool {
        self.token.is_cancelled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Context, HandlerError};

    struct Noop;
    impl Handler for Noop {
        type Message = Vec<u8>;
        async fn handle(&self, _: Vec<u8>, _: &Context) -> Result<(), HandlerError> {
            Ok(())
        }
    }

    #[test]
    fn build_rejects_bad_configuration_before_connecting() {
        let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
        let err = Conejo::builder(url).build().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid configuration: no queue registered"
        );
        let err = Conejo::builder(url)
            .queue("a", Noop)
            .queue("a", Noop)
            .build()
            .unwrap_err();
        assert_eq!(err.queue(), Some("a"));
        let err = Conejo::builder("amqp://u:pw-xyz@host:99999/")
            .queue("a", Noop)
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::InvalidUrl { .. }));
        assert!(!err.to_string().contains("pw-xyz"));
        let conejo = Conejo::builder("amqp://u:pw-xyz@host/")
            .queue("a", Noop)
            .build()
            .unwrap();
        assert!(!format!("{conejo:?}").contains("pw-xyz"));
    }

    #[test]
    fn every_duration_is_bounded_in_build_overflow_included() {
        let url = "amqp://guest:guest@127.0.0.1:5672/%2f";
        let builder = || Conejo::builder(url).queue("a", Noop);
        let bad = [
            ("shutdown", builder().shutdown_timeout(Duration::MAX)),
            ("shutdown", builder().shutdown_timeout(Duration::ZERO)),
            ("linger", builder().ack_linger(Duration::MAX)),
            ("connect", builder().connect_timeout(Duration::MAX)),
            ("connect", builder().connect_timeout(Duration::ZERO)),
            ("consumer", builder().consumer_timeout(Duration::ZERO)),
            (
                "reconnect",
                builder().reconnect_delay(Duration::from_secs(1), Duration::MAX),
            ),
            (
                "reconnect",
                builder().reconnect_delay(Duration::ZERO, Duration::from_secs(1)),
            ),
            (
                "timeout",
                Conejo::builder(url).queue_with(
                    "a",
                    Noop,
                    crate::QueueConfig::new().timeout(Duration::MAX),
                ),
            ),
        ];
        for (what, builder) in bad {
            let err = builder.build().unwrap_err();
            assert!(
                matches!(err, Error::InvalidConfig { .. }),
                "{what}: {err:?}"
            );
            assert!(err.to_string().contains(what), "{what}: {err}");
        }
        // The largest accepted values do not overflow once running: the shutdown deadline
        // and the linger are added to an Instant.
        let conejo = builder()
            .shutdown_timeout(Duration::from_secs(24 * 3600))
            .ack_linger(Duration::from_secs(10))
            .build()
            .unwrap();
        let now = std::time::Instant::now();
        assert!(now.checked_add(conejo.timing.shutdown_timeout).is_some());
        assert!(now.checked_add(conejo.timing.ack_linger).is_some());
    }

    #[test]
    fn a_handler_timeout_at_the_consumer_timeout_is_warned_about_in_build() {
        use std::sync::{Arc, Mutex};
        /// Collects what the subscriber writes.
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let build = |timeout: Duration| {
            let sink = Sink::default();
            let writer = sink.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .finish();
            tracing::subscriber::with_default(subscriber, || {
                Conejo::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
                    .consumer_timeout(Duration::from_secs(60))
                    .queue_with("slow", Noop, crate::QueueConfig::new().timeout(timeout))
                    .build()
                    .unwrap()
            });
            String::from_utf8(sink.0.lock().unwrap().clone()).unwrap()
        };
        let logged = build(Duration::from_secs(60));
        assert!(
            logged.contains("WARN")
                && logged.contains("queue=slow")
                && logged.contains("not below the broker's consumer_timeout"),
            "{logged}"
        );
        assert_eq!(build(Duration::from_secs(59)), "");
    }

    #[cfg(not(feature = "tls"))]
    #[test]
    fn amqps_without_the_tls_feature_fails_in_build() {
        let err = Conejo::builder("amqps://u:pw-xyz@host:5671/%2f")
            .queue("a", Noop)
            .build()
            .unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { .. }), "{err:?}");
        assert!(
            err.to_string().contains("enable conejo's `tls` feature"),
            "{err}"
        );
        assert!(!err.to_string().contains("pw-xyz"));
    }

    #[cfg(feature = "tls")]
    #[test]
    fn tls_settings_are_checked_in_build() {
        use crate::TlsConfig;
        let err = Conejo::builder("amqp://u:p@host/")
            .tls(TlsConfig::new())
            .queue("a", Noop)
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("not an amqps:// URL"), "{err}");
        let err = Conejo::builder("amqps://host/")
            .tls(TlsConfig::new().external_auth())
            .queue("a", Noop)
            .build()
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("external_auth needs a client certificate"),
            "{err}"
        );
        let err = Conejo::builder("amqps://host/")
            .tls(TlsConfig::new().ca_file("/nonexistent/ca.pem"))
            .queue("a", Noop)
            .build()
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("TLS ca_file /nonexistent/ca.pem: cannot read"),
            "{err}"
        );
        // The OS roots alone, no client certificate.
        let conejo = Conejo::builder("amqps://u:pw-xyz@host/")
            .queue("a", Noop)
            .build()
            .unwrap();
        assert!(!format!("{conejo:?}").contains("pw-xyz"));
    }
}
