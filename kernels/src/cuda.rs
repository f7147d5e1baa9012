//! Launching the kernels on a CUDA device through cudarc. [`Kernels::new`] loads the driver at
//! run time; each program variant (storage type, head size) is compiled to machine code for the
//! device's architecture (or taken from the cache; PTX where that fails) and loaded at first
//! use or by [`Kernels::prepare`];
//! each method launches one kernel on the device's stream with the grid its source documents.
//! Shapes are checked here, before any launch, so a bad call is an error, not a fault on the
//! device.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, DeviceRepr,
    DriverError, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};

use crate::compile::{self, CompileError, Format};
use crate::reference::decode_partitions;
use crate::source::{self, Program, Variant};

/// A storage type the kernels are instantiated for.
pub trait Dtype: DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + 'static {
    /// Entry point suffix (`f32`, `bf16`, `f16`).
    const SUFFIX: &'static str;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Dtype for f32 {
    const SUFFIX: &'static str = "f32";
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Dtype for half::bf16 {
    const SUFFIX: &'static str = "bf16";
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

impl Dtype for half::f16 {
    const SUFFIX: &'static str = "f16";
    fn from_f32(x: f32) -> Self {
        half::f16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        half::f16::to_f32(self)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error(
        "the CUDA driver (libcuda.so) cannot be loaded: no NVIDIA driver on this machine, or it is not on the loader path"
    )]
    NoDriver,
    #[error("CUDA driver: {0}")]
    Driver(#[from] DriverError),
    #[error(transparent)]
    Compile(#[from] CompileError),
    #[error("{0}")]
    Shape(String),
}

fn shape(ok: bool, what: impl FnOnce() -> String) -> Result<(), KernelError> {
    if ok {
        Ok(())
    } else {
        Err(KernelError::Shape(what()))
    }
}

/// Attention inputs shared by the decode and prefill launchers: one layer's paged caches and
/// the block tables (`[num_seqs, max_blocks]`, i32) and context lengths (`[num_seqs]`, i32).
pub struct PagedCache<'a, T> {
    pub k: &'a CudaSlice<T>,
    pub v: &'a CudaSlice<T>,
    pub block_tables: &'a CudaSlice<i32>,
    pub max_blocks: usize,
    pub context_lens: &'a CudaSlice<i32>,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

/// Query heads one decode CTA serves (attention.cu's MAX_GROUP): larger GQA groups take
/// several CTAs per KV head.
const DECODE_MAX_GROUP: usize = 4;

/// The most input rows the fused projections take (gemv.cu's GEMV_MAX_ROWS): beyond a few
/// rows a GEMM reads its weights once for many rows and cuBLAS wins.
pub const GEMV_MAX_ROWS: usize = 4;

/// A change to one logit before a draw (the worker sampler's penalties, bias and
/// `min_tokens` suppression, one edit per token; sampling.cu's `LogitEdit`): `l * scale_pos` if positive, else `l * scale_neg`
/// (the repetition penalty), then `+ add`; `add` of -inf forbids the token.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogitEdit {
    /// The logits row (the step's row for a backend; the sampler's own row is 0).
    pub row: u32,
    pub token: u32,
    pub scale_pos: f32,
    pub scale_neg: f32,
    pub add: f32,
}

// SAFETY: `repr(C)` plain data, laid out as sampling.cu's `LogitEdit`; all-zero bits are valid.
unsafe impl DeviceRepr for LogitEdit {}
unsafe impl ValidAsZeroBits for LogitEdit {}

impl LogitEdit {
    /// An edit of `token` in `row` that changes nothing yet.
    pub fn none(row: u32, token: u32) -> Self {
        Self {
            row,
            token,
            scale_pos: 1.0,
            scale_neg: 1.0,
            add: 0.0,
        }
    }

    pub fn apply(&self, l: f32) -> f32 {
        if self.add == f32::NEG_INFINITY {
            return f32::NEG_INFINITY;
        }
        let scaled = if l > 0.0 {
            l * self.scale_pos
        } else {
            l * self.scale_neg
        };
        scaled + self.add
    }
}

/// The widest vocabulary [`Kernels::softmax_draw`] takes (sampling.cu's DRAW_TILE times
/// DRAW_MAX_TILES).
pub const SOFTMAX_DRAW_MAX_VOCAB: usize = 1024 * 1024;

/// What [`Kernels::gemv_norm`] does with its projection.
pub enum GemvThen<'a, T> {
    Store,
    /// `silu(gate) * up` of a `[gate; up]` projection.
    SiluMul,
    /// A `[q; k; v]` projection: q and k heads rotated, k and v written to the cache.
    Rotary(RotaryKv<'a, T>),
}

/// The rotary rows and cache of [`GemvThen::Rotary`], as [`Kernels::rotary_write_kv`] takes
/// them: `cos` and `sin` `[rows, head_dim / 2]`, one slot per row (negative: not written).
pub struct RotaryKv<'a, T> {
    pub cos: &'a CudaSlice<f32>,
    pub sin: &'a CudaSlice<f32>,
    pub num_q_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub k_cache: &'a mut CudaSlice<T>,
    pub v_cache: &'a mut CudaSlice<T>,
    pub slots: &'a CudaSlice<i64>,
}

/// Warps per GEMV block (gemv.cu's GEMV_WARPS).
const GEMV_WARPS: usize = 4;

/// The most partitions a split decode merges (attention.cu's MERGE_MAX_PARTS).
const DECODE_MAX_PARTITIONS: usize = 512;

/// Split decode's counters ([`Kernels`]): the split heuristic splits only grids of fewer than
/// two CTAs per SM, far below this.
const SPLIT_COUNTERS: usize = 4096;

/// A decode launch's split of the context ([`Kernels::decode_plan`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodePlan {
    pub partitions: usize,
    pub partition_size: usize,
    kv_head_ctas: usize,
    /// f32 elements of partial outputs, and of partial (max, sum) pairs, the split needs.
    pub scratch_len: usize,
    pub ml_len: usize,
}

