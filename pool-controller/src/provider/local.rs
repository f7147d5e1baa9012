//! The local provider: each executor is an `llmctl worker` child process on a free loopback port.
//! It reads the bound address from the worker's first stdout line, waits for `/health` to answer
//! 200, writes the worker's logs to `<log_dir>/<id>.log`, and terminates with SIGTERM, then
//! SIGKILL after the drain grace. Children die with the controller: `kill_on_drop` covers a
//! normal exit or Ctrl-C, and `PR_SET_PDEATHSIG` covers the controller being killed outright.
//! (The death signal fires when the *thread* that spawned the child exits; launches run on the
//! runtime's worker threads, which live as long as the runtime.)

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{mpsc, oneshot};

use super::{Adopted, ExecutorEvent, Provider, ProviderError};
use crate::autoscaler::Class;

#[derive(Clone, Debug)]
pub struct LocalConfig {
    /// The program to run, e.g. the `llmctl` binary.
    pub program: PathBuf,
    /// Arguments before `--port 0`, e.g. `["worker", "--model", "models/tiny"]`.
    pub args: Vec<String>,
    pub log_dir: PathBuf,
    /// Launch to ready, at most.
    pub startup_timeout: Duration,
}

pub struct LocalProvider {
    config: LocalConfig,
    events: mpsc::UnboundedSender<ExecutorEvent>,
    /// Per running executor: where to send a terminate request (its grace period).
    running: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Duration>>>>,
}

impl LocalProvider {
    /// The provider and the stream of its executors' events.
    pub fn new(config: LocalConfig) -> (Self, mpsc::UnboundedReceiver<ExecutorEvent>) {
        let (events, rx) = mpsc::unbounded_channel();
        (
            Self {
                config,
                events,
                running: Arc::default(),
            },
            rx,
        )
    }

    /// The ids of the executors whose processes are alive.
    pub fn running(&self) -> Vec<String> {
        self.running
            .lock()
            .expect("executor map lock")
            .keys()
            .cloned()
            .collect()
    }
}

impl Provider for LocalProvider {
    /// Children die with their controller, so a new one starts with none.
    async fn adopt(&self) -> Vec<Adopted> {
        Vec::new()
    }

    /// Spawns the worker; its progress arrives as events. Returns once the process runs.
    async fn launch(&self, id: &str, class: Class) -> Result<(), ProviderError> {
        let err = |reason: String| ProviderError::Launch {
            id: id.to_owned(),
            reason,
        };
        std::fs::create_dir_all(&self.config.log_dir).map_err(|e| err(format!("log dir: {e}")))?;
        let log_path = self.config.log_dir.join(format!("{id}.log"));
        let log = std::fs::File::create(&log_path)
            .map_err(|e| err(format!("{}: {e}", log_path.display())))?;
        let mut cmd = Command::new(&self.config.program);
        cmd.args(&self.config.args)
            .args(["--port", "0"])
            .stdout(Stdio::piped())
            .stderr(log)
            .stdin(Stdio::null())
            // Its own process group: a terminal's Ctrl-C reaches the controller, which drains
            // the executors in order, not every worker at once behind its back.
            .process_group(0)
            .kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe and touches only this (forked) process.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|e| err(format!("{}: {e}", self.config.program.display())))?;
        let _ = self.events.send(ExecutorEvent::Starting {
            id: id.to_owned(),
            class,
            pid: child.id(),
        });
        let (term_tx, term_rx) = mpsc::unbounded_channel();
        self.running
            .lock()
            .expect("executor map lock")
            .insert(id.to_owned(), term_tx);
        let (spawned_tx, spawned) = oneshot::channel();
        tokio::spawn(supervise(
            id.to_owned(),
            child,
            self.config.startup_timeout,
            self.events.clone(),
            term_rx,
            self.running.clone(),
            spawned_tx,
        ));
        let _ = spawned.await;
        Ok(())
    }

    /// SIGTERM now, SIGKILL after `grace`.
    async fn terminate(&self, id: &str, grace: Duration) -> Result<(), ProviderError> {
        let running = self.running.lock().expect("executor map lock");
        let tx = running
            .get(id)
            .ok_or_else(|| ProviderError::Unknown(id.to_owned()))?;
        let _ = tx.send(grace);
        Ok(())
    }

    /// Drains every child and waits (bounded by the grace) until all of them are gone.
    async fn shutdown(self, grace: Duration, mut events: mpsc::UnboundedReceiver<ExecutorEvent>) {
        let senders: Vec<_> = self
            .running
            .lock()
            .expect("executor map lock")
            .values()
            .cloned()
            .collect();
        for tx in senders {
            let _ = tx.send(grace);
        }
        let deadline = tokio::time::Instant::now() + grace + Duration::from_secs(2);
        while !self.running().is_empty() {
            match tokio::time::timeout_at(deadline, events.recv()).await {
                Ok(Some(_)) => {}
                _ => break,
            }
        }
    }
}

