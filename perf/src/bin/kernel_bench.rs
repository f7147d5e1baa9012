//! Kernel benchmark on a CUDA GPU (bf16, head_dim 128, 32 query heads over 8 KV heads, block
//! size 16):
//!
//! - the device's copy bandwidth (a large device-to-device copy, bytes read plus written);
//! - decode attention at batch x context 1 x 64k, 16 x 4k, 64 x 1k and 8 x 1k: achieved
//!   bandwidth (K/V and Q read, output written, over the median time) against the copy
//!   bandwidth. Several caches are rotated so small shapes are not served from L2;
//! - prefill attention (causal, one sequence of 1k to 16k tokens): TFLOP/s, side by side with
//!   PyTorch's `scaled_dot_product_attention` on the same shapes when `--sdpa SCRIPT` names
//!   `perf/gpu/sdpa_bench.py` (run in the same call; its JSON is merged into the table);
//! - the fused small-batch projections (gemv.cu) on the Llama-3.2-1B and Llama-3.1-8B
//!   projection shapes at 1 and 4 rows: weight bandwidth against the copy bandwidth, side by
//!   side with a plain cuBLAS GEMM of the same shape (which does less: no norm, residual or
//!   SiLU). Weights rotate through copies larger than L2;
//! - sampling over a 128,256-token vocabulary at 1 and 64 rows (logits about normal, deviation
//!   3): the argmax, a softmax draw, the softmax mass and a top-64 where the logits are (what the worker runs instead of copying
//!   logits out), beside the copy of the same logits to (pageable) host memory that they save.
//!
//! Times are medians over `--repeats` runs, after a warm-up, with device events.
//! `perf/gpu/run.sh` builds this on a build machine and runs it on the GPU machine.

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Parser;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, sys::cublasOperation_t};
use cudarc::driver::CudaSlice;
use half::bf16;
use llmctl_kernels::cuda::{GemvThen, Kernels, PagedCache, Split};
use llmctl_kernels::reference::TestRng;
use llmctl_perf::cuda::{copy_bandwidth, time_ms};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 20)]
    repeats: usize,
    /// Python script printing PyTorch SDPA times as JSON (perf/gpu/sdpa_bench.py).
    #[arg(long)]
    sdpa: Option<String>,
    /// Write the table to this file as well.
    #[arg(long)]
    out: Option<String>,
    /// Which parts to run: `decode`, `prefill`, `gemv`, `sampling`.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "decode,prefill,gemv,sampling"
    )]
    sections: Vec<String>,
}

const Q_HEADS: usize = 32;
const KV_HEADS: usize = 8;
const HEAD_DIM: usize = 128;
const BLOCK: usize = 16;

fn random(k: &Kernels, rng: &mut TestRng, n: usize) -> Result<CudaSlice<bf16>> {
    let host: Vec<bf16> = (0..n).map(|_| bf16::from_f32(rng.uniform())).collect();
    Ok(k.stream().clone_htod(&host)?)
}

struct Layer {
    k: CudaSlice<bf16>,
    v: CudaSlice<bf16>,
}

fn decode(
    k: &Kernels,
    rng: &mut TestRng,
    seqs: usize,
    ctx: usize,
    repeats: usize,
    copy_gbs: f64,
) -> Result<String> {
    let blocks_per_seq = ctx.div_ceil(BLOCK);
    let elems = seqs * blocks_per_seq * BLOCK * KV_HEADS * HEAD_DIM;
    let kv_bytes = 2 * elems * 2;
    // Enough copies that the rotation does not fit in L2 (at least 256 MiB touched in turn).
    let copies = ((256usize << 20) / kv_bytes).clamp(1, 8);
    let layers: Vec<Layer> = (0..copies)
        .map(|_| {
            Ok(Layer {
                k: random(k, rng, elems)?,
                v: random(k, rng, elems)?,
            })
        })
        .collect::<Result<_>>()?;
    let tables: Vec<i32> = (0..(seqs * blocks_per_seq) as i32).collect();
    let tables = k.stream().clone_htod(&tables)?;
    let lens = k.stream().clone_htod(&vec![ctx as i32; seqs])?;
    let q = random(k, rng, seqs * Q_HEADS * HEAD_DIM)?;
    let mut out = k.stream().alloc_zeros::<bf16>(seqs * Q_HEADS * HEAD_DIM)?;
    let mut parts = 0;
    let ms = time_ms(k, repeats, |i| {
        let layer = &layers[i % layers.len()];
        let cache = PagedCache {
            k: &layer.k,
            v: &layer.v,
            block_tables: &tables,
            max_blocks: blocks_per_seq,
            context_lens: &lens,
            block_size: BLOCK,
            num_kv_heads: KV_HEADS,
            head_dim: HEAD_DIM,
        };
        parts = k.decode_attention(
            &mut out,
            &q.slice(..),
            Q_HEADS * HEAD_DIM,
            &cache,
            Q_HEADS,
            ctx,
            0.088,
            Split::Auto,
        )?;
        Ok(())
    })?;
    let bytes = kv_bytes + 2 * 2 * seqs * Q_HEADS * HEAD_DIM;
    let gbs = bytes as f64 / (ms * 1e-3) / 1e9;
    Ok(format!(
        "| {seqs} x {ctx} | {parts} | {:.1} | {gbs:.0} | {:.0}% |",
        ms * 1e3,
        100.0 * gbs / copy_gbs
    ))
}

