//! Providers make executors exist: the reconciler asks one to launch or terminate executors and
//! follows what happens to them through [`ExecutorEvent`]s. `local` runs `llmctl worker` child
//! processes on this machine; the Kubernetes provider (Kubernetes issue) creates pods.

pub mod local;

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
    /// Serving at `endpoint` (`host:port`).
    Ready { id: String, endpoint: String },
    /// Gone: exited, killed, or never became ready.
    Terminated { id: String, reason: String },
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("launching executor {id}: {reason}")]
    Launch { id: String, reason: String },
    #[error("no executor {0}")]
    Unknown(String),
}
