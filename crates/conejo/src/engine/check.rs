//! `Conejo::check`: the startup's connect and declaration steps, run once, without consuming.

use std::fmt;

/// What [`Conejo::check`](crate::Conejo::check) found: the broker answered, and everything
/// the service declares at startup was declared (or, passive, found) with the arguments the
/// service asks for.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct CheckReport {
    /// The broker's address that answered, password redacted.
    pub address: String,
    /// The exchanges declared (or, passive, checked), in order.
    pub exchanges: Vec<String>,
    /// Each queue, in registration order.
    pub queues: Vec<QueueCheck>,
}

/// One queue of a [`CheckReport`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct QueueCheck {
    /// The queue's name.
    pub name: String,
    /// Messages ready in it, as the broker answered the declaration.
    pub messages: u32,
    /// Consumers on it (other instances of the service, or anyone else).
    pub consumers: u32,
    /// Where its dead letters go: conejo's `<queue>.dlx`, or the exchange the
    /// configuration names (found to exist).
    pub dead_letter_exchange: String,
    /// The concurrency it would be consumed with.
    pub concurrency: usize,
    /// The prefetch it would be consumed with.
    pub prefetch: u16,
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "broker {}: connected", self.address)?;
        for exchange in &self.exchanges {
            writeln!(f, "exchange {exchange}: ok")?;
        }
        for queue in &self.queues {
            writeln!(
                f,
                "queue {}: ok ({} ready, {} consumers; concurrency {}, prefetch {}; dead letters to {})",
                queue.name,
                queue.messages,
                queue.consumers,
                queue.concurrency,
                queue.prefetch,
                queue.dead_letter_exchange
            )?;
        }
        Ok(())
    }
}
