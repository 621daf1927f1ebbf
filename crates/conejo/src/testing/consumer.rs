//! A consumer of the harness's own, with manual acknowledgements — to see a prefetch window,
//! `multiple` acks, requeues and the redelivered flag as a client sees them — and a
//! capture: a queue of the harness's bound to an exchange, catching what a service
//! publishes there.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use futures::StreamExt;

use super::{TestBroker, TestError, TestMessage, TestQueue, client::answered};
use crate::broker::{Channel, ConsumeOptions, Deliveries};

/// Consumer tags and capture queues, unique in the process.
static NEXT: AtomicU64 = AtomicU64::new(1);

/// A consumer on a channel of its own, acknowledging manually.
pub struct TestConsumer {
    channel: Channel,
    deliveries: Deliveries,
    tag: String,
    queue: String,
}

/// One delivery to a [`TestConsumer`], to settle (or to leave unsettled: it goes back to its
/// queue when the consumer's channel closes).
pub struct TestDelivery {
    /// The message.
    pub message: TestMessage,
    /// Its delivery tag on the consumer's channel.
    pub tag: u64,
    channel: Channel,
}

impl TestBroker {
    /// Consumes `queue` on a channel of its own with a prefetch of `prefetch` (0: no
    /// limit).
    ///
    /// # Errors
    /// 404 when the queue does not exist; 403 when another consumer has it exclusively.
    pub async fn consume(&self, queue: &str, prefetch: u16) -> Result<TestConsumer, TestError> {
        let client = self.client().await?;
        let what = format!("consume '{queue}'");
        let channel = client.open_channel(&what).await?;
        answered(&what, channel.qos(prefetch)).await?;
        let tag = format!("conejo-test-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let deliveries = answered(
            &what,
            channel.consume(queue, &tag, ConsumeOptions::default()),
        )
        .await?;
        Ok(TestConsumer {
            channel,
            deliveries,
            tag,
            queue: queue.to_owned(),
        })
    }

    /// A queue of the harness's (exclusive, deleted with its connection) bound to `exchange`
    /// with `binding_key`: it catches what is published there from now on — a service's
    /// events, its replies.
    ///
    /// # Errors
    /// 404 when the exchange does not exist.
    pub async fn capture(&self, exchange: &str, binding_key: &str) -> Result<Capture, TestError> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let queue = self.name(&format!("conejo-test-capture-{n}"));
        self.declare_queue(&TestQueue::new(&queue).transient().exclusive())
            .await?;
        self.bind(&queue, exchange, binding_key).await?;
        Ok(Capture {
            broker: self.clone(),
            queue,
        })
    }
}

impl TestConsumer {
    /// The next delivery, waiting at most `within` (tokio's time); `None` if none came, or
    /// the consumer was cancelled and everything it was sent was taken.
    ///
    /// # Errors
    /// The error that closed the consumer's channel.
    pub async fn next(&mut self, within: Duration) -> Result<Option<TestDelivery>, TestError> {
        match tokio::time::timeout(within, self.deliveries.next()).await {
            Err(_) | Ok(None) => Ok(None),
            Ok(Some(Ok(incoming))) => Ok(Some(TestDelivery {
                tag: incoming.delivery_tag,
                message: TestMessage::from_incoming(incoming),
                channel: self.channel.clone(),
            })),
            Ok(Some(Err(error))) => Err(TestError::broker(
                format!("consume '{}'", self.queue),
                &error,
            )),
        }
    }

    /// Cancels the consumer (`basic.cancel`): nothing more is delivered; what it holds stays
    /// unacked until settled or its channel closes.
    ///
    /// # Errors
    /// When the channel is gone.
    pub async fn cancel(&self) -> Result<(), TestError> {
        answered(
            &format!("cancel the consumer of '{}'", self.queue),
            self.channel.cancel(&self.tag),
        )
        .await
    }

    /// Closes the consumer's channel: what it holds unacked goes back to the queue,
    /// redelivered.
    ///
    /// # Errors
    /// When the channel is gone.
    pub async fn close(self) -> Result<(), TestError> {
        answered(
            &format!("close the consumer of '{}'", self.queue),
            self.channel.close("test consumer closed"),
        )
        .await
    }
}

impl std::fmt::Debug for TestConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestConsumer")
            .field("queue", &self.queue)
            .field("tag", &self.tag)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for TestDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestDelivery")
            .field("tag", &self.tag)
            .field("message", &self.message)
            .finish_non_exhaustive()
    }
}

impl TestDelivery {
    async fn settle(
        &self,
        what: &str,
        ack: bool,
        multiple: bool,
        requeue: bool,
    ) -> Result<(), TestError> {
        let what = format!("{what} delivery {}", self.tag);
        if ack {
            answered(&what, self.channel.ack(self.tag, multiple)).await
        } else {
            answered(&what, self.channel.nack(self.tag, multiple, requeue)).await
        }
    }

    /// Acknowledges it.
    ///
    /// # Errors
    /// When the channel is gone (the broker then redelivers the message).
    pub async fn ack(self) -> Result<(), TestError> {
        self.settle("ack", true, false, false).await
    }

    /// Acknowledges it and every earlier unsettled delivery of the channel (`multiple`).
    ///
    /// # Errors
    /// When the channel is gone.
    pub async fn ack_multiple(self) -> Result<(), TestError> {
        self.settle("ack (multiple)", true, true, false).await
    }

    /// Gives it back to its queue (`basic.nack`, requeue): delivered again, redelivered.
    ///
    /// # Errors
    /// When the channel is gone.
    pub async fn requeue(self) -> Result<(), TestError> {
        self.settle("requeue", false, false, true).await
    }

    /// Rejects it (`basic.nack` without requeue): dead-lettered by its queue, or dropped.
    ///
    /// # Errors
    /// When the channel is gone.
    pub async fn reject(self) -> Result<(), TestError> {
        self.settle("reject", false, false, false).await
    }
}

/// What was published to an exchange since [`TestBroker::capture`] bound a queue to it.
#[derive(Debug, Clone)]
pub struct Capture {
    broker: TestBroker,
    queue: String,
}

impl Capture {
    /// The capture's queue.
    #[must_use]
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// Takes what was caught so far, in order.
    ///
    /// # Errors
    /// When the harness's connection failed.
    pub async fn take(&self) -> Result<Vec<TestMessage>, TestError> {
        self.broker.take(&self.queue).await
    }

    /// Waits until at least `count` messages were caught (at most `within` of tokio's
    /// time), then takes them all.
    ///
    /// # Errors
    /// [`TestError::Timeout`] if fewer came.
    pub async fn take_at_least(
        &self,
        count: usize,
        within: Duration,
    ) -> Result<Vec<TestMessage>, TestError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let ready = self.broker.ready(&self.queue).await?;
            if ready as usize >= count {
                return self.take().await;
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(TestError::Timeout {
                    what: format!("{count} messages in '{}' ({ready} came)", self.queue),
                    limit: within,
                });
            }
            tokio::time::sleep(super::POLL).await;
        }
    }
}
