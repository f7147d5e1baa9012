//! Every kernel variant compiles with NVRTC (CUDA 13.0) for sm_80 and sm_90, and each defines
//! the entry points the launchers look up. Needs no GPU, only `libnvrtc.so.13`; ignored by
//! default, run by `.ci/run` (which installs the `nvidia-cuda-nvrtc` wheel) with
//! `cargo test -p llmctl-kernels --test nvrtc -- --ignored`, where a missing library fails.

use llmctl_kernels::compile::{self, CompileError, Format};
use llmctl_kernels::source;

#[test]
#[ignore = "needs libnvrtc.so.13 on LD_LIBRARY_PATH; .ci/run installs it and runs this"]
fn every_kernel_compiles_for_sm80_and_sm90() {
    let version = match compile::nvrtc_version() {
        Ok(v) => v,
        Err(e @ CompileError::NoNvrtc) => panic!("{e}"),
        Err(e) => panic!("NVRTC: {e}"),
    };
    assert_eq!(
        version.0, 13,
        "NVRTC {version:?}: the kernels target CUDA 13.0"
    );
    for arch in [
        compile::arch_name(8, 0).unwrap(),
        compile::arch_name(9, 0).unwrap(),
    ] {
        for variant in source::ALL.iter().flat_map(|p| p.variants()) {
            let started = std::time::Instant::now();
            let ptx = compile::compile(&variant, arch).unwrap_or_else(|e| panic!("{e}"));
            for entry in variant.entry_points() {
                assert!(
                    ptx.contains(&format!(".entry {entry}(")),
                    "{} for {arch}: no entry point {entry}",
                    variant.label()
                );
            }
            eprintln!(
                "{} for {arch}: {} entry points, {} KiB of PTX, {:.2} s",
                variant.label(),
                variant.entry_points().len(),
                ptx.len() / 1024,
                started.elapsed().as_secs_f64()
            );
        }
    }
}

