//! `llmctl-controller`: the pool controller alone, for its slim image (no worker inside). Same
//! options as `llmctl controller`; in a cluster it runs with `--kubernetes`.

use clap::Parser;
use llmctl_pool_controller::ControllerArgs;

#[derive(Parser)]
#[command(
    name = "llmctl-controller",
    version,
    about = "llmctl pool controller: autoscaler, reconcilers, local and Kubernetes providers"
)]
struct Cli {
    #[command(flatten)]
    controller: ControllerArgs,
}

fn main() -> anyhow::Result<()> {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into log files or collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    llmctl_pool_controller::run(Cli::parse().controller)
}