/// How decode attention partitions long contexts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// By [`decode_partitions`] over the batch, heads and SM count.
    Auto,
    /// Exactly this many partitions (tests and benchmarks).
    Partitions(usize),
}

pub struct Kernels {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    /// Variants compiled (or read from the kernel cache) and loaded so far.
    modules: Mutex<HashMap<Variant, Arc<CudaModule>>>,
    functions: Mutex<HashMap<String, CudaFunction>>,
    pub arch: &'static str,
    pub sm_count: usize,
    pub device_name: String,
    /// Split decode's per-(sequence, head group) counts of finished partitions: zero between
    /// launches (the merging CTA resets its count), allocated once so a graph can hold them.
    /// One stream carries every launch, so launches never share them at once.
    split_done: CudaSlice<u32>,
    /// Why a variant was loaded from PTX rather than machine code, the first time one was.
    ptx_fallback: Mutex<Option<String>>,
    /// The format modules are loaded from: machine code unless PTX is asked for.
    format: Format,
}

impl Kernels {
    /// Opens device `ordinal`. Kernels are compiled per variant (storage type, head size) at
    /// first use, or all that a model needs at once by [`Self::prepare`]; NVRTC must load now.
    pub fn new(ordinal: usize) -> Result<Self, KernelError> {
        // SAFETY: only tries to dlopen the driver library by its known names.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(KernelError::NoDriver);
        }
        compile::nvrtc_version()?;
        let ctx = CudaContext::new(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        let arch = compile::arch_name(major, minor)?;
        let sm_count = ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )? as usize;
        let device_name = ctx.name()?;
        // One stream carries all work, so cudarc's per-buffer events (for ordering across
        // streams) would only cost two event creations per allocation.
        // SAFETY: every launch, copy and allocation goes through `stream` below.
        unsafe { ctx.disable_event_tracking() };
        // A stream of its own, not the legacy default stream, which cannot capture CUDA graphs.
        let stream = ctx.new_stream()?;
        let split_done = stream.alloc_zeros::<u32>(SPLIT_COUNTERS)?;
        Ok(Self {
            ctx,
            stream,
            split_done,
            ptx_fallback: Mutex::default(),
            format: match std::env::var("LLMCTL_KERNEL_FORMAT").as_deref() {
                Ok("ptx") => Format::Ptx,
                _ => Format::Cubin,
            },
            modules: Mutex::default(),
            functions: Mutex::default(),
            arch,
            sm_count,
            device_name,
        })
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Whether the device is the CPU emulator of the CUDA driver ([`crate::emulator`]), where
    /// checks too slow for a GPU may be turned on.
    pub fn is_emulated(&self) -> bool {
        self.device_name == crate::emulator::DEVICE_NAME
    }

    /// Compiles (or reads from the kernel cache) and loads every kernel a model with storage
    /// type `dtype` (an entry point suffix) and head size `head_dim` launches, so the first
    /// step pays nothing and a kernel that cannot build fails at start-up.
    pub fn prepare(&self, dtype: &'static str, head_dim: usize) -> Result<(), KernelError> {
        for program in source::ALL {
            self.module(program.variant(dtype, Some(head_dim)))?;
        }
        Ok(())
    }

    /// `variant`'s module, loaded from machine code for the device's architecture; from PTX
    /// (which the driver compiles at load) where that cannot be built or loaded, or where
    /// [`Self::with_format`] asks for it.
    fn module(&self, variant: Variant) -> Result<Arc<CudaModule>, KernelError> {
        let mut modules = self.modules.lock().expect("module cache lock");
        if let Some(m) = modules.get(&variant) {
            return Ok(m.clone());
        }
        let cubin = if self.format == Format::Ptx {
            Err("PTX asked for (LLMCTL_KERNEL_FORMAT=ptx)".to_string())
        } else {
            compile::cubin(&variant, self.arch)
                .map_err(|e| e.to_string())
                .and_then(|image| self.ctx.load_module(image).map_err(|e| e.to_string()))
        };
        let module = match cubin {
            Ok(module) => module,
            Err(why) => {
                self.ptx_fallback
                    .lock()
                    .expect("fallback lock")
                    .get_or_insert_with(|| format!("{}: {why}", variant.label()));
                self.ctx.load_module(compile::ptx(&variant, self.arch)?)?
            }
        };
        modules.insert(variant, module.clone());
        Ok(module)
    }

    /// Loads modules from `format`: machine code (the default) or PTX, which the driver
    /// compiles at load (also `LLMCTL_KERNEL_FORMAT=ptx`; for a driver that rejects NVRTC's
    /// machine code, or to compare).
    pub fn with_format(mut self, format: Format) -> Self {
        self.format = format;
        self
    }

    /// Why the first variant that fell back to PTX did (`None`: every module loaded so far is
    /// machine code).
    pub fn ptx_fallback(&self) -> Option<String> {
        self.ptx_fallback.lock().expect("fallback lock").clone()
    }

    /// Entry point `{name}_{T}` of `program` (attention: `{name}_{T}_d{head_dim}`).
    fn function<T: Dtype>(
        &self,
        program: Program,
        name: &str,
        head_dim: Option<usize>,
    ) -> Result<CudaFunction, KernelError> {
        let variant = program.variant(T::SUFFIX, head_dim);
        let name = match variant.head_dim {
            Some(d) => format!("{name}_{}_d{d}", T::SUFFIX),
            None => format!("{name}_{}", T::SUFFIX),
        };
        let mut functions = self.functions.lock().expect("function cache lock");
        if let Some(f) = functions.get(&name) {
            return Ok(f.clone());
        }
        let f = self.module(variant)?.load_function(&name)?;
        functions.insert(name, f.clone());
        Ok(f)
    }

