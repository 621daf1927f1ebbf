//! The broker: addresses, TLS, the connection and its dedicated runtime.

pub(crate) mod connection;
pub(crate) mod runtime;
pub(crate) mod tls;
pub(crate) mod url;
