//! Consuming one channel, on the handler runtime: take a concurrency slot, take a delivery,
//! hand it to a worker; move to a fresh channel when a long delivery holds this one's acks;
//! stop gracefully at shutdown, fast when the channel or connection is lost.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Acquire, Ordering::Release},
    },
    time::Duration,
};

use futures::{FutureExt, StreamExt};
use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    balance::HandBack,
    channel::{Canceller, Channel, Generation, Opening},
    dispatch::Unsettled,
    queue::Queue,
    settle::tracker::Settlement,
    worker::Job,
};
use crate::{
    Context,
    broker::{BrokerError, Incoming},
    handler::slot::Slot,
    headers,
    observe::stats::QueueCounters,
};

/// How one channel's consumption ended.
pub(crate) enum ChannelEnd {
    Shutdown,
    ConnectionLost,
    /// The broker closed the channel (a precondition failure, a consumer timeout…).
    Closed(BrokerError),
    /// The broker cancelled the consumer (the queue was deleted, or its node went down).
    Cancelled,
    /// A borrowed partition was handed back to its own replica: consume again, behind it.
    HandedBack,
}

/// The queue moves to a fresh channel at most this often: each move costs a few round trips,
/// and each retired channel lives until its long deliveries end.
const ROTATION_INTERVAL: Duration = Duration::from_millis(100);

/// At most this many retired channels of a queue may hold running deliveries; beyond it the
/// queue stays on its channel, and acks behind a long delivery go one frame each.
const MAX_RETIRING: usize = 64;

/// How long the settle task of a lost channel may take to give up.
const LOST_CLEANUP: Duration = Duration::from_secs(2);

/// Consumes one channel until shutdown, its loss, or the loss of the connection — moving
/// to a fresh channel whenever a long-running delivery holds this one's acks
/// ([`rotate`]).
pub(crate) async fn consume(
    queue: &Arc<Queue>,
    mut channel: Channel,
    generation: &Generation,
) -> ChannelEnd {
    let shutdown = &generation.shutdown;
    let lost = &generation.lost;
    let hand_back = HandBack::watch(queue, generation);
    let hand_back_due = hand_back.as_ref().map(|h| h.due.clone());
    let hand_back_due = &hand_back_due;
    let stopping = Stopping::watch(shutdown, lost, hand_back_due.as_ref());
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
            if lost.is_cancelled() {
                break ChannelEnd::ConnectionLost;
            }
            break ChannelEnd::HandedBack;
        }
        if moving.is_none()
            && !queue.settings.keeps_consumer
            && channel.settle().is_stuck()
            && queue.retiring.len() < MAX_RETIRING
            && Instant::now() >= rotate_after
        {
            // In the background: under load its round trips take tens of milliseconds,
            // and a consume loop waiting for them would find a burst of deliveries after.
            moving = Some(Move::Opening(tokio::spawn(rotate(
                Arc::clone(queue),
                channel.canceller(),
                generation.clone(),
            ))));
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
        let slot = match queue.slots.try_acquire() {
            Some(slot) => slot,
            None => tokio::select! {
                biased;
                () = shutdown.cancelled() => break ChannelEnd::Shutdown,
                () = lost.cancelled() => break ChannelEnd::ConnectionLost,
                () = fired(hand_back_due) => break ChannelEnd::HandedBack,
                slot = queue.slots.acquire() => slot,
            },
        };
        // On an ordered queue, deliveries whose key became free go first.
        if let Some(sequencer) = &queue.sequencer
            && let Some(job) = sequencer.take_ready()
        {
            job.ctx.put_slot(slot);
            queue.workers.hand_over(job);
            continue;
        }
        let next = match channel.deliveries.next().now_or_never() {
            Some(next) => next,
            None => tokio::select! {
                biased;
                () = shutdown.cancelled() => break ChannelEnd::Shutdown,
                () = lost.cancelled() => break ChannelEnd::ConnectionLost,
                () = fired(hand_back_due) => break ChannelEnd::HandedBack,
                () = readied(queue) => continue,
                next = channel.deliveries.next() => next,
            },
        };
        let end = match next {
            Some(Ok(delivery)) => {
                last_tag = delivery.delivery_tag;
                start(queue, &channel, delivery, slot);
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
        retire(queue, old, &end, generation);
    };
    drop(stopping);
    drop(hand_back);
    let ended = match ended {
        ChannelEnd::HandedBack => match hand_over(queue, &channel, generation).await {
            None => {
                finish_handing_over(queue, channel).await;
                return ChannelEnd::HandedBack;
            }
            Some(interrupted) => interrupted,
        },
        ended => ended,
    };
    match ended {
        ChannelEnd::Shutdown => {
            let deadline = Instant::now() + generation.timing.shutdown_timeout;
            // Deliveries waiting for their key were never started: given back.
            if let Some(sequencer) = &queue.sequencer {
                for job in sequencer.drain() {
                    job.unsettled.give_back();
                }
            }
            if let Some(mut successor) = Move::fresh(&mut moving).await {
                // Nothing was started on it: give back what it buffered, and close it.
                give_back_unstarted(queue, &mut successor, deadline).await;
                successor.settle().close().await;
                let _ = successor.handle.clone().close().await;
            }
            stop(queue, channel, last_tag, deadline).await;
            ChannelEnd::Shutdown
        }
        ChannelEnd::Cancelled if generation.connection.is_connected() => {
            // The channel lives: its running handlers finish and ack there, then it is
            // closed, while a new consumer takes over.
            retire(queue, channel, &ChannelEnd::Cancelled, generation);
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
                    queue = %queue.name(),
                    running,
                    "channel lost with handlers running; their results will be dropped \
                     (the broker redelivers those messages)"
                );
            }
            channel.settle().refuse();
            if let Some(sequencer) = &queue.sequencer {
                sequencer.discard_lost();
            }
            channel.signals.shutdown.cancel();
            channel.tasks.close();
            let _ = tokio::time::timeout(LOST_CLEANUP, channel.settle().close()).await;
            lost
        }
    }
}

