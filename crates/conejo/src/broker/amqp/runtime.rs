//! The connection runtime: a tokio runtime on its own OS thread where lapin's heartbeat timer,
//! its internal RPC loop and conejo's acknowledgement tasks run — and nothing else.
//!
//! lapin 4 spawns its heartbeat and internal RPC as tasks on the runtime it is given. When
//! that is the application's runtime and every worker is busy in handler code, heartbeats
//! stop and the broker closes the connection ("missed heartbeats from client"). Here no
//! handler code ever runs on the connection runtime, so it always has a thread to itself.

use std::{future::Future, thread};

use tokio::{runtime::Handle, sync::oneshot, task::JoinHandle};

use crate::Error;

/// Where lapin's tasks run.
#[derive(Debug)]
pub(crate) struct ConnectionRuntime {
    /// Spawns onto the runtime.
    handle: Handle,
    /// Dropping it stops the dedicated thread's runtime; `None` for a shared runtime.
    stop: Option<oneshot::Sender<()>>,
}

impl ConnectionRuntime {
    /// Starts a current-thread runtime on a dedicated thread named `conejo-connection`.
    pub(crate) fn dedicated() -> Result<Self, Error> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("conejo-connection")
            .build()
            .map_err(Error::Runtime)?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        thread::Builder::new()
            .name("conejo-connection".into())
            .spawn(move || {
                runtime.block_on(async {
                    // Err: the sender was dropped, which is the stop signal too.
                    let _ = stopped.await;
                });
                // Tasks still there (lapin's, after close) are dropped with the runtime.
                runtime.shutdown_background();
            })
            .map_err(Error::Runtime)?;
        Ok(ConnectionRuntime {
            handle,
            stop: Some(stop),
        })
    }

    /// lapin on the current runtime: for the operator's tools (`admin`), which run no
    /// handlers; and, through the hazard hook, for the tests that prove why a service must
    /// not do this.
    pub(crate) fn current() -> Self {
        ConnectionRuntime {
            handle: Handle::current(),
            stop: None,
        }
    }

    /// The runtime's handle, for lapin.
    pub(crate) fn handle(&self) -> &Handle {
        &self.handle
    }

    /// Runs a future on the connection runtime.
    pub(crate) fn spawn<F>(&self, future: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.spawn(future)
    }
}

impl Drop for ConnectionRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
