//! Providers make executors exist: the reconciler asks one to launch or terminate executors and
//! follows what happens to them through [`ExecutorEvent`]s. `local` runs `llmctl worker` child
//! processes on this machine; `kubernetes` creates executor pods in the controller's namespace.

pub mod kubernetes;
pub mod local;

use std::future::Future;
use std::time::Duration;

use tokio::sync::mpsc;

use crate::autoscaler::Class;

/// What happened to an executor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExecutorEvent {
    /// Launched; not serving yet.
    Starting {
        id: String,
        class: Class,
        /// The process id, for providers that run processes.
        pid: Option<u32>,
    },
    /// Serving at `endpoint` (`host:port`); also sent when an executor that stopped being
    /// ready is ready again.
    Ready { id: String, endpoint: String },
    /// Was ready, is not any more (a failing readiness probe): out of the endpoint set until
    /// `Ready` again.
    Unready { id: String, reason: String },
    /// Gone: exited, killed, deleted, or never became ready.
    Terminated { id: String, reason: String },
}

/// An executor that already existed when the reconciler started (a restarted controller or a
/// new leader takes over the executors its predecessor left running).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Adopted {
    pub id: String,
    pub class: Class,
    /// Its address when it is serving already.
    pub endpoint: Option<String>,
    /// Leaving (terminal or being deleted): not counted as capacity, but its name is taken.
    pub leaving: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("launching executor {id}: {reason}")]
    Launch { id: String, reason: String },
    #[error("no executor {0}")]
    Unknown(String),
    #[error("terminating executor {id}: {reason}")]
    Terminate { id: String, reason: String },
}

/// The interface the reconciler drives. Progress after a call (ready, exited) arrives on the
/// provider's event stream, never as a return value, so both providers report the same way.
pub trait Provider: Send + Sync + 'static {
    /// The executors that exist before this reconciler launched any.
    fn adopt(&self) -> impl Future<Output = Vec<Adopted>> + Send;

    /// Starts executor `id`; returns once it has been created (process spawned, pod accepted).
    fn launch(
        &self,
        id: &str,
        class: Class,
    ) -> impl Future<Output = Result<(), ProviderError>> + Send;

    /// Asks executor `id` to drain and stop within `grace`.
    fn terminate(
        &self,
        id: &str,
        grace: Duration,
    ) -> impl Future<Output = Result<(), ProviderError>> + Send;

    /// The reconciler is stopping. The local provider drains its children and waits for them
    /// (they must not outlive the controller); the Kubernetes provider leaves its pods to the
    /// next leader.
    fn shutdown(
        self,
        grace: Duration,
        events: mpsc::UnboundedReceiver<ExecutorEvent>,
    ) -> impl Future<Output = ()> + Send;
}
