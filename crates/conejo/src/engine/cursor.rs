//! A stream queue's cursor: where each subscription starts, which offsets are handled, and
//! the committed offset — the highest one below which every message is done — kept in the
//! queue's [`OffsetStore`](crate::OffsetStore).
//!
//! A stream is not consumed destructively: an ack only gives the consumer credit, a message
//! not acked is never delivered again on the same subscription, and RabbitMQ keeps no
//! offset for AMQP consumers. So the cursor is the consumer's memory. Each subscription (a
//! channel) is an *epoch*: deliveries of older epochs no longer count, and a new one starts
//! after the committed offset — what was running when a connection was lost is delivered
//! again, at least once, never skipped.

use std::{collections::BTreeMap, sync::Arc, sync::Mutex, time::Duration};

use lapin::types::AMQPValue;
use tokio::sync::{OnceCell, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::settle::tracker::Settlement;
use crate::{
    Error,
    config::stream::{DynOffsetStore, StreamOffset, StreamSettings},
    observe::stats::QueueCounters,
};

/// One queue's cursor, shared by its channels.
pub(crate) struct Cursor {
    queue: Arc<str>,
    from: StreamOffset,
    store: Option<Arc<dyn DynOffsetStore>>,
    /// What the store held at startup, loaded once.
    loaded: OnceCell<Option<u64>>,
    state: Mutex<State>,
    /// The committed offset: every offset up to it is done. Changed under the state's lock;
    /// the store task follows it.
    committed: watch::Sender<Option<u64>>,
    /// The last offset stored, behind the lock every store call is made under.
    stored: Arc<tokio::sync::Mutex<Option<u64>>>,
    /// Stops the store task (after the final flush).
    stop: CancellationToken,
    counters: Arc<QueueCounters>,
}

#[derive(Debug, Default)]
struct State {
    /// The current subscription.
    epoch: u64,
    /// Offsets below this are not this subscription's to handle (it asked for this one).
    floor: Option<u64>,
    /// The first offset this subscription delivered.
    first: Option<u64>,
    /// Deliveries taken and not yet done: delivery tag → offset (both rise together).
    running: BTreeMap<u64, u64>,
    /// The highest offset done in this subscription.
    highest_done: Option<u64>,
}

/// A subscription: its epoch and the `x-stream-offset` argument it consumes with.
pub(crate) struct Subscription {
    pub(crate) epoch: u64,
    pub(crate) argument: AMQPValue,
}

impl Cursor {
    pub(crate) fn new(
        queue: Arc<str>,
        stream: &StreamSettings,
        counters: Arc<QueueCounters>,
    ) -> Self {
        Cursor {
            queue,
            from: stream.from,
            store: stream.store.clone(),
            loaded: OnceCell::new(),
            state: Mutex::new(State::default()),
            committed: watch::Sender::new(None),
            stored: Arc::default(),
            stop: CancellationToken::new(),
            counters,
        }
    }

    /// Starts a subscription: after the committed offset, else after the stored one (loaded
    /// on the first call, which also starts the store task), else from the queue's
    /// [`StreamOffset`].
    pub(crate) async fn subscribe(&self) -> Result<Subscription, Error> {
        let loaded =
            *self
                .loaded
                .get_or_try_init(|| async {
                    let Some(store) = &self.store else {
                        return Ok(None);
                    };
                    let loaded = store.load_boxed(&self.queue).await.map_err(|source| {
                        Error::OffsetStore {
                            queue: self.queue.to_string(),
                            source,
                        }
                    })?;
                    *self.stored.lock().await = loaded;
                    self.spawn_store_task(Arc::clone(store));
                    Ok::<_, Error>(loaded)
                })
                .await?;
        let mut state = self.lock();
        if self.committed.borrow().is_none() {
            self.committed.send_replace(loaded);
        }
        let start = match *self.committed.borrow() {
            Some(committed) => StreamOffset::Offset(committed.saturating_add(1)),
            None => self.from,
        };
        let epoch = state.epoch + 1;
        *state = State {
            epoch,
            floor: match start {
                StreamOffset::Offset(offset) => Some(offset),
                _ => None,
            },
            ..State::default()
        };
        info!(queue = %self.queue, from = ?start, "consuming the stream");
        Ok(Subscription {
            epoch,
            argument: start.argument(),
        })
    }

    /// A delivery of subscription `epoch` is taken. False when it is not to be handled: it
    /// comes before the offset the subscription asked for (a chunk the broker sent whole).
    pub(crate) fn admit(&self, epoch: u64, tag: u64, offset: Option<u64>) -> bool {
        let Some(offset) = offset else {
            // Not a stream delivery after all: handled, not tracked.
            return true;
        };
        let mut state = self.lock();
        if state.epoch != epoch {
            return true;
        }
        if state.floor.is_some_and(|floor| offset < floor) {
            return false;
        }
        state.first.get_or_insert(offset);
        state.running.insert(tag, offset);
        true
    }

    /// A delivery of subscription `epoch` ended so. Only what is done (acked, or
    /// dead-lettered and confirmed) moves the committed offset; a delivery given back stays
    /// below it, to be delivered again after the next subscription.
    pub(crate) fn settled(&self, epoch: u64, tag: u64, how: Settlement) {
        if how != Settlement::Ack {
            return;
        }
        let mut state = self.lock();
        if state.epoch != epoch {
            return;
        }
        let Some(offset) = state.running.remove(&tag) else {
            return;
        };
        state.highest_done = state.highest_done.max(Some(offset));
        let candidate = match state.running.values().next() {
            Some(&oldest) => oldest
                .checked_sub(1)
                .filter(|below| state.first.is_some_and(|first| *below >= first)),
            None => state.highest_done,
        };
        if candidate > *self.committed.borrow() {
            self.committed.send_replace(candidate);
            drop(state);
            self.counters.set_stream_offset(candidate);
        }
    }

    /// Stores the last committed offset, if the store has not got it yet, at most `limit`;
    /// then stops the store task.
    pub(crate) async fn flush(&self, limit: Duration) {
        let Some(store) = &self.store else {
            return;
        };
        let committed = *self.committed.borrow();
        let flushed = tokio::time::timeout(limit, async {
            let mut stored = self.stored.lock().await;
            if committed > *stored
                && let Some(offset) = committed
            {
                match store.store_boxed(&self.queue, offset).await {
                    Ok(()) => {
                        *stored = committed;
                        info!(queue = %self.queue, offset, "stream offset stored");
                    }
                    Err(error) => {
                        QueueCounters::add(&self.counters.offset_store_failures, 1);
                        warn!(queue = %self.queue, offset, %error, "cannot store the stream offset");
                    }
                }
            }
        })
        .await;
        if flushed.is_err() {
            warn!(queue = %self.queue, "storing the last stream offset took too long");
        }
        self.stop.cancel();
    }

    /// The task that keeps the store up to date: one call at a time, each with the latest
    /// committed offset.
    fn spawn_store_task(&self, store: Arc<dyn DynOffsetStore>) {
        let mut committed = self.committed.subscribe();
        let (queue, stored, stop) = (
            Arc::clone(&self.queue),
            Arc::clone(&self.stored),
            self.stop.clone(),
        );
        let counters = Arc::clone(&self.counters);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    changed = committed.changed() => if changed.is_err() { return },
                }
                let Some(offset) = *committed.borrow_and_update() else {
                    continue;
                };
                let mut last = stored.lock().await;
                if *last >= Some(offset) {
                    continue;
                }
                match store.store_boxed(&queue, offset).await {
                    Ok(()) => {
                        *last = Some(offset);
                        debug!(%queue, offset, "stream offset stored");
                    }
                    Err(error) => {
                        QueueCounters::add(&counters.offset_store_failures, 1);
                        warn!(%queue, offset, %error, "cannot store the stream offset; the next one will be");
                    }
                }
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex as StdMutex;

    use super::*;
    use crate::{OffsetStore, OffsetStoreError};

    #[derive(Default)]
    struct Remembers {
        offset: StdMutex<Option<u64>>,
        stores: StdMutex<Vec<u64>>,
    }

    impl OffsetStore for Remembers {
        async fn load(&self, _: &str) -> Result<Option<u64>, OffsetStoreError> {
            Ok(*self.offset.lock().unwrap())
        }

        async fn store(&self, _: &str, offset: u64) -> Result<(), OffsetStoreError> {
            *self.offset.lock().unwrap() = Some(offset);
            self.stores.lock().unwrap().push(offset);
            Ok(())
        }
    }

    fn cursor(from: StreamOffset, store: Option<Arc<Remembers>>) -> Cursor {
        let settings = StreamSettings {
            from,
            store: store.map(|s| s as Arc<dyn DynOffsetStore>),
        };
        Cursor::new(Arc::from("events"), &settings, Arc::default())
    }

    fn committed(cursor: &Cursor) -> Option<u64> {
        *cursor.committed.borrow()
    }

    #[tokio::test]
    async fn the_committed_offset_is_the_highest_with_everything_below_it_done() {
        let cursor = cursor(StreamOffset::First, None);
        let first = cursor.subscribe().await.unwrap();
        assert!(matches!(&first.argument, AMQPValue::LongString(s) if s.as_bytes() == b"first"));
        // Offsets 10..15 on tags 1..6 (the stream held older messages once).
        for (tag, offset) in (1..=5).zip(10..) {
            assert!(cursor.admit(first.epoch, tag, Some(offset)));
        }
        cursor.settled(first.epoch, 2, Settlement::Ack);
        cursor.settled(first.epoch, 3, Settlement::Ack);
        assert_eq!(committed(&cursor), None, "offset 10 still runs");
        cursor.settled(first.epoch, 1, Settlement::Ack);
        assert_eq!(committed(&cursor), Some(12));
        // Given back: it stays below the committed offset for good in this subscription.
        cursor.settled(first.epoch, 4, Settlement::Requeue);
        cursor.settled(first.epoch, 5, Settlement::Ack);
        assert_eq!(committed(&cursor), Some(12));
        assert_eq!(cursor.counters.snapshot().stream_offset, Some(12));

        // The next subscription starts after it; what the old one finishes late no longer
        // counts, and what comes before the asked-for offset is not handled.
        let second = cursor.subscribe().await.unwrap();
        assert_eq!(second.argument, AMQPValue::LongLongInt(13));
        cursor.settled(first.epoch, 4, Settlement::Ack);
        assert!(!cursor.admit(second.epoch, 1, Some(12)));
        assert!(cursor.admit(second.epoch, 2, Some(13)));
        assert!(cursor.admit(second.epoch, 3, Some(14)));
        cursor.settled(second.epoch, 3, Settlement::Ack);
        assert_eq!(committed(&cursor), Some(12));
        cursor.settled(second.epoch, 2, Settlement::Ack);
        assert_eq!(committed(&cursor), Some(14));
    }

    #[tokio::test]
    async fn a_subscription_from_next_commits_only_what_it_saw() {
        let cursor = cursor(StreamOffset::Next, None);
        let sub = cursor.subscribe().await.unwrap();
        assert!(cursor.admit(sub.epoch, 1, Some(100)));
        assert!(cursor.admit(sub.epoch, 2, Some(101)));
        cursor.settled(sub.epoch, 2, Settlement::Ack);
        // 100 runs, and 99 was never this consumer's to commit.
        assert_eq!(committed(&cursor), None);
        cursor.settled(sub.epoch, 1, Settlement::Ack);
        assert_eq!(committed(&cursor), Some(101));
    }

    #[tokio::test]
    async fn a_stored_offset_is_resumed_after_and_the_last_one_flushed() {
        let store = Arc::new(Remembers::default());
        *store.offset.lock().unwrap() = Some(41);
        let cursor = cursor(StreamOffset::First, Some(Arc::clone(&store)));
        let sub = cursor.subscribe().await.unwrap();
        assert_eq!(sub.argument, AMQPValue::LongLongInt(42));
        for (tag, offset) in (1..=3).zip(42..) {
            assert!(cursor.admit(sub.epoch, tag, Some(offset)));
            cursor.settled(sub.epoch, tag, Settlement::Ack);
        }
        cursor.flush(Duration::from_secs(5)).await;
        assert_eq!(*store.offset.lock().unwrap(), Some(44));
        let stores = store.stores.lock().unwrap().clone();
        assert!(stores.windows(2).all(|w| w[0] < w[1]), "{stores:?}");
        assert_eq!(stores.last(), Some(&44));
    }

    struct Broken;

    impl OffsetStore for Broken {
        async fn load(&self, _: &str) -> Result<Option<u64>, OffsetStoreError> {
            Err("the database is down".into())
        }

        async fn store(&self, _: &str, _: u64) -> Result<(), OffsetStoreError> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_store_that_cannot_load_stops_the_subscription() {
        let settings = StreamSettings {
            from: StreamOffset::First,
            store: Some(Arc::new(Broken)),
        };
        let cursor = Cursor::new(Arc::from("events"), &settings, Arc::default());
        let error = cursor.subscribe().await.err().expect("an error");
        assert!(matches!(error, Error::OffsetStore { .. }));
        assert_eq!(
            error.to_string(),
            "cannot load the stored offset of stream queue 'events': the database is down"
        );
    }
}
