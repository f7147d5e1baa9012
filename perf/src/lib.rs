//! llmctl benchmarks: `engine_bench` (CPU engine vs transformers), `serve_bench` (worker serving,
//! vLLM-style), `gateway_bench` (gateway vs nginx), and later the load generator and the
//! autoscaler trace simulator. This library holds what they share: where results go and how the
//! machine is described in them.

pub mod cuda;

use std::path::{Path, PathBuf};

/// The workspace root (results live under `perf/results/` there).
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("perf/ sits in the workspace")
}

/// Today's date, `YYYY-MM-DD`, as the system's `date` prints it.
pub fn today() -> String {
    std::process::Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "undated".to_owned())
}

/// "<cpu model>, <n> cores": the machine line of every recorded result.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    format!("{cpu}, {cores} cores")
}

/// Writes `text` to `perf/results/<today>-<name>.md` and returns the path.
pub fn record(name: &str, text: &str) -> std::io::Result<PathBuf> {
    let path = workspace_root().join(format!("perf/results/{}-{name}.md", today()));
    std::fs::write(&path, text)?;
    Ok(path)
}

/// The `preset` model with `seed`, written under `target/perf-models/` the first time.
pub fn preset_model(
    preset: llmctl_inference_worker::model::init::Preset,
    seed: u64,
) -> anyhow::Result<PathBuf> {
    preset_model_in(&workspace_root().join("target/perf-models"), preset, seed)
}

/// The `preset` model with `seed`, written under `root` the first time.
pub fn preset_model_in(
    root: &Path,
    preset: llmctl_inference_worker::model::init::Preset,
    seed: u64,
) -> anyhow::Result<PathBuf> {
    use llmctl_inference_worker::model::init;
    let dir = root.join(format!("{}-seed{seed}", preset.name()));
    if !dir.join("model.safetensors").exists() {
        let opts = init::InitOptions {
            preset,
            seed,
            dtype: init::InitDtype::Bf16,
        };
        init::write_model(&dir, &opts)?;
    }
    Ok(dir)
}

/// The `addr` of the `{"event":"listening","addr":...}` line a worker or gateway prints first
/// on its stdout (piped).
pub fn listening_addr(child: &mut std::process::Child) -> anyhow::Result<String> {
    use anyhow::Context;
    use std::io::BufRead;
    let stdout = child.stdout.take().context("stdout is not piped")?;
    let mut line = String::new();
    std::io::BufReader::new(stdout).read_line(&mut line)?;
    let v: serde_json::Value =
        serde_json::from_str(&line).with_context(|| format!("listening line {line:?}"))?;
    Ok(v["addr"]
        .as_str()
        .with_context(|| format!("listening line {line:?} has no addr"))?
        .to_owned())
}

/// Polls `addr`'s `/health` every 10 ms until it answers 200, for at most `timeout`.
pub async fn wait_healthy(addr: &str, timeout: std::time::Duration) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Ok(r) = http_request(addr, "GET", "/health", Vec::new()).await
            && r.status() == 200
        {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("{addr} was not healthy within {} s", timeout.as_secs());
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

/// One HTTP/1.1 request on a fresh connection.
pub async fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    body: Vec<u8>,
) -> anyhow::Result<hyper::Response<hyper::body::Incoming>> {
    use http_body_util::Full;
    let stream = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr)
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(body)))?;
    Ok(sender.send_request(req).await?)
}
