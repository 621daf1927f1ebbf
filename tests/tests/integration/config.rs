//! Configuration from a file and the environment, and `Conejo::check`, against the broker.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use conejo::{Conejo, Context, Error, Exchange, Handler, HandlerError, QueueConfig, settings};
use conejo_tests::{
    Scenario, amqp_url, init_tracing, queue_config, rabbitmqctl_consumer_prefetch, unique_name,
};
use tokio::sync::Semaphore;

use crate::handlers::AcksEverything;

const WAIT: Duration = Duration::from_secs(20);

/// Holds each message until the test hands out a permit.
#[derive(Clone)]
struct WaitsForPermits(Arc<Semaphore>);

impl Handler for WaitsForPermits {
    type Message = Vec<u8>;

    async fn handle(&self, _: Vec<u8>, _: &Context) -> Result<(), HandlerError> {
        self.0.acquire().await?.forget();
        Ok(())
    }
}

/// A TOML file in the temporary directory, removed on drop.
struct TempFile(std::path::PathBuf);

impl TempFile {
    fn new(text: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}.toml", unique_name("conejo-config")));
        std::fs::write(&path, text).unwrap();
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn a_service_configured_by_file_and_environment_consumes_with_their_prefetch()
-> anyhow::Result<()> {
    let scenario = Scenario::undeclared("config.prefetch").await?;
    let Scenario { broker, queue } = &scenario;
    let name = unique_name("config-service");
    // The file says prefetch 7 and concurrency 2; the environment says prefetch 5, and wins.
    let file = TempFile::new(&format!(
        "connection_name = \"{name}\"\nshutdown_timeout = \"2s\"\n\
         [queues.\"{queue}\"]\nprefetch = 7\nconcurrency = 2\n"
    ));
    let env = [
        ("CONEJO_URL".to_owned(), amqp_url()),
        (
            format!("CONEJO_QUEUES__{}__PREFETCH", settings::env_name(queue)),
            "5".to_owned(),
        ),
        ("HOME".to_owned(), "/ignored".to_owned()),
    ];
    let settings = settings::Settings::load_from(Some(&file.0), env)?;
    let gate = WaitsForPermits(Arc::new(Semaphore::new(0)));
    let running = scenario.spawn(Conejo::builder_from(&settings).queue_with(
        queue,
        gate.clone(),
        queue_config(),
    ))?;
    broker.wait_for_consumer_count(queue, 1, WAIT).await?;
    // rabbitmqctl may list the consumer a moment after the queue counts it.
    let deadline = std::time::Instant::now() + WAIT;
    let prefetch = loop {
        let prefetch = rabbitmqctl_consumer_prefetch(queue).await?;
        if !prefetch.is_empty() || std::time::Instant::now() >= deadline {
            break prefetch;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(prefetch, vec![5]);

    // 20 messages, none finishing: the broker hands out 5 (the prefetch), 15 stay ready.
    broker
        .publish_many_bytes(queue, vec![b"x".to_vec(); 20])
        .await?;
    broker.wait_for_count(queue, 15, WAIT).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(broker.message_count(queue).await?, 15);
    // The connection carries the configured name.
    assert!(conejo_tests::find_connection(&name)?.is_some());

    gate.0.add_permits(20);
    running.wait_for(queue, WAIT, |q| q.acked == 20).await?;
    scenario.finish(running).await
}

#[tokio::test]
async fn check_declares_what_run_declares_and_consumes_nothing() -> anyhow::Result<()> {
    let scenario = Scenario::new("config.check").await?;
    let Scenario { broker, queue } = &scenario;
    let exchange = unique_name("config.check-x");
    broker
        .publish_many_bytes(queue, vec![b"x".to_vec(); 3])
        .await?;
    let report = Conejo::builder(amqp_url())
        .exchange(Exchange::topic(&exchange).durable(false).auto_delete(true))
        .queue_with(
            queue,
            AcksEverything,
            QueueConfig::new()
                .durable(false)
                .concurrency(3)
                .bind(&exchange, "a.*"),
        )
        .build()?
        .check()
        .await?;
    assert_eq!(report.exchanges, vec![exchange.clone()]);
    assert_eq!(report.queues.len(), 1);
    let checked = &report.queues[0];
    assert_eq!(&checked.name, queue);
    assert_eq!(checked.messages, 3);
    assert_eq!(checked.consumers, 0);
    assert_eq!(checked.dead_letter_exchange, format!("{queue}.dlx"));
    assert_eq!((checked.concurrency, checked.prefetch), (3, 48));
    let shown = report.to_string();
    assert!(shown.contains("guest:***@"), "{shown}");
    assert!(
        shown.contains(&format!("queue {queue}: ok (3 ready")),
        "{shown}"
    );
    // Nothing consumed, and the dead-letter queue exists, as run would have declared it.
    assert_eq!(broker.message_count(queue).await?, 3);
    assert_eq!(broker.consumer_count(queue).await?, 0);
    assert_eq!(broker.message_count(&format!("{queue}.dlq")).await?, 0);

    // A queue that exists with other arguments fails the check as it would fail run.
    let err = Conejo::builder(amqp_url())
        .queue_with(queue, AcksEverything, queue_config().quorum())
        .build();
    assert!(err.is_err(), "a quorum queue must be durable"); // caught before connecting
    let err = Conejo::builder(amqp_url())
        .queue_with(
            queue,
            AcksEverything,
            QueueConfig::new()
                .durable(false)
                .argument("x-max-length", conejo::types::AMQPValue::LongInt(5)),
        )
        .build()?
        .check()
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::QueueSetup {
                step: "declare",
                ..
            }
        ),
        "{err:?}"
    );
    scenario.cleanup().await
}

#[tokio::test]
async fn check_fails_on_a_missing_dead_letter_exchange() -> anyhow::Result<()> {
    let scenario = Scenario::undeclared("config.check-dlx").await?;
    let queue = &scenario.queue;
    let missing = unique_name("config.no-such-exchange");
    let err = Conejo::builder(amqp_url())
        .queue_with(
            queue,
            AcksEverything,
            QueueConfig::new()
                .durable(false)
                .dead_letter_exchange(&missing),
        )
        .build()?
        .check()
        .await
        .unwrap_err();
    match &err {
        Error::DeadLetterExchangeNotFound { queue: q, exchange } => {
            assert_eq!((q, exchange), (queue, &missing));
        }
        other => panic!("expected DeadLetterExchangeNotFound, got {other:?}"),
    }
    assert!(
        err.to_string()
            .contains(&format!("dead-letter exchange '{missing}'")),
        "{err}"
    );
    scenario.cleanup().await
}

#[tokio::test]
async fn check_fails_fast_when_the_broker_is_unreachable() -> anyhow::Result<()> {
    init_tracing();
    // Nothing listens on port 1; the service would wait for the broker (the default), but
    // a check tries each address once.
    let started = Instant::now();
    let err = Conejo::builder("amqp://guest:secret-pw@127.0.0.1:1/%2f,127.0.0.1:2")
        .connect_timeout(Duration::from_secs(5))
        .queue("config.unreachable", AcksEverything)
        .build()?
        .check()
        .await
        .unwrap_err();
    assert!(err.is_connection_error(), "{err:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("secret-pw"), "{shown}");
    Ok(())
}
