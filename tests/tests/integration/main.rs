//! conejo's integration tests, against a real RabbitMQ broker: one test binary, as ripgrep
//! keeps its own, so that this list says where each concern is tested and the suite is linked
//! once rather than once per file.
//!
//! Every test uses unique queue and connection names ([`conejo_tests::unique_name`]) and
//! deletes what it declares, so the tests can run in parallel against the shared broker
//! (`AMQP_URL`, default `127.0.0.1:5672`). Under cargo-nextest each test runs in a process of
//! its own; `.config/nextest.toml` runs the tests of the modules marked *heavy* one at a time
//! (they start private broker nodes, stall runtimes or kill processes), by module path.

// Messages in, outcomes out: acks, retries, rejects, decode failures and panics, acks of
// out-of-order completions, the concurrency bound.
mod delivery;
// A service that cannot start: a missing or conflicting queue, a missing dead-letter
// exchange, an unreachable broker, refused credentials.
mod startup;
// A queue's channel: a consumer the broker cancels, a queue moved off a channel held up
// by a long delivery.
mod channels;
// A connection the broker closes, and a handler that ignores the loss.
mod connections;
// What the failures become: broker-held retries with backoff, dead letters and their
// headers, timeouts, panics outside the handler, topology from the builder.
mod failures;
// Publishing: confirms, returns, nacks, a forced close mid-stream, a handler's publishes
// before its ack, request-reply.
mod publish;
// Layers around handlers: idempotency, authorisation, service-wide, and the delivery span.
mod middleware;
// Settings from a file and the environment, and `Conejo::check`.
mod config;
// Graceful shutdown: from a signal, a deadline, a handler that asks for it (heavy).
mod shutdown;
// Crash loops: a message that kills the process is dead-lettered as poison (heavy).
mod poison;
// Connection resilience by fault injection: private nodes restarted, killed and clustered,
// a stalled network, a channel closed by the broker, a killed consumer process (heavy).
mod resilience;
// Handlers that hog the application's runtime do not cost the connection (heavy).
mod heartbeat;
// Stream queues: read from an offset spec, retries in place and dead letters without a nack,
// resumed after the stored offset by the next run and after a lost connection.
mod streams;
// Replicas as processes: a single active consumer handing over when the active one is
// killed or stops, consumer priorities.
mod scale_out;
// Partitions behind a consistent-hash exchange on private nodes: the missing plugin named
// at startup, one key in order across replicas while one is killed and restarted (heavy).
mod partitions;
// TLS against a private node that asks for a client certificate (heavy).
mod tls;
// `/metrics`, `/readyz`, `/livez` and the runtime lags (heavy).
mod observability;
// W3C trace context through deliveries and retries.
mod trace_context;
// The dead-letter operator tool (`conejo::admin`).
mod admin;
// The support library itself, against the shared broker.
mod support_selftest;
// The support library's private nodes, cluster and TCP proxy (heavy).
mod support_nodes;

// The test handlers, and their order message, that more than one module uses.
mod handlers;
