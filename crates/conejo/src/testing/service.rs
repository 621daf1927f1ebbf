//! The service under test, running on the test's runtime: its counters, its journal of
//! handled deliveries, waiting until it is ready or idle, stopping it.

use std::{sync::Mutex, time::Duration};

use tokio::task::JoinHandle;

use super::{Handled, HandledAs, POLL, TestBroker, TestError};
use crate::{
    Builder, Conejo, Error, Publisher, QueueStats, ShutdownHandle, Stats, Status,
    app::DeclaredNames,
};

/// How long [`TestService::idle`] and [`TestBroker::start`] wait by default (tokio's time:
/// under the paused clock of memory mode, no real time).
pub const DEFAULT_WAIT: Duration = Duration::from_secs(60);

/// A service started by [`TestBroker::start`]: running on the test's runtime until
/// [`stop`](Self::stop) (or until dropped, which asks it to stop).
pub struct TestService {
    broker: TestBroker,
    shutdown: ShutdownHandle,
    stats: Stats,
    status: Status,
    publisher: Publisher,
    declared: DeclaredNames,
    task: Mutex<Option<JoinHandle<Result<(), Error>>>>,
}

impl TestBroker {
    /// Builds and starts the service of `builder` on this broker — the user's builder,
    /// unchanged: in memory its connections go to the in-memory broker whatever its URL —
    /// and waits until it consumes every queue.
    ///
    /// # Errors
    /// An invalid configuration ([`TestError::Service`]), or a service that stopped (a
    /// missing queue, a refused declaration…) or did not get ready within 60 s.
    pub async fn start(&self, builder: Builder) -> Result<TestService, TestError> {
        let service = self.spawn(builder)?;
        service.ready().await?;
        Ok(service)
    }

    /// As [`start`](Self::start), without waiting until it is ready: for a test of a
    /// service that cannot connect yet.
    ///
    /// # Errors
    /// An invalid configuration.
    pub fn spawn(&self, builder: Builder) -> Result<TestService, TestError> {
        let builder = match self.memory_broker() {
            Some(memory) => builder.memory(memory),
            None => builder,
        };
        let conejo = builder.build()?;
        let declared = conejo.declared();
        self.record(&declared);
        Ok(TestService::spawn(self.clone(), conejo, declared))
    }
}

impl TestService {
    fn spawn(broker: TestBroker, conejo: Conejo, declared: DeclaredNames) -> TestService {
        let stats = conejo.stats();
        for queue in &declared.consumed {
            stats.counters(queue).journal.listen();
        }
        TestService {
            broker,
            shutdown: conejo.shutdown_handle(),
            status: conejo.status(),
            publisher: conejo.publisher(),
            stats,
            declared,
            task: Mutex::new(Some(tokio::spawn(conejo.run_until(std::future::pending())))),
        }
    }

    /// The broker it runs on.
    #[must_use]
    pub fn broker(&self) -> &TestBroker {
        &self.broker
    }

    /// Its counters.
    #[must_use]
    pub fn stats(&self) -> Stats {
        self.stats.clone()
    }

    /// The counters of one of its queues.
    ///
    /// # Panics
    /// For a queue the service does not consume.
    #[must_use]
    pub fn queue(&self, queue: &str) -> QueueStats {
        self.stats
            .queue(queue)
            .unwrap_or_else(|| panic!("the service does not consume '{queue}'"))
    }

    /// Its connection's status.
    #[must_use]
    pub fn status(&self) -> Status {
        self.status.clone()
    }

    /// Its publisher (what [`Conejo::publisher`] gives).
    #[must_use]
    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    /// The deliveries of `queue` that ended since the service started, in the order they
    /// ended: each with its attempt, how it ended (acked, retried, dead-lettered…) and the
    /// failure that led there.
    ///
    /// # Panics
    /// For a queue the service does not consume.
    #[must_use]
    pub fn handled(&self, queue: &str) -> Vec<Handled> {
        assert!(
            self.stats.queue(queue).is_some(),
            "the service does not consume '{queue}'"
        );
        self.stats.counters(queue).journal.entries()
    }

    /// True until the service stopped (by [`stop`](Self::stop), or failing).
    #[must_use]
    pub fn is_running(&self) -> bool {
        self.task
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_some_and(|task| !task.is_finished())
    }

    /// Fails with the service's own error if it stopped.
    async fn check_running(&self, waiting_for: &str) -> Result<(), TestError> {
        let finished = {
            let mut task = self.task.lock().unwrap_or_else(|e| e.into_inner());
            match task.as_ref() {
                Some(running) if running.is_finished() => task.take(),
                Some(_) => return Ok(()),
                None => return Err(TestError::Stopped(waiting_for.to_owned())),
            }
        };
        match finished.expect("a finished task").await {
            Ok(Err(error)) => Err(TestError::Service(error)),
            Ok(Ok(())) | Err(_) => Err(TestError::Stopped(waiting_for.to_owned())),
        }
    }

    /// Waits until it consumes every queue (at most [`DEFAULT_WAIT`]).
    ///
    /// # Errors
    /// The service's error if it stopped (a missing queue, a refused declaration…), or a
    /// timeout.
    pub async fn ready(&self) -> Result<(), TestError> {
        self.until_within("the service to be ready", DEFAULT_WAIT, |service| {
            service.status.is_ready()
        })
        .await
    }

