//! Cold-start benchmark of the whole plane: the pool controller and a gateway in this process,
//! executors as real worker processes (this binary re-run as `worker ...`, i.e. the real
//! server). For the `tiny` and `small` presets it measures, `--repeats` times each:
//!
//! - **launch to ready**: the controller's `cold_start_secs` (process start, model load,
//!   listening, `/health` 200);
//! - **first request at zero**: a pool with `min_warm = 0` and nothing running; the time from
//!   sending one chat request (`max_tokens` 1) to its full answer through the gateway;
//! - **burst to first ephemeral serving**: a pool with one warm executor; eight clients start
//!   at once, and the time runs until an ephemeral executor sends response headers.
//!
//! Between repeats the ephemeral executors are reaped (short `idle_ttl`).
//!
//! `cargo run --release -p llmctl-perf --bin coldstart_bench -- [--record] [--repeats N]`

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use http_body_util::BodyExt;
use llmctl_inference_worker::model::init::Preset;
use llmctl_inference_worker::server::WorkerArgs;
use llmctl_pool_controller::controller::{self, Running};
use llmctl_pool_controller::spec::ControllerConfig;
use serde_json::json;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 5)]
    repeats: usize,
    /// Write the table to perf/results/<date>-coldstart-cpu.md.
    #[arg(long)]
    record: bool,
}

/// How the controller runs this binary as an executor.
#[derive(Parser)]
struct WorkerCli {
    #[command(subcommand)]
    command: WorkerCommand,
}

#[derive(clap::Subcommand)]
enum WorkerCommand {
    Worker(WorkerArgs),
}

fn main() -> Result<()> {
    if std::env::args().nth(1).as_deref() == Some("worker") {
        llmctl_inference_worker::init_logging();
        let WorkerCommand::Worker(args) = WorkerCli::parse().command;
        return llmctl_inference_worker::server::run(args);
    }
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(bench(args))
}

const PRESETS: [(Preset, &str); 2] = [(Preset::Tiny, "tiny"), (Preset::Small, "small")];

fn controller_config(log_dir: &std::path::Path) -> Result<ControllerConfig> {
    let mut text = format!(
        "listen = \"127.0.0.1:0\"\nlog_dir = \"{}\"\ntick_ms = 50\n",
        log_dir.display()
    );
    for (preset, name) in PRESETS {
        let model = llmctl_perf::preset_model(preset, 1)?;
        for (pool, min_warm, max) in [("zero", 0, 1), ("burst", 1, 2)] {
            text += &format!(
                "[[pools]]\nname = \"{name}-{pool}\"\n[pools.executor]\nmodel = \"{}\"\n\
                 args = [\"--kv-cache-mib\", \"64\"]\nmax_concurrency = 4\ndrain_grace_secs = 2\n\
                 [pools.scaling]\nmin_warm = {min_warm}\nmax_replicas = {max}\ntarget_concurrency = 1\n\
                 stable_window_secs = 1\npanic_window_secs = 0.3\nidle_ttl_secs = 0.3\n",
                model.display()
            );
        }
    }
    Ok(ControllerConfig::parse(&text, "coldstart_bench")?)
}

async fn start_gateway(config: &ControllerConfig, controller: &str) -> Result<String> {
    let mut text = format!(
        "listen = \"127.0.0.1:0\"\nopen = true\n[controller]\nurl = \"http://{controller}\"\nreport_interval_ms = 100\n"
    );
    for p in &config.pools {
        text += &format!("[[pools]]\nname = \"{0}\"\nmodels = [\"{0}\"]\n", p.name);
    }
    let config = llmctl_gateway::config::Config::parse(&text, "coldstart_bench")?;
    let listening = llmctl_gateway::server::listen(&config).await?;
    let addr = listening.addr.to_string();
    tokio::spawn(llmctl_gateway::server::run(listening, config));
    Ok(addr)
}

/// Sends one chat request; returns when its response headers arrive (and which executor)
/// and, if `whole`, after the whole body.
async fn chat(gateway: &str, model: &str, max_tokens: u32, whole: bool) -> Result<String> {
    let body = json!({"model": model, "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": max_tokens, "ignore_eos": true, "stream": !whole});
    let r = llmctl_perf::http_request(
        gateway,
        "POST",
        "/v1/chat/completions",
        serde_json::to_vec(&body)?,
    )
    .await?;
    let status = r.status();
    let executor = r
        .headers()
        .get("x-llmctl-executor")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    if whole || !status.is_success() {
        let bytes = r.into_body().collect().await?.to_bytes();
        if !status.is_success() {
            bail!("{status}: {}", String::from_utf8_lossy(&bytes));
        }
    } else {
        tokio::spawn(async move { r.into_body().collect().await });
    }
    Ok(executor)
}

