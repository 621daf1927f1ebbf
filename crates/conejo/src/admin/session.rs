//! The short-lived connection of one operation, and reading a queue without settling it.

use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicNackOptions, QueueDeclareOptions};
use lapin::types::{FieldTable, LongString, ShortString};
use lapin::{Channel, ConnectionProperties, ErrorKind};

use super::AdminError;
use crate::AmqpUrl;

/// How long to wait for the broker to accept the connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long to wait for any one answer of the broker (a `basic.get`, a confirm…).
const BROKER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for the connection to close before giving up on it.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection of its own for one operation.
pub(super) struct Session {
    /// The connection, closed by [`Session::close`] (which requeues anything unsettled).
    connection: lapin::Connection,
}

impl Session {
    pub(super) async fn open(url: &AmqpUrl) -> Result<Session, AdminError> {
        let properties = ConnectionProperties::default()
            .with_connection_name(LongString::from("conejo-admin"))
            .with_client_property(
                ShortString::from("product"),
                LongString::from(concat!("conejo-admin/", env!("CARGO_PKG_VERSION"))),
            );
        let connect = lapin::Connection::connect_uri(url.uri(), properties);
        let connect_error = |source| AdminError::Connect {
            url: url.redacted().to_owned(),
            source,
        };
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(connection) => Ok(Session {
                connection: connection.map_err(connect_error)?,
            }),
            Err(_) => Err(connect_error(lapin::Error::from(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("no answer within {CONNECT_TIMEOUT:?}"),
            )))),
        }
    }

    /// Opens a channel to work on `queue`.
    pub(super) async fn channel(&self, queue: &str) -> Result<Channel, AdminError> {
        step(queue, "open channel", self.connection.create_channel()).await
    }

    /// Closes the connection: the broker requeues whatever was left unsettled. Best effort:
    /// the operation's own result is what matters.
    pub(super) async fn close(self) {
        let close = self
            .connection
            .close(200, ShortString::from("conejo-admin done"));
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, close).await;
    }
}

/// Awaits one broker operation on `queue`, within [`BROKER_TIMEOUT`].
pub(super) async fn step<T>(
    queue: &str,
    step: &'static str,
    operation: impl Future<Output = lapin::Result<T>>,
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
    let options = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let declare = channel.queue_declare(queue.into(), options, FieldTable::default());
    match step(queue, "queue.declare (passive)", declare).await {
        Ok(declared) => Ok(declared.message_count()),
        Err(AdminError::Broker { source, .. }) if is_not_found(&source) => {
            Err(AdminError::QueueNotFound {
                queue: queue.to_owned(),
            })
        }
        Err(other) => Err(other),
    }
}

/// True for the broker's 404 NOT_FOUND (a passive declaration of a missing queue).
fn is_not_found(error: &lapin::Error) -> bool {
    matches!(error.kind(), ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404)
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
    mut each: impl FnMut(lapin::message::Delivery),
) -> Result<Scan, AdminError> {
    let channel = session.channel(queue).await?;
    let ready = ready_count(&channel, queue).await?;
    let (mut read, mut complete, mut last_tag) = (0, ready == 0, None);
    while read < limit {
        let get = channel.basic_get(queue.into(), BasicGetOptions { no_ack: false });
        let Some(message) = step(queue, "basic.get", get).await? else {
            complete = true;
            break;
        };
        read += 1;
        complete = message.message_count == 0;
        last_tag = Some(message.delivery.delivery_tag);
        each(message.delivery);
    }
    if let Some(tag) = last_tag {
        let options = BasicNackOptions {
            multiple: true,
            requeue: true,
        };
        step(queue, "basic.nack", channel.basic_nack(tag, options)).await?;
    }
    // close-ok comes after the broker has processed the nack.
    let close = channel.close(200, ShortString::from("conejo-admin: read only"));
    step(queue, "channel.close", close).await?;
    Ok(Scan {
        ready,
        read,
        complete,
    })
}
