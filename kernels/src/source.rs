//! The kernel sources, embedded in the binary. NVRTC sees no files, so each program is
//! `cuda/common.cuh` followed by one `.cu` file.

/// One NVRTC program: a `.cu` file and the kernels it defines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Program {
    pub name: &'static str,
    body: &'static str,
}

const COMMON: &str = include_str!("../cuda/common.cuh");

pub const CACHE: Program = Program {
    name: "cache",
    body: include_str!("../cuda/cache.cu"),
};
pub const ELEMENTWISE: Program = Program {
    name: "elementwise",
    body: include_str!("../cuda/elementwise.cu"),
};
pub const SAMPLING: Program = Program {
    name: "sampling",
    body: include_str!("../cuda/sampling.cu"),
};
pub const ATTENTION: Program = Program {
    name: "attention",
    body: include_str!("../cuda/attention.cu"),
};

pub const ALL: [Program; 4] = [CACHE, ELEMENTWISE, SAMPLING, ATTENTION];

/// Kernels that are wrong on purpose, for the CPU emulator's own tests (`crate::emulator`);
/// never loaded by [`crate::cuda::Kernels`].
pub const EMULATOR_SELFTEST: Program = Program {
    name: "emulator_selftest",
    body: include_str!("../emulator/selftest.cu"),
};

/// Storage types every kernel is instantiated for (the suffix of its entry point).
pub const DTYPES: [&str; 3] = ["f32", "bf16", "f16"];
/// Head sizes the attention kernels are instantiated for (16 and 32 for small test models).
pub const HEAD_DIMS: [usize; 7] = [16, 32, 64, 80, 96, 128, 256];

impl Program {
    /// The full text NVRTC compiles.
    pub fn source(&self) -> String {
        format!("{COMMON}\n#line 1 \"{}.cu\"\n{}", self.name, self.body)
    }

    /// Every `extern "C"` entry point the program defines.
    pub fn entry_points(&self) -> Vec<String> {
        let mut names = Vec::new();
        for dtype in DTYPES {
            match self.name {
                "cache" => names.push(format!("write_kv_{dtype}")),
                "elementwise" => {
                    for k in [
                        "rms_norm",
                        "add_rms_norm",
                        "rotary",
                        "rotary_table",
                        "add_bias",
                        "silu_mul",
                        "embed",
                    ] {
                        names.push(format!("{k}_{dtype}"));
                    }
                }
                "sampling" => {
                    names.push(format!("argmax_{dtype}"));
                    names.push(format!("top_k_{dtype}"));
                }
                "emulator_selftest" => {
                    if dtype == DTYPES[0] {
                        for k in [
                            "reverse",
                            "reverse_racy",
                            "divergent_barrier",
                            "warp_sum",
                            "write_past_end",
                            "mma",
                            "ldmatrix",
                        ] {
                            names.push(format!("selftest_{k}"));
                        }
                    }
                }
                _ => {
                    for d in HEAD_DIMS {
                        for k in [
                            "paged_attention_decode",
                            "paged_attention_reduce",
                            "attention_prefill",
                        ] {
                            names.push(format!("{k}_{dtype}_d{d}"));
                        }
                    }
                }
            }
        }
        names
    }
}
