//! Per-key ordering on the in-memory broker, through the public harness: one key's
//! deliveries are never handled at once nor out of order — with random handler latencies,
//! retries in place, a channel lost, a shutdown — while different keys run in parallel.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use crate::{
    Conejo, Context, Handler, HandlerError, Message, OrderKey, QueueConfig, RetryPolicy,
    testing::{HandledAs, Published, TestBroker},
};

/// Records, per key, the sequence numbers it handled, and how many ran at once (overall
/// and per key). Bodies are `key:seq`; it waits a pseudo-random time, and fails the
/// sequence numbers divisible by `fail_every` on their first attempt.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<HashMap<String, Vec<u32>>>>,
    running: Arc<Mutex<HashMap<String, usize>>>,
    overlapped_keys: Arc<AtomicUsize>,
    now: Arc<AtomicUsize>,
    most: Arc<AtomicUsize>,
    fail_every: u32,
}

impl Handler for Recorder {
    type Message = String;
    async fn handle(&self, body: String, ctx: &Context) -> Result<(), HandlerError> {
        let (key, seq) = body.split_once(':').expect("key:seq");
        let seq: u32 = seq.parse().expect("a number");
        {
            let mut running = self.running.lock().unwrap();
            let count = running.entry(key.to_owned()).or_default();
            *count += 1;
            if *count > 1 {
                self.overlapped_keys.fetch_add(1, Ordering::SeqCst);
            }
        }
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.most.fetch_max(now, Ordering::SeqCst);
        // 0–9 ms, from the body: different keys finish in a scrambled order.
        let spread = (seq.wrapping_mul(2_654_435_761) >> 7) % 10;
        tokio::time::sleep(Duration::from_millis(u64::from(spread))).await;
        self.now.fetch_sub(1, Ordering::SeqCst);
        *self.running.lock().unwrap().get_mut(key).unwrap() -= 1;
        if self.fail_every > 0 && seq.is_multiple_of(self.fail_every) && ctx.attempt() == 1 {
            return Err(HandlerError::retry("flaky dependency"));
        }
        self.seen
            .lock()
            .unwrap()
            .entry(key.to_owned())
            .or_default()
            .push(seq);
        Ok(())
    }
}

/// Strict order through redeliveries: a classic queue (which gives a message back in its
/// place) without redelivery counting.
fn ordered(concurrency: usize) -> QueueConfig {
    QueueConfig::new()
        .poison_limit(None)
        .concurrency(concurrency)
        .ordered_by(OrderKey::from_fn(|_, body| {
            let text = std::str::from_utf8(body).ok()?;
            Some(text.split_once(':')?.0.to_owned())
        }))
        .retry(
            RetryPolicy::default()
                .initial_delay(Duration::from_secs(3))
                .jitter(0.0),
        )
}

async fn publish_round_robin(broker: &TestBroker, keys: u32, per_key: u32) {
    for seq in 0..per_key {
        for key in 0..keys {
            broker
                .send("events", format!("k{key}:{seq}"))
                .await
                .unwrap();
        }
    }
}

fn assert_in_order(recorder: &Recorder, keys: u32, per_key: u32) {
    let seen = recorder.seen.lock().unwrap();
    assert_eq!(seen.len(), keys as usize);
    for (key, seqs) in seen.iter() {
        let expected: Vec<u32> = (0..per_key).collect();
        assert_eq!(seqs, &expected, "key {key} out of order or incomplete");
    }
    assert_eq!(
        recorder.overlapped_keys.load(Ordering::SeqCst),
        0,
        "two deliveries of one key ran at once"
    );
}

#[tokio::test]
async fn one_keys_deliveries_run_in_order_and_different_keys_in_parallel() {
    let broker = TestBroker::memory();
    let recorder = Recorder {
        fail_every: 7,
        ..Recorder::default()
    };
    let service = broker
        .start(Conejo::builder(broker.url()).queue_with("events", recorder.clone(), ordered(8)))
        .await
        .unwrap();
    publish_round_robin(&broker, 20, 25).await;
    service.idle().await.unwrap();
    assert_in_order(&recorder, 20, 25);
    let most = recorder.most.load(Ordering::SeqCst);
    assert!(most > 1 && most <= 8, "ran at most {most} at once");
    let stats = service.queue("events");
    assert_eq!(stats.acked, 500, "{stats:?}");
    // Sequence numbers 0, 7, 14, 21 of each key failed once, retried in place.
    assert_eq!(stats.retried, 80, "{stats:?}");
    assert_eq!((stats.key_waiting, stats.keys_busy), (0, 0));
    assert_eq!(stats.active, None, "not a single-active queue");
    let retried = service
        .handled("events")
        .iter()
        .filter(|h| h.outcome == HandledAs::Retried)
        .all(|h| h.sent_to.is_none());
    assert!(retried, "ordered retries go through no wait queue");
    assert!(
        broker.ready("events.retry.3000ms").await.is_err(),
        "no wait queue was declared"
    );
    service.stop().await.unwrap();
}

