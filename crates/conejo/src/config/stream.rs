//! Stream queues ([`QueueConfig::stream`](crate::QueueConfig::stream)): where a consumer
//! starts reading ([`StreamOffset`]) and where the offset it reached is kept between runs
//! ([`OffsetStore`]).

use std::{
    error::Error as StdError,
    fmt,
    future::Future,
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use futures::future::BoxFuture;
use lapin::types::{AMQPValue, LongString};

/// What an [`OffsetStore`] fails with: any error, shown in the log and in
/// [`Error::OffsetStore`](crate::Error::OffsetStore).
pub type OffsetStoreError = Box<dyn StdError + Send + Sync>;

/// Where a stream queue's consumer starts reading, the first time it subscribes in a
/// process and the [`OffsetStore`] (if any) holds nothing for the queue: RabbitMQ's
/// `x-stream-offset` consumer argument.
///
/// Later subscriptions of the same process — after a lost connection or a closed channel —
/// resume after the last offset handled, whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamOffset {
    /// From the first message the stream still holds.
    First,
    /// From the last chunk the broker wrote (the last few messages, a batch of the
    /// publisher's).
    Last,
    /// Only messages published after the consumer subscribed.
    Next,
    /// From this offset (messages are numbered from 0 in the order the stream took them).
    Offset(u64),
    /// From the first chunk written at or after this time (second precision).
    Timestamp(SystemTime),
}

impl StreamOffset {
    /// The consumer argument's value.
    pub(crate) fn argument(self) -> AMQPValue {
        let spec = |name: &str| AMQPValue::LongString(LongString::from(name));
        match self {
            StreamOffset::First => spec("first"),
            StreamOffset::Last => spec("last"),
            StreamOffset::Next => spec("next"),
            StreamOffset::Offset(offset) => {
                AMQPValue::LongLongInt(i64::try_from(offset).unwrap_or(i64::MAX))
            }
            StreamOffset::Timestamp(at) => AMQPValue::Timestamp(
                at.duration_since(UNIX_EPOCH)
                    .map_or(0, |since| since.as_secs()),
            ),
        }
    }
}

/// Keeps the offset a stream queue's consumer reached, so that a restarted service resumes
/// after it instead of from its [`StreamOffset`]. RabbitMQ keeps no offsets for AMQP
/// consumers: the service does, in its database, a file, a key-value store.
///
/// conejo calls [`load`](Self::load) once per queue, before its first subscription in the
/// process, and [`store`](Self::store) with the *committed* offset: every message up to it
/// has been handled — acked, or dead-lettered with its dead letter confirmed — even though
/// with a concurrency above 1 they finish out of order. The calls come from one task per
/// queue, one at a time, on the handler runtime; a slow store is given only the latest
/// offset when it is ready for the next, so it never holds up the handlers. At shutdown the
/// last committed offset is stored before [`Conejo::run`](crate::Conejo::run) returns
/// (within the shutdown timeout). A failed store is logged and counted, and the next offset
/// is stored as usual.
///
/// At-least-once, as everywhere in conejo: what was handled after the last stored offset
/// is handled again after a crash. A handler that needs exactly-once effects stores
/// [`Context::stream_offset`](crate::Context::stream_offset) with them, in one transaction,
/// and skips what it has seen.
///
/// ```
/// use std::{collections::HashMap, sync::Mutex};
/// use conejo::{OffsetStore, OffsetStoreError};
///
/// #[derive(Default)]
/// struct InMemory(Mutex<HashMap<String, u64>>);
///
/// impl OffsetStore for InMemory {
///     async fn load(&self, queue: &str) -> Result<Option<u64>, OffsetStoreError> {
///         Ok(self.0.lock().unwrap().get(queue).copied())
///     }
///
///     async fn store(&self, queue: &str, offset: u64) -> Result<(), OffsetStoreError> {
///         self.0.lock().unwrap().insert(queue.to_owned(), offset);
///         Ok(())
///     }
/// }
/// ```
pub trait OffsetStore: Send + Sync + 'static {
    /// The last committed offset stored for `queue`; `None` when there is none (the
    /// consumer then starts from the queue's [`StreamOffset`]). An error stops the service
    /// at startup ([`Error::OffsetStore`](crate::Error::OffsetStore)): resuming from the
    /// wrong place is not something to do silently.
    fn load(
        &self,
        queue: &str,
    ) -> impl Future<Output = Result<Option<u64>, OffsetStoreError>> + Send;

    /// Every message of `queue` up to and including `offset` has been handled.
    fn store(
        &self,
        queue: &str,
        offset: u64,
    ) -> impl Future<Output = Result<(), OffsetStoreError>> + Send;
}

impl<S: OffsetStore> OffsetStore for Arc<S> {
    fn load(
        &self,
        queue: &str,
    ) -> impl Future<Output = Result<Option<u64>, OffsetStoreError>> + Send {
        (**self).load(queue)
    }

    fn store(
        &self,
        queue: &str,
        offset: u64,
    ) -> impl Future<Output = Result<(), OffsetStoreError>> + Send {
        (**self).store(queue, offset)
    }
}

/// An [`OffsetStore`] with its type erased, as a queue holds it.
pub(crate) trait DynOffsetStore: Send + Sync + 'static {
    fn load_boxed<'a>(
        &'a self,
        queue: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>, OffsetStoreError>>;

    fn store_boxed<'a>(
        &'a self,
        queue: &'a str,
        offset: u64,
    ) -> BoxFuture<'a, Result<(), OffsetStoreError>>;
}

impl<S: OffsetStore> DynOffsetStore for S {
    fn load_boxed<'a>(
        &'a self,
        queue: &'a str,
    ) -> BoxFuture<'a, Result<Option<u64>, OffsetStoreError>> {
        Box::pin(self.load(queue))
    }

    fn store_boxed<'a>(
        &'a self,
        queue: &'a str,
        offset: u64,
    ) -> BoxFuture<'a, Result<(), OffsetStoreError>> {
        Box::pin(self.store(queue, offset))
    }
}

/// A stream queue's consumption settings.
#[derive(Clone)]
pub(crate) struct StreamSettings {
    /// Where the first subscription starts when the store holds nothing.
    pub(crate) from: StreamOffset,
    /// Where the committed offset is kept.
    pub(crate) store: Option<Arc<dyn DynOffsetStore>>,
}

impl fmt::Debug for StreamSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StreamSettings")
            .field("from", &self.from)
            .field("store", &self.store.as_ref().map(|_| "custom"))
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offset_specs_are_the_brokers_consumer_argument() {
        let text = |value: AMQPValue| match value {
            AMQPValue::LongString(text) => text.to_string(),
            other => panic!("not a string: {other:?}"),
        };
        assert_eq!(text(StreamOffset::First.argument()), "first");
        assert_eq!(text(StreamOffset::Last.argument()), "last");
        assert_eq!(text(StreamOffset::Next.argument()), "next");
        assert_eq!(
            StreamOffset::Offset(42).argument(),
            AMQPValue::LongLongInt(42)
        );
        assert_eq!(
            StreamOffset::Offset(u64::MAX).argument(),
            AMQPValue::LongLongInt(i64::MAX)
        );
        let at = UNIX_EPOCH + std::time::Duration::from_millis(1_700_000_000_900);
        assert_eq!(
            StreamOffset::Timestamp(at).argument(),
            AMQPValue::Timestamp(1_700_000_000)
        );
    }
}