/// From here the delivery is settled by construction: its job, dropped in any way but
/// settling it, gives the message back.
fn start(queue: &Queue, channel: &Channel, mut delivery: Incoming, slot: Slot) {
    QueueCounters::add(&queue.counters.delivered, 1);
    if let Some((cursor, epoch)) = &channel.dispatch.cursor
        && !cursor.admit(
            *epoch,
            delivery.delivery_tag,
            headers::stream_offset(delivery.properties.headers().as_ref()),
        )
    {
        // Before the offset asked for: not this subscription's; acked for its credit.
        channel
            .settle()
            .settle(delivery.delivery_tag, Settlement::Ack);
        return;
    }
    let unsettled = Unsettled::new(delivery.delivery_tag, Arc::clone(&channel.dispatch));
    let (ctx, body) = Context::from_delivery(
        Arc::clone(queue.name()),
        &mut delivery,
        Arc::clone(&channel.signals),
        slot,
    );
    let Some(sequencer) = &queue.sequencer else {
        queue.workers.hand_over(Job {
            unsettled,
            ctx,
            body,
            tracked: (channel.tasks.token(), queue.tasks.token()),
            key: None,
        });
        return;
    };
    let key = sequencer.key_of(&ctx, &body);
    let job = Job {
        unsettled,
        ctx,
        body,
        tracked: (channel.tasks.token(), queue.tasks.token()),
        key,
    };
    if let Some(job) = sequencer.admit(job) {
        queue.workers.hand_over(job);
    }
}

/// Resolves when `token` fires; never without one.
async fn fired(token: &Option<CancellationToken>) {
    match token {
        Some(token) => token.cancelled().await,
        None => std::future::pending().await,
    }
}

