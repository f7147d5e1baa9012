//! Decode step time against the memory roofline. A decode step must read every weight once
//! (the embedding only for the batch's rows; a tied embedding in full, as the output head) and
//! each sequence's K/V; at batch 1 that reading is the floor, so the roofline is those bytes
//! over the device's measured copy bandwidth. Reports, per batch size, the step time of a plain
//! run (on a GPU: decode steps replayed from CUDA graphs, again op by op, and at small batch
//! again without the fused sublayer-input GEMVs), the roofline, their ratio, and where the
//! step goes (GEMMs with the sublayer inputs around them, attention, other operations,
//! host-side work), measured in a second run whose backend waits for the device around each
//! operation (`backend::profiled`), with each component's own roofline.
//!
//! `cargo run --release -p llmctl-perf --bin decode_bench -- [--device cpu|cuda:N]
//!  [--preset small|llama-3.2-1b|llama-3.1-8b] [--batches 1,64] [--context 512] [--record]`
//! On a GPU machine `perf/gpu/run.sh run` runs it for both Llama-shaped presets.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use half::bf16;
use llmctl_inference_worker::backend::Backend;
use llmctl_inference_worker::backend::cpu::CpuBackend;
use llmctl_inference_worker::backend::cuda::{CudaBackend, FUSED_GEMV_MAX_ROWS};
use llmctl_inference_worker::backend::profiled::{OpTimes, Profiled};
use llmctl_inference_worker::engine::{Engine, EngineConfig, SamplingParams};
use llmctl_inference_worker::model::{self, init::Preset};
use llmctl_inference_worker::server::Device;
use rayon::prelude::*;
use serde_json::Value;

#[derive(Parser)]
struct Args {
    /// `cpu` or `cuda:N` (bf16 weights and KV cache on the GPU, f32 on the CPU).
    #[arg(long, default_value = "cpu")]
    device: Device,
    /// Model preset, written under target/perf-models the first time.
    #[arg(long, default_value = "small")]
    preset: Preset,
    /// A model folder instead of a preset.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Where presets are written (default: target/perf-models in the workspace).
    #[arg(long)]
    models: Option<PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = "1")]
    batches: Vec<usize>,
    /// Context length of every sequence when the timed steps start.
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Timed decode steps.
    #[arg(long, default_value_t = 32)]
    steps: usize,
    /// CPU threads (the CPU backend and the CPU copy measurement).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    #[arg(long)]
    record: bool,
    /// Write the table to this file as well.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// What one decode step must read, from the model's files.
struct StepBytes {
    /// Every weight once; the embedding's batch rows (or all of it when tied).
    weights: f64,
    /// K and V of every sequence at the mean context of the timed steps.
    kv: f64,
}

fn step_bytes(dir: &Path, batch: usize, context: f64, elem: f64) -> Result<StepBytes> {
    let config: Value = serde_json::from_slice(&std::fs::read(dir.join("config.json"))?)?;
    let get = |k: &str| {
        config[k]
            .as_u64()
            .map(|v| v as f64)
            .with_context(|| format!("config.json: {k}"))
    };
    let (hidden, layers, heads) = (
        get("hidden_size")?,
        get("num_hidden_layers")?,
        get("num_attention_heads")?,
    );
    let kv_heads = get("num_key_value_heads").unwrap_or(heads);
    let head_dim = get("head_dim").unwrap_or(hidden / heads);
    let tied = config["tie_word_embeddings"].as_bool().unwrap_or(false);
    let (mut params, mut embedding) = (0f64, 0f64);
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "safetensors") {
            continue;
        }
        for (name, shape) in safetensors_shapes(&path)? {
            let n = shape.iter().product::<usize>() as f64;
            params += n;
            if name == "model.embed_tokens.weight" {
                embedding = n;
            }
        }
    }
    let embedding_read = if tied {
        embedding
    } else {
        batch as f64 * hidden
    };
    Ok(StepBytes {
        weights: (params - embedding + embedding_read) * elem,
        kv: batch as f64 * context * layers * 2.0 * kv_heads * head_dim * elem,
    })
}

/// Each tensor's name and shape, from a safetensors file's header alone (not its gigabytes
/// of data).
fn safetensors_shapes(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)?;
    let n = u64::from_le_bytes(len);
    if n > 100 << 20 {
        bail!("{}: a {n}-byte header is not plausible", path.display());
    }
    let mut header = vec![0u8; n as usize];
    file.read_exact(&mut header)?;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&header).with_context(|| format!("{}: header", path.display()))?;
    header
        .into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .map(|(name, info)| {
            let shape = serde_json::from_value(info["shape"].clone())
                .with_context(|| format!("{}: shape of {name}", path.display()))?;
            Ok((name, shape))
        })
        .collect()
}

