//! Serving benchmark in the style of vLLM's `benchmark_serving`: streams OpenAI completions at
//! a worker, either at fixed concurrency or at a Poisson request rate, with prompt and output
//! lengths drawn uniformly from ranges, and reports throughput and TTFT / TPOT / ITL / E2E
//! percentiles.
//!
//! `cargo run --release -p llmctl-perf --bin serve_bench -- [--record]`
//!
//! With no `--url`, it writes the `--preset` model (default `small`, seed 1) under
//! `target/perf-models/` (or `--models`), starts a worker (`--device`, default cpu) on port 0 (this same binary re-run as `--as-worker`, i.e. the real server in its own
//! process), and benchmarks it at each `--concurrency` level, then at `--rate` if given.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use http_body_util::BodyExt;
use llmctl_inference_worker::model::init::Preset;
use llmctl_inference_worker::rng::Rng;
use llmctl_inference_worker::server::{self, Device, WorkerArgs};
use serde_json::{Value, json};
use tokio::sync::Semaphore;

#[derive(Parser)]
struct Args {
    /// Benchmark a running server instead of starting one.
    #[arg(long)]
    url: Option<String>,
    /// Model name to send (with --url).
    #[arg(long, default_value = "small-seed1")]
    model_name: String,
    #[arg(long, default_value_t = 64)]
    num_requests: usize,
    /// Concurrency levels to run, one after another.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    concurrency: Vec<usize>,
    /// Also run open-loop at this many requests per second (Poisson arrivals).
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, default_value = "64:256")]
    prompt_len: String,
    #[arg(long, default_value = "16:128")]
    output_len: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Where the started worker runs: cpu or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Model preset of the started worker, written under target/perf-models the first time.
    #[arg(long, default_value = "small")]
    preset: Preset,
    /// Where presets are written (default: target/perf-models in the workspace).
    #[arg(long)]
    models: Option<PathBuf>,
    /// KV cache of a CPU worker, MiB (a GPU worker sizes its cache from free memory).
    #[arg(long, default_value_t = 1024)]
    kv_cache_mib: usize,
    /// How the requests sample: `greedy` (temperature 0), `default` (temperature 1, the SDKs'
    /// default) or `nucleus` (temperature 0.7, top_p 0.9).
    #[arg(long, value_enum, default_value = "greedy")]
    sampling: Sampling,
    /// Each request asks for this many `logprobs` alternatives (0 to 5, the legacy
    /// completions limit); none when not given.
    #[arg(long, value_parser = clap::value_parser!(u32).range(0..=5))]
    logprobs: Option<u32>,
    /// The worker draws tokens (and logprobs) where the logits are; `false` copies every
    /// step's logits to its host sampler (`llmctl worker --device-sampling`).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    device_sampling: bool,
    /// Write the table to perf/results/<date>-serve-<cpu|gpu>.md.
    #[arg(long)]
    record: bool,
    /// Write the table to this file as well.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Internal: run as the worker process.
    #[arg(long, hide = true)]
    as_worker: bool,
    #[arg(long, hide = true)]
    model: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Sampling {
    Greedy,
    Default,
    Nucleus,
}

/// What each request asks for besides its prompt and length.
#[derive(Clone, Copy, Debug)]
struct Asks {
    sampling: Sampling,
    logprobs: Option<u32>,
}

impl Asks {
    /// The request fields that ask for it.
    fn fields(self) -> Value {
        let mut fields = match self.sampling {
            Sampling::Greedy => json!({"temperature": 0}),
            Sampling::Default => json!({"temperature": 1}),
            Sampling::Nucleus => json!({"temperature": 0.7, "top_p": 0.9}),
        };
        if let Some(n) = self.logprobs {
            fields["logprobs"] = json!(n);
        }
        fields
    }
}

fn range(s: &str) -> Result<(usize, usize)> {
    let (a, b) = s.split_once(':').context("ranges are written LOW:HIGH")?;
    let (a, b) = (a.parse()?, b.parse()?);
    if a == 0 || a > b {
        bail!("bad range {s}");
    }
    Ok((a, b))
}

struct Sample {
    ttft: f64,
    itls: Vec<f64>,
    e2e: f64,
    output_tokens: usize,
    prompt_tokens: usize,
}

