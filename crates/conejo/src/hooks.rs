//! Knobs for conejo's own hazard tests (feature `test-hooks`, not for services): lapin on
//! the handler runtime — the setup that loses its connection when handlers hog that
//! runtime — and a wedge that blocks the connection runtime, to show what a wedged one looks
//! like from outside. Without the feature, [`Hooks`] is empty and every knob is off.

/// The hooks a service was built with.
#[derive(Debug, Clone, Default)]
pub(crate) struct Hooks {
    /// Run lapin on the handler runtime instead of conejo's dedicated one.
    #[cfg(feature = "test-hooks")]
    pub(crate) lapin_on_handler_runtime: bool,
    /// Receives the connection runtime's handle once it exists.
    #[cfg(feature = "test-hooks")]
    pub(crate) wedge: RuntimeWedge,
}

impl Hooks {
    /// True when lapin must run on the handler runtime (a hazard test).
    pub(crate) fn lapin_on_handler_runtime(&self) -> bool {
        #[cfg(feature = "test-hooks")]
        return self.lapin_on_handler_runtime;
        #[cfg(not(feature = "test-hooks"))]
        false
    }

    /// The connection runtime is up: `handle` is where its tasks run.
    pub(crate) fn runtime_started(&self, handle: &tokio::runtime::Handle) {
        #[cfg(feature = "test-hooks")]
        self.wedge.set(handle);
        #[cfg(not(feature = "test-hooks"))]
        let _ = handle;
    }
}

/// Blocks conejo's connection runtime (the thread that runs lapin and answers heartbeats)
/// on demand, to prove what a wedged one looks like from outside — liveness failing,
/// heartbeats missed. From
/// [`Conejo::connection_runtime_wedge`](crate::Conejo::connection_runtime_wedge).
#[cfg(feature = "test-hooks")]
#[doc(hidden)]
#[derive(Debug, Clone, Default)]
pub struct RuntimeWedge {
    /// Set by the supervisor once the runtime exists.
    handle: std::sync::Arc<std::sync::OnceLock<tokio::runtime::Handle>>,
}

#[cfg(feature = "test-hooks")]
impl RuntimeWedge {
    fn set(&self, handle: &tokio::runtime::Handle) {
        let _ = self.handle.set(handle.clone());
    }

    /// Blocks the connection runtime's thread for `duration` (a `std::thread::sleep` in a
    /// task there). False if the service has not started its runtime yet.
    pub fn wedge(&self, duration: std::time::Duration) -> bool {
        match self.handle.get() {
            Some(handle) => {
                handle.spawn(async move { std::thread::sleep(duration) });
                true
            }
            None => false,
        }
    }
}
