//! The test handlers, and the order message they take, that more than one module uses.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use conejo::{Context, Handler, HandlerError, Json};
use conejo_tests::Broker;
use serde::{Deserialize, Serialize};

/// How long [`HeldUntilReleased::wait_finished`] waits for a released call to end.
const WAIT: Duration = Duration::from_secs(20);

/// The message of the order tests: JSON, so that decoding is part of what they test.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(crate) struct Order {
    /// Names the order: the handlers record, hold or fail orders by id.
    pub(crate) id: u64,
    /// Empty in the orders a handler is meant to reject.
    pub(crate) sku: String,
}

/// Acks whatever it is given, undecoded: for tests about something else than handling.
pub(crate) struct AcksEverything;

impl Handler for AcksEverything {
    type Message = Vec<u8>;

    async fn handle(&self, _: Vec<u8>, _: &Context) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// Records every message it handles: (message id, redelivered), and the order ids.
#[derive(Clone, Default)]
pub(crate) struct RecordsOrders {
    /// (message id, redelivered, order id) of each call, in order: what the tests compare
    /// with what they published.
    seen: Arc<Mutex<Vec<(String, bool, u64)>>>,
}

impl RecordsOrders {
    /// What it recorded so far.
    pub(crate) fn seen(&self) -> Vec<(String, bool, u64)> {
        self.seen.lock().unwrap().clone()
    }
}

impl Handler for RecordsOrders {
    type Message = Json<Order>;

    async fn handle(&self, Json(order): Json<Order>, ctx: &Context) -> Result<(), HandlerError> {
        let id = ctx.message_id().unwrap_or_default().to_owned();
        self.seen
            .lock()
            .unwrap()
            .push((id, ctx.redelivered(), order.id));
        Ok(())
    }
}

/// Publishes orders `ids` to `queue`.
pub(crate) async fn publish_orders(
    broker: &Broker,
    queue: &str,
    ids: std::ops::Range<u64>,
) -> anyhow::Result<()> {
    let bodies = ids
        .map(|id| {
            serde_json::to_vec(&Order {
                id,
                sku: "S".into(),
            })
            .unwrap()
        })
        .collect();
    broker.publish_many_bytes(queue, bodies).await
}

/// Sleeps a pseudo-random 0–3 ms, so handlers finish out of order; order 100 runs until
/// 150 orders after it have been handled, more than the settle task holds behind a running
/// delivery, so the acks finished behind it are forced out one by one (a `multiple` ack
/// would ack it too). Counted in deliveries, not time: however fast the machine, the hold
/// covers about 150 acks, below the 256 that would move the queue to a fresh channel.
#[derive(Clone, Default)]
pub(crate) struct FinishesOutOfOrder {
    /// How many times each order was handled: exactly once each, or a duplicate count.
    pub(crate) handled: Arc<Mutex<HashMap<u64, u32>>>,
}

impl Handler for FinishesOutOfOrder {
    type Message = Json<Order>;

    async fn handle(&self, Json(order): Json<Order>, _ctx: &Context) -> Result<(), HandlerError> {
        if order.id == 100 {
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            loop {
                let after = self
                    .handled
                    .lock()
                    .unwrap()
                    .keys()
                    .filter(|&&id| id > 100)
                    .count();
                let now = std::time::Instant::now();
                if after >= 150 || now >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        } else {
            let pause = order.id.wrapping_mul(0x9E37_79B9) % 4;
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        *self.handled.lock().unwrap().entry(order.id).or_default() += 1;
        Ok(())
    }
}

/// Ignores its context's signal: call `n` runs until the test releases it (`release(n)`), at
/// most [`HELD_LIMIT`]. So a call outlives what the test does meanwhile (its connection
/// closed, its queue deleted) by construction, however long that takes to land (a forced
/// close is two `rabbitmqctl` runs: over 2 s on a cold machine, which is what made a fixed
/// 2 s sleep end, and ack, before the close).
#[derive(Clone, Default)]
pub(crate) struct HeldUntilReleased {
    /// When each call started: their number tells a redelivery has begun.
    pub(crate) calls: Arc<Mutex<Vec<std::time::Instant>>>,
    /// Calls that returned: none until the test releases them.
    pub(crate) finished: Arc<AtomicU64>,
    /// Wakes the held calls when [`HeldUntilReleased::release`] raises `releases`.
    released: Arc<tokio::sync::Notify>,
    /// Calls up to this number (counted from 1) may return.
    releases: Arc<AtomicU64>,
}

/// Bounds a held call whose test failed before releasing it.
const HELD_LIMIT: Duration = Duration::from_secs(60);

impl HeldUntilReleased {
    /// Lets calls up to the `n`th (counted from 1) return.
    pub(crate) fn release(&self, n: u64) {
        self.releases.fetch_max(n, Ordering::SeqCst);
        self.released.notify_waiters();
    }

    /// How many calls have started.
    pub(crate) fn calls(&self) -> usize {
        self.calls.lock().unwrap().len()
    }

    /// Waits (at most 20 s) until `n` calls have returned.
    pub(crate) async fn wait_finished(&self, n: u64) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + WAIT;
        while self.finished.load(Ordering::SeqCst) < n {
            anyhow::ensure!(std::time::Instant::now() < deadline, "call {n} never ended");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }
}

impl Handler for HeldUntilReleased {
    type Message = String;

    async fn handle(&self, _: String, _: &Context) -> Result<(), HandlerError> {
        let call = {
            let mut calls = self.calls.lock().unwrap();
            calls.push(std::time::Instant::now());
            calls.len() as u64
        };
        let released = async {
            loop {
                let notified = self.released.notified();
                if self.releases.load(Ordering::SeqCst) >= call {
                    return;
                }
                notified.await;
            }
        };
        let _ = tokio::time::timeout(HELD_LIMIT, released).await;
        self.finished.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}
