//! The kernel sources, embedded in the binary. NVRTC sees no files, so each compiled unit is
//! `cuda/common.cuh`, one `.cu` file and the line instantiating its kernels for one storage type
//! (and, for attention, one head size): a [`Variant`]. A model needs one variant of each program,
//! so a cold start compiles 5 small units instead of every kernel for every type and size.

/// One NVRTC program: a `.cu` file and the kernels it defines. Each file defines
/// `INSTANTIATE(suffix, type)` (attention: `INSTANTIATE(suffix, type, head_dim)`), which
/// [`Variant::source`] invokes once.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Program {
    pub name: &'static str,
    body: &'static str,
    kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Kind {
    /// Instantiated per storage type.
    PerDtype,
    /// Instantiated per storage type and head size.
    PerHeadDim,
    /// Compiled as written (the emulator's self-test kernels).
    Plain,
}

/// A program instantiated for one storage type (`dtype` is an entry point suffix) and, for
/// per-head-size programs, one head size: the unit NVRTC compiles, caches and loads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Variant {
    pub program: Program,
    pub dtype: &'static str,
    pub head_dim: Option<usize>,
}

const COMMON: &str = include_str!("../cuda/common.cuh");

pub const CACHE: Program = Program {
    name: "cache",
    body: include_str!("../cuda/cache.cu"),
    kind: Kind::PerDtype,
};
pub const ELEMENTWISE: Program = Program {
    name: "elementwise",
    body: include_str!("../cuda/elementwise.cu"),
    kind: Kind::PerDtype,
};
pub const SAMPLING: Program = Program {
    name: "sampling",
    body: include_str!("../cuda/sampling.cu"),
    kind: Kind::PerDtype,
};
pub const ATTENTION: Program = Program {
    name: "attention",
    body: include_str!("../cuda/attention.cu"),
    kind: Kind::PerHeadDim,
};

pub const GEMV: Program = Program {
    name: "gemv",
    body: include_str!("../cuda/gemv.cu"),
    kind: Kind::PerDtype,
};

pub const ALL: [Program; 5] = [CACHE, ELEMENTWISE, SAMPLING, ATTENTION, GEMV];

/// Kernels that are wrong on purpose, for the CPU emulator's own tests (`crate::emulator`);
/// never loaded by [`crate::cuda::Kernels`].
pub const EMULATOR_SELFTEST: Program = Program {
    name: "emulator_selftest",
    body: include_str!("../emulator/selftest.cu"),
    kind: Kind::Plain,
};

/// Storage types every kernel is instantiated for (the suffix of its entry point).
pub const DTYPES: [&str; 3] = ["f32", "bf16", "f16"];
/// Head sizes the attention kernels are instantiated for (16 and 32 for small test models).
pub const HEAD_DIMS: [usize; 7] = [16, 32, 64, 80, 96, 128, 256];

/// The C type of a storage type's suffix.
fn c_type(dtype: &str) -> &'static str {
    match dtype {
        "f32" => "float",
        "bf16" => "bf16",
        "f16" => "f16",
        other => panic!("no storage type `{other}`"),
    }
}

impl Program {
    /// The variant for `dtype` and, for per-head-size programs, `head_dim` (which the others
    /// ignore).
    pub fn variant(self, dtype: &'static str, head_dim: Option<usize>) -> Variant {
        let head_dim = match self.kind {
            Kind::PerHeadDim => {
                Some(head_dim.unwrap_or_else(|| panic!("{}: needs a head size", self.name)))
            }
            _ => None,
        };
        Variant {
            program: self,
            dtype,
            head_dim,
        }
    }

    /// Every variant: each storage type, times each head size where the program has them.
    pub fn variants(self) -> Vec<Variant> {
        match self.kind {
            Kind::Plain => vec![Variant {
                program: self,
                dtype: "",
                head_dim: None,
            }],
            Kind::PerDtype => DTYPES.iter().map(|&d| self.variant(d, None)).collect(),
            Kind::PerHeadDim => DTYPES
                .iter()
                .flat_map(|&d| HEAD_DIMS.iter().map(move |&h| self.variant(d, Some(h))))
                .collect(),
        }
    }

