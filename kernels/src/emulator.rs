//! A CPU double of the CUDA driver, for checking the kernels (and code that launches them) on a
//! machine with no GPU. [`install`] builds `kernels/emulator/` with the system's C++ compiler
//! into a `libcuda.so` whose kernels are our `.cu` programs compiled as C++ (and a `libcublas.so`
//! with the GEMMs), then loads them so that cudarc's own lookups of those names find them instead
//! of NVIDIA's. Everything above them is unchanged: NVRTC still compiles the real PTX (a kernel
//! must be in it to be found), and [`crate::cuda::Kernels`] and cuBLAS users run as on a GPU.
//!
//! What it checks: what each kernel computes, out-of-bounds accesses (each allocation ends
//! against an unmapped page), reads of unwritten device or shared memory (allocations, and each
//! block's shared variables, start as NaN), missing barriers (each thread runs as far as it can
//! before the next starts, in ascending order in every other block and descending in the rest),
//! reliance on block order (blocks run scattered) and divergent barriers (the launch fails).
//! What it does not: speed, memory coalescing, anything only the hardware does. Results from it
//! are emulator results, never GPU results. The model is described in
//! `kernels/emulator/device.h`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use sha2::{Digest, Sha256};

use crate::source::{self, Program};

const FILES: [(&str, &str); 6] = [
    ("device.h", include_str!("../emulator/device.h")),
    ("runtime.h", include_str!("../emulator/runtime.h")),
    ("submit.h", include_str!("../emulator/submit.h")),
    ("runtime.cpp", include_str!("../emulator/runtime.cpp")),
    ("driver.cpp", include_str!("../emulator/driver.cpp")),
    ("cublas.cpp", include_str!("../emulator/cublas.cpp")),
];

/// The name the emulated device reports (`cuDeviceGetName`, in `emulator/driver.cpp`).
pub const DEVICE_NAME: &str = "llmctl CUDA emulator (CPU)";

/// The libraries built, by soname: the driver (with every kernel program) and cuBLAS.
const DRIVER: &str = "libcuda.so";
const CUBLAS: &str = "libcublas.so";
/// cuBLAS's only source; every other `.cpp` (and every kernel program) goes into the driver.
const CUBLAS_SOURCE: &str = "cublas.cpp";

#[derive(Clone, Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error("building the CUDA emulator in {dir}: {reason}")]
    Build { dir: String, reason: String },
    #[error("loading the CUDA emulator {path}: {reason}")]
    Load { path: String, reason: String },
}

/// Builds the emulator under `work_dir` (once per source version; later calls reuse it) and
/// loads it in place of the CUDA driver and cuBLAS for the rest of the process. Must run before
/// anything loads the real ones. Returns the folder holding the libraries.
pub fn install(work_dir: &Path) -> Result<PathBuf, EmulatorError> {
    static INSTALLED: OnceLock<Result<PathBuf, EmulatorError>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| {
            let dir = build(work_dir)?;
            for lib in [DRIVER, CUBLAS] {
                load(&dir.join(lib))?;
            }
            Ok(dir)
        })
        .clone()
}

/// The C++ translation unit for one kernel program: the device prelude, the program as NVRTC
/// compiles it with every variant instantiated (each `__shared__` declaration followed by its
/// [`fresh_shared`] call), and a registration of each entry point.
fn translation_unit(program: &Program) -> Result<String, String> {
    let source = fresh_shared(&program.source_all())
        .map_err(|e| format!("program {}: {e}", program.name))?;
    let mut tu = format!("#include \"device.h\"\n{source}\n");
    for entry in program.variants().iter().flat_map(|v| v.entry_points()) {
        tu.push_str(&format!("EMU_KERNEL({entry})\n"));
    }
    Ok(tu)
}

