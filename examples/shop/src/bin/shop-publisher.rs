//! Publishes sample orders and thumbnail jobs for the services to handle.

use clap::Parser;
use example_shop::Publisher;

/// Feeds the shop's queues.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    broker: example_shop::Broker,
    #[command(flatten)]
    samples: example_shop::Samples,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    example_shop::init_tracing()?;
    let args = Args::parse();
    let publisher = Publisher::connect(&args.broker.amqp_url).await?;
    let published = publisher.publish_samples(&args.samples).await?;
    tracing::info!(published, "published");
    Ok(())
}
