//! The replay checked against reality: a slice of a production trace, time-compressed and with
//! tokens scaled to the `small` preset, is sent through `llmctl up` (real gateway, controller
//! and CPU workers, the autoscaler live) and through `llmctl autoscaler replay`'s simulation
//! with the `cpu-small` executor model and the same pool spec; executor-seconds and TTFT p50/p99
//! of both are printed side by side.
//!
//! `cargo build --release && cargo run --release -p llmctl-perf --bin replay_check -- --record`

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use http_body_util::BodyExt;
use llmctl_inference_worker::model::init::Preset;
use llmctl_pool_controller::autoscaler::Capacity;
use llmctl_pool_controller::replay::{self, Span, sim, trace};
use llmctl_pool_controller::spec::ControllerConfig;
use serde_json::{Value, json};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "../shared/traces/azure_llm_2023_conv.csv")]
    trace: String,
    /// Seconds into the trace.
    #[arg(long, default_value_t = 600.0)]
    start: f64,
    /// Seconds of trace (before compression).
    #[arg(long, default_value_t = 480.0)]
    duration: f64,
    #[arg(long, default_value_t = 2.0)]
    time_scale: f64,
    #[arg(long, default_value_t = 0.1)]
    token_scale: f64,
    /// The pool's `max_replicas` (1: no executors competing for this machine's cores).
    #[arg(long, default_value_t = 2)]
    max_replicas: u32,
    /// Write the table under perf/results/.
    #[arg(long)]
    record: bool,
}

/// The pool both sides run (the `[controller]` part of `llmctl up`'s config).
fn controller_toml(model: &str, logs: &str, max_replicas: u32, capacity: Capacity) -> String {
    let Capacity {
        prefill_tokens_per_s: prefill,
        decode_tokens_per_s: decode,
        kv_tokens: kv,
    } = capacity;
    format!(
        "listen = \"127.0.0.1:0\"\nlog_dir = \"{logs}\"\n\
         [[pools]]\nname = \"replay\"\nmodels = [\"small\"]\n\
         [pools.executor]\nmodel = \"{model}\"\nargs = [\"--max-num-seqs\", \"32\"]\nmax_concurrency = 32\ndrain_grace_secs = 30\n\
         [pools.scaling]\nmin_warm = 1\nmax_replicas = {max_replicas}\ntarget_concurrency = 8\nstable_window_secs = 30\npanic_window_secs = 3\nidle_ttl_secs = 20\n\
         target_utilization = 0.8\nexecutor_prefill_tokens_per_s = {prefill}\nexecutor_decode_tokens_per_s = {decode}\nexecutor_kv_tokens = {kv}\n"
    )
}

/// TTFT of one streamed completion (`None` when it failed).
async fn one(addr: String, prompt: Vec<u32>, max_tokens: u32) -> Option<f64> {
    let body = json!({"model": "small", "prompt": prompt, "max_tokens": max_tokens,
        "ignore_eos": true, "stream": true});
    let started = Instant::now();
    let mut r = llmctl_perf::http_request(
        &addr,
        "POST",
        "/v1/completions",
        body.to_string().into_bytes(),
    )
    .await
    .ok()?;
    if r.status() != 200 {
        return None;
    }
    let mut first = None;
    let mut tail = Vec::new();
    while let Some(frame) = r.body_mut().frame().await {
        let data = frame.ok()?.into_data().ok().unwrap_or_default();
        if first.is_none() && data.windows(9).any(|w| w == b"\"choices\"") {
            first = Some(started.elapsed().as_secs_f64());
        }
        tail = data.to_vec();
    }
    (String::from_utf8_lossy(&tail).contains("[DONE]")).then_some(())?;
    first
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
}

