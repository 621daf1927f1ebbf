//! The settle task: receives how each delivery ended and tells the broker, coalescing acks.
//! It runs on the connection runtime and owns its channel's [`AckTracker`], so every
//! ack and requeue of that channel goes out from one place, in order, and only ever
//! on the channel that delivered the message.

use std::{
    mem,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use lapin::options::{BasicAckOptions, BasicNackOptions};
use tokio::{
    sync::{Notify, mpsc, oneshot},
    time::Instant,
};
use tracing::{debug, error, warn};

use crate::{
    stats::QueueCounters,
    tracker::{AckTracker, Action, Refused, Settlement},
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

    /// Sends everything pending, then stops the settle task.
    pub(crate) async fn close(&self) {
        let (done, wait) = oneshot::channel();
        if self.control.send(Control::Close(done)).is_ok() {
            let _ = wait.await;
        }
    }
}

/// The settle task's state.
pub(crate) struct SettleTask {
    shared: Arc<Shared>,
    control: mpsc::UnboundedReceiver<Control>,
    /// The channel that delivered the messages; the only one acks may go to.
    channel: lapin::Channel,
    tracker: AckTracker,
    /// How long a finished ack may wait for others to share its frame.
    linger: Duration,
    /// Acks held behind a running delivery go out one by one (the protocol allows no
    /// better) once this many wait — they hold prefetch slots —
    hold_limit: usize,
    /// — or once they have waited this long.
    max_hold: Duration,
    /// Since when acks have been held behind a running delivery.
    held_since: Option<Instant>,
    /// For logs.
    queue: Arc<str>,
    counters: Arc<QueueCounters>,
    /// Set once a frame could not be sent: the channel is gone.
    dead: bool,
}

/// Creates a settle task for `channel` and its handle. `prefetch` sizes the batches: acks
/// are sent once a quarter of the prefetch window is waiting, so the broker never runs out
/// of window while acks linger.
pub(crate) fn settle_task(
    channel: lapin::Channel,
    prefetch: u16,
    linger: Duration,
    queue: Arc<str>,
    counters: Arc<QueueCounters>,
) -> (SettleHandle, SettleTask) {
    let shared = Arc::new(Shared {
        inbox: Mutex::default(),
        notify: Notify::new(),
        batch: usize::from(prefetch / 4).max(1),
        closed: AtomicBool::new(false),
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
            held_since: None,
            queue,
            counters,
            dead: false,
        },
    )
}

impl SettleTask {
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
            if forced && self.tracker.pending_acks() > 0 {
                // What is left waits behind a running delivery: usually one about to finish,
                // after which a single `multiple` ack covers it all. Single acks only when
                // the held ones crowd the prefetch window or have waited long enough.
                let now = Instant::now();
                let since = *self.held_since.get_or_insert(now - self.linger);
                if self.tracker.pending_acks() >= self.hold_limit
                    || now.duration_since(since) >= self.max_hold
                {
                    let actions = self.tracker.flush(true);
                    self.send(actions).await;
                }
            }
            if self.tracker.pending_acks() == 0 {
                self.held_since = None;
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
        for (tag, how) in items {
            match self.tracker.settle(tag, how) {
                Ok(None) => {}
                Ok(Some(action)) => self.send(vec![action]).await,
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
    }

    /// Sends actions in order; after a failure the channel is gone, and nothing more is sent.
    async fn send(&mut self, actions: Vec<Action>) {
        for action in actions {
            if self.dead {
                QueueCounters::add(&self.counters.ack_failures, count(&action));
                continue;
            }
            let result = match action {
                Action::Ack { tag, multiple, .. } => {
                    self.channel
                        .basic_ack(tag, BasicAckOptions { multiple })
                        .await
                }
                Action::Requeue { tag, multiple, .. } => {
                    self.channel
                        .basic_nack(
                            tag,
                            BasicNackOptions {
                                multiple,
                                requeue: true,
                            },
                        )
                        .await
                }
            };
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
                    warn!(
                        queue = %self.queue,
                        ?action,
                        %error,
                        "cannot settle on a closed channel; the broker will redeliver"
                    );
                    self.dead = true;
                    self.tracker.close();
                }
            }
        }
    }
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
