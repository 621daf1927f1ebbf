//! Faults a test injects into the in-memory broker: what RabbitMQ, an operator or the
//! network does to a service, on cue.

use crate::broker::memory::Memory;

/// Fault injection on the in-memory broker
/// ([`TestBroker::faults`](super::TestBroker::faults)). Each fault hits the service's
/// connections as RabbitMQ (or the network) would and never the harness's own, so the test
/// can go on publishing and reading queues through it.
///
/// ```
/// use conejo::{Conejo, Context, Handler, HandlerError};
/// use conejo::testing::{TestBroker, TestQueue};
///
/// struct Orders;
/// impl Handler for Orders {
///     type Message = String;
///     async fn handle(&self, _: String, _: &Context) -> Result<(), HandlerError> { Ok(()) }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), conejo::testing::TestError> {
/// let broker = TestBroker::memory();
/// broker.declare_queue(&TestQueue::new("orders")).await?;
/// let service = broker
///     .start(Conejo::builder(broker.url()).queue("orders", Orders))
///     .await?;
/// let faults = broker.faults().expect("the in-memory broker");
/// faults.drop_connection_after_deliveries(1); // the handler gets it, its ack is lost
/// broker.send("orders", "first").await?;
/// service.until("reconnected", |s| s.status().reconnects() == 1).await?;
/// service.idle().await?;
/// let handled: Vec<_> = service.handled("orders").iter().map(|h| h.outcome).collect();
/// // Handled, its ack lost with the connection; redelivered, counted (conejo's crash-loop
/// // detection on a classic queue), and handled again.
/// use conejo::testing::HandledAs::{Acked, RedeliveryCounted};
/// assert_eq!(handled, [Acked, RedeliveryCounted, Acked]);
/// assert_eq!(broker.ready("orders").await?, 0);
/// service.stop().await?;
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct Faults {
    memory: Memory,
}

impl Faults {
    pub(super) fn new(memory: Memory) -> Self {
        Faults { memory }
    }

    /// Closes every connection now, as an operator's `rabbitmqctl close_connection` does
    /// (320 CONNECTION_FORCED, with `reason`): what they held unacked goes back to its
    /// queues, redelivered. Returns how many were closed.
    pub fn drop_connections(&self, reason: &str) -> usize {
        self.memory.close_connections(reason)
    }

    /// Drops the connection that receives the `n`-th delivery from now, once that delivery
    /// is sent: the handler gets it, its ack cannot be sent, the broker redelivers it.
    pub fn drop_connection_after_deliveries(&self, n: u32) {
        self.memory.drop_after_deliveries(n);
    }

    /// Drops the connection that sends the `n`-th publish from now (a handler's event, a
    /// retry copy, a dead letter), once it is routed: the message is on the broker and its
    /// confirm is lost — the publisher sees the connection lost, and a retry makes a
    /// duplicate, as at-least-once allows.
    pub fn drop_connection_after_publishes(&self, n: u32) {
        self.memory.drop_after_publishes(n);
    }

    /// Refuses the next `attempts` connection attempts: with the broker's `code` (403
    /// ACCESS_REFUSED for credentials, 530 NOT_ALLOWED for a virtual host), or with `None`
    /// as an unreachable broker (connection refused).
    pub fn refuse_connections(&self, attempts: u32, code: Option<u16>) {
        self.memory.refuse_connections(attempts, code);
    }

    /// Closes the channels consuming `queue` as the broker does (a channel error with
    /// `code` and `text`; 406 PRECONDITION_FAILED is what a consumer timeout gives): their
    /// unacked deliveries go back. Returns how many channels were closed.
    pub fn close_consumer_channels(&self, queue: &str, code: u16, text: &str) -> usize {
        self.memory.fail_consumers(queue, code, text)
    }

    /// Closes the publishing channels (those in confirm mode) as the broker does, with
    /// `code` and `text`: their unconfirmed publishes are lost. Returns how many.
    pub fn close_publisher_channels(&self, code: u16, text: &str) -> usize {
        self.memory.fail_publishers(code, text)
    }

    /// Cancels `queue`'s consumers from the broker's side (`basic.cancel`, as when a
    /// quorum queue's leader moves): the queue stays. Returns how many.
    pub fn cancel_consumers(&self, queue: &str) -> usize {
        self.memory.cancel_consumers(queue)
    }

    /// Deletes `queue` as an operator would: its consumers are cancelled, its messages
    /// gone. False if it did not exist.
    pub fn delete_queue(&self, queue: &str) -> bool {
        self.memory.delete_queue(queue)
    }

    /// Nacks the next `n` confirmed publishes (the broker could not take them).
    pub fn nack_publishes(&self, n: u32) {
        self.memory.nack_publishes(n);
    }

    /// Returns the next `n` publishes as unroutable (312 NO_ROUTE when `mandatory`), as if
    /// no queue were bound.
    pub fn return_publishes(&self, n: u32) {
        self.memory.return_publishes(n);
    }

    /// Withholds the confirms of the next `n` confirmed publishes (the messages are routed)
    /// until [`release_confirms`](Self::release_confirms) or their connection closes.
    pub fn withhold_confirms(&self, n: u32) {
        self.memory.withhold_confirms(n);
    }

    /// Sends the confirms withheld so far; returns how many.
    pub fn release_confirms(&self) -> usize {
        self.memory.release_confirms()
    }

    /// Raises a resource alarm (memory or disk), as RabbitMQ does: each connection that
    /// publishes is blocked (`connection.blocked`) and its publishes wait; connections
    /// that only consume go on.
    pub fn block(&self, reason: &str) {
        self.memory.block(reason);
    }

    /// Clears the alarm: blocked connections go on, their held publishes are taken.
    pub fn unblock(&self) {
        self.memory.unblock();
    }

    /// Stalls the network: nothing reaches the service's connections or comes back from
    /// them, new connections get no answer. Each connection is lost after two of its
    /// heartbeat intervals without a frame (the URL's `?heartbeat=`, else RabbitMQ's 60 s)
    /// — lapin's missed-heartbeat error — and the broker requeues what it held.
    pub fn stall(&self) {
        self.memory.stall();
    }

    /// Ends a stall.
    pub fn heal(&self) {
        self.memory.heal();
    }

    /// True while the network is stalled.
    #[must_use]
    pub fn is_stalled(&self) -> bool {
        self.memory.is_stalled()
    }

    /// The names of the open connections (the service's, and the harness's).
    #[must_use]
    pub fn connections(&self) -> Vec<String> {
        self.memory.connections()
    }
}