struct Report {
    label: String,
    duration: f64,
    samples: Vec<Sample>,
    failed: usize,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.as_worker {
        llmctl_inference_worker::init_logging();
        let model = args.model.context("--as-worker needs --model")?;
        // The benchmark holds this process's stdin: when it ends, however it ends (a timeout's
        // signal included), stdin closes and the worker goes with it.
        std::thread::spawn(|| {
            let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
            std::process::exit(0);
        });
        return server::run(WorkerArgs {
            model,
            host: "127.0.0.1".into(),
            port: 0,
            served_model_name: None,
            drain_grace_secs: 5,
            max_body_bytes: 8 << 20,
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 30,
            idle_timeout_secs: 75,
            write_stall_timeout_secs: 30,
            max_connections: 4096,
            kv_cache_mib: args.kv_cache_mib,
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            max_model_len: None,
            device: args.device,
            gpu_memory_utilization: 0.9,
            cuda_graphs: true,
            fused_gemv: true,
            device_sampling: args.device_sampling,
        });
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    runtime.block_on(bench(args))
}

async fn bench(args: Args) -> Result<()> {
    let (prompt_range, output_range) = (range(&args.prompt_len)?, range(&args.output_len)?);
    let mut worker = None;
    let addr = match &args.url {
        Some(url) => url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_owned(),
        None => {
            let (child, addr) = start_worker(&args)?;
            worker = Some(WorkerProcess(child));
            addr
        }
    };
    let model_name = if args.url.is_some() {
        args.model_name.clone()
    } else {
        format!("{}-seed1", args.preset.name())
    };
    // Loading a Llama-3.1-8B-shaped model on a fresh GPU machine takes minutes.
    llmctl_perf::wait_healthy(&addr, Duration::from_secs(900)).await?;
    // Prompt ids come from the tokenizer's ordinary tokens, clear of the special ones at the
    // top (4000 of the small preset's 4096; a server at --url is assumed to have as many).
    let ordinary = if args.url.is_some() {
        4000
    } else {
        args.preset.tokenizer_vocab() * 125 / 128
    };

    // A fresh workload per load level: reusing prompts would turn later levels into
    // prefix-cache hits.
    let workload = |level: u64| -> Arc<Vec<(Vec<u32>, usize)>> {
        let mut rng = Rng::new(args.seed ^ level.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        Arc::new(
            (0..args.num_requests)
                .map(|_| {
                    let plen = prompt_range.0 + rng.below(prompt_range.1 - prompt_range.0 + 1);
                    let olen = output_range.0 + rng.below(output_range.1 - output_range.0 + 1);
                    (
                        (0..plen).map(|_| rng.below(ordinary) as u32).collect(),
                        olen,
                    )
                })
                .collect(),
        )
    };

    let asks = Asks {
        sampling: args.sampling,
        logprobs: args.logprobs,
    };
    // Warm-up: one short request.
    one_request(&addr, &model_name, asks, &workload(u64::MAX)[0].0[..8], 4).await?;

    let mut reports = Vec::new();
    for (level, &c) in args.concurrency.iter().enumerate() {
        reports.push(
            run_load(
                &addr,
                &model_name,
                asks,
                &workload(level as u64),
                Load::Concurrency(c),
            )
            .await,
        );
        eprintln!("{}", summary_row(reports.last().expect("just pushed")));
    }
    if let Some(rate) = args.rate {
        let level = args.concurrency.len() as u64;
        reports.push(
            run_load(
                &addr,
                &model_name,
                asks,
                &workload(level),
                Load::Rate(rate, args.seed),
            )
            .await,
        );
        eprintln!("{}", summary_row(reports.last().expect("just pushed")));
    }
    let mut table = String::from(
        "| load | ok/failed | req/s | output tok/s | total tok/s | TTFT p50/p90/p99 ms | TPOT p50/p90/p99 ms | ITL p50/p99 ms | E2E p50/p99 s |\n|---|---|---:|---:|---:|---|---|---|---|\n",
    );
    for r in &reports {
        table.push_str(&summary_row(r));
        table.push('\n');
    }
    println!("{table}");
    if let Some(out) = &args.out {
        std::fs::write(out, &table)?;
    }
    if args.record {
        let (date, machine) = (llmctl_perf::today(), llmctl_perf::machine());
        let (device, preset) = (args.device, args.preset.name());
        let text = format!(
            "# Serving benchmark, {device}, {date}\n\n- machine: {machine}; worker and load generator share them\n- command: `cargo run --release -p llmctl-perf --bin serve_bench -- --device {device} --preset {preset} --num-requests {} --concurrency {} --prompt-len {} --output-len {}{} --sampling {}{} --device-sampling {} --record`\n- server: `llmctl-worker` ({device}), `{preset}` preset (seed 1), streaming `/v1/completions` with random token-id prompts (fresh per load level, so no prefix-cache hits), `ignore_eos`, request fields {}, tokens drawn {}\n\n{table}\n",
            args.num_requests,
            args.concurrency
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(","),
            args.prompt_len,
            args.output_len,
            args.rate.map_or(String::new(), |r| format!(" --rate {r}")),
            args.sampling
                .to_possible_value()
                .map_or_else(String::new, |v| v.get_name().to_owned()),
            args.logprobs
                .map_or(String::new(), |n| format!(" --logprobs {n}")),
            args.device_sampling,
            asks.fields(),
            if args.device_sampling {
                "where the logits are"
            } else {
                "by the host sampler from every step's logits"
            },
        );
        let kind = if matches!(args.device, Device::Cpu) {
            "cpu"
        } else {
            "gpu"
        };
        let path = llmctl_perf::record(&format!("serve-{kind}"), &text)?;
        eprintln!("recorded {}", path.display());
    }
    drop(worker);
    Ok(())
}

/// The started worker, stopped when the benchmark ends, by an error too.
struct WorkerProcess(Child);

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_worker(args: &Args) -> Result<(Child, String)> {
    let dir = match &args.models {
        Some(root) => llmctl_perf::preset_model_in(root, args.preset, 1)?,
        None => llmctl_perf::preset_model(args.preset, 1)?,
    };
    let device = args.device.to_string();
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--as-worker", "--device", &device, "--kv-cache-mib"])
        .arg(args.kv_cache_mib.to_string())
        .arg("--device-sampling")
        .arg(args.device_sampling.to_string())
        .arg("--model")
        .arg(&dir)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        // Warnings and errors (why a worker failed to load) show with the benchmark's own.
        .stderr(Stdio::inherit())
        .spawn()?;
    let addr = llmctl_perf::listening_addr(&mut child)?;
    Ok((child, addr))
}

/// One streamed completion, timed.
async fn one_request(
    addr: &str,
    model: &str,
    asks: Asks,
    prompt: &[u32],
    max_tokens: usize,
) -> Result<Sample> {
    let mut body = json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": true,
        "stream": true, "stream_options": {"include_usage": true}});
    if let (Some(body), Value::Object(fields)) = (body.as_object_mut(), asks.fields()) {
        body.extend(fields);
    }
    let started = Instant::now();
    let mut r =
        llmctl_perf::http_request(addr, "POST", "/v1/completions", serde_json::to_vec(&body)?)
            .await?;
    if r.status() != 200 {
        bail!("status {}", r.status());
    }
    let (mut first, mut last) = (None, started);
    let mut itls = Vec::new();
    let mut buf = Vec::new();
    let mut usage = Value::Null;
    while let Some(frame) = r.body_mut().frame().await {
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event: Vec<u8> = buf.drain(..end + 2).collect();
            // Comments (the gateway's terminal-reason line) carry no data.
            if event.starts_with(b":") {
                continue;
            }
            let payload = event.strip_prefix(b"data: ").context("SSE data line")?;
            let payload = &payload[..payload.len() - 2];
            if payload == b"[DONE]" {
                continue;
            }
            let v: Value = serde_json::from_slice(payload)?;
            if v.get("error").is_some() {
                bail!("stream error: {v}");
            }
            if !v["usage"].is_null() {
                usage = v["usage"].clone();
            }
            if v["choices"].as_array().is_some_and(|c| !c.is_empty()) {
                let now = Instant::now();
                match first {
                    None => first = Some(now),
                    Some(_) => itls.push((now - last).as_secs_f64()),
                }
                last = now;
            }
        }
    }
    let first = first.context("no tokens streamed")?;
    Ok(Sample {
        ttft: (first - started).as_secs_f64(),
        itls,
        e2e: started.elapsed().as_secs_f64(),
        output_tokens: usage["completion_tokens"].as_u64().context("usage chunk")? as usize,
        prompt_tokens: usage["prompt_tokens"].as_u64().context("usage chunk")? as usize,
    })
}

