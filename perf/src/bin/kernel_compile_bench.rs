//! What a pod with a cold kernel cache compiles before it can serve, on this machine's CPU (no
//! GPU needed): the five kernel variants one model needs (its storage type and head size, as
//! the worker compiles them at start-up) side by side with every variant of every program (what
//! a start compiled when a program was one unit holding every storage type and head size).
//! Each is timed to PTX (NVRTC's front end; what the worker loads where machine code cannot be
//! built, leaving the driver's JIT to repeat ptxas at every load) and to machine code (PTX
//! plus ptxas: what the worker compiles, caches and loads as is), one unit after another as
//! the worker does.
//!
//! `cargo run --release -p llmctl-perf --bin kernel_compile_bench -- [--dtype bf16]
//! [--head-dim 128] [--record]` (needs `libnvrtc.so.13` on `LD_LIBRARY_PATH`).

use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use llmctl_kernels::compile;
use llmctl_kernels::source::{self, Variant};

#[derive(Parser)]
struct Args {
    /// Storage type of the model (an entry point suffix: f32, bf16, f16).
    #[arg(long, default_value = "bf16")]
    dtype: String,
    /// Head size of the model.
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    /// Compute capability to compile for (major, minor).
    #[arg(long, default_value = "9.0")]
    arch: String,
    /// Write the table to perf/results/<date>-kernel-compile-cpu.md.
    #[arg(long)]
    record: bool,
}

/// Seconds to PTX and seconds to machine code, summed over `variants`.
fn time(variants: &[Variant], arch: &'static str) -> Result<(f64, f64)> {
    let (mut ptx, mut machine) = (0.0, 0.0);
    for v in variants {
        let started = Instant::now();
        compile::compile(v, arch)?;
        ptx += started.elapsed().as_secs_f64();
        let started = Instant::now();
        compile::resources(v, arch)?;
        machine += started.elapsed().as_secs_f64();
    }
    Ok((ptx, machine))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let Some(&dtype) = source::DTYPES.iter().find(|&&d| d == args.dtype) else {
        bail!("--dtype {}: one of {:?}", args.dtype, source::DTYPES);
    };
    if !source::HEAD_DIMS.contains(&args.head_dim) {
        bail!(
            "--head-dim {}: one of {:?}",
            args.head_dim,
            source::HEAD_DIMS
        );
    }
    let (major, minor) = args
        .arch
        .split_once('.')
        .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)))
        .context("--arch: MAJOR.MINOR, e.g. 9.0")?;
    let arch = compile::arch_name(major, minor)?;
    let model: Vec<Variant> = source::ALL
        .iter()
        .map(|p| p.variant(dtype, Some(args.head_dim)))
        .collect();
    let every: Vec<Variant> = source::ALL.iter().flat_map(|p| p.variants()).collect();
    let (model_ptx, model_machine) = time(&model, arch)?;
    let (all_ptx, all_machine) = time(&every, arch)?;
    let table = format!(
        "| compiled at a cold start | units | to PTX, s | to machine code, s |\n\
         |---|---:|---:|---:|\n\
         | every variant (before) | {} | {all_ptx:.2} | {all_machine:.2} |\n\
         | the model's: {dtype}, head size {} | {} | {model_ptx:.2} | {model_machine:.2} |\n\
         | ratio | | {:.1}x | {:.1}x |\n",
        every.len(),
        args.head_dim,
        model.len(),
        all_ptx / model_ptx,
        all_machine / model_machine,
    );
    print!("{table}");
    if args.record {
        let text = format!(
            "# Kernel compilation at a cold start, {}\n\nMachine: {} (NVRTC {:?}, {arch}; no GPU \
             involved)\n\nCommand: `cargo run --release -p llmctl-perf --bin kernel_compile_bench \
             -- --dtype {dtype} --head-dim {} --arch {} --record`\n\nWhat a worker on a pod with a \
             cold kernel cache compiles before it serves. \"To machine code\" is PTX plus ptxas: \
             what the worker compiles, caches and loads (with PTX alone the driver's JIT would \
             repeat the ptxas part at every load). Before, a program was one unit with every \
             storage type and head size; now the worker compiles the variants its model \
             needs.\n\n{table}",
            llmctl_perf::today(),
            llmctl_perf::machine(),
            compile::nvrtc_version()?,
            args.head_dim,
            args.arch,
        );
        let path = llmctl_perf::record("kernel-compile-cpu", &text)?;
        println!("recorded in {}", path.display());
    }
    Ok(())
}
