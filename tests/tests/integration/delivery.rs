//! Messages in, outcomes out: acks, retries, rejects, decode failures and panics, acks of
//! out-of-order completions, the concurrency bound, checked on the broker's side.
//!
//! What a service that cannot start says is in `startup`; a lost channel or connection in
//! `channels`, `connections` and `resilience`; the failures' retries and dead letters in
//! detail in `failures`.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use conejo::{Conejo, Context, Handler, HandlerError, Json, Outcome, RetryPolicy};
use conejo_tests::{Scenario, amqp_url, queue_config};

use crate::handlers::{FinishesOutOfOrder, Order, RecordsOrders, publish_orders};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn typed_messages_are_handled_once_and_acked() -> anyhow::Result<()> {
    let scenario = Scenario::new("typed").await?;
    let Scenario { broker, queue } = &scenario;
    let mut ids = Vec::new();
    for n in 0..50 {
        let order = Order {
            id: n,
            sku: format!("SKU-{n}"),
        };
        ids.push(broker.publish_json(queue, &order).await?);
    }

    let recorder = RecordsOrders::default();
    let service = scenario.spawn(Conejo::builder(amqp_url()).queue_with(
        queue,
        recorder.clone(),
        queue_config().concurrency(4),
    ))?;
    service.wait_for(queue, WAIT, |s| s.acked == 50).await?;
    service.stop().await??;
    // Nothing unacked, nothing ready: the broker holds no message of the queue.
    assert_eq!(broker.message_count(queue).await?, 0);

    let seen = recorder.seen();
    assert_eq!(seen.len(), 50, "each message handled exactly once");
    let mut seen_ids: Vec<_> = seen.iter().map(|(id, _, _)| id.clone()).collect();
    seen_ids.sort();
    ids.sort();
    assert_eq!(seen_ids, ids);
    assert!(seen.iter().all(|(_, redelivered, _)| !redelivered));
    scenario.cleanup().await
}

/// Per message id: (attempt, redelivered) of each call.
type Attempts = HashMap<String, Vec<(u32, bool)>>;

/// Fails the first attempt at every message (`?` on an error: retry), succeeds on the next.
#[derive(Clone, Default)]
struct FailsFirstAttempt {
    attempts: Arc<Mutex<Attempts>>,
}

impl Handler for FailsFirstAttempt {
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
    let scenario = Scenario::new("retry").await?;
    let Scenario { broker, queue } = &scenario;
    let a = broker.publish_bytes(queue, b"first").await?;
    let b = broker.publish_bytes(queue, b"second").await?;

    let handler = FailsFirstAttempt::default();
    let service = scenario.spawn(Conejo::builder(amqp_url()).queue_with(
        queue,
        handler.clone(),
        queue_config().retry(RetryPolicy::default().initial_delay(Duration::from_millis(50))),
    ))?;
    // 2 failed deliveries acked once their retry copy was confirmed, 2 successes
    let stats = service.wait_for(queue, WAIT, |s| s.acked == 4).await?;
    service.stop().await??;
    assert_eq!(stats.retried, 2);
    assert_eq!(stats.handler_errors, 2);
    assert_eq!(stats.dead_lettered, 0);
    assert_eq!(broker.message_count(queue).await?, 0);
    let attempts = handler.attempts.lock().unwrap().clone();
    // a retry is a new copy: counted by conejo, not redelivered by the broker
    assert_eq!(attempts[&a], vec![(1, false), (2, false)]);
    assert_eq!(attempts[&b], vec![(1, false), (2, false)]);
    scenario.cleanup().await
}

/// Rejects orders without a SKU, panics on id 13, accepts the rest.
#[derive(Clone, Default)]
struct RejectsOrPanics {
    accepted: Arc<AtomicU64>,
}

impl Handler for RejectsOrPanics {
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
    let scenario = Scenario::undeclared("reject").await?;
    let Scenario { broker, queue } = &scenario;
    let dlq = format!("{queue}.dlq");

    // conejo declares the queue, and its dead-letter exchange and queue.
    let handler = RejectsOrPanics::default();
    let service = scenario.spawn(Conejo::builder(amqp_url()).queue_with(
        queue,
        handler.clone(),
        queue_config().concurrency(1),
    ))?;
    broker.wait_for_consumer_count(queue, 1, WAIT).await?;

