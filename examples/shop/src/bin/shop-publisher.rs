//! Publishes sample orders and thumbnail jobs for the services to handle.

use clap::Parser;
use example_shop::Publisher;

/// Feeds the shop's queues.
#[derive(Parser)]
struct Args {
    /// Broker URL.
    #[arg(
        long,
        env = "AMQP_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f",
        hide_env_values = true
    )]
    amqp_url: String,
    /// Orders to publish (one has no items; one malformed order is added).
    #[arg(long, default_value_t = 10)]
    orders: u64,
    /// Thumbnail jobs to publish.
    #[arg(long, default_value_t = 4)]
    thumbnails: u64,
    /// CPU milliseconds per thumbnail.
    #[arg(long, default_value_t = 1500)]
    work_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    example_shop::init_tracing();
    let args = Args::parse();
    let publisher = Publisher::connect(&args.amqp_url).await?;
    let published = publisher
        .publish_samples(args.orders, args.thumbnails, args.work_ms)
        .await?;
    tracing::info!(published, "published");
    Ok(())
}
