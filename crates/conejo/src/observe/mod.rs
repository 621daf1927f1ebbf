//! What a running service tells the outside: counters, status, lags, metrics, health.

#[cfg(feature = "health")]
pub(crate) mod health;
pub(crate) mod lag;
pub(crate) mod stats;
pub(crate) mod status;
pub(crate) mod telemetry;
#[cfg(feature = "opentelemetry")]
pub(crate) mod trace_context;
