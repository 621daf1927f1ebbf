//! One queue's life within a connection generation: consume its channel, and open a new one
//! whenever the broker closes it or cancels the consumer, until shutdown or the loss of the
//! connection.

use std::{sync::Arc, time::Duration};

use tracing::{debug, error, warn};

use super::{
    channel::{Channel, Generation, Opening},
    consumer::{self, ChannelEnd},
    queue::Queue,
};
use crate::backoff::Backoff;

/// How a queue's consumer ended within a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The service shut down (gracefully).
    Shutdown,
    /// The connection was lost.
    ConnectionLost,
}

/// A channel that ran this long before failing is reopened at once: it was healthy.
const HEALTHY_RUN: Duration = Duration::from_secs(5);

/// Consumes on `first` (when the caller already opened it), reopening the channel
/// whenever the broker closes it or cancels the consumer, until shutdown or the loss of the
/// connection.
pub(crate) async fn run(queue: Arc<Queue>, first: Option<Channel>, generation: Generation) -> End {
    let name = Arc::clone(queue.name());
    let mut first = first;
    let mut backoff = Backoff::new(generation.reopen.0, generation.reopen.1);
    loop {
        let channel = match first.take() {
            Some(channel) => channel,
            None => match Channel::open(&queue, &generation, Opening::Reopen).await {
                Ok(channel) => channel,
                Err(error) => {
                    if !generation.connection.is_connected() {
                        return End::ConnectionLost;
                    }
                    let delay = backoff.next_delay().max(generation.reopen.0);
                    // The first three failures, then one in ten: a queue that stays
                    // unavailable for hours does not flood the log.
                    if backoff.worth_logging() {
                        error!(
                            queue = %name,
                            %error,
                            attempt = backoff.retries(),
                            "cannot consume the queue; trying again in {delay:?}"
                        );
                    } else {
                        debug!(
                            queue = %name,
                            %error,
                            attempt = backoff.retries(),
                            "cannot consume the queue"
                        );
                    }
                    if let Some(end) = pause(&generation, delay).await {
                        return end;
                    }
                    continue;
                }
            },
        };
        generation.status.set_consuming(&name, true);
        queue.counters.set_consumer(true);
        let opened = channel.opened;
        let ended = consumer::consume(&queue, channel, &generation).await;
        queue.counters.set_consumer(false);
        generation.status.set_consuming(&name, false);
        let what = match ended {
            ChannelEnd::Shutdown => return End::Shutdown,
            ChannelEnd::ConnectionLost => return End::ConnectionLost,
            _ if !generation.connection.is_connected() => return End::ConnectionLost,
            ChannelEnd::Closed(error) => format!("the broker closed its channel: {error}"),
            ChannelEnd::Cancelled => {
                "the broker cancelled its consumer (queue deleted, or its node down)".to_owned()
            }
            // Consumed again at once, behind the replica it was handed to.
            ChannelEnd::HandedBack => continue,
        };
        if opened.elapsed() >= HEALTHY_RUN {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        warn!(queue = %name, "{what}; consuming again in {delay:?}");
        if let Some(end) = pause(&generation, delay).await {
            return end;
        }
    }
}

/// At a shutdown that found no channel open (while reconnecting): waits, up to
/// `deadline`, for handlers left running from a lost connection; their results were
/// already dropped, but their work gets to finish.
pub(crate) async fn wait_for_orphans(queue: &Queue, deadline: Duration) {
    queue.tasks.close();
    if tokio::time::timeout(deadline, queue.tasks.wait())
        .await
        .is_err()
    {
        warn!(
            queue = %queue.name(),
            still_running = queue.tasks.len(),
            "handlers from a lost connection still running at the shutdown deadline"
        );
    }
}

/// Waits `delay` unless shutdown or the loss of the connection comes first.
async fn pause(generation: &Generation, delay: Duration) -> Option<End> {
    tokio::select! {
        biased;
        () = generation.shutdown.cancelled() => Some(End::Shutdown),
        () = generation.lost.cancelled() => Some(End::ConnectionLost),
        () = tokio::time::sleep(delay) => None,
    }
}
