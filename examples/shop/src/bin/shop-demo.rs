//! The demo: one service consuming both queues (async JSON orders and CPU-heavy thumbnails),
//! fed by the publisher; exits once every sample is handled (or on Ctrl-C).

use std::time::{Duration, Instant};

use clap::Parser;
use conejo::{Blocking, Conejo, QueueConfig};
use example_shop::{Publisher, THUMBNAILS, Thumbnailer, Warehouse, orders_service};

/// Runs the shop end to end.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    broker: example_shop::Broker,
    #[command(flatten)]
    samples: example_shop::Samples,
    /// Give up waiting after this many seconds.
    #[arg(long, default_value_t = 120)]
    timeout_secs: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    example_shop::init_tracing()?;
    let args = Args::parse();
    // CONEJO_* variables tune the demo too (e.g. CONEJO_QUEUES__SHOP_ORDERS__CONCURRENCY=2).
    let settings = conejo::settings::Settings::load(None)?;
    // The orders service as `orders-service` runs it, and the thumbnails beside it.
    let service = orders_service(Conejo::builder(&args.broker.amqp_url), Warehouse)
        .settings(&settings)
        .connection_name("shop-demo")
        .queue_with(
            THUMBNAILS,
            Blocking::new(Thumbnailer),
            QueueConfig::new().concurrency(2),
        )
        .build()?;
    let stats = service.stats();
    let shutdown = service.shutdown_handle();
    let running = tokio::spawn(service.run());

    let publisher = Publisher::connect(&args.broker.amqp_url).await?;
    let published = publisher.publish_samples(&args.samples).await?;
    tracing::info!(published, "published samples; handling them");

    let deadline = Instant::now() + Duration::from_secs(args.timeout_secs);
    let settled = |stats: &conejo::Stats| stats.all().values().map(|q| q.acked).sum::<u64>();
    while settled(&stats) < published && Instant::now() < deadline && !shutdown.is_shutdown() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shutdown.shutdown();
    running.await??;
    for (queue, q) in stats.all() {
        println!(
            "{queue:<16} delivered {:>3}  acked {:>3}  dead-lettered {:>3} to {queue}.dlq \
             (decode failures {}, handler errors {})",
            q.delivered, q.acked, q.dead_lettered, q.decode_failures, q.handler_errors
        );
    }
    anyhow::ensure!(
        settled(&stats) >= published,
        "not every sample was handled in time"
    );
    Ok(())
}
