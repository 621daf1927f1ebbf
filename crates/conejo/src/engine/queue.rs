//! A registered queue: its handler, erased once when registered, and what outlives the
//! queue's channels and connections while the service runs — its settings, its pipeline's
//! workers, its concurrency slots, the deliveries in flight, its counters.

use std::{fmt, sync::Arc, time::Duration};

use tokio_util::task::TaskTracker;

use super::{
    cursor::Cursor,
    ordering::Sequencer,
    worker::{Work, Workers},
};
use crate::{
    Handler, QueueConfig,
    config::queue::ResolvedQueue,
    handler::{self, slot::Slots},
    observe::stats::QueueCounters,
    service::{BoxLayer, Layers, Service, Visit, assemble_with},
};

/// A queue as registered on the builder: name, handler, settings.
pub(crate) struct QueueSpec {
    /// The queue's name.
    pub(crate) name: Arc<str>,
    /// The handler, its pipeline not yet assembled.
    pub(crate) handler: Registration,
    /// Declaration and consumption settings.
    pub(crate) config: QueueConfig,
}

impl fmt::Debug for QueueSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("QueueSpec")
            .field("name", &self.name)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Builds the pipeline around a handler once the layers and the timeout are known, erased.
type Assemble = Box<dyn FnOnce(&[BoxLayer], Option<Duration>) -> Arc<dyn Work> + Send + Sync>;

/// A registered handler, until the service is built and its queue's pipeline assembled:
/// where the handler's type is erased, once.
pub(crate) struct Registration {
    /// Assembles the pipeline: monomorphic when the queue has no layers.
    assemble: Assemble,
    /// True for a [`Blocking`](crate::Blocking) handler.
    pub(crate) blocking: bool,
}

impl Registration {
    pub(crate) fn new<H: Handler>(handler: H) -> Self {
        Registration {
            blocking: handler::is_blocking(&handler),
            assemble: Box::new(move |layers, timeout| {
                assemble_with(handler, layers, timeout, IntoWork)
            }),
        }
    }
}

/// Erases a pipeline of its concrete type into what starts its workers.
struct IntoWork;

impl Visit for IntoWork {
    type Output = Arc<dyn Work>;

    fn visit<S: Service>(self, pipeline: S) -> Arc<dyn Work> {
        Arc::new(pipeline)
    }
}

impl fmt::Debug for Registration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registration")
            .field("blocking", &self.blocking)
            .finish_non_exhaustive()
    }
}

/// A registered queue while the service runs: what outlives its channels and connections.
pub(crate) struct Queue {
    /// Its settings, worked out once.
    pub(crate) settings: Arc<ResolvedQueue>,
    /// Concurrency slots, shared by every channel of the queue: a handler still running
    /// after its channel was lost keeps its slot, so the bound holds across reconnections.
    pub(crate) slots: Arc<Slots>,
    /// Every delivery of the queue in a worker's hands, whatever its channel; waited for at
    /// shutdown.
    pub(crate) tasks: TaskTracker,
    /// Channels the queue no longer consumes from whose handlers still run; waited for at
    /// shutdown.
    pub(crate) retiring: TaskTracker,
    /// The queue's workers, running its pipeline, started as deliveries need them.
    pub(crate) workers: Workers,
    /// This queue's counters.
    pub(crate) counters: Arc<QueueCounters>,
    /// Position in the builder, for consumer tags.
    pub(crate) index: usize,
    /// Per-key ordering, on an ordered queue.
    pub(crate) sequencer: Option<Arc<Sequencer>>,
    /// Where a stream queue's subscriptions start, and its committed offset.
    pub(crate) cursor: Option<Arc<Cursor>>,
}

impl Queue {
    pub(crate) fn new(
        spec: QueueSpec,
        service_layers: &Layers,
        index: usize,
        counters: Arc<QueueCounters>,
    ) -> Self {
        let settings = spec.config.settings(spec.name, spec.handler.blocking);
        // The queue's own layers inside the service's.
        let layers: Vec<BoxLayer> = spec
            .config
            .layers
            .0
            .iter()
            .chain(&service_layers.0)
            .cloned()
            .collect();
        let pipeline = (spec.handler.assemble)(&layers, settings.timeout);
        let sequencer = settings
            .ordered_by
            .as_ref()
            .map(|key| Arc::new(Sequencer::new(Arc::clone(key), Arc::clone(&counters))));
        if settings.single_active {
            counters.set_single_active();
        }
        let cursor = settings.stream.as_ref().map(|stream| {
            Arc::new(Cursor::new(
                Arc::clone(&settings.name),
                stream,
                Arc::clone(&counters),
            ))
        });
        Queue {
            cursor,
            slots: Slots::new(settings.concurrency),
            workers: Workers::new(pipeline, settings.concurrency, sequencer.clone()),
            sequencer,
            settings: Arc::new(settings),
            // The counters' tracker: `Stats` reads deliveries in flight from it.
            tasks: counters.tasks.clone(),
            retiring: TaskTracker::new(),
            counters,
            index,
        }
    }

    /// The queue's name.
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.settings.name
    }
}