#[test]
#[ignore = "needs libnvrtc.so.13 on LD_LIBRARY_PATH; .ci/run installs it and runs this"]
fn compiled_kernels_are_cached_by_source_arch_format_and_version() {
    let dir = std::env::temp_dir().join(format!("llmctl-kernel-cache-{}", std::process::id()));
    // SAFETY: this test binary's other tests do not read the variable.
    unsafe { std::env::set_var("LLMCTL_KERNEL_CACHE", &dir) };
    let arch = compile::arch_name(9, 0).unwrap();
    let version = compile::nvrtc_version().unwrap();
    let cache = source::CACHE.variant("bf16", None);
    let path = compile::cache_path(&dir, &cache, arch, Format::Ptx, version);
    assert!(!path.exists());
    let first = compile::ptx(&cache, arch).unwrap().to_src();
    assert!(path.exists(), "{}", path.display());
    assert_eq!(compile::ptx(&cache, arch).unwrap().to_src(), first);
    // Machine code is another file, read back as written.
    let cubin_path = compile::cache_path(&dir, &cache, arch, Format::Cubin, version);
    assert_ne!(cubin_path, path);
    compile::cubin(&cache, arch).unwrap();
    let cubin = std::fs::read(&cubin_path).expect("the CUBIN is cached");
    compile::cubin(&cache, arch).unwrap();
    assert_eq!(std::fs::read(&cubin_path).unwrap(), cubin);
    // Another architecture is another file.
    let other = compile::cache_path(
        &dir,
        &cache,
        compile::arch_name(8, 0).unwrap(),
        Format::Ptx,
        version,
    );
    assert_ne!(other, path);
    // Another storage type is another file.
    let f16 = source::CACHE.variant("f16", None);
    assert_ne!(
        compile::cache_path(&dir, &f16, arch, Format::Ptx, version),
        path
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// What the worker loads on a GPU: machine code for sm_80 and sm_90, an ELF image (a CUDA
/// binary) naming every entry point the launchers look up, so the driver has nothing to JIT.
#[test]
#[ignore = "needs libnvrtc.so.13 on LD_LIBRARY_PATH; .ci/run installs it and runs this"]
fn every_kernel_compiles_to_machine_code_for_sm80_and_sm90() {
    for arch in [
        compile::arch_name(8, 0).unwrap(),
        compile::arch_name(9, 0).unwrap(),
    ] {
        for variant in source::ALL.iter().map(|p| p.variant("bf16", Some(128))) {
            let started = std::time::Instant::now();
            let cubin = compile::compile_cubin(&variant, arch).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(&cubin[..4], b"\x7fELF", "{} for {arch}", variant.label());
            for entry in variant.entry_points() {
                let symbol = [&[0u8][..], entry.as_bytes(), &[0u8]].concat();
                assert!(
                    cubin.windows(symbol.len()).any(|w| w == symbol),
                    "{} for {arch}: no symbol {entry}",
                    variant.label()
                );
            }
            eprintln!(
                "{} for {arch}: {} KiB of machine code, {:.2} s",
                variant.label(),
                cubin.len() / 1024,
                started.elapsed().as_secs_f64()
            );
        }
    }
}

/// Every bf16 and f16 kernel compiled to machine code for sm_80 and sm_90 keeps its values in
/// registers: a spill to local memory is a slow kernel found here, before any GPU runs it. The
/// f32 kernels serve f32 models (tests, references), where ptxas spills a few bytes in some;
/// those are printed, not failed. Prints each kernel's registers and static shared memory
/// (`-- --nocapture` to see them).
#[test]
#[ignore = "needs libnvrtc.so.13 on LD_LIBRARY_PATH; .ci/run installs it and runs this"]
fn no_kernel_spills_registers_on_sm80_or_sm90() {
    let mut spills = Vec::new();
    for arch in [
        compile::arch_name(8, 0).unwrap(),
        compile::arch_name(9, 0).unwrap(),
    ] {
        for variant in source::ALL.iter().flat_map(|p| p.variants()) {
            let report = compile::resources(&variant, arch).unwrap_or_else(|e| panic!("{e}"));
            for entry in variant.entry_points() {
                let k = report
                    .iter()
                    .find(|k| k.kernel == entry)
                    .unwrap_or_else(|| panic!("{arch}: ptxas reported nothing for {entry}"));
                eprintln!(
                    "{arch} {:<36} {:>3} registers {:>6} B shared",
                    k.kernel, k.registers, k.shared_bytes
                );
                if k.spill_stores > 0 || k.spill_loads > 0 {
                    let spill = format!(
                        "{arch} {}: {} B spill stores, {} B spill loads",
                        k.kernel, k.spill_stores, k.spill_loads
                    );
                    eprintln!("{spill}");
                    if !entry.contains("_f32") {
                        spills.push(spill);
                    }
                }
            }
        }
    }
    assert!(spills.is_empty(), "register spills:\n{}", spills.join("\n"));
}

/// The bandwidth-bound kernels read memory 16 bytes per instruction: decode attention's K/V and
/// every GEMV operand. A chunk converted element by element straight from a global pointer
/// compiles to eight 2-byte loads instead, which no functional test notices; this counts the
/// loads in the PTX of each kernel (bf16, head size 128, compute_90).
#[test]
#[ignore = "needs libnvrtc.so.13 on LD_LIBRARY_PATH; .ci/run installs it and runs this"]
fn bandwidth_bound_kernels_load_sixteen_bytes_at_a_time() {
    let arch = compile::arch_name(9, 0).unwrap();
    // (kernel, at least this many 16-byte loads); none may have 2-byte read-only loads.
    let expect = [
        ("paged_attention_decode_bf16_d128", 8),
        ("gemv_add_bf16", 64),
        ("gemv_norm_bf16", 64),
        ("gemv_norm_gated_bf16", 64),
        ("gemv_norm_rope_bf16", 64),
    ];
    let mut ptx = String::new();
    for program in [source::ATTENTION, source::GEMV] {
        let variant = program.variant("bf16", Some(128));
        ptx += &compile::compile(&variant, arch).unwrap_or_else(|e| panic!("{e}"));
    }
    for (kernel, at_least) in expect {
        let body = ptx
            .split(".entry ")
            .find(|b| b.starts_with(&format!("{kernel}(")))
            .unwrap_or_else(|| panic!("no entry {kernel}"));
        let body = body.split("\n}\n").next().unwrap_or(body);
        let wide_loads = body
            .lines()
            .filter(|l| l.contains("ld.global") && l.contains(".v4."))
            .count();
        let narrow_nc = body
            .lines()
            .filter(|l| l.contains("ld.global.nc") && l.contains(".u16"))
            .count();
        eprintln!("{kernel}: {wide_loads} 16-byte global loads, {narrow_nc} 2-byte read-only ones");
        assert!(
            wide_loads >= at_least,
            "{kernel}: {wide_loads} 16-byte global loads, expected at least {at_least}"
        );
        assert_eq!(
            narrow_nc, 0,
            "{kernel}: 2-byte read-only loads in the hot loop"
        );
    }
}