    /// Waits until nothing is left to do (at most [`DEFAULT_WAIT`]): the service consuming
    /// every queue, no handler running, nothing ready in its queues, no retry waiting in a
    /// wait queue, no publish waiting for its confirm — so the test can assert on what
    /// happened rather than sleep. A service that is reconnecting is not idle.
    ///
    /// # Errors
    /// A timeout naming what was still pending, or the service's error if it stopped.
    pub async fn idle(&self) -> Result<(), TestError> {
        self.idle_within(DEFAULT_WAIT).await
    }

    /// [`idle`](Self::idle), waiting at most `limit`.
    ///
    /// # Errors
    /// As [`idle`](Self::idle).
    pub async fn idle_within(&self, limit: Duration) -> Result<(), TestError> {
        let deadline = tokio::time::Instant::now() + limit;
        // Idle twice in a row, a poll apart: a settlement or a confirm in flight between
        // two looks cannot pass for idle.
        let mut quiet = 0;
        loop {
            self.check_running("the service to be idle").await?;
            let pending = self.pending().await?;
            match pending {
                None => quiet += 1,
                Some(_) => quiet = 0,
            }
            if quiet >= 2 {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let pending = pending.unwrap_or_else(|| "settling".to_owned());
                return Err(TestError::Timeout {
                    what: format!("the service to be idle (pending: {pending})"),
                    limit,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// What is still pending, if anything.
    async fn pending(&self) -> Result<Option<String>, TestError> {
        let mut pending = Vec::new();
        for (queue, stats) in self.stats.all() {
            if stats.in_flight > 0 {
                pending.push(format!("{} in flight in '{queue}'", stats.in_flight));
            }
        }
        let publishes = self.publisher.stats();
        if publishes.in_flight + publishes.waiting > 0 {
            pending.push(format!(
                "{} publishes unconfirmed",
                publishes.in_flight + publishes.waiting
            ));
        }
        if !self.status.is_ready() {
            pending.push("the service is not consuming every queue".to_owned());
        }
        // Its queues, and (live) the wait queues its retries went to, as its journal says;
        // in memory, the broker says what else is pending (unsettled deliveries, messages
        // waiting to expire anywhere, held publishes).
        let waits = if self.broker.is_live() {
            self.wait_queues()
        } else {
            Vec::new()
        };
        for queue in self.declared.consumed.iter().chain(&waits) {
            match self.broker.ready(queue).await {
                Ok(0) => {}
                Ok(ready) => pending.push(format!("{ready} ready in '{queue}'")),
                // A wait queue no retry needed yet, or a queue the service could not
                // declare yet.
                Err(error) if error.reply_code() == Some(404) => {}
                Err(error) => return Err(error),
            }
        }
        if let Some(memory) = self.broker.memory_broker() {
            pending.extend(memory.busy());
        }
        Ok((!pending.is_empty()).then(|| pending.join(", ")))
    }

    /// The wait queues its retries went to, as its journal says.
    fn wait_queues(&self) -> Vec<String> {
        let mut waits: Vec<String> = Vec::new();
        for queue in &self.declared.consumed {
            for entry in self.stats.counters(queue).journal.entries() {
                if let (HandledAs::Retried, Some(wait)) = (entry.outcome, entry.sent_to)
                    && !waits.contains(&wait)
                {
                    waits.push(wait);
                }
            }
        }
        waits
    }

    /// Waits until `condition` holds of the service (its [`stats`](Self::stats),
    /// [`status`](Self::status)…), at most [`DEFAULT_WAIT`].
    ///
    /// # Errors
    /// A timeout naming `what`, or the service's error if it stopped.
    pub async fn until(
        &self,
        what: &str,
        condition: impl FnMut(&TestService) -> bool,
    ) -> Result<(), TestError> {
        self.until_within(what, DEFAULT_WAIT, condition).await
    }

    /// [`until`](Self::until), waiting at most `limit`.
    ///
    /// # Errors
    /// As [`until`](Self::until).
    pub async fn until_within(
        &self,
        what: &str,
        limit: Duration,
        mut condition: impl FnMut(&TestService) -> bool,
    ) -> Result<(), TestError> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if condition(self) {
                return Ok(());
            }
            self.check_running(what).await?;
            if tokio::time::Instant::now() >= deadline {
                return Err(TestError::Timeout {
                    what: what.to_owned(),
                    limit,
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Stops the service gracefully (as SIGTERM would) and returns how its run ended.
    ///
    /// # Errors
    /// The service's error, or a timeout if it did not stop within [`DEFAULT_WAIT`] plus
    /// its shutdown timeout.
    pub async fn stop(self) -> Result<(), TestError> {
        self.shutdown.shutdown();
        let task = self.task.lock().unwrap_or_else(|e| e.into_inner()).take();
        let Some(task) = task else {
            return Ok(());
        };
        match tokio::time::timeout(DEFAULT_WAIT, task).await {
            Ok(Ok(result)) => result.map_err(TestError::Service),
            Ok(Err(join)) => Err(TestError::Stopped(format!("its run ({join})"))),
            Err(_) => Err(TestError::Timeout {
                what: "the service to stop".to_owned(),
                limit: DEFAULT_WAIT,
            }),
        }
    }
}

impl Drop for TestService {
    fn drop(&mut self) {
        // For the live broker's cleanup: the wait queues its retries declared.
        for wait in self.wait_queues() {
            self.broker.created_queue(&wait);
        }
        self.shutdown.shutdown();
    }
}

impl std::fmt::Debug for TestService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestService")
            .field("queues", &self.declared.consumed)
            .field("running", &self.is_running())
            .finish_non_exhaustive()
    }
}
