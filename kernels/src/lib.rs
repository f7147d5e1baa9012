//! llmctl's CUDA kernels: `.cu` sources in `kernels/cuda/`, compiled by NVRTC at first use and
//! launched through cudarc, each with a CPU reference in Rust. Built by the kernels issue.
//!
//! This crate already owns one contract the CPU engine relies on: the paged KV-cache layout,
//! described in [`kv_layout`] and in `kernels/KV_LAYOUT.md`. The CPU backend in
//! `llmctl-inference-worker` and the CUDA kernels use this one layout.

pub mod kv_layout;
