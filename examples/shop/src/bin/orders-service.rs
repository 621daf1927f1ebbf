//! A typed-JSON order service, configured by the environment or a file:
//!
//! ```text
//! CONEJO_URL=amqp://… orders-service              consume until Ctrl-C or SIGTERM (`run`)
//! orders-service check                            check the settings and the broker, consume nothing
//! orders-service --config examples/shop/orders-service.toml --log-format json
//! CONEJO_QUEUES__SHOP_ORDERS__CONCURRENCY=8 orders-service
//! ```
//!
//! The service itself — exchange, queue, binding, handler, layers — is
//! [`example_shop::orders_service`], which its tests (`tests/service.rs`) start as it is.

use std::process::ExitCode;

use example_shop::{Warehouse, orders_service};

#[tokio::main]
async fn main() -> ExitCode {
    // The code registers the handler and its defaults; the settings tune them.
    conejo::cli::main(|conejo| orders_service(conejo, Warehouse)).await
}
