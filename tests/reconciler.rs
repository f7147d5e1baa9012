//! The reconciler driving real `llmctl worker` processes through the local provider: the warm
//! floor comes up by itself, demand raises ephemeral executors up to `max_replicas`, and when
//! demand stops they are reaped back to the floor after `idle_ttl`.

use std::process::Command;
use std::time::{Duration, Instant};

use llmctl_pool_controller::autoscaler::ScalingSpec;
use llmctl_pool_controller::provider::local::{LocalConfig, LocalProvider};
use llmctl_pool_controller::reconciler::{PoolConfig, PoolStatus, Reconciler};
use tokio::sync::watch;

const LLMCTL: &str = env!("CARGO_BIN_EXE_llmctl");

async fn wait_for(
    status: &mut watch::Receiver<PoolStatus>,
    what: &str,
    pred: impl Fn(&PoolStatus) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if pred(&status.borrow()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {:?}",
            *status.borrow()
        );
        let _ = tokio::time::timeout(Duration::from_millis(200), status.changed()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn warm_floor_burst_to_max_and_reap_back() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    assert!(
        Command::new(LLMCTL)
            .args(["model", "init", "--out", model.to_str().unwrap()])
            .status()
            .unwrap()
            .success()
    );
    let (provider, events) = LocalProvider::new(LocalConfig {
        program: LLMCTL.into(),
        args: vec![
            "worker".into(),
            "--model".into(),
            model.to_str().unwrap().into(),
            "--kv-cache-mib".into(),
            "16".into(),
        ],
        log_dir: dir.path().join("logs"),
        startup_timeout: Duration::from_secs(60),
    });
    let scaling = ScalingSpec {
        min_warm: 1,
        max_replicas: 3,
        target_concurrency: 1.0,
        stable_window: Duration::from_secs(2),
        panic_window: Duration::from_millis(500),
        idle_ttl: Duration::from_secs(1),
        ..ScalingSpec::default()
    };
    let config = PoolConfig {
        name: "p".into(),
        scaling,
        tick: Duration::from_millis(100),
        drain_grace: Duration::from_secs(5),
    };
    let (reconciler, mut status) = Reconciler::new(config, provider);
    let (demand, demand_rx) = tokio::sync::mpsc::channel(64);
    let task = tokio::spawn(reconciler.run(events, demand_rx));

    wait_for(&mut status, "the warm executor", |s| {
        s.ready == 1 && s.endpoints.len() == 1
    })
    .await;
    let warm_endpoint = status.borrow().endpoints[0].clone();

    // Three requests queued and in flight: two ephemerals join the warm one.
    let burst = tokio::spawn({
        let demand = demand.clone();
        async move {
            for _ in 0..40 {
                demand.send((2, 1)).await.unwrap();
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    wait_for(&mut status, "ephemerals up to max_replicas", |s| {
        s.ready == 3
    })
    .await;
    assert!(status.borrow().starting == 0 && status.borrow().endpoints.len() == 3);
    burst.abort();

    // Demand stops: after the stable window and idle_ttl, back to the warm floor.
    let quiet = tokio::spawn({
        let demand = demand.clone();
        async move {
            loop {
                if demand.send((0, 0)).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    wait_for(&mut status, "reaping to the warm floor", |s| {
        s.ready == 1 && s.draining == 0
    })
    .await;
    assert_eq!(
        status.borrow().endpoints,
        vec![warm_endpoint],
        "the warm executor is the one kept"
    );
    assert_eq!(status.borrow().failures, 0);
    quiet.abort();
    drop(demand);
    task.await.unwrap();
}