fn prefill(k: &Kernels, rng: &mut TestRng, len: usize, repeats: usize) -> Result<(f64, f64)> {
    let blocks = len.div_ceil(BLOCK);
    let elems = blocks * BLOCK * KV_HEADS * HEAD_DIM;
    let layer = Layer {
        k: random(k, rng, elems)?,
        v: random(k, rng, elems)?,
    };
    let tables = k
        .stream()
        .clone_htod(&(0..blocks as i32).collect::<Vec<_>>())?;
    let lens = k.stream().clone_htod(&[len as i32])?;
    let cu = k.stream().clone_htod(&[0, len as i32])?;
    let q = random(k, rng, len * Q_HEADS * HEAD_DIM)?;
    let mut out = k.stream().alloc_zeros::<bf16>(len * Q_HEADS * HEAD_DIM)?;
    let cache = PagedCache {
        k: &layer.k,
        v: &layer.v,
        block_tables: &tables,
        max_blocks: blocks,
        context_lens: &lens,
        block_size: BLOCK,
        num_kv_heads: KV_HEADS,
        head_dim: HEAD_DIM,
    };
    let ms = time_ms(k, repeats.min(10), |_| {
        Ok(k.prefill_attention(
            &mut out,
            &q.slice(..),
            Q_HEADS * HEAD_DIM,
            &cache,
            &cu,
            Q_HEADS,
            len,
            0.088,
        )?)
    })?;
    // Causal: QK^T and PV over about half the score matrix, 2 FLOPs per multiply-add.
    let flops = 4.0 * (len as f64) * (len as f64 + 1.0) / 2.0 * HEAD_DIM as f64 * Q_HEADS as f64;
    Ok((ms, flops / (ms * 1e-3) / 1e12))
}

