//! The supervisor: connection generations. Connect → declare → open each queue's channel
//! (prefetch first) → consume; when the connection is lost, back off and start a new
//! generation; stop cleanly on shutdown, whatever the state — connecting, reconnecting or
//! running.

use std::{
    future::Future,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::StreamExt;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{
    channel::{self, Channel, Generation, Opening},
    check::CheckReport,
    publish::Copies,
    queue::Queue,
    run::{self, End},
    topology,
};
use crate::{
    Error, Publisher,
    backoff::Backoff,
    broker::{Broker, Connection, Event},
    config::service::ServiceConfig,
    hooks::Hooks,
    observe::{
        self, Observe, QueueInfo,
        stats::Stats,
        status::{ConnectionState, StatusWriter},
    },
    publish::LinkTarget,
};

/// What the application holds of a service, before and while it runs: shared between
/// [`Conejo`](crate::Conejo) and its supervisor.
#[derive(Debug, Clone)]
pub(crate) struct Handles {
    /// Fired by a signal or a [`ShutdownHandle`](crate::ShutdownHandle).
    pub(crate) shutdown: CancellationToken,
    /// What the application sees of the connection.
    pub(crate) status: Arc<StatusWriter>,
    /// The queues' counters and the runtimes' lag gauges.
    pub(crate) stats: Stats,
    /// The service's publisher: handlers' publishes, retry copies and dead letters, on a
    /// connection of its own.
    pub(crate) publisher: Publisher,
}

/// A service while it runs: its configuration, as `build()` validated it, and its queues.
pub(crate) struct Supervisor {
    /// The broker's addresses, the connection's name and policy, exchanges, timing, TLS.
    pub(crate) config: ServiceConfig,
    /// The registered queues; they outlive connections.
    pub(crate) queues: Vec<Arc<Queue>>,
    /// Shutdown, status and counters, shared with the application.
    pub(crate) handles: Handles,
    /// Metrics and the health server, as the builder asked.
    pub(crate) observe: Observe,
    /// Test-only knobs (feature `test-hooks`).
    pub(crate) hooks: Hooks,
}

/// A connection that lived this long was healthy: when it is lost, reconnect at once. One
/// lost sooner backs off, so that a broker accepting connections and dropping them at once
/// is not hammered.
const HEALTHY_GENERATION: Duration = Duration::from_secs(1);

/// How a generation ended.
enum Ended {
    /// Shutdown: the service stops with this result.
    Shutdown(Result<(), Error>),
    /// The connection was lost: reconnect.
    Lost(String),
    /// Setup failed in a way retrying cannot fix.
    Fatal(Error),
}

impl Supervisor {
    /// Runs until `signal` completes or the shutdown token fires, then shuts down.
    pub(crate) async fn run(
        mut self,
        signal: impl Future<Output = ()> + Send,
    ) -> Result<(), Error> {
        let shutdown = self.handles.shutdown.clone();
        let status = Arc::clone(&self.handles.status);
        let observe = std::mem::take(&mut self.observe);
        let supervise = self.supervise(observe);
        tokio::pin!(supervise, signal);
        let mut signalled = false;
        let result = loop {
            tokio::select! {
                result = &mut supervise => break result,
                () = &mut signal, if !signalled => {
                    signalled = true;
                    info!("shutdown signal received");
                    shutdown.cancel();
                }
            }
        };
        status.set_state(ConnectionState::Stopped);
        match &result {
            Ok(()) => info!("stopped cleanly"),
            Err(error) => error!(%error, "stopped"),
        }
        result
    }

    async fn supervise(&self, observe: Observe) -> Result<(), Error> {
        let broker = self.broker()?;
        // Lag probes, metrics and the health server, for the service's whole life: dropped
        // (stopped) when this returns, before the connection runtime goes.
        let _observing = observe::start(
            observe,
            broker.handle(),
            &self.handles.stats,
            &self.handles.status,
            self.queue_infos(),
        );
        // The publisher's link, on the same runtime and a connection of its own (made on the
        // first publish): it outlives the consumers, whose last handlers may still publish,
        // and stops once they are done.
        let stop_link = CancellationToken::new();
        let link = self.handles.publisher.start_link(
            LinkTarget {
                broker: broker.clone(),
                urls: self.config.urls.clone(),
                name: self.config.publisher_name(),
                connect_timeout: self.config.connect.timeout,
                backoff: self.config.connect.backoff,
            },
            stop_link.clone(),
        );
        let copies = Arc::new(Copies::new(self.handles.publisher.clone()));
        let result = self.consume(&broker, &copies).await;
        // Every handler is done: streams store their last committed offset.
        for cursor in self.queues.iter().filter_map(|queue| queue.cursor.as_ref()) {
            cursor.flush(OFFSET_FLUSH).await;
        }
        stop_link.cancel();
        if let Some(link) = link
            && tokio::time::timeout(LINK_STOP, link).await.is_err()
        {
            warn!("the publisher's link did not stop in time");
        }
        result
    }

    /// Connection generations of the consuming connection, until shutdown or a fatal error.
    async fn consume(&self, broker: &Broker, copies: &Arc<Copies>) -> Result<(), Error> {
        let connect = self.config.connect;
        let urls = &self.config.urls;
        let mut backoff = Backoff::new(connect.backoff.0, connect.backoff.1);
        let mut address = 0;
        // Failed attempts since the last connection: each address gets one per round, and
        // the back-off is between rounds.
        let mut failures = 0;
        let mut ever_connected = false;
        loop {
            let attempt = backoff.retries() + 1;
            self.handles.status.set_state(if ever_connected {
                ConnectionState::Reconnecting { attempt }
            } else {
                ConnectionState::Connecting { attempt }
            });
            let url = &urls[address % urls.len()];
            let opened = tokio::select! {
                biased;
                () = self.handles.shutdown.cancelled() => {
                    info!("shutdown requested while connecting");
                    self.wait_for_orphans().await;
                    return Ok(());
                }
                opened = broker.connect(url, &self.config.connection_name, connect.timeout) => opened,
            };
            let connection = match opened {
                Ok(connection) => {
                    failures = 0;
                    connection
                }
                // At startup, refused credentials or virtual host are configuration: no
                // waiting fixes them. Once the service has run with them, a refusal (a node
                // rejoining, a virtual host restarting, a certificate being renewed) is
                // waited out like any other failure, loudly.
                Err(error) if !ever_connected && error.is_refused() => return Err(error),
                Err(error) => {
                    address += 1;
                    failures += 1;
                    let round_over = failures % urls.len() == 0;
                    if !ever_connected && !connect.wait_for_broker && round_over {
                        return Err(error);
                    }
                    let next = &urls[address % urls.len()];
                    let delay = if round_over {
                        backoff.next_delay()
                    } else {
                        Duration::ZERO
                    };
                    if !round_over || !backoff.worth_logging() {
                        debug!(%error, attempt, "cannot connect; trying {next} in {delay:?}");
                    } else if error.is_refused() {
                        error!(
                            %error,
                            attempt,
                            "the broker refused the connection; trying {next} in {delay:?}"
                        );
                    } else {
                        warn!(%error, attempt, "cannot reach the broker; trying {next} in {delay:?}");
                    }
                    tokio::select! {
                        biased;
                        () = self.handles.shutdown.cancelled() => {
                            info!("shutdown requested while waiting for the broker");
                            self.wait_for_orphans().await;
                            return Ok(());
                        }
                        () = tokio::time::sleep(delay) => continue,
                    }
                }
            };
            if ever_connected {
                info!(%url, attempts = attempt, "reconnected");
            } else {
                info!(%url, name = %self.config.connection_name, "connected");
            }
            self.handles
                .status
                .connected(url.redacted().to_owned(), ever_connected);
            let began = Instant::now();
            match self.generation(&connection, copies, !ever_connected).await {
                Ended::Shutdown(result) => return result,
                Ended::Fatal(error) => return Err(error),
                Ended::Lost(error) => {
                    ever_connected = true;
                    address += 1;
                    if began.elapsed() >= HEALTHY_GENERATION {
                        warn!(%error, %url, "connection lost; reconnecting");
                        backoff.reset();
                        continue;
                    }
                    // Lost again soon after connecting: back off rather than loop.
                    let delay = backoff.next_delay().max(connect.backoff.0);
                    warn!(
                        %error,
                        %url,
                        "connection lost soon after connecting; reconnecting in {delay:?}"
                    );
                    tokio::select! {
                        biased;
                        () = self.handles.shutdown.cancelled() => {
                            self.wait_for_orphans().await;
                            return Ok(());
                        }
                        () = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// One connection's life: declare, consume every queue, until shutdown or loss.
    async fn generation(
        &self,
        connection: &Connection,
        copies: &Arc<Copies>,
        first: bool,
    ) -> Ended {
        let lost = CancellationToken::new();
        let loss = Arc::new(Mutex::new(None));
        let watcher = tokio::spawn(watch_events(
            connection.clone(),
            lost.clone(),
            Arc::clone(&loss),
            Arc::clone(&self.handles.status),
        ));
        let ended = self.run_generation(connection, copies, first, &lost).await;
        watcher.abort();
        match ended {
            Ended::Lost(reason) => {
                let reported = loss.lock().unwrap_or_else(|e| e.into_inner()).take();
                Ended::Lost(reported.unwrap_or(reason))
            }
            other => other,
        }
    }

    async fn run_generation(
        &self,
        connection: &Connection,
        copies: &Arc<Copies>,
        first: bool,
        lost: &CancellationToken,
    ) -> Ended {
        // A setup error on a live connection is the configuration's; on a dead one, the
        // connection's (retried).
        let setup_failed = async |error: Error| {
            if connection.is_connected() || error.is_fatal_on_any_connection() {
                close(connection).await;
                Ended::Fatal(error)
            } else {
                Ended::Lost(error.to_string())
            }
        };
        if let Err(error) = topology::declare_exchanges(connection, &self.config.exchanges).await {
            return setup_failed(error).await;
        }
        let generation = Generation {
            connection: connection.clone(),
            publisher: Arc::clone(copies),
            shutdown: self.handles.shutdown.clone(),
            lost: lost.clone(),
            timing: self.config.timing,
            status: Arc::clone(&self.handles.status),
            reopen: self.config.connect.backoff,
        };
        // At startup every queue is set up before any is consumed, so a configuration
        // error stops the service at once. Later, each queue sets itself up (and retries).
        let mut opened = Vec::with_capacity(self.queues.len());
        for queue in &self.queues {
            if !first {
                opened.push(None);
                continue;
            }
            match Channel::open(queue, &generation, Opening::Startup).await {
                Ok(channel) => opened.push(Some(channel)),
                Err(error) => return setup_failed(error).await,
            }
        }
        let mut running = JoinSet::new();
        for (queue, channel) in self.queues.iter().zip(opened) {
            running.spawn(run::run(Arc::clone(queue), channel, generation.clone()));
        }
        let mut failure = None;
        let mut connection_lost = false;
        while let Some(ended) = running.join_next().await {
            match ended {
                Ok(End::Shutdown) => {}
                Ok(End::ConnectionLost) => {
                    connection_lost = true;
                    lost.cancel();
                }
                Err(join) => {
                    error!(%join, "a queue's consumer failed; shutting down");
                    failure.get_or_insert(Error::internal(format!("queue consumer: {join}")));
                    self.handles.shutdown.cancel();
                }
            }
        }
        if (connection_lost || lost.is_cancelled()) && !self.handles.shutdown.is_cancelled() {
            return Ended::Lost("the connection failed".to_owned());
        }
        close(connection).await;
        Ended::Shutdown(failure.map_or(Ok(()), Err))
    }

    /// The startup's connect and declaration steps, once: each address is tried once (as
    /// with `wait_for_broker(false)`), then the exchanges and every queue's topology are
    /// declared by the code `run` uses, without consuming; then the connection is closed.
    pub(crate) async fn check(&self) -> Result<CheckReport, Error> {
        let broker = self.broker()?;
        let mut failure = None;
        let mut opened = None;
        for url in &self.config.urls {
            match broker
                .connect(
                    url,
                    &self.config.connection_name,
                    self.config.connect.timeout,
                )
                .await
            {
                Ok(connection) => {
                    opened = Some((url, connection));
                    break;
                }
                Err(error) if error.is_refused() => return Err(error),
                Err(error) => {
                    debug!(%error, "check: cannot reach the broker");
                    failure = Some(error);
                }
            }
        }
        let Some((url, connection)) = opened else {
            return Err(failure.unwrap_or_else(|| Error::config(None, "no broker address")));
        };
        info!(%url, "check: connected");
        let checked = async {
            topology::declare_exchanges(&connection, &self.config.exchanges).await?;
            let mut queues = Vec::with_capacity(self.queues.len());
            for queue in &self.queues {
                queues.push(channel::check(queue, &connection).await?);
            }
            Ok::<_, Error>(queues)
        }
        .await;
        close(&connection).await;
        Ok(CheckReport {
            address: url.redacted().to_owned(),
            exchanges: self
                .config
                .exchanges
                .iter()
                .map(|e| e.name().to_owned())
                .collect(),
            queues: checked?,
        })
    }

    async fn wait_for_orphans(&self) {
        for queue in &self.queues {
            run::wait_for_orphans(queue, self.config.timing.shutdown_timeout).await;
        }
    }

    /// The broker the service connects to, its tasks on their own runtime.
    fn broker(&self) -> Result<Broker, Error> {
        #[cfg(any(test, feature = "test-util"))]
        if let Some(memory) = &self.config.memory {
            return Ok(Broker::Memory(memory.clone()));
        }
        let broker = Broker::amqp(
            self.config.tls.clone(),
            !self.hooks.lapin_on_handler_runtime(),
        )?;
        self.hooks.runtime_started(broker.handle());
        Ok(broker)
    }

    /// What the metrics read of each queue.
    fn queue_infos(&self) -> Vec<QueueInfo> {
        self.queues
            .iter()
            .map(|queue| QueueInfo {
                name: Arc::clone(queue.name()),
                prefetch: queue.settings.prefetch,
                counters: Arc::clone(&queue.counters),
                single_active: queue.settings.single_active,
                ordered: queue.sequencer.is_some(),
                borrowed: queue.settings.borrowed.is_some(),
                stream: queue.settings.stream.is_some(),
            })
            .collect()
    }
}

/// Follows the connection's events: a connection error fires `lost`; flow control (the
/// broker blocking publishers after a resource alarm) is reported, never taken for a loss.
/// A channel error while the connection lives is the channel's consumer's business.
async fn watch_events(
    connection: Connection,
    lost: CancellationToken,
    loss: Arc<Mutex<Option<String>>>,
    status: Arc<StatusWriter>,
) {
    let mut events = connection.events();
    while let Some(event) = events.next().await {
        match event {
            Event::Error(error) if !connection.is_connected() => {
                *loss.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
                lost.cancel();
                return;
            }
            Event::Error(error) => debug!(%error, "channel error"),
            Event::Blocked(reason) => {
                warn!(%reason, "the broker blocked the connection (resource alarm); consuming goes on");
                status.set_blocked(Some(reason));
            }
            Event::Unblocked => {
                info!("the broker unblocked the connection");
                status.set_blocked(None);
            }
            Event::Other => {}
        }
    }
}

/// How long a stream queue's offset store may take to store the last offset at shutdown.
const OFFSET_FLUSH: Duration = Duration::from_secs(5);

/// How long the publisher's link may take to send its last confirms and close.
const LINK_STOP: Duration = Duration::from_secs(10);

/// How long closing the connection may take before conejo gives up on it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

async fn close(connection: &Connection) {
    let on = connection.clone();
    let closed = connection
        .run_within(CLOSE_TIMEOUT, "connection.close", async move {
            on.close("conejo shutting down").await
        })
        .await;
    if let Err(error) = closed {
        warn!(%error, "connection close failed");
    }
}
