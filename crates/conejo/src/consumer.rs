//! One queue's consumer loop, on the handler runtime: take a concurrency slot, take a
//! delivery, hand it to its task ([`Unsettled::process`]). And its graceful stop.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use futures::StreamExt;
use tokio::{sync::Semaphore, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, error, info, warn};

use crate::{
    Context, Error,
    connection::{Connection, QueueConsumer},
    dispatch::{Dispatch, Unsettled},
    handler::ErasedHandler,
    publish::Publisher,
    settle::settle_task,
    stats::QueueCounters,
    topology::Durability,
    tracker::Settlement,
};

/// A queue as registered: name, handler, settings.
pub(crate) struct QueueSpec {
    /// The queue's name.
    pub(crate) name: Arc<str>,
    /// The type-erased handler.
    pub(crate) handler: Arc<dyn ErasedHandler>,
    /// Declaration and consumption settings.
    pub(crate) config: crate::QueueConfig,
}

/// A queue whose consumer is set up and ready to run.
pub(crate) struct QueueWorker {
    name: Arc<str>,
    /// What each delivery's task needs, shared: one reference count per message.
    dispatch: Arc<Dispatch>,
    /// Messages handled at once.
    concurrency: usize,
    /// The channel and its consumer stream.
    consumer: QueueConsumer,
}

/// Timing knobs shared by every queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// How long in-flight handlers may run once shutdown starts.
    pub(crate) shutdown_timeout: Duration,
    /// How long a finished ack may wait to be coalesced with others.
    pub(crate) ack_linger: Duration,
}

impl QueueWorker {
    /// Sets up the queue's channel and consumer, and starts its settle task.
    pub(crate) async fn start(
        spec: QueueSpec,
        connection: &Connection,
        publisher: &Arc<Publisher>,
        index: usize,
        timing: Timing,
        counters: Arc<QueueCounters>,
    ) -> Result<Self, Error> {
        let (concurrency, prefetch) = spec.config.resolve(spec.handler.default_concurrency());
        let consumer_tag = format!("conejo-{}-{index}-{}", std::process::id(), spec.name);
        let consumer = connection
            .consume(&spec.name, &spec.config, prefetch, consumer_tag)
            .await?;
        let (settle, task) = settle_task(
            consumer.channel.clone(),
            prefetch,
            timing.ack_linger,
            Arc::clone(&spec.name),
            Arc::clone(&counters),
        );
        consumer.spawn_on_connection_runtime(task.run());
        info!(queue = %spec.name, concurrency, prefetch, "consuming");
        let config = &spec.config;
        Ok(QueueWorker {
            dispatch: Arc::new(Dispatch {
                queue: Arc::clone(&spec.name),
                policy: config.policy(),
                retry: config.retry,
                timeout: config.timeout,
                poison_limit: config.poison_limit,
                dead_letter: config.dead_letter_route(&spec.name),
                durability: Durability {
                    durable: config.durable || !config.declare,
                },
                handler: spec.handler,
                settle,
                publisher: Arc::clone(publisher),
                counters,
            }),
            name: spec.name,
            concurrency,
            consumer,
        })
    }

    /// Consumes until `shutdown` fires (then stops gracefully) or the consumer fails.
    pub(crate) async fn run(
        mut self,
        shutdown: CancellationToken,
        timing: Timing,
    ) -> Result<(), Error> {
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let in_flight = TaskTracker::new();
        let mut last_tag = 0;
        let ended = loop {
            // A permit first: a delivery taken from the stream is always started at once, so
            // at shutdown every unstarted one is still in the stream, to be given back.
            let permit = tokio::select! {
                biased;
                () = shutdown.cancelled() => break Ok(()),
                permit = Arc::clone(&permits).acquire_owned() => {
                    permit.expect("the semaphore is never closed")
                }
            };
            let next = tokio::select! {
                biased;
                () = shutdown.cancelled() => break Ok(()),
                next = self.consumer.consumer.next() => next,
            };
            let mut delivery = match next {
                Some(Ok(delivery)) => delivery,
                Some(Err(source)) => {
                    break Err(Error::ConsumerFailed {
                        queue: self.name.to_string(),
                        source,
                    });
                }
                None => {
                    break Err(Error::ConsumerCancelled {
                        queue: self.name.to_string(),
                    });
                }
            };
            last_tag = delivery.delivery_tag;
            QueueCounters::add(&self.dispatch.counters.delivered, 1);
            // From here the delivery is settled by construction: dropping `unsettled` in any
            // way but settling it gives the message back.
            let unsettled = Unsettled::new(delivery.delivery_tag, Arc::clone(&self.dispatch));
            let ctx = Context::from_delivery(
                Arc::clone(&self.name),
                &mut delivery,
                shutdown.clone(),
                permit,
            );
            let body = Bytes::from(std::mem::take(&mut delivery.data));
            in_flight.spawn(unsettled.process(ctx, body));
        };
        match ended {
            Ok(()) => {
                self.stop(in_flight, last_tag, timing).await;
                Ok(())
            }
            Err(error) => {
                // The channel is gone: the broker requeues everything unacked. Handlers
                // still running finish on their own; their acks cannot be sent.
                error!(queue = %self.name, %error, "consumer stopped");
                in_flight.close();
                self.dispatch.settle.close().await;
                Err(error)
            }
        }
    }

    /// Graceful stop: cancel the consumer, give back what was prefetched but not started,
    /// let in-flight handlers finish until the deadline, give back what did not finish.
    async fn stop(mut self, in_flight: TaskTracker, mut last_tag: u64, timing: Timing) {
        let deadline = Instant::now() + timing.shutdown_timeout;
        let cancelled = self
            .consumer
            .cancel(deadline.saturating_duration_since(Instant::now()))
            .await;
        if let Err(error) = &cancelled {
            warn!(queue = %self.name, %error, "basic.cancel failed");
        }
        // After cancel-ok the stream yields what was buffered, then ends.
        let mut released = 0;
        while cancelled.is_ok() {
            match tokio::time::timeout_at(deadline, self.consumer.consumer.next()).await {
                Ok(Some(Ok(delivery))) => {
                    last_tag = delivery.delivery_tag;
                    QueueCounters::add(&self.dispatch.counters.delivered, 1);
                    self.dispatch
                        .settle
                        .settle(delivery.delivery_tag, Settlement::Requeue);
                    released += 1;
                }
                Ok(Some(Err(error))) => {
                    warn!(queue = %self.name, %error, "consumer failed while stopping");
                    break;
                }
                Ok(None) | Err(_) => break,
            }
        }
        in_flight.close();
        info!(
            queue = %self.name,
            released,
            in_flight = in_flight.len(),
            "stopping: gave back unstarted messages, waiting for running handlers"
        );
        if tokio::time::timeout_at(deadline, in_flight.wait())
            .await
            .is_err()
        {
            warn!(
                queue = %self.name,
                still_running = in_flight.len(),
                timeout = ?timing.shutdown_timeout,
                "shutdown deadline passed; giving back the messages of handlers still running"
            );
            self.dispatch.settle.abandon(last_tag).await;
        }
        self.dispatch.settle.close().await;
        let closed = self.consumer.close().await;
        match closed {
            Ok(()) => debug!(queue = %self.name, "channel closed"),
            Err(error) => warn!(queue = %self.name, %error, "channel close failed"),
        }
    }
}
