//! Process signals that start a graceful shutdown.

use std::future::Future;

use tracing::error;

/// Completes on SIGINT (Ctrl-C) or SIGTERM (what Kubernetes and Docker send).
///
/// The handlers are installed when this is called, not when the future is first polled: a
/// signal that arrives while conejo is still connecting must find them in place, or the
/// process would die with the signal's default action (exit 143, no log, messages not given
/// back).
pub(crate) fn terminate() -> impl Future<Output = ()> + Send {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        let interrupt = signal(SignalKind::interrupt());
        async move {
            match (term, interrupt) {
                (Ok(mut term), Ok(mut interrupt)) => {
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = interrupt.recv() => {}
                    }
                }
                (term, interrupt) => {
                    let err = term.err().or(interrupt.err());
                    error!(
                        ?err,
                        "cannot listen for SIGTERM/SIGINT; only Ctrl-C will stop the service"
                    );
                    let _ = tokio::signal::ctrl_c().await;
                }
            }
        }
    }
    #[cfg(not(unix))]
    {
        async {
            if let Err(err) = tokio::signal::ctrl_c().await {
                error!(%err, "cannot listen for Ctrl-C");
                std::future::pending::<()>().await;
            }
        }
    }
}
