//! NVRTC compilation with an on-disk cache. A program variant is compiled for one GPU
//! architecture at first use, to machine code (CUBIN) for the device's architecture, which the
//! driver loads as is, or to PTX, which the driver must compile again when it loads it (about
//! as long as NVRTC took; the fallback where a CUBIN cannot be built or loaded). The result is
//! kept under the cache directory, keyed by a hash of the source, the architecture, the format
//! and the NVRTC version, so a changed kernel, another GPU or another NVRTC never picks up a
//! stale file.
//!
//! The NVRTC library is loaded at run time (cudarc's dynamic loading): the crate builds and its
//! CPU tests run with no CUDA at all. It must be `libnvrtc.so.13` (CUDA 13.0) on the loader path,
//! e.g. the `nvidia-cuda-nvrtc` wheel's `nvidia/cu13/lib` on `LD_LIBRARY_PATH`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use cudarc::nvrtc::{Ptx, result, sys};
use sha2::{Digest, Sha256};

use crate::source::Variant;

#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    #[error(
        "the NVRTC library (libnvrtc.so.13, CUDA 13.0) cannot be loaded; put its folder on LD_LIBRARY_PATH (the `nvidia-cuda-nvrtc` wheel has it under nvidia/cu13/lib)"
    )]
    NoNvrtc,
    #[error("unsupported GPU architecture sm_{0}{1}: llmctl's kernels need sm_80 or newer")]
    Arch(i32, i32),
    #[error("compiling {unit} for {arch}: {log}")]
    Compile {
        unit: String,
        arch: &'static str,
        log: String,
    },
    #[error("kernel cache {path}: {source}")]
    Cache {
        path: String,
        source: std::io::Error,
    },
}

/// Whether NVRTC can be loaded here.
pub fn nvrtc_available() -> bool {
    // SAFETY: only tries to dlopen the library by its known names.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}

/// NVRTC's (major, minor) version.
pub fn nvrtc_version() -> Result<(i32, i32), CompileError> {
    if !nvrtc_available() {
        return Err(CompileError::NoNvrtc);
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: the library is present (checked above); both pointers are valid for writes.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if status != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CompileError::NoNvrtc);
    }
    Ok((major, minor))
}

/// The `-arch` name for a compute capability. Newer GPUs than the table compile for the newest
/// architecture listed, whose PTX the driver can JIT forward.
pub fn arch_name(major: i32, minor: i32) -> Result<&'static str, CompileError> {
    Ok(match (major, minor) {
        (8, 0) => "compute_80",
        (8, 6) => "compute_86",
        (8, 7) => "compute_87",
        (8, 9) => "compute_89",
        (8, _) => "compute_80",
        (9, _) => "compute_90",
        (10, _) => "compute_100",
        (m, _) if m > 10 => "compute_120",
        _ => return Err(CompileError::Arch(major, minor)),
    })
}

/// Where compiled kernels are kept: `$LLMCTL_KERNEL_CACHE`, else `$XDG_CACHE_HOME/llmctl/kernels`,
/// else `~/.cache/llmctl/kernels`, else a folder under the system temp dir.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("LLMCTL_KERNEL_CACHE") {
        return dir.into();
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Path::new(&dir).join("llmctl/kernels");
    }
    if let Some(home) = std::env::var_os("HOME") {
        return Path::new(&home).join(".cache/llmctl/kernels");
    }
    std::env::temp_dir().join("llmctl-kernels")
}

/// What a compiled unit is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Machine code for one architecture (`sm_XY`), loaded without compiling.
    Cubin,
    /// PTX for a virtual architecture (`compute_XY`), compiled by the driver at load.
    Ptx,
}

impl Format {
    fn extension(self) -> &'static str {
        match self {
            Format::Cubin => "cubin",
            Format::Ptx => "ptx",
        }
    }
}

