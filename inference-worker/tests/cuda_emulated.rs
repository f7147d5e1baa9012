//! The CUDA backend against the CPU backend and transformers (`backend_parity`) on the CPU
//! emulator of the CUDA driver and cuBLAS (`llmctl_kernels::emulator`): the backend's buffers,
//! strides, kernel launches and GEMM layouts checked with no GPU. A pass here is not a GPU pass
//! (nothing about speed, nor about the real cuBLAS). Needs NVRTC 13 and a C++ compiler; ignored
//! by default, run by `.ci/run` with
//! `cargo test -p llmctl-inference-worker --test cuda_emulated -- --ignored`.

mod backend_parity;

fn emulated() {
    llmctl_kernels::emulator::install(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")))
        .unwrap_or_else(|e| panic!("{e}"));
}

parity_tests!(
    "needs libnvrtc.so.13 on LD_LIBRARY_PATH and a C++ compiler; .ci/run runs it",
    emulated()
);