async fn wait_pool(
    running: &Running,
    pool: &str,
    pred: impl Fn(&llmctl_pool_controller::reconciler::PoolStatus) -> bool,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let status = running.controller.pool(pool).context("pool exists")?;
        if pred(&status) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("pool {pool} never reached the wanted state: {status:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn stats(values: &mut [f64]) -> String {
    values.sort_by(f64::total_cmp);
    let p50 = values[values.len() / 2];
    let max = values[values.len() - 1];
    format!("{p50:.0} / {max:.0}")
}

async fn bench(args: Args) -> Result<()> {
    if args.repeats == 0 {
        bail!("--repeats must be at least 1");
    }
    let logs = tempfile::tempdir()?;
    let config = controller_config(logs.path())?;
    let running = controller::start(config.clone(), std::env::current_exe()?).await?;
    let gateway = start_gateway(&config, &running.addr.to_string()).await?;

    let mut rows = Vec::new();
    for (_, name) in PRESETS {
        let (zero, burst) = (format!("{name}-zero"), format!("{name}-burst"));
        let (mut ready_ms, mut first_ms, mut burst_ms) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..args.repeats {
            // Scale from zero.
            wait_pool(&running, &zero, |s| s.starting + s.ready + s.draining == 0).await?;
            let t0 = Instant::now();
            chat(&gateway, &zero, 1, true).await?;
            first_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            let status = running.controller.pool(&zero).context("pool")?;
            let newest = status
                .executors
                .iter()
                .filter_map(|e| e.cold_start_secs.map(|c| (e.age_secs, c)))
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .context("the executor that served")?;
            ready_ms.push(newest.1 * 1e3);

            // Burst over one warm executor.
            wait_pool(&running, &burst, |s| {
                s.ready == 1 && s.starting + s.draining == 0
            })
            .await?;
            let stop = Arc::new(AtomicBool::new(false));
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let t0 = Instant::now();
            for _ in 0..8 {
                let (gateway, burst, stop, tx) =
                    (gateway.clone(), burst.clone(), stop.clone(), tx.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match chat(&gateway, &burst, 32, false).await {
                            Ok(executor) if executor.contains("-eph-") => {
                                let _ = tx.send(Ok(t0.elapsed()));
                            }
                            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                            Err(e) => {
                                let _ = tx.send(Err(e));
                                return;
                            }
                        }
                    }
                });
            }
            let first = tokio::time::timeout(Duration::from_secs(120), rx.recv())
                .await
                .context("no ephemeral executor served within 120 s")?
                .context("clients gone")??;
            stop.store(true, Ordering::Relaxed);
            burst_ms.push(first.as_secs_f64() * 1e3);
        }
        eprintln!("{name}: ready {ready_ms:?} first {first_ms:?} burst {burst_ms:?}");
        rows.push(format!(
            "| {name} | {} | {} | {} |",
            stats(&mut ready_ms),
            stats(&mut first_ms),
            stats(&mut burst_ms)
        ));
    }
    running.shutdown().await;

    let table = format!(
        "| preset | launch → ready, ms (p50 / max) | first request at zero warm, ms | burst → first ephemeral serving, ms |\n\
         | --- | --- | --- | --- |\n{}\n",
        rows.join("\n")
    );
    println!("{table}");
    if args.record {
        let text = format!(
            "# Cold start, {}\n\nMachine: {}\n\nCommand: `cargo run --release -p llmctl-perf --bin coldstart_bench -- --record --repeats {}`\n\n\
             Controller and gateway in one process, executors are real worker processes (release build). \
             `launch → ready` is process start to `/health` 200 (model load included); the first request \
             (chat, `max_tokens` 1) is timed through the gateway from send to full answer, with the pool at zero \
             executors; the burst is eight clients against one warm executor (`target_concurrency` 1), timed to \
             the first response headers from an ephemeral executor. Between repeats ephemerals are reaped \
             (`idle_ttl` 0.3 s). Repeats: {}.\n\n{table}",
            llmctl_perf::today(),
            llmctl_perf::machine(),
            args.repeats,
            args.repeats,
        );
        let path = llmctl_perf::record("coldstart-cpu", &text)?;
        println!("recorded in {}", path.display());
    }
    Ok(())
}
