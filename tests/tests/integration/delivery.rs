//! Messages in, outcomes out: acks, retries, rejects, decode failures and panics, checked on
//! the broker's side.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use conejo::{
    Conejo, Context, Error, Handler, HandlerError, Json, Outcome, QueueConfig, RetryPolicy,
};
use conejo_tests::{Broker, RunningService, amqp_url, init_tracing, queue_config, unique_name};
use serde::{Deserialize, Serialize};

const WAIT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct Order {
    id: u64,
    sku: String,
}

/// Records every message it handles: (message id, redelivered), and the order ids.
#[derive(Clone, Default)]
struct Recorder {
    seen: Arc<Mutex<Vec<(String, bool, u64)>>>,
}

impl Recorder {
    fn seen(&self) -> Vec<(String, bool, u64)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Handler for Recorder {
    type Message = Json<Order>;

    async fn handle(&self, Json(order): Json<Order>, ctx: &Context) -> Result<(), HandlerError> {
        let id = ctx.message_id().unwrap_or_default().to_owned();
        self.seen
            .lock()
            .unwrap()
            .push((id, ctx.redelivered(), order.id));
        Ok(())
    }
}

#[tokio::test]
async fn typed_messages_are_handled_once_and_acked() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let queue = unique_name("typed");
    broker.declare_queue(&queue).await?;
    let mut ids = Vec::new();
    for n in 0..50 {
        let order = Order {
            id: n,
            sku: format!("SKU-{n}"),
        };
        ids.push(broker.publish_json(&queue, &order).await?);
    }

    let recorder = Recorder::default();
    let service = RunningService::spawn(
        Conejo::builder(amqp_url())
            .queue_with(&queue, recorder.clone(), queue_config().concurrency(4))
            .build()?,
    );
    service.wait_for(&queue, WAIT, |s| s.acked == 50).await?;
    service.stop().await??;
    // Nothing unacked, nothing ready: the broker holds no message of the queue.
    assert_eq!(broker.message_count(&queue).await?, 0);

    let seen = recorder.seen();
    assert_eq!(seen.len(), 50, "each message handled exactly once");
    let mut seen_ids: Vec<_> = seen.iter().map(|(id, _, _)| id.clone()).collect();
    seen_ids.sort();
    ids.sort();
    assert_eq!(seen_ids, ids);
    assert!(seen.iter().all(|(_, redelivered, _)| !redelivered));
    broker.delete_consumed_queue(&queue).await?;
    Ok(())
}

/// Per message id: (attempt, redelivered) of each call.
type Attempts = HashMap<String, Vec<(u32, bool)>>;

/// Fails the first attempt at every message (`?` on an error: retry), succeeds on the next.
#[derive(Clone, Default)]
struct FlakyOnce {
    attempts: Arc<Mutex<Attempts>>,
}

impl Handler for FlakyOnce {
    type Message = String;

    async fn handle(&self, _text: String, ctx: &Context) -> Result<(), HandlerError> {
        let id = ctx.message_id().unwrap_or_default().to_owned();
        self.attempts
            .lock()
            .unwrap()
            .entry(id)
            .or_default()
            .push((ctx.attempt(), ctx.redelivered()));
        if ctx.attempt() == 1 {
            let _: u32 = "not a number".parse()?;
        }
        Ok(())
    }
}

#[tokio::test]
async fn a_failed_message_comes_back_as_its_next_attempt() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let queue = unique_name("retry");
    broker.declare_queue(&queue).await?;
    let a = broker.publish_bytes(&queue, b"first").await?;
    let b = broker.publish_bytes(&queue, b"second").await?;

    let handler = FlakyOnce::default();
    let service = RunningService::spawn(
        Conejo::builder(amqp_url())
            .queue_with(
                &queue,
                handler.clone(),
                queue_config()
                    .retry(RetryPolicy::default().initial_delay(Duration::from_millis(50))),
            )
            .build()?,
    );
    // 2 failed deliveries acked once their retry copy was confirmed, 2 successes
    let stats = service.wait_for(&queue, WAIT, |s| s.acked == 4).await?;
    service.stop().await??;
    assert_eq!(stats.retried, 2);
    assert_eq!(stats.handler_errors, 2);
    assert_eq!(stats.dead_lettered, 0);
    assert_eq!(broker.message_count(&queue).await?, 0);
    let attempts = handler.attempts.lock().unwrap().clone();
    // a retry is a new copy: counted by conejo, not redelivered by the broker
    assert_eq!(attempts[&a], vec![(1, false), (2, false)]);
    assert_eq!(attempts[&b], vec![(1, false), (2, false)]);
    broker.delete_consumed_queue(&queue).await?;
    Ok(())
}

