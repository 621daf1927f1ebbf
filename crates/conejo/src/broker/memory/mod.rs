//! The in-memory transport (feature `test-util`): a broker in the process that behaves as
//! RabbitMQ (3.10) does for what conejo uses — exchanges (direct, topic, fanout, headers, the
//! default), queues with their arguments (message TTL, dead-letter exchange and routing key,
//! quorum delivery counts and limits, maximum length and overflow, exclusive, auto-delete),
//! expiry at the head of a queue, dead-lettering with `x-death` (and RabbitMQ's cycle
//! detection), consumers with a prefetch, acks and nacks (`multiple` included), publisher
//! confirms and `mandatory` returns, `basic.get` — and refuses what RabbitMQ refuses, with
//! its reply codes and texts:
//! a passive declaration of something missing (404), an inequivalent redeclaration, invalid
//! queue arguments or an unknown delivery tag (406), reserved names and the default exchange
//! (403), a publish to a missing exchange (404, closing the channel). The conformance suite
//! (`tests/tests/conformance`) runs the same scenarios against both.
//!
//! Time is tokio's: with a paused clock, a retry's wait queue expires as soon as the test
//! lets time pass.
//!
//! - `state`: the broker's state and its rules, under one lock;
//! - `route`: how topic and headers exchanges match;
//! - `client`: the connections and channels conejo (or the harness) uses, behind the
//!   broker boundary;
//! - `inspect`: what the harness reads (connections, anything still pending);
//! - `outside`: what conejo's own unit tests do without a connection (publish, declare,
//!   count, take);
//! - `faults`: what a test injects (connections dropped or refused, channels closed,
//!   consumers cancelled, confirms nacked, withheld or returned, alarms, a stalled network).

mod client;
mod faults;
mod inspect;
#[cfg(test)]
mod outside;
mod route;
mod state;

use std::{
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use tokio::{
    runtime::Handle,
    sync::{Notify, mpsc, oneshot},
    time::Instant,
};

use self::state::{ChanId, ConnId, State};
use super::{AmqpUrl, BrokerError, Confirmed, Event, Incoming};
use crate::Error;

/// The heartbeat interval a connection gets when its URL asks for none: RabbitMQ's default.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(60);

/// The broker, shared by the service and the test that drives it. Cheap to clone.
#[derive(Clone)]
pub(crate) struct Memory {
    /// The state, and what wakes the expiry task.
    shared: Arc<Shared>,
    /// The runtime the broker was made on: its expiry task, and the connections' tasks.
    handle: Handle,
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory")
            .field("connections", &self.connections().len())
            .finish_non_exhaustive()
    }
}

/// What every clone of a [`Memory`] shares.
struct Shared {
    state: Mutex<State>,
    /// Wakes the expiry task when the earliest expiry moved, or the broker is dropped.
    expiry: Arc<Notify>,
    /// Wakes the operations held by a stalled network when anything changes while it is.
    stall: Notify,
}

impl Drop for Shared {
    fn drop(&mut self) {
        self.expiry.notify_one();
    }
}

/// One connection to the in-memory broker.
#[derive(Clone)]
pub(crate) struct MemoryConnection {
    memory: Memory,
    id: ConnId,
}

/// One channel of the in-memory broker.
#[derive(Clone)]
pub(crate) struct MemoryChannel {
    memory: Memory,
    id: ChanId,
    /// Its connection.
    connection: ConnId,
}

/// A consumer's deliveries.
pub(crate) struct MemoryDeliveries {
    receiver: mpsc::UnboundedReceiver<Result<Incoming, BrokerError>>,
    tag: String,
}

/// A publish's confirm.
pub(crate) enum MemoryConfirm {
    /// Known at once.
    Ready(Option<Result<Confirmed, BrokerError>>),
    /// Known later: the connection is blocked, or a fault withholds the confirm.
    Waiting(oneshot::Receiver<Result<Confirmed, BrokerError>>),
}

/// A connection's events.
pub(crate) struct MemoryEvents(mpsc::UnboundedReceiver<Event>);

