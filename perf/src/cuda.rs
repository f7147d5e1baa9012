//! Timing on the GPU, shared by the kernel and decode benchmarks (CUDA is loaded at run time:
//! these build everywhere and fail with a clear error where no driver is found).

use anyhow::Result;
use cudarc::driver::sys::CUevent_flags;
use half::bf16;
use llmctl_kernels::cuda::Kernels;

/// Median milliseconds of `f` over `repeats` runs (after two warm-ups), timed with events.
pub fn time_ms(k: &Kernels, repeats: usize, mut f: impl FnMut(usize) -> Result<()>) -> Result<f64> {
    for i in 0..2 {
        f(i)?;
    }
    let mut times = Vec::with_capacity(repeats);
    for i in 0..repeats {
        let start = k
            .stream()
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        f(i)?;
        let end = k
            .stream()
            .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))?;
        end.synchronize()?;
        times.push(start.elapsed_ms(&end)? as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// The device's copy bandwidth in GB/s: a 2 GiB device-to-device copy, bytes read plus
/// written, median of `repeats`.
pub fn copy_bandwidth(k: &Kernels, repeats: usize) -> Result<f64> {
    let n = 1usize << 30; // 2 GiB of bf16
    let src = k.stream().alloc_zeros::<bf16>(n)?;
    let mut dst = k.stream().alloc_zeros::<bf16>(n)?;
    let ms = time_ms(k, repeats, |_| {
        Ok(k.stream().memcpy_dtod(&src, &mut dst)?)
    })?;
    Ok(2.0 * (n * 2) as f64 / (ms * 1e-3) / 1e9)
}
