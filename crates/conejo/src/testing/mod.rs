//! Testing services without a broker (feature `test-util`): the real service, built by its
//! unchanged builder, against conejo's in-memory broker — on tokio's paused clock, with
//! faults injected on cue — and the same test against a real RabbitMQ when asked.
//!
//! - [`TestBroker`]: the broker of a test — [`memory`](TestBroker::memory), or
//!   [`live`](TestBroker::live) against RabbitMQ, or [`from_env`](TestBroker::from_env)
//!   (live when `CONEJO_TEST_AMQP_URL` is set). Declare, bind, publish with confirms,
//!   [`take`](TestBroker::take) what a queue holds, [`consume`](TestBroker::consume) with
//!   manual acks, [`capture`](TestBroker::capture) what a service publishes.
//! - [`TestService`]: the service [`start`](TestBroker::start)ed on it; wait until it is
//!   [`idle`](TestService::idle) instead of sleeping, then assert on its
//!   [`stats`](TestService::stats), on the deliveries it [`handled`](TestService::handled)
//!   (attempt, outcome, failure), on the queues.
//! - [`Faults`]: connections dropped (now, or after the n-th delivery or publish) or
//!   refused, channels closed with a code, consumers cancelled, confirms nacked, withheld or
//!   returned, resource alarms, a stalled network.
//! - [`outcome`] and [`run`]: one handler on one payload, without any broker.
//!
//! ```
//! use std::time::Duration;
//! use conejo::{Conejo, Context, Handler, HandlerError, Json, Message, QueueConfig, RetryPolicy};
//! use conejo::testing::{HandledAs, TestBroker, TestQueue};
//!
//! struct Orders;
//! impl Handler for Orders {
//!     type Message = Json<u32>;
//!     async fn handle(&self, Json(qty): Json<u32>, ctx: &Context) -> Result<(), HandlerError> {
//!         match qty {
//!             0 => Err(HandlerError::reject("empty order")),
//!             _ if ctx.attempt() == 1 => Err(HandlerError::retry("stock service down")),
//!             _ => Ok(()),
//!         }
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), conejo::testing::TestError> {
//! let broker = TestBroker::memory(); // tokio's clock is paused: the 30 s retry takes no time
//! broker.declare_queue(&TestQueue::new("orders")).await?;
//! let retry = RetryPolicy::default().initial_delay(Duration::from_secs(30));
//! let service = broker
//!     .start(Conejo::builder(broker.url()).queue_with("orders", Orders, QueueConfig::new().retry(retry)))
//!     .await?;
//!
//! broker.send("orders", Json(3)).await?;
//! broker.send("orders", Json(0)).await?;
//! service.idle().await?;
//!
//! let outcomes: Vec<_> = service.handled("orders").iter().map(|h| (h.attempt, h.outcome)).collect();
//! assert!(outcomes.contains(&(1, HandledAs::Retried)));
//! assert!(outcomes.contains(&(2, HandledAs::Acked)));
//! assert!(outcomes.contains(&(1, HandledAs::DeadLettered)));
//! let dead = broker.take("orders.dlq").await?;
//! assert_eq!(dead[0].dead_letter_reason(), Some("rejected"));
//! assert_eq!(dead[0].error(), Some("handler error: empty order"));
//! service.stop().await?;
//! # Ok(())
//! # }
//! ```
//!
//! The in-memory broker follows RabbitMQ for what conejo uses, and the project's
//! conformance suite runs the same scenarios against both; what it does not emulate is
//! listed in the README ("Testing your service").

mod broker;
mod client;
mod commands;
mod consumer;
mod error;
mod faults;
mod handler;
mod message;
mod service;

use std::time::Duration;

pub use self::broker::{LIVE_URL_ENV, TestBroker};
pub use self::commands::{Declared, Published, TestQueue, header_binding};
pub use self::consumer::{Capture, TestConsumer, TestDelivery};
pub use self::error::TestError;
pub use self::faults::Faults;
pub use self::handler::{outcome, run};
pub use self::message::{Death, TestMessage};
pub use self::service::{DEFAULT_WAIT, TestService};
pub use crate::observe::journal::{Handled, HandledAs};

/// How often the harness looks again while it waits (tokio's time).
const POLL: Duration = Duration::from_millis(5);

#[cfg(test)]
mod tests;
