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

use crate::{
    AmqpUrl, Error, Exchange,
    app::check::CheckReport,
    broker::connection::Connection,
    broker::runtime::ConnectionRuntime,
    broker::tls::TlsSetup,
    engine::backoff::Backoff,
    engine::consumer::{End, Generation, Opening, Queue, Timing},
    engine::publish::Publisher,
    observe::stats::Stats,
    observe::status::{ConnectionState, StatusWriter},
    observe::telemetry::{self, Observe},
};

/// How conejo connects and reconnects.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ConnectPolicy {
    /// How long one connection attempt (TCP, TLS, AMQP handshake) may take.
    pub(crate) timeout: Duration,
    /// At startup, wait for the broker (true) or fail at the first refused attempt.
    pub(crate) wait_for_broker: bool,
    /// Back-off between reconnection attempts: initial delay and cap.
    pub(crate) backoff: (Duration, Duration),
}

/// Everything a running service needs.
pub(crate) struct Supervisor {
    /// The broker's addresses, tried in turn.
    pub(crate) urls: Vec<AmqpUrl>,
    /// Shown by the broker.
    pub(crate) connection_name: String,
    /// The registered queues; they outlive connections.
    pub(crate) queues: Vec<Arc<Queue>>,
    /// Declared before the queues, on every connection.
    pub(crate) exchanges: Vec<Exchange>,
    /// Shutdown deadline and ack linger.
    pub(crate) timing: Timing,
    /// Connection attempts and back-off.
    pub(crate) connect: ConnectPolicy,
    /// Fired by a signal or a [`ShutdownHandle`](crate::ShutdownHandle).
    pub(crate) shutdown: CancellationToken,
    /// What the application sees of the connection.
    pub(crate) status: Arc<StatusWriter>,
    /// Test-only: lapin on the handler runtime (the hazard conejo exists to avoid).
    pub(crate) shared_runtime: bool,
    /// TLS material checked by `build()`, used by every connection attempt.
    pub(crate) tls: TlsSetup,
    /// The queues' counters and the runtimes' lag gauges.
    pub(crate) stats: Stats,
    /// Metrics and the health server, as the builder asked.
    pub(crate) observe: Observe,
    /// Test-only: where the connection runtime's handle goes, for a wedge.
    #[cfg(feature = "test-util")]
    pub(crate) wedge: crate::testing::RuntimeWedge,
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
        let shutdown = self.shutdown.clone();
        let status = Arc::clone(&self.status);
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
        let runtime = Arc::new(self.connection_runtime()?);
        // Lag probes, metrics and the health server, for the service's whole life: dropped
        // (stopped) when this returns, before the connection runtime goes.
        let _observing =
            telemetry::start(observe, &runtime, &self.stats, &self.status, &self.queues);
        let mut backoff = Backoff::new(self.connect.backoff.0, self.connect.backoff.1);
        let mut address = 0;
        // Failed attempts since the last connection: each address gets one per round, and
        // the back-off is between rounds.
        let mut failures = 0;
        let mut ever_connected = false;
        loop {
            let attempt = backoff.retries() + 1;
            self.status.set_state(if ever_connected {
                ConnectionState::Reconnecting { attempt }
            } else {
                ConnectionState::Connecting { attempt }
            });
            let url = &self.urls[address % self.urls.len()];
            let opened = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => {
                    info!("shutdown requested while connecting");
                    self.wait_for_orphans().await;
                    return Ok(());
                }
                opened = Connection::open(
                    url,
                    &self.connection_name,
                    Arc::clone(&runtime),
                    self.connect.timeout,
                    &self.tls,
                ) => opened,
            };
            let connection = match opened {
                Ok(connection) => {
                    failures = 0;
                    Arc::new(connection)
                }
                // At startup, refused credentials or virtual host are configuration: no
                // waiting fixes them. Once the service has run with them, a refusal (a node
                // rejoining, a virtual host restarting, a certificate being renewed) is
                // waited out like any other failure, loudly.
                Err(error) if !ever_connected && error.is_refused() => return Err(error),
                Err(error) => {
                    address += 1;
                    failures += 1;
                    let round_over = failures % self.urls.len() == 0;
                    if !ever_connected && !self.connect.wait_for_broker && round_over {
                        return Err(error);
                    }
                    let next = &self.urls[address % self.urls.len()];
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
                        () = self.shutdown.cancelled() => {
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
                info!(%url, name = %self.connection_name, "connected");
            }
            self.status
                .connected(url.redacted().to_owned(), ever_connected);
            let began = Instant::now();
            match self
                .generation(&connection, &runtime, !ever_connected)
                .await
            {
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
                    let delay = backoff.next_delay().max(self.connect.backoff.0);
                    warn!(
                        %error,
                        %url,
                        "connection lost soon after connecting; reconnecting in {delay:?}"
                    );
                    tokio::select! {
                        biased;
                        () = self.shutdown.cancelled() => {
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
        connection: &Arc<Connection>,
        runtime: &Arc<ConnectionRuntime>,
        first: bool,
    ) -> Ended {
        let lost = CancellationToken::new();
        let loss = Arc::new(Mutex::new(None));
        let watcher = tokio::spawn(watch_events(
            Arc::clone(connection),
            lost.clone(),
            Arc::clone(&loss),
            Arc::clone(&self.status),
        ));
        let ended = self.run_generation(connection, runtime, first, &lost).await;
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
        connection: &Arc<Connection>,
        runtime: &Arc<ConnectionRuntime>,
        first: bool,
        lost: &CancellationToken,
    ) -> Ended {
        // A setup error on a live connection is the configuration's; on a dead one, the
        // connection's (retried).
        let setup_failed = async |error: Error| {
            if connection.is_connected() {
                close(connection).await;
                Ended::Fatal(error)
            } else {
                Ended::Lost(error.to_string())
            }
        };
        if let Err(error) = connection.declare_exchanges(&self.exchanges).await {
            return setup_failed(error).await;
        }
        let generation = Generation {
            connection: Arc::clone(connection),
            publisher: Arc::new(Publisher::new(connection.shared(), Arc::clone(runtime))),
            shutdown: self.shutdown.clone(),
            lost: lost.clone(),
            timing: self.timing,
            status: Arc::clone(&self.status),
            reopen: self.connect.backoff,
        };
        // At startup every queue is set up before any is consumed, so a configuration
        // error stops the service at once. Later, each queue sets itself up (and retries).
        let mut opened = Vec::with_capacity(self.queues.len());
        for queue in &self.queues {
            if !first {
                opened.push(None);
                continue;
            }
            match queue.open(&generation, Opening::Startup).await {
                Ok(channel) => opened.push(Some(channel)),
                Err(error) => return setup_failed(error).await,
            }
        }
        let mut running = JoinSet::new();
        for (queue, channel) in self.queues.iter().zip(opened) {
            running.spawn(Arc::clone(queue).run(channel, generation.clone()));
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
                    failure.get_or_insert(Error::Runtime(std::io::Error::other(format!(
                        "queue consumer failed: {join}"
                    ))));
                    self.shutdown.cancel();
                }
            }
        }
        if (connection_lost || lost.is_cancelled()) && !self.shutdown.is_cancelled() {
            return Ended::Lost("the connection failed".to_owned());
        }
        close(connection).await;
        Ended::Shutdown(failure.map_or(Ok(()), Err))
    }

    /// The startup's connect and declaration steps, once: each address is tried once (as
    /// with `wait_for_broker(false)`), then the exchanges and every queue's topology are
    /// declared by the code `run` uses, without consuming; then the connection is closed.
    pub(crate) async fn check(&self) -> Result<CheckReport, Error> {
        let runtime = Arc::new(self.connection_runtime()?);
        let mut failure = None;
        let mut opened = None;
        for url in &self.urls {
            match Connection::open(
                url,
                &self.connection_name,
                Arc::clone(&runtime),
                self.connect.timeout,
                &self.tls,
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
            connection.declare_exchanges(&self.exchanges).await?;
            let mut queues = Vec::with_capacity(self.queues.len());
            for queue in &self.queues {
                queues.push(queue.check(&connection).await?);
            }
            Ok::<_, Error>(queues)
        }
        .await;
        close(&connection).await;
        Ok(CheckReport {
            address: url.redacted().to_owned(),
            exchanges: self.exchanges.iter().map(|e| e.name.clone()).collect(),
            queues: checked?,
        })
    }

    async fn wait_for_orphans(&self) {
        for queue in &self.queues {
            queue.wait_for_orphans(self.timing.shutdown_timeout).await;
        }
    }

    fn connection_runtime(&self) -> Result<ConnectionRuntime, Error> {
        #[cfg(feature = "test-util")]
        if self.shared_runtime {
            return Ok(ConnectionRuntime::shared());
        }
        debug_assert!(!self.shared_runtime);
        let runtime = ConnectionRuntime::dedicated()?;
        #[cfg(feature = "test-util")]
        self.wedge.set(runtime.handle());
        Ok(runtime)
    }
}

/// Follows the connection's events: a connection error fires `lost`; flow control (the
/// broker blocking publishers after a resource alarm) is reported, never taken for a loss.
/// A channel error while the connection lives is the channel's consumer's business.
async fn watch_events(
    connection: Arc<Connection>,
    lost: CancellationToken,
    loss: Arc<Mutex<Option<String>>>,
    status: Arc<StatusWriter>,
) {
    let mut events = connection.lapin().events_listener();
    while let Some(event) = events.next().await {
        match event {
            lapin::Event::Error(error) if !connection.is_connected() => {
                *loss.lock().unwrap_or_else(|e| e.into_inner()) = Some(error.to_string());
                lost.cancel();
                return;
            }
            lapin::Event::Error(error) => debug!(%error, "channel error"),
            lapin::Event::ConnectionBlocked(reason) => {
                warn!(%reason, "the broker blocked the connection (resource alarm); consuming goes on");
                status.set_blocked(Some(reason));
            }
            lapin::Event::ConnectionUnblocked => {
                info!("the broker unblocked the connection");
                status.set_blocked(None);
            }
            _ => {}
        }
    }
}

async fn close(connection: &Connection) {
    if let Err(error) = connection.close().await {
        warn!(%error, "connection close failed");
    }
}
