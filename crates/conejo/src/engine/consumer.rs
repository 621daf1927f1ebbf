//! One queue's consumer, on the handler runtime: open a channel, take a concurrency slot,
//! take a delivery, hand it to its task ([`Unsettled::process`]); reopen the channel when
//! the broker closes it; stop gracefully at shutdown, fast when the connection is lost.

use std::{
    panic::AssertUnwindSafe,
    sync::{
        Arc,
        atomic::{
            AtomicBool, AtomicUsize,
            Ordering::{AcqRel, Acquire, Release},
        },
    },
    time::Duration,
};

use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use tokio::{task::JoinHandle, time::Instant};
use tokio_util::{
    sync::CancellationToken,
    task::{TaskTracker, task_tracker::TaskTrackerToken},
};
use tracing::{debug, error, info, warn};

use crate::{
    Context, Error, QueueConfig,
    broker::connection::{Canceller, Connection, QueueConsumer},
    engine::backoff::Backoff,
    engine::dispatch::{Dispatch, Unsettled},
    engine::publish::Publisher,
    engine::settle::settle_task,
    engine::settle::tracker::Settlement,
    handler::context::Signals,
    handler::slot::{Slot, Slots},
    observe::stats::QueueCounters,
    observe::status::StatusWriter,
    service::{BoxLayer, BoxService, Layers, Registration, Service},
};

/// A queue as registered: name, handler, settings.
pub(crate) struct QueueSpec {
    /// The queue's name.
    pub(crate) name: Arc<str>,
    /// The handler, its pipeline not yet assembled.
    pub(crate) handler: Registration,
    /// Declaration and consumption settings.
    pub(crate) config: QueueConfig,
}

/// A registered queue while the service runs: what outlives its channels and connections.
pub(crate) struct Queue {
    /// The queue's name.
    pub(crate) name: Arc<str>,
    /// Timeout, panic isolation, the user's layers, decoding and the handler.
    pipeline: BoxService,
    /// True for a blocking handler.
    blocking: bool,
    /// Declaration and consumption settings.
    config: QueueConfig,
    /// Messages handled at once.
    concurrency: usize,
    /// Unacknowledged messages the broker may push.
    prefetch: u16,
    /// Concurrency slots, shared by every channel of the queue: a handler still running
    /// after its channel was lost keeps its slot, so the bound holds across reconnections.
    slots: Arc<Slots>,
    /// Every delivery of the queue in a worker's hands, whatever its channel; waited for at
    /// shutdown.
    tasks: TaskTracker,
    /// Channels the queue no longer consumes from whose handlers still run (see
    /// [`retire`]); waited for at shutdown.
    retiring: TaskTracker,
    /// The queue's workers, started as deliveries need them.
    workers: Workers,
    /// This queue's counters.
    counters: Arc<QueueCounters>,
    /// Position in the builder, for consumer tags.
    index: usize,
}

/// What a queue's consumer needs from the connection generation it runs in.
#[derive(Clone)]
pub(crate) struct Generation {
    /// The connection.
    pub(crate) connection: Arc<Connection>,
    /// Its publisher of retry copies and dead letters.
    pub(crate) publisher: Arc<Publisher>,
    /// Fired when the service starts shutting down.
    pub(crate) shutdown: CancellationToken,
    /// Fired when this connection is lost.
    pub(crate) lost: CancellationToken,
    /// Shutdown deadline and ack linger.
    pub(crate) timing: Timing,
    /// Where the queue reports that it consumes.
    pub(crate) status: Arc<StatusWriter>,
    /// Delays between attempts to reopen a channel.
    pub(crate) reopen: (Duration, Duration),
}

/// How a queue's consumer ended within a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The service shut down (gracefully).
    Shutdown,
    /// The connection was lost.
    ConnectionLost,
}

/// How one channel's consumption ended.
enum ChannelEnd {
    Shutdown,
    ConnectionLost,
    /// The broker closed the channel (a precondition failure, a consumer timeout…).
    Closed(lapin::Error),
    /// The broker cancelled the consumer (the queue was deleted, or its node went down).
    Cancelled,
}

