//! Running a conejo service inside a test, on the test's runtime.

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use conejo::{Conejo, QueueStats, ShutdownHandle, Stats, Status};
use tokio::task::JoinHandle;

/// A conejo service spawned on the current tokio runtime.
#[derive(Debug)]
pub struct RunningService {
    shutdown: ShutdownHandle,
    stats: Stats,
    status: Status,
    task: JoinHandle<Result<(), conejo::Error>>,
}

impl RunningService {
    /// Spawns `conejo.run_until(never)`: it runs until [`RunningService::stop`] or a failure.
    pub fn spawn(conejo: Conejo) -> Self {
        RunningService {
            shutdown: conejo.shutdown_handle(),
            stats: conejo.stats(),
            status: conejo.status(),
            task: tokio::spawn(conejo.run_until(std::future::pending())),
        }
    }

    /// The service's counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The service's connection state.
    pub fn status(&self) -> &Status {
        &self.status
    }

    /// True once the service's run has returned (it failed, or was stopped).
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }

    /// Polls `queue`'s counters every 10 ms until `done` holds; errors after `timeout`
    /// (with the last counters) or as soon as the service stopped.
    pub async fn wait_for(
        &self,
        queue: &str,
        timeout: Duration,
        done: impl Fn(&QueueStats) -> bool,
    ) -> anyhow::Result<QueueStats> {
        let deadline = Instant::now() + timeout;
        loop {
            let stats = self
                .stats
                .queue(queue)
                .with_context(|| format!("queue {queue} is not registered"))?;
            if done(&stats) {
                return Ok(stats);
            }
            if self.task.is_finished() {
                bail!("the service stopped while waiting; counters of {queue}: {stats:?}");
            }
            if Instant::now() >= deadline {
                bail!("timed out after {timeout:?}; counters of {queue}: {stats:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Starts the graceful shutdown and waits (at most 30 s) for `run` to return its result.
    pub async fn stop(self) -> anyhow::Result<Result<(), conejo::Error>> {
        self.shutdown.shutdown();
        self.join(Duration::from_secs(30)).await
    }

    /// Waits for `run` to return on its own (after a failure), at most `timeout`.
    pub async fn join(self, timeout: Duration) -> anyhow::Result<Result<(), conejo::Error>> {
        tokio::time::timeout(timeout, self.task)
            .await
            .context("the service did not stop in time")?
            .context("the service task panicked")
    }
}