/// Rejects orders without a SKU, panics on id 13, accepts the rest.
#[derive(Clone, Default)]
struct Picky {
    accepted: Arc<AtomicU64>,
}

impl Handler for Picky {
    type Message = Json<Order>;

    async fn handle(&self, Json(order): Json<Order>, _ctx: &Context) -> Result<(), HandlerError> {
        if order.id == 13 {
            panic!("unlucky order");
        }
        if order.sku.is_empty() {
            return Err(HandlerError::reject("order without sku"));
        }
        self.accepted.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[tokio::test]
async fn rejects_malformed_payloads_and_panics_go_to_the_dead_letter_queue() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let queue = unique_name("reject");
    let dlq = format!("{queue}.dlq");

    // conejo declares the queue, and its dead-letter exchange and queue.
    let handler = Picky::default();
    let service = RunningService::spawn(
        Conejo::builder(amqp_url())
            .queue_with(&queue, handler.clone(), queue_config().concurrency(1))
            .build()?,
    );
    broker.wait_for_consumer_count(&queue, 1, WAIT).await?;

    let malformed = broker
        .publish_bytes(&queue, b"{\"id\": 1, \"sku\": ")
        .await?;
    let wrong_type = broker
        .publish_bytes(&queue, br#"{"id": "one", "sku": "x"}"#)
        .await?;
    let no_sku = broker
        .publish_json(
            &queue,
            &Order {
                id: 2,
                sku: String::new(),
            },
        )
        .await?;
    let panics = broker
        .publish_json(
            &queue,
            &Order {
                id: 13,
                sku: "X".into(),
            },
        )
        .await?;
    let good = broker
        .publish_json(
            &queue,
            &Order {
                id: 3,
                sku: "Y".into(),
            },
        )
        .await?;

    let stats = service
        .wait_for(&queue, WAIT, |s| s.acked == 5 && s.dead_lettered == 4)
        .await?;
    assert_eq!(stats.decode_failures, 2);
    assert_eq!(stats.panics, 1);
    assert_eq!(stats.handler_errors, 1);
    assert_eq!(stats.retried, 0, "none of these is worth a retry");
    assert_eq!(
        handler.accepted.load(Ordering::SeqCst),
        1,
        "the valid message after them was handled"
    );
    // The service is still running after a panic.
    assert!(!service.is_finished());
    service.stop().await??;

    assert_eq!(broker.message_count(&queue).await?, 0);
    broker.wait_for_count(&dlq, 4, WAIT).await?;
    let dead = broker.drain(&dlq).await?;
    let dead_ids: Vec<_> = dead.iter().filter_map(|m| m.message_id.clone()).collect();
    assert_eq!(dead_ids, vec![malformed, wrong_type, no_sku, panics]);
    assert_eq!(
        dead[0].body, b"{\"id\": 1, \"sku\": ",
        "the payload is kept byte for byte"
    );
    let failures: Vec<_> = dead
        .iter()
        .map(|m| m.header_str("conejo-failure").unwrap_or_default())
        .collect();
    assert_eq!(failures, vec!["decode", "decode", "handler", "panic"]);
    for m in &dead {
        assert_eq!(m.header_str("conejo-reason").as_deref(), Some("rejected"));
        assert_eq!(m.header_int("conejo-attempt"), Some(1));
        assert_eq!(m.header_str("conejo-original-queue"), Some(queue.clone()));
    }
    assert_eq!(
        dead[2].header_str("conejo-error").as_deref(),
        Some("handler error: order without sku")
    );
    assert_eq!(
        dead[3].header_str("conejo-error").as_deref(),
        Some("handler panicked: unlucky order")
    );
    assert!(!dead_ids.contains(&good));
    broker.delete_consumed_queue(&queue).await?;
    Ok(())
}

#[tokio::test]
async fn a_custom_failure_policy_decides_the_outcome() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let queue = unique_name("policy");
    broker.declare_queue(&queue).await?;
    broker.publish_bytes(&queue, b"not json").await?;

    // Decode failures are acked (dropped) by this policy instead of dead-lettered.
    let service = RunningService::spawn(
        Conejo::builder(amqp_url())
            .queue_with(
                &queue,
                Recorder::default(),
                queue_config().on_failure(|failure, _ctx| match failure {
                    conejo::Failure::Decode(_) => Outcome::Ack,
                    other => other.default_outcome(),
                }),
            )
            .build()?,
    );
    let stats = service.wait_for(&queue, WAIT, |s| s.acked == 1).await?;
    service.stop().await??;
    assert_eq!((stats.decode_failures, stats.dead_lettered), (1, 0));
    assert_eq!(broker.message_count(&queue).await?, 0);
    broker.delete_consumed_queue(&queue).await?;
    Ok(())
}

/// Sleeps a pseudo-random 0–3 ms, so handlers finish out of order; order 100 runs until
/// 150 orders after it have been handled, more than the settle task holds behind a running
/// delivery, so the acks finished behind it are forced out one by one (a `multiple` ack
/// would ack it too). Counted in deliveries, not time: however fast the machine, the hold
/// covers about 150 acks, below the 256 that would move the queue to a fresh channel.
#[derive(Clone, Default)]
struct Jittery {
    handled: Arc<Mutex<HashMap<u64, u32>>>,
}

impl Handler for Jittery {
    type Message = Json<Order>;