/// One open channel of a queue, consuming.
pub(crate) struct Channel {
    /// The channel and its consumer stream.
    consumer: QueueConsumer,
    /// What each delivery's task needs; its settle handle belongs to this channel only.
    dispatch: Arc<Dispatch>,
    /// The signals given to this channel's handlers: `shutdown` (`Context::shutdown_requested`)
    /// fires at shutdown, and when the channel or connection is lost (their results cannot
    /// be sent).
    signals: Arc<Signals>,
    /// This channel's deliveries in a worker's hands.
    tasks: TaskTracker,
    /// When it started consuming, for the reopen back-off.
    opened: Instant,
}

/// Why a queue opens a channel.
pub(crate) enum Opening {
    /// At startup: a dead-letter topology that cannot be declared is an error.
    Startup,
    /// After a reconnection, or the loss of the queue's channel: the queue is consumed even
    /// if its dead-letter topology cannot be declared (its dead letters wait until it can).
    Reopen,
    /// To move off a stuck channel ([`Queue::rotate`]), whose consumer this cancels: this
    /// connection declared the queue and its topology already.
    Rotation(Canceller),
}

/// The queue moves to a fresh channel at most this often: each move costs a few round trips,
/// and each retired channel lives until its long deliveries end.
const ROTATION_INTERVAL: Duration = Duration::from_millis(100);

/// At most this many retired channels of a queue may hold running deliveries; beyond it the
/// queue stays on its channel, and acks behind a long delivery go one frame each.
const MAX_RETIRING: usize = 64;

/// A channel that ran this long before failing is reopened at once: it was healthy.
const HEALTHY_RUN: Duration = Duration::from_secs(5);

/// How long the settle task of a lost channel may take to give up.
const LOST_CLEANUP: Duration = Duration::from_secs(2);

/// Timing knobs shared by every queue.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// How long in-flight handlers may run once shutdown starts.
    pub(crate) shutdown_timeout: Duration,
    /// How long a finished ack may wait to be coalesced with others.
    pub(crate) ack_linger: Duration,
}

impl Queue {
    pub(crate) fn new(
        spec: QueueSpec,
        service_layers: &Layers,
        index: usize,
        counters: Arc<QueueCounters>,
    ) -> Self {
        let (concurrency, prefetch) = spec
            .config
            .resolve(spec.handler.default_concurrency, spec.handler.blocking);
        let blocking = spec.handler.blocking;
        // The queue's own layers inside the service's.
        let layers: Vec<BoxLayer> = spec
            .config
            .layers
            .0
            .iter()
            .chain(&service_layers.0)
            .cloned()
            .collect();
        let pipeline = spec.handler.assemble(&layers, spec.config.timeout);
        let (jobs, receiver) = flume::unbounded();
        Queue {
            name: spec.name,
            pipeline,
            blocking,
            config: spec.config,
            concurrency,
            prefetch,
            slots: Slots::new(concurrency),
            // The counters' tracker: `Stats` reads deliveries in flight from it.
            tasks: counters.tasks.clone(),
            retiring: TaskTracker::new(),
            workers: Workers {
                jobs,
                receiver,
                idle: Arc::new(AtomicUsize::new(0)),
                started: AtomicUsize::new(0),
            },
            counters,
            index,
        }
    }

    /// Unacknowledged messages the broker may push on the queue's channel.
    #[cfg(feature = "metrics")]
    pub(crate) fn prefetch(&self) -> u16 {
        self.prefetch
    }

    /// This queue's counters.
    #[cfg(feature = "metrics")]
    pub(crate) fn counters(&self) -> &Arc<QueueCounters> {
        &self.counters
    }

