//! Broker-side test support for conejo's integration tests.
//!
//! Everything here talks to a real RabbitMQ broker, independently of the
//! `conejo` crate under test:
//!
//! * [`Broker`] — a plain lapin connection (made on the caller's tokio
//!   runtime) to declare/purge/delete queues, publish with publisher confirms,
//!   count and drain messages.
//! * [`rabbitmqctl_connections`] / [`find_connection`] — the broker's own view
//!   of the client connections, through `rabbitmqctl`.
//! * [`ConnectionWatch`] — a background thread that records, over time, which
//!   broker-side connection carries a given `connection_name`.
//! * [`Scenario`] — what most tests do first and last: a [`Broker`], a declared queue of the
//!   test's own, a [`RunningService`] spawned from the builder the test writes, and the
//!   clean-up; [`queue_config`] is the queue configuration that matches its queue.
//!
//! * [`bench`](mod@bench) — what the benchmarks and `conejo-cost` share: the message,
//!   prefilling, the hand-written lapin consumers, conejo's counting no-op handler, and the
//!   clocks and samplers (CPU per process and per thread, resident set, runtime lags).
//!
//! Tests use [`unique_name`] for every queue and connection name so they can
//! run in parallel against the same broker.

pub mod bench;
mod broker;
mod fixture;
mod node;
mod proxy;
mod rabbitmqctl;
mod scenario;
mod service;
mod watch;

pub use broker::{Broker, DrainedMessage, XDeath};
pub use fixture::Fixture;
pub use node::{
    CLI_TIMEOUT, NODE_START_TIMEOUT, NODE_STOP_TIMEOUT, NodeOptions, PrivateCluster, PrivateNode,
    TlsListener, shared_private_node,
};
pub use proxy::{ProxyMode, TcpProxy};
pub use rabbitmqctl::{
    BrokerConnection, find_connection, find_connection_async, find_connections,
    parse_list_connections, rabbitmqctl_close_connection, rabbitmqctl_connections,
    rabbitmqctl_connections_async, rabbitmqctl_consumer_prefetch, rabbitmqctl_queue_arguments,
    rabbitmqctl_queue_names, rabbitmqctl_queue_unacked, wait_for_connection_absent,
    wait_for_connection_present,
};
pub use scenario::{Scenario, queue_config};
pub use service::RunningService;
pub use watch::{
    ConnectionWatch, DEFAULT_WATCH_INTERVAL, Observation, WatchReport, always_same_connection,
    first_absence_after_presence,
};

/// Re-export of the lapin version the support code is built against.
pub use lapin;

use std::sync::Once;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Polls `check` every 20 ms until it holds; an error naming `what` once `limit` has
/// passed. For conditions a test reads from its own state (events a fixture reported, a
/// service's status); the broker's counts have [`Broker::wait_for_count`] and its kin.
pub async fn until(
    what: &str,
    limit: std::time::Duration,
    check: impl Fn() -> bool,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + limit;
    while !check() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Default AMQP URL of the test broker (vhost `/`).
pub const DEFAULT_AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// The AMQP URL of the test broker: the `AMQP_URL` environment variable if it
/// is set and non-empty, otherwise [`DEFAULT_AMQP_URL`].
pub fn amqp_url() -> String {
    match std::env::var("AMQP_URL") {
        Ok(url) if !url.trim().is_empty() => url,
        _ => DEFAULT_AMQP_URL.to_owned(),
    }
}

/// A name that is unique per process and per call: `<prefix>.<pid>.<nanos>.<n>`
/// where `nanos` is the wall clock in nanoseconds since the Unix epoch and `n`
/// a process-wide counter. Safe for queue names (only `[A-Za-z0-9._-]` is added
/// to `prefix`) and for parallel tests, even across test binaries.
pub fn unique_name(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{prefix}.{}.{nanos}.{n}", std::process::id())
}

/// Installs a global `tracing` fmt subscriber once per process, filtered by
/// `RUST_LOG` (default `warn,conejo=info`) and writing through the test
/// harness's captured output. Calling it again — or after another subscriber
/// was installed — does nothing.
pub fn init_tracing() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,conejo=info"));
        // Another subscriber may already be installed (e.g. by a test); keep it.
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_names_differ() {
        let a = unique_name("q");
        let b = unique_name("q");
        assert_ne!(a, b);
        assert!(a.starts_with("q."));
        assert!(a.contains(&std::process::id().to_string()));
    }

    #[test]
    fn init_tracing_is_idempotent() {
        init_tracing();
        init_tracing();
    }
}
