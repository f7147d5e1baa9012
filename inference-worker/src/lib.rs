//! The llmctl inference worker: what runs inside every executor.
//!
//! In the order a request meets them: `tokenizer` (text to tokens and back, chat templates),
//! `engine` (scheduler with continuous batching, paged KV block manager, sampler), `model`
//! (Hugging Face folders, the Llama-family forward pass) and `backend` (the ops that forward
//! pass runs on: `cpu` now, `cuda` later). The OpenAI server arrives with the worker issue.

pub mod backend;
pub mod engine;
pub mod model;
pub mod rng;
pub mod server;
pub mod tokenizer;

/// Logs to stderr (stdout carries the machine-readable `listening` line), filtered by
/// `RUST_LOG` (default `info`).
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
