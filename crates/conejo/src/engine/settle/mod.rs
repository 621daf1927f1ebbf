//! The settle task: receives how each delivery ended and tells the broker, coalescing acks.
//! It runs on the connection runtime and owns its channel's [`AckTracker`], so every
//! ack and requeue of that channel goes out from one place, in order, and only ever
//! on the channel that delivered the message.

pub(crate) mod tracker;

use std::{
    future::Future,
    mem,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    task::Poll,
    time::Duration,
};

use tokio::{
    sync::{Notify, mpsc, oneshot},
    time::Instant,
};
use tracing::{debug, error, warn};

use self::tracker::{AckTracker, Action, Refused, Settlement};
use crate::{
    broker::{BrokerError, Channel},
    observe::stats::QueueCounters,
};

/// Settlements waiting for the settle task.
#[derive(Debug, Default)]
struct Inbox {
    /// (delivery tag, settlement), in the order handlers finished.
    items: Vec<(u64, Settlement)>,
    /// A requeue is waiting: it must go out now.
    urgent: bool,
}

#[derive(Debug)]
struct Shared {
    inbox: Mutex<Inbox>,
    /// Wakes the settle task: on the first waiting item (to start the linger clock), when a
    /// batch is full, and for urgent items. Not for every item: cross-thread wake-ups cost
    /// more than the acks themselves.
    notify: Notify,
    /// How many waiting acks make a batch worth sending.
    batch: usize,
    /// Set once the settle task takes no more settlements (shutdown gave the messages back,
    /// or it stopped): later results are counted and dropped here.
    closed: AtomicBool,
    /// Set once a running delivery holding acks has outlived [`ROTATE_AFTER`] later
    /// deliveries (they finished while it runs on): behind it every ack costs a frame (and
    /// the broker a walk of the channel's unacknowledged list), so the consumer moves to a
    /// fresh channel.
    stuck: AtomicBool,
    counters: Arc<QueueCounters>,
}

/// Where handler tasks report how their delivery ended. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct SettleHandle {
    shared: Arc<Shared>,
    control: mpsc::UnboundedSender<Control>,
}

enum Control {
    /// Requeue every unsettled delivery up to this tag, then refuse settlements.
    Abandon(u64, oneshot::Sender<()>),
    /// Send everything pending and stop.
    Close(oneshot::Sender<()>),
}

impl SettleHandle {
    /// Records how a delivery ended. Never blocks, never fails: if the channel is gone the
    /// settle task counts it and the broker redelivers the message.
    pub(crate) fn settle(&self, tag: u64, how: Settlement) {
        if self.shared.closed.load(Ordering::Acquire) {
            QueueCounters::add(&self.shared.counters.late_settlements, 1);
            debug!(
                tag,
                "handler finished after its message was given back; result dropped"
            );
            return;
        }
        let wake = {
            let mut inbox = self.shared.inbox.lock().unwrap_or_else(|e| e.into_inner());
            inbox.items.push((tag, how));
            if how != Settlement::Ack {
                inbox.urgent = true;
            }
            inbox.urgent || inbox.items.len() == 1 || inbox.items.len() >= self.shared.batch
        };
        if wake {
            self.shared.notify.notify_one();
        }
    }

    /// Gives back every delivery up to `last_delivered` not yet settled (shutdown deadline).
    pub(crate) async fn abandon(&self, last_delivered: u64) {
        let (done, wait) = oneshot::channel();
        if self
            .control
            .send(Control::Abandon(last_delivered, done))
            .is_ok()
        {
            let _ = wait.await;
        }
    }

    /// True once results are no longer taken: the channel is lost, or its unsettled
    /// deliveries were given back. A failure finishing now must not publish a retry copy
    /// or a dead letter: the broker redelivers the original, so the copy would be a twin.
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Refuses results from now on, at once (the channel is known lost): handlers told of
    /// the loss cannot slip a retry copy in before the settle task hears of it.
    pub(crate) fn refuse(&self) {
        self.shared.closed.store(true, Ordering::Release);
    }