#[tokio::test]
async fn a_hot_key_waits_in_the_window_and_shows_in_the_gauges() {
    let broker = TestBroker::memory();
    let recorder = Recorder::default();
    let service = broker
        .start(Conejo::builder(broker.url()).queue_with("events", recorder.clone(), ordered(4)))
        .await
        .unwrap();
    for seq in 0..30 {
        broker.send("events", format!("hot:{seq}")).await.unwrap();
    }
    broker.send("events", "cold:0").await.unwrap();
    service
        .until("the hot key waits", |s| s.queue("events").key_waiting > 0)
        .await
        .unwrap();
    let stats = service.queue("events");
    assert_eq!(stats.keys_busy, 1, "only the hot key is busy: {stats:?}");
    assert!(stats.key_waiting >= 20, "{stats:?}");
    assert!(stats.oldest_key_wait.is_some(), "{stats:?}");
    service.idle().await.unwrap();
    {
        let seen = recorder.seen.lock().unwrap();
        assert_eq!(seen["hot"], (0..30).collect::<Vec<u32>>());
        assert_eq!(seen["cold"], [0]);
    }
    // The cold key did not wait for the hot one.
    let bodies: Vec<String> = service
        .handled("events")
        .iter()
        .map(|h| String::from_utf8_lossy(&h.body).into_owned())
        .collect();
    let cold = bodies.iter().position(|b| b == "cold:0").unwrap();
    assert!(cold < 5, "the cold key ended {cold}th: {bodies:?}");
    service.stop().await.unwrap();
}

#[tokio::test]
async fn shutdown_gives_back_the_waiting_deliveries_in_order() {
    let broker = TestBroker::memory();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    struct Gated(Arc<tokio::sync::Semaphore>, Arc<Mutex<Vec<String>>>);
    impl Handler for Gated {
        type Message = String;
        async fn handle(&self, body: String, _: &Context) -> Result<(), HandlerError> {
            self.0.acquire().await.unwrap().forget();
            self.1.lock().unwrap().push(body);
            Ok(())
        }
    }
    let handled = Arc::new(Mutex::new(Vec::new()));
    let service = broker
        .start(Conejo::builder(broker.url()).queue_with(
            "events",
            Gated(Arc::clone(&gate), Arc::clone(&handled)),
            ordered(4),
        ))
        .await
        .unwrap();
    for seq in 0..5 {
        broker.send("events", format!("a:{seq}")).await.unwrap();
    }
    service
        .until("four wait behind the first", |s| {
            s.queue("events").key_waiting == 4
        })
        .await
        .unwrap();
    let stopping = tokio::spawn(service.stop());
    tokio::time::sleep(Duration::from_millis(50)).await;
    gate.add_permits(1);
    stopping.await.unwrap().unwrap();
    assert_eq!(handled.lock().unwrap().as_slice(), ["a:0"]);
    let left: Vec<String> = broker
        .take("events")
        .await
        .unwrap()
        .iter()
        .map(|m| m.text())
        .collect();
    assert_eq!(left, ["a:1", "a:2", "a:3", "a:4"], "given back, in order");
}

#[tokio::test]
async fn a_lost_channel_drops_the_waiting_deliveries_and_their_redelivery_keeps_the_order() {
    let broker = TestBroker::memory();
    let recorder = Recorder::default();
    let service = broker
        .start(Conejo::builder(broker.url()).queue_with("events", recorder.clone(), ordered(4)))
        .await
        .unwrap();
    let faults = broker.faults().unwrap();
    publish_round_robin(&broker, 3, 10).await;
    // Mid-stream: the connection goes, with deliveries running and waiting.
    service
        .until("some handled", |s| s.queue("events").acked >= 5)
        .await
        .unwrap();
    faults.drop_connections("an operator closed it");
    service
        .until("reconnected", |s| s.status().reconnects() == 1)
        .await
        .unwrap();
    service.idle().await.unwrap();
    let seen = recorder.seen.lock().unwrap().clone();
    for (key, seqs) in seen.iter() {
        // Each run in order and contiguous; after the reconnection the key starts again
        // at the first message the broker had not seen acked (a repeat of what was handled
        // and whose ack was lost), never further back, never skipping one.
        let contiguous = |run: &[u32]| run.windows(2).all(|w| w[1] == w[0] + 1);
        match seqs.windows(2).position(|w| w[1] <= w[0]) {
            None => assert_eq!(seqs, &(0..10).collect::<Vec<u32>>(), "key {key}"),
            Some(at) => {
                let (before, after) = seqs.split_at(at + 1);
                assert!(contiguous(before) && before[0] == 0, "key {key}: {seqs:?}");
                assert!(contiguous(after), "key {key}: {seqs:?}");
                assert_eq!(after.last(), Some(&9), "key {key}: {seqs:?}");
                assert!(
                    after[0] <= before[before.len() - 1] + 1,
                    "key {key}: {seqs:?}"
                );
            }
        }
    }
    assert_eq!(recorder.overlapped_keys.load(Ordering::SeqCst), 0);
    assert_eq!(broker.ready("events").await.unwrap(), 0);
    service.stop().await.unwrap();
}

