//! A CPU-heavy service: thumbnails rendered on the blocking pool, at most `--concurrency`
//! at once, while the connection keeps its heartbeats on its own thread.

use clap::Parser;
use conejo::{Blocking, Conejo, QueueConfig};
use example_shop::{THUMBNAILS, Thumbnailer};

/// Renders the shop's thumbnails.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    broker: example_shop::Broker,
    /// Thumbnails rendered at once (default: the number of cores).
    #[arg(long)]
    concurrency: Option<usize>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    example_shop::init_tracing();
    let args = Args::parse();
    let mut config = QueueConfig::new();
    if let Some(concurrency) = args.concurrency {
        config = config.concurrency(concurrency);
    }
    Conejo::builder(&args.broker.amqp_url)
        .connection_name("thumbnail-service")
        .queue_with(THUMBNAILS, Blocking::new(Thumbnailer), config)
        .build()?
        .run()
        .await?;
    Ok(())
}
