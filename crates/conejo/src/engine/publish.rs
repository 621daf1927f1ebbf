//! Republishing with publisher confirms: how retries reach their wait queue and dead letters
//! their exchange. A failed delivery is acked only once its copy is confirmed, so a crash in
//! between yields a duplicate at worst, never a loss.

use std::{collections::HashSet, sync::Arc, time::Duration};

use bytes::Bytes;
use lapin::BasicProperties;
use tokio::sync::Mutex;

use super::topology;
use crate::{
    broker::{BrokerError, Channel, Confirmed, Connection},
    config::topology::{Durability, wait_queue_name},
};

/// How long a publish may wait for its confirm.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a copy was not confirmed; the original delivery is then not acked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PublishError {
    /// Published with `mandatory`, but no queue was bound to take it.
    #[error("unroutable: returned by the broker ({code} {text})")]
    Returned {
        /// The broker's reply code (312 NO_ROUTE).
        code: u16,
        /// The broker's reply text.
        text: String,
    },
    /// The broker refused it (basic.nack).
    #[error("refused by the broker (publisher confirm nack)")]
    Nacked,
    /// The channel or connection failed, or the confirm did not come in time.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// One connection's publishing channel (confirm mode), reopened after a channel error (the
/// broker closes a channel that publishes to a missing exchange), and the wait queues
/// declared so far.
pub(crate) struct Publisher {
    /// The connection channels are opened on, and where the calls run.
    connection: Connection,
    /// The confirm-mode channel; `None` until first used or after it failed.
    channel: Arc<Mutex<Option<Channel>>>,
    /// Wait queues already declared on this connection (their names). Held across a
    /// declaration, so that deliveries failing together declare a new wait queue once.
    declared: Mutex<HashSet<String>>,
}

impl Publisher {
    pub(crate) fn new(connection: Connection) -> Self {
        Publisher {
            connection,
            channel: Arc::default(),
            declared: Mutex::default(),
        }
    }

    /// Publishes a copy (`mandatory`) and waits for the broker's confirm.
    pub(crate) async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: Bytes,
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        let slot = Arc::clone(&self.channel);
        let connection = self.connection.clone();
        let exchange = exchange.to_owned();
        let routing_key = routing_key.to_owned();
        let publish = async move {
            let channel = confirm_channel(&slot, &connection).await?;
            let result = async {
                channel
                    .publish(&exchange, &routing_key, true, &body, properties)
                    .await?
                    .await
            }
            .await;
            if result.is_err() && !channel.is_open() {
                slot.lock().await.take();
            }
            result
        };
        let confirmed = self
            .connection
            .run_within(CONFIRM_TIMEOUT, "publish", publish)
            .await?;
        match confirmed {
            Confirmed::Ack => Ok(()),
            Confirmed::Returned { code, text } => Err(PublishError::Returned { code, text }),
            Confirmed::Nack | Confirmed::NotRequested => Err(PublishError::Nacked),
        }
    }

    /// Forgets that `wait_queue` was declared (a copy sent to it came back unroutable: it
    /// was deleted), so that the next retry declares it again.
    pub(crate) async fn forget_wait_queue(&self, wait_queue: &str) {
        self.declared.lock().await.remove(wait_queue);
    }

    /// Declares `queue`'s wait queue for `ttl_ms` unless this connection already did.
    pub(crate) async fn ensure_wait_queue(
        &self,
        queue: &str,
        ttl_ms: u32,
        durability: Durability,
    ) -> Result<(), BrokerError> {
        let name = wait_queue_name(queue, ttl_ms);
        let mut declared = self.declared.lock().await;
        if declared.contains(&name) {
            return Ok(());
        }
        let connection = self.connection.clone();
        let queue = queue.to_owned();
        // A channel of its own: a refused declaration closes the channel it was made on.
        self.connection
            .run_within(CONFIRM_TIMEOUT, "declare wait queue", async move {
                let channel = connection.open_channel().await?;
                let declared =
                    topology::declare_wait_queue(&channel, &queue, ttl_ms, durability).await;
                let _ = channel.close("declared").await;
                declared
            })
            .await?;
        declared.insert(name);
        Ok(())
    }
}

/// The live confirm channel, opened (and put in confirm mode) when there is none.
async fn confirm_channel(
    slot: &Mutex<Option<Channel>>,
    connection: &Connection,
) -> Result<Channel, BrokerError> {
    let mut slot = slot.lock().await;
    if let Some(channel) = slot.as_ref()
        && channel.is_open()
    {
        return Ok(channel.clone());
    }
    let channel = connection.open_channel().await?;
    channel.confirm_select().await?;
    *slot = Some(channel.clone());
    Ok(channel)
}
