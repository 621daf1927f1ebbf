//! Faults a test injects into the in-memory broker, each as RabbitMQ (or the network) would
//! cause it: connections dropped (now, or after a delivery or a publish) or refused, channels
//! closed with a code, consumers cancelled, queues deleted, confirms nacked, withheld or
//! returned, a resource alarm, a stalled network. The harness's own connection is exempt.

use std::time::Duration;

use super::{
    Memory,
    state::{ChanId, ConnId, amqp_error},
};
use crate::broker::{BrokerError, Event};

impl Memory {
    /// Closes every open connection as an operator's `close_connection` does (320
    /// CONNECTION_FORCED with `reason`); returns how many.
    pub(crate) fn close_connections(&self, reason: &str) -> usize {
        self.with_state(|state| {
            let open: Vec<ConnId> = state
                .connections
                .iter()
                .filter(|(_, c)| c.open && !c.exempt)
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
            let mut channels: Vec<ChanId> = state
                .queues
                .get(queue)
                .map(|q| q.consumers.iter().map(|(channel, _)| *channel).collect())
                .unwrap_or_default();
            channels.retain(|channel| !state.is_exempt_channel(*channel));
            channels.dedup();
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

    /// Cancels `queue`'s consumers from the broker's side (`basic.cancel`, as when its
    /// leader moves): their streams end, the queue stays. Returns how many.
    pub(crate) fn cancel_consumers(&self, queue: &str) -> usize {
        self.with_state(|state| state.cancel_consumers(queue))
    }

    /// Closes, on the broker's side, every channel in confirm mode (the publishers') with
    /// `code` and `text`; returns how many.
    pub(crate) fn fail_publishers(&self, code: u16, text: &str) -> usize {
        self.with_state(|state| {
            let channels: Vec<ChanId> = state
                .channels
                .iter()
                .filter(|(_, c)| c.open && c.confirm)
                .map(|(&id, _)| id)
                .filter(|&id| !state.is_exempt_channel(id))
                .collect();
            for &channel in &channels {
                state.channel_error(channel, amqp_error(code, text.to_owned()));
            }
            channels.len()
        })
    }

    /// Returns the next `publishes` publishes as unroutable (312 NO_ROUTE when `mandatory`),
    /// routed to no queue.
    pub(crate) fn return_publishes(&self, publishes: u32) {
        self.with_state(|state| state.faults.return_publishes = publishes);
    }

    /// Withholds the confirms of the next `publishes` confirmed publishes (the messages are
    /// routed) until [`release_confirms`](Self::release_confirms), or their connection closes.
    pub(crate) fn withhold_confirms(&self, publishes: u32) {
        self.with_state(|state| state.faults.withhold_confirms = publishes);
    }

    /// Sends the confirms withheld so far; returns how many.
    pub(crate) fn release_confirms(&self) -> usize {
        self.with_state(|state| {
            let withheld = std::mem::take(&mut state.withheld);
            let released = withheld.len();
            for (_, done, answer) in withheld {
                let _ = done.send(answer);
            }
            released
        })
    }

    /// Drops the connection that receives the `deliveries`-th delivery from now (counted over
    /// every connection), once that delivery is sent: it is in the client's hands, unacked,
    /// and comes back redelivered.
    pub(crate) fn drop_after_deliveries(&self, deliveries: u32) {
        self.with_state(|state| {
            state.faults.drop_after_deliveries = (deliveries > 0).then_some(deliveries);
        });
    }

    /// Drops the connection that sends the `publishes`-th publish from now, once it is
    /// routed: the message is on the broker, its confirm is lost with the connection.
    pub(crate) fn drop_after_publishes(&self, publishes: u32) {
        self.with_state(|state| {
            state.faults.drop_after_publishes = (publishes > 0).then_some(publishes);
        });
    }

    /// Stalls the network, as a partition or a dead link does: nothing reaches the
    /// connections (deliveries, confirms, answers) and nothing they send reaches the broker;
    /// new connections get no answer. Each connection is lost after two of its heartbeat
    /// intervals without a frame (`MissingHeartbeatError`, lapin's error), the broker then
    /// requeueing what it held. [`heal`](Self::heal) ends it.
    pub(crate) fn stall(&self) {
        let doomed: Vec<(ConnId, Duration, u64)> = self.with_state(|state| {
            if state.stall.is_some() {
                return Vec::new();
            }
            state.stalls += 1;
            let stall = state.stalls;
            state.stall = Some(stall);
            state
                .connections
                .iter()
                .filter(|(_, c)| c.open && !c.exempt)
                .filter_map(|(&id, c)| c.heartbeat.map(|beat| (id, beat * 2, stall)))
                .collect()
        });
        for (connection, after, stall) in doomed {
            let memory = self.clone();
            self.handle.spawn(async move {
                tokio::time::sleep(after).await;
                memory.with_state(|state| {
                    if state.stall == Some(stall) {
                        let error = BrokerError::from(lapin::ErrorKind::MissingHeartbeatError);
                        state.close_connection(connection, Some(error));
                    }
                });
            });
        }
    }

    /// Ends a stall: held operations go on, deliveries flow again, new connections are
    /// answered.
    pub(crate) fn heal(&self) {
        self.with_state(|state| {
            state.stall = None;
            state.deliver();
        });
    }

    /// True while the network is stalled.
    pub(crate) fn is_stalled(&self) -> bool {
        self.with_state(|state| state.stall.is_some())
    }
}
