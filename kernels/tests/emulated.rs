//! The kernel tests (`suite`) on the CPU emulator of the CUDA driver (`llmctl_kernels::emulator`):
//! the same kernels, references and tolerances as on a GPU, with no GPU. They check what the
//! kernels compute, never their speed, and a pass here is not a GPU pass. Needs NVRTC 13
//! (`libnvrtc.so.13` on LD_LIBRARY_PATH: the module NVRTC builds, machine code as on a GPU,
//! must define each kernel) and a C++ compiler;
//! ignored by default, run by `.ci/run` with
//! `cargo test -p llmctl-kernels --test emulated -- --ignored`.

mod suite;

use std::path::Path;

use llmctl_kernels::compile::Format;
use llmctl_kernels::cuda::Kernels;
use llmctl_kernels::emulator;

fn emulated() -> Kernels {
    emulator::install(Path::new(env!("CARGO_TARGET_TMPDIR"))).unwrap_or_else(|e| panic!("{e}"));
    let k = Kernels::new(0).unwrap_or_else(|e| panic!("the emulated device: {e}"));
    assert!(
        k.device_name.contains("emulator"),
        "{} is not the emulator: the real driver was loaded first",
        k.device_name
    );
    k
}

kernel_tests!(
    "needs libnvrtc.so.13 on LD_LIBRARY_PATH and a C++ compiler; .ci/run runs it",
    emulated()
);

/// The kernels load as machine code (CUBIN) for the device's architecture, as on a GPU, and as
/// PTX when asked; both define every kernel a model needs.
#[test]
#[ignore = "needs libnvrtc.so.13 on LD_LIBRARY_PATH and a C++ compiler; .ci/run runs it"]
fn kernels_load_as_machine_code_and_as_ptx() {
    let k = emulated();
    k.prepare("bf16", 128).unwrap();
    assert_eq!(k.ptx_fallback(), None, "a variant fell back to PTX");
    let k = emulated().with_format(Format::Ptx);
    k.prepare("bf16", 128).unwrap();
    assert!(
        k.ptx_fallback()
            .is_some_and(|why| why.contains("PTX asked for")),
        "{:?}",
        k.ptx_fallback()
    );
}