    async fn handle(&self, Json(order): Json<Order>, _ctx: &Context) -> Result<(), HandlerError> {
        if order.id == 100 {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let after = self
                    .handled
                    .lock()
                    .unwrap()
                    .keys()
                    .filter(|&&id| id > 100)
                    .count();
                let now = std::time::Instant::now();
                if after >= 150 || now >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        } else {
            let pause = order.id.wrapping_mul(0x9E37_79B9) % 4;
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        *self.handled.lock().unwrap().entry(order.id).or_default() += 1;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_completions_are_all_acked_exactly_once() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let queue = unique_name("coalesce");
    broker.declare_queue(&queue).await?;
    const N: u64 = 3000;
    publish_orders(&broker, &queue, 0..N).await?;
    broker.wait_for_count(&queue, N as u32, WAIT).await?;

    let handler = Jittery::default();
    let service = RunningService::spawn(
        Conejo::builder(amqp_url())
            .queue_with(
                &queue,
                handler.clone(),
                queue_config().concurrency(64).prefetch(100),
            )
            .build()?,
    );
    let stats = service
        .wait_for(&queue, Duration::from_secs(60), |s| s.acked == N)
        .await?;
    service.stop().await??;
    // A double or unknown ack would have closed the channel (PRECONDITION_FAILED) and
    // failed the service; a missing one would leave messages on the broker.
    assert_eq!(stats.ack_failures, 0);
    // Coalescing survives the held delivery: a few hundred frames for 3,000 acks (about 120
    // multiple acks of a quarter of the prefetch, plus single acks behind order 100 while
    // it runs).
    eprintln!("{} acks in {} frames", stats.acked, stats.ack_frames);
    assert!(
        stats.ack_frames * 5 <= N,
        "{} frames for {N} acks",
        stats.ack_frames
    );
    assert!(
        stats.ack_frames * 25 >= N,
        "fewer frames than batches: {stats:?}"
    );
    assert_eq!(broker.message_count(&queue).await?, 0);
    let handled = handler.handled.lock().unwrap().clone();
    assert_eq!(handled.len() as u64, N);
    assert!(handled.values().all(|&n| n == 1));
    broker.delete_consumed_queue(&queue).await?;
    Ok(())
}

#[tokio::test(flavor = "current_thread")]
async fn works_on_a_current_thread_runtime() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let queue = unique_name("current-thread");
    broker.declare_queue(&queue).await?;
    for id in 0..10 {
        broker
            .publish_json(
                &queue,
                &Order {
                    id,
                    sku: "S".into(),
                },
            )
            .await?;
    }
    let recorder = Recorder::default();
    let service = RunningService::spawn(
        Conejo::builder(amqp_url())
            .queue_with(&queue, recorder.clone(), queue_config())
            .build()?,
    );
    service.wait_for(&queue, WAIT, |s| s.acked == 10).await?;
    service.stop().await??;
    assert_eq!(recorder.seen().len(), 10);
    assert_eq!(broker.message_count(&queue).await?, 0);
    broker.delete_consumed_queue(&queue).await?;
    Ok(())
}

#[tokio::test]
async fn a_missing_queue_declared_passive_is_a_clear_error() -> anyhow::Result<()> {
    init_tracing();
    let queue = unique_name("missing");
    let name = unique_name("conn-missing");
    let result = Conejo::builder(amqp_url())
        .connection_name(&name)
        .queue_with(&queue, Recorder::default(), QueueConfig::new().passive())
        .build()?
        .run_until(std::future::pending())
        .await;
    match result {
        Err(Error::QueueNotFound { queue: missing }) => assert_eq!(missing, queue),
        other => panic!("expected QueueNotFound, got {other:?}"),
    }
    // Startup failed cleanly: no connection left open on the broker.
    conejo_tests::wait_for_connection_absent(&name, WAIT).await?;
    Ok(())
}

#[tokio::test]
async fn a_declaration_conflict_names_the_queue() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let queue = unique_name("conflict");
    broker.declare_queue(&queue).await?; // non-durable
    let result = Conejo::builder(amqp_url())
        .queue_with(&queue, Recorder::default(), QueueConfig::new()) // durable
        .build()?
        .run_until(std::future::pending())
        .await;
    let err = result.expect_err("a durable declaration of a transient queue must fail");
    assert_eq!(err.queue(), Some(queue.as_str()));
    assert!(err.to_string().contains("PRECONDITION_FAILED"), "{err}");
    broker.delete_consumed_queue(&queue).await?;
    Ok(())
}

#[tokio::test]
async fn an_unreachable_broker_is_an_error_without_the_password() -> anyhow::Result<()> {
    // Port 1 on loopback: nothing listens there.
    let result = Conejo::builder("amqp://app:very-secret@127.0.0.1:1/%2f")
        .wait_for_broker(false)
        .queue_with("q", Recorder::default(), QueueConfig::new())
        .build()?
        .run_until(std::future::pending())
        .await;
    let err = result.expect_err("nothing listens on port 1");
    assert!(matches!(err, Error::Connect { .. }), "{err:?}");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("very-secret"), "{shown}");
    assert!(shown.contains("amqp://app:***@127.0.0.1:1"), "{shown}");
    Ok(())
}

