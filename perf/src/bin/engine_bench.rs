//! Engine benchmark: CPU throughput of the llmctl engine on the `small` preset at several batch
//! sizes, prefill and decode measured separately, with the same weights run side by side
//! through Hugging Face `transformers` on CPU (`perf/engine_bench/hf_bench.py`) in the same run.
//!
//! `cargo run --release -p llmctl-perf --bin engine_bench -- [--record]`
//!
//! Prefill: B distinct random prompts of `prompt_len` tokens enter an idle engine together and
//! are computed in one step (token budget B × prompt_len), first tokens sampled. Decode: the
//! next `decode_tokens` steps, each one token for each of the B sequences. Prefix caching is
//! off so nothing is reused. Best of `repeats` rounds after a warm-up round, as on the HF side.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use llmctl_inference_worker::backend::cpu::CpuBackend;
use llmctl_inference_worker::engine::{Engine, EngineConfig, SamplingParams};
use llmctl_inference_worker::model::{self, init};
use serde_json::Value;

#[derive(Parser)]
struct Args {
    /// Model folder; by default the `small` preset (seed 1) is written under target/perf-models.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    batches: Vec<usize>,
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    #[arg(long, default_value_t = 32)]
    decode_tokens: usize,
    /// Threads for both engines.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Skip the transformers side.
    #[arg(long)]
    no_hf: bool,
    #[arg(long, default_value = "python3")]
    python: String,
    /// Write the table to perf/results/<date>-engine-cpu.md.
    #[arg(long)]
    record: bool,
}

struct Row {
    batch: usize,
    prefill_tok_s: f64,
    decode_tok_s: f64,
    decode_step_ms: f64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()?;
    let root = llmctl_perf::workspace_root();
    let model_dir = match &args.model {
        Some(dir) => dir.clone(),
        None => {
            let dir = root.join("target/perf-models/small-seed1");
            if !dir.join("model.safetensors").exists() {
                eprintln!("writing the small preset to {}", dir.display());
                let opts = init::InitOptions {
                    preset: init::Preset::Small,
                    seed: 1,
                    dtype: init::InitDtype::Bf16,
                };
                init::write_model(&dir, &opts)?;
            }
            dir
        }
    };

    let mut ours = Vec::new();
    for &batch in &args.batches {
        let row = bench_llmctl(&model_dir, batch, &args)?;
        eprintln!(
            "llmctl batch {batch}: prefill {:.0} tok/s, decode {:.0} tok/s ({:.2} ms/step)",
            row.prefill_tok_s, row.decode_tok_s, row.decode_step_ms
        );
        ours.push(row);
    }
    let hf = if args.no_hf {
        None
    } else {
        Some(bench_hf(root, &model_dir, &args)?)
    };

    let mut table = String::new();
    table.push_str("| batch | prefill tok/s llmctl | prefill tok/s HF | ratio | decode tok/s llmctl | decode tok/s HF | ratio | decode ms/step llmctl | HF |\n");
    table.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for row in &ours {
        let theirs = hf
            .as_ref()
            .and_then(|(_, rows)| rows.iter().find(|r| r.batch == row.batch));
        let cell =
            |v: Option<f64>, prec: usize| v.map_or("-".to_owned(), |v| format!("{v:.prec$}"));
        table.push_str(&format!(
            "| {} | {:.0} | {} | {} | {:.0} | {} | {} | {:.2} | {} |\n",
            row.batch,
            row.prefill_tok_s,
            cell(theirs.map(|t| t.prefill_tok_s), 0),
            cell(theirs.map(|t| row.prefill_tok_s / t.prefill_tok_s), 2),
            row.decode_tok_s,
            cell(theirs.map(|t| t.decode_tok_s), 0),
            cell(theirs.map(|t| row.decode_tok_s / t.decode_tok_s), 2),
            row.decode_step_ms,
            cell(theirs.map(|t| t.decode_step_ms), 2),
        ));
    }
    println!("{table}");
    if args.record {
        let path = record(&args, &table, hf.as_ref().map(|(v, _)| v))?;
        eprintln!("recorded {}", path.display());
    }
    Ok(())
}