/// The cache file for `variant` on `arch` (a `compute_XY` name) in `format` under NVRTC
/// `version`.
pub fn cache_path(
    dir: &Path,
    variant: &Variant,
    arch: &str,
    format: Format,
    version: (i32, i32),
) -> PathBuf {
    let mut h = Sha256::new();
    h.update(variant.source().as_bytes());
    h.update(arch.as_bytes());
    h.update(format.extension().as_bytes());
    h.update(format!("nvrtc {}.{}", version.0, version.1).as_bytes());
    let key = hex::encode(&h.finalize()[..8]);
    dir.join(format!(
        "{}-{arch}-{key}.{}",
        variant.label(),
        format.extension()
    ))
}

/// The cached bytes of `variant` on `arch` in `format`, or `build`'s (then cached).
fn cached(
    variant: &Variant,
    arch: &'static str,
    format: Format,
    build: impl FnOnce() -> Result<Vec<u8>, CompileError>,
) -> Result<Vec<u8>, CompileError> {
    let version = nvrtc_version()?;
    let dir = cache_dir();
    let path = cache_path(&dir, variant, arch, format, version);
    read_or_build(&dir, &path, build)
}

/// The bytes at `path` (in `dir`), or `build`'s, stored there for next time. A cache that
/// cannot be written (a read-only file system, a full disk) is logged and costs the next start
/// a compile, nothing more.
fn read_or_build(
    dir: &Path,
    path: &Path,
    build: impl FnOnce() -> Result<Vec<u8>, CompileError>,
) -> Result<Vec<u8>, CompileError> {
    if let Ok(bytes) = std::fs::read(path) {
        return Ok(bytes);
    }
    let bytes = build()?;
    if let Err(error) = store(dir, path, &bytes) {
        tracing::warn!(path = %path.display(), %error, "kernel cache not written: kernels will be compiled again at the next start");
    }
    Ok(bytes)
}