#[tokio::test]
async fn failing_fast_still_tries_every_address_once() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let queue = unique_name("fail-fast-list");
    broker.declare_queue(&queue).await?;
    // The first address of the list has nothing listening: port 1 on loopback.
    let recorder = Recorder::default();
    let service = RunningService::spawn(
        Conejo::builder(format!("amqp://guest:guest@127.0.0.1:1/%2f,{}", amqp_url()))
            .wait_for_broker(false)
            .queue_with(&queue, recorder.clone(), queue_config())
            .build()?,
    );
    let order = Order {
        id: 1,
        sku: "SKU-1".into(),
    };
    broker.publish_json(&queue, &order).await?;
    service.wait_for(&queue, WAIT, |s| s.acked == 1).await?;
    assert_eq!(recorder.seen().len(), 1);
    service.stop().await??;
    broker.delete_consumed_queue(&queue).await?;
    Ok(())
}

#[tokio::test]
async fn refused_credentials_fail_at_once_even_when_waiting_for_the_broker() -> anyhow::Result<()> {
    init_tracing();
    let url = amqp_url().replacen("guest:guest@", "guest:not-the-password@", 1);
    anyhow::ensure!(
        url != amqp_url(),
        "the test broker's URL has no guest:guest"
    );
    let started = std::time::Instant::now();
    let result = tokio::time::timeout(
        WAIT,
        Conejo::builder(&url)
            .queue_with("q", Recorder::default(), QueueConfig::new())
            .build()?
            .run_until(std::future::pending()),
    )
    .await
    .context("a refused login must not be retried")?;
    let err = result.expect_err("wrong password");
    assert!(err.is_refused(), "{err:?}");
    assert!(!format!("{err} {err:?}").contains("not-the-password"));
    eprintln!("refused after {:?}: {err}", started.elapsed());
    Ok(())
}

