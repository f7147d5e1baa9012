//! The `llmctl` launcher: one binary, one subcommand per role. `model init` writes a random
//! model in Hugging Face format; `generate` runs prompts through the engine once; `worker` runs
//! the inference worker's OpenAI-compatible server; `gateway` the HTTP edge; `controller` the
//! pool controller; `up` (in `up.rs`) the whole plane on one machine; `autoscaler replay` the
//! autoscaler over a production trace in simulated time.

mod up;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use llmctl_inference_worker::backend::cpu::CpuBackend;
use llmctl_inference_worker::engine::{Engine, EngineConfig, SamplingParams};
use llmctl_inference_worker::model::{
    self,
    init::{InitDtype, InitOptions, Preset},
};
use llmctl_inference_worker::server::{self, WorkerArgs};
use serde_json::json;

// The gateway's hot path allocates per request; see gateway/src/bin/llmctl-gateway.rs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "llmctl",
    version,
    about = "A serverless-style serving plane for LLMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole serving plane here: controller, gateway, and workers on demand.
    Up(up::UpArgs),
    /// Model folders.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
    /// Run the inference worker: an OpenAI-compatible server for one model folder.
    Worker(WorkerArgs),
    /// Run the gateway: auth, rate limits, admission queue, dispatch and proxy.
    Gateway(llmctl_gateway::GatewayArgs),
    /// Run the pool controller: autoscaler, executors, and the control API.
    Controller(llmctl_pool_controller::ControllerArgs),
    /// Generate completions for prompts given on the command line, then exit.
    Generate(GenerateArgs),
    /// The autoscaler offline.
    Autoscaler {
        #[command(subcommand)]
        command: AutoscalerCommand,
    },
}

#[derive(Subcommand)]
enum AutoscalerCommand {
    /// Replay a production trace through a simulated pool under our autoscaler, Knative's KPA
    /// or a static pool: cost, TTFT, SLO attainment, scaling churn, and a plot.
    Replay(llmctl_pool_controller::replay::ReplayArgs),
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Write a random-weight Llama model in Hugging Face format (deterministic by seed).
    Init {
        /// Folder to write (created if needed).
        #[arg(long)]
        out: PathBuf,
        /// `tiny` for fast tests, `small` (about 30 M parameters) for CPU benchmarks,
        /// `llama-3.2-1b` and `llama-3.1-8b` (the real models' shapes, 2.5 and 16 GB in bf16)
        /// for GPU benchmarks.
        #[arg(long, default_value = "tiny")]
        preset: Preset,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Weight dtype in the safetensors file: bf16, f16 or f32.
        #[arg(long, default_value = "bf16")]
        dtype: InitDtype,
    },
}

#[derive(Args)]
struct EngineArgs {
    /// Hugging Face model folder.
    #[arg(long, env = "LLMCTL_MODEL")]
    model: PathBuf,
    /// KV cache size in MiB.
    #[arg(long, default_value_t = 512)]
    kv_cache_mib: usize,
    /// Most sequences in one batch.
    #[arg(long, default_value_t = 256)]
    max_num_seqs: usize,
    /// Most tokens in one step (prefill chunks share this budget).
    #[arg(long, default_value_t = 2048)]
    max_num_batched_tokens: usize,
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    engine: EngineArgs,
    /// A prompt; repeat for several, which run as one continuous batch.
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// Render each prompt as a user message through the chat template.
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 32)]
    max_tokens: usize,
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    #[arg(long)]
    seed: Option<u64>,
}

fn main() -> Result<()> {
    llmctl_inference_worker::init_logging();
    match Cli::parse().command {
        Command::Autoscaler {
            command: AutoscalerCommand::Replay(args),
        } => llmctl_pool_controller::replay::run(args),
        Command::Model {
            command:
                ModelCommand::Init {
                    out,
                    preset,
                    seed,
                    dtype,
                },
        } => {
            model::init::write_model(
                &out,
                &InitOptions {
                    preset,
                    seed,
                    dtype,
                },
            )?;
            println!("wrote the {} model to {}", preset.name(), out.display());
            Ok(())
        }
        Command::Up(args) => up::run(args),
        Command::Controller(args) => llmctl_pool_controller::run(args),
        Command::Worker(args) => server::run(args),
        Command::Gateway(args) => llmctl_gateway::run(args),
        Command::Generate(args) => generate(args),
    }
}

fn engine(args: &EngineArgs) -> Result<Engine<CpuBackend>> {
    let loaded = model::load(&args.model, CpuBackend::new())
        .with_context(|| format!("loading model from {}", args.model.display()))?;
    Ok(Engine::new(
        loaded,
        EngineConfig {
            kv_cache_bytes: args.kv_cache_mib << 20,
            max_num_seqs: args.max_num_seqs,
            max_num_batched_tokens: args.max_num_batched_tokens,
            ..EngineConfig::default()
        },
    ))
}

fn prompt_tokens(engine: &Engine<CpuBackend>, text: &str, chat: bool) -> Result<Vec<u32>> {
    let tokenizer = engine.tokenizer();
    if chat {
        let rendered = tokenizer.render_chat(&[json!({"role": "user", "content": text})], true)?;
        tokenizer
            .encode(&rendered, false)
            .map_err(anyhow::Error::msg)
    } else {
        tokenizer.encode(text, true).map_err(anyhow::Error::msg)
    }
}

fn generate(args: GenerateArgs) -> Result<()> {
    let mut engine = engine(&args.engine)?;
    let params = SamplingParams {
        max_tokens: args.max_tokens,
        temperature: args.temperature,
        seed: args.seed,
        ..SamplingParams::default()
    };
    for (i, prompt) in args.prompt.iter().enumerate() {
        let tokens = prompt_tokens(&engine, prompt, args.chat)?;
        engine.add_request(i as u64, tokens, params.clone())?;
    }
    let mut texts = vec![String::new(); args.prompt.len()];
    while engine.has_unfinished() {
        for out in engine.step() {
            texts[out.request as usize].push_str(&out.text);
            if let Some(reason) = out.finish {
                let line = json!({
                    "prompt": args.prompt[out.request as usize],
                    "text": texts[out.request as usize],
                    "finish_reason": reason.as_str(),
                    "prompt_tokens": out.prompt_tokens,
                    "completion_tokens": out.completion_tokens,
                });
                println!("{line}");
            }
        }
    }
    Ok(())
}
