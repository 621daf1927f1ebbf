//! One handler on one payload, without a broker: what it returns, and the outcome conejo
//! would send to the broker.

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
