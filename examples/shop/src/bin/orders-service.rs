//! A typed-JSON order service: `AMQP_URL=… orders-service`; stop with Ctrl-C or SIGTERM.

use clap::Parser;
use conejo::{Conejo, QueueConfig};
use example_shop::{ORDERS, Orders};

/// Consumes the shop's orders.
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
    /// Orders handled at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    example_shop::init_tracing();
    let args = Args::parse();
    Conejo::builder(&args.amqp_url)
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