/// One batch size: the plain step time, and the profiled run's per-step breakdown.
struct Measured {
    step: f64,
    /// The step time with CUDA graphs off (GPU only).
    op_by_op_step: Option<f64>,
    /// The step time with the sublayer inputs on cuBLAS and separate kernels instead of the
    /// fused GEMVs (GPU, batches the fused path takes).
    unfused_step: Option<f64>,
    ops: OpTimes,
    profiled_step: f64,
}

/// Adds `batch` sequences of `context` prompt tokens and steps until all of them decode
/// together.
fn fill<B: Backend>(engine: &mut Engine<B>, batch: usize, args: &Args) -> Result<()> {
    let vocab = engine.tokenizer().vocab_size() as u64;
    let params = SamplingParams {
        max_tokens: max_tokens(batch, args),
        ignore_eos: true,
        ..SamplingParams::greedy()
    };
    for id in 0..batch as u64 {
        let prompt = (0..args.context as u64)
            .map(|i| ((id * 7919 + i * 104_729) % vocab) as u32)
            .collect();
        engine.add_request(id, prompt, params.clone())?;
    }
    // Prefill is chunked: done when a step gives every sequence a token; two more to warm up.
    let mut guard = 0;
    while engine.step().len() < batch {
        guard += 1;
        if guard > 100_000 {
            bail!("the batch of {batch} never got to decoding together");
        }
    }
    for _ in 0..2 {
        engine.step();
    }
    Ok(())
}

/// The mean time of `steps` decode steps of the whole batch.
fn time_steps<B: Backend>(engine: &mut Engine<B>, batch: usize, steps: usize) -> Result<f64> {
    let start = Instant::now();
    for _ in 0..steps {
        let out = engine.step();
        if out.len() != batch {
            bail!(
                "a decode step produced {} tokens for a batch of {batch}",
                out.len()
            );
        }
    }
    Ok(start.elapsed().as_secs_f64() / steps as f64)
}

/// Room for the decode steps some sequences take while others still prefill (chunks of
/// 8192 tokens), the warm-up and the timed steps: nobody finishes before timing ends.
fn max_tokens(batch: usize, args: &Args) -> usize {
    args.steps + (batch * args.context).div_ceil(8192) + 4
}

fn engine_config(batch: usize, args: &Args) -> EngineConfig {
    EngineConfig {
        // Every sequence at its longest: no preemption while measuring.
        num_blocks: Some(batch * (args.context + max_tokens(batch, args)).div_ceil(16) + 8),
        max_num_seqs: batch,
        max_num_batched_tokens: 8192.max(args.context),
        enable_prefix_caching: false,
        ..EngineConfig::default()
    }
}

/// A plain run for the step time (and, on a GPU, one with CUDA graphs off and, where the
/// fused GEMVs take the batch, one without them), then a profiled one for the breakdown (per
/// step). `backend(graphs, fused)` makes the backend.
fn measure<B: Backend>(
    dir: &Path,
    batch: usize,
    args: &Args,
    gpu: bool,
    backend: impl Fn(bool, bool) -> Result<B>,
) -> Result<Measured> {
    let plain = |graphs: bool, fused: bool| -> Result<f64> {
        let mut engine = Engine::new(
            model::load(dir, backend(graphs, fused)?)?,
            engine_config(batch, args),
        );
        fill(&mut engine, batch, args)?;
        time_steps(&mut engine, batch, args.steps)
    };
    let step = plain(gpu, true)?;
    let op_by_op_step = gpu.then(|| plain(false, true)).transpose()?;
    let unfused_step = (gpu && batch <= FUSED_GEMV_MAX_ROWS)
        .then(|| plain(true, false))
        .transpose()?;
    // Op by op: a graph's replay cannot be timed by op, and its padding would inflate them.
    let mut engine = Engine::new(
        model::load(dir, Profiled::new(backend(false, true)?))?,
        engine_config(batch, args),
    );
    fill(&mut engine, batch, args)?;
    engine.model().backend.take();
    let profiled_step = time_steps(&mut engine, batch, args.steps)?;
    let total = engine.model().backend.take();
    let per_step = |d: Duration| d / args.steps as u32;
    Ok(Measured {
        step,
        op_by_op_step,
        unfused_step,
        ops: OpTimes {
            gemm: per_step(total.gemm),
            attention: per_step(total.attention),
            other: per_step(total.other),
        },
        profiled_step,
    })
}

/// Milliseconds to 3 places, or "-" for a run not made.
fn optional_ms(seconds: Option<f64>) -> String {
    seconds.map_or("-".to_owned(), |s| format!("{:.3}", s * 1e3))
}

