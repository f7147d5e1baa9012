//! The CUDA backend against the CPU backend and transformers (`backend_parity`) on a CUDA GPU.
//! Ignored by default (reported as ignored where there is no GPU); run with
//! `cargo test -p llmctl-inference-worker --test cuda -- --ignored` or by `perf/gpu/run.sh`.

mod backend_parity;

fn gpu() {
    // SAFETY: only tries to dlopen the driver library by its known names.
    assert!(
        unsafe { cudarc::driver::sys::is_culib_present() },
        "no CUDA driver (libcuda.so) on this machine"
    );
}

parity_tests!("needs a CUDA GPU", gpu());