fn sdpa_times(script: &str, lens: &[usize], repeats: usize) -> Result<serde_json::Value> {
    let out = Command::new("python3")
        .arg(script)
        .args([
            "--lens",
            &lens
                .iter()
                .map(|l| l.to_string())
                .collect::<Vec<_>>()
                .join(","),
        ])
        .args(["--repeats", &repeats.to_string()])
        .args([
            "--q-heads",
            &Q_HEADS.to_string(),
            "--kv-heads",
            &KV_HEADS.to_string(),
            "--head-dim",
            &HEAD_DIM.to_string(),
        ])
        .output()
        .context("running the SDPA script")?;
    if !out.status.success() {
        bail!("{script}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// What the worker's fused path runs for a projection.
#[derive(Clone, Copy)]
enum Fused {
    /// `gemv_add`: o and down, with the residual add.
    Add,
    /// `gemv_norm`: q/k/v after the input norm (the worker's also rotates and caches a few KB),
    /// and the output head after the final norm.
    Norm,
    /// `gemv_norm_gated`: `[gate; up]`, through SiLU-and-mul.
    Gated,
}

/// (model, projection, n outputs, k inputs, fused kernel) at the presets' shapes.
const PROJECTIONS: [(&str, &str, usize, usize, Fused); 10] = [
    ("1B", "qkv", 3072, 2048, Fused::Norm),
    ("1B", "o", 2048, 2048, Fused::Add),
    ("1B", "gate_up", 16384, 2048, Fused::Gated),
    ("1B", "down", 2048, 8192, Fused::Add),
    ("1B", "lm_head", 128256, 2048, Fused::Norm),
    ("8B", "qkv", 6144, 4096, Fused::Norm),
    ("8B", "o", 4096, 4096, Fused::Add),
    ("8B", "gate_up", 28672, 4096, Fused::Gated),
    ("8B", "down", 4096, 14336, Fused::Add),
    ("8B", "lm_head", 128256, 4096, Fused::Norm),
];

/// One projection at `rows` rows: the fused GEMV the worker runs there against cuBLAS's plain
/// GEMM.
fn projection(
    k: &Kernels,
    blas: &CudaBlas,
    rng: &mut TestRng,
    (n, width, fused): (usize, usize, Fused),
    rows: usize,
    repeats: usize,
) -> Result<(f64, f64)> {
    // Enough copies of the weight to exceed a Hopper L2 (50 MB) several times.
    let copies = (256usize << 20).div_ceil(n * width * 2).max(2);
    let weights = (0..copies)
        .map(|_| random(k, rng, n * width))
        .collect::<Result<Vec<_>>>()?;
    let x = random(k, rng, rows * width)?;
    let norm = random(k, rng, width)?;
    let out_width = if matches!(fused, Fused::Gated) {
        n / 2
    } else {
        n
    };
    let mut out = k.stream().alloc_zeros::<bf16>(rows * out_width)?;
    let mut residual = random(k, rng, rows * n)?;
    let gemv = time_ms(k, repeats, |i| {
        let w = &weights[i % copies];
        match fused {
            Fused::Add => k.gemv_add(&mut residual, &x, w, width)?,
            Fused::Norm => k.gemv_norm(&mut out, &x, &norm, 1e-5, w, width, GemvThen::Store)?,
            Fused::Gated => k.gemv_norm(&mut out, &x, &norm, 1e-5, w, width, GemvThen::SiluMul)?,
        }
        Ok(())
    })?;
    let mut gemm_out = k.stream().alloc_zeros::<bf16>(rows * n)?;
    let cublas = time_ms(k, repeats, |i| {
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: rows as i32,
            k: width as i32,
            alpha: bf16::ONE,
            lda: width as i32,
            ldb: width as i32,
            beta: bf16::ZERO,
            ldc: n as i32,
        };
        // SAFETY: the buffers hold n·width, rows·width and rows·n elements as the config says.
        unsafe { blas.gemm(cfg, &weights[i % copies], &x, &mut gemm_out) }?;
        Ok(())
    })?;
    Ok((gemv, cublas))
}

/// Llama-3's vocabulary.
const VOCAB: usize = 128_256;

/// A table row: the sampling kernels over `rows` rows of logits, and their copy to the host.
fn sampling(k: &Kernels, rng: &mut TestRng, rows: usize, repeats: usize) -> Result<String> {
    // Logits spread like a language model's: roughly normal with a deviation of 3 (a sum of
    // 12 uniforms, centred), a few hundred within 4 of the best.
    let host: Vec<bf16> = (0..rows * VOCAB)
        .map(|_| bf16::from_f32(((0..12).map(|_| rng.uniform()).sum::<f32>() - 6.0) * 3.0))
        .collect();
    let logits = k.stream().clone_htod(&host)?;
    let mut ids = k.stream().alloc_zeros::<i32>(rows)?;
    let argmax = time_ms(k, repeats, |_| Ok(k.argmax(&logits, VOCAB, &mut ids)?))?;
    let t = k.stream().clone_htod(&vec![1.0f32; rows])?;
    let u = k.stream().clone_htod(&vec![0.5f64; rows])?;
    let draw = time_ms(k, repeats, |_| {
        Ok(k.softmax_draw(&logits, VOCAB, &t, &u, &mut ids)?)
    })?;
    let mut mass = k.stream().alloc_zeros::<f32>(rows)?;
    let softmax_mass = time_ms(k, repeats, |_| {
        Ok(k.softmax_mass(&logits, VOCAB, &t, &mut mass)?)
    })?;
    let (mut values, mut top) = (
        k.stream().alloc_zeros::<f32>(rows * 64)?,
        k.stream().alloc_zeros::<i32>(rows * 64)?,
    );
    let top_k = time_ms(k, repeats, |_| {
        Ok(k.top_k(&logits, VOCAB, 64, &mut values, &mut top)?)
    })?;
    let mut host = vec![bf16::ZERO; rows * VOCAB];
    let to_host = time_ms(k, repeats, |_| {
        Ok(k.stream().memcpy_dtoh(&logits, &mut host)?)
    })?;
    Ok(format!(
        "| {rows} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
        argmax * 1e3,
        draw * 1e3,
        softmax_mass * 1e3,
        top_k * 1e3,
        to_host * 1e3
    ))
}

/// Prefill attention at 1k to 16k tokens, with PyTorch's SDPA when `--sdpa` names its script.
fn prefill_section(k: &Kernels, rng: &mut TestRng, args: &Args, text: &mut String) -> Result<()> {
    let lens = [1024, 2048, 4096, 8192, 16384];
    let sdpa = match &args.sdpa {
        Some(script) => Some(sdpa_times(script, &lens, args.repeats)?),
        None => None,
    };
    *text += &format!(
        "\nPrefill attention, causal, bf16, head_dim {HEAD_DIM}, {Q_HEADS}/{KV_HEADS} heads, one sequence:\n\n\
         | tokens | llmctl ms | llmctl TFLOP/s | SDPA ms | SDPA TFLOP/s | llmctl / SDPA time |\n|---:|---:|---:|---:|---:|---:|\n"
    );
    for len in lens {
        let (ms, tflops) = prefill(k, rng, len, args.repeats)?;
        let reference = sdpa.as_ref().and_then(|s| {
            let r = &s[len.to_string()];
            Some((r["ms"].as_f64()?, r["tflops"].as_f64()?))
        });
        let (sms, stf, ratio) = match reference {
            Some((ms2, tf2)) => (
                format!("{ms2:.3}"),
                format!("{tf2:.1}"),
                format!("{:.2}", ms / ms2),
            ),
            None => ("-".into(), "-".into(), "-".into()),
        };
        let row = format!("| {len} | {ms:.3} | {tflops:.1} | {sms} | {stf} | {ratio} |\n");
        eprint!("{row}");
        *text += &row;
    }
    Ok(())
}

fn main() -> Result<()> {
    let args = Args::parse();
    let k = Kernels::new(0)?;
    let mut rng = TestRng::new(42);
    let copy = copy_bandwidth(&k, args.repeats)?;
    let run = |section: &str| args.sections.iter().any(|s| s == section);
    let mut text = format!(
        "Device: {} ({}, {} SMs); copy bandwidth {copy:.0} GB/s (device-to-device, read + write)\n",
        k.device_name, k.arch, k.sm_count
    );
    if run("decode") {
        text += &format!(
            "\nDecode attention, bf16, head_dim {HEAD_DIM}, {Q_HEADS} query / {KV_HEADS} KV heads, block {BLOCK}:\n\n\
             | batch x context | partitions | µs | GB/s | of copy BW |\n|---|---:|---:|---:|---:|\n"
        );
        for (seqs, ctx) in [(1, 65536), (16, 4096), (64, 1024), (8, 1024)] {
            let row = decode(&k, &mut rng, seqs, ctx, args.repeats, copy)?;
            eprintln!("{row}");
            text += &row;
            text.push('\n');
        }
    }
    if run("prefill") {
        prefill_section(&k, &mut rng, &args, &mut text)?;
    }
    if run("gemv") {
        text += "\nFused small-batch projections (gemv.cu), bf16, against a plain cuBLAS GEMM of the \
             same shape (o and down: `gemv_add`; qkv: `gemv_norm` without the rotary and cache-write epilogue; gate_up: `gemv_norm_gated`):\n\n\
             | projection n x k | rows | GEMV µs | GB/s | of copy BW | cuBLAS µs | cuBLAS GB/s | GEMV / cuBLAS time |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|\n";
        let blas = CudaBlas::new(k.stream().clone())?;
        for (model, name, n, width, fused) in PROJECTIONS {
            for rows in [1, 4] {
                let gbs = |ms: f64| (n * width * 2) as f64 / (ms * 1e-3) / 1e9;
                // A failure here is reported in the table, not fatal to the rows above.
                let row = match projection(
                    &k,
                    &blas,
                    &mut rng,
                    (n, width, fused),
                    rows,
                    args.repeats,
                ) {
                    Ok((gemv, cublas)) => format!(
                        "| {model} {name} {n}x{width} | {rows} | {:.1} | {:.0} | {:.0}% | {:.1} | {:.0} | {:.2} |",
                        gemv * 1e3,
                        gbs(gemv),
                        100.0 * gbs(gemv) / copy,
                        cublas * 1e3,
                        gbs(cublas),
                        gemv / cublas,
                    ),
                    Err(e) => format!("| {model} {name} | {rows} | failed: {e:#} |"),
                };
                eprintln!("{row}");
                text += &row;
                text.push('\n');
            }
        }
    }
    if run("sampling") {
        text += &format!(
            "\nSampling over {VOCAB} logits (bf16) per row, where the logits are, beside copying them to the host:\n\n\
             | rows | argmax µs | softmax draw µs | softmax mass µs | top-64 µs | logits to host µs |\n|---:|---:|---:|---:|---:|---:|\n"
        );
        for rows in [1, 64] {
            let row = sampling(&k, &mut rng, rows, args.repeats)?;
            eprintln!("{row}");
            text += &row;
            text.push('\n');
        }
    }
    println!("{text}");
    if let Some(path) = args.out {
        std::fs::write(&path, &text)?;
    }
    Ok(())
}
