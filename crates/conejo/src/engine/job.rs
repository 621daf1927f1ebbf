//! One delivery between the consume loop and a worker: what it carries on the way.

use bytes::Bytes;
use tokio_util::task::task_tracker::TaskTrackerToken;

use super::dispatch::Unsettled;
use crate::Context;

/// One delivery, on its way to a worker.
pub(crate) struct Job {
    /// Settles it (or, dropped, gives it back).
    pub(crate) unsettled: Unsettled,
    /// Its metadata, holding its concurrency slot.
    pub(crate) ctx: Context,
    /// Its body.
    pub(crate) body: Bytes,
    /// Counted as in flight on its channel and its queue until the job is dropped.
    pub(crate) tracked: (TaskTrackerToken, TaskTrackerToken),
    /// Its ordering key, on an ordered queue: its worker tells the sequencer when it ends.
    pub(crate) key: Option<String>,
}
