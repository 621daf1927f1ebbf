//! How a handler's publish ends, seen by both the handler and its delivery: the delivery is
//! not acked before every publish it made is confirmed.

use std::{sync::Mutex, time::Duration};

use tokio::{sync::Notify, time::Instant};

use super::error::PublishError;

/// One publish's outcome, set once by the link, awaited by any number of parties until its
/// deadline (the publish timeout).
#[derive(Debug)]
pub(crate) struct Completion {
    result: Mutex<Option<Result<(), PublishError>>>,
    done: Notify,
    /// When its waiters give up; the link does not send it after that.
    deadline: Instant,
    /// The publish timeout, for the error.
    timeout: Duration,
}

impl Completion {
    pub(crate) fn new(deadline: Instant) -> Self {
        Completion {
            result: Mutex::new(None),
            done: Notify::new(),
            deadline,
            timeout: deadline.saturating_duration_since(Instant::now()),
        }
    }

    /// True once its waiters gave up.
    pub(crate) fn expired(&self) -> bool {
        Instant::now() >= self.deadline
    }

    pub(crate) fn set(&self, result: Result<(), PublishError>) {
        *self.result.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
        self.done.notify_waiters();
    }

    pub(crate) async fn wait(&self) -> Result<(), PublishError> {
        let outcome = async {
            loop {
                let done = self.done.notified();
                if let Some(result) = self
                    .result
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone()
                {
                    return result;
                }
                done.await;
            }
        };
        tokio::time::timeout_at(self.deadline, outcome)
            .await
            .unwrap_or(Err(PublishError::Timeout(self.timeout)))
    }
}

/// The publishes one delivery made through its context, awaited before it is acked.
#[derive(Debug, Default)]
pub(crate) struct Ledger {
    pending: Mutex<Vec<std::sync::Arc<Completion>>>,
}

impl Ledger {
    pub(crate) fn track(&self, completion: std::sync::Arc<Completion>) {
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(completion);
    }

    /// Waits for every publish tracked; the first failure, if any.
    pub(crate) async fn settle(&self) -> Result<(), PublishError> {
        let pending = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let mut first = Ok(());
        for completion in pending {
            if let Err(error) = completion.wait().await
                && first.is_ok()
            {
                first = Err(error);
            }
        }
        first
    }
}