/// A broker-side consumer cancel is not a dead channel: a handler running when its queue is
/// deleted finishes and is acked on its old channel (no late, dropped or failed result),
/// while the queue, declared again, is consumed on a new one.
#[tokio::test]
async fn a_handler_running_through_a_consumer_cancel_is_acked_on_its_channel() -> anyhow::Result<()>
{
    init_tracing();
    let broker = Broker::connect().await?;
    let queue = unique_name("cancelled");
    broker.declare_queue(&queue).await?;
    let handler = Stubborn::default();
    let service = RunningService::spawn(
        Conejo::builder(amqp_url())
            .reconnect_delay(Duration::from_millis(50), Duration::from_millis(200))
            .queue_with(&queue, handler.clone(), queue_config())
            .build()?,
    );
    broker.wait_for_consumer_count(&queue, 1, WAIT).await?;
    broker.publish_bytes(&queue, b"running").await?;
    service.wait_for(&queue, WAIT, |s| s.in_flight == 1).await?;
    // The first call runs until it is released; meanwhile the queue is deleted, the broker
    // cancels the consumer, and conejo declares the queue again and consumes it.
    broker.delete_queue(&queue).await?;
    broker.wait_for_consumer_count(&queue, 1, WAIT).await?;
    broker.publish_bytes(&queue, b"after").await?;
    // Only now does the first call end (on its old channel), and the second with it.
    assert_eq!(handler.finished.load(Ordering::SeqCst), 0);
    handler.release(2);
    let stats = service
        .wait_for(&queue, WAIT, |s| s.acked == 2 && s.in_flight == 0)
        .await?;
    eprintln!("{stats:?}");
    assert_eq!(
        (stats.late_settlements, stats.ack_failures, stats.requeued),
        (0, 0, 0),
        "{stats:?}"
    );
    assert_eq!(handler.calls.lock().unwrap().len(), 2);
    assert_eq!(service.status().reconnects(), 0);
    assert!(!service.is_finished());
    service.stop().await??;
    assert_eq!(broker.message_count(&queue).await?, 0);
    broker.delete_consumed_queue(&queue).await?;
    Ok(())
}

#[tokio::test]
async fn a_deleted_queue_is_declared_and_consumed_again() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let queue = unique_name("deleted");
    broker.declare_queue(&queue).await?;
    let recorder = Recorder::default();
    let service = RunningService::spawn(
        Conejo::builder(amqp_url())
            .reconnect_delay(Duration::from_millis(50), Duration::from_millis(200))
            .queue_with(&queue, recorder.clone(), queue_config())
            .build()?,
    );
    broker.wait_for_consumer_count(&queue, 1, WAIT).await?;
    broker.delete_queue(&queue).await?;
    // The broker cancels the consumer; conejo declares the queue again and consumes it.
    broker.wait_for_consumer_count(&queue, 1, WAIT).await?;
    broker
        .publish_json(
            &queue,
            &Order {
                id: 1,
                sku: "S".into(),
            },
        )
        .await?;
    service.wait_for(&queue, WAIT, |s| s.acked == 1).await?;
    assert!(!service.is_finished());
    service.stop().await??;
    assert_eq!(recorder.seen().len(), 1);
    broker.delete_consumed_queue(&queue).await?;
    Ok(())
}

#[tokio::test]
async fn a_connection_closed_by_the_broker_is_reopened_and_loses_nothing() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let queue = unique_name("forced");
    broker.declare_queue(&queue).await?;
    let name = unique_name("conn-forced");
    const N: u64 = 12_000;
    publish_orders(&broker, &queue, 0..N).await?;
    // 4 at a time, 0–3 ms each: about 1,500 messages a second, so the close (rabbitmqctl
    // takes a second or two to start) comes mid-stream
    let handler = Jittery::default();
    let service = RunningService::spawn(
        Conejo::builder(amqp_url())
            .connection_name(&name)
            // acks linger long, so some are waiting when the connection goes
            .ack_linger(Duration::from_millis(200))
            .queue_with(&queue, handler.clone(), queue_config().concurrency(4))
            .build()?,
    );
    let status = service.status().clone();
    let connection = conejo_tests::wait_for_connection_present(&name, WAIT).await?;
    service
        .wait_for(&queue, WAIT, |s| s.acked >= N / 10)
        .await?;
    conejo_tests::rabbitmqctl_close_connection(&connection.name, "fault injection").await?;
    let acked_before = service.stats().queue(&queue).unwrap().acked;
    anyhow::ensure!(
        acked_before < N,
        "the stream ended before the fault: nothing tested"
    );

    // Every message handled at least once; the queue ends empty; the service never stopped.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let handled = handler.handled.lock().unwrap().len() as u64;
        if handled == N && broker.message_count(&queue).await? == 0 && status.is_ready() {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "handled {handled} of {N}; status {:?}",
            status.state()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!service.is_finished());
    assert_eq!(status.reconnects(), 1);
    let stats = service.stats().queue(&queue).unwrap();
    service.stop().await??;
    let handled = handler.handled.lock().unwrap().clone();
    let duplicates: u32 = handled.values().map(|n| n - 1).sum();
    eprintln!("reconnected; {duplicates} duplicates; {stats:?}");
    // at most the unacked window (the prefetch) comes back twice
    let window = u32::from(queue_config().concurrency(4).effective_prefetch());
    assert!(
        duplicates <= window,
        "{duplicates} duplicates, window {window}"
    );
    broker.delete_consumed_queue(&queue).await?;
    Ok(())
}