/// Owns one child process from spawn to exit.
async fn supervise(
    id: String,
    mut child: Child,
    startup_timeout: Duration,
    events: mpsc::UnboundedSender<ExecutorEvent>,
    mut terminate: mpsc::UnboundedReceiver<Duration>,
    running: Arc<Mutex<HashMap<String, mpsc::UnboundedSender<Duration>>>>,
    spawned: oneshot::Sender<()>,
) {
    let _ = spawned.send(());
    let started = Instant::now();
    let stdout = child.stdout.take().expect("stdout is piped");
    let ready = tokio::time::timeout(startup_timeout, wait_ready(stdout));
    let reason = tokio::select! {
        result = ready => match result {
            Ok(Ok(endpoint)) => {
                tracing::info!(executor = %id, %endpoint, seconds = started.elapsed().as_secs_f64(), "executor ready");
                let _ = events.send(ExecutorEvent::Ready { id: id.clone(), endpoint });
                tokio::select! {
                    status = child.wait() => format!("exited: {}", describe(status)),
                    Some(grace) = terminate.recv() => stop(&mut child, grace).await,
                }
            }
            Ok(Err(e)) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                format!("never became ready: {e}")
            }
            Err(_) => {
                let _ = child.start_kill();
                let _ = child.wait().await;
                format!("not ready within {}s", startup_timeout.as_secs())
            }
        },
        status = child.wait() => format!("exited while starting: {}", describe(status)),
        Some(grace) = terminate.recv() => stop(&mut child, grace).await,
    };
    running.lock().expect("executor map lock").remove(&id);
    tracing::info!(executor = %id, %reason, "executor terminated");
    let _ = events.send(ExecutorEvent::Terminated { id, reason });
}

fn describe(status: std::io::Result<std::process::ExitStatus>) -> String {
    match status {
        Ok(s) => s.to_string(),
        Err(e) => e.to_string(),
    }
}

/// SIGTERM, then SIGKILL if the worker has not drained within `grace`.
async fn stop(child: &mut Child, grace: Duration) -> String {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on our own child's pid; the child has not been reaped yet (we hold it).
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => format!("terminated: {}", describe(status)),
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            format!("killed after a {}s grace", grace.as_secs())
        }
    }
}

/// Reads the worker's `{"event":"listening","addr":...}` line, then waits for `/health` 200.
async fn wait_ready(stdout: tokio::process::ChildStdout) -> Result<String, String> {
    let mut lines = BufReader::new(stdout).lines();
    let line = lines
        .next_line()
        .await
        .map_err(|e| e.to_string())?
        .ok_or("closed stdout before listening")?;
    let v: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| format!("listening line {line:?}: {e}"))?;
    let addr = v["addr"]
        .as_str()
        .ok_or("listening line has no addr")?
        .to_owned();
    // Keep draining stdout so the worker never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    loop {
        if health(&addr).await {
            return Ok(addr);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn health(addr: &str) -> bool {
    use http_body_util::Empty;
    let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let Ok((mut sender, conn)) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await
    else {
        return false;
    };
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .uri("/health")
        .header("host", addr)
        .body(Empty::<bytes::Bytes>::new());
    let Ok(req) = req else { return false };
    matches!(sender.send_request(req).await, Ok(r) if r.status() == 200)
}
