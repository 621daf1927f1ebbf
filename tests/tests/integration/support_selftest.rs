//! Real-broker tests of the test-support library itself (`conejo_tests`).
//!
//! Each test uses unique queue/connection names and deletes its queues, so the
//! tests can run in parallel against a shared broker.

use conejo_tests::lapin::options::{BasicGetOptions, BasicRejectOptions};
use conejo_tests::lapin::{Connection, ConnectionProperties};
use conejo_tests::{
    Broker, ConnectionWatch, always_same_connection, amqp_url, find_connection_async,
    first_absence_after_presence, init_tracing, rabbitmqctl_close_connection,
    rabbitmqctl_connections, unique_name, wait_for_connection_absent, wait_for_connection_present,
};
use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Job {
    n: u32,
    label: String,
}

async fn named_connection(name: &str) -> anyhow::Result<Connection> {
    Ok(Connection::connect(
        &amqp_url(),
        ConnectionProperties::default().with_connection_name(name.into()),
    )
    .await?)
}

#[tokio::test]
async fn publish_and_drain_round_trip_keeps_message_ids() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let queue = unique_name("selftest.roundtrip");
    broker.declare_queue(&queue).await?;

    let mut ids = Vec::new();
    for n in 0..3 {
        let job = Job {
            n,
            label: format!("job-{n}"),
        };
        ids.push(broker.publish_json(&queue, &job).await?);
    }
    ids.push(broker.publish_bytes(&queue, b"raw bytes").await?);
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(
        unique.len(),
        ids.len(),
        "message ids must be unique: {ids:?}"
    );

    broker.wait_for_count(&queue, 4, WAIT).await?;
    let drained = broker.drain(&queue).await?;
    assert_eq!(drained.len(), 4);
    let drained_ids: Vec<_> = drained.iter().map(|m| m.message_id.clone()).collect();
    assert_eq!(
        drained_ids,
        ids.iter().cloned().map(Some).collect::<Vec<_>>()
    );
    for (n, msg) in (0u32..).zip(&drained[..3]) {
        assert!(!msg.redelivered);
        assert_eq!(msg.content_type.as_deref(), Some("application/json"));
        assert_eq!(
            msg.json::<Job>()?,
            Job {
                n,
                label: format!("job-{n}")
            }
        );
    }
    assert_eq!(drained[3].body, b"raw bytes");
    assert_eq!(drained[3].content_type, None);
    assert_eq!(broker.message_count(&queue).await?, 0);

    broker.delete_queue(&queue).await?;
    broker.close().await
}

#[tokio::test]
async fn counts_purge_and_missing_queues() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let queue = unique_name("selftest.counts");
    broker.declare_queue(&queue).await?;
    assert_eq!(broker.message_count(&queue).await?, 0);
    assert_eq!(broker.consumer_count(&queue).await?, 0);

    for i in 0..5u8 {
        broker.publish_bytes(&queue, &[i]).await?;
    }
    // Confirmed publishes are enqueued: the count is exact right away.
    assert_eq!(broker.message_count(&queue).await?, 5);

    let bodies = (0..1000u32).map(|i| i.to_be_bytes().to_vec()).collect();
    broker.publish_many_bytes(&queue, bodies).await?;
    assert_eq!(broker.message_count(&queue).await?, 1005);
    broker.wait_for_count(&queue, 1005, WAIT).await?;

    // A wrong expectation times out with the last seen count in the error.
    let err = broker
        .wait_for_count(&queue, 7, Duration::from_millis(200))
        .await
        .expect_err("count is 1005, not 7");
    assert!(format!("{err:#}").contains("last seen 1005"), "{err:#}");

    assert_eq!(broker.purge(&queue).await?, 1005);
    assert_eq!(broker.message_count(&queue).await?, 0);

    // Missing queues: counting fails (the ops channel is closed by the broker
    // with 404 and transparently reopened), deleting is a no-op, publishing is
    // reported as unroutable.
    let missing = unique_name("selftest.missing");
    let err = broker
        .message_count(&missing)
        .await
        .expect_err("no such queue");
    assert!(format!("{err:#}").contains("NOT_FOUND"), "{err:#}");
    broker.delete_queue(&missing).await?;
    let err = broker
        .publish_bytes(&missing, b"x")
        .await
        .expect_err("unroutable");
    assert!(format!("{err:#}").contains("unroutable"), "{err:#}");
    // Everything still works afterwards.
    broker.publish_bytes(&queue, b"after").await?;
    assert_eq!(broker.message_count(&queue).await?, 1);

    broker.delete_queue(&queue).await?;
    broker.delete_queue(&queue).await?; // idempotent
    broker.close().await
}

#[tokio::test]
async fn rejected_message_lands_in_the_dead_letter_queue() -> anyhow::Result<()> {
    init_tracing();
    let broker = Broker::connect().await?;
    let queue = unique_name("selftest.dlx");
    let dlq = broker.declare_dead_lettered_queue(&queue).await?;
    assert_eq!(dlq, format!("{queue}.dlq"));
    // Re-declaring with the same arguments is fine.
    assert_eq!(broker.declare_dead_lettered_queue(&queue).await?, dlq);

    let id = broker
        .publish_json(
            &queue,
            &Job {
                n: 7,
                label: "poison".into(),
            },
        )
        .await?;
    broker.wait_for_count(&queue, 1, WAIT).await?;

    let channel = broker.open_channel().await?;
    let got = channel
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: false })
        .await?
        .expect("one message is ready");
    got.delivery
        .acker
        .reject(BasicRejectOptions { requeue: false })
        .await?;

    broker.wait_for_count(&dlq, 1, WAIT).await?;
    assert_eq!(broker.message_count(&queue).await?, 0);
    let dead = broker.drain(&dlq).await?;
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message_id.as_deref(), Some(id.as_str()));
    assert_eq!(dead[0].json::<Job>()?.n, 7);
    let deaths = dead[0].x_death();
    assert_eq!(deaths.len(), 1, "{:?}", dead[0].headers);
    assert_eq!(deaths[0].queue, queue);
    assert_eq!(deaths[0].reason, "rejected");
    assert_eq!(deaths[0].count, 1);
    assert_eq!(deaths[0].routing_keys, vec![queue.clone()]);
    assert_eq!(
        dead[0].header_str("x-first-death-reason").as_deref(),
        Some("rejected")
    );

    drop(channel);
    broker.delete_queues(&[&queue, &dlq]).await?;
    broker.close().await
}

