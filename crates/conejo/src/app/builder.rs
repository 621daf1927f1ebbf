//! The builder: register queues and settings; `build()` checks everything before any
//! connection is made.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::Conejo;
use crate::{
    Error, Exchange, Handler, Partitions, Publisher, QueueConfig,
    broker::url::parse_list,
    config::{
        partitions::Borrowed,
        service::{ServiceConfig, Unresolved},
    },
    engine::{
        queue::{QueueSpec, Registration},
        supervisor::Handles,
    },
    hooks::Hooks,
    observe::{Observe, stats::Stats, status::StatusWriter},
    service::{BoxService, Layer, Layers, Service},
};

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
            config: ServiceConfig::new(),
            given: Unresolved {
                urls: parse_list(url.as_ref()),
                connection_name: None,
                #[cfg(feature = "tls")]
                tls: None,
            },
            queues: Vec::new(),
            layers: Layers::default(),
            settings: None,
            publisher: Publisher::for_service(),
            #[cfg(feature = "health")]
            health: None,
            #[cfg(feature = "cli")]
            checking: false,
            hooks: Hooks::default(),
            partitioned: Vec::new(),
        }
    }
}

/// Settings applied by `build()` over what the code set: the `config` feature's
/// [`Settings`](crate::settings::Settings), behind this trait so that the builder does not
/// depend on the feature's module.
pub(crate) trait ApplySettings: std::fmt::Debug + Send + Sync {
    /// Writes the settings onto `builder`; a queue setting must name a registered queue.
    fn apply_to(&self, builder: &mut Builder) -> Result<(), Error>;
}

/// Registers queues and settings; [`build`](Builder::build) validates everything before any
/// connection is made.
#[must_use]
#[derive(Debug)]
pub struct Builder {
    /// The service's settings as the code (and then the `config` feature's settings) set
    /// them; `build()` checks them and they run as they are.
    pub(crate) config: ServiceConfig,
    /// What `build()` must still parse or read: the URL list, the connection's name, the TLS
    /// files.
    pub(crate) given: Unresolved,
    /// Registered queues, in registration order.
    pub(crate) queues: Vec<QueueSpec>,
    /// Layers around every queue's pipeline.
    pub(crate) layers: Layers,
    /// Settings from a file and the environment, applied by `build()` over the code's.
    pub(crate) settings: Option<Box<dyn ApplySettings>>,
    /// The service's publisher, handed out before the service is built (to handlers
    /// registered on this builder).
    publisher: Publisher,
    /// Where to serve the health endpoints, bound by `build()`.
    #[cfg(feature = "health")]
    pub(crate) health: Option<std::net::SocketAddr>,
    /// Built for `check` only: no health server (its port may be the running service's).
    #[cfg(feature = "cli")]
    pub(crate) checking: bool,
    /// Test-only knobs (feature `test-hooks`).
    pub(crate) hooks: Hooks,
    /// Partitioned queues, expanded into queues by `build()`.
    partitioned: Vec<Partitioned>,
}

/// A [`Builder::partitioned`] registration, until `build()` checks and expands it.
struct Partitioned {
    partitions: Partitions,
    /// A registration of the shared handler, for each partition queue.
    register: Box<dyn Fn() -> Registration + Send + Sync>,
    config: QueueConfig,
}