enum Load {
    Concurrency(usize),
    Rate(f64, u64),
}

async fn run_load(
    addr: &str,
    model: &str,
    asks: Asks,
    workload: &Arc<Vec<(Vec<u32>, usize)>>,
    load: Load,
) -> Report {
    let (label, permits) = match load {
        Load::Concurrency(c) => (format!("concurrency {c}"), c),
        Load::Rate(r, _) => (format!("rate {r}/s"), usize::MAX >> 4),
    };
    let gate = Arc::new(Semaphore::new(permits));
    let started = Instant::now();
    let mut tasks = Vec::new();
    let mut arrivals = match load {
        Load::Rate(_, seed) => Some(Rng::new(seed ^ 0xabcdef)),
        Load::Concurrency(_) => None,
    };
    for i in 0..workload.len() {
        if let (Some(rng), Load::Rate(rate, _)) = (arrivals.as_mut(), &load) {
            // Exponential gaps: a Poisson process at `rate` requests per second.
            let gap = -(1.0 - rng.uniform()).ln() / rate;
            tokio::time::sleep(Duration::from_secs_f64(gap)).await;
        }
        let permit = gate
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (addr, model, workload) = (addr.to_owned(), model.to_owned(), workload.clone());
        tasks.push(tokio::spawn(async move {
            let (prompt, olen) = &workload[i];
            let result = one_request(&addr, &model, asks, prompt, *olen).await;
            drop(permit);
            result
        }));
    }
    let mut samples = Vec::new();
    let mut failed = 0;
    for t in tasks {
        match t.await {
            Ok(Ok(s)) => samples.push(s),
            Ok(Err(e)) => {
                eprintln!("request failed: {e:#}");
                failed += 1;
            }
            Err(_) => failed += 1,
        }
    }
    Report {
        label,
        duration: started.elapsed().as_secs_f64(),
        samples,
        failed,
    }
}

