//! The replay checked against reality: a slice of a production trace, time-compressed and with
//! tokens scaled to the `small` preset, is sent through `llmctl up` (real gateway, controller
//! and CPU workers, the autoscaler live) and through `llmctl autoscaler replay`'s simulation
//! with the same pool spec; executor-seconds and TTFT p50/p99 of both are printed side by side.
//! The simulation's executor model is measured first on this machine with the executors' own
//! thread count ([`calibrate`]); the shipped `cpu-small` model is simulated beside it.
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

mod calibrate;

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
    /// Threads of each worker's compute pool (`RAYON_NUM_THREADS`); by default this machine's
    /// cores over `max_replicas`, so that executors running together do not fight over cores
    /// (the simulation has each executor run at its own measured rate).
    #[arg(long)]
    worker_threads: Option<usize>,
    /// The simulation's executor model: `measured` (calibrated here first) or a shipped name
    /// or file.
    #[arg(long, default_value = "measured")]
    executor_model: String,
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
         [pools.executor]\nmodel = \"{model}\"\nargs = {WORKER_ARGS:?}\nmax_concurrency = 32\ndrain_grace_secs = 30\n\
         [pools.scaling]\nmin_warm = 1\nmax_replicas = {max_replicas}\ntarget_concurrency = 8\nstable_window_secs = 30\npanic_window_secs = 3\nidle_ttl_secs = 20\n\
         target_utilization = 0.8\nexecutor_prefill_tokens_per_s = {prefill}\nexecutor_decode_tokens_per_s = {decode}\nexecutor_kv_tokens = {kv}\n"
    )
}

/// The flags the pool gives its executors (the calibration worker gets the same).
pub const WORKER_ARGS: [&str; 2] = ["--max-num-seqs", "32"];

/// Token ids spread over the vocabulary, distinct per `seed` so the prefix cache stays out of
/// the measurement.
pub fn prompt(seed: u32, len: u32) -> Vec<u32> {
    (0..len)
        .map(|j| 10 + (seed.wrapping_mul(7919) + j * 31) % 4000)
        .collect()
}

/// One streamed completion: the seconds from sending it at which each of its token events
/// arrived (`None` when it failed or ended without `[DONE]`).
pub async fn stream(addr: String, prompt: Vec<u32>, max_tokens: u32) -> Option<Vec<f64>> {
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
    let mut times = Vec::new();
    let mut tail = Vec::new();
    while let Some(frame) = r.body_mut().frame().await {
        let data = frame.ok()?.into_data().ok().unwrap_or_default();
        let now = started.elapsed().as_secs_f64();
        let events = data.windows(9).filter(|w| w == b"\"choices\"").count();
        times.extend(std::iter::repeat_n(now, events));
        tail = data.to_vec();
    }
    (String::from_utf8_lossy(&tail).contains("[DONE]") && !times.is_empty()).then_some(times)
}

/// A worker's time to first token as it measures it (from the request's arrival in the
/// engine): seconds summed and requests counted.
fn worker_ttft(metrics: &str) -> (f64, f64) {
    let value = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    (
        value("llmctl_worker_time_to_first_token_seconds_sum"),
        value("llmctl_worker_time_to_first_token_seconds_count"),
    )
}

/// One line on an executor model's figures.
fn describe(m: &replay::executor::ExecutorModel) -> String {
    let decode: Vec<String> = m
        .decode_tokens_per_s
        .iter()
        .map(|(b, r)| format!("{r:.0} at {b}"))
        .collect();
    format!(
        "cold start {:.2} s, prefill {:.0} tok/s, decode tok/s {}, attention {:.2e} s a pair, \
         {:.0} ms a request outside the engine",
        m.cold_start.as_secs_f64(),
        m.prefill_tokens_per_s,
        decode.join(", "),
        m.attention_secs_per_pair,
        m.first_token_overhead.as_secs_f64() * 1e3
    )
}