impl Memory {
    /// A fresh broker on the current runtime, with the `amq.*` exchanges.
    pub(crate) fn new() -> Self {
        let handle = Handle::current();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            expiry: Arc::new(Notify::new()),
            stall: Notify::new(),
        });
        handle.spawn(expire(Arc::downgrade(&shared), Arc::clone(&shared.expiry)));
        Memory { shared, handle }
    }

    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Runs `change` on the state; wakes the expiry task if it moved the earliest expiry (of a
    /// message at the head of its queue: any change may move a head), and the held
    /// operations if the network is (or was) stalled.
    fn with_state<R>(&self, change: impl FnOnce(&mut State) -> R) -> R {
        let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        let (expiry, stalled) = (state.next_expiry, state.stall.is_some());
        let result = change(&mut state);
        state.refresh_expiry();
        if state.next_expiry != expiry {
            self.shared.expiry.notify_one();
        }
        if stalled || state.stall.is_some() {
            self.shared.stall.notify_waiters();
        }
        result
    }

    /// Reads the state (waking nobody).
    fn read<R>(&self, look: impl FnOnce(&State) -> R) -> R {
        let state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        look(&state)
    }

    /// Connects as conejo does.
    pub(crate) async fn connect(
        &self,
        url: &AmqpUrl,
        name: &str,
        timeout: Duration,
    ) -> Result<MemoryConnection, Error> {
        self.connect_as(url, name, timeout, false).await
    }

    /// Connects; an `exempt` connection (the test harness's own) is passed by faults.
    pub(crate) async fn connect_as(
        &self,
        url: &AmqpUrl,
        name: &str,
        timeout: Duration,
        exempt: bool,
    ) -> Result<MemoryConnection, Error> {
        let failed = |source| Error::Connect {
            url: url.redacted().to_owned(),
            source,
        };
        // A stalled network: the attempt gets no answer until it heals.
        if !exempt && tokio::time::timeout(timeout, self.healed()).await.is_err() {
            return Err(failed(BrokerError::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer from the broker within {timeout:?}"),
            ))));
        }
        let heartbeat = match url.heartbeat() {
            Some(0) => None,
            Some(seconds) => Some(Duration::from_secs(seconds.into())),
            None => Some(DEFAULT_HEARTBEAT),
        };
        let connected = self.with_state(|state| {
            if !exempt && let Some((left, error)) = &mut state.faults.refuse_connections {
                let error = error.clone();
                *left -= 1;
                if *left == 0 {
                    state.faults.refuse_connections = None;
                }
                return Err(error);
            }
            let id = state.id();
            state.connections.insert(
                id,
                state::Connection {
                    name: name.to_owned(),
                    open: true,
                    channels: Default::default(),
                    events: Vec::new(),
                    blocked: None,
                    closed_because: None,
                    exempt,
                    heartbeat,
                },
            );
            Ok(id)
        });
        match connected {
            Ok(id) => Ok(MemoryConnection {
                memory: self.clone(),
                id,
            }),
            Err(source) => Err(failed(source)),
        }
    }

    /// Waits until the network is not stalled.
    async fn healed(&self) {
        loop {
            let notified = self.shared.stall.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.read(|state| state.stall.is_none()) {
                return;
            }
            notified.await;
        }
    }

    /// Waits while the network is stalled for `connection`, as a frame it sends would;
    /// fails once the connection is closed (by the client, the broker, or a lost heartbeat).
    async fn reachable(&self, connection: ConnId) -> Result<(), BrokerError> {
        loop {
            let notified = self.shared.stall.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let stalled = self.read(|state| match state.connections.get(&connection) {
                Some(open) if open.open => Ok(state.is_stalled(connection)),
                closed => Err(closed
                    .and_then(|c| c.closed_because.clone())
                    .unwrap_or_else(|| super::other("connection closed".to_owned()))),
            })?;
            if !stalled {
                return Ok(());
            }
            notified.await;
        }
    }
}

/// Dead-letters expired messages when their time comes, until the broker is dropped.
async fn expire(shared: Weak<Shared>, wake: Arc<Notify>) {
    loop {
        let next = {
            let Some(shared) = shared.upgrade() else {
                return;
            };
            let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
            state.expire(Instant::now())
        };
        match next {
            Some(at) => {
                tokio::select! {
                    () = tokio::time::sleep_until(at) => {}
                    () = wake.notified() => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

impl MemoryDeliveries {
    pub(crate) fn tag(&self) -> &str {
        &self.tag
    }
}

impl Stream for MemoryDeliveries {
    type Item = Result<Incoming, BrokerError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.receiver.poll_recv(cx)
    }
}

impl Future for MemoryConfirm {
    type Output = Result<Confirmed, BrokerError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            MemoryConfirm::Ready(ready) => Poll::Ready(ready.take().unwrap_or_else(|| {
                Err(super::other("confirm polled after it resolved".to_owned()))
            })),
            MemoryConfirm::Waiting(waiting) => Pin::new(waiting).poll(cx).map(|answer| {
                answer.unwrap_or_else(|_| {
                    Err(super::other(
                        "connection closed before the confirm".to_owned(),
                    ))
                })
            }),
        }
    }
}

impl Stream for MemoryEvents {
    type Item = Event;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.0.poll_recv(cx)
    }
}