fn main() -> Result<()> {
    let args = Args::parse();
    let llmctl = llmctl_perf::workspace_root().join("target/release/llmctl");
    if !llmctl.exists() {
        bail!(
            "{} is missing: cargo build --release first",
            llmctl.display()
        );
    }
    let span = Span {
        start: args.start,
        duration: Some(args.duration),
        time_scale: args.time_scale,
        token_scale: args.token_scale,
    };
    let path = llmctl_perf::workspace_root().join(&args.trace);
    let requests = replay::shape(trace::load(&path)?, span)?;
    let model_dir = llmctl_perf::preset_model(Preset::Small, 1)?;
    let model = replay::executor_model("cpu-small")?;
    let dir = tempfile::tempdir()?;
    let controller = controller_toml(
        &model_dir.display().to_string(),
        &dir.path().join("logs").display().to_string(),
        args.max_replicas,
        model.capacity(),
    );

    // Simulated.
    let spec = ControllerConfig::parse(&controller, "replay_check pool")?;
    let pool = &spec.pools[0];
    let config = sim::SimConfig {
        scaling: pool.scaling.clone(),
        max_concurrency: pool.executor.max_concurrency,
        queue_deadline: Duration::from_secs(60),
        queue_max: 10_000,
        tick: Duration::from_millis(250),
        affinity: true,
        initial: pool.scaling.min_warm,
    };
    let simulated = sim::Sim::new(&config, &model, &requests, sim::Policy::Llmctl).run();
    let mut sim_ttft: Vec<f64> = simulated
        .fates
        .iter()
        .filter_map(|f| match f {
            sim::Fate::Served { ttft } => Some(*ttft),
            _ => None,
        })
        .collect();

    // Real.
    let up = dir.path().join("up.toml");
    let controller_section = controller
        .replace("[[pools]]", "[[controller.pools]]")
        .replace("[pools.", "[controller.pools.");
    std::fs::write(
        &up,
        format!(
            "[controller]\ntick_ms = 250\n{controller_section}\n[gateway]\nlisten = \"127.0.0.1:0\"\nopen = true\n"
        ),
    )?;
    let mut child = Command::new(&llmctl)
        .args(["up", "--config", up.to_str().context("path")?])
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("up.log"))?)
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let event: Value =
        serde_json::from_str(&line).with_context(|| format!("first line {line:?}"))?;
    let addr = |k: &str| {
        event[k]
            .as_str()
            .unwrap_or("")
            .trim_start_matches("http://")
            .to_owned()
    };
    let (gateway, control) = (addr("gateway"), addr("controller"));
    let runtime = tokio::runtime::Runtime::new()?;
    let (real_ttft, failed, executor_seconds, wall) = runtime.block_on(async {
        // The warm executor first, as the simulation starts with it ready.
        loop {
            let r =
                llmctl_perf::http_request(&control, "GET", "/v1/pools/replay", Vec::new()).await?;
            let pool: Value = serde_json::from_slice(&r.into_body().collect().await?.to_bytes())?;
            if pool["ready"] == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let started = Instant::now();
        let done = Arc::new(AtomicBool::new(false));
        let poll = tokio::spawn({
            let (control, done) = (control.clone(), done.clone());
            async move {
                let mut seconds = 0.0;
                let mut last = Instant::now();
                while !done.load(Ordering::Relaxed) {
                    if let Ok(r) =
                        llmctl_perf::http_request(&control, "GET", "/v1/pools/replay", Vec::new())
                            .await
                        && let Ok(body) = r.into_body().collect().await
                        && let Ok(pool) = serde_json::from_slice::<Value>(&body.to_bytes())
                    {
                        let live = ["starting", "ready", "draining"]
                            .iter()
                            .map(|k| pool[*k].as_f64().unwrap_or(0.0))
                            .sum::<f64>();
                        seconds += live * last.elapsed().as_secs_f64();
                        last = Instant::now();
                    }
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                seconds
            }
        });
        let mut tasks = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            let at = started + Duration::from_secs_f64(r.at);
            tokio::time::sleep_until(at.into()).await;
            let prompt: Vec<u32> = (0..r.prompt_tokens)
                .map(|j| 10 + (i as u32 * 7919 + j * 31) % 4000)
                .collect();
            tasks.push(tokio::spawn(one(gateway.clone(), prompt, r.output_tokens)));
        }
        let mut ttft = Vec::new();
        let mut failed = 0;
        for t in tasks {
            match t.await? {
                Some(x) => ttft.push(x),
                None => failed += 1,
            }
        }
        let wall = started.elapsed().as_secs_f64();
        done.store(true, Ordering::Relaxed);
        anyhow::Ok((ttft, failed, poll.await?, wall))
    })?;
    // SIGINT: `llmctl up` drains and stops its workers.
    // SAFETY: kill(2) on our own child's pid, not yet reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let _ = child.wait();

    let mut real = real_ttft;
    let rows = [
        (
            "executor-seconds",
            executor_seconds,
            simulated.executor_seconds,
        ),
        (
            "TTFT p50 (s)",
            percentile(&mut real, 0.5),
            percentile(&mut sim_ttft, 0.5),
        ),
        (
            "TTFT p99 (s)",
            percentile(&mut real, 0.99),
            percentile(&mut sim_ttft, 0.99),
        ),
        ("duration (s)", wall, simulated.end),
    ];
    let mut table = format!(
        "{} requests ({} failed in the real run); trace {} from {} s for {} s, time x{}, tokens x{}\n\n| figure | real (llmctl up) | simulated | sim / real |\n|---|---:|---:|---:|\n",
        requests.len(),
        failed,
        args.trace,
        args.start,
        args.duration,
        args.time_scale,
        args.token_scale
    );
    for (name, real, simulated) in rows {
        table += &format!(
            "| {name} | {real:.3} | {simulated:.3} | {:.2} |\n",
            simulated / real
        );
    }
    print!("{table}");
    if args.record {
        let text = format!(
            "# Replay checked against llmctl up, {}\n\n- machine: {}\n- command: `cargo run --release -p llmctl-perf --bin replay_check -- --record`\n- pool: min_warm 1, max_replicas {}, CPU workers on the small preset; executor model `cpu-small`\n\n{table}",
            llmctl_perf::today(),
            llmctl_perf::machine(),
            args.max_replicas
        );
        let path = llmctl_perf::record("replay-check-cpu", &text)?;
        eprintln!("recorded {}", path.display());
    }
    Ok(())
}
