//! The settle task's timing, under tokio's paused clock, with a recorder for a channel.
use super::*;
use crate::engine::settle::tracker::Settlement::{Ack, Requeue};

/// Records every frame with the (paused) time it was sent.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<(Duration, Action)>>>, Option<Instant>);

impl AckSink for Recorder {
    async fn send(&self, action: Action) -> Result<(), BrokerError> {
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
    assert!(
        !handle.is_stuck(),
        "a crowded window alone is no reason to move"
    );
}

#[tokio::test(start_paused = true)]
async fn a_delivery_that_outlives_hundreds_of_others_marks_the_channel_stuck() {
    let (handle, _, _) = start(40); // stuck after outliving 256 later deliveries
    // 1 runs on: neither the hold passing nor 255 deliveries finished behind it are enough
    handle.settle(2, Ack);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for tag in 3..=256 {
        handle.settle(tag, Ack);
        settle_down().await;
    }
    assert!(!handle.is_stuck(), "stuck before 256 later deliveries");
    handle.settle(257, Ack);
    tokio::time::sleep(LINGER * 2).await;
    assert!(handle.is_stuck());
}

#[tokio::test(start_paused = true)]
async fn a_delivery_that_ends_within_the_hold_leaves_the_channel_as_it_is() {
    let (handle, recorder, _) = start(40);
    for round in 0..5 {
        // each round one delivery runs 30 ms with acks behind it, then ends
        let first = round * 3 + 1;
        handle.settle(first + 1, Ack);
        handle.settle(first + 2, Ack);
        tokio::time::sleep(Duration::from_millis(30)).await;
        handle.settle(first, Ack);
        tokio::time::sleep(LINGER * 2).await;
    }
    assert!(!handle.is_stuck());
    // and every round's acks went in one frame
    let sent: Vec<Action> = frames(&recorder).into_iter().map(|(_, a)| a).collect();
    assert_eq!(sent, (1..=5).map(|r| ack(r * 3, 3)).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn acks_behind_a_delivery_that_outlasted_the_hold_go_at_every_tick() {
    let (handle, recorder, _) = start(40); // linger 5 ms, max hold 50 ms
    // 1 runs on; 2 and 3 wait behind it, then go one by one
    handle.settle(2, Ack);
    handle.settle(3, Ack);
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(frames(&recorder).len(), 2);
    // 1 still runs: a later ack behind it does not wait the whole hold again
    handle.settle(4, Ack);
    tokio::time::sleep(LINGER * 2).await;
    let sent: Vec<Action> = frames(&recorder).into_iter().map(|(_, a)| a).collect();
    assert_eq!(sent, vec![ack(2, 1), ack(3, 1), ack(4, 1)]);
}

#[tokio::test(start_paused = true)]
async fn a_delivery_a_whole_window_behind_releases_acks_at_once() {
    let (handle, recorder, _) = start(8); // batch 2, hold limit 4, stuck after 8
    // 1 and 2 run on; 3..=8 finish behind them and go one by one (held by 1)
    for tag in 3..=5 {
        handle.settle(tag, Ack);
    }
    tokio::time::sleep(Duration::from_millis(60)).await;
    for tag in 6..=8 {
        handle.settle(tag, Ack);
    }
    tokio::time::sleep(LINGER * 2).await;
    assert_eq!(frames(&recorder).len(), 6);
    // 1 finishes, alone; now 2 holds, with 8 deliveries after it: a whole window, so it
    // is not about to finish either, and the acks behind it go without lingering
    handle.settle(1, Ack);
    tokio::time::sleep(LINGER * 2).await;
    assert_eq!(frames(&recorder).last().unwrap().1, ack(1, 1));
    let before = frames(&recorder).len();
    handle.settle(9, Ack);
    handle.settle(10, Ack);
    settle_down().await;
    let sent: Vec<Action> = frames(&recorder)[before..]
        .iter()
        .map(|&(_, a)| a)
        .collect();
    assert_eq!(sent, vec![ack(9, 1), ack(10, 1)]);
}

/// A channel whose frames are queued at once but written only when the gate opens.
#[derive(Clone)]
struct Gated {
    queued: Arc<Mutex<Vec<Action>>>,
    gate: Arc<tokio::sync::Semaphore>,
}

impl AckSink for Gated {
    async fn send(&self, action: Action) -> Result<(), BrokerError> {
        self.queued.lock().unwrap().push(action);
        let _written = self.gate.acquire().await;
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn every_frame_is_queued_before_any_is_waited_for() {
    let sink = Gated {
        queued: Arc::default(),
        gate: Arc::new(tokio::sync::Semaphore::new(0)),
    };
    let counters = Arc::new(QueueCounters::default());
    let (handle, task) = settle_task(
        sink.clone(),
        8,
        LINGER,
        Arc::from("q"),
        Arc::clone(&counters),
    );
    tokio::spawn(task.run());
    // 1 runs on; four acks behind it crowd the window (hold limit 4): four frames
    for tag in 2..=5 {
        handle.settle(tag, Ack);
    }
    settle_down().await;
    assert_eq!(
        *sink.queued.lock().unwrap(),
        vec![ack(2, 1), ack(3, 1), ack(4, 1), ack(5, 1)],
        "all queued, in order, though none is written yet"
    );
    let acked = || counters.acked.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(acked(), 0, "counted only once written");
    sink.gate.add_permits(1);
    settle_down().await;
    assert_eq!(acked(), 4);
    assert_eq!(
        counters
            .ack_frames
            .load(std::sync::atomic::Ordering::Relaxed),
        4
    );
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
