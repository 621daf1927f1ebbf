//! The in-memory transport (feature `test-util`): a broker in the process that behaves as
//! RabbitMQ does for what conejo uses — exchanges (direct, topic, fanout, headers, the
//! default), queues with their arguments (message TTL, dead-letter exchange and routing key,
//! quorum delivery counts and limits, exclusive), consumers with a prefetch, acks and
//! nacks (`multiple` included), publisher confirms and `mandatory` returns, `basic.get` —
//! and refuses what RabbitMQ refuses, with its reply codes: a passive declaration of
//! something missing (404), an inequivalent redeclaration or an unknown delivery tag (406),
//! a publish to a missing exchange (404, closing the channel).
//!
//! Time is tokio's: with a paused clock, a retry's wait queue expires as soon as the test
//! lets time pass. Faults are injected from the test side ([`Memory`]'s methods): closing
//! connections, refusing new ones, blocking publishers, closing a consumer's channel,
//! deleting a queue, nacking publishes.

mod route;
mod state;

use std::{
    pin::Pin,
    sync::{Arc, Mutex, Weak},
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::Stream;
use lapin::{BasicProperties, ExchangeKind, types::FieldTable};
use tokio::{
    runtime::Handle,
    sync::{Notify, mpsc, oneshot},
    time::Instant,
};

use self::state::{ChanId, ConnId, State, amqp_error};
use super::{
    AmqpUrl, BrokerError, Confirmed, ConsumeOptions, Event, ExchangeOptions, Got, Incoming,
    QueueOptions, QueueState,
};
use crate::Error;

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
    /// The connection is blocked: known once it is unblocked (or lost).
    Waiting(oneshot::Receiver<Result<Confirmed, BrokerError>>),
}

/// A connection's events.
pub(crate) struct MemoryEvents(mpsc::UnboundedReceiver<Event>);

/// What a test sees of one queue.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct QueueCounts {
    /// Messages ready.
    pub(crate) ready: usize,
    /// Messages delivered and not settled.
    pub(crate) unacked: usize,
    /// Consumers.
    pub(crate) consumers: usize,
    /// Messages ever routed to it.
    pub(crate) published: u64,
}