    /// Opens a channel, sets up the queue's topology (unless `opening` is a rotation) and its
    /// consumer (prefetch first), and starts the channel's settle task.
    pub(crate) async fn open(
        &self,
        generation: &Generation,
        opening: Opening,
    ) -> Result<Channel, Error> {
        let rotation = matches!(opening, Opening::Rotation(_));
        if !rotation
            && let Err(error) = generation
                .connection
                .declare_dead_letter(&self.name, &self.config)
                .await
        {
            if matches!(opening, Opening::Startup) || !generation.connection.is_connected() {
                return Err(error);
            }
            warn!(
                queue = %self.name,
                %error,
                "cannot declare the dead-letter topology; consuming anyway (a message to \
                 dead-letter is given back until it can be)"
            );
        }
        // Short: lapin hashes the consumer tag for each of a delivery's three frames. The
        // connection's name already says which process this is.
        let consumer_tag = format!("conejo-{}", self.index);
        let connection = &generation.connection;
        let consumer = match opening {
            Opening::Rotation(old) => {
                connection
                    .consume_instead(&self.name, self.prefetch, consumer_tag, old)
                    .await?
            }
            _ => {
                connection
                    .consume(&self.name, &self.config, self.prefetch, consumer_tag)
                    .await?
            }
        };
        let (settle, task) = settle_task(
            consumer.channel.clone(),
            self.prefetch,
            generation.timing.ack_linger,
            Arc::clone(&self.name),
            Arc::clone(&self.counters),
        );
        consumer.spawn_on_connection_runtime(task.run());
        let config = &self.config;
        let dispatch = Arc::new(Dispatch {
            queue: Arc::clone(&self.name),
            policy: config.policy(),
            retry: config.retry,
            poison_limit: config.poison_limit,
            dead_letter: config.dead_letter_route(&self.name),
            durability: config.durability(),
            blocking: self.blocking,
            settle,
            publisher: Arc::clone(&generation.publisher),
            counters: Arc::clone(&self.counters),
        });
        if rotation {
            debug!(queue = %self.name, "consuming on a fresh channel");
        } else {
            info!(
                queue = %self.name,
                concurrency = self.concurrency,
                prefetch = self.prefetch,
                "consuming"
            );
        }
        Ok(Channel {
            consumer,
            dispatch,
            signals: Arc::new(Signals {
                shutdown: generation.shutdown.child_token(),
                service: generation.shutdown.clone(),
            }),
            tasks: TaskTracker::new(),
            opened: Instant::now(),
        })
    }

