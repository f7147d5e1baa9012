//! The llmctl pool controller: owns each executor pool.
//!
//! `spec` is the pool spec file; `autoscaler` the pure decision function (observations in,
//! decision out); `demand` sums the gateways' demand reports; `reconciler` drives a `provider`
//! (local child processes now, Kubernetes pods later) to the autoscaler's decisions;
//! `controller` assembles one reconciler per pool behind the control API (`api`); `metrics`
//! is the Prometheus registry; `crd` is the `InferencePool` custom resource. Still to come
//! (Kubernetes issue): the Kubernetes provider and leader election.

pub mod api;
pub mod autoscaler;
pub mod controller;
pub mod crd;
pub mod demand;
pub mod metrics;
pub mod provider;
pub mod reconciler;
pub mod spec;

use std::path::PathBuf;

/// `llmctl controller` options.
#[derive(Clone, Debug, clap::Args)]
pub struct ControllerArgs {
    /// The controller's TOML pool spec file (see docs/controller.md).
    #[arg(long, env = "LLMCTL_CONTROLLER_CONFIG")]
    pub config: PathBuf,
    /// The `llmctl` binary executors run as `llmctl worker` (default: this binary).
    #[arg(long)]
    pub worker_program: Option<PathBuf>,
}

/// Runs the controller until SIGTERM/SIGINT, then drains every executor and exits.
pub fn run(args: ControllerArgs) -> anyhow::Result<()> {
    let config = spec::ControllerConfig::load(&args.config)?;
    let program = match args.worker_program {
        Some(p) => p,
        None => std::env::current_exe()?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
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
