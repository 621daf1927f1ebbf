//! A user-written layer: skips messages whose `message-id` was already processed.

use std::{
    collections::{HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::Duration,
};

use conejo::{
    Failure, HandlerError,
    service::{Delivery, Layer, Service},
};

/// Acks a message whose `message-id` this process already handled, without calling the
/// handler, and holds back a copy that arrives while its twin is still being handled
/// (retried a second later, by when the twin is done). Messages without an id pass.
///
/// The memory is per process and bounded (the `capacity` most recent ids): it absorbs the
/// duplicates at-least-once delivery produces (a redelivery after a lost ack, a publisher
/// retry). For an effect that must happen exactly once across restarts, record the id in
/// your database in the handler's own transaction.
#[derive(Debug, Clone)]
pub struct Idempotency {
    seen: Arc<Mutex<Seen>>,
}

/// Ids processed (oldest first, for eviction) and in progress.
#[derive(Debug)]
struct Seen {
    capacity: usize,
    done: HashSet<String>,
    order: VecDeque<String>,
    running: HashSet<String>,
}

impl Idempotency {
    /// Remembers up to `capacity` processed ids.
    pub fn new(capacity: usize) -> Self {
        Idempotency {
            seen: Arc::new(Mutex::new(Seen {
                capacity: capacity.max(1),
                done: HashSet::new(),
                order: VecDeque::new(),
                running: HashSet::new(),
            })),
        }
    }
}

impl<S> Layer<S> for Idempotency {
    type Service = Idempotent<S>;

    fn layer(&self, inner: S) -> Idempotent<S> {
        Idempotent {
            inner,
            seen: Arc::clone(&self.seen),
        }
    }
}

/// The service an [`Idempotency`] layer wraps around a queue's handler.
#[derive(Debug)]
pub struct Idempotent<S> {
    inner: S,
    seen: Arc<Mutex<Seen>>,
}

impl<S: Service> Service for Idempotent<S> {
    async fn call(&self, delivery: Delivery) -> Result<(), Failure> {
        let Some(id) = delivery.context().message_id().map(str::to_owned) else {
            return self.inner.call(delivery).await;
        };
        {
            let mut seen = self.seen.lock().unwrap();
            if seen.done.contains(&id) {
                tracing::info!(message_id = %id, "duplicate skipped");
                return Ok(());
            }
            if !seen.running.insert(id.clone()) {
                return Err(Failure::Handler(HandlerError::retry_after(
                    format!("message {id} is being handled right now"),
                    Duration::from_secs(1),
                )));
            }
        }
        let result = self.inner.call(delivery).await;
        let mut seen = self.seen.lock().unwrap();
        seen.running.remove(&id);
        if result.is_ok() && seen.done.insert(id.clone()) {
            seen.order.push_back(id);
            if seen.order.len() > seen.capacity
                && let Some(oldest) = seen.order.pop_front()
            {
                seen.done.remove(&oldest);
            }
        }
        result
    }
}
