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
pub mod tokenizer;
