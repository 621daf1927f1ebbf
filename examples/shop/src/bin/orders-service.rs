//! A typed-JSON order service, configured by the environment or a file:
//!
//! ```text
//! CONEJO_URL=amqp://… orders-service              consume until Ctrl-C or SIGTERM (`run`)
//! orders-service check                            check the settings and the broker, consume nothing
//! orders-service --config examples/shop/orders-service.toml --log-format json
//! CONEJO_QUEUES__SHOP_ORDERS__CONCURRENCY=8 orders-service
//! ```

use std::process::ExitCode;

use conejo::QueueConfig;
use example_shop::{Idempotency, ORDERS, Orders};

#[tokio::main]
async fn main() -> ExitCode {
    // The code registers the handler and its defaults; the settings tune them.
    conejo::cli::main(|conejo| {
        conejo.connection_name("orders-service").queue_with(
            ORDERS,
            Orders,
            // Duplicates (a redelivery after a lost ack, a re-sent order) are skipped.
            QueueConfig::new()
                .concurrency(32)
                .layer(Idempotency::new(100_000)),
        )
    })
    .await
}
