//! The llmctl gateway: the HTTP edge in front of the executor pools.
//!
//! In the order a request meets them: `server` (accept, TLS, limits, routing, drain),
//! `auth` (bearer keys to tenants), `inspect` (parse and check the body, estimate tokens),
//! `limit` (per-tenant request and token rate limits), `queue` (a fair, bounded admission queue
//! per pool), `dispatch` (least-outstanding executor choice with prefix affinity and ejection)
//! and `proxy` (relaying the executor's response, read by `upstream`, the HTTP/1.1 client to
//! executors). `config` is the TOML file; `metrics` the Prometheus registry; `error` the one
//! mapping to OpenAI error bodies; `controller` follows the pool controller (live endpoint sets
//! in, demand reports out); the decode tokens those reports expect come from
//! `llmctl_protocol::demand`. No GPU code here.

pub mod auth;
pub mod body;
pub mod config;
pub mod controller;
pub mod dispatch;
pub mod error;
pub mod external;
pub mod inspect;
pub mod limit;
pub mod metrics;
pub mod proxy;
pub mod queue;
pub mod server;
pub mod upstream;

use std::path::PathBuf;

/// `llmctl gateway` / `llmctl-gateway` options.
#[derive(Clone, Debug, clap::Args)]
pub struct GatewayArgs {
    /// The gateway's TOML configuration (see docs/gateway.md).
    #[arg(long, env = "LLMCTL_GATEWAY_CONFIG")]
    pub config: PathBuf,
}

/// Runs the gateway until SIGTERM/SIGINT, then drains.
pub fn run(args: GatewayArgs) -> anyhow::Result<()> {
    let config = config::Config::load(&args.config)?;
    let threads: usize = std::env::var("TOKIO_WORKER_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let runtime = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    };
    runtime.block_on(server::serve(config))
}

/// Logs to stderr (stdout carries the `listening` line), filtered by `RUST_LOG`.
pub fn init_logging() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into log files or collectors.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