    /// True once a delivery of this channel runs so long that acks behind it go one frame
    /// each: new deliveries are better taken on a fresh channel, where they coalesce.
    pub(crate) fn is_stuck(&self) -> bool {
        self.shared.stuck.load(Ordering::Relaxed)
    }

    /// Sends everything pending, then stops the settle task.
    pub(crate) async fn close(&self) {
        let (done, wait) = oneshot::channel();
        if self.control.send(Control::Close(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

/// Where a settle task sends its frames: the channel that delivered the messages (or, in
/// unit tests, a recorder).
pub(crate) trait AckSink: Send + Sync + 'static {
    /// Sends one `basic.ack` or `basic.nack` frame. The frame must be queued, in order, when
    /// the future is first polled; the future resolves once it was written. (lapin's
    /// `basic_ack` and `basic_nack` queue their frame before their first `.await`.) The
    /// settle task relies on this to queue many frames before waiting for any.
    fn send(&self, action: Action) -> impl Future<Output = Result<(), BrokerError>> + Send;
}

/// A queue's channel, as its settle task sends on it.
pub(crate) struct ChannelSink {
    /// The channel that delivered the messages.
    pub(crate) channel: Channel,
    /// A stream queue's: RabbitMQ has no requeue on a stream (a `basic.nack` closes the
    /// connection), so a message given back is acked instead — which only returns its
    /// credit: its stream's cursor keeps it below the committed offset, to be read again
    /// by the next subscription.
    pub(crate) stream: bool,
}

impl AckSink for ChannelSink {
    async fn send(&self, action: Action) -> Result<(), BrokerError> {
        match action {
            Action::Ack { tag, multiple, .. } => self.channel.ack(tag, multiple).await,
            Action::Requeue { tag, multiple, .. } if self.stream => {
                self.channel.ack(tag, multiple).await
            }
            Action::Requeue { tag, multiple, .. } => self.channel.nack(tag, multiple, true).await,
        }
    }
}

/// The settle task's state.
pub(crate) struct SettleTask<S = ChannelSink> {
    shared: Arc<Shared>,
    control: mpsc::UnboundedReceiver<Control>,
    /// The channel that delivered the messages; the only one acks may go to.
    channel: S,
    tracker: AckTracker,
    /// How long a finished ack may wait for others to share its frame.
    linger: Duration,
    /// Acks held behind a running delivery go out one by one (the protocol allows no
    /// better) once this many wait — they hold prefetch slots —
    hold_limit: usize,
    /// — or once they have waited this long.
    max_hold: Duration,
    /// The running delivery acks are held behind, and since when: the hold is that
    /// delivery's, not each batch's, so once it has outlasted `max_hold` the acks behind it
    /// go at every linger tick instead of waiting `max_hold` again.
    held: Option<(u64, Instant)>,
    /// A running delivery that has seen this many later deliveries (a whole prefetch
    /// window's turnover) is not about to finish: acks behind it go at once.
    stuck_after: u64,
    /// For logs.
    queue: Arc<str>,
    counters: Arc<QueueCounters>,
    /// Set once a frame could not be sent: the channel is gone.
    dead: bool,
}

/// A running delivery that has outlived this many later deliveries marks its channel stuck.
/// Relative to the traffic, not to a clock or to the prefetch: handlers that are all slow, or
/// many at once, do not outlive hundreds of their successors; a real outlier does.
const ROTATE_AFTER: u64 = 256;

/// Creates a settle task for `channel` and its handle. `prefetch` sizes the batches: acks
/// are sent once a quarter of the prefetch window is waiting, so the broker never runs out
/// of window while acks linger.
pub(crate) fn settle_task<S: AckSink>(
    channel: S,
    prefetch: u16,
    linger: Duration,
    queue: Arc<str>,
    counters: Arc<QueueCounters>,
) -> (SettleHandle, SettleTask<S>) {
    let shared = Arc::new(Shared {
        inbox: Mutex::default(),
        notify: Notify::new(),
        batch: usize::from(prefetch / 4).max(1),
        closed: AtomicBool::new(false),
        stuck: AtomicBool::new(false),
        counters: Arc::clone(&counters),
    });
    let (control_tx, control_rx) = mpsc::unbounded_channel();
    (
        SettleHandle {
            shared: Arc::clone(&shared),
            control: control_tx,
        },
        SettleTask {
            shared,
            control: control_rx,
            channel,
            tracker: AckTracker::new(),
            linger,
            hold_limit: usize::from(prefetch / 2).max(1),
            max_hold: (linger * 10).max(Duration::from_millis(50)),
            held: None,
            stuck_after: u64::from(prefetch.max(1)),
            queue,
            counters,
            dead: false,
        },
    )
}

impl<S: AckSink> SettleTask<S> {
    /// Runs until closed (or until every handle is gone).
    pub(crate) async fn run(mut self) {
        let mut deadline: Option<Instant> = None;
        loop {
            let mut forced = false;
            tokio::select! {
                biased;
                control = self.control.recv() => {
                    // From here on, results arriving late are counted and dropped by the
                    // handle; what is already in the inbox is settled first.
                    self.shared.closed.store(true, Ordering::Release);
                    self.take_inbox().await;
                    let (actions, done, stop) = match control {
                        // After an abandon the task still answers the final close.
                        Some(Control::Abandon(last_delivered, done)) => {
                            (self.tracker.abandon(last_delivered), Some(done), false)
                        }
                        Some(Control::Close(done)) => (self.tracker.flush(true), Some(done), true),
                        None => (self.tracker.flush(true), None, true),
                    };
                    self.send(actions).await;
                    self.tracker.close();
                    if let Some(done) = done {
                        let _ = done.send(());
                    }
                    if stop {
                        return;
                    }
                    deadline = None;
                    continue;
                }
                () = self.shared.notify.notified() => {}
                () = sleep_until(deadline), if deadline.is_some() => forced = true,
            }
            if !forced && !self.inbox_ready() {
                // Woken by the first waiting ack: start the linger clock, wait for more.
                deadline.get_or_insert_with(|| Instant::now() + self.linger);
                continue;
            }
            self.take_inbox().await;
            if forced || self.tracker.pending_acks() >= self.shared.batch {
                let actions = self.tracker.flush(false);
                self.send(actions).await;
            }
            if self.tracker.pending_acks() > 0 && self.release_held(forced) {
                let actions = self.tracker.flush(true);
                self.send(actions).await;
            }
            deadline = if self.tracker.pending_acks() > 0 {
                Some(match deadline {
                    Some(at) if !forced => at,
                    _ => Instant::now() + self.linger,
                })
            } else {
                None
            };
        }
    }

    /// Whether the acks held behind a running delivery (what a `multiple` ack cannot cover)
    /// go now, one frame each. Usually that delivery is about to finish, after which a
    /// single `multiple` ack covers them all: so they wait, unless they crowd the prefetch
    /// window, or the delivery holding them has already held acks for `max_hold`, or it has
    /// seen a whole window of later deliveries — the next of several long deliveries, found
    /// at once, though it never held acks before. One that has outlived [`ROTATE_AFTER`]
    /// later deliveries marks the channel stuck.
    fn release_held(&mut self, forced: bool) -> bool {
        let Some((blocker, later)) = self.tracker.blocker() else {
            return false;
        };
        let now = Instant::now();
        let since = match self.held {
            Some((tag, since)) if tag == blocker => since,
            _ => {
                // Found at a linger tick, the acks have lingered once already.
                let since = if forced { now - self.linger } else { now };
                self.held = Some((blocker, since));
                since
            }
        };
        if self.tracker.outlived() >= ROTATE_AFTER {
            self.shared.stuck.store(true, Ordering::Relaxed);
        }
        if later >= self.stuck_after || now.duration_since(since) >= self.max_hold {
            return true;
        }
        self.tracker.pending_acks() >= self.hold_limit
    }

    /// True when the waiting items must be processed now.
    fn inbox_ready(&self) -> bool {
        let inbox = self.shared.inbox.lock().unwrap_or_else(|e| e.into_inner());
        inbox.urgent || inbox.items.len() >= self.shared.batch
    }

    /// Feeds every waiting item to the tracker; sends requeues at once.
    async fn take_inbox(&mut self) {
        let items = {
            let mut inbox = self.shared.inbox.lock().unwrap_or_else(|e| e.into_inner());
            inbox.urgent = false;
            mem::take(&mut inbox.items)
        };
        let mut requeues = Vec::new();
        for (tag, how) in items {
            match self.tracker.settle(tag, how) {
                Ok(None) => {}
                Ok(Some(action)) => requeues.push(action),
                Err(Refused::Duplicate) => {
                    error!(queue = %self.queue, tag, "delivery settled twice; ignored");
                }
                Err(Refused::Closed) => {
                    QueueCounters::add(&self.counters.late_settlements, 1);
                    debug!(
                        queue = %self.queue,
                        tag,
                        "handler finished after its message was given back; result dropped"
                    );
                }
            }
        }
        self.send(requeues).await;
    }

    /// Sends actions in order; after a failure the channel is gone, and nothing more is sent.
    ///
    /// Every frame is queued before any is waited for: one wait for the connection's I/O
    /// loop to write them all, rather than a round trip through it per frame (behind a long
    /// delivery, acks go one frame per message, and those round trips were what limited
    /// the settle task).
    async fn send(&mut self, actions: Vec<Action>) {
        if actions.is_empty() {
            return;
        }
        if self.dead {
            for action in &actions {
                QueueCounters::add(&self.counters.ack_failures, count(action));
            }
            return;
        }
        let results = send_in_order(&self.channel, &actions).await;
        for (action, result) in actions.into_iter().zip(results) {
            match result {
                Ok(()) => {
                    let counter = match action {
                        Action::Ack { .. } => {
                            QueueCounters::add(&self.counters.ack_frames, 1);
                            &self.counters.acked
                        }
                        Action::Requeue { .. } => &self.counters.requeued,
                    };
                    QueueCounters::add(counter, count(&action));
                }
                Err(error) => {
                    QueueCounters::add(&self.counters.ack_failures, count(&action));
                    if !self.dead {
                        warn!(
                            queue = %self.queue,
                            ?action,
                            %error,
                            "cannot settle on a closed channel; the broker will redeliver"
                        );
                    }
                    self.dead = true;
                    self.tracker.close();
                }
            }
        }
    }
}

/// Sends every action through `sink`, queuing all the frames (each future polled once, in
/// order) before waiting for them to be written; the result of each, in order.
async fn send_in_order<S: AckSink>(sink: &S, actions: &[Action]) -> Vec<Result<(), BrokerError>> {
    if let [action] = actions {
        return vec![sink.send(*action).await];
    }
    let mut frames: Vec<Pin<Box<_>>> = actions.iter().map(|&a| Box::pin(sink.send(a))).collect();
    let mut results: Vec<Option<Result<(), BrokerError>>> = actions.iter().map(|_| None).collect();
    // Frames below `first` are all written: a wake-up polls only what may still be waiting.
    let mut first = 0;
    std::future::poll_fn(|cx| {
        for (frame, result) in frames[first..].iter_mut().zip(&mut results[first..]) {
            if result.is_none()
                && let Poll::Ready(sent) = frame.as_mut().poll(cx)
            {
                *result = Some(sent);
            }
        }
        while results.get(first).is_some_and(Option::is_some) {
            first += 1;
        }
        if first == results.len() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    results.into_iter().flatten().collect()
}

fn count(action: &Action) -> u64 {
    match *action {
        Action::Ack { count, .. } | Action::Requeue { count, .. } => count,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
