//! `llmctl-worker`: the inference worker alone, for the slim executor image. Same options as
//! `llmctl worker`.

use clap::Parser;
use llmctl_inference_worker::server::{self, WorkerArgs};

#[derive(Parser)]
#[command(
    name = "llmctl-worker",
    version,
    about = "llmctl inference worker: an OpenAI-compatible server"
)]
struct Cli {
    #[command(flatten)]
    worker: WorkerArgs,
}

fn main() -> anyhow::Result<()> {
    llmctl_inference_worker::init_logging();
    server::run(Cli::parse().worker)
}
