//! `llmctl-gateway`: the gateway alone, for its slim image. Same options as `llmctl gateway`.

use clap::Parser;
use llmctl_gateway::GatewayArgs;

// Every request allocates headers, bodies and JSON; mimalloc's thread-local free lists cut
// the allocator's share of the gateway's CPU time (measured in perf/results/*-gateway.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "llmctl-gateway",
    version,
    about = "llmctl gateway: auth, rate limits, queue, dispatch, proxy"
)]
struct Cli {
    #[command(flatten)]
    gateway: GatewayArgs,
}

fn main() -> anyhow::Result<()> {
    llmctl_gateway::init_logging();
    llmctl_gateway::run(Cli::parse().gateway)
}