/// Ignores its context's signal: call `n` runs until the test releases it (`release(n)`), at
/// most [`STUBBORN_LIMIT`]. So the first call outlives its connection by construction, however
/// long the fault injection takes to land (two `rabbitmqctl` runs: over 2 s on a cold machine,
/// which is what made a fixed 2 s sleep end, and ack, before the close).
#[derive(Clone, Default)]
struct Stubborn {
    calls: Arc<Mutex<Vec<std::time::Instant>>>,
    finished: Arc<AtomicU64>,
    released: Arc<tokio::sync::Notify>,
    releases: Arc<AtomicU64>,
}

/// Bounds a stubborn call whose test failed before releasing it.
const STUBBORN_LIMIT: Duration = Duration::from_secs(60);

impl Stubborn {
    /// Lets calls up to the `n`th (counted from 1) return.
    fn release(&self, n: u64) {
        self.releases.fetch_max(n, Ordering::SeqCst);
        self.released.notify_waiters();
    }

    fn calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }

    async fn wait_finished(&self, n: u64) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + WAIT;
        while self.finished.load(Ordering::SeqCst) < n {
            anyhow::ensure!(std::time::Instant::now() < deadline, "call {n} never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

impl Handler for Stubborn {
    type Message = String;

    async fn handle(&self, _: String, _: &Context) -> Result<(), HandlerError> {
        let call = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(std::time::Instant::now());
            calls.len() as u64
        };
        let released = async {
            loop {
                let notified = self.released.notified();
                if self.releases.load(Ordering::SeqCst) >= call {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(STUBBORN_LIMIT, released).await;
        self.finished.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

/// A handler that ignores its context's signal keeps running across a connection loss: the
/// new generation does not wait for it, its result is dropped (the broker redelivered the
/// message), and its ack never reaches the new channel — where it would settle the
/// redelivered copy still running under the same delivery tag.
#[tokio::test]
async fn a_handler_ignoring_a_connection_loss_is_not_waited_for_and_its_result_dropped()
-> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let queue = unique_name("stubborn");
    broker.declare_queue(&queue).await?;
    let name = unique_name("conn-stubborn");
    let handler = Stubborn::default();
    let service = RunningService::spawn(
        Conejo::builder(amqp_url())
            .connection_name(&name)
            .reconnect_delay(Duration::from_millis(50), Duration::from_millis(200))
            .queue_with(&queue, handler.clone(), queue_config())
            .build()?,
    );
    let status = service.status().clone();
    let connection = conejo_tests::wait_for_connection_present(&name, WAIT).await?;
    broker.publish_bytes(&queue, b"job").await?;
    service.wait_for(&queue, WAIT, |s| s.in_flight == 1).await?;
    conejo_tests::rabbitmqctl_close_connection(&connection.name, "fault injection").await?;
    // The redelivered copy starts on the new connection while the first call still runs:
    // the new generation does not wait for it.
    let deadline = std::time::Instant::now() + WAIT;
    while handler.calls() < 2 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "never redelivered: {:?}; {} on the broker, {} unacked",
            service.stats().queue(&queue),
            broker.message_count(&queue).await?,
            conejo_tests::rabbitmqctl_queue_unacked(&queue).await?
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(handler.finished.load(Ordering::SeqCst), 0);
    assert_eq!(status.reconnects(), 1);
    // The first call ends: its result is dropped and counted, while the second call runs
    // under the same delivery tag on the new channel.
    handler.release(1);
    handler.wait_finished(1).await?;
    let stats = service
        .wait_for(&queue, WAIT, |s| s.late_settlements + s.ack_failures == 1)
        .await?;
    assert_eq!(stats.in_flight, 1, "{stats:?}");
    // Then the second is acked.
    handler.release(2);
    handler.wait_finished(2).await?;
    let stats = service.wait_for(&queue, WAIT, |s| s.in_flight == 0).await?;
    eprintln!("{stats:?}");
    assert_eq!(stats.late_settlements + stats.ack_failures, 1, "{stats:?}");
    assert_eq!(handler.calls(), 2, "a third call: {stats:?}");
    assert_eq!(status.reconnects(), 1);
    // The last ack may still linger a few milliseconds: poll the broker until it holds
    // nothing, ready or unacknowledged.
    let deadline = std::time::Instant::now() + WAIT;
    while broker.message_count(&queue).await? != 0
        || conejo_tests::rabbitmqctl_queue_unacked(&queue).await? != 0
    {
        anyhow::ensure!(std::time::Instant::now() < deadline, "left on the broker");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    service.stop().await??;
    assert_eq!(handler.calls(), 2);
    broker.delete_consumed_queue(&queue).await?;
    Ok(())
}

#[tokio::test]
async fn a_function_handler_can_ask_the_service_to_stop() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let queue = unique_name("fn-handler");
    broker.declare_queue(&queue).await?;
    broker.publish_bytes(&queue, b"hello").await?;
    broker.publish_bytes(&queue, b"stop").await?;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&seen);
    let service = RunningService::spawn(
        Conejo::builder(amqp_url())
            .queue_with(
                &queue,
                conejo::handler_fn(move |text: String, ctx: Context| {
                    let sink = Arc::clone(&sink);
                    async move {
                        if text == "stop" {
                            ctx.request_shutdown();
                        }
                        sink.lock().unwrap().push(text);
                        Ok(())
                    }
                }),
                queue_config().concurrency(1),
            )
            .build()?,
    );
    // The service stops by itself, cleanly, after acking both.
    service.join(WAIT).await??;
    assert_eq!(*seen.lock().unwrap(), vec!["hello", "stop"]);
    assert_eq!(broker.message_count(&queue).await?, 0);
    broker.delete_consumed_queue(&queue).await?;
    Ok(())
}

/// Workers start as the load needs them: a queue reaches its concurrency, never more.
#[tokio::test]
async fn the_concurrency_is_reached_and_never_exceeded() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let queue = unique_name("concurrency");
    broker.declare_queue(&queue).await?;
    for n in 0..40 {
        broker.publish_json(&queue, &n).await?;
    }
    let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (now, most) = (Arc::clone(&running), Arc::clone(&peak));
    let handler = conejo::handler_fn(move |_n: Json<u32>, _ctx: Context| {
        let (now, most) = (Arc::clone(&now), Arc::clone(&most));
        async move {
            use std::sync::atomic::Ordering::SeqCst;
            let at_once = now.fetch_add(1, SeqCst) + 1;
            most.fetch_max(at_once, SeqCst);
            // The work: long enough for the next deliveries to arrive meanwhile.
            tokio::time::sleep(Duration::from_millis(100)).await;
            now.fetch_sub(1, SeqCst);
            Ok::<(), HandlerError>(())
        }
    });
    let service = RunningService::spawn(
        Conejo::builder(amqp_url())
            .queue_with(&queue, handler, queue_config().concurrency(8).prefetch(40))
            .build()?,
    );
    service.wait_for(&queue, WAIT, |s| s.acked == 40).await?;
    service.stop().await??;
    assert_eq!(peak.load(std::sync::atomic::Ordering::SeqCst), 8);
    assert_eq!(broker.message_count(&queue).await?, 0);
    broker.delete_consumed_queue(&queue).await?;
    Ok(())
}

/// Order 0 runs until `release` fires or shutdown starts; every other order returns at once.
#[derive(Clone, Default)]
struct OneLong {
    release: Arc<tokio::sync::Notify>,
    handled: Arc<Mutex<HashMap<u64, u32>>>,
}

impl Handler for OneLong {
    type Message = Json<Order>;

    async fn handle(&self, Json(order): Json<Order>, ctx: &Context) -> Result<(), HandlerError> {
        if order.id == 0 {
            tokio::select! {
                () = self.release.notified() => {}
                () = ctx.shutdown_requested() => {}
            }
        }
        *self.handled.lock().unwrap().entry(order.id).or_default() += 1;
        Ok(())
    }
}

/// Publishes orders `ids` to `queue`.
async fn publish_orders(
    broker: &Broker,
    queue: &str,
    ids: std::ops::Range<u64>,
) -> anyhow::Result<()> {
    let bodies = ids
        .map(|id| {
            serde_json::to_vec(&Order {
                id,
                sku: "S".into(),
            })
            .unwrap()
        })
        .collect();
    broker.publish_many_bytes(queue, bodies).await
}

/// A queue whose order 0 runs on while 200 others are handled behind it, then 5,000 more
/// arrive: the service, consuming (acks of the 200 went one frame each, as the protocol
/// requires), and what was measured then.
async fn behind_a_long_delivery(
    broker: &Broker,
    queue: &str,
    handler: &OneLong,
) -> anyhow::Result<(RunningService, conejo::QueueStats)> {
    broker.declare_queue(queue).await?;
    publish_orders(broker, queue, 0..201).await?;
    let service = RunningService::spawn(
        Conejo::builder(amqp_url())
            .queue_with(
                queue,
                handler.clone(),
                queue_config().concurrency(16).prefetch(100),
            )
            .build()?,
    );
    let before = service.wait_for(queue, WAIT, |s| s.acked == 200).await?;
    publish_orders(broker, queue, 201..5201).await?;
    let after = service.wait_for(queue, WAIT, |s| s.acked == 5200).await?;
    // Behind order 0 each of the 5,000 would be a frame of its own on its channel. Once 256
    // deliveries passed it, the queue moved to a fresh channel, where acks coalesce (a
    // quarter of the prefetch a frame): about 256 + 100 buffered + 4,650 / 25 frames.
    let frames = after.ack_frames - before.ack_frames;
    eprintln!(
        "5,000 acks in {frames} frames; {} rotations",
        after.rotations
    );
    assert_eq!(after.rotations, 1, "{after:?}");
    assert!(frames * 5 <= 5000, "{frames} frames for 5,000 acks");
    // Order 0 is still held, on the retired channel; nothing else is.
    assert_eq!(
        conejo_tests::rabbitmqctl_queue_unacked(queue).await?,
        1,
        "unacknowledged broker-side"
    );
    assert_eq!(broker.message_count(queue).await?, 0);
    Ok((service, after))
}

/// Every order handled exactly once, none left on the broker, none failed.
async fn all_handled_once(
    broker: &Broker,
    queue: &str,
    handler: &OneLong,
    stats: &conejo::QueueStats,
) -> anyhow::Result<()> {
    assert_eq!(stats.acked, 5201, "{stats:?}");
    assert_eq!(
        stats.ack_failures + stats.requeued + stats.late_settlements,
        0
    );
    assert_eq!(broker.message_count(queue).await?, 0);
    assert_eq!(conejo_tests::rabbitmqctl_queue_unacked(queue).await?, 0);
    let handled = handler.handled.lock().unwrap().clone();
    assert_eq!(handled.len(), 5201);
    assert!(handled.values().all(|&n| n == 1));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_delivery_moves_the_queue_to_a_fresh_channel_and_acks_on_the_old_one()
-> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let queue = unique_name("rotation");
    let handler = OneLong::default();
    let (service, _) = behind_a_long_delivery(&broker, &queue, &handler).await?;
    // Order 0 ends: acked on the channel that delivered it, which then closes.
    handler.release.notify_one();
    let stats = service.wait_for(&queue, WAIT, |s| s.acked == 5201).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while conejo_tests::rabbitmqctl_queue_unacked(&queue).await? != 0 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "order 0 still unacked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    service.stop().await??;
    all_handled_once(&broker, &queue, &handler, &stats).await?;
    broker.delete_consumed_queue(&queue).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_the_deliveries_of_a_retired_channel_and_acks_them() -> anyhow::Result<()>
{
    init_tracing();
    let broker = Broker::connect().await?;
    let queue = unique_name("rotation-stop");
    let handler = OneLong::default();
    let (service, _) = behind_a_long_delivery(&broker, &queue, &handler).await?;
    // Order 0 ends when shutdown starts; its ack goes out on its retired channel before the
    // connection closes.
    let stats = service.stats().clone();
    service.stop().await??;
    let stats = stats.queue(&queue).context("queue stats")?;
    all_handled_once(&broker, &queue, &handler, &stats).await?;
    broker.delete_consumed_queue(&queue).await?;
    Ok(())
}