    let malformed = broker
        .publish_bytes(queue, b"{\"id\": 1, \"sku\": ")
        .await?;
    let wrong_type = broker
        .publish_bytes(queue, br#"{"id": "one", "sku": "x"}"#)
        .await?;
    let no_sku = broker
        .publish_json(
            queue,
            &Order {
                id: 2,
                sku: String::new(),
            },
        )
        .await?;
    let panics = broker
        .publish_json(
            queue,
            &Order {
                id: 13,
                sku: "X".into(),
            },
        )
        .await?;
    let good = broker
        .publish_json(
            queue,
            &Order {
                id: 3,
                sku: "Y".into(),
            },
        )
        .await?;

    let stats = service
        .wait_for(queue, WAIT, |s| s.acked == 5 && s.dead_lettered == 4)
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

    assert_eq!(broker.message_count(queue).await?, 0);
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
    scenario.cleanup().await
}

#[tokio::test]
async fn a_custom_failure_policy_decides_the_outcome() -> anyhow::Result<()> {
    let scenario = Scenario::new("policy").await?;
    let Scenario { broker, queue } = &scenario;
    broker.publish_bytes(queue, b"not json").await?;

    // Decode failures are acked (dropped) by this policy instead of dead-lettered.
    let service = scenario.spawn(Conejo::builder(amqp_url()).queue_with(
        queue,
        RecordsOrders::default(),
        queue_config().on_failure(|failure, _ctx| match failure {
            conejo::Failure::Decode(_) => Outcome::Ack,
            other => other.default_outcome(),
        }),
    ))?;
    let stats = service.wait_for(queue, WAIT, |s| s.acked == 1).await?;
    service.stop().await??;
    assert_eq!((stats.decode_failures, stats.dead_lettered), (1, 0));
    assert_eq!(broker.message_count(queue).await?, 0);
    scenario.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_completions_are_all_acked_exactly_once() -> anyhow::Result<()> {
    let scenario = Scenario::new("coalesce").await?;
    let Scenario { broker, queue } = &scenario;
    const N: u64 = 3000;
    publish_orders(broker, queue, 0..N).await?;
    broker.wait_for_count(queue, N as u32, WAIT).await?;

    let handler = FinishesOutOfOrder::default();
    let service = scenario.spawn(Conejo::builder(amqp_url()).queue_with(
        queue,
        handler.clone(),
        queue_config().concurrency(64).prefetch(100),
    ))?;
    let stats = service
        .wait_for(queue, Duration::from_secs(60), |s| s.acked == N)
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
    assert_eq!(broker.message_count(queue).await?, 0);
    let handled = handler.handled.lock().unwrap().clone();
    assert_eq!(handled.len() as u64, N);
    assert!(handled.values().all(|&n| n == 1));
    scenario.cleanup().await
}

#[tokio::test(flavor = "current_thread")]
async fn works_on_a_current_thread_runtime() -> anyhow::Result<()> {
    let scenario = Scenario::new("current-thread").await?;
    let Scenario { broker, queue } = &scenario;
    for id in 0..10 {
        broker
            .publish_json(
                queue,
                &Order {
                    id,
                    sku: "S".into(),
                },
            )
            .await?;
    }
    let recorder = RecordsOrders::default();
    let service = scenario.spawn(Conejo::builder(amqp_url()).queue_with(
        queue,
        recorder.clone(),
        queue_config(),
    ))?;
    service.wait_for(queue, WAIT, |s| s.acked == 10).await?;
    service.stop().await??;
    assert_eq!(recorder.seen().len(), 10);
    assert_eq!(broker.message_count(queue).await?, 0);
    scenario.cleanup().await
}

/// Workers start as the load needs them: a queue reaches its concurrency, never more.
#[tokio::test]
async fn the_concurrency_is_reached_and_never_exceeded() -> anyhow::Result<()> {
    let scenario = Scenario::new("concurrency").await?;
    let Scenario { broker, queue } = &scenario;
    for n in 0..40 {
        broker.publish_json(queue, &n).await?;
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
    let service = scenario.spawn(Conejo::builder(amqp_url()).queue_with(
        queue,
        handler,
        queue_config().concurrency(8).prefetch(40),
    ))?;
    service.wait_for(queue, WAIT, |s| s.acked == 40).await?;
    service.stop().await??;
    assert_eq!(peak.load(std::sync::atomic::Ordering::SeqCst), 8);
    assert_eq!(broker.message_count(queue).await?, 0);
    scenario.cleanup().await
}
