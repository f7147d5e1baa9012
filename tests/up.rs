//! The whole plane with real processes: `llmctl up --config` runs the controller and the
//! gateway, which start `llmctl worker` children on demand. Scale from zero, a burst raising
//! ephemeral executors to `max_replicas` and their reaping back to the warm floor, and a
//! `kill -9` of a worker under load with every request accounted for, eight executors drained
//! down to what a partial, spread load needs with every request answered; the controller's
//! metrics are checked at each step.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LLMCTL: &str = env!("CARGO_BIN_EXE_llmctl");

/// A running `llmctl up`; stopped with SIGINT (and waited for) on drop.
struct Plane {
    child: Child,
    gateway: String,
    controller: String,
}

impl Plane {
    fn start(dir: &Path, pools: &str) -> Self {
        let model = dir.join("tiny");
        if !model.join("config.json").exists() {
            let ok = Command::new(LLMCTL)
                .args(["model", "init", "--out", model.to_str().unwrap()])
                .status()
                .unwrap()
                .success();
            assert!(ok);
        }
        let config = format!(
            "[controller]\nlisten = \"127.0.0.1:0\"\nlog_dir = \"{logs}\"\ntick_ms = 100\n{pools}\n\
             [gateway]\nlisten = \"127.0.0.1:0\"\nopen = true\n[gateway.queue]\ndeadline_ms = 60000\n",
            logs = dir.join("logs").display(),
            pools = pools.replace("MODEL", &model.display().to_string()),
        );
        let path = dir.join("up.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(LLMCTL)
            .args(["up", "--config", path.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(dir.join("up.log")).unwrap())
            .spawn()
            .unwrap();
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let event: Value = serde_json::from_str(&first).unwrap_or_else(|e| {
            panic!(
                "first line {first:?}: {e}; log: {}",
                std::fs::read_to_string(dir.join("up.log")).unwrap_or_default()
            )
        });
        let strip = |v: &Value| v.as_str().unwrap().trim_start_matches("http://").to_owned();
        Self {
            gateway: strip(&event["gateway"]),
            controller: strip(&event["controller"]),
            child,
        }
    }

    async fn pool(&self, name: &str) -> Value {
        let (status, body) =
            http(&self.controller, "GET", &format!("/v1/pools/{name}"), None).await;
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    async fn metric(&self, line_start: &str) -> f64 {
        let (_, body) = http(&self.controller, "GET", "/metrics", None).await;
        body.lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }

    async fn wait_pool(&self, name: &str, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let pool = self.pool(name).await;
            if pred(&pool) {
                return pool;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}: {pool:#}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP/1.1 exchange on a fresh connection; the raw body (chunk framing included).
async fn http(addr: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    if let Err(e) = s.read_to_end(&mut out).await {
        panic!(
            "{method} {path}: {e} after {:?}",
            String::from_utf8_lossy(&out)
        );
    }
    let out = String::from_utf8_lossy(&out).into_owned();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {out:?}"));
    let body = out.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_owned();
    (status, body)
}

fn chat(model: &str, max_tokens: u32, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [{"role": "user", "content": "Tell me a long story about executors."}],
        "max_tokens": max_tokens,
        "ignore_eos": true,
        "stream": stream,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_from_zero_then_burst_to_max_replicas_and_reap_to_the_floor() {
    let dir = tempfile::tempdir().unwrap();
    let dir = Box::leak(Box::new(dir));
    eprintln!("DIR {}", dir.path().display());
    let pools = "\
[[controller.pools]]
name = \"zero\"
[controller.pools.executor]
model = \"MODEL\"
args = [\"--kv-cache-mib\", \"16\"]
drain_grace_secs = 5
[controller.pools.scaling]
min_warm = 0
max_replicas = 1
idle_ttl_secs = 1

[[controller.pools]]
name = \"burst\"
[controller.pools.executor]
model = \"MODEL\"
args = [\"--kv-cache-mib\", \"16\"]
max_concurrency = 2
drain_grace_secs = 5
[controller.pools.scaling]
min_warm = 1
max_replicas = 3
target_concurrency = 1
stable_window_secs = 3
panic_window_secs = 0.5
idle_ttl_secs = 1
";
    let plane = Plane::start(dir.path(), pools);

    // Scale from zero: nothing runs until the first request, which is answered.
    let zero = plane.pool("zero").await;
    assert_eq!(zero["executors"].as_array().unwrap().len(), 0, "{zero:#}");
    let started = Instant::now();
    let (status, body) = http(
        &plane.gateway,
        "POST",
        "/v1/chat/completions",
        Some(&chat("zero", 4, false)),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    eprintln!(
        "first request at zero warm executors: {:?}",
        started.elapsed()
    );
    assert!(
        plane
            .metric(
                "llmctl_controller_scale_decisions_total{pool=\"zero\",reason=\"scale_from_zero\"}"
            )
            .await
            >= 1.0
    );
    assert_eq!(
        plane
            .metric("llmctl_controller_cold_starts_total{pool=\"zero\",class=\"ephemeral\"}")
            .await,
        1.0
    );

    // Burst: ten clients keep the burst pool busy until it has max_replicas executors.
    let warm = plane
        .wait_pool("burst", "the warm executor", |p| p["ready"] == 1)
        .await;
    let warm_id = warm["endpoints"][0]["name"].clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..10 {
        let (gateway, stop) = (plane.gateway.clone(), stop.clone());
        clients.push(tokio::spawn(async move {
            let mut ok = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (status, body) = http(
                    &gateway,
                    "POST",
                    "/v1/chat/completions",
                    Some(&chat("burst", 48, false)),
                )
                .await;
                assert_eq!(status, 200, "{body}");
                ok += 1;
            }
            ok
        }));
    }
    plane
        .wait_pool("burst", "max_replicas ready", |p| p["ready"] == 3)
        .await;
    assert_eq!(
        plane
            .metric("llmctl_controller_cold_starts_total{pool=\"burst\",class=\"ephemeral\"}")
            .await,
        2.0
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut served = 0;
    for c in clients {
        served += c.await.unwrap();
    }
    assert!(served >= 10);

    // Quiet: ephemerals are reaped after idle_ttl, the warm one stays.
    let after = plane
        .wait_pool("burst", "reaping to the warm floor", |p| {
            p["ready"] == 1 && p["draining"] == 0 && p["starting"] == 0
        })
        .await;
    assert_eq!(
        after["endpoints"][0]["name"], warm_id,
        "the warm executor is the one kept"
    );
    let terminated: Vec<&Value> = after["executors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["phase"] == "terminated")
        .collect();
    assert_eq!(terminated.len(), 2, "{after:#}");
    assert!(terminated.iter().all(|e| e["class"] == "ephemeral"));
    assert!(
        plane
            .metric("llmctl_controller_scale_decisions_total{pool=\"burst\",reason=\"scale_down\"}")
            .await
            >= 1.0
    );
    assert_eq!(
        plane
            .metric("llmctl_controller_executor_failures_total{pool=\"burst\"")
            .await,
        0.0
    );
    assert_eq!(
        plane
            .metric(
                "llmctl_controller_executors{pool=\"burst\",class=\"ephemeral\",phase=\"ready\"}"
            )
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn spread_partial_load_drains_eight_executors_to_what_it_needs_and_answers_everything() {
    // The case that pinned the old autoscaler: eight executors, demand for two, and the
    // gateway's least-outstanding routing keeping every executor busy, so none is ever idle.
    let dir = tempfile::tempdir().unwrap();
    let dir = Box::leak(Box::new(dir));
    let pools = "\
[[controller.pools]]
name = \"spread\"
[controller.pools.executor]
model = \"MODEL\"
args = [\"--kv-cache-mib\", \"16\"]
max_concurrency = 2
drain_grace_secs = 10
[controller.pools.scaling]
min_warm = 1
max_replicas = 8
target_concurrency = 1
stable_window_secs = 4
panic_window_secs = 0.5
idle_ttl_secs = 2
";
    let plane = Plane::start(dir.path(), pools);
    plane
        .wait_pool("spread", "the warm executor", |p| p["ready"] == 1)
        .await;
    let clients = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(16));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (gateway, stop, clients) = (plane.gateway.clone(), stop.clone(), clients.clone());
        tasks.push(tokio::spawn(async move {
            let mut answered = 0;
            // Client i sends while i is below the number of clients wanted; the rest wait.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if i >= clients.load(std::sync::atomic::Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
                let (status, body) = http(
                    &gateway,
                    "POST",
                    "/v1/chat/completions",
                    Some(&chat("spread", 24, i % 2 == 0)),
                )
                .await;
                if let Err(e) = classify(status, &body, i % 2 == 0) {
                    panic!("client {i}: {e}: {body}");
                }
                answered += 1;
            }
            answered
        }));
    }
    plane
        .wait_pool("spread", "eight executors ready", |p| p["ready"] == 8)
        .await;
    // The controller reads each ready worker's own load from its /metrics: under this load
    // every one answers, and their engines report requests running and KV in use.
    let loaded = plane
        .wait_pool(
            "spread",
            "every executor's load read from its /metrics",
            |p| {
                let ready: Vec<&Value> = p["executors"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|e| e["phase"] == "ready")
                    .collect();
                ready.len() == 8
                    && ready.iter().all(|e| e["kv_used"].is_number())
                    && ready.iter().any(|e| e["running"].as_f64() > Some(0.0))
            },
        )
        .await;
    assert!(
        plane
            .metric("llmctl_controller_executors_reporting_load{pool=\"spread\"}")
            .await
            >= 1.0,
        "{loaded:#}"
    );
    // Partial load: two clients, spread over all eight executors by the gateway.
    clients.store(2, std::sync::atomic::Ordering::Relaxed);
    let partial = Instant::now();
    let settled = plane
        .wait_pool("spread", "draining down to what two clients need", |p| {
            let ready = p["ready"].as_u64().unwrap_or(0);
            (1..=3).contains(&ready) && p["draining"] == 0 && p["starting"] == 0
        })
        .await;
    eprintln!(
        "partial load: 8 -> {} ready in {:?}",
        settled["ready"],
        partial.elapsed()
    );
    // And it stays there while the load goes on (no flapping back up).
    tokio::time::sleep(Duration::from_secs(6)).await;
    let later = plane.pool("spread").await;
    assert!(later["ready"].as_u64().unwrap() <= 3, "{later:#}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut answered = 0;
    for t in tasks {
        answered += t.await.expect("no client saw a failed request");
    }
    assert!(answered > 16);
    assert!(
        plane
            .metric(
                "llmctl_controller_scale_decisions_total{pool=\"spread\",reason=\"scale_down\"}"
            )
            .await
            >= 1.0
    );
    assert_eq!(
        plane
            .metric("llmctl_controller_executor_failures_total{pool=\"spread\"")
            .await,
        0.0
    );
}

/// A pool of exactly two warm executors of four slots each.
const TWO_WARM: &str = "\
[[controller.pools]]
name = \"pool\"
models = [\"tiny\"]
[controller.pools.executor]
model = \"MODEL\"
args = [\"--kv-cache-mib\", \"16\"]
max_concurrency = 4
drain_grace_secs = 5
[controller.pools.scaling]
min_warm = 2
max_replicas = 2
target_concurrency = 4
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_under_load_every_request_is_accounted_for() {
    let dir = tempfile::tempdir().unwrap();
    let dir = Box::leak(Box::new(dir));
    eprintln!("DIR {}", dir.path().display());
    let plane = Plane::start(dir.path(), TWO_WARM);
    let pool = plane
        .wait_pool("pool", "two warm executors", |p| p["ready"] == 2)
        .await;
    let victim = pool["executors"][0].clone();

    // 12 clients send 4 requests each, half of them streamed.
    let mut clients = Vec::new();
    for c in 0..12 {
        let gateway = plane.gateway.clone();
        clients.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            for i in 0..4 {
                let stream = (c + i) % 2 == 0;
                let request = chat("tiny", 64, stream);
                let fut = http(&gateway, "POST", "/v1/chat/completions", Some(&request));
                let (status, body) = tokio::time::timeout(Duration::from_secs(90), fut)
                    .await
                    .expect("no request hangs");
                outcomes.push(classify(status, &body, stream));
            }
            outcomes
        }));
    }
    // Kill one executor once requests are running on it.
    plane
        .wait_pool("pool", "requests in flight", |p| {
            p["in_flight"].as_u64().unwrap_or(0) >= 4
        })
        .await;
    let pid = victim["pid"].as_u64().unwrap() as i32;
    // SAFETY: kill(2) with a pid the controller reported for a worker it runs.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);

    let mut ok = 0;
    let mut errors = Vec::new();
    for c in clients {
        for outcome in c.await.unwrap() {
            match outcome {
                Ok(()) => ok += 1,
                Err(e) => errors.push(e),
            }
        }
    }
    eprintln!(
        "after kill -9: {ok} succeeded, {} explicit errors: {errors:?}",
        errors.len()
    );
    assert_eq!(
        ok + errors.len(),
        48,
        "every request ends in a success or an explicit error"
    );
    assert!(
        ok >= 24,
        "the surviving executor serves the rest: {ok} ok, {errors:?}"
    );

    // The executor is replaced, and the metrics say so.
    let after = plane
        .wait_pool("pool", "the replacement", |p| {
            p["ready"] == 2 && p["restarts"] == 1
        })
        .await;
    assert_eq!(after["failures"], 1, "{after:#}");
    assert!(
        after["executors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["id"] == victim["id"] && e["phase"] == "terminated")
    );
    assert_eq!(
        plane
            .metric("llmctl_controller_executor_failures_total{pool=\"pool\",class=\"warm\"}")
            .await,
        1.0
    );
    assert_eq!(
        plane
            .metric("llmctl_controller_executor_restarts_total{pool=\"pool\"}")
            .await,
        1.0
    );
    assert_eq!(
        plane
            .metric("llmctl_controller_cold_starts_total{pool=\"pool\",class=\"warm\"}")
            .await,
        3.0
    );
    // And the new executor serves.
    let (status, body) = http(
        &plane.gateway,
        "POST",
        "/v1/chat/completions",
        Some(&chat("tiny", 4, false)),
    )
    .await;
    assert_eq!(status, 200, "{body}");

    // Ctrl-C stops the plane and leaves no worker behind.
    let pids: Vec<i32> = plane.pool("pool").await["executors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["phase"] != "terminated")
        .map(|e| e["pid"].as_i64().unwrap() as i32)
        .collect();
    assert_eq!(pids.len(), 2);
    drop(plane);
    for pid in pids {
        // SAFETY: signal 0 only checks whether the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "worker {pid} outlived `llmctl up`");
    }
}

/// A frozen executor (SIGSTOP): the controller's scrapes get no answer, so it leaves the
/// endpoint set within seconds (gateways stop choosing it), and when it stays frozen it is
/// killed and replaced; the requests it held end (retried elsewhere or an explicit error) and
/// every later request is served by the other executor.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_executor_leaves_the_endpoint_set_and_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Plane::start(dir.path(), TWO_WARM);
    let pool = plane
        .wait_pool("pool", "two warm executors", |p| p["ready"] == 2)
        .await;
    let victim = pool["executors"][0].clone();
    let pid = victim["pid"].as_u64().unwrap() as i32;
    // SAFETY: kill(2) with a pid the controller reported for a worker it runs.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let frozen_at = Instant::now();
    // Requests sent at once may reach the frozen executor before it is noticed.
    let early: Vec<_> = (0..4)
        .map(|_| {
            let gateway = plane.gateway.clone();
            tokio::spawn(async move {
                let request = chat("tiny", 8, false);
                let fut = http(&gateway, "POST", "/v1/chat/completions", Some(&request));
                tokio::time::timeout(Duration::from_secs(90), fut)
                    .await
                    .expect("no request hangs")
            })
        })
        .collect();
    let pool = plane
        .wait_pool("pool", "the frozen executor marked unresponsive", |p| {
            p["executors"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["id"] == victim["id"] && e["phase"] == "unresponsive")
        })
        .await;
    let noticed = frozen_at.elapsed();
    eprintln!("unresponsive after {noticed:?}");
    assert!(noticed < Duration::from_secs(15), "{noticed:?}");
    assert!(
        !pool["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["name"] == victim["id"]),
        "{pool:#}"
    );
    // From now on requests go to the live executor.
    for _ in 0..4 {
        let started = Instant::now();
        let (status, body) = http(
            &plane.gateway,
            "POST",
            "/v1/chat/completions",
            Some(&chat("tiny", 8, false)),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }
    let after = plane
        .wait_pool("pool", "the replacement, and the kill counted", |p| {
            p["ready"] == 2 && p["restarts"] == 1 && p["failures"] == 1
        })
        .await;
    eprintln!("replaced after {:?}", frozen_at.elapsed());
    assert!(
        after["executors"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["id"] == victim["id"] && e["phase"] == "terminated"),
        "{after:#}"
    );
    for request in early {
        let (status, body) = request.await.unwrap();
        classify(status, &body, false).unwrap();
    }
    assert_eq!(
        plane
            .metric("llmctl_controller_executor_unresponsive_total{pool=\"pool\"}")
            .await,
        1.0
    );
}

/// A complete answer, or the explicit error the client saw.
fn classify(status: u16, body: &str, stream: bool) -> Result<(), String> {
    if status != 200 {
        // An error status carries an OpenAI error body.
        assert!(
            body.contains("\"error\""),
            "status {status} without an error body: {body}"
        );
        return Err(format!("status {status}"));
    }
    if stream {
        if body.contains("data: [DONE]") && !body.contains("\"error\"") {
            Ok(())
        } else if body.contains("\"error\"") {
            Err("stream error event".into())
        } else {
            panic!("a stream ended with neither [DONE] nor an error event: {body}")
        }
    } else {
        assert!(body.contains("\"choices\""), "200 without choices: {body}");
        Ok(())
    }
}
