//! The controller on Kubernetes (`llmctl controller --kubernetes`): pools are the
//! `InferencePool` resources of the controller's namespace and executors are pods. Every replica
//! serves the control API; only the elected leader (a coordination Lease, `leader`) runs the
//! reconcilers (`pools`), and only it answers `/readyz` with 200, so the controller Service sends
//! gateways' watches and demand reports to the leader alone. While no leader is elected the
//! gateways keep serving from the last endpoint set they received. A replica that loses the
//! lease stops its reconcilers (the pods stay) and exits, to come back as a candidate.

pub mod leader;
pub mod pools;
pub mod status;

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Api, Client};

use crate::controller::Controller;
use leader::{Elector, LeaderConfig};

/// `llmctl controller --kubernetes` options (each also from the environment, as a Deployment
/// sets them).
#[derive(Clone, Debug, clap::Args)]
pub struct KubernetesArgs {
    /// The namespace whose pools this controller runs (default: its own, from the service
    /// account, or the kubeconfig's).
    #[arg(long, env = "LLMCTL_NAMESPACE")]
    pub namespace: Option<String>,
    /// The control API's address.
    #[arg(long, env = "LLMCTL_CONTROLLER_LISTEN", default_value = "0.0.0.0:8081")]
    pub listen: SocketAddr,
    /// This replica's name in the Lease and in Events (the pod name).
    #[arg(long, env = "POD_NAME", default_value = "llmctl-controller")]
    pub identity: String,
    /// The coordination Lease used for leader election.
    #[arg(long, env = "LLMCTL_LEADER_LEASE", default_value = "llmctl-controller")]
    pub lease: String,
    /// Time between the autoscaler's decisions, in milliseconds.
    #[arg(long, env = "LLMCTL_TICK_MS", default_value_t = 1000)]
    pub tick_ms: u64,
    /// A gateway that has not reported for this long no longer counts, in milliseconds.
    #[arg(long, env = "LLMCTL_DEMAND_TTL_MS", default_value_t = 10_000)]
    pub demand_ttl_ms: u64,
}

/// Runs until SIGTERM/SIGINT (then releases the lease) or until leadership is lost (an error,
/// so the pod restarts as a candidate).
pub async fn run(args: KubernetesArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let client = Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster service account or kubeconfig)")?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| client.default_namespace().to_owned());

    let controller = Controller::new(Duration::from_millis(args.demand_ttl_ms));
    controller.set_ready(false);
    let _refresh = controller.spawn_demand_refresh();
    let (addr, _api) = crate::api::listen(&controller, args.listen).await?;
    println!(
        "{}",
        serde_json::json!({"event": "listening", "addr": addr.to_string(), "namespace": namespace})
    );

    let mut elector = Elector::new(
        Api::namespaced(client.clone(), &namespace),
        LeaderConfig::new(&args.lease, &args.identity),
    );
    tokio::select! {
        _ = elector.acquire() => {}
        _ = term.recv() => return Ok(()),
        _ = int.recv() => return Ok(()),
    }
    controller.set_ready(true);
    let mut leadership = elector.keep();
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: "llmctl-controller".to_owned(),
            instance: Some(args.identity.clone()),
        },
    );
    let pools = pools::Pools::new(
        client,
        namespace,
        controller.clone(),
        recorder,
        Duration::from_millis(args.tick_ms),
    );
    let outcome = tokio::select! {
        _ = pools.run() => Err(anyhow::anyhow!("the InferencePool watch ended")),
        reason = leadership.lost() => Err(anyhow::anyhow!("lost leadership: {reason}")),
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
    };
    // The reconcilers stop; the pods stay for the next leader.
    controller.shutdown().await;
    if outcome.is_ok() {
        leadership.release().await;
    }
    outcome
}