    /// The program with every variant instantiated (the CPU emulator compiles this once).
    pub fn source_all(self) -> String {
        let mut text = self.header();
        for v in self.variants() {
            text.push_str(&v.instantiation());
        }
        text
    }

    fn header(self) -> String {
        format!("{COMMON}\n#line 1 \"{}.cu\"\n{}\n", self.name, self.body)
    }
}

impl Variant {
    /// `attention_bf16_d128`, `elementwise_f16`: names the unit in cache files and errors.
    pub fn label(&self) -> String {
        let mut label = self.program.name.to_string();
        if !self.dtype.is_empty() {
            label = format!("{label}_{}", self.dtype);
        }
        if let Some(d) = self.head_dim {
            label = format!("{label}_d{d}");
        }
        label
    }

    fn instantiation(&self) -> String {
        match (self.program.kind, self.head_dim) {
            (Kind::Plain, _) => String::new(),
            (_, Some(d)) => format!("INSTANTIATE({}, {}, {d})\n", self.dtype, c_type(self.dtype)),
            (_, None) => format!("INSTANTIATE({}, {})\n", self.dtype, c_type(self.dtype)),
        }
    }

    /// The full text NVRTC compiles.
    pub fn source(&self) -> String {
        self.program.header() + &self.instantiation()
    }

    /// Every `extern "C"` entry point the variant defines.
    pub fn entry_points(&self) -> Vec<String> {
        let dtype = self.dtype;
        let names: &[&str] = match self.program.name {
            "cache" => &["write_kv", "rotary_write_kv"],
            "elementwise" => &[
                "rms_norm",
                "add_rms_norm",
                "rotary",
                "rotary_table",
                "add_bias",
                "silu_mul",
                "embed",
            ],
            "sampling" => &[
                "argmax",
                "top_k",
                "softmax_draw",
                "softmax_mass",
                "edit_logits",
            ],
            "gemv" => &["gemv_add", "gemv_norm", "gemv_norm_gated", "gemv_norm_rope"],
            "emulator_selftest" => {
                return [
                    "reverse",
                    "reverse_racy",
                    "shift_racy",
                    "blocks_in_order",
                    "divergent_barrier",
                    "warp_sum",
                    "write_past_end",
                    "mma",
                    "ldmatrix",
                    "async_copy_all",
                    "async_copy_first",
                    "async_copy_unwaited",
                    "load16",
                    "typed_load16",
                ]
                .iter()
                .map(|k| format!("selftest_{k}"))
                .collect();
            }
            _ => &["paged_attention_decode", "attention_prefill"],
        };
        names
            .iter()
            .map(|k| match self.head_dim {
                Some(d) => format!("{k}_{dtype}_d{d}"),
                None => format!("{k}_{dtype}"),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_variant_instantiates_one_storage_type_and_head_size() {
        let v = ATTENTION.variant("bf16", Some(128));
        assert_eq!(v.label(), "attention_bf16_d128");
        assert!(v.source().ends_with("INSTANTIATE(bf16, bf16, 128)\n"));
        assert_eq!(
            v.source().matches("INSTANTIATE(").count(),
            2,
            "the define and one use"
        );
        assert_eq!(
            v.entry_points(),
            [
                "paged_attention_decode_bf16_d128",
                "attention_prefill_bf16_d128"
            ]
        );
        // Per-dtype programs ignore the head size.
        let e = ELEMENTWISE.variant("f16", Some(128));
        assert_eq!(e.label(), "elementwise_f16");
        assert!(e.source().ends_with("INSTANTIATE(f16, f16)\n"));
        assert_eq!(ATTENTION.variants().len(), DTYPES.len() * HEAD_DIMS.len());
        assert_eq!(CACHE.variants().len(), DTYPES.len());
        // The emulator's unit holds every variant.
        let all = SAMPLING.source_all();
        for d in DTYPES {
            assert!(all.contains(&format!("INSTANTIATE({d}, ")), "{d}");
        }
    }
}
