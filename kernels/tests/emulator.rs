//! The CPU emulator of the CUDA driver catches what it claims to: kernels that are wrong on
//! purpose (`kernels/emulator/selftest.cu`) give wrong results, fail their launch or fault, and
//! their correct twins pass. Without these, a pass of the kernel tests on the emulator
//! (`emulated.rs`) would say less than it seems. A captured stream records and its CUDA graph
//! replays, as the worker's decode graphs need. Needs NVRTC 13 and a C++ compiler; ignored by
//! default, run by `.ci/run` with `cargo test -p llmctl-kernels --test emulator -- --ignored`.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use cudarc::driver::{
    CudaContext, CudaModule, CudaSlice, CudaStream, DriverError, LaunchConfig, PushKernelArg,
};
use llmctl_kernels::reference::TestRng;
use llmctl_kernels::{compile, emulator, source};

const FAULT_CHILD: &str = "LLMCTL_EMULATOR_FAULT_CHILD";

struct Device {
    stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
}

fn device() -> Device {
    emulator::install(Path::new(env!("CARGO_TARGET_TMPDIR"))).unwrap_or_else(|e| panic!("{e}"));
    let ctx = CudaContext::new(0).expect("the emulated device");
    assert!(ctx.name().unwrap().contains("emulator"));
    let ptx = compile::ptx(
        &source::EMULATOR_SELFTEST.variant("", None),
        compile::arch_name(9, 0).unwrap(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    Device {
        stream: ctx.default_stream(),
        module: ctx.load_module(ptx).expect("loading the self-test module"),
    }
}

impl Device {
    /// Launches `kernel` as one block of 64 threads with `out` and, if given, `input`.
    fn run(
        &self,
        kernel: &str,
        out: &mut CudaSlice<f32>,
        input: Option<&CudaSlice<f32>>,
    ) -> Result<(), DriverError> {
        self.run_blocks(kernel, 1, out, input)
    }

    /// [`Self::run`] as `blocks` blocks.
    fn run_blocks(
        &self,
        kernel: &str,
        blocks: u32,
        out: &mut CudaSlice<f32>,
        input: Option<&CudaSlice<f32>>,
    ) -> Result<(), DriverError> {
        self.launch(&self.stream, kernel, blocks, out, input)?;
        self.stream.synchronize()
    }

    /// [`Self::run_blocks`] on `stream`, without waiting for it.
    fn launch(
        &self,
        stream: &Arc<CudaStream>,
        kernel: &str,
        blocks: u32,
        out: &mut CudaSlice<f32>,
        input: Option<&CudaSlice<f32>>,
    ) -> Result<(), DriverError> {
        let f = self.module.load_function(kernel)?;
        let mut launch = stream.launch_builder(&f);
        launch.arg(out);
        if let Some(input) = input {
            launch.arg(input);
        }
        let cfg = LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (64, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: every self-test kernel takes (float* out[, const float* in]), each at least 64
        // elements (selftest_mma: 384, selftest_ldmatrix: 256 in, 512 out,
        // selftest_async_copy_*: 128; the multi-block ones 64 a block out), as allocated by the
        // callers.
        unsafe { launch.launch(cfg) }?;
        Ok(())
    }
}

#[test]
#[ignore = "needs libnvrtc.so.13 on LD_LIBRARY_PATH and a C++ compiler; .ci/run runs it"]
fn a_missing_barrier_gives_wrong_results_and_the_barrier_fixes_them() {
    let d = device();
    let mut rng = TestRng::new(11);
    let input = rng.vec(64);
    let d_in = d.stream.clone_htod(&input).unwrap();
    let reversed: Vec<f32> = input.iter().rev().copied().collect();
    // Twice each: the second launch of the racy kernel must not find the first one's values.
    for kernel in ["selftest_reverse", "selftest_reverse_racy"].repeat(2) {
        let mut out = d.stream.alloc_zeros::<f32>(64).unwrap();
        d.run(kernel, &mut out, Some(&d_in)).unwrap();
        let got = d.stream.clone_dtoh(&out).unwrap();
        if kernel == "selftest_reverse" {
            assert_eq!(got, reversed, "{kernel}");
        } else {
            // Threads 0..32 read slots their writers (32..64) have not written yet: shared
            // memory as the block found it, all-ones bytes.
            assert!(
                got[..32].iter().all(|g| g.is_nan()),
                "{kernel}: the race went unseen: {got:?}"
            );
            assert_eq!(got[32..], reversed[32..], "{kernel}");
        }
    }
}

#[test]
#[ignore = "needs libnvrtc.so.13 on LD_LIBRARY_PATH and a C++ compiler; .ci/run runs it"]
fn a_thread_reading_its_lower_neighbour_without_a_barrier_is_caught() {
    let d = device();
    let input = TestRng::new(12).vec(64);
    let d_in = d.stream.clone_htod(&input).unwrap();
    let mut out = d.stream.alloc_zeros::<f32>(128).unwrap();
    d.run_blocks("selftest_shift_racy", 2, &mut out, Some(&d_in))
        .unwrap();
    let got = d.stream.clone_dtoh(&out).unwrap();
    // In ascending order every thread finds its neighbour's write; in descending order (every
    // other block) none does, and reads the poison.
    let nan: Vec<usize> = got
        .chunks(64)
        .map(|block| block.iter().filter(|v| v.is_nan()).count())
        .collect();
    assert!(nan.contains(&0) && nan.contains(&63), "{nan:?}");
    for block in got.chunks(64) {
        for (t, v) in block.iter().enumerate() {
            assert!(
                v.is_nan() || *v == input[t.saturating_sub(1)],
                "thread {t}: {v}"
            );
        }
    }
}

#[test]
#[ignore = "needs libnvrtc.so.13 on LD_LIBRARY_PATH and a C++ compiler; .ci/run runs it"]
fn blocks_run_out_of_order() {
    let d = device();
    let input = TestRng::new(14).vec(64);
    let d_in = d.stream.clone_htod(&input).unwrap();
    let mut out = d.stream.alloc_zeros::<f32>(4 * 64).unwrap();
    d.run_blocks("selftest_blocks_in_order", 4, &mut out, Some(&d_in))
        .unwrap();
    let got = d.stream.clone_dtoh(&out).unwrap();
    // Run in order, block b would hold (b + 1) in[t].
    let in_order: Vec<f32> = (0..4)
        .flat_map(|b| {
            let mut sum = vec![0f32; 64];
            for _ in 0..=b {
                sum.iter_mut().zip(&input).for_each(|(s, x)| *s += x);
            }
            sum
        })
        .collect();
    assert_ne!(got, in_order, "the blocks ran in order");
}

#[test]
#[ignore = "needs libnvrtc.so.13 on LD_LIBRARY_PATH and a C++ compiler; .ci/run runs it"]
fn warp_shuffles_exchange_within_each_warp() {
    let d = device();
    let input = TestRng::new(12).vec(64);
    let mut out = d.stream.alloc_zeros::<f32>(64).unwrap();
    d.run(
        "selftest_warp_sum",
        &mut out,
        Some(&d.stream.clone_htod(&input).unwrap()),
    )
    .unwrap();
    let got = d.stream.clone_dtoh(&out).unwrap();
    for w in 0..2 {
        let want: f64 = input[w * 32..(w + 1) * 32].iter().map(|&v| v as f64).sum();
        assert!(
            (got[w] as f64 - want).abs() < 1e-5,
            "warp {w}: {} vs {want}",
            got[w]
        );
    }
}

/// The tensor-core twin multiplies by the fragment layout `mma_16x8x16` documents (the PTX
/// ISA's m16n8k16 layout): a layout misread here would pass every emulated attention test and
/// fail on a GPU.
#[test]
#[ignore = "needs libnvrtc.so.13 on LD_LIBRARY_PATH and a C++ compiler; .ci/run runs it"]
fn a_tensor_core_product_follows_the_fragment_layout() {
    let d = device();
    let bf16 = |v: f32| half::bf16::from_f32(v).to_f32() as f64;
    let input = TestRng::new(13).vec(384);
    let mut out = d.stream.alloc_zeros::<f32>(384).unwrap();
    d.run(
        "selftest_mma",
        &mut out,
        Some(&d.stream.clone_htod(&input).unwrap()),
    )
    .unwrap();
    let got = d.stream.clone_dtoh(&out).unwrap();
    for i in 0..16 {
        for j in 0..8 {
            let want: f64 = (0..16)
                .map(|k| bf16(input[i * 16 + k]) * bf16(input[256 + k * 8 + j]))
                .sum();
            let g = got[i * 8 + j] as f64;
            assert!(
                (g - want).abs() < 1e-5 * (1.0 + want.abs()),
                "C[{i}][{j}]: {g} vs {want}"
            );
        }
    }
}

/// The ldmatrix twin hands out rows as `ldmatrix_x4` documents (the PTX ISA's m8n8 layout):
/// lane L gets row L / 4, columns 2 (L % 4) and 2 (L % 4) + 1 of each matrix, transposed
/// the rows 2 (L % 4) and 2 (L % 4) + 1 of column L / 4.
#[test]
#[ignore = "needs libnvrtc.so.13 on LD_LIBRARY_PATH and a C++ compiler; .ci/run runs it"]
fn ldmatrix_hands_out_rows_by_the_fragment_layout() {
    let d = device();
    let input: Vec<f32> = TestRng::new(14)
        .vec(256)
        .into_iter()
        .map(|v| half::bf16::from_f32(v).to_f32())
        .collect();
    let mut out = d.stream.alloc_zeros::<f32>(512).unwrap();
    d.run(
        "selftest_ldmatrix",
        &mut out,
        Some(&d.stream.clone_htod(&input).unwrap()),
    )
    .unwrap();
    let got = d.stream.clone_dtoh(&out).unwrap();
    // Element (row, col) of matrix m: quadrant (m % 2, m / 2) of the 16x16 input.
    let at = |m: usize, row: usize, col: usize| input[((m % 2) * 8 + row) * 16 + (m / 2) * 8 + col];
    for lane in 0..32 {
        let (g, t) = (lane / 4, lane % 4);
        for m in 0..4 {
            for h in 0..2 {
                let i = lane * 8 + 2 * m + h;
                assert_eq!(got[i], at(m, g, 2 * t + h), "plain: lane {lane} matrix {m}");
                assert_eq!(
                    got[256 + i],
                    at(m, 2 * t + h, g),
                    "trans: lane {lane} matrix {m}"
                );
            }
        }
    }
}

/// An asynchronous copy lands when a wait covers its group and not before: until then its
/// destination reads as NaN, so a kernel that reads a cp.async tile before waiting for it (or
/// overwrites one still being read) fails the emulated tests as it would fail on a GPU, where
/// the copy may land at any moment up to the wait.
#[test]
#[ignore = "needs libnvrtc.so.13 on LD_LIBRARY_PATH and a C++ compiler; .ci/run runs it"]
fn an_async_copy_lands_only_when_its_group_is_waited_for() {
    let d = device();
    let input = TestRng::new(15).vec(128);
    let d_in = d.stream.clone_htod(&input).unwrap();
    // What each kernel reads back: the landed copies (the last 4 floats zero-filled), NaN for
    // copies still in flight.
    let mut want = input.clone();
    want[124..].fill(0.0);
    for (kernel, landed) in [
        ("selftest_async_copy_all", 128),
        ("selftest_async_copy_first", 64),
        ("selftest_async_copy_unwaited", 0),
    ] {
        let mut out = d.stream.alloc_zeros::<f32>(128).unwrap();
        d.run(kernel, &mut out, Some(&d_in)).unwrap();
        let got = d.stream.clone_dtoh(&out).unwrap();
        assert_eq!(got[..landed], want[..landed], "{kernel}: landed copies");
        assert!(
            got[landed..].iter().all(|v| v.is_nan()),
            "{kernel}: a copy in flight was readable: {:?}",
            &got[landed..]
        );
    }
}

#[test]
#[ignore = "needs libnvrtc.so.13 on LD_LIBRARY_PATH and a C++ compiler; .ci/run runs it"]
fn a_divergent_barrier_fails_the_launch() {
    let d = device();
    let mut out = d.stream.alloc_zeros::<f32>(64).unwrap();
    let err = d
        .run("selftest_divergent_barrier", &mut out, None)
        .expect_err("a barrier half the block never reaches must fail");
    assert!(format!("{err:?}").contains("LAUNCH_FAILED"), "{err:?}");
    // The failure is the launch's alone: the device goes on working.
    let input = TestRng::new(13).vec(64);
    d.run(
        "selftest_reverse",
        &mut out,
        Some(&d.stream.clone_htod(&input).unwrap()),
    )
    .unwrap();
}

#[test]
#[ignore = "needs libnvrtc.so.13 on LD_LIBRARY_PATH and a C++ compiler; .ci/run runs it"]
fn unwritten_device_memory_reads_as_nan() {
    let d = device();
    // SAFETY: read back before anything writes it, which is the point: it must be NaN.
    let fresh = unsafe { d.stream.alloc::<f32>(1000) }.unwrap();
    let host = d.stream.clone_dtoh(&fresh).unwrap();
    assert!(host.iter().all(|v| v.is_nan()), "{:?}", &host[..8]);
}

/// Runs `body` in a child process (this test binary, re-run for `test` alone), which is meant to
/// die of what `body` does; returns the signal that ended it and its stderr. In the child,
/// `body` runs and the process exits 0 if it survives.
fn in_a_child(test: &str, body: impl FnOnce()) -> (Option<i32>, String) {
    if std::env::var_os(FAULT_CHILD).is_some() {
        body();
        eprintln!("survived");
        std::process::exit(0);
    }
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            test,
            "--nocapture",
            "--test-threads=1",
        ])
        .env(FAULT_CHILD, "1")
        .output()
        .unwrap();
    use std::os::unix::process::ExitStatusExt;
    (
        out.status.signal(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Launches `kernel(out, in, offset)` (a self-test wide load) as one block of 64 threads: its
/// first 16 threads copy in[offset..offset + 64] to out[0..64] in 16-byte loads.
fn wide_load(d: &Device, kernel: &str, offset: i32) -> Result<Vec<f32>, DriverError> {
    let input: Vec<f32> = (0..128).map(|i| i as f32).collect();
    let input = d.stream.clone_htod(&input).unwrap();
    let mut out = d.stream.alloc_zeros::<f32>(64).unwrap();
    let f = d.module.load_function(kernel)?;
    let mut launch = d.stream.launch_builder(&f);
    launch.arg(&mut out).arg(&input).arg(&offset);
    let cfg = LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (64, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: reads in[offset..offset + 64] of 128 elements (offset ≤ 64), writes out[0..64];
    // only the alignment an offset gives may be wrong, and the tests that pass such an offset
    // run it in a child process that exists to die of it.
    unsafe { launch.launch(cfg) }?;
    d.stream.synchronize()?;
    d.stream.clone_dtoh(&out)
}

#[test]
#[ignore = "needs libnvrtc.so.13 on LD_LIBRARY_PATH and a C++ compiler; .ci/run runs it"]
fn a_write_past_the_end_of_a_buffer_faults_and_names_the_kernel() {
    let (signal, stderr) = in_a_child(
        "a_write_past_the_end_of_a_buffer_faults_and_names_the_kernel",
        || {
            let d = device();
            let mut out = d.stream.alloc_zeros::<f32>(64).unwrap();
            let f = d.module.load_function("selftest_write_past_end").unwrap();
            let n = 64i32;
            let mut launch = d.stream.launch_builder(&f);
            launch.arg(&mut out).arg(&n);
            let cfg = LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (64, 1, 1),
                shared_mem_bytes: 0,
            };
            // SAFETY: not safe on purpose: the kernel writes out[64] of a 64-element buffer,
            // and this child process exists to be killed by it.
            let _ = unsafe { launch.launch(cfg) };
            let _ = d.stream.synchronize();
        },
    );
    assert_eq!(signal, Some(11), "{stderr}");
    assert!(
        stderr.contains("invalid memory access") && stderr.contains("selftest_write_past_end"),
        "{stderr}"
    );
}

#[test]
#[ignore = "needs libnvrtc.so.13 on LD_LIBRARY_PATH and a C++ compiler; .ci/run runs it"]
fn sixteen_byte_loads_read_aligned_addresses() {
    let d = device();
    for kernel in ["selftest_load16", "selftest_typed_load16"] {
        for offset in [0, 4, 12] {
            let out = wide_load(&d, kernel, offset).unwrap();
            let want: Vec<f32> = (offset..offset + 64).map(|i| i as f32).collect();
            assert_eq!(out[..64], want[..], "{kernel} at {offset}");
        }
    }
}

#[test]
#[ignore = "needs libnvrtc.so.13 on LD_LIBRARY_PATH and a C++ compiler; .ci/run runs it"]
fn a_misaligned_sixteen_byte_load_ends_the_process_and_names_the_kernel() {
    let (signal, stderr) = in_a_child(
        "a_misaligned_sixteen_byte_load_ends_the_process_and_names_the_kernel",
        || {
            let _ = wide_load(&device(), "selftest_load16", 2);
        },
    );
    assert_eq!(signal, Some(4), "{stderr}");
    assert!(
        stderr.contains("16-byte load of 16 bytes")
            && stderr.contains("misaligned address")
            && stderr.contains("selftest_load16"),
        "{stderr}"
    );
}

#[test]
#[ignore = "needs libnvrtc.so.13 on LD_LIBRARY_PATH and a C++ compiler; .ci/run runs it"]
fn a_typed_access_through_a_misaligned_pointer_ends_the_process() {
    let (signal, stderr) = in_a_child(
        "a_typed_access_through_a_misaligned_pointer_ends_the_process",
        || {
            let _ = wide_load(&device(), "selftest_typed_load16", 1);
        },
    );
    assert_eq!(signal, Some(4), "{stderr}");
    assert!(
        stderr.contains("misaligned address") && stderr.contains("selftest_typed_load16"),
        "{stderr}"
    );
}

#[test]
#[ignore = "needs libnvrtc.so.13 on LD_LIBRARY_PATH and a C++ compiler; .ci/run runs it"]
fn a_captured_stream_records_and_its_graph_replays_on_current_memory() {
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUresult, CUstreamCaptureMode};
    let d = device();
    let stream = d.stream.context().new_stream().unwrap();
    let mode = CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED;
    let mut rng = TestRng::new(5);
    let first = rng.vec(64);
    let mut input = stream.clone_htod(&first).unwrap();
    let mut out = stream.alloc_zeros::<f32>(64).unwrap();
    let mut staged = stream.alloc_zeros::<f32>(64).unwrap();
    stream.begin_capture(mode).unwrap();
    stream.memcpy_dtod(&input, &mut staged).unwrap();
    d.launch(&stream, "selftest_reverse", 1, &mut out, Some(&staged))
        .unwrap();
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("a graph");
    // Recording ran nothing.
    assert_eq!(stream.clone_dtoh(&out).unwrap(), vec![0.0; 64]);
    for values in [first, rng.vec(64)] {
        stream.memcpy_htod(&values, &mut input).unwrap();
        graph.launch().unwrap();
        let want: Vec<f32> = values.iter().rev().copied().collect();
        assert_eq!(stream.clone_dtoh(&out).unwrap(), want);
    }
    // As on a GPU: the legacy stream cannot capture, and a synchronisation inside a capture
    // invalidates it.
    assert!(matches!(
        d.stream.begin_capture(mode),
        Err(DriverError(CUresult::CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED))
    ));
    stream.begin_capture(mode).unwrap();
    assert!(stream.synchronize().is_err());
    assert!(matches!(
        stream.end_capture(CUgraphInstantiate_flags(0)),
        Err(DriverError(CUresult::CUDA_ERROR_STREAM_CAPTURE_INVALIDATED))
    ));
}

#[test]
#[ignore = "needs libnvrtc.so.13 on LD_LIBRARY_PATH and a C++ compiler; .ci/run runs it"]
fn a_graph_whose_allocation_is_still_live_cannot_launch_again() {
    // Seen on an H200 (perf/results/2026-12-04-gpu-h200.md): with memory pools, cudarc allocates
    // stream-ordered, and an allocation on a capturing stream becomes the graph's allocation node.
    use cudarc::driver::sys::{CUgraphInstantiate_flags, CUresult, CUstreamCaptureMode};
    let d = device();
    let stream = d.stream.context().new_stream().unwrap();
    stream
        .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .unwrap();
    let inside = stream.alloc_zeros::<f32>(64).unwrap();
    let graph = stream
        .end_capture(CUgraphInstantiate_flags(0))
        .unwrap()
        .expect("a graph");
    graph.launch().unwrap();
    assert_eq!(stream.clone_dtoh(&inside).unwrap(), vec![0.0; 64]);
    assert!(matches!(
        graph.launch(),
        Err(DriverError(CUresult::CUDA_ERROR_INVALID_VALUE))
    ));
    // Freed outside the graph, its memory waits for the graph's next launch.
    drop(inside);
    stream.synchronize().unwrap();
    graph.launch().unwrap();
}
