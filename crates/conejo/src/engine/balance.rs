//! Handing a borrowed partition back. A replica that holds the active role on a partition of
//! another replica's ([`Partitions::replica`](crate::Partitions::replica)) — it took it over
//! when that replica died or restarted — checks now and then whether that replica is back:
//! when the partition has as many consumers as there are replicas. Then the consume loop
//! hands the role over (in order: running deliveries end, the unstarted ones go back in
//! place) and consumes again behind the others.

use std::sync::{Arc, atomic::Ordering::Relaxed};

use lapin::types::FieldTable;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::{channel::Generation, queue::Queue};
use crate::broker::{BrokerError, QueueOptions};

/// Watches a borrowed partition's consumers while one channel consumes it; fires `due` when
/// it is time to hand the partition back. Dropped with the channel's consumption.
pub(crate) struct HandBack {
    /// Fired once the partition is to be handed back.
    pub(crate) due: CancellationToken,
    watcher: JoinHandle<()>,
}

impl HandBack {
    /// A watcher for `queue` if it is a borrowed partition; `None` otherwise.
    pub(crate) fn watch(queue: &Arc<Queue>, generation: &Generation) -> Option<Self> {
        let borrowed = queue.settings.borrowed?;
        let due = CancellationToken::new();
        let watcher = tokio::spawn({
            let (queue, generation, due) = (Arc::clone(queue), generation.clone(), due.clone());
            async move {
                // Only the active consumer of a single-active queue gets deliveries.
                let standby = queue.counters.delivered.load(Relaxed);
                loop {
                    tokio::select! {
                        () = generation.shutdown.cancelled() => return,
                        () = generation.lost.cancelled() => return,
                        () = tokio::time::sleep(borrowed.interval) => {}
                    }
                    if queue.counters.delivered.load(Relaxed) == standby {
                        continue;
                    }
                    match consumers(&queue, &generation).await {
                        Ok(consumers) if consumers >= u32::from(borrowed.replicas) => {
                            info!(
                                queue = %queue.name(),
                                consumers,
                                "the partition's own replica is back; handing the partition \
                                 over"
                            );
                            due.cancel();
                            return;
                        }
                        Ok(_) => {}
                        Err(error) => {
                            debug!(queue = %queue.name(), %error, "cannot count consumers");
                        }
                    }
                }
            }
        });
        Some(HandBack { due, watcher })
    }
}

impl Drop for HandBack {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// The queue's consumers, as a passive declaration on a channel of its own tells.
async fn consumers(queue: &Queue, generation: &Generation) -> Result<u32, BrokerError> {
    let (on, name) = (generation.connection.clone(), Arc::clone(queue.name()));
    generation
        .connection
        .run(async move {
            let channel = on.open_channel().await?;
            let passive = QueueOptions {
                passive: true,
                ..QueueOptions::default()
            };
            let state = channel
                .declare_queue(&name, passive, FieldTable::default())
                .await;
            let _ = channel.close("counted").await;
            Ok(state?.consumers)
        })
        .await
}