/// Every executor's latest counters, read through the controller's endpoint list (an executor
/// drained away keeps its last reading).
async fn scrape_workers(control: &str, into: &mut std::collections::HashMap<String, (f64, f64)>) {
    let Ok(r) = llmctl_perf::http_request(control, "GET", "/v1/endpoints", Vec::new()).await else {
        return;
    };
    let Ok(body) = r.into_body().collect().await else {
        return;
    };
    let Ok(snapshot) = serde_json::from_slice::<Value>(&body.to_bytes()) else {
        return;
    };
    let addresses: Vec<String> = snapshot["pools"]["replay"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["address"].as_str().map(str::to_owned))
        .collect();
    for address in addresses {
        if let Ok(r) = llmctl_perf::http_request(&address, "GET", "/metrics", Vec::new()).await
            && let Ok(body) = r.into_body().collect().await
        {
            into.insert(
                address,
                worker_ttft(&String::from_utf8_lossy(&body.to_bytes())),
            );
        }
    }
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
    let threads = args.worker_threads.unwrap_or_else(|| {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        (cores / args.max_replicas.max(1) as usize).max(1)
    });
    let shipped = replay::executor_model("cpu-small")?;
    let runtime = tokio::runtime::Runtime::new()?;
    let model = if args.executor_model == "measured" {
        let measured = runtime.block_on(calibrate::calibrate(
            &llmctl, &model_dir, threads, &shipped, &requests,
        ))?;
        eprintln!("measured executor model ({threads} threads a worker): {measured:?}");
        measured
    } else {
        replay::executor_model(&args.executor_model)?
    };
    let dir = tempfile::tempdir()?;
    let controller = controller_toml(
        &model_dir.display().to_string(),
        &dir.path().join("logs").display().to_string(),
        args.max_replicas,
        model.capacity(),
    );

    // Simulated, with the model the pool is configured for and with the shipped one.
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
    let simulate = |model| {
        let outcome = sim::Sim::new(&config, model, &requests, sim::Policy::Llmctl).run();
        let ttft: Vec<f64> = outcome
            .fates
            .iter()
            .filter_map(|f| match f {
                sim::Fate::Served { ttft } => Some(*ttft),
                _ => None,
            })
            .collect();
        (outcome, ttft)
    };
    let (simulated, mut sim_ttft) = simulate(&model);
    let (as_shipped, mut shipped_ttft) = simulate(&shipped);

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
        .env("RAYON_NUM_THREADS", threads.to_string())
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
    let (real_ttft, failed, (executor_seconds, workers), wall) = runtime.block_on(async {
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
                let mut workers = std::collections::HashMap::new();
                let mut scraped = Instant::now();
                while !done.load(Ordering::Relaxed) {
                    if scraped.elapsed() >= Duration::from_secs(1) {
                        scrape_workers(&control, &mut workers).await;
                        scraped = Instant::now();
                    }
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
                scrape_workers(&control, &mut workers).await;
                let total = workers
                    .values()
                    .fold((0.0, 0.0), |a, w| (a.0 + w.0, a.1 + w.1));
                (seconds, total)
            }
        });
        let mut tasks = Vec::new();
        for (i, r) in requests.iter().enumerate() {
            let at = started + Duration::from_secs_f64(r.at);
            tokio::time::sleep_until(at.into()).await;
            let prompt = prompt(i as u32, r.prompt_tokens);
            let first = stream(gateway.clone(), prompt, r.output_tokens);
            tasks.push(tokio::spawn(async move { Some(first.await?[0]) }));
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
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let split = format!(
        "\nTTFT means: {:.3} s at the client, {:.3} s inside the workers (from arrival in the \
         engine; {:.0} requests), {:.3} s simulated.\n",
        mean(&real),
        workers.0 / workers.1.max(1.0),
        workers.1,
        mean(&sim_ttft),
    );
    let rows = [
        (
            "executor-seconds",
            executor_seconds,
            simulated.executor_seconds,
            as_shipped.executor_seconds,
        ),
        (
            "TTFT p50 (s)",
            percentile(&mut real, 0.5),
            percentile(&mut sim_ttft, 0.5),
            percentile(&mut shipped_ttft, 0.5),
        ),
        (
            "TTFT p99 (s)",
            percentile(&mut real, 0.99),
            percentile(&mut sim_ttft, 0.99),
            percentile(&mut shipped_ttft, 0.99),
        ),
        ("duration (s)", wall, simulated.end, as_shipped.end),
    ];
    let mut table = format!(
        "{} requests ({} failed in the real run); trace {} from {} s for {} s, time x{}, tokens x{}; \
         {threads} compute threads a worker\n\n\
         executor model `{}`: {}\n\n\
         | figure | real (llmctl up) | simulated | sim / real | simulated, cpu-small as shipped | shipped / real |\n\
         |---|---:|---:|---:|---:|---:|\n",
        requests.len(),
        failed,
        args.trace,
        args.start,
        args.duration,
        args.time_scale,
        args.token_scale,
        args.executor_model,
        describe(&model),
    );
    for (name, real, simulated, shipped) in rows {
        table += &format!(
            "| {name} | {real:.3} | {simulated:.3} | {:.2} | {shipped:.3} | {:.2} |\n",
            simulated / real,
            shipped / real
        );
    }
    table += &split;
    print!("{table}");
    if args.record {
        let text = format!(
            "# Replay checked against llmctl up, {}\n\n- machine: {}\n- command: `cargo run --release -p llmctl-perf --bin replay_check -- --record`\n- pool: min_warm 1, max_replicas {}, CPU workers on the small preset\n\n{table}",
            llmctl_perf::today(),
            llmctl_perf::machine(),
            args.max_replicas
        );
        let path = llmctl_perf::record("replay-check-cpu", &text)?;
        eprintln!("recorded {}", path.display());
    }
    Ok(())
}