impl Memory {
    /// A fresh broker on the current runtime, with the `amq.*` exchanges.
    pub(crate) fn new() -> Self {
        let handle = Handle::current();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            expiry: Arc::new(Notify::new()),
        });
        handle.spawn(expire(Arc::downgrade(&shared), Arc::clone(&shared.expiry)));
        Memory { shared, handle }
    }

    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Runs `change` on the state; wakes the expiry task if it moved the earliest expiry.
    fn with_state<R>(&self, change: impl FnOnce(&mut State) -> R) -> R {
        let mut state = self.shared.state.lock().unwrap_or_else(|e| e.into_inner());
        let before = state.next_expiry;
        let result = change(&mut state);
        if state.next_expiry != before {
            self.shared.expiry.notify_one();
        }
        result
    }

    pub(crate) async fn connect(
        &self,
        url: &AmqpUrl,
        name: &str,
        _timeout: Duration,
    ) -> Result<MemoryConnection, Error> {
        let connected = self.with_state(|state| {
            if let Some((left, error)) = &mut state.faults.refuse_connections {
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
                },
            );
            Ok(id)
        });
        match connected {
            Ok(id) => Ok(MemoryConnection {
                memory: self.clone(),
                id,
            }),
            Err(source) => Err(Error::Connect {
                url: url.redacted().to_owned(),
                source,
            }),
        }
    }

    // ---- The test side: publish, look, inject faults.

    /// Publishes as an outside publisher would (no channel): `Ok(false)` when no queue took
    /// it, an error when the exchange does not exist.
    pub(crate) fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: Bytes,
        properties: BasicProperties,
    ) -> Result<bool, BrokerError> {
        self.with_state(|state| state.publish(None, exchange, routing_key, body, properties))
    }

    /// Declares a queue as an outside client would (a durable, non-exclusive one unless said).
    pub(crate) fn declare_queue(
        &self,
        name: &str,
        options: QueueOptions,
        arguments: FieldTable,
    ) -> Result<(), BrokerError> {
        self.with_state(|state| {
            let channel = state.id();
            state.channels.insert(
                channel,
                state::Channel {
                    open: true,
                    ..Default::default()
                },
            );
            let declared = state.declare_queue(channel, name, options, arguments);
            state.channels.remove(&channel);
            declared.map(drop)
        })
    }

    /// Declares an exchange as an outside client would.
    pub(crate) fn declare_exchange(
        &self,
        name: &str,
        kind: ExchangeKind,
        arguments: FieldTable,
    ) -> Result<(), BrokerError> {
        self.with_state(|state| {
            let channel = state.id();
            state.channels.insert(
                channel,
                state::Channel {
                    open: true,
                    ..Default::default()
                },
            );
            let options = ExchangeOptions {
                durable: true,
                ..ExchangeOptions::default()
            };
            let declared = state.declare_exchange(channel, name, kind, options, arguments);
            state.channels.remove(&channel);
            declared
        })
    }

    /// The counts of `queue`; `None` when it does not exist.
    pub(crate) fn counts(&self, queue: &str) -> Option<QueueCounts> {
        self.with_state(|state| {
            state.queues.get(queue).map(|q| QueueCounts {
                ready: q.ready.len(),
                unacked: q.unacked,
                consumers: q.consumers.len(),
                published: q.published,
            })
        })
    }

    /// Takes every ready message of `queue`, in order (as a drain would).
    pub(crate) fn take(&self, queue: &str) -> Vec<Incoming> {
        self.with_state(|state| {
            let Some(target) = state.queues.get_mut(queue) else {
                return Vec::new();
            };
            target
                .ready
                .drain(..)
                .map(|message| {
                    super::incoming(
                        0,
                        message.exchange,
                        message.routing_key,
                        message.redelivered,
                        message.properties,
                        &message.body,
                    )
                })
                .collect()
        })
    }

    /// The names of the queues, sorted.
    pub(crate) fn queues(&self) -> Vec<String> {
        self.with_state(|state| {
            let mut names: Vec<String> = state.queues.keys().cloned().collect();
            names.sort();
            names
        })
    }

    /// The names of the open connections.
    pub(crate) fn connections(&self) -> Vec<String> {
        self.with_state(|state| {
            let mut names: Vec<String> = state
                .connections
                .values()
                .filter(|c| c.open)
                .map(|c| c.name.clone())
                .collect();
            names.sort();
            names
        })
    }

    /// Closes every open connection as an operator's `close_connection` does (320
    /// CONNECTION_FORCED with `reason`); returns how many.
    pub(crate) fn close_connections(&self, reason: &str) -> usize {
        self.with_state(|state| {
            let open: Vec<ConnId> = state
                .connections
                .iter()
                .filter(|(_, c)| c.open)
                .map(|(&id, _)| id)
                .collect();
            for &id in &open {
                let error = amqp_error(320, format!("CONNECTION_FORCED - {reason}"));
                state.close_connection(id, Some(error));
            }
            open.len()
        })
    }

    /// Refuses the next `attempts` connection attempts with the broker's `code` (403
    /// ACCESS_REFUSED for credentials, 530 NOT_ALLOWED for a virtual host) — or, with
    /// `None`, as an unreachable broker.
    pub(crate) fn refuse_connections(&self, attempts: u32, code: Option<u16>) {
        let error = match code {
            Some(code) => amqp_error(code, format!("refused by the test ({code})")),
            None => BrokerError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        };
        self.with_state(|state| {
            state.faults.refuse_connections = (attempts > 0).then_some((attempts, error));
        });
    }

    /// Raises a resource alarm, as RabbitMQ does under memory or disk pressure: every
    /// connection that publishes from now on is blocked (`connection.blocked`) and its
    /// publishes wait until [`unblock`](Self::unblock); connections that only consume go on.
    pub(crate) fn block(&self, reason: &str) {
        self.with_state(|state| state.alarm = Some(reason.to_owned()));
    }

    /// Clears the alarm: blocked connections are unblocked, their waiting publishes go on.
    pub(crate) fn unblock(&self) {
        self.with_state(|state| {
            state.alarm = None;
            for connection in state.connections.values_mut() {
                if connection.blocked.take().is_some() {
                    for listener in &connection.events {
                        let _ = listener.send(Event::Unblocked);
                    }
                }
            }
            let parked = std::mem::take(&mut state.parked);
            for (_, publish) in parked {
                publish(state);
            }
        });
    }

    /// Closes, on the broker's side, the channels consuming `queue` with `code` and `text`
    /// (406 PRECONDITION_FAILED for a consumer timeout); returns how many.
    pub(crate) fn fail_consumers(&self, queue: &str, code: u16, text: &str) -> usize {
        self.with_state(|state| {
            let channels: Vec<ChanId> = state
                .queues
                .get(queue)
                .map(|q| q.consumers.iter().map(|(channel, _)| *channel).collect())
                .unwrap_or_default();
            for &channel in &channels {
                state.channel_error(channel, amqp_error(code, text.to_owned()));
            }
            channels.len()
        })
    }

    /// Deletes `queue`: its consumers are cancelled by the broker; false if it did not exist.
    pub(crate) fn delete_queue(&self, queue: &str) -> bool {
        self.with_state(|state| state.delete_queue(queue))
    }

    /// Nacks the next `publishes` confirmed publishes (the broker could not take them).
    pub(crate) fn nack_publishes(&self, publishes: u32) {
        self.with_state(|state| state.faults.nack_publishes = publishes);
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

impl MemoryConnection {
    pub(crate) fn is_connected(&self) -> bool {
        self.memory
            .with_state(|state| state.connections.get(&self.id).is_some_and(|c| c.open))
    }

    pub(crate) fn handle(&self) -> &Handle {
        &self.memory.handle
    }

    fn closed(&self, state: &State) -> BrokerError {
        state
            .connections
            .get(&self.id)
            .and_then(|c| c.closed_because.clone())
            .unwrap_or_else(|| super::other("connection closed".to_owned()))
    }

    pub(crate) async fn open_channel(&self) -> Result<MemoryChannel, BrokerError> {
        self.memory.with_state(|state| {
            if !state.connections.get(&self.id).is_some_and(|c| c.open) {
                return Err(self.closed(state));
            }
            let id = state.id();
            state.channels.insert(
                id,
                state::Channel {
                    connection: self.id,
                    open: true,
                    ..Default::default()
                },
            );
            if let Some(connection) = state.connections.get_mut(&self.id) {
                connection.channels.insert(id);
            }
            Ok(MemoryChannel {
                memory: self.memory.clone(),
                id,
            })
        })
    }

    pub(crate) fn events(&self) -> MemoryEvents {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.memory.with_state(|state| {
            if let Some(connection) = state.connections.get_mut(&self.id) {
                if connection.open {
                    connection.events.push(sender);
                } else if let Some(error) = connection.closed_because.clone() {
                    let _ = sender.send(Event::Error(error));
                }
            }
        });
        MemoryEvents(receiver)
    }

    pub(crate) async fn close(&self) -> Result<(), BrokerError> {
        self.memory
            .with_state(|state| state.close_connection(self.id, None));
        Ok(())
    }
}

impl MemoryChannel {
    pub(crate) fn is_open(&self) -> bool {
        self.memory
            .with_state(|state| state.channels.get(&self.id).is_some_and(|c| c.open))
    }

    pub(crate) async fn qos(&self, prefetch: u16) -> Result<(), BrokerError> {
        self.memory.with_state(|state| {
            state.channel(self.id)?.prefetch = prefetch;
            state.deliver();
            Ok(())
        })
    }

    pub(crate) async fn declare_exchange(
        &self,
        name: &str,
        kind: ExchangeKind,
        options: ExchangeOptions,
        arguments: FieldTable,
    ) -> Result<(), BrokerError> {
        self.memory
            .with_state(|state| state.declare_exchange(self.id, name, kind, options, arguments))
    }

    pub(crate) async fn declare_queue(
        &self,
        name: &str,
        options: QueueOptions,
        arguments: FieldTable,
    ) -> Result<QueueState, BrokerError> {
        self.memory
            .with_state(|state| state.declare_queue(self.id, name, options, arguments))
    }

    pub(crate) async fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), BrokerError> {
        self.memory
            .with_state(|state| state.bind_queue(self.id, queue, exchange, routing_key, arguments))
    }

    pub(crate) async fn consume(
        &self,
        queue: &str,
        tag: &str,
        options: ConsumeOptions,
    ) -> Result<MemoryDeliveries, BrokerError> {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.memory
            .with_state(|state| state.consume(self.id, queue, tag, options, sender))?;
        Ok(MemoryDeliveries {
            receiver,
            tag: tag.to_owned(),
        })
    }

    pub(crate) async fn cancel(&self, tag: &str) -> Result<(), BrokerError> {
        self.memory.with_state(|state| state.cancel(self.id, tag))
    }

    pub(crate) async fn ack(&self, tag: u64, multiple: bool) -> Result<(), BrokerError> {
        self.memory
            .with_state(|state| state.settle(self.id, tag, multiple, true, false))
    }

    pub(crate) async fn nack(
        &self,
        tag: u64,
        multiple: bool,
        requeue: bool,
    ) -> Result<(), BrokerError> {
        self.memory
            .with_state(|state| state.settle(self.id, tag, multiple, false, requeue))
    }

    pub(crate) async fn confirm_select(&self) -> Result<(), BrokerError> {
        self.memory.with_state(|state| {
            state.channel(self.id)?.confirm = true;
            Ok(())
        })
    }

    pub(crate) async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        mandatory: bool,
        body: &[u8],
        properties: BasicProperties,
    ) -> Result<MemoryConfirm, BrokerError> {
        let (exchange, routing_key) = (exchange.to_owned(), routing_key.to_owned());
        let body = Bytes::copy_from_slice(body);
        let id = self.id;
        self.memory.with_state(|state| {
            let channel = state.channel(id)?;
            let connection = channel.connection;
            let confirm = channel.confirm;
            let publish = move |state: &mut State| -> Result<Confirmed, BrokerError> {
                if confirm && state.faults.nack_publishes > 0 {
                    state.faults.nack_publishes -= 1;
                    return Ok(Confirmed::Nack);
                }
                let routed = state.publish(Some(id), &exchange, &routing_key, body, properties)?;
                Ok(match (confirm, routed, mandatory) {
                    (false, _, _) => Confirmed::NotRequested,
                    (true, false, true) => Confirmed::Returned {
                        code: 312,
                        text: "NO_ROUTE".to_owned(),
                    },
                    (true, _, _) => Confirmed::Ack,
                })
            };
            // Under an alarm, a connection is blocked as it publishes.
            if let Some(reason) = state.alarm.clone()
                && let Some(publishing) = state.connections.get_mut(&connection)
                && publishing.blocked.is_none()
            {
                publishing.blocked = Some(reason.clone());
                for listener in &publishing.events {
                    let _ = listener.send(Event::Blocked(reason.clone()));
                }
            }
            let blocked = state
                .connections
                .get(&connection)
                .is_some_and(|c| c.blocked.is_some());
            if !blocked {
                return Ok(MemoryConfirm::Ready(Some(publish(state))));
            }
            let (done, waiting) = oneshot::channel();
            state.parked.push((
                connection,
                Box::new(move |state: &mut State| {
                    let _ = done.send(publish(state));
                }),
            ));
            Ok(MemoryConfirm::Waiting(waiting))
        })
    }

    pub(crate) async fn get(&self, queue: &str) -> Result<Option<Got>, BrokerError> {
        let got = self.memory.with_state(|state| state.get(self.id, queue))?;
        Ok(got.map(|(message, remaining)| Got { message, remaining }))
    }

    pub(crate) async fn close(&self) -> Result<(), BrokerError> {
        self.memory
            .with_state(|state| state.close_channel(self.id, None));
        Ok(())
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