#[tokio::test]
async fn deliveries_without_a_key_are_not_ordered() {
    let broker = TestBroker::memory();
    let recorder = Recorder::default();
    let config = QueueConfig::new()
        .quorum()
        .concurrency(8)
        .ordered_by(OrderKey::header("order-id"));
    // (A quorum queue: ordering needs no more than its broker-side delivery count.)
    let service = broker
        .start(Conejo::builder(broker.url()).queue_with("events", recorder.clone(), config))
        .await
        .unwrap();
    for seq in 0..16 {
        broker.send("events", format!("none:{seq}")).await.unwrap();
    }
    for seq in 0..4 {
        let published = broker
            .publish(Message::new("", "events", format!("keyed:{seq}")).header("order-id", 42))
            .await
            .unwrap();
        assert_eq!(published, Published::Accepted);
    }
    service.idle().await.unwrap();
    assert!(
        recorder.most.load(Ordering::SeqCst) > 1,
        "unkeyed deliveries ran in parallel"
    );
    assert!(
        recorder.overlapped_keys.load(Ordering::SeqCst) > 0,
        "the unkeyed ones overlapped (the recorder keys them by body prefix)"
    );
    assert_eq!(recorder.seen.lock().unwrap()["keyed"], [0, 1, 2, 3]);
    service.stop().await.unwrap();
}

#[test]
fn an_ordered_classic_queue_with_redelivery_counting_is_refused() {
    struct Nop;
    impl Handler for Nop {
        type Message = Vec<u8>;
        async fn handle(&self, _: Vec<u8>, _: &Context) -> Result<(), HandlerError> {
            Ok(())
        }
    }
    let error = Conejo::builder("amqp://guest:guest@localhost/%2f")
        .queue_with(
            "events",
            Nop,
            QueueConfig::new().ordered_by(OrderKey::routing_key()),
        )
        .build()
        .unwrap_err()
        .to_string();
    assert!(error.contains("poison_limit(None)"), "{error}");
    assert!(
        Conejo::builder("amqp://guest:guest@localhost/%2f")
            .queue_with(
                "events",
                Nop,
                QueueConfig::new()
                    .poison_limit(None)
                    .ordered_by(OrderKey::routing_key()),
            )
            .build()
            .is_ok()
    );
}

#[tokio::test]
async fn a_partitioned_service_keeps_each_key_on_one_partition_and_in_order() {
    let broker = TestBroker::memory();
    let recorder = Recorder {
        fail_every: 5,
        ..Recorder::default()
    };
    let partitions = crate::Partitions::new("events", 4);
    let service = broker
        .start(Conejo::builder(broker.url()).partitioned(
            partitions.clone(),
            recorder.clone(),
            QueueConfig::new().concurrency(4).poison_limit(None),
        ))
        .await
        .unwrap();
    // Routed by the routing key: the key of the body, as a producer would set it.
    for seq in 0..10 {
        for key in 0..40 {
            let message = Message::new("events", &format!("k{key}"), format!("k{key}:{seq}"));
            assert_eq!(broker.publish(message).await.unwrap(), Published::Accepted);
        }
    }
    service.idle().await.unwrap();
    assert_in_order(&recorder, 40, 10);
    let mut partition_of = HashMap::new();
    for queue in partitions.queue_names() {
        let handled = service.handled(&queue);
        assert!(!handled.is_empty(), "{queue} got no key");
        // A single-active queue: this service got deliveries, so it holds the role.
        assert_eq!(service.queue(&queue).active, Some(true), "{queue}");
        for h in handled {
            let body = String::from_utf8_lossy(&h.body).into_owned();
            let key = body.split_once(':').unwrap().0.to_owned();
            let first = partition_of
                .entry(key.clone())
                .or_insert_with(|| queue.clone());
            assert_eq!(first, &queue, "key {key} on two partitions");
        }
    }
    assert_eq!(partition_of.len(), 40);
    service.stop().await.unwrap();
}

#[tokio::test]
async fn bad_partitions_fail_the_build() {
    let broker = TestBroker::memory();
    let error = Conejo::builder(broker.url())
        .partitioned(
            crate::Partitions::new("events", 4).replica(4, 4),
            Recorder::default(),
            QueueConfig::new().poison_limit(None),
        )
        .build()
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("partitions 'events': replica 4 of 4"),
        "{error}"
    );
    // An ordered classic queue refuses redelivery counting: so do its partitions.
    let error = Conejo::builder(broker.url())
        .partitioned(
            crate::Partitions::new("events", 4),
            Recorder::default(),
            QueueConfig::new(),
        )
        .build()
        .unwrap_err();
    assert!(error.to_string().contains("poison_limit(None)"), "{error}");
}