/// `source` with `emu::fresh_shared(&name, sizeof name);` right after each `__shared__`
/// declaration, so that each block finds its shared memory poisoned, not as the previous block
/// left it (`emulator/device.h`). A declaration must be one statement on one line
/// (`__shared__ TYPE NAME[DIMS];`, one name); any other use of `__shared__` is refused, naming
/// the line.
fn fresh_shared(source: &str) -> Result<String, String> {
    let mut out = String::with_capacity(source.len() + 4096);
    for (number, line) in source.lines().enumerate() {
        let code = line.split("//").next().unwrap_or_default();
        if !code.contains("__shared__") {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let refuse = || {
            format!(
                "line {}: a `__shared__` the emulator cannot read: {line}",
                number + 1
            )
        };
        let decl = code
            .trim_start()
            .strip_prefix("__shared__ ")
            .ok_or_else(refuse)?;
        let end = decl.find(';').ok_or_else(refuse)?;
        if decl[..end].contains(',') {
            return Err(refuse());
        }
        let name = decl[..end]
            .split('[')
            .next()
            .and_then(|head| head.split_whitespace().last())
            .filter(|name| name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
            .ok_or_else(refuse)?;
        let at = code.len() - code.trim_start().len() + "__shared__ ".len() + end + 1;
        out.push_str(&line[..at]);
        out.push_str(&format!(" emu::fresh_shared(&{name}, sizeof {name});"));
        out.push_str(&line[at..]);
        out.push('\n');
    }
    Ok(out)
}

fn compiler() -> String {
    std::env::var("CXX").unwrap_or_else(|_| "g++".into())
}

/// How each translation unit is compiled. A typed access through a misaligned pointer traps
/// (SIGILL; the alignment sanitizer needs no run-time library in trap mode), as a GPU faults.
const FLAGS: [&str; 7] = [
    "-std=c++20",
    "-O2",
    "-fPIC",
    "-Wno-unknown-pragmas",
    "-fsanitize=alignment",
    "-fsanitize-undefined-trap-on-error",
    "-c",
];

/// Compiles the emulator into `work_dir/llmctl-cuda-emulator-<hash>/` (`libcuda.so`,
/// `libcublas.so`), keyed by a hash of every source, the compiler and its flags, so edited
/// kernels are never run stale. Returns that folder.
pub fn build(work_dir: &Path) -> Result<PathBuf, EmulatorError> {
    let programs: Vec<(String, String)> = source::ALL
        .iter()
        .chain([&source::EMULATOR_SELFTEST])
        .map(|p| Ok((format!("program_{}.cpp", p.name), translation_unit(p)?)))
        .collect::<Result<_, String>>()
        .map_err(|reason| EmulatorError::Build {
            dir: work_dir.display().to_string(),
            reason,
        })?;
    let units: Vec<(&str, &str)> = FILES
        .iter()
        .copied()
        .filter(|(name, _)| name.ends_with(".cpp"))
        .chain(programs.iter().map(|(n, t)| (n.as_str(), t.as_str())))
        .collect();
    let mut hash = Sha256::new();
    hash.update(compiler());
    for flag in FLAGS {
        hash.update(flag);
        hash.update([0]);
    }
    let headers = FILES
        .iter()
        .copied()
        .filter(|(name, _)| name.ends_with(".h"));
    for (name, text) in headers.clone().chain(units.iter().copied()) {
        hash.update(name);
        hash.update([0]);
        hash.update(text);
        hash.update([0]);
    }
    let dir = work_dir.join(format!(
        "llmctl-cuda-emulator-{}",
        &hex::encode(hash.finalize())[..16]
    ));
    // The driver is linked last: its presence means the build finished.
    if dir.join(DRIVER).exists() {
        return Ok(dir);
    }
    let fail = |reason: String| EmulatorError::Build {
        dir: dir.display().to_string(),
        reason,
    };
    std::fs::create_dir_all(&dir).map_err(|e| fail(e.to_string()))?;
    for (name, text) in headers {
        std::fs::write(dir.join(name), text).map_err(|e| fail(e.to_string()))?;
    }
    // One compiler per translation unit, all at once; then one link.
    let mut jobs = Vec::new();
    for &(name, text) in &units {
        std::fs::write(dir.join(name), text).map_err(|e| fail(e.to_string()))?;
        let object = format!("{name}.o");
        let child = Command::new(compiler())
            .current_dir(&dir)
            .args(FLAGS)
            .arg(name)
            .arg("-o")
            .arg(&object)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map_err(|e| fail(format!("cannot run {}: {e}", compiler())))?;
        jobs.push((name, object, child));
    }
    let (mut cublas, mut driver) = (Vec::new(), Vec::new());
    let mut errors = String::new();
    for (name, object, child) in jobs {
        let out = child.wait_with_output().map_err(|e| fail(e.to_string()))?;
        if !out.status.success() {
            errors.push_str(&format!(
                "{name}:\n{}\n",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        if name == CUBLAS_SOURCE {
            cublas.push(object);
        } else {
            driver.push(object);
        }
    }
    if !errors.is_empty() {
        return Err(fail(errors));
    }
    // The driver is linked first (cuBLAS links against it: it records GEMMs into the driver's
    // graphs) and renamed into place last. Each is linked under a temporary name and renamed,
    // so a concurrent build never loads half a file.
    let partial = |soname: &str| format!("{soname}.{}", std::process::id());
    for (soname, objects) in [(DRIVER, driver), (CUBLAS, cublas)] {
        let mut link = Command::new(compiler());
        link.current_dir(&dir)
            .arg("-shared")
            .arg(format!("-Wl,-soname,{soname}"))
            .arg("-o")
            .arg(partial(soname))
            .args(&objects);
        if soname == CUBLAS {
            link.arg(partial(DRIVER)).arg("-Wl,-rpath,$ORIGIN");
        }
        let out = link
            .output()
            .map_err(|e| fail(format!("cannot run {}: {e}", compiler())))?;
        if !out.status.success() {
            return Err(fail(String::from_utf8_lossy(&out.stderr).into_owned()));
        }
    }
    for soname in [CUBLAS, DRIVER] {
        std::fs::rename(dir.join(partial(soname)), dir.join(soname))
            .map_err(|e| fail(e.to_string()))?;
    }
    Ok(dir)
}

/// Loads a library globally under its soname (`libcuda.so`, `libcublas.so`): the dynamic loader
/// then answers cudarc's later `dlopen` of that name with it. Kept loaded for the life of the
/// process.
fn load(lib: &Path) -> Result<(), EmulatorError> {
    use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
    // SAFETY: the library is one just built from kernels/emulator: its initialisers only
    // register kernels.
    let handle = unsafe { Library::open(Some(lib), RTLD_NOW | RTLD_GLOBAL) }.map_err(|e| {
        EmulatorError::Load {
            path: lib.display().to_string(),
            reason: e.to_string(),
        }
    })?;
    std::mem::forget(handle);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::fresh_shared;

    #[test]
    fn each_shared_declaration_is_followed_by_its_poisoning() {
        let source = "__device__ void f() {\n    __shared__ float s_w[4][8];  // weights\n    __shared__ unsigned count;\n    // a __shared__ in a comment\n}\n";
        assert_eq!(
            fresh_shared(source).unwrap(),
            "__device__ void f() {\n    __shared__ float s_w[4][8]; emu::fresh_shared(&s_w, sizeof s_w);  // weights\n    __shared__ unsigned count; emu::fresh_shared(&count, sizeof count);\n    // a __shared__ in a comment\n}\n"
        );
    }

    #[test]
    fn shared_memory_the_emulator_cannot_poison_is_refused() {
        for line in [
            "extern __shared__ float dynamic[];",
            "__shared__ float split[4]",
            "__shared__ float a[2], b[2];",
        ] {
            let err = fresh_shared(&format!("void f() {{\n{line}\n}}\n")).unwrap_err();
            assert!(err.starts_with("line 2:"), "{line}: {err}");
        }
    }
}