/// Writes `bytes` to `path` under a name no other writer uses, then renames it into place, so a
/// concurrent reader sees the whole file or none and concurrent writers (threads or processes
/// compiling the same variant) never take each other's files.
fn store(dir: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static WRITES: AtomicU64 = AtomicU64::new(0);
    std::fs::create_dir_all(dir)?;
    let writer = WRITES.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{writer}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// PTX for `variant` on `arch`, from the cache or freshly compiled (and then cached).
pub fn ptx(variant: &Variant, arch: &'static str) -> Result<Ptx, CompileError> {
    let bytes = cached(variant, arch, Format::Ptx, || {
        compile(variant, arch).map(String::into_bytes)
    })?;
    let text = String::from_utf8(bytes).map_err(|e| CompileError::Cache {
        path: variant.label(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    Ok(Ptx::from_src(text))
}

/// Machine code for `variant` on the real architecture of `arch` (`compute_90`: `sm_90`),
/// from the cache or freshly compiled (and then cached); the driver loads it without the JIT
/// pass PTX needs. It runs only on devices of that architecture's major version and a minor
/// version at least as high.
pub fn cubin(variant: &Variant, arch: &'static str) -> Result<Ptx, CompileError> {
    let bytes = cached(variant, arch, Format::Cubin, || {
        compile_cubin(variant, arch)
    })?;
    Ok(Ptx::from_binary(bytes))
}

/// Compiles `variant` to machine code for the real architecture of `arch` (no cache).
pub fn compile_cubin(variant: &Variant, arch: &'static str) -> Result<Vec<u8>, CompileError> {
    with_program(variant, arch, &options(arch, true, &[]), |prog, _log| {
        let mut size = 0usize;
        // SAFETY: `prog` compiled successfully and is alive; `size` is valid for a write.
        unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
            .result()
            .map_err(|e| e.to_string())?;
        let mut cubin = vec![0u8; size];
        // SAFETY: `cubin` holds the `size` bytes NVRTC reported.
        unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr().cast()) }
            .result()
            .map_err(|e| e.to_string())?;
        Ok(cubin)
    })
}

/// NVRTC's options for `arch` (a virtual `compute_XY`; with `machine_code`, its real
/// `sm_XY`), then `extra`.
fn options(arch: &str, machine_code: bool, extra: &[&str]) -> Vec<String> {
    let target = if machine_code {
        arch.replace("compute_", "sm_")
    } else {
        arch.to_string()
    };
    [
        "--std=c++17".to_string(),
        format!("--gpu-architecture={target}"),
    ]
    .into_iter()
    .chain(extra.iter().map(|o| o.to_string()))
    .collect()
}

/// The text of a NUL-terminated buffer NVRTC filled (a log, PTX).
fn c_text(chars: &[std::ffi::c_char]) -> String {
    chars
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect()
}

/// Compiles `variant` with NVRTC and `options`, then hands the program and its compile log to
/// `output` before the program is destroyed; compile errors carry the log.
fn with_program<R>(
    variant: &Variant,
    arch: &'static str,
    options: &[String],
    output: impl FnOnce(sys::nvrtcProgram, &str) -> Result<R, String>,
) -> Result<R, CompileError> {
    use std::ffi::CString;

    if !nvrtc_available() {
        return Err(CompileError::NoNvrtc);
    }
    let failed = |log: String| CompileError::Compile {
        unit: variant.label(),
        arch,
        log,
    };
    let source = CString::new(variant.source()).map_err(|e| failed(e.to_string()))?;
    let name =
        CString::new(format!("{}.cu", variant.program.name)).map_err(|e| failed(e.to_string()))?;
    let prog = result::create_program(&source, Some(&name)).map_err(|e| failed(e.to_string()))?;
    // SAFETY: `prog` was just created and is destroyed only below, after its last use; the
    // source and name it refers to outlive it.
    unsafe {
        let compiled = result::compile_program(prog, options);
        let log = result::get_program_log(prog)
            .map(|log| c_text(&log))
            .unwrap_or_default();
        let out = match compiled {
            Ok(()) => output(prog, &log).map_err(|e| failed(format!("{e}: {log}"))),
            Err(e) => Err(failed(format!("{e}: {log}"))),
        };
        let _ = result::destroy_program(prog);
        out
    }
}

/// Compiles `variant` for `arch` with NVRTC (no cache); returns the PTX text.
pub fn compile(variant: &Variant, arch: &'static str) -> Result<String, CompileError> {
    with_program(variant, arch, &options(arch, false, &[]), |prog, _log| {
        // SAFETY: `prog` compiled successfully and is alive.
        let ptx = unsafe { result::get_ptx(prog) }.map_err(|e| e.to_string())?;
        Ok(c_text(&ptx))
    })
}

/// What ptxas reports for one kernel compiled to machine code: registers per thread, bytes
/// spilled to local memory, static shared memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelResources {
    pub kernel: String,
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub shared_bytes: u32,
}

/// Compiles `variant` to machine code for `arch` (a `compute_XY` name from [`arch_name`]: the
/// matching `sm_XY`) with NVRTC's embedded ptxas in verbose mode, and returns each kernel's
/// resources. Needs NVRTC only, no GPU: register pressure and spills are known before a kernel
/// ever runs.
pub fn resources(
    variant: &Variant,
    arch: &'static str,
) -> Result<Vec<KernelResources>, CompileError> {
    let options = options(arch, true, &["--ptxas-options=-v"]);
    with_program(variant, arch, &options, |_prog, log| {
        Ok(parse_ptxas_report(log))
    })
}

/// Each kernel's resources from ptxas's `-v` report: a kernel's lines follow its
/// "Compiling entry function 'NAME'" line; a "Function properties for NAME" line names whose
/// spill line follows (a device function's is not a kernel's).
fn parse_ptxas_report(log: &str) -> Vec<KernelResources> {
    // The number before `unit` in `line` ("126 registers", "16 bytes spill stores").
    fn count(line: &str, unit: &str) -> Option<u32> {
        let before = &line[..line.find(unit)?];
        before.split_whitespace().last()?.parse().ok()
    }
    fn quoted_after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
        line.split(marker).nth(1)?.split('\'').next()
    }
    let mut kernels: Vec<KernelResources> = Vec::new();
    let mut current: Option<usize> = None;
    for line in log.lines() {
        if let Some(kernel) = quoted_after(line, "Compiling entry function '") {
            kernels.push(KernelResources {
                kernel: kernel.to_string(),
                registers: 0,
                spill_stores: 0,
                spill_loads: 0,
                shared_bytes: 0,
            });
            current = Some(kernels.len() - 1);
        } else if let Some(rest) = line.split("Function properties for ").nth(1) {
            let name = rest.trim();
            current = kernels.iter().position(|k| k.kernel == name);
        } else if let Some(k) = current.map(|i| &mut kernels[i]) {
            if let Some(n) = count(line, " bytes spill stores") {
                k.spill_stores = n;
                k.spill_loads = count(line, " bytes spill loads").unwrap_or(0);
            } else if line.contains("Used ") {
                k.registers = count(line, " registers").unwrap_or(0);
                k.shared_bytes = count(line, " bytes smem").unwrap_or(0);
            }
        }
    }
    kernels
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("llmctl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn concurrent_builds_of_one_variant_all_succeed_and_leave_one_whole_file() {
        let dir = scratch("cache-race");
        let bytes: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        let writers = 4;
        let start = std::sync::Barrier::new(writers);
        for round in 0..16 {
            let path = dir.join(format!("variant-{round}.cubin"));
            std::thread::scope(|s| {
                for _ in 0..writers {
                    s.spawn(|| {
                        start.wait();
                        let got = read_or_build(&dir, &path, || Ok(bytes.clone())).unwrap();
                        assert_eq!(got, bytes);
                    });
                }
            });
            assert_eq!(std::fs::read(&path).unwrap(), bytes);
        }
        let files = std::fs::read_dir(&dir).unwrap().count();
        assert_eq!(files, 16, "temporary files left behind");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_cache_that_cannot_be_written_still_gives_the_build() {
        let file = scratch("cache-readonly");
        std::fs::write(&file, b"not a folder").unwrap();
        let dir = file.join("kernels");
        let got = read_or_build(&dir, &dir.join("variant.ptx"), || Ok(b"ptx".to_vec()));
        assert_eq!(got.unwrap(), b"ptx");
        let _ = std::fs::remove_file(&file);
    }

    #[test]
    fn ptxas_reports_are_read_per_kernel() {
        let log = "ptxas info    : 0 bytes gmem\n\
            ptxas info    : Compiling entry function 'a_f32' for 'sm_90'\n\
            ptxas info    : Function properties for a_f32\n\
            ptxas         .     8 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads\n\
            ptxas info    : Used 80 registers, used 1 barriers, 8 bytes cumulative stack size, 5248 bytes smem, 404 bytes cmem[0]\n\
            ptxas info    : Function properties for helper\n\
            ptxas         .     0 bytes stack frame, 99 bytes spill stores, 99 bytes spill loads\n\
            ptxas info    : Compiling entry function 'b_bf16' for 'sm_90'\n\
            ptxas info    : Function properties for b_bf16\n\
            ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
            ptxas info    : Used 126 registers, used 0 barriers, 404 bytes cmem[0]\n";
        assert_eq!(
            parse_ptxas_report(log),
            vec![
                KernelResources {
                    kernel: "a_f32".into(),
                    registers: 80,
                    spill_stores: 16,
                    spill_loads: 12,
                    shared_bytes: 5248,
                },
                KernelResources {
                    kernel: "b_bf16".into(),
                    registers: 126,
                    spill_stores: 0,
                    spill_loads: 0,
                    shared_bytes: 0,
                },
            ]
        );
    }
}
