//! The llmctl pool controller: owns each executor pool.
//!
//! `spec` is the pool spec file; `autoscaler` the pure decision function (observations in,
//! decision out); `demand` sums the gateways' demand reports; `reconciler` drives a `provider`
//! (local child processes now, Kubernetes pods later) to the autoscaler's decisions, reading
//! each ready executor's own load from its `/metrics` through `scrape`;
//! `controller` assembles one reconciler per pool behind the control API (`api`); `metrics`
//! is the Prometheus registry; `crd` is the `InferencePool` custom resource; `kubernetes` runs
//! the controller in a cluster (pools from `InferencePool`s, executor pods through
//! `provider::kubernetes`, leader election on a Lease, status and Events on the resources);
//! `replay` runs the autoscaler over production traces in simulated time
//! (`llmctl autoscaler replay`).

pub mod api;
pub mod autoscaler;
pub mod controller;
pub mod crd;
pub mod demand;
pub mod kubernetes;
pub mod metrics;
pub mod provider;
pub mod reconciler;
pub mod replay;
pub mod scrape;
pub mod spec;

use std::path::PathBuf;

/// `llmctl controller` options: a local spec file, or `--kubernetes`.
#[derive(Clone, Debug, clap::Args)]
pub struct ControllerArgs {
    /// The controller's TOML pool spec file (see docs/controller.md).
    #[arg(
        long,
        env = "LLMCTL_CONTROLLER_CONFIG",
        required_unless_present = "kubernetes",
        conflicts_with = "kubernetes"
    )]
    pub config: Option<PathBuf>,
    /// The `llmctl` binary executors run as `llmctl worker` (default: this binary).
    #[arg(long)]
    pub worker_program: Option<PathBuf>,
    /// Run in a Kubernetes cluster: pools are the namespace's `InferencePool` resources and
    /// executors are pods (see docs/kubernetes.md).
    #[arg(long)]
    pub kubernetes: bool,
    #[command(flatten, next_help_heading = "Kubernetes")]
    pub cluster: kubernetes::KubernetesArgs,
}

/// Runs the controller until SIGTERM/SIGINT, then stops every pool (local executors are drained
/// and exit; Kubernetes pods stay for the next leader).
pub fn run(args: ControllerArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let Some(config) = args.config else {
        return runtime.block_on(kubernetes::run(args.cluster));
    };
    let config = spec::ControllerConfig::load(&config)?;
    let program = match args.worker_program {
        Some(p) => p,
        None => std::env::current_exe()?,
    };
    runtime.block_on(async {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let running = controller::start(config, program).await?;
        println!(
            "{}",
            serde_json::json!({"event": "listening", "addr": running.addr.to_string()})
        );
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stopping: draining every executor");
        running.shutdown().await;
        Ok(())
    })
}
