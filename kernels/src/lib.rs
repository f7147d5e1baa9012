//! llmctl's CUDA kernels: `.cu` sources in `kernels/cuda/`, embedded in the binary (`source`),
//! compiled by NVRTC at first use for the device's architecture and cached on disk (`compile`),
//! launched through cudarc (`cuda`), each with a CPU reference in Rust (`reference`). On a
//! machine with no GPU, `emulator` stands in for the CUDA driver and runs the same kernels on
//! the CPU, so the GPU tests also run there.
//!
//! Everything loads CUDA at run time: the crate builds, and its CPU tests run, on a machine with
//! no CUDA. The paged KV-cache layout all backends share is [`kv_layout`] (see
//! `kernels/KV_LAYOUT.md`).

pub mod compile;
pub mod cuda;
pub mod emulator;
pub mod kv_layout;
pub mod reference;
pub mod source;
