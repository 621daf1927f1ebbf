//! The copies conejo publishes — retries to their wait queue, dead letters to their exchange,
//! counted redeliveries back to their queue — through the service's publisher, on its own
//! connection, confirmed. A failed delivery is acked only once its copy is confirmed, so a
//! crash in between yields a duplicate at worst, never a loss.

use std::collections::HashSet;

use bytes::Bytes;
use lapin::BasicProperties;
use tokio::sync::Mutex;

use super::topology;
use crate::{
    Publisher,
    config::topology::{Durability, wait_queue_name},
    publish::PublishError,
};

/// The service's publisher of copies, and the wait queues it declared so far.
pub(crate) struct Copies {
    /// Publishes, on the publisher's connection.
    publisher: Publisher,
    /// Wait queues declared on the publisher's current connection (their names), and that
    /// connection's generation. Held across a declaration, so that deliveries failing
    /// together declare a new wait queue once.
    declared: Mutex<(u64, HashSet<String>)>,
}

impl Copies {
    pub(crate) fn new(publisher: Publisher) -> Self {
        Copies {
            publisher,
            declared: Mutex::new((0, HashSet::new())),
        }
    }

    /// The service's publisher.
    pub(crate) fn publisher(&self) -> &Publisher {
        &self.publisher
    }

    /// Publishes a copy (`mandatory`) and waits for the broker's confirm.
    pub(crate) async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: Bytes,
        properties: BasicProperties,
    ) -> Result<(), PublishError> {
        self.publisher
            .send_copy(exchange, routing_key, body, properties)
            .await
    }

    /// Forgets that `wait_queue` was declared (a copy sent to it came back unroutable: it
    /// was deleted), so that the next retry declares it again.
    pub(crate) async fn forget_wait_queue(&self, wait_queue: &str) {
        self.declared.lock().await.1.remove(wait_queue);
    }

    /// Declares `queue`'s wait queue for `ttl_ms` unless the publisher's connection already
    /// did.
    pub(crate) async fn ensure_wait_queue(
        &self,
        queue: &str,
        ttl_ms: u32,
        durability: Durability,
    ) -> Result<(), PublishError> {
        let name = wait_queue_name(queue, ttl_ms);
        let mut declared = self.declared.lock().await;
        // What an earlier connection declared may be gone (a restarted broker keeps no
        // transient queue): only a declaration on the current one counts.
        if declared.0 == self.publisher.generation() && declared.1.contains(&name) {
            return Ok(());
        }
        let queue = queue.to_owned();
        // A channel of its own: a refused declaration closes the channel it was made on.
        let generation = self
            .publisher
            .on_connection(move |connection| async move {
                let channel = connection.open_channel().await?;
                let declared =
                    topology::declare_wait_queue(&channel, &queue, ttl_ms, durability).await;
                if channel.is_open() {
                    let _ = channel.close("declared").await;
                }
                declared
            })
            .await?;
        if declared.0 != generation {
            *declared = (generation, HashSet::new());
        }
        declared.1.insert(name);
        Ok(())
    }
}
