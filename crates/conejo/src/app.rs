//! The service: a builder to register queues, and `run` to consume them until shutdown.

use std::{future::Future, sync::Arc, time::Duration};

use futures::StreamExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::{
    AmqpUrl, Error, Exchange, Handler, QueueConfig,
    connection::Connection,
    consumer::{QueueSpec, QueueWorker, Timing},
    handler::erase,
    publish::Publisher,
    runtime::ConnectionRuntime,
    signal,
    stats::Stats,
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
const MAX_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

/// Longest accepted ack linger.
const MAX_ACK_LINGER: Duration = Duration::from_secs(10);

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
    /// Where the broker is.
    url: AmqpUrl,
    /// Shown by the broker (management UI, `rabbitmqctl list_connections`).
    connection_name: String,
    /// Registered queues, in registration order.
    queues: Vec<QueueSpec>,
    /// Exchanges declared before the queues.
    exchanges: Vec<Exchange>,
    timing: Timing,
    /// Fired by [`ShutdownHandle::shutdown`] or by `run`'s signal.
    shutdown: CancellationToken,
    stats: Stats,
    /// Test-only: lapin on the handler runtime (the hazard conejo exists to avoid).
    shared_runtime: bool,
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
    url: Result<AmqpUrl, Error>,
    connection_name: Option<String>,
    queues: Vec<QueueSpec>,
    exchanges: Vec<Exchange>,
    timing: Timing,
    /// The broker's `consumer_timeout`, as the user declares it (for a startup warning).
    consumer_timeout: Duration,
    shared_runtime: bool,
}

impl Conejo {
    /// Starts building a service that connects to `url`
    /// (`amqp://user:password@host:port/vhost`, `amqps://` for TLS; `?heartbeat=N` sets
    /// the heartbeat interval in seconds).
    pub fn builder(url: impl AsRef<str>) -> Builder {
        Builder {
            url: url.as_ref().parse(),
            connection_name: None,
            queues: Vec::new(),
            exchanges: Vec::new(),
            timing: Timing {
                shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
                ack_linger: DEFAULT_ACK_LINGER,
            },
            consumer_timeout: DEFAULT_CONSUMER_TIMEOUT,
            shared_runtime: false,
        }
    }

    /// A handle that stops the service from elsewhere (a test, an admin endpoint).
    #[must_use]
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            token: self.shutdown.clone(),
        }
    }

    /// Live counters of every queue.
    #[must_use]
    pub fn stats(&self) -> Stats {
        self.stats.clone()
    }

    /// Runs until SIGINT (Ctrl-C) or SIGTERM, or until a [`ShutdownHandle`] fires, then shuts
    /// down gracefully. Returns `Ok(())` after a clean shutdown.
    ///
    /// # Errors
    /// Startup failures (connection, queue setup) and run-time failures (connection or a
    /// consumer lost); in-flight work is still given back before returning.
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
        let runtime = Arc::new(self.connection_runtime()?);
        let connection = Connection::open(&self.url, &self.connection_name, runtime).await?;
        info!(url = %self.url, name = %self.connection_name, "connected");
        if let Err(error) = connection.declare_exchanges(&self.exchanges).await {
            close(&connection).await;
            return Err(error);
        }
        let publisher = Arc::new(Publisher::new(
            connection.shared(),
            Arc::clone(connection.runtime()),
        ));

        let mut workers = Vec::with_capacity(self.queues.len());
        for (index, spec) in self.queues.into_iter().enumerate() {
            let counters = self.stats.counters(&spec.name);
            match QueueWorker::start(spec, &connection, &publisher, index, self.timing, counters)
                .await
            {
                Ok(worker) => workers.push(worker),
                Err(error) => {
                    close(&connection).await;
                    return Err(error);
                }
            }
        }

        let shutdown = self.shutdown;
        let mut running = JoinSet::new();
        for worker in workers {
            running.spawn(worker.run(shutdown.clone(), self.timing));
        }
        let mut events = connection.lapin().events_listener();
        let connection_lost = async {
            while let Some(event) = events.next().await {
                match event {
                    lapin::Event::Error(source) => return Error::ConnectionLost { source },
                    lapin::Event::ConnectionBlocked(reason) => {
                        warn!(%reason, "the broker blocked the connection (resource alarm)");
                    }
                    lapin::Event::ConnectionUnblocked => {
                        info!("the broker unblocked the connection")
                    }
                    _ => {}
                }
            }
            std::future::pending().await
        };

        let mut failure = None;
        tokio::select! {
            () = signal => info!("shutdown signal received"),
            () = shutdown.cancelled() => info!("shutdown requested"),
            Some(ended) = running.join_next() => failure = ended_with(ended),
            error = connection_lost => {
                error!(%error, "connection lost");
                failure = Some(error);
            }
        }
        shutdown.cancel();
        while let Some(ended) = running.join_next().await {
            if let Some(error) = ended_with(ended) {
                failure.get_or_insert(error);
            }
        }
        close(&connection).await;
        match failure {
            None => {
                info!("stopped cleanly");
                Ok(())
            }
            Some(error) => Err(error),
        }
    }

    fn connection_runtime(&self) -> Result<ConnectionRuntime, Error> {
        #[cfg(feature = "test-util")]
        if self.shared_runtime {
            return Ok(ConnectionRuntime::shared());
        }
        debug_assert!(!self.shared_runtime);
        ConnectionRuntime::dedicated()
    }
}

fn ended_with(ended: Result<Result<(), Error>, tokio::task::JoinError>) -> Option<Error> {
    match ended {
        Ok(Ok(())) => None,
        Ok(Err(error)) => Some(error),
        Err(join) => {
            error!(%join, "a queue worker panicked");
            Some(Error::Runtime(std::io::Error::other(format!(
                "queue worker failed: {join}"
            ))))
        }
    }
}

async fn close(connection: &Connection) {
    if let Err(error) = connection.close().await {
        warn!(%error, "connection close failed");
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
            handler: erase(handler),
            config,
        });
        self
    }

    /// Declares `exchange` (or checks it, if [passive](Exchange::passive)) before the queues,
    /// so that their [bindings](QueueConfig::bind) find it.
    pub fn exchange(mut self, exchange: Exchange) -> Self {
        self.exchanges.push(exchange);
        self
    }

    /// The broker's `consumer_timeout` (default 30 min, RabbitMQ's default): a delivery
    /// unacked for longer closes its channel. conejo warns at startup about a queue whose
    /// handler [timeout](QueueConfig::timeout) is not below it, or that has none.
    pub fn consumer_timeout(mut self, timeout: Duration) -> Self {
        self.consumer_timeout = timeout;
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
    /// zero concurrency or prefetch, a zero shutdown timeout…).
    pub fn build(self) -> Result<Conejo, Error> {
        let url = self.url?;
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
        let stats = Stats::new(self.queues.iter().map(|spec| spec.name.to_string()));
        Ok(Conejo {
            url,
            connection_name: self.connection_name.unwrap_or_else(program_name),
            queues: self.queues,
            exchanges: self.exchanges,
            timing: self.timing,
            shutdown: CancellationToken::new(),
            stats,
            shared_runtime: self.shared_runtime,
        })
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
}
