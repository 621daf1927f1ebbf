//! The client side of the in-memory broker: the connections and channels conejo (or the test
//! harness) opens, behind the broker boundary. Each operation waits first while the network
//! is stalled, as its frame would, then changes the state at once.

use bytes::Bytes;
use lapin::{BasicProperties, ExchangeKind, types::FieldTable};
use tokio::{
    runtime::Handle,
    sync::{mpsc, oneshot},
};

use super::{
    MemoryChannel, MemoryConfirm, MemoryConnection, MemoryDeliveries, MemoryEvents,
    state::{self, State, amqp_error},
};
use crate::broker::{
    BrokerError, Confirmed, ConsumeOptions, Event, ExchangeOptions, Got, QueueOptions, QueueState,
};

impl MemoryConnection {
    pub(crate) fn is_connected(&self) -> bool {
        self.memory
            .with_state(|state| state.connections.get(&self.id).is_some_and(|c| c.open))
    }

    pub(crate) fn handle(&self) -> &Handle {
        &self.memory.handle
    }

    pub(crate) async fn open_channel(&self) -> Result<MemoryChannel, BrokerError> {
        self.memory.reachable(self.id).await?;
        self.memory.with_state(|state| {
            if !state.connections.get(&self.id).is_some_and(|c| c.open) {
                return Err(closed(state, self.id));
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
                connection: self.id,
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
        self.memory.reachable(self.id).await?;
        self.memory
            .with_state(|state| state.close_connection(self.id, None));
        Ok(())
    }
}

/// The error of using connection `id` once it is closed: why it was, if the broker said.
fn closed(state: &State, id: state::ConnId) -> BrokerError {
    state
        .connections
        .get(&id)
        .and_then(|c| c.closed_because.clone())
        .unwrap_or_else(|| crate::broker::other("connection closed".to_owned()))
}

impl MemoryChannel {
    pub(crate) fn is_open(&self) -> bool {
        self.memory
            .with_state(|state| state.channels.get(&self.id).is_some_and(|c| c.open))
    }

    /// Waits while the network is stalled; then runs `change` on the state.
    async fn call<R>(
        &self,
        change: impl FnOnce(&mut State) -> Result<R, BrokerError>,
    ) -> Result<R, BrokerError> {
        self.memory.reachable(self.connection).await?;
        self.memory.with_state(change)
    }

    pub(crate) async fn qos(&self, prefetch: u16) -> Result<(), BrokerError> {
        self.call(|state| {
            state.channel(self.id)?.prefetch = prefetch;
            state.deliver();
            Ok(())
        })
        .await
    }

    pub(crate) async fn declare_exchange(
        &self,
        name: &str,
        kind: ExchangeKind,
        options: ExchangeOptions,
        arguments: FieldTable,
    ) -> Result<(), BrokerError> {
        self.call(|state| state.declare_exchange(self.id, name, kind, options, arguments))
            .await
    }

    pub(crate) async fn declare_queue(
        &self,
        name: &str,
        options: QueueOptions,
        arguments: FieldTable,
    ) -> Result<QueueState, BrokerError> {
        self.call(|state| state.declare_queue(self.id, name, options, arguments))
            .await
    }

    pub(crate) async fn delete_queue(&self, name: &str) -> Result<(), BrokerError> {
        self.call(|state| {
            state.channel(self.id)?;
            state.delete_queue(name);
            Ok(())
        })
        .await
    }

    pub(crate) async fn delete_exchange(&self, name: &str) -> Result<(), BrokerError> {
        self.call(|state| {
            state.channel(self.id)?;
            if !name.is_empty() && !name.starts_with("amq.") {
                state.exchanges.remove(name);
            }
            Ok(())
        })
        .await
    }

    pub(crate) async fn bind_queue(
        &self,
        queue: &str,
        exchange: &str,
        routing_key: &str,
        arguments: FieldTable,
    ) -> Result<(), BrokerError> {
        self.call(|state| state.bind_queue(self.id, queue, exchange, routing_key, arguments))
            .await
    }

    pub(crate) async fn consume(
        &self,
        queue: &str,
        tag: &str,
        options: ConsumeOptions,
    ) -> Result<MemoryDeliveries, BrokerError> {
        let (sender, receiver) = mpsc::unbounded_channel();
        self.call(|state| state.consume(self.id, queue, tag, options, sender))
            .await?;
        Ok(MemoryDeliveries {
            receiver,
            tag: tag.to_owned(),
        })
    }

    pub(crate) async fn cancel(&self, tag: &str) -> Result<(), BrokerError> {
        self.call(|state| state.cancel(self.id, tag)).await
    }

    pub(crate) async fn ack(&self, tag: u64, multiple: bool) -> Result<(), BrokerError> {
        self.call(|state| state.settle(self.id, tag, multiple, true, false))
            .await
    }

    pub(crate) async fn nack(
        &self,
        tag: u64,
        multiple: bool,
        requeue: bool,
    ) -> Result<(), BrokerError> {
        self.call(|state| state.settle(self.id, tag, multiple, false, requeue))
            .await
    }

    pub(crate) async fn confirm_select(&self) -> Result<(), BrokerError> {
        self.call(|state| {
            state.channel(self.id)?.confirm = true;
            Ok(())
        })
        .await
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
        self.call(|state| {
            let channel = state.channel(id)?;
            let connection = channel.connection;
            let confirm = channel.confirm;
            let publish = move |state: &mut State| -> Result<Confirmed, BrokerError> {
                route_publish(
                    state,
                    Publish {
                        channel: id,
                        connection,
                        confirm,
                        mandatory,
                        exchange,
                        routing_key,
                        body,
                        properties,
                    },
                )
            };
            // Under an alarm, a connection is blocked as it publishes (not the harness's).
            if let Some(reason) = state.alarm.clone()
                && let Some(publishing) = state.connections.get_mut(&connection)
                && publishing.blocked.is_none()
                && !publishing.exempt
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
                let answer = publish(state);
                if !withholds(state, connection, confirm, &answer) {
                    return Ok(MemoryConfirm::Ready(Some(answer)));
                }
                let (done, waiting) = oneshot::channel();
                state.withheld.push((connection, done, answer));
                return Ok(MemoryConfirm::Waiting(waiting));
            }
            let (done, waiting) = oneshot::channel();
            state.parked.push((
                connection,
                Box::new(move |state: &mut State| {
                    let answer = publish(state);
                    if withholds(state, connection, confirm, &answer) {
                        state.withheld.push((connection, done, answer));
                    } else {
                        let _ = done.send(answer);
                    }
                }),
            ));
            Ok(MemoryConfirm::Waiting(waiting))
        })
        .await
    }

    pub(crate) async fn get(&self, queue: &str) -> Result<Option<Got>, BrokerError> {
        let got = self.call(|state| state.get(self.id, queue)).await?;
        Ok(got.map(|(message, remaining)| Got { message, remaining }))
    }

    pub(crate) async fn close(&self) -> Result<(), BrokerError> {
        self.call(|state| {
            state.close_channel(self.id, None);
            Ok(())
        })
        .await
    }
}

/// One publish, as it reaches the broker.
struct Publish {
    channel: state::ChanId,
    connection: state::ConnId,
    confirm: bool,
    mandatory: bool,
    exchange: String,
    routing_key: String,
    body: Bytes,
    properties: BasicProperties,
}

/// Routes a publish, with the faults that apply to it: nacked, returned, or its connection
/// dropped once it is routed (the confirm lost with it).
fn route_publish(state: &mut State, publish: Publish) -> Result<Confirmed, BrokerError> {
    let Publish {
        channel,
        connection,
        confirm,
        mandatory,
        exchange,
        routing_key,
        body,
        properties,
    } = publish;
    // The harness's own publishes are passed by faults.
    let exempt = state.connections.get(&connection).is_some_and(|c| c.exempt);
    if exempt {
        let routed = state.publish(Some(channel), &exchange, &routing_key, body, properties)?;
        return Ok(answer(confirm, routed, mandatory));
    }
    if confirm && state.faults.nack_publishes > 0 {
        state.faults.nack_publishes -= 1;
        return Ok(Confirmed::Nack);
    }
    let routed = if state.faults.return_publishes > 0 {
        state.faults.return_publishes -= 1;
        state::Routed::default()
    } else {
        state.publish(Some(channel), &exchange, &routing_key, body, properties)?
    };
    if let Some(left) = &mut state.faults.drop_after_publishes {
        *left -= 1;
        if *left == 0 {
            state.faults.drop_after_publishes = None;
            let error = amqp_error(
                320,
                "CONNECTION_FORCED - dropped by the test after a publish".to_owned(),
            );
            state.close_connection(connection, Some(error.clone()));
            return Err(error);
        }
    }
    Ok(answer(confirm, routed, mandatory))
}

/// The broker's answer to a publish it routed (or not). A queue at its maximum length that
/// refused it gives a nack, not a return (it was routed).
fn answer(confirm: bool, routed: state::Routed, mandatory: bool) -> Confirmed {
    match (confirm, routed, mandatory) {
        (false, _, _) => Confirmed::NotRequested,
        (true, state::Routed { rejected: true, .. }, _) => Confirmed::Nack,
        (true, state::Routed { queued: false, .. }, true) => Confirmed::Returned {
            code: 312,
            text: "NO_ROUTE".to_owned(),
        },
        (true, _, _) => Confirmed::Ack,
    }
}

/// True when a fault withholds this confirm (it counts down).
fn withholds(
    state: &mut State,
    connection: state::ConnId,
    confirm: bool,
    answer: &Result<Confirmed, BrokerError>,
) -> bool {
    let exempt = state.connections.get(&connection).is_some_and(|c| c.exempt);
    if exempt || !confirm || answer.is_err() || state.faults.withhold_confirms == 0 {
        return false;
    }
    state.faults.withhold_confirms -= 1;
    true
}
