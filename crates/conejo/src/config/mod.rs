//! What a service is configured with, and what `build()` resolves it into:
//!
//! - `service`: the service's own settings (addresses, connection, timing, exchanges),
//!   validated once — the struct that runs;
//! - `queue`: [`QueueConfig`](crate::QueueConfig), and each queue's settings resolved once
//!   (`ResolvedQueue`);
//! - `ordering`: [`OrderKey`](crate::OrderKey), what per-key ordering orders by;
//! - `partitions`: [`Partitions`](crate::Partitions), a stream split by key over queues
//!   behind a consistent-hash exchange;
//! - `retry`: [`RetryPolicy`](crate::RetryPolicy);
//! - `stream`: [`StreamOffset`](crate::StreamOffset) and [`OffsetStore`](crate::OffsetStore),
//!   where a stream queue's consumer starts and where its offset is kept;
//! - `topology`: [`Exchange`](crate::Exchange), bindings, dead-letter routes, and the names
//!   and arguments of the queues conejo declares.
//!
//! Pure data and validation: nothing here talks to a broker.
//!
//! May use: `broker` (addresses, TLS, declaration flags), `handler`, `service`, `error`,
//! `headers`.

pub(crate) mod ordering;
pub(crate) mod partitions;
pub(crate) mod queue;
pub(crate) mod retry;
pub(crate) mod service;
pub(crate) mod stream;
pub(crate) mod topology;
