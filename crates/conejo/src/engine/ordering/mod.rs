//! Per-key ordering of one queue ([`QueueConfig::ordered_by`](crate::QueueConfig::ordered_by)):
//! the consume loop admits each delivery by its key; a delivery whose key is busy waits here,
//! in delivery order, without a concurrency slot. When a key's delivery ends (its worker
//! says so), the key's next delivery becomes ready; the consume loop, which owns the slots,
//! hands ready deliveries over before taking new ones from the broker.
//!
//! Nothing here runs for a queue without ordering: its consume loop has no sequencer.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{Arc, Mutex, atomic::Ordering::Relaxed},
};

use tokio::{sync::Notify, time::Instant};

use super::job::Job;
use crate::{Context, config::ordering::KeyFn, observe::stats::QueueCounters};

/// The ordering state of one queue, shared by its consume loops and workers.
pub(crate) struct Sequencer {
    /// What a delivery's key is.
    key: KeyFn,
    state: Mutex<State>,
    /// Woken (one permit kept) when a delivery becomes ready.
    readied: Notify,
    /// Where the gauges go.
    counters: Arc<QueueCounters>,
}

#[derive(Default)]
struct State {
    /// Busy keys — a delivery of theirs is running or ready — and their deliveries waiting
    /// behind it, in delivery order.
    keys: HashMap<String, VecDeque<Waiting>>,
    /// Deliveries whose key became free, waiting for a concurrency slot, in that order.
    ready: VecDeque<Waiting>,
    /// When each waiting delivery began to wait, by its number: the first is the oldest.
    since: BTreeMap<u64, Instant>,
    /// Numbers waiting deliveries.
    next: u64,
}

/// A delivery waiting for its key, or for a slot once its key is free.
struct Waiting {
    job: Job,
    /// Its number in [`State::since`].
    number: u64,
}

impl Sequencer {
    pub(crate) fn new(key: KeyFn, counters: Arc<QueueCounters>) -> Self {
        Sequencer {
            key,
            state: Mutex::new(State::default()),
            readied: Notify::new(),
            counters,
        }
    }

    /// The ordering key of a delivery; `None` (unordered) if the user's key function
    /// panics.
    pub(crate) fn key_of(&self, ctx: &Context, body: &[u8]) -> Option<String> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.key)(ctx, body)))
            .unwrap_or_else(|_| {
                tracing::error!(
                    queue = ctx.queue(),
                    delivery_tag = ctx.delivery_tag(),
                    "the ordering key function panicked; handling the delivery unordered"
                );
                None
            })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a delivery (whose `key` is set): `Some` to start it now, its key free and now
    /// busy; `None` when its key is busy — it waits behind the key's earlier deliveries, its
    /// concurrency slot given back.
    pub(crate) fn admit(&self, job: Job) -> Option<Job> {
        let Some(key) = job.key.clone() else {
            return Some(job);
        };
        let mut state = self.state();
        let State {
            keys, since, next, ..
        } = &mut *state;
        match keys.get_mut(&key) {
            None => {
                keys.insert(key, VecDeque::new());
                self.publish(&state);
                Some(job)
            }
            Some(waiting) => {
                drop(job.ctx.take_slot());
                *next += 1;
                since.insert(*next, Instant::now());
                waiting.push_back(Waiting { job, number: *next });
                self.publish(&state);
                None
            }
        }
    }

    /// The delivery of `key` ended: its next one, if any, becomes ready; else the key is
    /// free.
    pub(crate) fn finished(&self, key: &str) {
        let mut state = self.state();
        let State { keys, ready, .. } = &mut *state;
        let readied = match keys.get_mut(key) {
            Some(waiting) => match waiting.pop_front() {
                Some(next) => {
                    ready.push_back(next);
                    true
                }
                None => {
                    keys.remove(key);
                    false
                }
            },
            None => false,
        };
        self.publish(&state);
        drop(state);
        if readied {
            self.readied.notify_one();
        }
    }

    /// The oldest ready delivery, to start with the caller's slot. Those of a lost channel
    /// are dropped on the way (their results could not be sent; the broker redelivers
    /// them), their keys going on.
    pub(crate) fn take_ready(&self) -> Option<Job> {
        loop {
            let next = {
                let mut state = self.state();
                let next = state.ready.pop_front();
                if let Some(next) = &next {
                    state.since.remove(&next.number);
                }
                self.publish(&state);
                next
            }?;
            if !next.job.unsettled.is_lost() {
                return Some(next.job);
            }
            let key = next.job.key.clone();
            next.job.unsettled.abandon();
            drop(next.job.ctx);
            if let Some(key) = key {
                self.finished(&key);
            }
        }
    }

    /// Waits until a delivery is ready (a permit is kept if none waits).
    pub(crate) async fn readied(&self) {
        self.readied.notified().await;
    }

    /// Takes every waiting and ready delivery (shutdown gives them back, unstarted). Keys
    /// stay busy until their running delivery ends.
    pub(crate) fn drain(&self) -> Vec<Job> {
        let mut state = self.state();
        let mut drained: Vec<Job> = state.ready.drain(..).map(|w| w.job).collect();
        for waiting in state.keys.values_mut() {
            drained.extend(waiting.drain(..).map(|w| w.job));
        }
        state.since.clear();
        self.publish(&state);
        drained
    }

    /// Drops the deliveries of lost channels (the broker redelivers them). Their keys go
    /// on: a waiting one's once the delivery running before it ends, a ready one's at once.
    pub(crate) fn discard_lost(&self) {
        let (mut lost, mut readied_keys) = (Vec::new(), Vec::new());
        {
            let mut state = self.state();
            let State {
                keys, ready, since, ..
            } = &mut *state;
            for waiting in keys.values_mut() {
                let (gone, kept): (VecDeque<Waiting>, VecDeque<Waiting>) =
                    waiting.drain(..).partition(|w| w.job.unsettled.is_lost());
                *waiting = kept;
                lost.extend(gone);
            }
            let (gone, kept): (VecDeque<Waiting>, VecDeque<Waiting>) =
                ready.drain(..).partition(|w| w.job.unsettled.is_lost());
            *ready = kept;
            readied_keys.extend(gone.iter().filter_map(|w| w.job.key.clone()));
            lost.extend(gone);
            for w in &lost {
                since.remove(&w.number);
            }
            self.publish(&state);
        }
        for waiting in lost {
            waiting.job.unsettled.abandon();
        }
        for key in readied_keys {
            self.finished(&key);
        }
    }

    /// Writes the gauges.
    fn publish(&self, state: &State) {
        let waiting: usize =
            state.keys.values().map(VecDeque::len).sum::<usize>() + state.ready.len();
        self.counters.key_waiting.store(waiting as u64, Relaxed);
        self.counters
            .keys_busy
            .store(state.keys.len() as u64, Relaxed);
        *self
            .counters
            .key_oldest_wait
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = state.since.values().next().copied();
    }
}

// Through the public harness (`conejo::testing`).
#[cfg(all(test, feature = "test-util"))]
mod tests;