#[tokio::test]
async fn rabbitmqctl_sees_a_named_connection_until_it_closes() -> anyhow::Result<()> {
    init_tracing();
    let name = unique_name("selftest.conn");
    let conn = named_connection(&name).await?;

    let seen = wait_for_connection_present(&name, WAIT).await?;
    assert_eq!(seen.connection_name.as_deref(), Some(name.as_str()));
    assert_eq!(seen.state, "running");
    assert!(
        seen.name.contains(" -> "),
        "broker-side name: {}",
        seen.name
    );

    // The blocking variant sees the same connection.
    let all = tokio::task::spawn_blocking(rabbitmqctl_connections).await??;
    assert!(all.iter().any(|c| c == &seen), "{seen:?} not in {all:?}");

    conn.close(200, "bye".into()).await?;
    wait_for_connection_absent(&name, WAIT).await?;
    assert_eq!(find_connection_async(&name).await?, None);
    Ok(())
}

#[tokio::test]
async fn connection_watch_records_presence_then_absence() -> anyhow::Result<()> {
    init_tracing();
    let name = unique_name("selftest.watch");
    let conn = named_connection(&name).await?;
    let broker_name = wait_for_connection_present(&name, WAIT).await?.name;

    let watch = ConnectionWatch::start(&name, Duration::from_secs(60));
    let deadline = Instant::now() + WAIT;
    while watch.snapshot().len() < 3 {
        assert!(Instant::now() < deadline, "watch recorded too little");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        always_same_connection(&watch.snapshot()),
        Ok(broker_name.clone())
    );

    conn.close(200, "bye".into()).await?;
    let deadline = Instant::now() + WAIT;
    while first_absence_after_presence(&watch.snapshot()).is_none() {
        assert!(Instant::now() < deadline, "watch never saw the close");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = watch.stop_report();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    let observations = report.observations;
    assert!(observations.windows(2).all(|w| w[0].at <= w[1].at));
    let absent_at = first_absence_after_presence(&observations).expect("absence recorded");
    if let (Some(first), Some(last)) = (observations.first(), observations.last()) {
        println!(
            "watch: {} observations, mean spacing {:?}, absence seen at {absent_at:?}",
            observations.len(),
            (last.since_start - first.since_start) / (observations.len().max(2) as u32 - 1)
        );
    }
    assert!(absent_at > Duration::ZERO);
    let err = always_same_connection(&observations).expect_err("it went away");
    assert!(err.contains("absent"), "{err}");
    Ok(())
}

#[tokio::test]
async fn connection_watch_stops_by_itself_after_max_duration() -> anyhow::Result<()> {
    let name = unique_name("selftest.watch-max");
    let watch = ConnectionWatch::start(&name, Duration::from_millis(500));
    let deadline = Instant::now() + WAIT;
    while !watch.is_finished() {
        assert!(Instant::now() < deadline, "watch did not stop by itself");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let observations = watch.stop();
    assert!(!observations.is_empty());
    assert!(observations.iter().all(|o| o.connection.is_none()));
    assert!(always_same_connection(&observations).is_err());
    assert_eq!(first_absence_after_presence(&observations), None);
    Ok(())
}

#[tokio::test]
async fn rabbitmqctl_can_force_close_a_client_connection() -> anyhow::Result<()> {
    init_tracing();
    let name = unique_name("selftest.kill");
    let conn = named_connection(&name).await?;
    let seen = wait_for_connection_present(&name, WAIT).await?;

    rabbitmqctl_close_connection(&seen.name, "selftest").await?;
    wait_for_connection_absent(&name, WAIT).await?;
    let deadline = Instant::now() + WAIT;
    while conn.status().connected() {
        assert!(Instant::now() < deadline, "lapin did not notice the close");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Prefills 20,000 messages of ~100 bytes (the benchmark prefills 200,000) with `publish_many_bytes` and
/// prints the rate (visible with `--nocapture` / `--no-capture`).
#[tokio::test]
async fn bulk_prefill_of_20k_messages() -> anyhow::Result<()> {
    init_tracing();
    const COUNT: usize = 20_000;
    let broker = Broker::connect().await?;
    let queue = unique_name("selftest.prefill");
    broker.declare_queue(&queue).await?;
    let bodies: Vec<Vec<u8>> = (0..COUNT)
        .map(|i| format!("{{\"seq\":{i:08},\"pad\":\"{}\"}}", "x".repeat(75)).into_bytes())
        .collect();
    assert_eq!(bodies[0].len(), 100);

    let start = Instant::now();
    broker.publish_many_bytes(&queue, bodies).await?;
    let elapsed = start.elapsed();
    let count = broker.message_count(&queue).await?;
    println!(
        "prefill: {COUNT} messages of 100 bytes in {elapsed:.2?} = {:.0} msg/s (queue reports {count})",
        COUNT as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(count as usize, COUNT);

    broker.delete_queue(&queue).await?;
    broker.close().await
}
