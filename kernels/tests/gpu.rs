//! The kernel tests (`suite`) on a CUDA GPU. Ignored by default (reported as ignored, never as
//! passed, where there is no GPU); run with `cargo test -p llmctl-kernels --test gpu --
//! --ignored` or `perf/gpu/run.sh`.

mod suite;

use llmctl_kernels::cuda::Kernels;

fn gpu() -> Kernels {
    Kernels::new(0).unwrap_or_else(|e| panic!("no usable CUDA device: {e}"))
}

kernel_tests!("needs a CUDA GPU", gpu());
