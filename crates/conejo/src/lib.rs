//! # conejo
//!
//! An async-first RabbitMQ consumer framework: implement a [`Handler`], register queues on
//! a [`Conejo`] builder, [`run`](Conejo::run) the result as a service.
//!
//! ## Why
//! A consumer whose handlers hog the thread (or the async runtime) that must answer the
//! broker's heartbeats loses its connection: RabbitMQ logs "missed heartbeats from client",
//! closes it, and redelivers every in-flight message. lapin 4 runs its heartbeat timer and
//! internal RPC as tasks on the runtime it is given, so in Rust the trap is a handler that
//! keeps every worker of that runtime busy.
//!
//! conejo owns the connection and runs lapin on a **dedicated runtime on its own thread**;
//! handlers run on yours. Nothing a handler does — a CPU-heavy loop, a `std::thread::sleep`
//! by mistake — can delay a heartbeat. CPU-heavy handlers implement [`BlockingHandler`] and
//! run through [`Blocking`] on tokio's blocking pool, at most `concurrency` at a time.
//!
//! ## The path of a message
//! broker → delivery (lapin, connection runtime) → poison check ([`QueueConfig::poison_limit`])
//! → the queue's pipeline, in a `delivery` tracing span: timeout ([`QueueConfig::timeout`]),
//! panic isolation, your [layers](service) ([`Builder::layer`], [`QueueConfig::layer`]),
//! decode ([`Decode`], e.g. [`Json`]), [`Handler::handle`] (your runtime) → [`Outcome`] → on failure, a copy published with confirms to a
//! wait queue or the dead-letter exchange → settle task (connection runtime) → `basic.ack`,
//! or `basic.nack` (requeue) to give a message back.
//!
//! ## The map
//! The crate is grouped by concern, and a delivery goes one way through it:
//! `broker` (the broker boundary: lapin on the connection runtime) → `engine` (consumer →
//! worker → dispatch → settle) → [`service`] (your layers, decoding, the [`Handler`] in
//! `handler`) → `engine` (outcome, ack) → `broker`. `config` holds what a service is
//! configured with, `observe` what it tells the outside, `app` the [`Builder`] and [`Conejo`].
//! Each folder's module overview says what it may use, and a test of the crate's own source
//! (`tests/architecture.rs`) keeps it so, with no import cycle. The repository's
//! `ARCHITECTURE.md` is the full map.
//!
//! ## Acknowledgements and failures
//! - A message is acknowledged only after its handler returned `Ok`, or after the broker
//!   confirmed its retry copy or dead letter: at-least-once delivery, a duplicate at worst,
//!   never a loss.
//! - Acks are coalesced: finished deliveries with consecutive tags are acknowledged with one
//!   `basic.ack(multiple = true)`, within [`Builder::ack_linger`] (5 ms) or as soon as a
//!   quarter of the prefetch window is waiting. No delivery is ever settled twice, acks
//!   only go to the channel that delivered the message, and a delivery whose task ends
//!   without a result (a panic, a dropped task) is given back.
//! - A failure — handler error, payload that does not decode, panic, timeout — is a
//!   [`Failure`]; the queue's policy ([`QueueConfig::on_failure`], default
//!   [`Failure::default_outcome`]) makes it [`Outcome::Retry`] or [`Outcome::Reject`].
//! - [`Outcome::Retry`] waits in the broker, not in the process: a copy goes to the wait queue
//!   `<queue>.retry.<ttl>ms`, which dead-letters it back to the queue once its delay has
//!   passed, as attempt [`Context::attempt`] + 1. The delays and the number of attempts are
//!   the queue's [`RetryPolicy`] (default: 5 attempts, 1 s × 3ⁿ capped at 60 s, ± 20 %:
//!   about 40 s to the dead-letter queue); [`HandlerError::retry_after`] overrides the delay.
//! - [`Outcome::Reject`], a retry on the last attempt, and a message delivered
//!   [`poison_limit`](QueueConfig::poison_limit) times without a result are dead-lettered:
//!   a copy with `conejo-reason`, `conejo-failure`, `conejo-error` and other headers goes to
//!   `<queue>.dlx` → `<queue>.dlq` (declared by conejo), or to the exchange named with
//!   [`QueueConfig::dead_letter_exchange`], which must exist
//!   ([`Error::DeadLetterExchangeNotFound`]).
//! - `conejo::admin` (feature `admin`) and the `conejo` binary (crate `conejo-cli`) list,
//!   show and replay dead letters.
//!
//! The repository's README has the full picture: the queues conejo declares, every header,
//! the caveats of poison detection.
//!
//! ## Shutdown
//! On SIGINT/SIGTERM or a [`ShutdownHandle`]: stop consuming, give back at once the
//! messages prefetched but not started, let in-flight handlers finish (up to
//! [`Builder::shutdown_timeout`], 20 s by default) and ack them, requeue whatever did not
//! finish, close the channels and the connection. Nothing given back uses up an attempt.
//!
//! ## Connections
//! conejo runs connection generations: connect → declare → open each queue's channel
//! (prefetch first) → consume. A lost connection is re-established with back-off
//! ([`Builder::reconnect_delay`]), trying the next of several addresses first
//! ([`Conejo::builder`] takes a cluster's nodes as a comma-separated list); a channel closed
//! by the broker is reopened for that queue only; a consumer cancelled by the broker is
//! consumed again. Handlers whose delivery was lost are told through
//! [`Context::shutdown_requested`], and their results never reach another channel.
//! At startup conejo waits for the broker ([`Builder::wait_for_broker`]). [`Conejo::status`]
//! tells the state, for readiness and liveness checks.
//!
//! ## Cargo features
//! - `tls`: `amqps://` with rustls — a private CA, client certificates (mutual TLS) and SASL
//!   EXTERNAL through `TlsConfig` and `Builder::tls`. Off by default: without it conejo has
//!   no TLS code, and `build()` rejects an `amqps://` URL.
//! - `config`: `conejo::settings` — settings from a TOML file and `CONEJO_*`
//!   environment variables (code < file < environment), applied with
//!   `Conejo::builder_from` / `Builder::settings`, every error naming its key.
//! - `logging`: `logging::init(format, level)`, a `tracing` subscriber writing text or
//!   JSON lines to stderr.
//! - `cli` (implies `config` and `logging`): `cli::main(|builder| …)` gives a service binary
//!   `run` and `check` subcommands, `--config` and `--log-format`.
//! - `admin`: `conejo::admin`, to inspect and replay dead letters.
//! - `opentelemetry`: W3C trace-context propagation — a delivery's span continues the
//!   message's `traceparent`, and retries and dead letters carry the span's context.
//! - `metrics`: conejo's metrics (deliveries, acks and ack frames, outcomes, failures,
//!   in-flight, prefetch, connection state, reconnects, runtime lags, handler durations)
//!   through the `metrics` facade, to the recorder the application installs. Sampled from
//!   conejo's counters once a second: nothing added per message but the duration histogram.
//! - `health` (implies `metrics`): `Builder::health` serves `/livez`, `/readyz` and
//!   `/metrics` (Prometheus text) over HTTP, from the connection runtime.
//! - `test-util`: broker-free helpers for handler tests.
//! - `test-hooks`: not for services — knobs that recreate the hazards conejo prevents, for
//!   conejo's own tests.
//!
//! ## Observability
//! Without any feature, [`Conejo::stats`] gives per-queue counters and the lag of both
//! runtimes ([`Stats::connection_runtime_lag`], [`Stats::handler_runtime_lag`]: how late a
//! 100 ms timer fires there), and [`Conejo::status`] the connection's state and readiness.
//! The README's "Observability" section lists every metric.
//!
//! ## Example
//! ```no_run
//! use conejo::{Blocking, BlockingHandler, Conejo, Context, Handler, HandlerError, Json, QueueConfig};
//! use serde::Deserialize;
//!
//! #[derive(Deserialize)]
//! struct Order { id: u64 }
//!
//! struct Orders;
//! impl Handler for Orders {
//!     type Message = Json<Order>;
//!     async fn handle(&self, Json(order): Json<Order>, ctx: &Context) -> Result<(), HandlerError> {
//!         println!("order {} (attempt {})", order.id, ctx.attempt());
//!         Ok(())
//!     }
//! }
//!
//! struct Checksum;
//! impl BlockingHandler for Checksum {
//!     type Message = Vec<u8>;
//!     fn handle(&self, bytes: Vec<u8>, _: &Context) -> Result<(), HandlerError> {
//!         let _sum: u64 = bytes.iter().map(|&b| u64::from(b)).sum(); // CPU work
//!         Ok(())
//!     }
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), conejo::Error> {
//!     Conejo::builder("amqp://guest:guest@127.0.0.1:5672/%2f")
//!         .queue("orders", Orders)
//!         .queue_with("blobs", Blocking::new(Checksum), QueueConfig::new().concurrency(2))
//!         .build()?
//!         .run()
//!         .await
//! }
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(docsrs, feature(doc_cfg))]

