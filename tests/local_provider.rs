//! The local provider with real `llmctl worker` processes: launch to ready (address from the
//! worker's stdout line, `/health` 200), logs in a file, SIGTERM drain, and the failure paths.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use llmctl_pool_controller::autoscaler::Class;
use llmctl_pool_controller::provider::local::{LocalConfig, LocalProvider};
use llmctl_pool_controller::provider::{ExecutorEvent, Provider};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LLMCTL: &str = env!("CARGO_BIN_EXE_llmctl");

fn tiny_model(dir: &Path) -> String {
    let out = dir.join("tiny");
    let status = Command::new(LLMCTL)
        .args(["model", "init", "--out", out.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(status.success());
    out.to_str().unwrap().to_owned()
}

async fn next(events: &mut tokio::sync::mpsc::UnboundedReceiver<ExecutorEvent>) -> ExecutorEvent {
    tokio::time::timeout(Duration::from_secs(60), events.recv())
        .await
        .expect("an executor event in time")
        .expect("events open")
}

async fn get(addr: &str, path: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launches_a_worker_serves_and_drains_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let (provider, mut events) = LocalProvider::new(LocalConfig {
        program: LLMCTL.into(),
        args: vec![
            "worker".into(),
            "--model".into(),
            model,
            "--kv-cache-mib".into(),
            "16".into(),
        ],
        log_dir: dir.path().join("logs"),
        startup_timeout: Duration::from_secs(60),
    });
    provider.launch("tiny-1", Class::Ephemeral).await.unwrap();
    let ExecutorEvent::Starting { id, class, pid } = next(&mut events).await else {
        panic!("expected starting")
    };
    assert_eq!((id.as_str(), class), ("tiny-1", Class::Ephemeral));
    assert!(pid.is_some_and(|p| p > 0));
    let ExecutorEvent::Ready { id, endpoint } = next(&mut events).await else {
        panic!("expected ready")
    };
    assert_eq!(id, "tiny-1");
    let models = get(&endpoint, "/v1/models").await;
    assert!(
        models.starts_with("HTTP/1.1 200") && models.contains("\"tiny\""),
        "{models}"
    );
    assert_eq!(provider.running(), vec!["tiny-1".to_owned()]);

    provider
        .terminate("tiny-1", Duration::from_secs(10))
        .await
        .unwrap();
    let ExecutorEvent::Terminated { id, reason } = next(&mut events).await else {
        panic!("expected terminated")
    };
    assert_eq!(id, "tiny-1");
    assert!(
        reason.contains("exit status: 0"),
        "drained and exited 0: {reason}"
    );
    assert!(provider.running().is_empty());
    assert!(
        tokio::net::TcpStream::connect(&endpoint).await.is_err(),
        "the worker is gone"
    );
    let log = std::fs::read_to_string(dir.path().join("logs/tiny-1.log")).unwrap();
    assert!(
        log.contains("model ready"),
        "worker logs go to the executor's file: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executors_that_never_become_ready_or_die_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    // A program that never prints a listening line.
    let (provider, mut events) = LocalProvider::new(LocalConfig {
        program: "/bin/sh".into(),
        args: vec!["-c".into(), "sleep 30".into(), "sh".into()],
        log_dir: dir.path().join("logs"),
        startup_timeout: Duration::from_millis(500),
    });
    provider.launch("mute", Class::Warm).await.unwrap();
    assert!(matches!(
        next(&mut events).await,
        ExecutorEvent::Starting { .. }
    ));
    let ExecutorEvent::Terminated { reason, .. } = next(&mut events).await else {
        panic!("expected terminated")
    };
    assert!(reason.contains("not ready within"), "{reason}");

    // A worker pointed at a missing model exits while starting.
    let (provider, mut events) = LocalProvider::new(LocalConfig {
        program: LLMCTL.into(),
        args: vec![
            "worker".into(),
            "--model".into(),
            dir.path().join("missing").to_str().unwrap().into(),
        ],
        log_dir: dir.path().join("logs"),
        startup_timeout: Duration::from_secs(30),
    });
    provider.launch("broken", Class::Warm).await.unwrap();
    next(&mut events).await;
    let ExecutorEvent::Terminated { reason, .. } = next(&mut events).await else {
        panic!("expected terminated")
    };
    assert!(
        reason.contains("exit status: 1") || reason.contains("exited"),
        "{reason}"
    );
    assert!(
        std::fs::read_to_string(dir.path().join("logs/broken.log"))
            .unwrap()
            .contains("missing")
    );
    assert!(
        provider
            .terminate("broken", Duration::from_secs(1))
            .await
            .is_err(),
        "a gone executor is unknown"
    );
}