fn pct(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[((values.len() - 1) as f64 * p).round() as usize]
}

fn summary_row(r: &Report) -> String {
    let out: usize = r.samples.iter().map(|s| s.output_tokens).sum();
    let prompt: usize = r.samples.iter().map(|s| s.prompt_tokens).sum();
    let mut ttft: Vec<f64> = r.samples.iter().map(|s| s.ttft * 1e3).collect();
    let mut tpot: Vec<f64> = r
        .samples
        .iter()
        .filter(|s| s.output_tokens > 1)
        .map(|s| (s.e2e - s.ttft) * 1e3 / (s.output_tokens - 1) as f64)
        .collect();
    let mut itl: Vec<f64> = r
        .samples
        .iter()
        .flat_map(|s| s.itls.iter().map(|x| x * 1e3))
        .collect();
    let mut e2e: Vec<f64> = r.samples.iter().map(|s| s.e2e).collect();
    format!(
        "| {} | {}/{} | {:.2} | {:.0} | {:.0} | {:.0} / {:.0} / {:.0} | {:.1} / {:.1} / {:.1} | {:.1} / {:.1} | {:.2} / {:.2} |",
        r.label,
        r.samples.len(),
        r.failed,
        r.samples.len() as f64 / r.duration,
        out as f64 / r.duration,
        (out + prompt) as f64 / r.duration,
        pct(&mut ttft, 0.5),
        pct(&mut ttft, 0.9),
        pct(&mut ttft, 0.99),
        pct(&mut tpot, 0.5),
        pct(&mut tpot, 0.9),
        pct(&mut tpot, 0.99),
        pct(&mut itl, 0.5),
        pct(&mut itl, 0.99),
        pct(&mut e2e, 0.5),
        pct(&mut e2e, 0.99),
    )
}
