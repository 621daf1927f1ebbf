//! Startup and configuration errors: what a service that cannot start says — a missing or
//! conflicting queue, a missing dead-letter exchange, an unreachable broker, refused
//! credentials — and the list of addresses a failing-fast start still tries.
//!
//! `Conejo::check`, which reports the same errors without consuming, is tested in `config`.

use std::time::Duration;

use anyhow::Context as _;
use conejo::{Conejo, Error, QueueConfig};
use conejo_tests::{Scenario, amqp_url, init_tracing, queue_config, unique_name};

use crate::handlers::{Order, RecordsOrders};

const WAIT: Duration = Duration::from_secs(20);

#[tokio::test]
async fn a_missing_queue_declared_passive_is_a_clear_error() -> anyhow::Result<()> {
    init_tracing();
    let queue = unique_name("missing");
    let name = unique_name("conn-missing");
    let result = Conejo::builder(amqp_url())
        .connection_name(&name)
        .queue_with(
            &queue,
            RecordsOrders::default(),
            QueueConfig::new().passive(),
        )
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
    let scenario = Scenario::new("conflict").await?; // declared non-durable
    let queue = &scenario.queue;
    let result = Conejo::builder(amqp_url())
        .queue_with(queue, RecordsOrders::default(), QueueConfig::new()) // durable
        .build()?
        .run_until(std::future::pending())
        .await;
    let err = result.expect_err("a durable declaration of a transient queue must fail");
    assert_eq!(err.queue(), Some(queue.as_str()));
    assert!(err.to_string().contains("PRECONDITION_FAILED"), "{err}");
    scenario.cleanup().await
}

#[tokio::test]
async fn a_missing_dead_letter_exchange_is_a_startup_error() -> anyhow::Result<()> {
    let scenario = Scenario::undeclared("no-dlx").await?;
    let queue = &scenario.queue;
    let exchange = unique_name("missing-dlx");
    let result = Conejo::builder(amqp_url())
        .queue_with(
            queue,
            RecordsOrders::default(),
            queue_config().dead_letter_exchange(&exchange),
        )
        .build()?
        .run_until(std::future::pending())
        .await;
    match result {
        Err(Error::DeadLetterExchangeNotFound {
            queue: q,
            exchange: x,
        }) => assert_eq!((q, x), (queue.clone(), exchange)),
        other => panic!("expected DeadLetterExchangeNotFound, got {other:?}"),
    }
    scenario.cleanup().await
}

#[tokio::test]
async fn an_unreachable_broker_is_an_error_without_the_password() -> anyhow::Result<()> {
    // Port 1 on loopback: nothing listens there.
    let result = Conejo::builder("amqp://app:very-secret@127.0.0.1:1/%2f")
        .wait_for_broker(false)
        .queue_with("q", RecordsOrders::default(), QueueConfig::new())
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
    let scenario = Scenario::new("fail-fast-list").await?;
    let Scenario { broker, queue } = &scenario;
    // The first address of the list has nothing listening: port 1 on loopback.
    let recorder = RecordsOrders::default();
    let service = scenario.spawn(
        Conejo::builder(format!("amqp://guest:guest@127.0.0.1:1/%2f,{}", amqp_url()))
            .wait_for_broker(false)
            .queue_with(queue, recorder.clone(), queue_config()),
    )?;
    let order = Order {
        id: 1,
        sku: "SKU-1".into(),
    };
    broker.publish_json(queue, &order).await?;
    service.wait_for(queue, WAIT, |s| s.acked == 1).await?;
    assert_eq!(recorder.seen().len(), 1);
    scenario.finish(service).await
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
            .queue_with("q", RecordsOrders::default(), QueueConfig::new())
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