    /// Consumes on `first` (when the caller already opened it), reopening the channel
    /// whenever the broker closes it or cancels the consumer, until shutdown or the loss of
    /// the connection.
    pub(crate) async fn run(
        self: Arc<Self>,
        first: Option<Channel>,
        generation: Generation,
    ) -> End {
        let mut first = first;
        let mut backoff = Backoff::new(generation.reopen.0, generation.reopen.1);
        loop {
            let channel = match first.take() {
                Some(channel) => channel,
                None => match self.open(&generation, Opening::Reopen).await {
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
                                queue = %self.name,
                                %error,
                                attempt = backoff.retries(),
                                "cannot consume the queue; trying again in {delay:?}"
                            );
                        } else {
                            debug!(
                                queue = %self.name,
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
            generation.status.set_consuming(&self.name, true);
            let opened = channel.opened;
            let ended = self.consume(channel, &generation).await;
            generation.status.set_consuming(&self.name, false);
            let what = match ended {
                ChannelEnd::Shutdown => return End::Shutdown,
                ChannelEnd::ConnectionLost => return End::ConnectionLost,
                _ if !generation.connection.is_connected() => return End::ConnectionLost,
                ChannelEnd::Closed(error) => format!("the broker closed its channel: {error}"),
                ChannelEnd::Cancelled => {
                    "the broker cancelled its consumer (queue deleted, or its node down)".to_owned()
                }
            };
            if opened.elapsed() >= HEALTHY_RUN {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            warn!(queue = %self.name, "{what}; consuming again in {delay:?}");
            if let Some(end) = pause(&generation, delay).await {
                return end;
            }
        }
    }

    /// Hands a delivery to an idle worker, starting one (on the current, handler runtime)
    /// when none is idle: a queue has at most `concurrency` workers, and only as many as
    /// its load has needed at once — a worker per slot would cost every delivery a wake-up
    /// of a different task. Workers end when the queue is dropped.
    fn hand_over(&self, job: Job) {
        let workers = &self.workers;
        let claimed = workers
            .idle
            .fetch_update(AcqRel, Acquire, |idle| idle.checked_sub(1))
            .is_ok();
        if !claimed && workers.started.load(Acquire) < self.concurrency {
            workers.started.fetch_add(1, AcqRel);
            tokio::spawn(
                self.pipeline
                    .worker(workers.receiver.clone(), Arc::clone(&workers.idle)),
            );
        }
        // The slot bounds the deliveries in flight by the concurrency, and a worker counts
        // itself idle before it frees its slot, so a worker is free for this one. (A send
        // fails only without workers; the job is then dropped, which gives the message back.)
        let _ = workers.jobs.send(job);
    }

    /// Consumes one channel until shutdown, its loss, or the loss of the connection — moving
    /// to a fresh channel whenever a long-running delivery holds this one's acks
    /// ([`rotate`](Self::rotate)).
    async fn consume(
        self: &Arc<Self>,
        mut channel: Channel,
        generation: &Generation,
    ) -> ChannelEnd {
        let shutdown = &generation.shutdown;
        let lost = &generation.lost;
        let stopping = Stopping::watch(shutdown, lost);
        let mut last_tag = 0;
        // A move to a fresh channel, from its start until the fresh channel takes over, once
        // `channel` (whose consumer the move cancelled) has yielded what it had buffered.
        let mut moving: Option<Move> = None;
        // The interval spaces moves; the channel consumption starts on (at startup, or
        // reopened) may move as soon as it is stuck.
        let mut rotate_after = channel.opened;
        let ended = loop {
            // Busy, a free slot and a ready delivery are taken without a future or a wake-up,
            // and shutdown and loss are checked with one atomic load.
            if stopping.is_set() {
                if shutdown.is_cancelled() {
                    break ChannelEnd::Shutdown;
                }
                break ChannelEnd::ConnectionLost;
            }
            if moving.is_none()
                && channel.dispatch.settle.is_stuck()
                && self.retiring.len() < MAX_RETIRING
                && Instant::now() >= rotate_after
            {
                // In the background: under load its round trips take tens of milliseconds,
                // and a consume loop waiting for them would find a burst of deliveries after.
                moving = Some(Move::Opening(tokio::spawn(
                    Arc::clone(self).rotate(channel.consumer.canceller(), generation.clone()),
                )));
            }
            if let Some(Move::Opening(task)) = &moving
                && task.is_finished()
            {
                moving = Move::fresh(&mut moving)
                    .await
                    .map(|fresh| Move::Ready(Box::new(fresh)));
                rotate_after = Instant::now() + ROTATION_INTERVAL;
            }
            // A slot first: a delivery taken from the stream is always started at once, so
            // at shutdown every unstarted one is still in the stream, to be given back.
            let slot = match self.slots.try_acquire() {
                Some(slot) => slot,
                None => tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break ChannelEnd::Shutdown,
                    () = lost.cancelled() => break ChannelEnd::ConnectionLost,
                    slot = self.slots.acquire() => slot,
                },
            };
            let next = match channel.consumer.consumer.next().now_or_never() {
                Some(next) => next,
                None => tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break ChannelEnd::Shutdown,
                    () = lost.cancelled() => break ChannelEnd::ConnectionLost,
                    next = channel.consumer.consumer.next() => next,
                },
            };
            let end = match next {
                Some(Ok(delivery)) => {
                    last_tag = delivery.delivery_tag;
                    self.start(&channel, delivery, slot);
                    continue;
                }
                Some(Err(error)) => ChannelEnd::Closed(error),
                None => ChannelEnd::Cancelled,
            };
            // The stream ended. After a rotation's cancel-ok that is expected: the fresh channel
            // takes over (and if the broker closed or cancelled the old channel meanwhile,
            // the fresh channel is just as good a new channel).
            let Some(next) = Move::fresh(&mut moving).await else {
                break end;
            };
            let old = std::mem::replace(&mut channel, next);
            last_tag = 0;
            rotate_after = channel.opened + ROTATION_INTERVAL;
            self.retire(old, &end, generation);
        };
        drop(stopping);
        match ended {
            ChannelEnd::Shutdown => {
                let deadline = Instant::now() + generation.timing.shutdown_timeout;
                if let Some(mut successor) = Move::fresh(&mut moving).await {
                    // Nothing was started on it: give back what it buffered, and close it.
                    self.give_back_unstarted(&mut successor, deadline).await;
                    successor.dispatch.settle.close().await;
                    let _ = successor.consumer.close().await;
                }
                self.stop(channel, last_tag, deadline).await;
                ChannelEnd::Shutdown
            }
            ChannelEnd::Cancelled if generation.connection.is_connected() => {
                // The channel lives: its running handlers finish and ack there, then it is
                // closed, while a new consumer takes over.
                self.retire(channel, &ChannelEnd::Cancelled, generation);
                ChannelEnd::Cancelled
            }
            lost => {
                // The channel is gone (the successor, if any, with it): the broker requeues
                // everything unacked. Handlers still running are told (their context's
                // signal) and their results dropped.
                drop(moving);
                let running = channel.tasks.len();
                if running > 0 {
                    warn!(
                        queue = %self.name,
                        running,
                        "channel lost with handlers running; their results will be dropped \
                         (the broker redelivers those messages)"
                    );
                }
                channel.dispatch.settle.refuse();
                channel.signals.shutdown.cancel();
                channel.tasks.close();
                let _ = tokio::time::timeout(LOST_CLEANUP, channel.dispatch.settle.close()).await;
                lost
            }
        }
    }

    /// From here the delivery is settled by construction: its job, dropped in any way but
    /// settling it, gives the message back.
    fn start(&self, channel: &Channel, mut delivery: lapin::message::Delivery, slot: Slot) {
        QueueCounters::add(&self.counters.delivered, 1);
        let unsettled = Unsettled::new(delivery.delivery_tag, Arc::clone(&channel.dispatch));
        let ctx = Context::from_delivery(
            Arc::clone(&self.name),
            &mut delivery,
            Arc::clone(&channel.signals),
            slot,
        );
        let body = Bytes::from(std::mem::take(&mut delivery.data));
        self.hand_over(Job {
            unsettled,
            ctx,
            body,
            _tracked: (channel.tasks.token(), self.tasks.token()),
        });
    }

    /// Moves consumption off a stuck channel. Behind a delivery that runs on, the protocol
    /// lets later acks go only one frame each, and RabbitMQ walks the channel's list of
    /// unacknowledged messages, from the oldest, for each of them: the broker's cost per
    /// message grows with every long delivery the channel holds. On a fresh channel, acks
    /// coalesce again and those walks are short; the old one keeps its running deliveries
    /// until they end ([`retire`]).
    ///
    /// Opens a fresh channel and, at once, consumes there and cancels the `old` consumer,
    /// whose stream then yields what it had buffered, and ends. `None` when that fails
    /// (consumption goes on where it is, unless the old consumer was cancelled: then it
    /// ends and the queue consumes again as after a broker-side cancel).
    async fn rotate(self: Arc<Self>, old: Canceller, generation: Generation) -> Option<Channel> {
        match self.open(&generation, Opening::Rotation(old)).await {
            Ok(fresh) => {
                QueueCounters::add(&self.counters.rotations, 1);
                Some(fresh)
            }
            Err(error) => {
                debug!(queue = %self.name, %error, "cannot move to a fresh channel");
                None
            }
        }
    }

    /// Lets `channel`, which the queue no longer consumes from, finish in the background.
    fn retire(&self, channel: Channel, end: &ChannelEnd, generation: &Generation) {
        let closed = match end {
            ChannelEnd::Closed(error) => {
                warn!(queue = %self.name, %error, "the broker closed a channel being retired");
                true
            }
            _ => false,
        };
        let (queue, generation) = (Arc::clone(&self.name), generation.clone());
        self.retiring
            .spawn(async move { retire(queue, channel, closed, generation).await });
    }

    /// Cancels the consumer and gives back what was delivered but not started, up to
    /// `deadline`. Returns how many were given back, and the last tag among them.
    async fn give_back_unstarted(
        &self,
        channel: &mut Channel,
        deadline: Instant,
    ) -> (usize, Option<u64>) {
        let cancelled = channel
            .consumer
            .cancel(deadline.saturating_duration_since(Instant::now()))
            .await;
        if let Err(error) = &cancelled {
            warn!(queue = %self.name, %error, "basic.cancel failed");
        }
        // After cancel-ok the stream yields what was buffered, then ends.
        let (mut released, mut last_tag) = (0, None);
        while cancelled.is_ok() {
            match tokio::time::timeout_at(deadline, channel.consumer.consumer.next()).await {
                Ok(Some(Ok(delivery))) => {
                    last_tag = Some(delivery.delivery_tag);
                    QueueCounters::add(&self.counters.delivered, 1);
                    channel
                        .dispatch
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
        (released, last_tag)
    }

    /// Graceful stop: cancel the consumer, give back what was prefetched but not started,
    /// let in-flight handlers finish until the deadline, give back what did not finish.
    async fn stop(&self, mut channel: Channel, last_tag: u64, deadline: Instant) {
        let (released, given_back) = self.give_back_unstarted(&mut channel, deadline).await;
        let last_tag = given_back.unwrap_or(last_tag);
        channel.tasks.close();
        self.tasks.close();
        info!(
            queue = %self.name,
            released,
            in_flight = self.tasks.len(),
            "stopping: gave back unstarted messages, waiting for running handlers"
        );
        if tokio::time::timeout_at(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                queue = %self.name,
                still_running = self.tasks.len(),
                "shutdown deadline passed; giving back the messages of handlers still running"
            );
            channel.dispatch.settle.abandon(last_tag).await;
        }
        channel.dispatch.settle.close().await;
        match channel.consumer.close().await {
            Ok(()) => debug!(queue = %self.name, "channel closed"),
            Err(error) => warn!(queue = %self.name, %error, "channel close failed"),
        }
        // Retired channels send their last acks, then close (their handlers are done, or
        // they passed the same deadline).
        self.retiring.close();
        let _ = tokio::time::timeout_at(deadline + LOST_CLEANUP, self.retiring.wait()).await;
    }
}

impl Queue {
    /// Declares what [`open`](Self::open) declares at startup — the dead-letter topology,
    /// the queue and its bindings — with the same code, and consumes nothing.
    pub(crate) async fn check(
        &self,
        connection: &Connection,
    ) -> Result<crate::app::check::QueueCheck, Error> {
        connection
            .declare_dead_letter(&self.name, &self.config)
            .await?;
        let (messages, consumers) = connection.declare_queue(&self.name, &self.config).await?;
        Ok(crate::app::check::QueueCheck {
            name: self.name.to_string(),
            messages,
            consumers,
            dead_letter_exchange: self.config.dead_letter_route(&self.name).exchange,
            concurrency: self.concurrency,
            prefetch: self.prefetch,
        })
    }
}

impl Queue {
    /// At a shutdown that found no channel open (while reconnecting): waits, up to
    /// `deadline`, for handlers left running from a lost connection; their results were
    /// already dropped, but their work gets to finish.
    pub(crate) async fn wait_for_orphans(&self, deadline: Duration) {
        self.tasks.close();
        if tokio::time::timeout(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            warn!(
                queue = %self.name,
                still_running = self.tasks.len(),
                "handlers from a lost connection still running at the shutdown deadline"
            );
        }
    }
}

/// One delivery, on its way to a worker.
pub(crate) struct Job {
    /// Settles it (or, dropped, gives it back).
    unsettled: Unsettled,
    /// Its metadata, holding its concurrency slot.
    ctx: Context,
    /// Its body.
    body: Bytes,
    /// Counted as in flight on its channel and its queue until the job is dropped.
    _tracked: (TaskTrackerToken, TaskTrackerToken),
}

/// A worker of a queue: runs its deliveries one after the other until the queue is gone. A
/// panic that escapes a delivery (the handler's own are caught inside) drops that job — its
/// guard gives the message back — and the worker goes on.
pub(crate) async fn work<S: Service>(
    pipeline: Arc<S>,
    jobs: flume::Receiver<Job>,
    idle: Arc<AtomicUsize>,
) {
    while let Ok(job) = jobs.recv_async().await {
        let Job {
            unsettled,
            ctx,
            body,
            _tracked,
        } = job;
        let slot = AssertUnwindSafe(unsettled.process(&*pipeline, ctx, body))
            .catch_unwind()
            .await;
        // Idle before the slot is free: the consume loop takes that slot for the next
        // delivery and then claims an idle worker, which must be counted by then — or it
        // would count a busy one as idle later, and a delivery could wait behind a long one
        // while the concurrency allows it to run.
        idle.fetch_add(1, AcqRel);
        drop(slot);
    }
}

/// A queue's workers: the channel they take deliveries from, and how many wait unclaimed.
struct Workers {
    /// Hands deliveries over.
    jobs: flume::Sender<Job>,
    /// Given to each new worker.
    receiver: flume::Receiver<Job>,
    /// Workers done with their delivery and not yet claimed by a next one.
    idle: Arc<AtomicUsize>,
    /// Workers started so far (at most the concurrency).
    started: AtomicUsize,
}

/// Set once shutdown starts or the connection is lost, by a task watching both tokens: the
/// consume loop's per-delivery check is then one atomic load (a token's `is_cancelled`
/// takes a lock). The watcher ends with this value.
struct Stopping {
    flag: Arc<AtomicBool>,
    watcher: tokio::task::JoinHandle<()>,
}

impl Stopping {
    fn watch(shutdown: &CancellationToken, lost: &CancellationToken) -> Self {
        let flag = Arc::new(AtomicBool::new(false));
        let watcher = tokio::spawn({
            let (shutdown, lost, flag) = (shutdown.clone(), lost.clone(), Arc::clone(&flag));
            async move {
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = lost.cancelled() => {}
                }
                flag.store(true, Release);
            }
        });
        Stopping { flag, watcher }
    }

    fn is_set(&self) -> bool {
        self.flag.load(Acquire)
    }
}

impl Drop for Stopping {
    fn drop(&mut self) {
        self.watcher.abort();
    }
}

/// A queue's move to a fresh channel ([`Queue::rotate`]), until the fresh channel takes over.
enum Move {
    /// The fresh channel is being opened.
    Opening(JoinHandle<Option<Channel>>),
    /// The fresh channel consumes; the old one still yields what it had buffered.
    Ready(Box<Channel>),
}

impl Move {
    /// Takes the move's fresh channel, waiting for it if it is still being opened; `None`
    /// without a move, or when the move failed.
    async fn fresh(moving: &mut Option<Move>) -> Option<Channel> {
        match moving.take()? {
            Move::Opening(task) => task.await.ok().flatten(),
            Move::Ready(channel) => Some(*channel),
        }
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

/// A channel the queue no longer consumes from — its consumer cancelled by a rotation or by
/// the broker, or closed by the broker while a rotation moved away from it. Its running
/// handlers finish and ack on it; then it is closed, which gives back whatever is left
/// unacked. At shutdown they have until the shutdown deadline. If the connection is lost, or
/// the broker closed the channel, their results cannot be sent: they are told (their
/// context's signal) and the results dropped.
async fn retire(queue: Arc<str>, channel: Channel, closed: bool, generation: Generation) {
    // Its stream has ended (or is of no further use): only the channel is kept, for the
    // running handlers' acks. Retired channels can live as long as their longest delivery,
    // and the stream's buffer grew to a whole prefetch window when the channel was fresh.
    let Channel {
        consumer,
        dispatch,
        signals,
        tasks,
        opened: _,
    } = channel;
    let handle = consumer.handle();
    drop(consumer);
    tasks.close();
    let finished = !closed
        && tokio::select! {
            () = tasks.wait() => true,
            () = generation.lost.cancelled() => false,
            () = async {
                generation.shutdown.cancelled().await;
                tokio::time::sleep(generation.timing.shutdown_timeout).await;
            } => false,
        };
    if !finished {
        let running = tasks.len();
        if running > 0 {
            warn!(
                %queue,
                running,
                "retired channel closing with handlers running; their results will be \
                 dropped (the broker redelivers those messages)"
            );
        }
        signals.shutdown.cancel();
    }
    let _ = tokio::time::timeout(LOST_CLEANUP, dispatch.settle.close()).await;
    if !closed
        && generation.connection.is_connected()
        && let Err(error) = handle.close().await
    {
        debug!(%queue, %error, "closing a retired channel failed");
    }
}
