//! What the engine's and the publisher's own tests do with the in-memory broker without a
//! connection: publish as an outside publisher, declare, count, take what a queue holds,
//! list queues.

use bytes::Bytes;
use lapin::{BasicProperties, ExchangeKind, types::FieldTable};

use super::{Memory, state};
use crate::broker::{BrokerError, ExchangeOptions, Incoming, QueueOptions};

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
    /// Publishes as an outside publisher would (no channel): `Ok(false)` when no queue took
    /// it, an error when the exchange does not exist.
    pub(crate) fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: Bytes,
        properties: BasicProperties,
    ) -> Result<bool, BrokerError> {
        self.with_state(|state| {
            state
                .publish(None, exchange, routing_key, body, properties)
                .map(|routed| routed.queued)
        })
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
                    crate::broker::incoming(
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
}
