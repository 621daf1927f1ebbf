//! A queue's concurrency slots: how many of its deliveries may be handled at once.
//!
//! A counting semaphore with a single waiter, the queue's consume loop: taking a slot is one
//! compare-and-swap, giving one back one atomic add (plus a wake-up only when the consume
//! loop may be waiting for it). tokio's `Semaphore` serves any number of waiters fairly,
//! which costs a lock on every release; a queue never needs that.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering::AcqRel, Ordering::Acquire},
};

use tokio::sync::Notify;

/// The slots of one queue, shared by all its channels.
#[derive(Debug)]
pub(crate) struct Slots {
    /// Slots not taken.
    free: AtomicUsize,
    /// Wakes the consume loop waiting in [`acquire`](Self::acquire) when a slot comes back.
    returned: Notify,
}

/// One slot taken; given back when dropped.
#[derive(Debug)]
pub(crate) struct Slot(Arc<Slots>);

impl Slots {
    pub(crate) fn new(count: usize) -> Arc<Self> {
        Arc::new(Slots {
            free: AtomicUsize::new(count),
            returned: Notify::new(),
        })
    }

    /// A slot if one is free.
    pub(crate) fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        self.free
            .fetch_update(AcqRel, Acquire, |free| free.checked_sub(1))
            .ok()
            .map(|_| Slot(Arc::clone(self)))
    }

    /// Waits for a free slot. One task at a time may wait (the queue's consume loop).
    pub(crate) async fn acquire(self: &Arc<Self>) -> Slot {
        loop {
            // Registered before the check, so a slot returned in between is not missed (a
            // `notify_one` without a waiter is kept for the next `notified`).
            let returned = self.returned.notified();
            if let Some(slot) = self.try_acquire() {
                return slot;
            }
            returned.await;
        }
    }

    /// Slots not taken.
    #[cfg(test)]
    fn free(&self) -> usize {
        self.free.load(Acquire)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        // Only a return to an empty pool can leave the waiter without a slot to take.
        if self.0.free.fetch_add(1, AcqRel) == 0 {
            self.0.returned.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn slots_are_bounded_and_come_back_on_drop() {
        let slots = Slots::new(2);
        let a = slots.try_acquire().expect("first");
        let b = slots.try_acquire().expect("second");
        assert!(slots.try_acquire().is_none());
        drop(a);
        assert_eq!(slots.free(), 1);
        let c = slots.try_acquire().expect("returned");
        drop((b, c));
        assert_eq!(slots.free(), 2);
    }

    #[tokio::test]
    async fn a_waiter_gets_the_slot_given_back() {
        let slots = Slots::new(1);
        let held = slots.try_acquire().expect("the only slot");
        let waiter = tokio::spawn({
            let slots = Arc::clone(&slots);
            async move { slots.acquire().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(held);
        let slot = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("woken")
            .expect("no panic");
        assert_eq!(slots.free(), 0);
        drop(slot);
        assert_eq!(slots.free(), 1);
    }

    /// Many returns racing one waiter that takes and returns slots: nothing is lost, the
    /// waiter is never left asleep with a slot free, and the count ends where it began.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_returns_never_strand_the_waiter() {
        let slots = Slots::new(3);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Slot>();
        let releaser = tokio::spawn(async move {
            let mut received = 0_u32;
            while let Some(slot) = rx.recv().await {
                received += 1;
                if received.is_multiple_of(3) {
                    tokio::task::yield_now().await;
                }
                drop(slot);
            }
        });
        for _ in 0..20_000 {
            let slot = tokio::time::timeout(Duration::from_secs(5), slots.acquire())
                .await
                .expect("a slot comes back");
            tx.send(slot).expect("releaser alive");
        }
        drop(tx);
        releaser.await.expect("no panic");
        assert_eq!(slots.free(), 3);
    }
}