mod app;
mod backoff;
mod broker;
mod config;
mod engine;
mod error;
mod handler;
mod headers;
mod hooks;
#[cfg(any(feature = "config", feature = "logging"))]
mod log_format;
mod observe;
mod publish;
pub mod service;

#[cfg(feature = "admin")]
#[cfg_attr(docsrs, doc(cfg(feature = "admin")))]
pub mod admin;
#[cfg(feature = "cli")]
#[cfg_attr(docsrs, doc(cfg(feature = "cli")))]
pub mod cli;
#[cfg(feature = "logging")]
#[cfg_attr(docsrs, doc(cfg(feature = "logging")))]
pub mod logging;
#[cfg(feature = "config")]
#[cfg_attr(docsrs, doc(cfg(feature = "config")))]
pub mod settings;
#[cfg(feature = "test-util")]
pub mod testing;

pub use app::{Builder, Conejo, ShutdownHandle};
#[cfg(feature = "tls")]
#[cfg_attr(docsrs, doc(cfg(feature = "tls")))]
pub use broker::tls::TlsConfig;
pub use broker::url::AmqpUrl;
pub use broker::{DEFAULT_CONNECT_TIMEOUT, DEFAULT_RECONNECT_DELAY};
pub use config::ordering::OrderKey;
pub use config::partitions::{PartitionKey, Partitions};
pub use config::queue::{DEFAULT_POISON_LIMIT, QueueConfig};
pub use config::retry::{MAX_RETRY_DELAY, RetryPolicy};
pub use config::service::{DEFAULT_ACK_LINGER, DEFAULT_CONSUMER_TIMEOUT, DEFAULT_SHUTDOWN_TIMEOUT};
pub use config::stream::{OffsetStore, OffsetStoreError, StreamOffset};
pub use config::topology::Exchange;
pub use engine::check::{CheckReport, QueueCheck};
pub use error::Error;
pub use handler::context::Context;
pub use handler::error::HandlerError;
pub use handler::message::{Decode, DecodeError, Json};
pub use handler::outcome::{Failure, Outcome};
pub use handler::{
    Blocking, BlockingHandler, FnHandler, Handler, Responder, Responding, handler_fn,
};
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
pub use hooks::RuntimeWedge;
#[cfg(any(feature = "config", feature = "logging"))]
#[cfg_attr(docsrs, doc(cfg(any(feature = "config", feature = "logging"))))]
pub use log_format::LogFormat;
pub use observe::stats::{PublishStats, QueueStats, Stats};
pub use observe::status::{ConnectionState, Status};
pub use publish::{
    DEFAULT_MAX_IN_FLIGHT, DEFAULT_PUBLISH_TIMEOUT, Encode, EncodeError, HeaderValue, Message,
    PublishError, Publisher, PublisherBuilder, PublisherState, Reply, RequestError,
};

/// AMQP types that appear in conejo's API (headers, property values), re-exported from lapin
/// and `bytes`.
pub mod types {
    pub use bytes::Bytes;
    pub use lapin::BasicProperties;
    pub use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
}

#[cfg(test)]
mod send_assertions {
    //! The framework moves these across tasks and runtimes.
    fn assert_send_sync<T: Send + Sync>() {}
    #[test]
    fn public_types_are_send_and_sync() {
        assert_send_sync::<crate::Conejo>();
        assert_send_sync::<crate::Context>();
        assert_send_sync::<crate::HandlerError>();
        assert_send_sync::<crate::Failure>();
        assert_send_sync::<crate::ShutdownHandle>();
        assert_send_sync::<crate::Stats>();
    }
}

/// The README's examples are compiled as doc tests, so they cannot go stale.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
struct ReadmeDoctests;
