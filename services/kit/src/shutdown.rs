//! Graceful shutdown: one token that the signal handler, tests and `loadlab up` can trigger, and
//! that every server, worker and background loop watches.

use std::future::Future;

use tokio_util::sync::CancellationToken;

/// A cloneable shutdown signal.
#[derive(Debug, Clone, Default)]
pub struct Shutdown(CancellationToken);

impl Shutdown {
    /// A signal that has not fired.
    pub fn new() -> Self {
        Shutdown(CancellationToken::new())
    }

    /// Fires the signal for this token and its children.
    pub fn trigger(&self) {
        self.0.cancel();
    }

    /// Whether the signal has fired.
    pub fn is_triggered(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Resolves once the signal fires.
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        self.0.clone().cancelled_owned()
    }

    /// A token that fires with this one but can also be fired on its own (e.g. to stop one
    /// worker in a test without stopping the server).
    pub fn child(&self) -> Shutdown {
        Shutdown(self.0.child_token())
    }
}

/// Triggers `shutdown` on SIGTERM or Ctrl-C (SIGINT).
pub fn trigger_on_signals(shutdown: Shutdown) {
    tokio::spawn(async move {
        let ctrl_c = async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                tracing::warn!(error = %e, "cannot listen for Ctrl-C");
                std::future::pending::<()>().await;
            }
        };
        #[cfg(unix)]
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    std::future::pending::<()>().await;
                }
            }
        };
        #[cfg(not(unix))]
        let term = std::future::pending::<()>();
        tokio::select! {
            () = ctrl_c => tracing::info!("Ctrl-C received; shutting down"),
            () = term => tracing::info!("SIGTERM received; shutting down"),
            () = shutdown.wait() => return,
        }
        shutdown.trigger();
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn child_fires_with_parent_but_not_the_other_way() {
        let parent = Shutdown::new();
        let child = parent.child();
        child.trigger();
        assert!(child.is_triggered());
        assert!(!parent.is_triggered());
        let other = parent.child();
        parent.trigger();
        other.wait().await;
        assert!(other.is_triggered());
    }
}
