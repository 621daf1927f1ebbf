//! A typed-JSON order service: `AMQP_URL=… orders-service`; stop with Ctrl-C or SIGTERM.

use clap::Parser;
use conejo::{Conejo, QueueConfig};
use example_shop::{ORDERS, Orders};

/// Consumes the shop's orders.
#[derive(Parser)]
struct Args {
    #[command(flatten)]
    broker: example_shop::Broker,
    /// Orders handled at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    example_shop::init_tracing();
    let args = Args::parse();
    Conejo::builder(&args.broker.amqp_url)
        .connection_name("orders-service")
        .queue_with(
            ORDERS,
            Orders,
            QueueConfig::new().concurrency(args.concurrency),
        )
        .build()?
        .run()
        .await?;
    Ok(())
}