/// Hands a borrowed partition's active role over, as a single-active consumer does at
/// shutdown: deliveries waiting for their key are given back, the running ones end and are
/// acked; `None` then ([`finish_handing_over`] closes the channel). Shutdown or the loss of
/// the connection meanwhile interrupts it, and is returned.
async fn hand_over(
    queue: &Queue,
    channel: &Channel,
    generation: &Generation,
) -> Option<ChannelEnd> {
    info!(
        queue = %queue.name(),
        in_flight = channel.tasks.len(),
        "handing the partition over: waiting for running handlers"
    );
    if let Some(sequencer) = &queue.sequencer {
        for job in sequencer.drain() {
            job.unsettled.give_back();
        }
    }
    channel.tasks.close();
    tokio::select! {
        () = channel.tasks.wait() => None,
        () = generation.shutdown.cancelled() => Some(ChannelEnd::Shutdown),
        () = generation.lost.cancelled() => Some(ChannelEnd::ConnectionLost),
    }
}

/// Sends the acks of what ran, then closes the channel: the broker gives back, in place,
/// what was delivered and not started, and hands the role to the next consumer.
async fn finish_handing_over(queue: &Queue, channel: Channel) {
    channel.settle().close().await;
    QueueCounters::add(&queue.counters.hand_overs, 1);
    match channel.handle.clone().close().await {
        Ok(()) => info!(queue = %queue.name(), "partition handed over"),
        Err(error) => warn!(queue = %queue.name(), %error, "channel close failed"),
    }
}

