//! A queue's channel under a running service: a consumer the broker cancels (its queue
//! deleted) is consumed again on a new channel while the handlers of the old one finish and
//! are acked there, and a queue held up by a long delivery moves to a fresh channel.
//!
//! A channel the broker closes (a `consumer_timeout`) needs a private node configured for it:
//! that test is in `resilience`.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use conejo::{Conejo, Context, Handler, HandlerError, Json};
use conejo_tests::{RunningService, Scenario, amqp_url, queue_config};

use crate::handlers::{HeldUntilReleased, Order, RecordsOrders, publish_orders};

const WAIT: Duration = Duration::from_secs(20);

/// A broker-side consumer cancel is not a dead channel: a handler running when its queue is
/// deleted finishes and is acked on its old channel (no late, dropped or failed result),
/// while the queue, declared again, is consumed on a new one.
#[tokio::test]
async fn a_handler_running_through_a_consumer_cancel_is_acked_on_its_channel() -> anyhow::Result<()>
{
    let scenario = Scenario::new("cancelled").await?;
    let Scenario { broker, queue } = &scenario;
    let handler = HeldUntilReleased::default();
    let service = scenario.spawn(
        Conejo::builder(amqp_url())
            .reconnect_delay(Duration::from_millis(50), Duration::from_millis(200))
            .queue_with(queue, handler.clone(), queue_config()),
    )?;
    broker.wait_for_consumer_count(queue, 1, WAIT).await?;
    broker.publish_bytes(queue, b"running").await?;
    service.wait_for(queue, WAIT, |s| s.in_flight == 1).await?;
    // The first call runs until it is released; meanwhile the queue is deleted, the broker
    // cancels the consumer, and conejo declares the queue again and consumes it.
    broker.delete_queue(queue).await?;
    broker.wait_for_consumer_count(queue, 1, WAIT).await?;
    broker.publish_bytes(queue, b"after").await?;
    // Only now may the calls return: the first on its old channel, the second ("after") on
    // the new one.
    assert_eq!(handler.finished.load(Ordering::SeqCst), 0);
    handler.release(2);
    let stats = service
        .wait_for(queue, WAIT, |s| s.acked == 2 && s.in_flight == 0)
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
    assert_eq!(broker.message_count(queue).await?, 0);
    scenario.cleanup().await
}

#[tokio::test]
async fn a_deleted_queue_is_declared_and_consumed_again() -> anyhow::Result<()> {
    let scenario = Scenario::new("deleted").await?;
    let Scenario { broker, queue } = &scenario;
    let recorder = RecordsOrders::default();
    let service = scenario.spawn(
        Conejo::builder(amqp_url())
            .reconnect_delay(Duration::from_millis(50), Duration::from_millis(200))
            .queue_with(queue, recorder.clone(), queue_config()),
    )?;
    broker.wait_for_consumer_count(queue, 1, WAIT).await?;
    broker.delete_queue(queue).await?;
    // The broker cancels the consumer; conejo declares the queue again and consumes it.
    broker.wait_for_consumer_count(queue, 1, WAIT).await?;
    broker
        .publish_json(
            queue,
            &Order {
                id: 1,
                sku: "S".into(),
            },
        )
        .await?;
    service.wait_for(queue, WAIT, |s| s.acked == 1).await?;
    assert!(!service.is_finished());
    service.stop().await??;
    assert_eq!(recorder.seen().len(), 1);
    scenario.cleanup().await
}

/// Order 0 runs until `release` fires or shutdown starts; every other order returns at once.
#[derive(Clone, Default)]
struct HoldsOrderZero {
    release: Arc<tokio::sync::Notify>,
    handled: Arc<Mutex<HashMap<u64, u32>>>,
}

impl Handler for HoldsOrderZero {
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

/// A queue whose order 0 runs on while 200 others are handled behind it, then 5,000 more
/// arrive: the service, consuming (acks of the 200 went one frame each, as the protocol
/// requires), and what was measured then.
async fn behind_a_long_delivery(
    scenario: &Scenario,
    handler: &HoldsOrderZero,
) -> anyhow::Result<(RunningService, conejo::QueueStats)> {
    let Scenario { broker, queue } = scenario;
    publish_orders(broker, queue, 0..201).await?;
    let service = scenario.spawn(Conejo::builder(amqp_url()).queue_with(
        queue,
        handler.clone(),
        queue_config().concurrency(16).prefetch(100),
    ))?;
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
    // At least the one move order 0 caused. On a busy two-core machine a delivery on the
    // fresh channel may also wait unscheduled while 256 others pass it (its worker thread
    // preempted, its task in that thread's unstealable LIFO slot): a real outlier too, which
    // moves the queue again, rightly. Measured in CI once: 2 moves.
    assert!(after.rotations >= 1, "{after:?}");
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
    scenario: &Scenario,
    handler: &HoldsOrderZero,
    stats: &conejo::QueueStats,
) -> anyhow::Result<()> {
    let Scenario { broker, queue } = scenario;
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
    let scenario = Scenario::new("rotation").await?;
    let queue = &scenario.queue;
    let handler = HoldsOrderZero::default();
    let (service, _) = behind_a_long_delivery(&scenario, &handler).await?;
    // Order 0 ends: acked on the channel that delivered it, which then closes.
    handler.release.notify_one();
    let stats = service.wait_for(queue, WAIT, |s| s.acked == 5201).await?;
    let deadline = tokio::time::Instant::now() + WAIT;
    while conejo_tests::rabbitmqctl_queue_unacked(queue).await? != 0 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "order 0 still unacked"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    service.stop().await??;
    all_handled_once(&scenario, &handler, &stats).await?;
    scenario.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_the_deliveries_of_a_retired_channel_and_acks_them() -> anyhow::Result<()>
{
    let scenario = Scenario::new("rotation-stop").await?;
    let handler = HoldsOrderZero::default();
    let (service, _) = behind_a_long_delivery(&scenario, &handler).await?;
    // Order 0 ends when shutdown starts; its ack goes out on its retired channel before the
    // connection closes.
    let stats = service.stats().clone();
    service.stop().await??;
    let stats = stats.queue(&scenario.queue).context("queue stats")?;
    all_handled_once(&scenario, &handler, &stats).await?;
    scenario.cleanup().await
}
