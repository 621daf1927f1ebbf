//! The service users run: [`Conejo`], built by a [`Builder`], run until a signal.

use std::{future::Future, sync::Arc};

use super::signal;
use crate::{
    Error,
    config::service::ServiceConfig,
    engine::{
        check::CheckReport,
        queue::{Queue, QueueSpec},
        supervisor::{Handles, Supervisor},
    },
    hooks::Hooks,
    observe::{Observe, stats::Stats, status::Status},
    service::Layers,
};
use tokio_util::sync::CancellationToken;

/// The names a service declares (see [`Conejo::declared`]).
#[cfg(feature = "test-util")]
#[derive(Debug, Default, Clone)]
pub(crate) struct DeclaredNames {
    /// The queues it consumes.
    pub(crate) consumed: Vec<String>,
    /// The wait queues its retries go through (those of the policies' delays).
    pub(crate) wait_queues: Vec<String>,
    /// Other queues it declares (the dead-letter queues it owns).
    pub(crate) queues: Vec<String>,
    /// The exchanges it declares.
    pub(crate) exchanges: Vec<String>,
}

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
    /// Where the broker is and how to reach it, the exchanges, the timing: as `build()`
    /// validated them, and as they run.
    pub(crate) config: ServiceConfig,
    /// Registered queues, in registration order.
    pub(crate) queues: Vec<QueueSpec>,
    /// Layers around every queue's pipeline.
    pub(crate) layers: Layers,
    /// Shutdown, status and counters: the application's view, before and while it runs.
    pub(crate) handles: Handles,
    /// Metrics and the health server's socket.
    pub(crate) observe: Observe,
    /// Test-only knobs (feature `test-hooks`).
    pub(crate) hooks: Hooks,
}

impl Conejo {
    /// Test-only (feature `test-hooks`): a hook that blocks the connection runtime.
    #[cfg(feature = "test-hooks")]
    #[doc(hidden)]
    #[must_use]
    pub fn connection_runtime_wedge(&self) -> crate::hooks::RuntimeWedge {
        self.hooks.wedge.clone()
    }

    /// What the service declares and consumes, by name, for the test harness: its queues,
    /// the wait queues of their retry policies' delays, the dead-letter exchanges and queues
    /// it owns, and its exchanges.
    #[cfg(feature = "test-util")]
    pub(crate) fn declared(&self) -> DeclaredNames {
        use crate::config::{retry::wait_ttl_ms, topology};
        let mut declared = DeclaredNames::default();
        for spec in &self.queues {
            let settings = spec
                .config
                .settings(Arc::clone(&spec.name), spec.handler.blocking);
            let name = settings.name.to_string();
            let mut waits: Vec<String> = (1..settings.retry.attempts())
                .map(|attempt| {
                    topology::wait_queue_name(&name, wait_ttl_ms(settings.retry.delay(attempt)))
                })
                .collect();
            waits.dedup();
            declared.wait_queues.extend(waits);
            if settings.dead_letter.owned {
                declared
                    .queues
                    .push(topology::dead_letter_queue_name(&name));
                declared
                    .exchanges
                    .push(settings.dead_letter.exchange.clone());
            }
            declared.consumed.push(name);
        }
        declared
            .exchanges
            .extend(self.config.exchanges.iter().map(|e| e.name().to_owned()));
        declared
    }

    /// A handle that stops the service from elsewhere (a test, an admin endpoint).
    #[must_use]
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            token: self.handles.shutdown.clone(),
        }
    }

    /// The address the health server is bound to (see [`Builder::health`](crate::Builder::health)): the real port
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

    /// The service's publisher: confirmed publishes on a connection of its own, on the
    /// connection runtime. Hand it to the rest of the application (and, from the builder's
    /// [`publisher`](crate::Builder::publisher), to handlers); it publishes once the service runs (a publish before that waits for it,
    /// up to the [publish timeout](crate::Builder::publish_timeout)), and closes with the
    /// service. Inside a handler, [`Context::publish`](crate::Context::publish) also holds
    /// the delivery's ack until the publish is confirmed.
    ///
    #[must_use]
    pub fn publisher(&self) -> crate::Publisher {
        self.handles.publisher.clone()
    }

    /// Live counters of every queue, and the lag of the service's runtimes.
    #[must_use]
    pub fn stats(&self) -> Stats {
        self.handles.stats.clone()
    }

    /// The live connection state (connecting, connected, reconnecting, stopped), whether
    /// each queue is consuming, and the reconnection count: for health checks and metrics.
    #[must_use]
    pub fn status(&self) -> Status {
        self.handles.status.subscribe()
    }

    /// Runs until SIGINT (Ctrl-C) or SIGTERM, or until a [`ShutdownHandle`] fires, then shuts
    /// down gracefully. Returns `Ok(())` after a clean shutdown — also when the signal comes
    /// while conejo is still connecting or reconnecting.
    ///
    /// A lost connection is re-established (see [`Builder::reconnect_delay`](crate::Builder::reconnect_delay)), a channel
    /// closed by the broker is reopened, a consumer cancelled by the broker is consumed
    /// again: none of these ends `run`.
    ///
    /// # Errors
    /// Startup failures (refused credentials, a missing passive queue or dead-letter
    /// exchange, a declaration conflict; an unreachable broker with
    /// [`wait_for_broker(false)`](crate::Builder::wait_for_broker)); in-flight work is still given
    /// back before returning.
    pub async fn run(self) -> Result<(), Error> {
        self.run_until(signal::terminate()).await
    }

    /// Runs until `signal` completes (or a [`ShutdownHandle`] fires), then shuts down
    /// gracefully: stop consuming (`basic.cancel`), give back at once the messages prefetched
    /// but not started (requeued), let in-flight handlers finish and ack them — up to the
    /// [shutdown timeout](crate::Builder::shutdown_timeout), after which unfinished messages are
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
    /// the [connect timeout](crate::Builder::connect_timeout), refused credentials,
    /// [`Error::QueueNotFound`], [`Error::DeadLetterExchangeNotFound`], [`Error::Topology`]
    /// and [`Error::QueueSetup`] (e.g. a queue that exists with other arguments).
    pub async fn check(self) -> Result<CheckReport, Error> {
        self.into_supervisor().check().await
    }

    fn into_supervisor(self) -> Supervisor {
        let Conejo {
            config,
            queues,
            layers,
            handles,
            observe,
            hooks,
        } = self;
        let queues = queues
            .into_iter()
            .enumerate()
            .map(|(index, spec)| {
                let counters = handles.stats.counters(&spec.name);
                Arc::new(Queue::new(spec, &layers, index, counters))
            })
            .collect();
        Supervisor {
            config,
            queues,
            handles,
            observe,
            hooks,
        }
    }
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
