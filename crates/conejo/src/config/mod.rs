//! What a service is configured with: queues, retries, exchanges and the names of what
//! conejo declares.

pub(crate) mod queue;
pub(crate) mod retry;
pub(crate) mod service;
pub(crate) mod topology;
