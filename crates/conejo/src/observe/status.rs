//! The service's connection state, observable by the application (health checks, metrics).

use std::collections::BTreeMap;

use tokio::sync::watch;

/// Where the service's connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConnectionState {
    /// Not started yet.
    Idle,
    /// Connecting for the first time; `attempt` counts the tries (1 for the first).
    Connecting {
        /// Connection attempts so far.
        attempt: u32,
    },
    /// Connected: the queues are being set up or consumed (see [`Status::is_ready`]).
    Connected,
    /// The connection was lost; reconnecting. `attempt` counts the tries since the loss.
    Reconnecting {
        /// Reconnection attempts since the connection was lost.
        attempt: u32,
    },
    /// Stopped: shut down, or failed.
    Stopped,
}

/// A snapshot of the service's state.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    /// The connection's state.
    state: ConnectionState,
    /// The broker's reason while it blocks the consuming connection (a resource alarm).
    blocked: Option<String>,
    /// The broker's reason while it blocks the publishing connection.
    publisher_blocked: Option<String>,
    /// Per queue: consuming right now.
    consuming: BTreeMap<String, bool>,
    /// Connections re-established after a loss.
    reconnects: u64,
    /// The broker address of the current connection (password redacted).
    address: Option<String>,
}

/// The service's live state: the connection, whether each queue is consuming, reconnects.
/// Cheap to clone; obtained with [`Conejo::status`](crate::Conejo::status) before or while
/// the service runs.
///
/// Readiness and liveness differ: a service that is reconnecting is alive (it will be back
/// by itself) but not ready (it is not consuming).
///
/// ```
/// # fn f(service: &conejo::Conejo) {
/// let status = service.status();
/// if !status.is_ready() {
///     println!("not consuming: {:?}", status.state());
/// }
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct Status {
    /// Follows the supervisor's updates.
    receiver: watch::Receiver<Snapshot>,
}

impl Status {
    /// The connection's state.
    #[must_use]
    pub fn state(&self) -> ConnectionState {
        self.receiver.borrow().state
    }

    /// Connected, not blocked, and every registered queue consuming.
    #[must_use]
    pub fn is_ready(&self) -> bool {
        let snapshot = self.receiver.borrow();
        snapshot.state == ConnectionState::Connected
            && snapshot.blocked.is_none()
            && snapshot.publisher_blocked.is_none()
            && snapshot.consuming.values().all(|&consuming| consuming)
    }

    /// Whether `queue` is being consumed right now (`None` for a queue not registered).
    #[must_use]
    pub fn is_consuming(&self, queue: &str) -> Option<bool> {
        self.receiver.borrow().consuming.get(queue).copied()
    }

    /// The broker's reason while it blocks one of the service's connections (flow control
    /// after a memory or disk alarm). RabbitMQ blocks the connections that publish: the
    /// publisher's (handlers' publishes, retry copies, dead letters) wait, while consuming
    /// and acks go on, on a connection of their own.
    #[must_use]
    pub fn blocked(&self) -> Option<String> {
        let snapshot = self.receiver.borrow();
        snapshot
            .blocked
            .clone()
            .or_else(|| snapshot.publisher_blocked.clone())
    }

    /// Connections re-established after a loss, since the service started.
    #[must_use]
    pub fn reconnects(&self) -> u64 {
        self.receiver.borrow().reconnects
    }

    /// The broker address of the current connection, password redacted.
    #[must_use]
    pub fn address(&self) -> Option<String> {
        self.receiver.borrow().address.clone()
    }

    /// Waits until the state changes (or the service is gone).
    pub async fn changed(&mut self) {
        if self.receiver.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// The supervisor's side of [`Status`].
#[derive(Debug)]
pub(crate) struct StatusWriter {
    sender: watch::Sender<Snapshot>,
}

impl StatusWriter {
    pub(crate) fn new(queues: impl IntoIterator<Item = String>) -> Self {
        let (sender, _) = watch::channel(Snapshot {
            state: ConnectionState::Idle,
            blocked: None,
            publisher_blocked: None,
            consuming: queues.into_iter().map(|queue| (queue, false)).collect(),
            reconnects: 0,
            address: None,
        });
        StatusWriter { sender }
    }

    pub(crate) fn subscribe(&self) -> Status {
        Status {
            receiver: self.sender.subscribe(),
        }
    }

    pub(crate) fn set_state(&self, state: ConnectionState) {
        self.sender.send_if_modified(|s| {
            let changed = s.state != state;
            s.state = state;
            if state != ConnectionState::Connected {
                s.blocked = None;
                s.address = None;
                s.consuming.values_mut().for_each(|c| *c = false);
            }
            changed
        });
    }

    pub(crate) fn connected(&self, address: String, reconnected: bool) {
        self.sender.send_modify(|s| {
            s.state = ConnectionState::Connected;
            s.address = Some(address);
            if reconnected {
                s.reconnects += 1;
            }
        });
    }

    pub(crate) fn set_blocked(&self, reason: Option<String>) {
        self.sender.send_modify(|s| s.blocked = reason);
    }

    pub(crate) fn set_publisher_blocked(&self, reason: Option<String>) {
        self.sender.send_if_modified(|s| {
            let changed = s.publisher_blocked != reason;
            s.publisher_blocked = reason;
            changed
        });
    }

    pub(crate) fn set_consuming(&self, queue: &str, consuming: bool) {
        self.sender
            .send_if_modified(|s| match s.consuming.get_mut(queue) {
                Some(c) if *c != consuming => {
                    *c = consuming;
                    true
                }
                _ => false,
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_connected_unblocked_and_consuming_everything() {
        let writer = StatusWriter::new(["a".to_owned(), "b".to_owned()]);
        let status = writer.subscribe();
        assert_eq!(status.state(), ConnectionState::Idle);
        writer.set_state(ConnectionState::Connecting { attempt: 1 });
        writer.connected("amqp://u:***@h".into(), false);
        writer.set_consuming("a", true);
        assert!(!status.is_ready());
        writer.set_consuming("b", true);
        assert!(status.is_ready());
        writer.set_blocked(Some("low on memory".into()));
        assert!(!status.is_ready());
        assert_eq!(status.blocked().as_deref(), Some("low on memory"));
        writer.set_blocked(None);
        writer.set_state(ConnectionState::Reconnecting { attempt: 1 });
        assert!(!status.is_ready());
        assert_eq!(status.is_consuming("a"), Some(false));
        assert_eq!(status.address(), None);
        writer.connected("amqp://u:***@h2".into(), true);
        assert_eq!(status.reconnects(), 1);
        assert_eq!(status.is_consuming("zzz"), None);
    }
}