/// Resolves when a delivery of an ordered queue became ready; never for other queues.
async fn readied(queue: &Queue) {
    match &queue.sequencer {
        Some(sequencer) => sequencer.readied().await,
        None => std::future::pending().await,
    }
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
async fn rotate(queue: Arc<Queue>, old: Canceller, generation: Generation) -> Option<Channel> {
    match Channel::open(&queue, &generation, Opening::Rotation(old)).await {
        Ok(fresh) => {
            QueueCounters::add(&queue.counters.rotations, 1);
            Some(fresh)
        }
        Err(error) => {
            debug!(queue = %queue.name(), %error, "cannot move to a fresh channel");
            None
        }
    }
}

/// Lets `channel`, which the queue no longer consumes from, finish in the background.
fn retire(queue: &Queue, channel: Channel, end: &ChannelEnd, generation: &Generation) {
    let closed = match end {
        ChannelEnd::Closed(error) => {
            warn!(queue = %queue.name(), %error, "the broker closed a channel being retired");
            true
        }
        _ => false,
    };
    let (name, generation) = (Arc::clone(queue.name()), generation.clone());
    queue
        .retiring
        .spawn(async move { finish_retired(name, channel, closed, generation).await });
}

/// Cancels the consumer and gives back what was delivered but not started, up to
/// `deadline`. Returns how many were given back, and the last tag among them.
async fn give_back_unstarted(
    queue: &Queue,
    channel: &mut Channel,
    deadline: Instant,
) -> (usize, Option<u64>) {
    let cancelled = channel
        .cancel(deadline.saturating_duration_since(Instant::now()))
        .await;
    if let Err(error) = &cancelled {
        warn!(queue = %queue.name(), %error, "basic.cancel failed");
    }
    // After cancel-ok the stream yields what was buffered, then ends.
    let (mut released, mut last_tag) = (0, None);
    while cancelled.is_ok() {
        match tokio::time::timeout_at(deadline, channel.deliveries.next()).await {
            Ok(Some(Ok(delivery))) => {
                last_tag = Some(delivery.delivery_tag);
                QueueCounters::add(&queue.counters.delivered, 1);
                channel
                    .settle()
                    .settle(delivery.delivery_tag, Settlement::Requeue);
                released += 1;
            }
            Ok(Some(Err(error))) => {
                warn!(queue = %queue.name(), %error, "consumer failed while stopping");
                break;
            }
            Ok(None) | Err(_) => break,
        }
    }
    (released, last_tag)
}

/// Graceful stop: cancel the consumer, give back what was prefetched but not started,
/// let in-flight handlers finish until the deadline, give back what did not finish.
async fn stop(queue: &Queue, mut channel: Channel, last_tag: u64, deadline: Instant) {
    if queue.settings.keeps_consumer {
        return stop_in_place(queue, channel, last_tag, deadline).await;
    }
    let (released, given_back) = give_back_unstarted(queue, &mut channel, deadline).await;
    let last_tag = given_back.unwrap_or(last_tag);
    channel.tasks.close();
    queue.tasks.close();
    info!(
        queue = %queue.name(),
        released,
        in_flight = queue.tasks.len(),
        "stopping: gave back unstarted messages, waiting for running handlers"
    );
    if tokio::time::timeout_at(deadline, queue.tasks.wait())
        .await
        .is_err()
    {
        warn!(
            queue = %queue.name(),
            still_running = queue.tasks.len(),
            "shutdown deadline passed; giving back the messages of handlers still running"
        );
        channel.settle().abandon(last_tag).await;
    }
    channel.settle().close().await;
    match channel.handle.clone().close().await {
        Ok(()) => debug!(queue = %queue.name(), "channel closed"),
        Err(error) => warn!(queue = %queue.name(), %error, "channel close failed"),
    }
    // Retired channels send their last acks, then close (their handlers are done, or
    // they passed the same deadline).
    queue.retiring.close();
    let _ = tokio::time::timeout_at(deadline + LOST_CLEANUP, queue.retiring.wait()).await;
}

/// Graceful stop of a consumer that stays where it is until its running handlers end, then
/// closes its channel. A single-active consumer keeps the active role meanwhile (cancelled
/// first, it would hand the role to the next consumer, which would start on later messages
/// while these still run); closing the channel gives back, in place, what was prefetched and
/// not started, as the broker hands the role over: the next consumer starts where this one
/// stopped, in order. A stream's consumer has nothing to give back: what it did not finish
/// stays above its committed offset.
async fn stop_in_place(queue: &Queue, channel: Channel, last_tag: u64, deadline: Instant) {
    channel.tasks.close();
    queue.tasks.close();
    info!(
        queue = %queue.name(),
        in_flight = queue.tasks.len(),
        "stopping: waiting for running handlers before closing the channel"
    );
    if tokio::time::timeout_at(deadline, queue.tasks.wait())
        .await
        .is_err()
    {
        warn!(
            queue = %queue.name(),
            still_running = queue.tasks.len(),
            "shutdown deadline passed; giving back the messages of handlers still running"
        );
        channel.settle().abandon(last_tag).await;
    }
    channel.settle().close().await;
    match channel.handle.clone().close().await {
        Ok(()) => debug!(queue = %queue.name(), "channel closed"),
        Err(error) => warn!(queue = %queue.name(), %error, "channel close failed"),
    }
}

/// Set once shutdown starts, the connection is lost, or a borrowed partition is to be
/// handed back, by a task watching the tokens: the consume loop's per-delivery check is
/// then one atomic load (a token's `is_cancelled` takes a lock). The watcher ends with this
/// value.
struct Stopping {
    flag: Arc<AtomicBool>,
    watcher: JoinHandle<()>,
}

impl Stopping {
    fn watch(
        shutdown: &CancellationToken,
        lost: &CancellationToken,
        hand_back: Option<&CancellationToken>,
    ) -> Self {
        let flag = Arc::new(AtomicBool::new(false));
        let watcher = tokio::spawn({
            let (shutdown, lost, flag) = (shutdown.clone(), lost.clone(), Arc::clone(&flag));
            let hand_back = hand_back.cloned();
            async move {
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = lost.cancelled() => {}
                    () = fired(&hand_back) => {}
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

/// A queue's move to a fresh channel ([`rotate`]), until the fresh channel takes over.
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

/// A channel the queue no longer consumes from — its consumer cancelled by a rotation or by
/// the broker, or closed by the broker while a rotation moved away from it. Its running
/// handlers finish and ack on it; then it is closed, which gives back whatever is left
/// unacked. At shutdown they have until the shutdown deadline. If the connection is lost, or
/// the broker closed the channel, their results cannot be sent: they are told (their
/// context's signal) and the results dropped.
async fn finish_retired(queue: Arc<str>, channel: Channel, closed: bool, generation: Generation) {
    // Its stream has ended (or is of no further use): only the channel is kept, for the
    // running handlers' acks. Retired channels can live as long as their longest delivery,
    // and the stream's buffer grew to a whole prefetch window when the channel was fresh.
    let Channel {
        handle,
        deliveries,
        dispatch,
        signals,
        tasks,
        opened: _,
    } = channel;
    drop(deliveries);
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
