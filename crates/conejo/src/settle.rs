//! The settle task: receives how each delivery ended and tells the broker, coalescing acks.
//! It runs on the connection runtime and owns its channel's [`AckTracker`], so every
//! ack and requeue of that channel goes out from one place, in order, and only ever
//! on the channel that delivered the message.

use std::{
    future::Future,
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

/// Where a settle task sends its frames: the channel that delivered the messages (or, in
/// unit tests, a recorder).
pub(crate) trait AckSink: Send + Sync + 'static {
    /// Sends one `basic.ack` or `basic.nack` frame.
    fn send(&self, action: Action) -> impl Future<Output = Result<(), lapin::Error>> + Send;
}

impl AckSink for lapin::Channel {
    async fn send(&self, action: Action) -> Result<(), lapin::Error> {
        match action {
            Action::Ack { tag, multiple, .. } => {
                self.basic_ack(tag, BasicAckOptions { multiple }).await
            }
            Action::Requeue { tag, multiple, .. } => {
                self.basic_nack(
                    tag,
                    BasicNackOptions {
                        multiple,
                        requeue: true,
                    },
                )
                .await
            }
        }
    }
}

/// The settle task's state.
pub(crate) struct SettleTask<S = lapin::Channel> {
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
            match self.channel.send(action).await {
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

#[cfg(test)]
mod tests {
    //! The settle task's timing, under tokio's paused clock, with a recorder for a channel.
    use super::*;
    use crate::tracker::Settlement::{Ack, Requeue};

    /// Records every frame with the (paused) time it was sent.
    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<(Duration, Action)>>>, Option<Instant>);

    impl AckSink for Recorder {
        async fn send(&self, action: Action) -> Result<(), lapin::Error> {
            let at = self.1.map_or(Duration::ZERO, |start| start.elapsed());
            self.0.lock().unwrap().push((at, action));
            Ok(())
        }
    }

    const LINGER: Duration = Duration::from_millis(5);

    fn start(prefetch: u16) -> (SettleHandle, Recorder, Arc<QueueCounters>) {
        let recorder = Recorder(Arc::default(), Some(Instant::now()));
        let counters = Arc::new(QueueCounters::default());
        let (handle, task) = settle_task(
            recorder.clone(),
            prefetch,
            LINGER,
            Arc::from("q"),
            Arc::clone(&counters),
        );
        tokio::spawn(task.run());
        (handle, recorder, counters)
    }

    fn frames(recorder: &Recorder) -> Vec<(Duration, Action)> {
        recorder.0.lock().unwrap().clone()
    }

    fn ack(tag: u64, count: u64) -> Action {
        Action::Ack {
            tag,
            multiple: count > 1,
            count,
        }
    }

    /// Lets the settle task run without moving the clock.
    async fn settle_down() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_ack_lingers_then_goes_out() {
        let (handle, recorder, _) = start(40);
        handle.settle(1, Ack);
        handle.settle(2, Ack);
        tokio::time::sleep(Duration::from_millis(4)).await;
        assert!(frames(&recorder).is_empty(), "sent before the linger time");
        tokio::time::sleep(Duration::from_millis(2)).await;
        assert_eq!(frames(&recorder), vec![(LINGER, ack(2, 2))]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_batch_goes_out_at_once() {
        let (handle, recorder, counters) = start(40); // batch: a quarter, 10
        for tag in 1..=10 {
            handle.settle(tag, Ack);
        }
        settle_down().await;
        assert_eq!(frames(&recorder), vec![(Duration::ZERO, ack(10, 10))]);
        assert_eq!(
            counters
                .ack_frames
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_requeue_is_urgent() {
        let (handle, recorder, _) = start(40);
        handle.settle(1, Requeue);
        settle_down().await;
        assert_eq!(
            frames(&recorder),
            vec![(
                Duration::ZERO,
                Action::Requeue {
                    tag: 1,
                    multiple: false,
                    count: 1
                }
            )]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn acks_behind_a_running_delivery_wait_then_go_one_by_one() {
        let (handle, recorder, _) = start(40);
        // 1 still runs; 2..=4 finished behind it
        for tag in 2..=4 {
            handle.settle(tag, Ack);
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(
            frames(&recorder).is_empty(),
            "no single acks while 1 may finish soon"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
        let sent: Vec<Action> = frames(&recorder).into_iter().map(|(_, a)| a).collect();
        assert_eq!(sent, vec![ack(2, 1), ack(3, 1), ack(4, 1)]);
        // then 1 finishes: acked alone, never with `multiple` over the others
        handle.settle(1, Ack);
        tokio::time::sleep(LINGER * 2).await;
        assert_eq!(frames(&recorder).last().unwrap().1, ack(1, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn held_acks_crowding_the_window_go_at_once() {
        let (handle, recorder, _) = start(8); // batch 2, hold limit 4
        for tag in 2..=5 {
            handle.settle(tag, Ack);
        }
        tokio::time::sleep(LINGER + Duration::from_millis(1)).await;
        let sent: Vec<Action> = frames(&recorder).into_iter().map(|(_, a)| a).collect();
        assert_eq!(sent, vec![ack(2, 1), ack(3, 1), ack(4, 1), ack(5, 1)]);
    }

    #[tokio::test(start_paused = true)]
    async fn abandon_gives_back_the_rest_and_late_results_are_dropped() {
        let (handle, recorder, counters) = start(40);
        handle.settle(1, Ack);
        settle_down().await;
        handle.abandon(3).await;
        let sent: Vec<Action> = frames(&recorder).into_iter().map(|(_, a)| a).collect();
        assert_eq!(
            sent,
            vec![
                ack(1, 1),
                Action::Requeue {
                    tag: 3,
                    multiple: true,
                    count: 2
                }
            ]
        );
        handle.settle(2, Ack); // a handler finishing after the deadline
        handle.close().await;
        assert_eq!(
            frames(&recorder).len(),
            2,
            "nothing sent for the late result"
        );
        assert_eq!(
            counters
                .late_settlements
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
    }
}
