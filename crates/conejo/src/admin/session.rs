//! The short-lived connection of one operation, and reading a queue without settling it.

use std::time::Duration;

use lapin::types::FieldTable;

use super::error::AdminError;
use crate::{
    AmqpUrl,
    broker::{self, Broker, BrokerError, Channel, Connection, Incoming, QueueOptions, TlsSetup},
};

/// How long to wait for the broker to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long to wait for any one answer of the broker (a `basic.get`, a confirm…).
const BROKER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the connection to close before giving up on it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection of its own for one operation, on the caller's runtime: an operator's tool
/// runs no handlers that could starve it.
pub(super) struct Session {
    /// The connection, closed by [`Session::close`] (which requeues anything unsettled).
    connection: Connection,
}

impl Session {
    pub(super) async fn open(url: &AmqpUrl) -> Result<Session, AdminError> {
        let broker =
            Broker::amqp(TlsSetup::default(), false).map_err(|error| AdminError::Connect {
                url: url.redacted().to_owned(),
                source: broker::other(error.to_string()),
            })?;
        match broker.connect(url, "conejo-admin", CONNECT_TIMEOUT).await {
            Ok(connection) => Ok(Session { connection }),
            Err(crate::Error::Connect { url, source }) => Err(AdminError::Connect { url, source }),
            Err(other) => Err(AdminError::Connect {
                url: url.redacted().to_owned(),
                source: broker::other(other.to_string()),
            }),
        }
    }

    /// Opens a channel to work on `queue`.
    pub(super) async fn channel(&self, queue: &str) -> Result<Channel, AdminError> {
        step(queue, "open channel", self.connection.open_channel()).await
    }

    /// Closes the connection: the broker requeues whatever was left unsettled. Best effort:
    /// the operation's own result is what matters.
    pub(super) async fn close(self) {
        let close = self.connection.close("conejo-admin done");
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
    }
}

/// Awaits one broker operation on `queue`, within [`BROKER_TIMEOUT`].
pub(super) async fn step<T>(
    queue: &str,
    step: &'static str,
    operation: impl Future<Output = Result<T, BrokerError>>,
) -> Result<T, AdminError> {
    match tokio::time::timeout(BROKER_TIMEOUT, operation).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(source)) => Err(AdminError::Broker {
            queue: queue.to_owned(),
            step,
            source,
        }),
        Err(_) => Err(AdminError::Timeout {
            queue: queue.to_owned(),
            step,
            after: BROKER_TIMEOUT,
        }),
    }
}

/// Checks that `queue` exists (a passive declaration, which closes `channel` if not) and
/// returns its count of ready messages.
pub(super) async fn ready_count(channel: &Channel, queue: &str) -> Result<u32, AdminError> {
    let options = QueueOptions {
        passive: true,
        ..QueueOptions::default()
    };
    let declare = channel.declare_queue(queue, options, FieldTable::default());
    match step(queue, "queue.declare (passive)", declare).await {
        Ok(declared) => Ok(declared.messages),
        Err(AdminError::Broker { source, .. }) if broker::is_not_found(&source) => {
            Err(AdminError::QueueNotFound {
                queue: queue.to_owned(),
            })
        }
        Err(other) => Err(other),
    }
}

/// What [`peek`] saw.
pub(super) struct Scan {
    /// Ready messages when it started.
    pub(super) ready: u32,
    /// Messages read.
    pub(super) read: u64,
    /// True when it read up to the end of the queue.
    pub(super) complete: bool,
}

/// Reads up to `limit` messages of `queue` in order without settling them, hands each to
/// `each`, then gives them all back in their places (`basic.nack`, multiple, requeue).
pub(super) async fn peek(
    session: &Session,
    queue: &str,
    limit: u64,
    mut each: impl FnMut(Incoming),
) -> Result<Scan, AdminError> {
    let channel = session.channel(queue).await?;
    let ready = ready_count(&channel, queue).await?;
    let (mut read, mut complete, mut last_tag) = (0, ready == 0, None);
    while read < limit {
        let Some(got) = step(queue, "basic.get", channel.get(queue)).await? else {
            complete = true;
            break;
        };
        read += 1;
        complete = got.remaining == 0;
        last_tag = Some(got.message.delivery_tag);
        each(got.message);
    }
    if let Some(tag) = last_tag {
        step(queue, "basic.nack", channel.nack(tag, true, true)).await?;
    }
    // close-ok comes after the broker has processed the nack.
    step(
        queue,
        "channel.close",
        channel.close("conejo-admin: read only"),
    )
    .await?;
    Ok(Scan {
        ready,
        read,
        complete,
    })
}
