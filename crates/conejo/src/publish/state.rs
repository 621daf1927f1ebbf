//! What a publisher's link shares with its handles: its state, its counters, its generation.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use tokio::sync::watch;

use crate::observe::{stats::PublishCounters, status::StatusWriter};

/// Where a publisher stands.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublisherState {
    /// Not connected, and nothing to publish: it connects on the first publish.
    Idle,
    /// Connecting (or reconnecting): publishes wait for the connection, up to their timeout.
    Connecting,
    /// Connected: publishes go out at once.
    Connected,
    /// The broker blocks the connection (a resource alarm), with its reason: publishes
    /// wait, up to their timeout.
    Blocked(String),
    /// Closed: publishes fail with [`PublishError::Closed`](crate::PublishError::Closed).
    Closed,
}

/// The link's side of a publisher.
#[derive(Debug)]
pub(crate) struct LinkShared {
    /// Its state, watched by the handles.
    state: watch::Sender<PublisherState>,
    /// Its counters.
    counters: Arc<PublishCounters>,
    /// Incremented at each connection: what was declared on the previous one may be gone.
    generation: AtomicU64,
    /// The service's status, which shows the publisher blocked (none for a standalone one).
    status: std::sync::OnceLock<Arc<StatusWriter>>,
    /// Set once the publisher's settings are in force.
    configured: std::sync::atomic::AtomicBool,
    /// The last connection error, for logs and `state` readers.
    connect_error: Mutex<Option<String>>,
}

impl LinkShared {
    pub(crate) fn new(counters: Arc<PublishCounters>) -> Self {
        LinkShared {
            state: watch::Sender::new(PublisherState::Idle),
            counters,
            generation: AtomicU64::new(0),
            status: std::sync::OnceLock::new(),
            configured: std::sync::atomic::AtomicBool::new(false),
            connect_error: Mutex::new(None),
        }
    }

    pub(crate) fn counters(&self) -> &PublishCounters {
        &self.counters
    }

    pub(crate) fn counters_arc(&self) -> &Arc<PublishCounters> {
        &self.counters
    }

    pub(crate) fn report_to(&self, status: Arc<StatusWriter>) {
        let _ = self.status.set(status);
    }

    pub(crate) fn configured(&self) -> bool {
        self.configured.load(Ordering::Acquire)
    }

    pub(crate) fn mark_configured(&self) {
        self.configured.store(true, Ordering::Release);
    }

    pub(crate) fn set_state(&self, state: PublisherState) {
        if let Some(status) = self.status.get() {
            status.set_publisher_blocked(match &state {
                PublisherState::Blocked(reason) => Some(reason.clone()),
                _ => None,
            });
        }
        if state == PublisherState::Connected {
            *self.connect_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        self.state.send_replace(state);
    }

    pub(crate) fn state(&self) -> PublisherState {
        self.state.borrow().clone()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<PublisherState> {
        self.state.subscribe()
    }

    pub(crate) fn set_connect_error(&self, error: String) {
        *self.connect_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(error);
    }

    pub(crate) fn next_generation(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}
