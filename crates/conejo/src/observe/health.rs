//! The health server (feature `health`): `/livez`, `/readyz` and `/metrics` over HTTP/1.
//!
//! It runs on the **connection runtime**, not on the handler runtime:
//! - liveness must say whether the process can keep its connection: the connection runtime
//!   answering (heartbeats, acks) is exactly that. Served there, a probe that gets no answer
//!   means that runtime is wedged — restart the process. Served on the handler runtime, a
//!   probe would time out whenever CPU-heavy handlers keep its workers busy, and an
//!   orchestrator would kill a healthy, merely busy consumer (and redeliver its work);
//! - readiness and metrics read atomics and a `watch` channel: nothing there needs the
//!   handler runtime, and `/metrics` keeps answering — handler lag included — while handlers
//!   hog it, which is when it matters.
//!
//! Its cost on the connection runtime is a probe every few seconds and a scrape every few
//! seconds: microseconds, nothing that could delay a heartbeat.

use std::{fmt::Write as _, net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Router,
    extract::State,
    http::{StatusCode, header},
    response::IntoResponse,
    routing::get,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::{
    ConnectionState, Error, Stats, Status,
    observe::telemetry::{HANDLER_DURATION, PUBLISH_CONFIRM, Telemetry},
};

/// `/livez` fails when the connection runtime's recent lag exceeds this: a runtime that
/// stalled that long recently cannot be trusted with heartbeats (RabbitMQ's default heartbeat
/// timeout is 60 s, conejo's tests use 1–2 s).
pub(crate) const LIVENESS_LAG_LIMIT: Duration = Duration::from_secs(5);

/// Bucket bounds of the handler-duration histogram, in seconds: 1 ms to 1 min.
const DURATION_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The recorder behind `/metrics`: this service's own, never installed globally, so two
/// services in one process (or an application with its own global recorder) keep their
/// metrics apart. The handler-duration histogram is rendered with buckets (a Prometheus
/// histogram, aggregatable across instances), not as a summary.
pub(crate) fn prometheus_recorder() -> PrometheusRecorder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(HANDLER_DURATION.to_owned()),
            &DURATION_BUCKETS,
        )
        .and_then(|builder| {
            builder.set_buckets_for_metric(
                Matcher::Full(PUBLISH_CONFIRM.to_owned()),
                &DURATION_BUCKETS,
            )
        })
        .expect("the bucket list is not empty")
        .build_recorder()
}

/// The health server's socket, bound by `build()` so that a taken port is a startup error.
#[derive(Debug)]
pub(crate) struct HealthListener {
    listener: std::net::TcpListener,
    /// The bound address (the real port when `:0` was asked).
    address: SocketAddr,
}

impl HealthListener {
    /// Binds `address` now; serving starts with the service.
    pub(crate) fn bind(address: SocketAddr) -> Result<Self, Error> {
        let failed = |source| Error::Health { address, source };
        let listener = std::net::TcpListener::bind(address).map_err(failed)?;
        listener.set_nonblocking(true).map_err(failed)?;
        let address = listener.local_addr().map_err(failed)?;
        Ok(HealthListener { listener, address })
    }

    /// The bound address.
    pub(crate) fn address(&self) -> SocketAddr {
        self.address
    }
}

/// What the routes read.
#[derive(Clone)]
pub(crate) struct Health {
    pub(crate) status: Status,
    pub(crate) stats: Stats,
    pub(crate) telemetry: Arc<Telemetry>,
    pub(crate) prometheus: PrometheusHandle,
}

/// Serves the routes on the connection runtime until `stop` fires.
pub(crate) fn serve(
    listener: HealthListener,
    runtime: &tokio::runtime::Handle,
    health: Health,
    stop: CancellationToken,
) {
    let address = listener.address;
    let router = Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(health);
    runtime.spawn(async move {
        // `from_std` registers the socket with the current runtime's reactor: here, the
        // connection runtime's.
        let listener = match tokio::net::TcpListener::from_std(listener.listener) {
            Ok(listener) => listener,
            Err(error) => {
                error!(%address, %error, "cannot serve the health endpoints");
                return;
            }
        };
        info!(%address, "serving /livez, /readyz and /metrics");
        if let Err(error) = axum::serve(listener, router)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        {
            error!(%address, %error, "the health server failed");
        }
    });
}

/// 200 while the connection runtime keeps time; 503 with the lag otherwise.
async fn livez(State(health): State<Health>) -> impl IntoResponse {
    let lag = health.stats.connection_runtime_lag();
    if lag <= LIVENESS_LAG_LIMIT {
        (
            StatusCode::OK,
            format!("alive: connection runtime lag {lag:?}\n"),
        )
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not alive: the connection runtime's timers fire {lag:?} late (limit {LIVENESS_LAG_LIMIT:?})\n"
            ),
        )
    }
}

/// 200 when [`Status::is_ready`]; 503 naming what is missing otherwise.
async fn readyz(State(health): State<Health>) -> impl IntoResponse {
    if health.status.is_ready() {
        return (StatusCode::OK, "ready\n".to_owned());
    }
    (StatusCode::SERVICE_UNAVAILABLE, not_ready(&health))
}

/// What keeps the service from being ready, one reason a line.
fn not_ready(health: &Health) -> String {
    let status = &health.status;
    let mut body = String::from("not ready\n");
    match status.state() {
        ConnectionState::Connected => {}
        ConnectionState::Idle => body.push_str("connection: not started\n"),
        ConnectionState::Connecting { attempt } => {
            let _ = writeln!(body, "connection: connecting (attempt {attempt})");
        }
        ConnectionState::Reconnecting { attempt } => {
            let _ = writeln!(body, "connection: reconnecting (attempt {attempt})");
        }
        ConnectionState::Stopped => body.push_str("connection: stopped\n"),
    }
    if let Some(reason) = status.blocked() {
        let _ = writeln!(body, "connection: blocked by the broker ({reason})");
    }
    for queue in health.stats.all().keys() {
        if status.is_consuming(queue) != Some(true) {
            let _ = writeln!(body, "queue not consumed: {queue}");
        }
    }
    body
}

/// The Prometheus text format, sampled now.
async fn metrics(State(health): State<Health>) -> impl IntoResponse {
    health.telemetry.sample();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        health.prometheus.render(),
    )
}
