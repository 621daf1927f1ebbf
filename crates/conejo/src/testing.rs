//! Broker-free tests of handlers (feature `test-util`): run a handler on a payload and see
//! the outcome conejo would send to the broker.
//!
//! ```
//! use conejo::{Context, Handler, HandlerError, Json, Outcome, QueueConfig, testing};
//!
//! struct Orders;
//! impl Handler for Orders {
//!     type Message = Json<u32>;
//!     async fn handle(&self, Json(qty): Json<u32>, _: &Context) -> Result<(), HandlerError> {
//!         if qty == 0 { Err(HandlerError::reject("empty")) } else { Ok(()) }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let config = QueueConfig::new();
//! let ctx = Context::detached("orders");
//! assert_eq!(testing::outcome(Orders, &config, b"3", &ctx).await, Outcome::Ack);
//! assert_eq!(testing::outcome(Orders, &config, b"0", &ctx).await, Outcome::Reject);
//! assert_eq!(testing::outcome(Orders, &config, b"{oops", &ctx).await, Outcome::Reject);
//! # }
//! ```

use crate::{Context, Failure, Handler, Outcome, QueueConfig, handler::erase};

/// Decodes `body` and runs `handler` as conejo would; failures (panics included) are values.
pub async fn run<H: Handler>(handler: H, body: &[u8], ctx: &Context) -> Result<(), Failure> {
    erase(handler).call(body.to_vec(), ctx).await
}

/// The outcome conejo would apply: `Ack` on success, else the queue's failure policy.
pub async fn outcome<H: Handler>(
    handler: H,
    config: &QueueConfig,
    body: &[u8],
    ctx: &Context,
) -> Outcome {
    match run(handler, body, ctx).await {
        Ok(()) => Outcome::Ack,
        Err(failure) => config.policy()(&failure, ctx),
    }
}