impl std::fmt::Debug for Partitioned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partitioned")
            .field("partitions", &self.partitions)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl Partitioned {
    /// The exchange and the partition queues, this replica's own first.
    fn expand(self, builder: &mut Builder) -> Result<(), Error> {
        let Partitioned {
            partitions,
            register,
            config,
        } = self;
        partitions.validate()?;
        builder
            .config
            .exchanges
            .push(partitions.declared_exchange());
        let (home, borrowed): (Vec<u16>, Vec<u16>) =
            (0..partitions.count).partition(|&index| partitions.is_home(index));
        for index in home.into_iter().chain(borrowed) {
            let mut queue = config
                .clone()
                .single_active_consumer()
                .bind(partitions.exchange(), "1");
            if queue.ordered_by.is_none() {
                queue = queue.ordered_by(partitions.order_key());
            }
            if let Some((_, replicas)) = partitions.replica
                && !partitions.is_home(index)
            {
                queue.borrowed = Some(Borrowed {
                    replicas,
                    interval: partitions.balance_interval,
                });
            }
            builder.queues.push(QueueSpec {
                name: Arc::from(partitions.queue_name(index)),
                handler: register(),
                config: queue,
            });
        }
        Ok(())
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

    /// Consumes the partition queues of `partitions` with one `handler` (shared: the same
    /// instance handles every partition) and `config`, and declares their consistent-hash
    /// exchange (see [`Partitions`]). Each partition queue is `config` plus: bound to the
    /// exchange with weight 1, a [single active consumer](QueueConfig::single_active_consumer),
    /// and — unless `config` orders by a key of its own — [ordered by](QueueConfig::ordered_by)
    /// the key the exchange hashes.
    ///
    /// The broker needs the `rabbitmq_consistent_hash_exchange` plugin: without it startup
    /// fails with [`Error::UnknownExchangeType`], which names it.
    pub fn partitioned<H: Handler>(
        mut self,
        partitions: Partitions,
        handler: H,
        config: QueueConfig,
    ) -> Self {
        let handler = Arc::new(handler);
        self.partitioned.push(Partitioned {
            partitions,
            register: Box::new(move || Registration::new(Arc::clone(&handler))),
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
        self.config.exchanges.push(exchange);
        self
    }

    /// The broker's `consumer_timeout` (default 30 min, RabbitMQ's default): a delivery
    /// unacked for longer closes its channel (conejo then reopens it, and the message is
    /// redelivered). conejo warns at startup about a queue whose handler
    /// [timeout](QueueConfig::timeout) is not below it.
    pub fn consumer_timeout(mut self, timeout: Duration) -> Self {
        self.config.consumer_timeout = timeout;
        self
    }

    /// How long one connection attempt (TCP, TLS, AMQP handshake) may take (default 15 s).
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        self.config.connect.timeout = timeout;
        self
    }

    /// At startup, wait for the broker with back-off (`true`, the default: services often
    /// start before their broker) or fail once every address of the URL list has been tried
    /// once and none could be reached. Refused credentials, an unknown virtual host and a
    /// refused TLS certificate fail startup at once either way; once the service has run,
    /// a refusal on a reconnection is logged as an error and retried with back-off (a
    /// password being rotated, a node rejoining its cluster).
    pub fn wait_for_broker(mut self, wait: bool) -> Self {
        self.config.connect.wait_for_broker = wait;
        self
    }

    /// Back-off between reconnection attempts, and between attempts to reopen a queue's
    /// channel: the first retry at once, then `initial`, doubling up to `max`, ± 20 %
    /// (default 100 ms to 5 s).
    pub fn reconnect_delay(mut self, initial: Duration, max: Duration) -> Self {
        self.config.connect.backoff = (initial, max);
        self
    }

    /// The service's publisher (see [`Conejo::publisher`](crate::Conejo::publisher)), to
    /// hand to handlers as they are registered: it publishes once the service runs.
    ///
    /// ```no_run
    /// use conejo::{Conejo, Context, Handler, HandlerError, Json, Publisher};
    ///
    /// #[derive(serde::Deserialize, serde::Serialize)]
    /// struct Order { id: u64 }
    ///
    /// struct Orders { events: Publisher }
    /// impl Handler for Orders {
    ///     type Message = Json<Order>;
    ///     async fn handle(&self, Json(order): Json<Order>, _: &Context) -> Result<(), HandlerError> {
    ///         self.events.publish("shop", "order.stored", Json(order)).await?;
    ///         Ok(())
    ///     }
    /// }
    ///
    /// # async fn run() -> Result<(), conejo::Error> {
    /// let builder = Conejo::builder("amqp://guest:guest@127.0.0.1:5672/%2f");
    /// let events = builder.publisher();
    /// builder.queue("orders", Orders { events }).build()?.run().await
    /// # }
    /// ```
    #[must_use]
    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    /// The longest a publish of the service's publisher may take, confirm included: its
    /// handlers' publishes, and the copies of retries and dead letters (default 30 s, at
    /// most 1 h). A publish waits that long, at most, for a connection, a place among the
    /// messages in flight, or the end of a resource alarm.
    pub fn publish_timeout(mut self, timeout: Duration) -> Self {
        self.config.publish.timeout = timeout;
        self
    }

    /// Messages the service's publisher keeps in flight at most (default 1024): a publish
    /// beyond it waits for a place, so memory stays bounded.
    pub fn max_publishes_in_flight(mut self, max: usize) -> Self {
        self.config.publish.max_in_flight = max;
        self
    }

    /// The connection's name as the broker shows it (default: the program's name). The
    /// service's publisher connects as this name followed by `-publish`.
    pub fn connection_name(mut self, name: impl Into<String>) -> Self {
        self.given.connection_name = Some(name.into());
        self
    }

    /// How long in-flight handlers may run once shutdown starts (default 20 s, at most a
    /// day). Messages still running after it are requeued.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.config.timing.shutdown_timeout = timeout;
        self
    }

    /// How long a finished message's ack may wait to be sent together with others
    /// (default 5 ms, at most 10 s). Acks are sent earlier once a quarter of the prefetch is
    /// waiting.
    pub fn ack_linger(mut self, linger: Duration) -> Self {
        self.config.timing.ack_linger = linger;
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
        self.given.tls = Some(config);
        self
    }

    /// Serves health and metrics endpoints over HTTP on `address` for the service's whole
    /// life (feature `health`):
    /// - `GET /livez` — liveness: 200 while the connection runtime (lapin, heartbeats, acks)
    ///   answers and keeps time ([`Stats::connection_runtime_lag`](crate::Stats::connection_runtime_lag) at most 5 s); 503
    ///   otherwise. The server runs on that runtime, so a wedged one does not answer at all:
    ///   the probe's own timeout is the other bound. Busy handlers never fail it.
    /// - `GET /readyz` — readiness: 200 when [`Status::is_ready`](crate::Status::is_ready) (connected, not blocked,
    ///   every queue consumed); 503 with one line per missing piece otherwise.
    /// - `GET /metrics` — conejo's metrics in the Prometheus text format (see the README's
    ///   "Observability" section for the names), sampled at the scrape.
    ///
    /// [`build`](Self::build) binds the address, so a port in use is a startup error
    /// ([`Error::Health`](crate::Error::Health)); port 0 picks a free one ([`Conejo::health_addr`](crate::Conejo::health_addr) tells which).
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

    /// Connects to the in-memory broker `memory` instead of RabbitMQ.
    #[cfg(any(test, feature = "test-util"))]
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) fn memory(mut self, memory: &crate::broker::memory::Memory) -> Self {
        self.config.memory = Some(memory.clone());
        self
    }

    /// **Do not use in services.** Runs lapin (its heartbeat and internal RPC) on the
    /// application's runtime instead of conejo's dedicated one — the setup that loses its
    /// connection when handlers hog the runtime. Exists so tests can show that hazard.
    #[cfg(feature = "test-hooks")]
    pub fn lapin_on_handler_runtime(mut self) -> Self {
        self.hooks.lapin_on_handler_runtime = true;
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
        for partitioned in std::mem::take(&mut self.partitioned) {
            partitioned.expand(&mut self)?;
        }
        if let Some(settings) = self.settings.take() {
            settings.apply_to(&mut self)?;
        }
        let Builder {
            config,
            given,
            queues,
            layers,
            settings: _,
            publisher,
            #[cfg(feature = "health")]
            health,
            #[cfg(feature = "cli")]
            checking,
            hooks,
            partitioned: _,
        } = self;
        let config = config.resolve(given)?;
        if queues.is_empty() {
            return Err(Error::config(None, "no queue registered"));
        }
        for (index, spec) in queues.iter().enumerate() {
            spec.config.validate(&spec.name)?;
            if queues[..index].iter().any(|other| other.name == spec.name) {
                return Err(Error::config(Some(&spec.name), "queue registered twice"));
            }
            if let Some(timeout) = spec.config.timeout
                && timeout >= config.consumer_timeout
            {
                warn!(
                    queue = %spec.name,
                    ?timeout,
                    consumer_timeout = ?config.consumer_timeout,
                    "the handler timeout is not below the broker's consumer_timeout: a handler \
                     that long makes the broker close the channel"
                );
            }
        }
        #[cfg(all(feature = "health", feature = "cli"))]
        let health = health.filter(|_| !checking);
        #[cfg(all(feature = "cli", not(feature = "health")))]
        let _ = checking;
        let observe = Observe {
            #[cfg(feature = "health")]
            health: health
                .map(crate::observe::health::HealthListener::bind)
                .transpose()?,
        };
        let names = || queues.iter().map(|spec| spec.name.to_string());
        let status = Arc::new(StatusWriter::new(names()));
        publisher.configure(config.publish, Some(Arc::clone(&status)));
        let stats = Stats::new(names(), publisher.counters());
        let handles = Handles {
            shutdown: CancellationToken::new(),
            status,
            stats,
            publisher,
        };
        Ok(Conejo {
            config,
            queues,
            layers,
            handles,
            observe,
            hooks,
        })
    }
}