    fn config(grid: (u32, u32, u32), block: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: grid,
            block_dim: (block, 1, 1),
            shared_mem_bytes: 0,
        }
    }

    /// K and V caches of the same length, in whole slots of `width` elements.
    fn check_caches<T>(
        what: &str,
        k_cache: &CudaSlice<T>,
        v_cache: &CudaSlice<T>,
        width: usize,
    ) -> Result<(), KernelError> {
        shape(
            k_cache.len() == v_cache.len() && width > 0 && k_cache.len().is_multiple_of(width),
            || format!("{what}: caches differ or are not whole slots of {width}"),
        )
    }

    /// Scatters `num_tokens` rows of `k` and `v` (row stride `row_stride`, `width =
    /// num_kv_heads * head_dim` elements each) into the caches by `slots` (negative: skip).
    #[allow(clippy::too_many_arguments)]
    pub fn write_kv<T: Dtype>(
        &self,
        k: &CudaView<'_, T>,
        v: &CudaView<'_, T>,
        row_stride: usize,
        width: usize,
        k_cache: &mut CudaSlice<T>,
        v_cache: &mut CudaSlice<T>,
        slots: &CudaSlice<i64>,
    ) -> Result<(), KernelError> {
        let n = slots.len();
        if n == 0 {
            return Ok(());
        }
        let need = (n - 1) * row_stride + width;
        shape(k.len() >= need && v.len() >= need, || {
            format!("write_kv: {n} rows of stride {row_stride} need {need} elements")
        })?;
        Self::check_caches("write_kv", k_cache, v_cache, width)?;
        let f = self.function::<T>(source::CACHE, "write_kv", None)?;
        let (stride, width_i) = (row_stride as i64, width as i32);
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(k)
            .arg(v)
            .arg(&stride)
            .arg(k_cache)
            .arg(v_cache)
            .arg(slots)
            .arg(&width_i);
        // SAFETY: argument types and order match `write_kv_*` in cache.cu; sizes checked above
        // (slots are the caller's to keep within the cache, as the engine's block manager does).
        unsafe { launch.launch(Self::config((n as u32, 1, 1), 256)) }?;
        Ok(())
    }

    /// [`Self::rotary_table`] on the q and k heads of each row of a fused qkv activation
    /// (`[q | k | v]` columns, row stride `row_stride`), then [`Self::write_kv`] of its rotated
    /// k and its v columns by `slots`, in one launch.
    #[allow(clippy::too_many_arguments)]
    pub fn rotary_write_kv<T: Dtype>(
        &self,
        qkv: &mut CudaSlice<T>,
        row_stride: usize,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        num_q_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
        k_cache: &mut CudaSlice<T>,
        v_cache: &mut CudaSlice<T>,
        slots: &CudaSlice<i64>,
    ) -> Result<(), KernelError> {
        let n = slots.len();
        let (half, width) = (head_dim / 2, num_kv_heads * head_dim);
        shape(
            head_dim.is_multiple_of(2)
                && half > 0
                && cos.len() == n * half
                && sin.len() == cos.len()
                && (num_q_heads + 2 * num_kv_heads) * head_dim <= row_stride
                && (n == 0
                    || qkv.len()
                        >= (n - 1) * row_stride + (num_q_heads + 2 * num_kv_heads) * head_dim),
            || {
                format!(
                    "rotary_write_kv: {n} rows of {num_q_heads} + 2 x {num_kv_heads} heads x {head_dim} in stride {row_stride}, {} cos rows",
                    cos.len() / half.max(1)
                )
            },
        )?;
        Self::check_caches("rotary_write_kv", k_cache, v_cache, width)?;
        if n == 0 {
            return Ok(());
        }
        let f = self.function::<T>(source::CACHE, "rotary_write_kv", None)?;
        let (stride, nq, nkv, d) = (
            row_stride as i64,
            num_q_heads as i32,
            num_kv_heads as i32,
            head_dim as i32,
        );
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(qkv)
            .arg(&stride)
            .arg(cos)
            .arg(sin)
            .arg(&nq)
            .arg(&nkv)
            .arg(&d)
            .arg(k_cache)
            .arg(v_cache)
            .arg(slots);
        // SAFETY: matches `rotary_write_kv_*` in cache.cu; sizes checked above (slots are the
        // caller's to keep within the cache, as for write_kv).
        unsafe { launch.launch(Self::config((n as u32, 1, 1), 128)) }?;
        Ok(())
    }

    pub fn rms_norm<T: Dtype>(
        &self,
        out: &mut CudaSlice<T>,
        x: &CudaSlice<T>,
        weight: &CudaSlice<T>,
        hidden: usize,
        eps: f32,
    ) -> Result<(), KernelError> {
        shape(
            weight.len() == hidden && x.len().is_multiple_of(hidden) && out.len() == x.len(),
            || {
                format!(
                    "rms_norm: x {} / out {} / weight {} for hidden {hidden}",
                    x.len(),
                    out.len(),
                    weight.len()
                )
            },
        )?;
        let rows = (x.len() / hidden) as u32;
        let f = self.function::<T>(source::ELEMENTWISE, "rms_norm", None)?;
        let h = hidden as i32;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(out).arg(x).arg(weight).arg(&h).arg(&eps);
        // SAFETY: matches `rms_norm_*` in elementwise.cu; sizes checked above.
        unsafe { launch.launch(Self::config((rows, 1, 1), 256)) }?;
        Ok(())
    }

    /// `residual += delta`; `out = rms_norm(residual) * weight`.
    pub fn add_rms_norm<T: Dtype>(
        &self,
        out: &mut CudaSlice<T>,
        residual: &mut CudaSlice<T>,
        delta: &CudaSlice<T>,
        weight: &CudaSlice<T>,
        hidden: usize,
        eps: f32,
    ) -> Result<(), KernelError> {
        shape(
            weight.len() == hidden
                && residual.len().is_multiple_of(hidden)
                && delta.len() == residual.len()
                && out.len() == residual.len(),
            || "add_rms_norm: shapes differ".into(),
        )?;
        let rows = (residual.len() / hidden) as u32;
        let f = self.function::<T>(source::ELEMENTWISE, "add_rms_norm", None)?;
        let h = hidden as i32;
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(out)
            .arg(residual)
            .arg(delta)
            .arg(weight)
            .arg(&h)
            .arg(&eps);
        // SAFETY: matches `add_rms_norm_*` in elementwise.cu; sizes checked above.
        unsafe { launch.launch(Self::config((rows, 1, 1), 256)) }?;
        Ok(())
    }

    /// Rotates in place the first `num_q_heads + num_kv_heads` heads of each of the
    /// `positions.len()` rows (stride `row_stride`) of `qk`.
    #[allow(clippy::too_many_arguments)]
    pub fn rotary<T: Dtype>(
        &self,
        qk: &mut CudaSlice<T>,
        row_stride: usize,
        positions: &CudaSlice<i32>,
        inv_freq: &CudaSlice<f32>,
        num_q_heads: usize,
        num_kv_heads: usize,
        head_dim: usize,
    ) -> Result<(), KernelError> {
        let n = positions.len();
        let width = (num_q_heads + num_kv_heads) * head_dim;
        shape(
            head_dim.is_multiple_of(2)
                && inv_freq.len() == head_dim / 2
                && width <= row_stride
                && (n == 0 || qk.len() >= (n - 1) * row_stride + width),
            || {
                format!(
                    "rotary: {n} rows of {width} in stride {row_stride}, inv_freq {}",
                    inv_freq.len()
                )
            },
        )?;
        if n == 0 {
            return Ok(());
        }
        let f = self.function::<T>(source::ELEMENTWISE, "rotary", None)?;
        let (stride, nq, nkv, d) = (
            row_stride as i64,
            num_q_heads as i32,
            num_kv_heads as i32,
            head_dim as i32,
        );
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(qk)
            .arg(&stride)
            .arg(positions)
            .arg(inv_freq)
            .arg(&nq)
            .arg(&nkv)
            .arg(&d);
        // SAFETY: matches `rotary_*` in elementwise.cu; sizes checked above.
        unsafe { launch.launch(Self::config((n as u32, 1, 1), 128)) }?;
        Ok(())
    }

    /// Rotates in place the first `heads` heads of each row (stride `row_stride`) of `qk` by
    /// per-token angles given as cos and sin tables (`[num_tokens, head_dim / 2]`).
    pub fn rotary_table<T: Dtype>(
        &self,
        qk: &mut CudaSlice<T>,
        row_stride: usize,
        cos: &CudaSlice<f32>,
        sin: &CudaSlice<f32>,
        heads: usize,
        head_dim: usize,
    ) -> Result<(), KernelError> {
        let half = head_dim / 2;
        let n = cos.len() / half.max(1);
        shape(
            head_dim.is_multiple_of(2)
                && half > 0
                && cos.len() == n * half
                && sin.len() == cos.len()
                && heads * head_dim <= row_stride
                && (n == 0 || qk.len() >= (n - 1) * row_stride + heads * head_dim),
            || {
                format!(
                    "rotary_table: {n} rows of {heads} heads x {head_dim} in stride {row_stride}"
                )
            },
        )?;
        if n == 0 {
            return Ok(());
        }
        let f = self.function::<T>(source::ELEMENTWISE, "rotary_table", None)?;
        let (stride, h, d) = (row_stride as i64, heads as i32, head_dim as i32);
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(qk)
            .arg(&stride)
            .arg(cos)
            .arg(sin)
            .arg(&h)
            .arg(&d);
        // SAFETY: matches `rotary_table_*` in elementwise.cu; sizes checked above.
        unsafe { launch.launch(Self::config((n as u32, 1, 1), 128)) }?;
        Ok(())
    }

    /// `x[r] += bias` for every row of `x` (`cols = bias.len()`).
    pub fn add_bias<T: Dtype>(
        &self,
        x: &mut CudaSlice<T>,
        bias: &CudaSlice<T>,
    ) -> Result<(), KernelError> {
        let cols = bias.len();
        shape(cols > 0 && x.len().is_multiple_of(cols), || {
            format!("add_bias: {} elements are not rows of {cols}", x.len())
        })?;
        let rows = (x.len() / cols) as u32;
        if rows == 0 {
            return Ok(());
        }
        let f = self.function::<T>(source::ELEMENTWISE, "add_bias", None)?;
        let c = cols as i32;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(x).arg(bias).arg(&c);
        // SAFETY: matches `add_bias_*` in elementwise.cu; sizes checked above.
        unsafe { launch.launch(Self::config((rows, cols.div_ceil(256) as u32, 1), 256)) }?;
        Ok(())
    }

    /// `out[r] = silu(gate) * up` for rows `[gate | up]` of `gate_up`.
    pub fn silu_mul<T: Dtype>(
        &self,
        out: &mut CudaSlice<T>,
        gate_up: &CudaSlice<T>,
        inter: usize,
    ) -> Result<(), KernelError> {
        shape(
            inter > 0 && gate_up.len().is_multiple_of(2 * inter) && out.len() * 2 == gate_up.len(),
            || "silu_mul: shapes differ".into(),
        )?;
        let rows = (out.len() / inter) as u32;
        let f = self.function::<T>(source::ELEMENTWISE, "silu_mul", None)?;
        let i = inter as i32;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(out).arg(gate_up).arg(&i);
        // SAFETY: matches `silu_mul_*` in elementwise.cu; sizes checked above.
        unsafe { launch.launch(Self::config((rows, inter.div_ceil(256) as u32, 1), 256)) }?;
        Ok(())
    }

    /// `residual += x · wᵀ` for the rows of `x` (each `k` wide, at most [`GEMV_MAX_ROWS`] of
    /// them), `w` being `[n, k]` and `residual` `[rows, n]`: a projection and the residual add
    /// after it in one pass over `w` (gemv.cu).
    pub fn gemv_add<T: Dtype>(
        &self,
        residual: &mut CudaSlice<T>,
        x: &CudaSlice<T>,
        w: &CudaSlice<T>,
        k: usize,
    ) -> Result<(), KernelError> {
        let (rows, n) = Self::gemv_shape::<T>("gemv_add", x.len(), w.len(), k)?;
        shape(residual.len() == rows * n, || {
            format!("gemv_add: residual of {} for {rows} x {n}", residual.len())
        })?;
        let f = self.function::<T>(source::GEMV, "gemv_add", None)?;
        let (r, n, k) = (rows as i32, n as i32, k as i32);
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(residual).arg(x).arg(w).arg(&r).arg(&n).arg(&k);
        // SAFETY: matches `gemv_add_*` in gemv.cu; sizes checked above.
        unsafe { launch.launch(Self::gemv_config(n as usize, false)) }?;
        Ok(())
    }

    /// `out = rms_norm(residual) * norm · wᵀ` for the rows of `residual` (each `k` wide, at
    /// most [`GEMV_MAX_ROWS`]), `w` being `[n, k]`, then what `then` says: stored as is,
    /// through SiLU-and-mul, or rotated with its K/V cached. The input norm, the projection and
    /// what follows it in one pass over `w` (gemv.cu).
    #[allow(clippy::too_many_arguments)]
    pub fn gemv_norm<T: Dtype>(
        &self,
        out: &mut CudaSlice<T>,
        residual: &CudaSlice<T>,
        norm: &CudaSlice<T>,
        eps: f32,
        w: &CudaSlice<T>,
        k: usize,
        then: GemvThen<'_, T>,
    ) -> Result<(), KernelError> {
        let (rows, n) = Self::gemv_shape::<T>("gemv_norm", residual.len(), w.len(), k)?;
        let gated = matches!(then, GemvThen::SiluMul);
        let halves = gated || matches!(then, GemvThen::Rotary(_));
        let width = if gated { n / 2 } else { n };
        shape(
            norm.len() == k && (!gated || n.is_multiple_of(2)) && out.len() == rows * width,
            || {
                format!(
                    "gemv_norm: norm of {}, output of {} for {rows} x {width} (gated: {gated})",
                    norm.len(),
                    out.len()
                )
            },
        )?;
        let name = match then {
            GemvThen::Store => "gemv_norm",
            GemvThen::SiluMul => "gemv_norm_gated",
            GemvThen::Rotary(_) => "gemv_norm_rope",
        };
        let f = self.function::<T>(source::GEMV, name, None)?;
        let (r, n_, k_) = (rows as i32, n as i32, k as i32);
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(out)
            .arg(residual)
            .arg(norm)
            .arg(&eps)
            .arg(w)
            .arg(&r)
            .arg(&n_)
            .arg(&k_);
        let heads;
        if let GemvThen::Rotary(rope) = then {
            let (nq, nkv, d) = (rope.num_q_heads, rope.num_kv_heads, rope.head_dim);
            let half = d / 2;
            shape(
                d.is_multiple_of(2)
                    && half > 0
                    && n == (nq + 2 * nkv) * d
                    && rope.cos.len() == rows * half
                    && rope.sin.len() == rope.cos.len()
                    && rope.slots.len() == rows,
                || {
                    format!(
                        "gemv_norm_rope: {n} outputs for {nq} + 2 x {nkv} heads x {d}, {} cos and {} slots for {rows} rows",
                        rope.cos.len(),
                        rope.slots.len()
                    )
                },
            )?;
            Self::check_caches("gemv_norm_rope", rope.k_cache, rope.v_cache, nkv * d)?;
            heads = [nq as i32, nkv as i32, d as i32];
            launch
                .arg(rope.cos)
                .arg(rope.sin)
                .arg(&heads[0])
                .arg(&heads[1])
                .arg(&heads[2])
                .arg(rope.k_cache)
                .arg(rope.v_cache)
                .arg(rope.slots);
        }
        // SAFETY: matches `gemv_norm_*`, `gemv_norm_gated_*` and `gemv_norm_rope_*` in gemv.cu;
        // sizes checked above (slots are the caller's to keep within the cache, as for
        // write_kv).
        unsafe { launch.launch(Self::gemv_config(n, halves)) }?;
        Ok(())
    }

    /// `(rows, n)` of a GEMV over `x_len` input and `w_len` weight elements, rows `k` wide in
    /// whole 16-byte chunks.
    fn gemv_shape<T>(
        what: &str,
        x_len: usize,
        w_len: usize,
        k: usize,
    ) -> Result<(usize, usize), KernelError> {
        let vec = 16 / std::mem::size_of::<T>();
        let rows = x_len.checked_div(k).unwrap_or(0);
        shape(
            k > 0
                && k.is_multiple_of(vec)
                && x_len == rows * k
                && (1..=GEMV_MAX_ROWS).contains(&rows)
                && w_len.is_multiple_of(k)
                && w_len > 0,
            || {
                format!(
                    "{what}: input of {x_len} and weight of {w_len} in rows of {k} (a multiple of \
                     {vec}; 1 to {GEMV_MAX_ROWS} input rows)"
                )
            },
        )?;
        Ok((rows, w_len / k))
    }

    /// A warp per pair of weight rows (gemv.cu); `halves`: pairs split the rows in halves
    /// (gated, rope) rather than taking neighbours, so an odd last row has no pair.
    fn gemv_config(n: usize, halves: bool) -> LaunchConfig {
        let pairs = if halves { n / 2 } else { n.div_ceil(2) };
        Self::config(
            (pairs.div_ceil(GEMV_WARPS) as u32, 1, 1),
            32 * GEMV_WARPS as u32,
        )
    }

    /// Rows `ids` of `table` (`hidden` wide), in order; also gathers activation rows.
    pub fn embed<T: Dtype>(
        &self,
        out: &mut CudaSlice<T>,
        table: &CudaSlice<T>,
        ids: &CudaSlice<u32>,
        hidden: usize,
    ) -> Result<(), KernelError> {
        shape(
            table.len().is_multiple_of(hidden) && out.len() == ids.len() * hidden,
            || "embed: shapes differ".into(),
        )?;
        if ids.is_empty() {
            return Ok(());
        }
        let f = self.function::<T>(source::ELEMENTWISE, "embed", None)?;
        let (vocab, h) = ((table.len() / hidden) as i32, hidden as i32);
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(out).arg(table).arg(ids).arg(&vocab).arg(&h);
        // SAFETY: matches `embed_*` in elementwise.cu; sizes checked above.
        unsafe { launch.launch(Self::config((ids.len() as u32, 1, 1), 256)) }?;
        Ok(())
    }

    pub fn argmax<T: Dtype>(
        &self,
        logits: &CudaSlice<T>,
        vocab: usize,
        out: &mut CudaSlice<i32>,
    ) -> Result<(), KernelError> {
        shape(vocab > 0 && logits.len() == out.len() * vocab, || {
            "argmax: shapes differ".into()
        })?;
        let f = self.function::<T>(source::SAMPLING, "argmax", None)?;
        let (v, rows) = (vocab as i32, out.len() as u32);
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(logits).arg(&v).arg(out);
        // SAFETY: matches `argmax_*` in sampling.cu; sizes checked above.
        unsafe { launch.launch(Self::config((rows, 1, 1), 1024)) }?;
        Ok(())
    }

    pub fn top_k<T: Dtype>(
        &self,
        logits: &CudaSlice<T>,
        vocab: usize,
        k: usize,
        values: &mut CudaSlice<f32>,
        ids: &mut CudaSlice<i32>,
    ) -> Result<(), KernelError> {
        let rows = logits.len() / vocab.max(1);
        shape(
            vocab > 0
                && k > 0
                && logits.len() == rows * vocab
                && values.len() == rows * k
                && ids.len() == rows * k,
            || "top_k: shapes differ".into(),
        )?;
        let f = self.function::<T>(source::SAMPLING, "top_k", None)?;
        let (v, kk) = (vocab as i32, k as i32);
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(logits).arg(&v).arg(&kk).arg(values).arg(ids);
        // SAFETY: matches `top_k_*` in sampling.cu; sizes checked above.
        unsafe { launch.launch(Self::config((rows as u32, 1, 1), 1024)) }?;
        Ok(())
    }

    /// Row `r`'s token in `out[r]` for the first `out.len()` rows of `logits` (`vocab`
    /// wide): the argmax where `temperature[r]` is 0, else a draw from the row's softmax at
    /// that temperature with the uniform `u[r]`, walking the vocabulary in token order
    /// (sampling.cu). The host sampler's untruncated draw, found where the logits are.
    pub fn softmax_draw<T: Dtype>(
        &self,
        logits: &CudaSlice<T>,
        vocab: usize,
        temperature: &CudaSlice<f32>,
        u: &CudaSlice<f64>,
        out: &mut CudaSlice<i32>,
    ) -> Result<(), KernelError> {
        let rows = out.len();
        shape(
            vocab > 0
                && vocab <= SOFTMAX_DRAW_MAX_VOCAB
                && logits.len() >= rows * vocab
                && logits.len().is_multiple_of(vocab)
                && temperature.len() == rows
                && u.len() == rows,
            || {
                format!(
                    "softmax_draw: {} logits in rows of {vocab} (at most \
                     {SOFTMAX_DRAW_MAX_VOCAB}), {} temperatures and {} uniforms for {rows} rows",
                    logits.len(),
                    temperature.len(),
                    u.len()
                )
            },
        )?;
        if rows == 0 {
            return Ok(());
        }
        let f = self.function::<T>(source::SAMPLING, "softmax_draw", None)?;
        let v = vocab as i32;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(logits).arg(&v).arg(temperature).arg(u).arg(out);
        // SAFETY: matches `softmax_draw_*` in sampling.cu; sizes checked above.
        unsafe { launch.launch(Self::config((rows as u32, 1, 1), 1024)) }?;
        Ok(())
    }

    /// Row `r`'s softmax mass at `temperature[r]` (> 0) relative to its largest logit,
    /// `sum exp((l - max) / t)`, into `mass[r]` for the first `mass.len()` rows of `logits`
    /// (`vocab` wide): what a top-p or min-p cut among a row's best candidates needs to be a
    /// cut over the whole vocabulary (sampling.cu).
    pub fn softmax_mass<T: Dtype>(
        &self,
        logits: &CudaSlice<T>,
        vocab: usize,
        temperature: &CudaSlice<f32>,
        mass: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        let rows = mass.len();
        shape(
            vocab > 0
                && logits.len() >= rows * vocab
                && logits.len().is_multiple_of(vocab)
                && temperature.len() == rows,
            || {
                format!(
                    "softmax_mass: {} logits in rows of {vocab}, {} temperatures for {rows} rows",
                    logits.len(),
                    temperature.len()
                )
            },
        )?;
        if rows == 0 {
            return Ok(());
        }
        let f = self.function::<T>(source::SAMPLING, "softmax_mass", None)?;
        let v = vocab as i32;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(logits).arg(&v).arg(temperature).arg(mass);
        // SAFETY: matches `softmax_mass_*` in sampling.cu; sizes checked above.
        unsafe { launch.launch(Self::config((rows as u32, 1, 1), 1024)) }?;
        Ok(())
    }

    /// Applies `edits` to the rows of `logits` (`vocab` wide) in place, each (row, token) at
    /// most once (sampling.cu); edits naming a row or token outside `logits` are skipped.
    pub fn edit_logits<T: Dtype>(
        &self,
        logits: &mut CudaSlice<T>,
        vocab: usize,
        edits: &CudaSlice<LogitEdit>,
    ) -> Result<(), KernelError> {
        shape(vocab > 0 && logits.len().is_multiple_of(vocab), || {
            format!("edit_logits: {} logits in rows of {vocab}", logits.len())
        })?;
        if edits.is_empty() {
            return Ok(());
        }
        let f = self.function::<T>(source::SAMPLING, "edit_logits", None)?;
        let (v, rows, n) = (
            vocab as i32,
            (logits.len() / vocab) as i32,
            edits.len() as i32,
        );
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(logits).arg(&v).arg(&rows).arg(edits).arg(&n);
        // SAFETY: matches `edit_logits_*` in sampling.cu, which skips edits outside the rows.
        unsafe { launch.launch(Self::config((edits.len().div_ceil(256) as u32, 1, 1), 256)) }?;
        Ok(())
    }

    fn check_attention<T>(
        cache: &PagedCache<'_, T>,
        num_seqs: usize,
        num_q_heads: usize,
    ) -> Result<(), KernelError> {
        let d = cache.head_dim;
        shape(source::HEAD_DIMS.contains(&d), || {
            format!(
                "attention: head_dim {d} is not one of {:?}",
                source::HEAD_DIMS
            )
        })?;
        shape(matches!(cache.block_size, 16 | 32), || {
            format!("attention: block_size {} is not 16 or 32", cache.block_size)
        })?;
        shape(
            cache.num_kv_heads > 0 && num_q_heads.is_multiple_of(cache.num_kv_heads),
            || {
                format!(
                    "attention: {num_q_heads} query heads over {} KV heads",
                    cache.num_kv_heads
                )
            },
        )?;
        shape(
            cache.block_tables.len() == num_seqs * cache.max_blocks
                && cache.context_lens.len() == num_seqs
                && cache.k.len() == cache.v.len()
                && cache
                    .k
                    .len()
                    .is_multiple_of(cache.block_size * cache.num_kv_heads * d),
            || "attention: block tables, context lengths or caches have the wrong size".into(),
        )
    }

    /// How decode attention over `num_seqs` sequences of at most `max_context` tokens splits
    /// the context, and the f32 scratch that split needs.
    pub fn decode_plan(
        &self,
        num_seqs: usize,
        num_q_heads: usize,
        cache: &PagedCache<'_, impl Sized>,
        max_context: usize,
        split: Split,
    ) -> DecodePlan {
        let group = num_q_heads / cache.num_kv_heads.max(1);
        let ctas = cache.num_kv_heads * group.div_ceil(DECODE_MAX_GROUP);
        let partitions = match split {
            Split::Auto => decode_partitions(num_seqs, ctas, max_context, self.sm_count).0,
            Split::Partitions(p) => p,
        };
        // The merge weighs at most MERGE_MAX_PARTS partitions (attention.cu).
        let partitions = partitions.clamp(1, DECODE_MAX_PARTITIONS);
        let partition_size = max_context.max(1).div_ceil(partitions);
        let slots = num_seqs * num_q_heads * partitions;
        let (scratch_len, ml_len) = if partitions > 1 {
            (slots * cache.head_dim, slots * 2)
        } else {
            (1, 1)
        };
        DecodePlan {
            partitions,
            partition_size,
            kv_head_ctas: ctas,
            scratch_len,
            ml_len,
        }
    }

    /// Decode attention, one query row per sequence (`q` rows of stride `q_stride`, heads
    /// contiguous); `out` is `[num_seqs, num_q_heads * head_dim]`. `max_context` bounds the
    /// context lengths (it sizes the partitions). Allocates the split's scratch; returns the
    /// partitions used.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention<T: Dtype>(
        &self,
        out: &mut CudaSlice<T>,
        q: &CudaView<'_, T>,
        q_stride: usize,
        cache: &PagedCache<'_, T>,
        num_q_heads: usize,
        max_context: usize,
        scale: f32,
        split: Split,
    ) -> Result<usize, KernelError> {
        let num_seqs = cache.context_lens.len();
        let plan = self.decode_plan(num_seqs, num_q_heads, cache, max_context, split);
        let mut part_out = self.stream.alloc_zeros::<f32>(plan.scratch_len)?;
        let mut part_ml = self.stream.alloc_zeros::<f32>(plan.ml_len)?;
        self.decode_attention_planned(
            out,
            q,
            q_stride,
            cache,
            num_q_heads,
            scale,
            &plan,
            &mut part_out,
            &mut part_ml,
        )?;
        Ok(plan.partitions)
    }

    /// [`Self::decode_attention`] by a plan from [`Self::decode_plan`], with the caller's
    /// scratch (at least `plan.scratch_len` and `plan.ml_len` floats; every element the
    /// reduction reads is written first): nothing is allocated, so a CUDA graph can hold it.
    #[allow(clippy::too_many_arguments)]
    pub fn decode_attention_planned<T: Dtype>(
        &self,
        out: &mut CudaSlice<T>,
        q: &CudaView<'_, T>,
        q_stride: usize,
        cache: &PagedCache<'_, T>,
        num_q_heads: usize,
        scale: f32,
        plan: &DecodePlan,
        part_out: &mut CudaSlice<f32>,
        part_ml: &mut CudaSlice<f32>,
    ) -> Result<(), KernelError> {
        let num_seqs = cache.context_lens.len();
        let d = cache.head_dim;
        Self::check_attention(cache, num_seqs, num_q_heads)?;
        shape(out.len() == num_seqs * num_q_heads * d, || {
            "decode: out has the wrong size".into()
        })?;
        shape(
            num_seqs == 0 || q.len() >= (num_seqs - 1) * q_stride + num_q_heads * d,
            || "decode: q is too small".into(),
        )?;
        // The plan is checked against this launch, not only against itself: a plan made for
        // another batch or head count would send the split's writes past its scratch.
        let parts = plan.partitions;
        let group = num_q_heads / cache.num_kv_heads.max(1);
        let slots = num_seqs * num_q_heads * parts;
        shape(
            (1..=DECODE_MAX_PARTITIONS).contains(&parts)
                && plan.kv_head_ctas == cache.num_kv_heads * group.div_ceil(DECODE_MAX_GROUP)
                && (parts == 1 || (part_out.len() >= slots * d && part_ml.len() >= slots * 2)),
            || {
                format!(
                    "decode: a plan of {parts} partitions and {} head-group CTAs does not fit \
                     {num_seqs} sequences x {num_q_heads} heads with scratch of {} and {}",
                    plan.kv_head_ctas,
                    part_out.len(),
                    part_ml.len()
                )
            },
        )?;
        shape(
            plan.partitions == 1 || num_seqs * plan.kv_head_ctas <= SPLIT_COUNTERS,
            || {
                format!(
                    "decode: a split of {} sequences x {} head groups has more than {SPLIT_COUNTERS} counters",
                    num_seqs, plan.kv_head_ctas
                )
            },
        )?;
        if num_seqs == 0 {
            return Ok(());
        }
        let f = self.function::<T>(source::ATTENTION, "paged_attention_decode", Some(d))?;
        let (stride, max_blocks, bs, nkv, nq, psize) = (
            q_stride as i64,
            cache.max_blocks as i32,
            cache.block_size as i32,
            cache.num_kv_heads as i32,
            num_q_heads as i32,
            plan.partition_size as i32,
        );
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(&mut *out)
            .arg(&mut *part_out)
            .arg(&mut *part_ml)
            .arg(&self.split_done)
            .arg(q)
            .arg(&stride)
            .arg(cache.k)
            .arg(cache.v)
            .arg(cache.block_tables)
            .arg(&max_blocks)
            .arg(&bs)
            .arg(&nkv)
            .arg(cache.context_lens)
            .arg(&nq)
            .arg(&psize)
            .arg(&scale);
        // SAFETY: matches `paged_attention_decode_*` in attention.cu; shapes checked above;
        // block tables must name blocks inside the cache (the engine's invariant).
        unsafe {
            launch.launch(Self::config(
                (plan.kv_head_ctas as u32, num_seqs as u32, parts as u32),
                128,
            ))
        }?;
        Ok(())
    }

    /// Causal prefill attention for packed sequences: sequence `s` has query rows
    /// `cu_q[s]..cu_q[s + 1]` of `q` (the last ones of its context). `out` is
    /// `[total_rows, num_q_heads * head_dim]`. `max_q_len` bounds the query lengths.
    #[allow(clippy::too_many_arguments)]
    pub fn prefill_attention<T: Dtype>(
        &self,
        out: &mut CudaSlice<T>,
        q: &CudaView<'_, T>,
        q_stride: usize,
        cache: &PagedCache<'_, T>,
        cu_q: &CudaSlice<i32>,
        num_q_heads: usize,
        max_q_len: usize,
        scale: f32,
    ) -> Result<(), KernelError> {
        let num_seqs = cache.context_lens.len();
        let d = cache.head_dim;
        Self::check_attention(cache, num_seqs, num_q_heads)?;
        shape(cu_q.len() == num_seqs + 1, || {
            "prefill: cu_q needs num_seqs + 1 entries".into()
        })?;
        let rows = out.len() / (num_q_heads * d);
        shape(out.len() == rows * num_q_heads * d, || {
            "prefill: out has the wrong size".into()
        })?;
        shape(
            rows == 0 || q.len() >= (rows - 1) * q_stride + num_q_heads * d,
            || "prefill: q is too small".into(),
        )?;
        if num_seqs == 0 || max_q_len == 0 {
            return Ok(());
        }
        let f = self.function::<T>(source::ATTENTION, "attention_prefill", Some(d))?;
        let (stride, max_blocks, bs, nkv, nq) = (
            q_stride as i64,
            cache.max_blocks as i32,
            cache.block_size as i32,
            cache.num_kv_heads as i32,
            num_q_heads as i32,
        );
        let mut launch = self.stream.launch_builder(&f);
        launch
            .arg(out)
            .arg(q)
            .arg(&stride)
            .arg(cache.k)
            .arg(cache.v)
            .arg(cache.block_tables)
            .arg(&max_blocks)
            .arg(&bs)
            .arg(&nkv)
            .arg(cu_q)
            .arg(cache.context_lens)
            .arg(&nq)
            .arg(&scale);
        // attention.cu's `prefill` (f32, FMA): 16 query rows of one head per CTA. `prefill_mma`
        // (bf16 and f16, tensor cores): 64 (token, query head) rows of one KV head's group.
        let grid = if T::SUFFIX == "f32" {
            (
                max_q_len.div_ceil(16) as u32,
                num_q_heads as u32,
                num_seqs as u32,
            )
        } else {
            let group = num_q_heads / cache.num_kv_heads;
            (
                (max_q_len * group).div_ceil(64) as u32,
                cache.num_kv_heads as u32,
                num_seqs as u32,
            )
        };
        // SAFETY: matches `attention_prefill_*` in attention.cu; shapes checked above; cu_q and
        // context lengths must describe the batch (query lengths at most max_q_len).
        unsafe { launch.launch(Self::config(grid, 128)) }?;
        Ok(())
    }
}
