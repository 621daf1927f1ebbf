//! A connection the broker closes under a running service, on the shared broker: conejo
//! opens a new one and loses nothing, and a handler that ignores the loss is not waited for
//! and its result is dropped.
//!
//! Faults that need a broker of the test's own (a node restarted or killed, a cluster, a
//! stalled network, refused credentials on a reconnection) are in `resilience`.

use std::{sync::atomic::Ordering, time::Duration};

use conejo::Conejo;
use conejo_tests::{Scenario, amqp_url, queue_config, unique_name};

use crate::handlers::{FinishesOutOfOrder, HeldUntilReleased, publish_orders};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_connection_closed_by_the_broker_is_reopened_and_loses_nothing() -> anyhow::Result<()> {
    let scenario = Scenario::new("forced").await?;
    let Scenario { broker, queue } = &scenario;
    let name = unique_name("conn-forced");
    const N: u64 = 12_000;
    publish_orders(broker, queue, 0..N).await?;
    // 4 at a time, 0–3 ms each: about 1,500 messages a second, so the close (rabbitmqctl
    // takes a second or two to start) comes mid-stream
    let handler = FinishesOutOfOrder::default();
    let service = scenario.spawn(
        Conejo::builder(amqp_url())
            .connection_name(&name)
            // acks linger long, so some are waiting when the connection goes
            .ack_linger(Duration::from_millis(200))
            .queue_with(queue, handler.clone(), queue_config().concurrency(4)),
    )?;
    let status = service.status().clone();
    let connection = conejo_tests::wait_for_connection_present(&name, WAIT).await?;
    service.wait_for(queue, WAIT, |s| s.acked >= N / 10).await?;
    conejo_tests::rabbitmqctl_close_connection(&connection.name, "fault injection").await?;
    let acked_before = service.stats().queue(queue).unwrap().acked;
    anyhow::ensure!(
        acked_before < N,
        "the stream ended before the fault: nothing tested"
    );

    // Every message handled at least once; the queue ends empty; the service never stopped.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let handled = handler.handled.lock().unwrap().len() as u64;
        if handled == N && broker.message_count(queue).await? == 0 && status.is_ready() {
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
    let stats = service.stats().queue(queue).unwrap();
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
    scenario.cleanup().await
}

/// A handler that ignores its context's signal keeps running across a connection loss: the
/// new generation does not wait for it, its result is dropped (the broker redelivered the
/// message), and its ack never reaches the new channel — where it would settle the
/// redelivered copy still running under the same delivery tag.
#[tokio::test]
async fn a_handler_ignoring_a_connection_loss_is_not_waited_for_and_its_result_dropped()
-> anyhow::Result<()> {
    let scenario = Scenario::new("stubborn").await?;
    let Scenario { broker, queue } = &scenario;
    let name = unique_name("conn-stubborn");
    let handler = HeldUntilReleased::default();
    let service = scenario.spawn(
        Conejo::builder(amqp_url())
            .connection_name(&name)
            .reconnect_delay(Duration::from_millis(50), Duration::from_millis(200))
            .queue_with(queue, handler.clone(), queue_config()),
    )?;
    let status = service.status().clone();
    let connection = conejo_tests::wait_for_connection_present(&name, WAIT).await?;
    broker.publish_bytes(queue, b"job").await?;
    service.wait_for(queue, WAIT, |s| s.in_flight == 1).await?;
    conejo_tests::rabbitmqctl_close_connection(&connection.name, "fault injection").await?;
    // The redelivered copy starts on the new connection while the first call still runs:
    // the new generation does not wait for it.
    let deadline = std::time::Instant::now() + WAIT;
    while handler.calls() < 2 {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "never redelivered: {:?}; {} on the broker, {} unacked",
            service.stats().queue(queue),
            broker.message_count(queue).await?,
            conejo_tests::rabbitmqctl_queue_unacked(queue).await?
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
        .wait_for(queue, WAIT, |s| s.late_settlements + s.ack_failures == 1)
        .await?;
    assert_eq!(stats.in_flight, 1, "{stats:?}");
    // Then the second is acked.
    handler.release(2);
    handler.wait_finished(2).await?;
    let stats = service.wait_for(queue, WAIT, |s| s.in_flight == 0).await?;
    eprintln!("{stats:?}");
    assert_eq!(stats.late_settlements + stats.ack_failures, 1, "{stats:?}");
    assert_eq!(handler.calls(), 2, "a third call: {stats:?}");
    assert_eq!(status.reconnects(), 1);
    // The last ack may still linger a few milliseconds: poll the broker until it holds
    // nothing, ready or unacknowledged.
    let deadline = std::time::Instant::now() + WAIT;
    while broker.message_count(queue).await? != 0
        || conejo_tests::rabbitmqctl_queue_unacked(queue).await? != 0
    {
        anyhow::ensure!(std::time::Instant::now() < deadline, "left on the broker");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    service.stop().await??;
    assert_eq!(handler.calls(), 2);
    scenario.cleanup().await
}
