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
//!
//! struct Flaky;
//! impl Handler for Flaky {
//!     type Message = Vec<u8>;
//!     async fn handle(&self, _: Vec<u8>, _: &Context) -> Result<(), HandlerError> {
//!         Err(HandlerError::retry("database unavailable"))
//!     }
//! }
//! assert_eq!(testing::outcome(Flaky, &config, b"", &ctx).await, Outcome::Retry);
//! // on the last attempt (5 by default) a retry becomes a dead letter
//! let last = Context::detached("orders").with_attempt(5);
//! assert_eq!(testing::outcome(Flaky, &config, b"", &last).await, Outcome::Reject);
//! # }
//! ```

use bytes::Bytes;

use crate::{
    Context, Failure, Handler, Outcome, QueueConfig,
    service::{Delivery, Service, assemble},
};

/// Decodes `body` and runs `handler` as conejo would; failures (panics included) are values.
pub async fn run<H: Handler>(handler: H, body: &[u8], ctx: &Context) -> Result<(), Failure> {
    assemble(handler, &[], None)
        .call(Delivery::new(Bytes::copy_from_slice(body), ctx.clone()))
        .await
}

/// The outcome conejo would apply: `Ack` on success, else the queue's failure policy — and
/// `Reject` for a `Retry` on the last attempt ([`Context::with_attempt`] sets the attempt),
/// since such a message is dead-lettered. The queue's [layers](QueueConfig::layer) and
/// [timeout](QueueConfig::timeout) apply, as in the service.
pub async fn outcome<H: Handler>(
    handler: H,
    config: &QueueConfig,
    body: &[u8],
    ctx: &Context,
) -> Outcome {
    let pipeline = assemble(handler, &config.layers.0, config.timeout);
    let delivery = Delivery::new(Bytes::copy_from_slice(body), ctx.clone());
    match pipeline.call(delivery).await {
        Ok(()) => Outcome::Ack,
        Err(failure) => match config.policy()(&failure, ctx) {
            Outcome::Retry if ctx.attempt() >= config.retry.attempts() => Outcome::Reject,
            outcome => outcome,
        },
    }
}
