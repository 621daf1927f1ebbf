//! The hand-over: the consume loop gives each delivery to one of its queue's workers, tasks
//! on the handler runtime that run deliveries one after the other. Started as the load needs
//! them (at most the concurrency), they end with the queue.
//!
//! A queue's pipeline is erased once, at registration, into a [`Work`]: the one virtual call
//! starts a worker, whose loop then calls the concrete pipeline — no allocation per delivery
//! for a queue without layers.

use std::{
    panic::AssertUnwindSafe,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering::AcqRel, Ordering::Acquire},
    },
};

use futures::{FutureExt, future::BoxFuture};

pub(crate) use super::job::Job;
use super::ordering::Sequencer;
use crate::service::Service;

/// A queue's pipeline, erased: what starts its workers.
pub(crate) trait Work: Send + Sync + 'static {
    /// A worker taking deliveries from `jobs` until the queue is gone.
    fn worker(
        self: Arc<Self>,
        jobs: flume::Receiver<Job>,
        idle: Arc<AtomicUsize>,
        sequencer: Option<Arc<Sequencer>>,
    ) -> BoxFuture<'static, ()>;
}

impl<S: Service> Work for S {
    fn worker(
        self: Arc<Self>,
        jobs: flume::Receiver<Job>,
        idle: Arc<AtomicUsize>,
        sequencer: Option<Arc<Sequencer>>,
    ) -> BoxFuture<'static, ()> {
        Box::pin(work(self, jobs, idle, sequencer))
    }
}

/// A queue's workers: the channel they take deliveries from, and how many wait unclaimed.
pub(crate) struct Workers {
    /// The pipeline each worker runs.
    pipeline: Arc<dyn Work>,
    /// Hands deliveries over.
    jobs: flume::Sender<Job>,
    /// Given to each new worker.
    receiver: flume::Receiver<Job>,
    /// Workers done with their delivery and not yet claimed by a next one.
    idle: Arc<AtomicUsize>,
    /// Workers started so far.
    started: AtomicUsize,
    /// At most this many workers: the queue's concurrency.
    limit: usize,
    /// Per-key ordering, on an ordered queue: told when each delivery ends.
    sequencer: Option<Arc<Sequencer>>,
}

impl Workers {
    pub(crate) fn new(
        pipeline: Arc<dyn Work>,
        limit: usize,
        sequencer: Option<Arc<Sequencer>>,
    ) -> Self {
        let (jobs, receiver) = flume::unbounded();
        Workers {
            pipeline,
            jobs,
            receiver,
            idle: Arc::new(AtomicUsize::new(0)),
            started: AtomicUsize::new(0),
            limit,
            sequencer,
        }
    }

    /// Hands a delivery to an idle worker, starting one (on the current, handler runtime)
    /// when none is idle: a queue has at most `limit` workers, and only as many as its load
    /// has needed at once — a worker per slot would cost every delivery a wake-up of a
    /// different task.
    ///
    /// The caller holds the delivery's concurrency slot, and a worker counts itself idle
    /// before it frees its slot, so a worker is free for this one. (A send fails only
    /// without workers; the job is then dropped, which gives the message back.)
    pub(crate) fn hand_over(&self, job: Job) {
        let claimed = self
            .idle
            .fetch_update(AcqRel, Acquire, |idle| idle.checked_sub(1))
            .is_ok();
        if !claimed && self.started.load(Acquire) < self.limit {
            self.started.fetch_add(1, AcqRel);
            tokio::spawn(Arc::clone(&self.pipeline).worker(
                self.receiver.clone(),
                Arc::clone(&self.idle),
                self.sequencer.clone(),
            ));
        }
        let _ = self.jobs.send(job);
    }
}

/// A worker of a queue: runs its deliveries one after the other until the queue is gone. A
/// panic that escapes a delivery (the handler's own are caught inside) drops that job — its
/// guard gives the message back — and the worker goes on.
async fn work<S: Service>(
    pipeline: Arc<S>,
    jobs: flume::Receiver<Job>,
    idle: Arc<AtomicUsize>,
    sequencer: Option<Arc<Sequencer>>,
) {
    while let Ok(job) = jobs.recv_async().await {
        let Job {
            unsettled,
            ctx,
            body,
            tracked: _tracked,
            key,
        } = job;
        let slot = AssertUnwindSafe(unsettled.process(&*pipeline, ctx, body))
            .catch_unwind()
            .await;
        // Its key's next delivery may start (once the consume loop has a slot for it).
        if let (Some(sequencer), Some(key)) = (&sequencer, key) {
            sequencer.finished(&key);
        }
        // Idle before the slot is free: the consume loop takes that slot for the next
        // delivery and then claims an idle worker, which must be counted by then — or it
        // would count a busy one as idle later, and a delivery could wait behind a long one
        // while the concurrency allows it to run.
        idle.fetch_add(1, AcqRel);
        drop(slot);
    }
}