/// Copy bandwidth of host memory in GB/s (read plus written), with `threads` threads.
fn host_copy_bandwidth() -> f64 {
    let n = 256usize << 20;
    let src = vec![1u8; n];
    let mut dst = vec![0u8; n];
    let mut times = Vec::new();
    for _ in 0..7 {
        let start = Instant::now();
        dst.par_chunks_mut(1 << 20)
            .zip(src.par_chunks(1 << 20))
            .for_each(|(d, s)| d.copy_from_slice(s));
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    2.0 * n as f64 / times[times.len() / 2] / 1e9
}

fn main() -> Result<()> {
    let args = Args::parse();
    rayon::ThreadPoolBuilder::new()
        .num_threads(args.threads)
        .build_global()?;
    let dir = match &args.model {
        Some(dir) => dir.clone(),
        None => match &args.models {
            Some(root) => llmctl_perf::preset_model_in(root, args.preset, 1)?,
            None => llmctl_perf::preset_model(args.preset, 1)?,
        },
    };
    let cuda = match args.device {
        Device::Cpu => None,
        Device::Cuda(ordinal) => Some(ordinal),
        Device::Auto => bail!("--device auto: say cpu or cuda:N"),
    };
    // Bytes per element of weights and KV cache as each backend holds them.
    let (elem, copy_gbs, device) = match cuda {
        None => (
            4.0,
            host_copy_bandwidth(),
            format!("CPU, {} threads", args.threads),
        ),
        Some(ordinal) => {
            let kernels = llmctl_kernels::cuda::Kernels::new(ordinal)?;
            let copy = llmctl_perf::cuda::copy_bandwidth(&kernels, 20)?;
            // Named, so a run on the CPU emulator of the driver can never pass for a GPU's.
            (
                2.0,
                copy,
                format!("cuda:{ordinal} ({})", kernels.device_name),
            )
        }
    };
    eprintln!("{device}: copy bandwidth {copy_gbs:.0} GB/s (read + write)");
    let ms = |s: f64| s * 1e3;
    let mut table = format!(
        "Model: {} ({}); device {device}, copy bandwidth {copy_gbs:.0} GB/s; context {} \
         tokens, {} timed steps.\n\n\
         | batch | step ms | op-by-op step ms | unfused step ms | roofline ms | step / roofline \
         | GEMM ms (roofline) | attention ms (roofline) | other ops ms | host ms |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        dir.display(),
        if cuda.is_some() { "bf16" } else { "f32" },
        args.context,
        args.steps
    );
    for &batch in &args.batches {
        let measured = match cuda {
            None => measure(&dir, batch, &args, false, |_, _| Ok(CpuBackend::new()))?,
            Some(ordinal) => measure(&dir, batch, &args, true, |graphs, fused| {
                Ok(CudaBackend::<bf16>::new(ordinal)?
                    .with_graphs(graphs)
                    .with_fused_gemv(fused))
            })?,
        };
        let bytes = step_bytes(
            &dir,
            batch,
            args.context as f64 + args.steps as f64 / 2.0,
            elem,
        )?;
        let bw = copy_gbs * 1e9;
        let (weights_roof, kv_roof) = (bytes.weights / bw, bytes.kv / bw);
        let roof = weights_roof + kv_roof;
        let ops = measured.ops;
        let host = measured.profiled_step - (ops.gemm + ops.attention + ops.other).as_secs_f64();
        let row = format!(
            "| {batch} | {:.3} | {} | {} | {:.3} | {:.2} | {:.3} ({:.3}) | {:.3} ({:.3}) | {:.3} | {:.3} |
",
            ms(measured.step),
            optional_ms(measured.op_by_op_step),
            optional_ms(measured.unfused_step),
            ms(roof),
            measured.step / roof,
            ms(ops.gemm.as_secs_f64()),
            ms(weights_roof),
            ms(ops.attention.as_secs_f64()),
            ms(kv_roof),
            ms(ops.other.as_secs_f64()),
            ms(host.max(0.0)),
        );
        eprint!("{row}");
        table.push_str(&row);
    }
    table.push_str(
        "\nStep: decode steps replayed from CUDA graphs on a GPU; op-by-op: the same with graphs \
         off; unfused: graphs on, but each sublayer input on cuBLAS and separate residual, norm, \
         rotary/KV-write and SiLU kernels instead of the fused GEMVs (batch 1, the only one fused). Roofline: \
         weights (the embedding's batch rows, or all of it when tied) plus K/V at the mean \
         context, over the copy bandwidth. Breakdown from a second run that waits for the \
         device around each operation (a sublayer input counts as GEMM whole); host = that run's \
         step minus its operations.\n",
    );
    println!("{table}");
    if let Some(out) = &args.out {
        std::fs::write(out, &table)?;
    }
    if args.record {
        let text = format!(
            "# Decode step vs roofline, {}\n\n- machine: {}\n- command: `cargo run --release \
             -p llmctl-perf --bin decode_bench -- --device {} --preset {} --batches {} \
             --context {} --steps {} --record`\n\n{table}",
            llmctl_perf::today(),
            llmctl_perf::machine(),
            args.device,
            args.preset.name(),
            args.batches
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(","),
            args.context,
            args.steps
        );
        let name = format!("decode-{}", if cuda.is_some() { "gpu" } else { "cpu" });
        eprintln!("recorded {}", llmctl_perf::record(&name, &text)?.display());
    }
    Ok(())
}
