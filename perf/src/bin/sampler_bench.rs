//! The host-side cost of sampling one decode step: `--rows` logits rows of a `--vocab`-wide
//! vocabulary (Llama-3's 128,256 by default) through the engine's sampler
//! (`engine::sampler::sample_rows`, which the engine calls for every step whose tokens the
//! GPU's argmax does not decide), for the parameter sets OpenAI-compatible clients send most:
//! the SDK default (temperature 1, no truncation), nucleus sampling, top-k, logprobs, and
//! greedy with a repetition penalty. Logits are normal with a standard deviation of 3, a flat
//! distribution whose nucleus is wide: the hard case for anything that sorts.
//!
//! `cargo run --release -p llmctl-perf --bin sampler_bench -- [--rows 64] [--vocab 128256]
//! [--rounds 5] [--record]`

use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use llmctl_inference_worker::engine::SamplingParams;
use llmctl_inference_worker::engine::sampler::{SampleContext, sample_rows};
use llmctl_inference_worker::rng::Rng;

#[derive(Parser)]
struct Args {
    /// Logits rows per step (the decode batch).
    #[arg(long, default_value_t = 64)]
    rows: usize,
    #[arg(long, default_value_t = 128_256)]
    vocab: usize,
    /// Timed rounds per case (the median is reported).
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Write the table to perf/results/<date>-sampler-cpu.md.
    #[arg(long)]
    record: bool,
}

fn cases() -> Vec<(&'static str, SamplingParams)> {
    let sampled = SamplingParams {
        temperature: 1.0,
        ..Default::default()
    };
    vec![
        ("temperature 1 (SDK default)", sampled.clone()),
        (
            "temperature 0.7, top_p 0.9",
            SamplingParams {
                temperature: 0.7,
                top_p: 0.9,
                ..sampled.clone()
            },
        ),
        (
            "top_k 50",
            SamplingParams {
                top_k: 50,
                ..sampled.clone()
            },
        ),
        (
            "temperature 1, logprobs 5",
            SamplingParams {
                logprobs: Some(5),
                ..sampled
            },
        ),
        (
            "greedy, repetition penalty 1.1",
            SamplingParams {
                repetition_penalty: 1.1,
                ..SamplingParams::greedy()
            },
        ),
    ]
}

fn main() -> Result<()> {
    let args = Args::parse();
    let mut rng = Rng::new(7);
    let logits: Vec<f32> = (0..args.rows * args.vocab)
        .map(|_| (rng.normal() * 3.0) as f32)
        .collect();
    // 512 prompt and 128 output tokens of context per row, for the penalties.
    let history: Vec<u32> = (0..640).map(|_| rng.below(args.vocab) as u32).collect();
    let (prompt, output) = history.split_at(512);
    let end_tokens = [0u32];

    let mut table = format!(
        "| parameters | ms per step ({} rows) | µs per row |\n|---|---:|---:|\n",
        args.rows
    );
    for (name, params) in cases() {
        let contexts: Vec<SampleContext<'_>> = (0..args.rows)
            .map(|_| SampleContext {
                params: &params,
                prompt,
                output,
                end_tokens: &end_tokens,
            })
            .collect();
        let mut rngs: Vec<Rng> = (0..args.rows as u64).map(Rng::new).collect();
        let mut times: Vec<Duration> = (0..args.rounds + 1)
            .map(|_| {
                let mut step = logits.clone();
                let started = Instant::now();
                let sampled = sample_rows(&mut step, args.vocab, &contexts, &mut rngs);
                let took = started.elapsed();
                assert_eq!(sampled.len(), args.rows);
                took
            })
            .skip(1)
            .collect();
        times.sort();
        let median = times[times.len() / 2];
        let ms = median.as_secs_f64() * 1e3;
        table += &format!(
            "| {name} | {ms:.2} | {:.1} |\n",
            ms * 1e3 / args.rows as f64
        );
        eprintln!("{name}: {ms:.2} ms");
    }
    println!("{table}");
    if args.record {
        let text = format!(
            "# Sampler benchmark (host side of a decode step), {}\n\n- machine: {}\n- command: `cargo run --release -p llmctl-perf --bin sampler_bench -- --rows {} --vocab {} --rounds {} --record`\n- logits normal(0, 3); each row has 512 prompt and 128 output tokens of history; median of {} rounds after a warm-up\n\n{table}",
            llmctl_perf::today(),
            llmctl_perf::machine(),
            args.rows,
            args.vocab,
            args.rounds,
            args.rounds
        );
        let path = llmctl_perf::record("sampler-cpu", &text)?;
        eprintln!("recorded {}", path.display());
    }
    Ok(())
}