fn bench_llmctl(dir: &Path, batch: usize, args: &Args) -> Result<Row> {
    let loaded = model::load(dir, CpuBackend::new())?;
    let vocab = loaded.tokenizer.vocab_size() as u64;
    let config = EngineConfig {
        num_blocks: Some(batch * (args.prompt_len + args.decode_tokens + 2).div_ceil(16) + 8),
        max_num_seqs: batch,
        max_num_batched_tokens: batch * args.prompt_len,
        enable_prefix_caching: false,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(loaded, config);
    let params = SamplingParams {
        max_tokens: args.decode_tokens + 1,
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    let mut best = (f64::INFINITY, f64::INFINITY);
    let mut next_id = 0u64;
    for round in 0..=args.repeats {
        for _ in 0..batch {
            let prompt = (0..args.prompt_len as u64)
                .map(|i| ((next_id * 7919 + i * 104_729) % vocab) as u32)
                .collect();
            engine.add_request(next_id, prompt, params.clone())?;
            next_id += 1;
        }
        let t = Instant::now();
        let first = engine.step();
        let prefill = t.elapsed().as_secs_f64();
        if first.len() != batch {
            bail!(
                "prefill step produced {} first tokens for a batch of {batch}",
                first.len()
            );
        }
        let t = Instant::now();
        for _ in 0..args.decode_tokens {
            let out = engine.step();
            if out.len() != batch {
                bail!(
                    "decode step produced {} tokens for a batch of {batch}",
                    out.len()
                );
            }
        }
        let decode = t.elapsed().as_secs_f64();
        if engine.has_unfinished() {
            bail!(
                "requests did not finish after {} decode steps",
                args.decode_tokens
            );
        }
        if round > 0 {
            best = (best.0.min(prefill), best.1.min(decode));
        }
    }
    Ok(Row {
        batch,
        prefill_tok_s: (batch * args.prompt_len) as f64 / best.0,
        decode_tok_s: (batch * args.decode_tokens) as f64 / best.1,
        decode_step_ms: best.1 * 1e3 / args.decode_tokens as f64,
    })
}

fn bench_hf(root: &Path, dir: &Path, args: &Args) -> Result<(Value, Vec<Row>)> {
    let script = root.join("perf/engine_bench/hf_bench.py");
    let batches: Vec<String> = args.batches.iter().map(usize::to_string).collect();
    let output = Command::new(&args.python)
        .arg(&script)
        .args(["--model", &dir.display().to_string()])
        .args(["--batches", &batches.join(",")])
        .args(["--prompt-len", &args.prompt_len.to_string()])
        .args(["--decode-tokens", &args.decode_tokens.to_string()])
        .args(["--threads", &args.threads.to_string()])
        .args(["--repeats", &args.repeats.to_string()])
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {} {}", args.python, script.display()))?;
    if !output.status.success() {
        bail!(
            "{} failed ({}); install: pip install torch transformers safetensors",
            script.display(),
            output.status
        );
    }
    let report: Value =
        serde_json::from_slice(&output.stdout).context("parsing hf_bench.py output")?;
    let rows = report["results"]
        .as_array()
        .context("hf_bench.py output has no results")?
        .iter()
        .map(|r| Row {
            batch: r["batch"].as_u64().unwrap_or(0) as usize,
            prefill_tok_s: r["prefill_tokens_per_s"].as_f64().unwrap_or(f64::NAN),
            decode_tok_s: r["decode_tokens_per_s"].as_f64().unwrap_or(f64::NAN),
            decode_step_ms: r["decode_step_ms"].as_f64().unwrap_or(f64::NAN),
        })
        .collect();
    Ok((report, rows))
}

fn record(args: &Args, table: &str, hf: Option<&Value>) -> Result<PathBuf> {
    let (date, machine) = (llmctl_perf::today(), llmctl_perf::machine());
    let text = format!(
        "# Engine benchmark, CPU, {date}\n\n\
         - machine: {machine}, {threads} threads for both engines\n\
         - command: `cargo run --release -p llmctl-perf --bin engine_bench -- --batches {batches} --prompt-len {pl} --decode-tokens {dt} --threads {threads} --repeats {rep} --record`\n\
         - model: `small` preset (seed 1, bf16 weights upcast to f32 by both engines)\n\
         - reference: {hf}\n\n{table}\n",
        threads = args.threads,
        batches = args
            .batches
            .iter()
            .map(usize::to_string)
            .collect::<Vec<_>>()
            .join(","),
        pl = args.prompt_len,
        dt = args.decode_tokens,
        rep = args.repeats,
        hf = hf.map_or("not run".to_owned(), |v| format!(
            "{} {}",
            v["versions"],
            v.get("attn_implementation").unwrap_or(&Value::Null)
        )),
    );
    Ok(llmctl_perf::record("engine-cpu", &text)?)
}
