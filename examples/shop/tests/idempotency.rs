//! The example's idempotency layer, against the real broker: a message id seen twice
//! reaches the handler once, and both copies are acked.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use conejo::{Conejo, Context, HandlerError, QueueConfig, handler_fn};
use example_shop::Idempotency;
use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions},
    types::FieldTable,
};

fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

#[tokio::test]
async fn a_duplicate_message_id_is_acked_without_calling_the_handler() -> anyhow::Result<()> {
    let queue = format!("example.idempotency.{}", std::process::id());
    let connection = Connection::connect(&amqp_url(), ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                auto_delete: false,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    for (id, body) in [("a", "1"), ("b", "2"), ("a", "1 again"), ("c", "3")] {
        channel
            .basic_publish(
                "".into(),
                queue.as_str().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default().with_message_id(id.into()),
            )
            .await?
            .await?;
    }

    let calls = Arc::new(AtomicU32::new(0));
    let counter = Arc::clone(&calls);
    let service = Conejo::builder(amqp_url())
        .queue_with(
            &queue,
            handler_fn(move |_body: String, _ctx: Context| {
                let counter = Arc::clone(&counter);
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    Ok::<(), HandlerError>(())
                }
            }),
            // One at a time: the duplicate comes after its twin was handled.
            QueueConfig::new()
                .durable(false)
                .concurrency(1)
                .layer(Idempotency::new(100)),
        )
        .build()?;
    let stats = service.stats();
    let shutdown = service.shutdown_handle();
    let running = tokio::spawn(service.run_until(std::future::pending()));
    let deadline = Instant::now() + Duration::from_secs(20);
    while stats.queue(&queue).map_or(0, |q| q.acked) < 4 {
        anyhow::ensure!(Instant::now() < deadline, "timed out: {:?}", stats.all());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    shutdown.shutdown();
    running.await??;

    assert_eq!(calls.load(Ordering::SeqCst), 3, "a, b and c once each");
    let left = channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?
        .message_count();
    assert_eq!(left, 0, "all four acked");
    channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await?;
    for suffix in [".dlq"] {
        let _ = channel
            .queue_delete(
                format!("{queue}{suffix}").as_str().into(),
                QueueDeleteOptions::default(),
            )
            .await;
    }
    let _ = channel
        .exchange_delete(format!("{queue}.dlx").as_str().into(), Default::default())
        .await;
    connection.close(200, "done".into()).await?;
    Ok(())
}
