//! The CUDA backend: the same ops as the CPU backend, on one GPU. Weights and activations are
//! stored in `T` (bf16, or f16 for f16 models); GEMMs go through cuBLAS (`T` inputs, f32
//! accumulation); everything else through llmctl's kernels (`llmctl-kernels`). The KV cache is
//! the shared paged layout in device memory. Logits come back to the host as f32 for the
//! sampler.
//!
//! A step costs few driver calls:
//! - its inputs (tokens, rotary rows, slots, block tables, lengths, logits rows) go to the
//!   device in one copy ([`Backend::prepare_step`]), not once per layer;
//! - activations come from a [`Pool`] of device buffers kept by size class, so a steady stream
//!   of steps allocates nothing from the driver;
//! - a decode step of up to [`MAX_GRAPH_BATCH`] sequences is padded to a batch-size bucket and
//!   replayed from a CUDA graph recorded the first time that bucket (and block-table width)
//!   came: one launch for the whole forward pass instead of ~10 per layer. Recording relies on
//!   the trait's rule that no activation outlives its step: a graph's buffers are pool memory
//!   nothing live sits in while it replays. Padding rows read block 0 and write nothing.
//!
//! The trait's ops are infallible: a CUDA error in the middle of a step (a lost device, an
//! illegal address) cannot be recovered from by the engine, so it panics with the error; the
//! worker's engine task then fails its requests and the process exits for the controller to
//! replace. Everything that can be checked before a step (driver, device, kernel compilation,
//! memory for weights and cache) is checked in [`CudaBackend::new`] and at load, as errors. A
//! graph that cannot be recorded is not fatal: the step runs op by op and graphs stay off.

use std::collections::HashMap;
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, sys::cublasOperation_t};
use cudarc::driver::sys::{CUdeviceptr, CUgraphInstantiate_flags, CUresult, CUstreamCaptureMode};
use cudarc::driver::{CudaGraph, CudaSlice, CudaStream, DeviceRepr, DriverError, result};
use llmctl_kernels::cuda::{Dtype, GemvThen, KernelError, Kernels, PagedCache, RotaryKv, Split};
use rayon::prelude::*;

use super::{
    Backend, KvLayout, LogitEdit, QkvShape, ReplayCounts, RopeRows, StepBatch, SublayerInput,
    sublayer_input_op_by_op,
};
use crate::model::ModelError;
use crate::model::config::ModelConfig;
use crate::model::weights::{TensorView, WeightDtype, fuse_f32, fused_shape};

/// The largest decode batch replayed from a CUDA graph; bigger batches run op by op, where
/// launch overhead is a small share of the step.
pub const MAX_GRAPH_BATCH: usize = 256;

/// The most rows a sublayer input runs as fused GEMVs (the kernels take up to
/// [`llmctl_kernels::cuda::GEMV_MAX_ROWS`]).
/// On an H200 the fused kernels beat cuBLAS at one row (0.62–0.99x its time at every Llama 1B
/// and 8B projection) and lose at four (1.06–1.87x); `perf/results/2026-12-04-gpu-h200.md`.
pub const FUSED_GEMV_MAX_ROWS: usize = 1;

/// Batch sizes a graph is recorded for; a decode step is padded up to the next one.
const GRAPH_BUCKETS: [usize; 13] = [1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256];

/// cuBLAS's workspace, set once so that a recorded GEMM never allocates (32 MiB, what cuBLAS
/// asks for on Hopper).
const CUBLAS_WORKSPACE: usize = 32 << 20;

/// Device memory for activations and step inputs. A dropped buffer goes back to a free list by
/// size class (powers of two in quarter steps, so at most a quarter is wasted) and is handed out
/// again, so steps of a shape seen before allocate nothing from the driver. Memory returns to
/// the driver only when an allocation fails, and then every graph recorded before is stale.
struct Pool {
    stream: Arc<CudaStream>,
    free: Mutex<HashMap<usize, Vec<CUdeviceptr>>>,
    /// Bumped each time cached memory goes back to the driver.
    generation: AtomicU64,
}

impl Pool {
    fn class(bytes: usize) -> usize {
        let b = bytes.max(1).next_multiple_of(256);
        let pow = 1usize << (usize::BITS - 1 - b.leading_zeros());
        b.next_multiple_of((pow / 4).max(256))
    }

    fn take(&self, bytes: usize) -> Result<(CUdeviceptr, usize), DriverError> {
        let class = Self::class(bytes);
        let cached = self
            .free
            .lock()
            .expect("pool lock")
            .get_mut(&class)
            .and_then(Vec::pop);
        if let Some(ptr) = cached {
            return Ok((ptr, class));
        }
        self.stream.context().bind_to_thread()?;
        // SAFETY: a plain device allocation, owned by the pool from here on.
        match unsafe { result::malloc_sync(class) } {
            Ok(ptr) => Ok((ptr, class)),
            Err(DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY)) => {
                self.release();
                // SAFETY: as above.
                unsafe { result::malloc_sync(class) }.map(|ptr| (ptr, class))
            }
            Err(e) => Err(e),
        }
    }

    fn give(&self, ptr: CUdeviceptr, class: usize) {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        free.entry(class).or_default().push(ptr);
    }

    /// Returns every cached buffer to the driver (after the queued work that may use them).
    fn release(&self) {
        // Fails while a graph is being recorded; the bumped generation then discards it.
        let _ = self.stream.synchronize();
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        for ptr in free.drain().flat_map(|(_, ptrs)| ptrs) {
            // SAFETY: a pool buffer nothing holds (it is on the free list).
            let _ = unsafe { result::free_sync(ptr) };
        }
        self.generation.fetch_add(1, Ordering::SeqCst);
    }
}

/// Who frees a [`DeviceBuf`]'s memory.
enum Home {
    /// The buffer itself (weights, the KV cache, graph inputs and outputs).
    Owned,
    /// The pool, which takes it back (`class` bytes).
    Pool(Arc<Pool>, usize),
    /// Someone else: this is a view into memory another buffer owns.
    Borrowed,
}

/// Device memory as the kernels take it (a `CudaSlice`), freed according to its [`Home`].
pub struct DeviceBuf<T> {
    slice: ManuallyDrop<CudaSlice<T>>,
    ptr: CUdeviceptr,
    home: Home,
}

impl<T> DeviceBuf<T> {
    fn owned(slice: CudaSlice<T>) -> Self {
        let ptr = {
            use cudarc::driver::DevicePtr;
            let (ptr, _sync) = slice.device_ptr(slice.stream());
            ptr
        };
        Self {
            slice: ManuallyDrop::new(slice),
            ptr,
            home: Home::Owned,
        }
    }

    /// # Safety
    /// `ptr` must point at `len` elements of `T` in device memory that `home` accounts for.
    unsafe fn from_raw(stream: &Arc<CudaStream>, ptr: CUdeviceptr, len: usize, home: Home) -> Self {
        Self {
            // SAFETY: per this function's contract; the slice is never freed by cudarc (Drop).
            slice: ManuallyDrop::new(unsafe { stream.upgrade_device_ptr(ptr, len) }),
            ptr,
            home,
        }
    }

    /// `len` elements of `U` at byte `offset`, owned by `self` (which must outlive the view).
    fn view<U>(&self, offset: usize, len: usize) -> DeviceBuf<U> {
        // SAFETY: the callers lay views out inside the buffer (see `Packed`).
        unsafe {
            DeviceBuf::from_raw(
                self.slice.stream(),
                self.ptr + offset as u64,
                len,
                Home::Borrowed,
            )
        }
    }
}

impl<T> Deref for DeviceBuf<T> {
    type Target = CudaSlice<T>;
    fn deref(&self) -> &CudaSlice<T> {
        &self.slice
    }
}

impl<T> DerefMut for DeviceBuf<T> {
    fn deref_mut(&mut self) -> &mut CudaSlice<T> {
        &mut self.slice
    }
}

impl<T> Drop for DeviceBuf<T> {
    fn drop(&mut self) {
        // SAFETY: `slice` is not used after this.
        let slice = unsafe { ManuallyDrop::take(&mut self.slice) };
        match &self.home {
            Home::Owned => drop(slice),
            Home::Pool(pool, class) => {
                slice.leak();
                pool.give(self.ptr, *class);
            }
            Home::Borrowed => {
                slice.leak();
            }
        }
    }
}

/// A row-major matrix in device memory.
pub struct GpuMatrix<T> {
    pub data: DeviceBuf<T>,
    pub rows: usize,
    pub cols: usize,
}

impl<T> GpuMatrix<T> {
    /// The first `rows` rows, viewed (`self` must outlive the view).
    fn first_rows(&self, rows: usize) -> GpuMatrix<T> {
        GpuMatrix {
            data: self.data.view(0, rows * self.cols),
            rows,
            cols: self.cols,
        }
    }
}

/// One K and one V cache per layer, in the shared paged layout.
pub struct GpuKvCache<T> {
    /// Tells caches apart: a graph recorded on one cache replays only on that one.
    id: u64,
    pub layout: KvLayout,
    pub k: Vec<CudaSlice<T>>,
    pub v: Vec<CudaSlice<T>>,
}

/// A step's inputs on the device, all in one buffer copied at once, as typed views.
pub struct GpuStep {
    tokens: DeviceBuf<u32>,
    cos: DeviceBuf<f32>,
    sin: DeviceBuf<f32>,
    slots: DeviceBuf<i64>,
    /// `[num_seqs, max_blocks]`, zero-padded.
    tables: DeviceBuf<i32>,
    max_blocks: usize,
    context_lens: DeviceBuf<i32>,
    /// Query row offsets, `num_seqs + 1` entries.
    cu_q: DeviceBuf<i32>,
    logits_rows: DeviceBuf<u32>,
    /// The logits rows are every row, in order (a decode step, padded or not).
    every_row_logits: bool,
    /// One new token per sequence, in order: the decode kernel's case.
    decode: bool,
    /// The longest context; sizes decode's split (a graph's split is sized by its block
    /// tables' width instead, so that it holds for every step the graph replays).
    max_context: usize,
    max_q: usize,
    /// The logits rows asked for (a padded step computes more).
    asked_rows: usize,
    graph: Option<GraphKey>,
    /// Holds the memory the views above point into (last, so it is dropped last).
    _inputs: DeviceBuf<u8>,
}

/// What a recorded decode graph is specific to: the padded batch and the block-table width
/// (a power of two, which also fixes decode's split).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct GraphKey {
    batch: usize,
    max_blocks: usize,
}

/// A recorded graph, with what its recorded addresses point into. Used only under
/// [`CudaBackend::graphs`]' lock.
struct Recorded {
    graph: CudaGraph,
    /// The pool's generation when recorded.
    generation: u64,
    /// The KV cache it reads and writes.
    cache: u64,
}
// SAFETY: a CUDA graph may be used from any thread as long as calls on it are serialised,
// which the mutex around every `Recorded` does.
unsafe impl Send for Recorded {}

struct GraphEntry {
    /// The inputs' buffer: every replay reads its inputs here, at the recorded addresses.
    inputs: DeviceBuf<u8>,
    recorded: Option<Recorded>,
}

struct Graphs<T> {
    enabled: bool,
    entries: HashMap<GraphKey, GraphEntry>,
    /// Logits of each padded batch size, copied there by the last node of its graphs.
    outputs: HashMap<usize, GpuMatrix<T>>,
}

/// Host-side staging of a step's inputs: each array at a 256-byte aligned offset.
#[derive(Default)]
struct Packed {
    bytes: Vec<u8>,
}

impl Packed {
    fn push<U: bytemuck::Pod>(&mut self, values: &[U]) -> (usize, usize) {
        let offset = self.bytes.len().next_multiple_of(256);
        self.bytes.resize(offset, 0);
        self.bytes.extend_from_slice(bytemuck::cast_slice(values));
        (offset, values.len())
    }
}

/// How often decode steps were recorded into CUDA graphs and replayed from them.
#[derive(Debug, Default)]
pub struct GraphStats {
    pub recorded: AtomicU64,
    pub replayed: AtomicU64,
}

pub struct CudaBackend<T> {
    kernels: Kernels,
    stats: Arc<GraphStats>,
    blas: CudaBlas,
    stream: Arc<CudaStream>,
    pool: Arc<Pool>,
    graphs: Mutex<Graphs<T>>,
    /// Sublayer inputs of up to [`FUSED_GEMV_MAX_ROWS`] rows run as fused GEMV kernels.
    fused_gemv: bool,
    /// Every activation buffer is filled with all-ones bytes (NaN) when handed out, so an op
    /// that leaves part of its output unwritten shows: on the emulator, or where
    /// `LLMCTL_POISON_ACTIVATIONS=1` asks for it (a debugging aid on a GPU: a memset per buffer).
    poison_activations: bool,
    _workspace: CudaSlice<u8>,
    _dtype: std::marker::PhantomData<T>,
}
/// The storage type the kernels and cuBLAS both handle.
pub trait GpuDtype: Dtype {
    /// The safetensors element type that is this type's bytes, which load as they are.
    const STORED: WeightDtype;
}
impl GpuDtype for half::bf16 {
    const STORED: WeightDtype = WeightDtype::Bf16;
}
impl GpuDtype for half::f16 {
    const STORED: WeightDtype = WeightDtype::F16;
}
/// f32 end to end: for checking the GPU path against the CPU backend without rounding.
impl GpuDtype for f32 {
    const STORED: WeightDtype = WeightDtype::F32;
}

impl<T: GpuDtype> CudaBackend<T>
where
    CudaBlas: Gemm<T>,
{
    /// Opens device `ordinal` and creates the cuBLAS handle; kernels are compiled for the
    /// model by [`Backend::prepare`]. Errors say what is missing (driver, NVRTC, cuBLAS, device). Decode steps
    /// are replayed from CUDA graphs unless [`Self::with_graphs`] turns them off.
    pub fn new(ordinal: usize) -> Result<Self, KernelError> {
        let kernels = Kernels::new(ordinal)?;
        let stream = kernels.stream().clone();
        // SAFETY: only tries to dlopen cuBLAS by its known names.
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(KernelError::Shape(
                "cuBLAS (libcublas.so.13) cannot be loaded; put its folder on LD_LIBRARY_PATH"
                    .into(),
            ));
        }
        let blas_error =
            |e: cudarc::cublas::result::CublasError| KernelError::Shape(format!("cuBLAS: {e}"));
        let blas = CudaBlas::new(stream.clone()).map_err(blas_error)?;
        let mut workspace = stream.alloc_zeros::<u8>(CUBLAS_WORKSPACE)?;
        {
            use cudarc::driver::DevicePtrMut;
            let (ptr, _sync) = workspace.device_ptr_mut(&stream);
            // SAFETY: the workspace outlives the handle (both are fields of the backend, the
            // workspace dropped after it) and is used by nothing else.
            unsafe {
                cudarc::cublas::sys::cublasSetWorkspace_v2(
                    *blas.handle(),
                    ptr as *mut std::ffi::c_void,
                    CUBLAS_WORKSPACE,
                )
            }
            .result()
            .map_err(blas_error)?;
        }
        let poison_activations = kernels.is_emulated()
            || std::env::var("LLMCTL_POISON_ACTIVATIONS").is_ok_and(|v| v == "1");
        tracing::info!(device = %kernels.device_name, arch = kernels.arch, sms = kernels.sm_count, dtype = T::SUFFIX, poison_activations, "CUDA backend ready");
        Ok(Self {
            kernels,
            stats: Arc::default(),
            blas,
            pool: Arc::new(Pool {
                stream: stream.clone(),
                free: Mutex::default(),
                generation: AtomicU64::new(0),
            }),
            stream,
            graphs: Mutex::new(Graphs {
                enabled: true,
                entries: HashMap::new(),
                outputs: HashMap::new(),
            }),
            fused_gemv: true,
            poison_activations,
            _workspace: workspace,
            _dtype: std::marker::PhantomData,
        })
    }

    /// Whether decode steps are replayed from CUDA graphs (on by default).
    pub fn with_graphs(self, enabled: bool) -> Self {
        self.graphs.lock().expect("graphs lock").enabled = enabled;
        self
    }

    /// Whether each sublayer input of a step of at most [`FUSED_GEMV_MAX_ROWS`] tokens (small-batch
    /// decode) runs as two fused GEMV kernels (the previous output's projection with the
    /// residual add; the norm and input projection with SiLU-and-mul, or with rotary and the
    /// cache write) rather than cuBLAS and separate kernels (on by default).
    pub fn with_fused_gemv(mut self, enabled: bool) -> Self {
        self.fused_gemv = enabled;
        self
    }

    /// Whether a sublayer input runs as fused GEMVs: on, at most [`FUSED_GEMV_MAX_ROWS`] rows, rows
    /// in whole 16-byte chunks, no biases (the kernels take none).
    fn fuses(
        &self,
        residual: &GpuMatrix<T>,
        input: &SublayerInput<'_, GpuMatrix<T>, GpuMatrix<T>>,
    ) -> bool {
        let whole_chunks = |cols: usize| (cols * std::mem::size_of::<T>()).is_multiple_of(16);
        self.fused_gemv
            && (1..=FUSED_GEMV_MAX_ROWS).contains(&residual.rows)
            && whole_chunks(residual.cols)
            && input.into.bias.is_none()
            && input
                .prev
                .as_ref()
                .is_none_or(|(x, out)| whole_chunks(x.cols) && out.bias.is_none())
    }

    /// A sublayer input as fused GEMVs: `gemv_add` (the previous output's projection into the
    /// residual stream), then `gemv_norm` with `then` (the norm, the input projection and what
    /// follows it).
    fn fused_input(
        &self,
        residual: &mut GpuMatrix<T>,
        input: &SublayerInput<'_, GpuMatrix<T>, GpuMatrix<T>>,
        then: GemvThen<'_, T>,
    ) -> GpuMatrix<T> {
        if let Some((x, out)) = &input.prev {
            self.kernels
                .gemv_add(&mut residual.data, &x.data, &out.weight.data, x.cols)
                .or_die("gemv_add");
        }
        let n = input.into.weight.rows;
        let width = if matches!(then, GemvThen::SiluMul) {
            n / 2
        } else {
            n
        };
        let mut out = self.matrix(residual.rows, width);
        self.kernels
            .gemv_norm(
                &mut out.data,
                &residual.data,
                &input.norm.data,
                input.eps,
                &input.into.weight.data,
                residual.cols,
                then,
            )
            .or_die("gemv_norm");
        out
    }

    /// Counts of recorded and replayed decode graphs, kept up to date.
    pub fn graph_stats(&self) -> Arc<GraphStats> {
        self.stats.clone()
    }

    /// `len` elements from the pool, uninitialised (every op writes all of its output), or
    /// poisoned where [`Self::poison_activations`] says so.
    fn alloc<U>(&self, len: usize) -> DeviceBuf<U> {
        let (ptr, class) = self
            .pool
            .take(len.max(1) * std::mem::size_of::<U>())
            .or_die("allocating activations");
        if self.poison_activations {
            self.stream
                .context()
                .bind_to_thread()
                .or_die("poisoning activations");
            // SAFETY: `ptr` holds `class` bytes the pool handed out to no one else, ordered on
            // the stream every use of it goes through.
            unsafe { result::memset_d8_async(ptr, 0xff, class, self.stream.cu_stream()) }
                .or_die("poisoning activations");
        }
        // SAFETY: the pool's buffer holds `class` >= len * size_of::<U>() bytes.
        unsafe { DeviceBuf::from_raw(&self.stream, ptr, len, Home::Pool(self.pool.clone(), class)) }
    }

    /// `values` in a buffer from the pool.
    fn upload<U: DeviceRepr>(&self, values: &[U]) -> DeviceBuf<U> {
        let mut buf = self.alloc::<U>(values.len());
        self.stream
            .memcpy_htod(values, &mut *buf)
            .or_die("copying to the device");
        buf
    }

    fn download<U: DeviceRepr + Default + Clone>(&self, buf: &DeviceBuf<U>) -> Vec<U> {
        self.stream.clone_dtoh(&**buf).or_die("copying to the host")
    }

    fn matrix(&self, rows: usize, cols: usize) -> GpuMatrix<T> {
        GpuMatrix {
            data: self.alloc(rows * cols),
            rows,
            cols,
        }
    }

    /// The graph a decode batch of `num_seqs` sequences with block tables of up to
    /// `max_blocks` entries replays from, if graphs are on and the batch is small enough.
    fn graph_key(&self, batch: &StepBatch, decode: bool, max_blocks: usize) -> Option<GraphKey> {
        let n = batch.seqs.len();
        let in_order = batch.logits_rows.iter().copied().eq(0..n);
        if !decode || !in_order || n == 0 || n > MAX_GRAPH_BATCH {
            return None;
        }
        if !self.graphs.lock().expect("graphs lock").enabled {
            return None;
        }
        let bucket = GRAPH_BUCKETS.into_iter().find(|&b| b >= n)?;
        Some(GraphKey {
            batch: bucket,
            max_blocks: max_blocks.next_power_of_two().max(16),
        })
    }

    /// Records `forward` on `step` into `key`'s graph; false if it could not be recorded.
    fn record<F>(
        &self,
        graphs: &mut Graphs<T>,
        key: GraphKey,
        cache: &mut GpuKvCache<T>,
        step: &GpuStep,
        forward: &mut F,
    ) -> bool
    where
        F: FnMut(&mut GpuKvCache<T>, &GpuStep) -> GpuMatrix<T>,
    {
        let generation = self.pool.generation.load(Ordering::SeqCst);
        let capture = self
            .stream
            .begin_capture(CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED);
        if let Err(e) = capture {
            tracing::warn!(error = %e, "cannot record a CUDA graph; decode steps run op by op");
            return false;
        }
        let outputs = &mut graphs.outputs;
        let ran = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let logits = forward(cache, step);
            // From the pool, which allocates outside the stream: a stream-ordered allocation
            // here would become the graph's allocation node, and a graph whose allocation is
            // still live cannot be launched again (seen on an H200).
            let out = outputs
                .entry(key.batch)
                .or_insert_with(|| self.matrix(logits.rows, logits.cols));
            self.stream
                .memcpy_dtod(&*logits.data, &mut *out.data)
                .or_die("copying graph outputs");
        }));
        let ended = self.stream.end_capture(CUgraphInstantiate_flags(0));
        if self.pool.generation.load(Ordering::SeqCst) != generation {
            // Memory went back to the driver while recording (which also fails the capture):
            // the recording is discarded and the next step of this shape records again.
            return false;
        }
        let why = match (ran, ended) {
            (Ok(()), Ok(Some(graph))) => {
                let entry = graphs
                    .entries
                    .get_mut(&key)
                    .expect("prepared with the step");
                entry.recorded = Some(Recorded {
                    graph,
                    generation,
                    cache: cache.id,
                });
                self.stats.recorded.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(
                    batch = key.batch,
                    max_blocks = key.max_blocks,
                    "recorded a decode CUDA graph"
                );
                return true;
            }
            (Err(_), _) => "an op failed while recording".to_owned(),
            (_, Err(e)) => e.to_string(),
            (Ok(()), Ok(None)) => "the capture returned no graph".to_owned(),
        };
        tracing::warn!(reason = %why, "cannot record a CUDA graph; decode steps run op by op from now on");
        graphs.enabled = false;
        false
    }
}

/// A CUDA failure inside a step: nothing to recover, say what failed (see the module docs).
trait OrDie<T> {
    fn or_die(self, what: &str) -> T;
}

impl<T, E: std::fmt::Display> OrDie<T> for Result<T, E> {
    fn or_die(self, what: &str) -> T {
        self.unwrap_or_else(|e| panic!("CUDA backend: {what}: {e}"))
    }
}

/// Free and total memory of the current device, in bytes (zeros when it cannot be read).
pub fn device_memory() -> (usize, usize) {
    cudarc::driver::result::mem_get_info().unwrap_or((0, 0))
}

impl<T: GpuDtype> Backend for CudaBackend<T>
where
    CudaBlas: Gemm<T>,
{
    type Activations = GpuMatrix<T>;
    type Weight = GpuMatrix<T>;
    type KvCache = GpuKvCache<T>;
    type Step = GpuStep;

    fn name(&self) -> &'static str {
        "cuda"
    }

    /// Parts stored as `T` (a bf16 model on a bf16 backend) go from the mapped file straight to
    /// the GPU, each part's bytes into its rows; others are converted on the host first.
    fn load_weight(&self, parts: &[TensorView<'_>]) -> Result<GpuMatrix<T>, ModelError> {
        let copy_error = |e: DriverError| ModelError::Tensor {
            file: parts[0].file.display().to_string(),
            tensor: parts[0].name.to_owned(),
            reason: format!("copying to the GPU: {e}"),
        };
        let (data, rows, cols) = if parts.iter().all(|p| p.dtype == T::STORED) {
            let (rows, cols) = fused_shape(parts)?;
            // SAFETY: every element is written below, part after part, before any use.
            let mut data = unsafe { self.stream.alloc::<T>(rows * cols) }.map_err(copy_error)?;
            self.stream.context().bind_to_thread().map_err(copy_error)?;
            use cudarc::driver::DevicePtrMut;
            let (ptr, record) = data.device_ptr_mut(&self.stream);
            let mut at = 0u64;
            for part in parts {
                // SAFETY: `data` holds rows * cols elements of T, which are the parts' bytes
                // one after another (fused_shape); a copy from pageable memory has read its
                // source when it returns.
                unsafe { result::memcpy_htod_async(ptr + at, part.bytes, self.stream.cu_stream()) }
                    .map_err(copy_error)?;
                at += part.bytes.len() as u64;
            }
            drop(record);
            (data, rows, cols)
        } else {
            let (fused, rows, cols) = fuse_f32(parts)?;
            let host: Vec<T> = fused.into_par_iter().map(T::from_f32).collect();
            (
                self.stream.clone_htod(&host).map_err(copy_error)?,
                rows,
                cols,
            )
        };
        Ok(GpuMatrix {
            data: DeviceBuf::owned(data),
            rows,
            cols,
        })
    }

    fn prepare(&self, config: &ModelConfig) -> Result<(), ModelError> {
        let started = std::time::Instant::now();
        self.kernels
            .prepare(T::SUFFIX, config.head_dim)
            .map_err(|e| ModelError::Backend {
                backend: self.name(),
                reason: format!("kernels: {e}"),
            })?;
        let format = self.kernels.ptx_fallback().map_or_else(
            || "machine code".to_string(),
            |why| format!("PTX, compiled by the driver at load ({why})"),
        );
        tracing::info!(
            dtype = T::SUFFIX,
            head_dim = config.head_dim,
            seconds = started.elapsed().as_secs_f64(),
            format,
            "kernels ready (compiled, or read from the kernel cache)"
        );
        Ok(())
    }

    fn alloc_kv_cache(&self, num_layers: usize, layout: KvLayout) -> GpuKvCache<T> {
        let n = layout.elements();
        let alloc = || {
            self.stream
                .alloc_zeros::<T>(n)
                .or_die("allocating the KV cache")
        };
        static NEXT_ID: AtomicU64 = AtomicU64::new(0);
        GpuKvCache {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            layout,
            k: (0..num_layers).map(|_| alloc()).collect(),
            v: (0..num_layers).map(|_| alloc()).collect(),
        }
    }

    fn replay_counts(&self) -> ReplayCounts {
        ReplayCounts {
            recorded: self.stats.recorded.load(Ordering::Relaxed),
            replayed: self.stats.replayed.load(Ordering::Relaxed),
        }
    }

    fn prepare_step(&self, batch: &StepBatch, rope: RopeRows) -> GpuStep {
        let seqs = &batch.seqs;
        let decode = seqs
            .iter()
            .enumerate()
            .all(|(i, s)| s.query_len == 1 && s.query_start == i)
            && batch.tokens.len() == seqs.len();
        let widest = seqs.iter().map(|s| s.block_table.len()).max().unwrap_or(0);
        let graph = self.graph_key(batch, decode, widest);
        // A graph's step is padded to its bucket: padding rows take token 0 at position 0, write
        // no K/V (slot -1) and attend to one token of block 0; their logits are never read.
        let (num_seqs, max_blocks) = match graph {
            Some(key) => (key.batch, key.max_blocks),
            None => (seqs.len(), widest.max(1)),
        };
        let pad = num_seqs - seqs.len();
        let mut tables = vec![0i32; num_seqs * max_blocks];
        for (i, s) in seqs.iter().enumerate() {
            for (j, &b) in s.block_table.iter().enumerate() {
                tables[i * max_blocks + j] = b as i32;
            }
        }
        let mut lens: Vec<i32> = seqs.iter().map(|s| s.context_len as i32).collect();
        lens.resize(num_seqs, 1);
        let mut cu_q = Vec::with_capacity(num_seqs + 1);
        cu_q.push(seqs.first().map_or(0, |s| s.query_start as i32));
        for s in seqs {
            assert_eq!(
                s.query_start as i32,
                *cu_q.last().expect("starts with one entry"),
                "sequences are packed in order"
            );
            cu_q.push((s.query_start + s.query_len) as i32);
        }
        for _ in 0..pad {
            cu_q.push(cu_q.last().expect("starts with one entry") + 1);
        }
        let mut tokens = batch.tokens.clone();
        tokens.resize(tokens.len() + pad, 0);
        let mut slots = batch.slot_mapping.clone();
        slots.resize(slots.len() + pad, -1);
        let (mut cos, mut sin) = (rope.cos, rope.sin);
        cos.resize(cos.len() + pad * rope.half, 1.0);
        sin.resize(sin.len() + pad * rope.half, 0.0);
        let mut rows: Vec<u32> = batch.logits_rows.iter().map(|&r| r as u32).collect();
        rows.extend((rows.len() as u32..).take(pad));
        let every_row_logits = rows.iter().copied().eq(0..tokens.len() as u32);

        let mut packed = Packed::default();
        let tokens_at = packed.push(&tokens);
        let cos_at = packed.push(&cos);
        let sin_at = packed.push(&sin);
        let slots_at = packed.push(&slots);
        let tables_at = packed.push(&tables);
        let lens_at = packed.push(&lens);
        let cu_q_at = packed.push(&cu_q);
        let rows_at = packed.push(&rows);
        let mut inputs = match graph {
            Some(key) => {
                let mut graphs = self.graphs.lock().expect("graphs lock");
                let entry = graphs.entries.entry(key).or_insert_with(|| GraphEntry {
                    inputs: DeviceBuf::owned(
                        self.stream
                            .alloc_zeros::<u8>(packed.bytes.len())
                            .or_die("allocating graph inputs"),
                    ),
                    recorded: None,
                });
                // A key fixes every input's length, so its buffer fits each step it serves.
                assert!(
                    packed.bytes.len() <= entry.inputs.len(),
                    "graph inputs outgrown"
                );
                entry.inputs.view::<u8>(0, packed.bytes.len())
            }
            None => self.alloc::<u8>(packed.bytes.len()),
        };
        self.stream
            .memcpy_htod(&packed.bytes, &mut *inputs)
            .or_die("copying step inputs to the device");
        GpuStep {
            tokens: inputs.view(tokens_at.0, tokens_at.1),
            cos: inputs.view(cos_at.0, cos_at.1),
            sin: inputs.view(sin_at.0, sin_at.1),
            slots: inputs.view(slots_at.0, slots_at.1),
            tables: inputs.view(tables_at.0, tables_at.1),
            max_blocks,
            context_lens: inputs.view(lens_at.0, lens_at.1),
            cu_q: inputs.view(cu_q_at.0, cu_q_at.1),
            logits_rows: inputs.view(rows_at.0, rows_at.1),
            every_row_logits,
            decode,
            max_context: seqs.iter().map(|s| s.context_len).max().unwrap_or(1),
            max_q: seqs.iter().map(|s| s.query_len).max().unwrap_or(0),
            asked_rows: batch.logits_rows.len(),
            graph,
            _inputs: inputs,
        }
    }

    fn run_step<F>(&self, cache: &mut GpuKvCache<T>, step: &GpuStep, mut forward: F) -> GpuMatrix<T>
    where
        F: FnMut(&mut GpuKvCache<T>, &GpuStep) -> GpuMatrix<T>,
    {
        let Some(key) = step.graph else {
            return forward(cache, step);
        };
        let mut graphs = self.graphs.lock().expect("graphs lock");
        let generation = self.pool.generation.load(Ordering::SeqCst);
        let entry = graphs
            .entries
            .get_mut(&key)
            .expect("prepared with the step");
        if entry
            .recorded
            .as_ref()
            .is_some_and(|r| r.generation != generation || r.cache != cache.id)
        {
            entry.recorded = None;
        }
        if entry.recorded.is_none() && !self.record(&mut graphs, key, cache, step, &mut forward) {
            drop(graphs);
            return forward(cache, step);
        }
        let entry = graphs
            .entries
            .get_mut(&key)
            .expect("prepared with the step");
        let launched = entry
            .recorded
            .as_ref()
            .expect("recorded above")
            .graph
            .launch();
        if let Err(e) = launched {
            // The step has not run: it runs op by op, and so does every later one.
            tracing::warn!(error = %e, "cannot launch a decode CUDA graph; decode steps run op by op from now on");
            entry.recorded = None;
            graphs.enabled = false;
            drop(graphs);
            return forward(cache, step);
        }
        self.stats.replayed.fetch_add(1, Ordering::Relaxed);
        // The asked rows of the bucket's output, which the backend keeps: nothing else writes
        // it before the next step's graph.
        graphs.outputs[&key.batch].first_rows(step.asked_rows)
    }

    fn embed(&self, table: &GpuMatrix<T>, step: &GpuStep) -> GpuMatrix<T> {
        let mut out = self.matrix(step.tokens.len(), table.cols);
        self.kernels
            .embed(&mut out.data, &table.data, &step.tokens, table.cols)
            .or_die("embed");
        out
    }

    fn rms_norm(&self, x: &GpuMatrix<T>, weight: &GpuMatrix<T>, eps: f32) -> GpuMatrix<T> {
        let mut out = self.matrix(x.rows, x.cols);
        self.kernels
            .rms_norm(&mut out.data, &x.data, &weight.data, x.cols, eps)
            .or_die("rms_norm");
        out
    }

    fn add_rms_norm(
        &self,
        residual: &mut GpuMatrix<T>,
        delta: &GpuMatrix<T>,
        weight: &GpuMatrix<T>,
        eps: f32,
    ) -> GpuMatrix<T> {
        let mut out = self.matrix(residual.rows, residual.cols);
        self.kernels
            .add_rms_norm(
                &mut out.data,
                &mut residual.data,
                &delta.data,
                &weight.data,
                residual.cols,
                eps,
            )
            .or_die("add_rms_norm");
        out
    }

    fn linear(
        &self,
        x: &GpuMatrix<T>,
        weight: &GpuMatrix<T>,
        bias: Option<&GpuMatrix<T>>,
    ) -> GpuMatrix<T> {
        // Row-major y[m, n] = x[m, k] · w[n, k]ᵀ is column-major yᵀ = w · xᵀ: cuBLAS sees w as
        // a k×n column-major matrix (transposed) and x as k×m.
        let (m, k, n) = (x.rows, x.cols, weight.rows);
        assert_eq!(
            weight.cols, k,
            "linear: x has {k} columns, the weight {}",
            weight.cols
        );
        let mut out = self.matrix(m, n);
        if m > 0 {
            let cfg = GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_T,
                transb: cublasOperation_t::CUBLAS_OP_N,
                m: n as i32,
                n: m as i32,
                k: k as i32,
                alpha: T::from_f32(1.0),
                lda: k as i32,
                ldb: k as i32,
                beta: T::from_f32(0.0),
                ldc: n as i32,
            };
            // SAFETY: the three buffers hold n·k, m·k and m·n elements as the config says.
            unsafe { self.blas.gemm(cfg, &*weight.data, &*x.data, &mut *out.data) }
                .or_die("cuBLAS GEMM");
        }
        if let Some(b) = bias {
            self.kernels.add_bias(&mut out.data, &b.data).or_die("bias");
        }
        out
    }

    fn attention_input(
        &self,
        residual: &mut GpuMatrix<T>,
        input: &SublayerInput<'_, GpuMatrix<T>, GpuMatrix<T>>,
        cache: &mut GpuKvCache<T>,
        layer: usize,
        shape: QkvShape,
        step: &GpuStep,
    ) -> GpuMatrix<T> {
        if !self.fuses(residual, input) {
            let mut qkv = sublayer_input_op_by_op(self, residual, input);
            self.rotary_write_kv(cache, layer, &mut qkv, shape, step);
            return qkv;
        }
        let (k_cache, v_cache) = (&mut cache.k[layer], &mut cache.v[layer]);
        let rope = RotaryKv {
            cos: &step.cos,
            sin: &step.sin,
            num_q_heads: shape.num_heads,
            num_kv_heads: shape.num_kv_heads,
            head_dim: shape.head_dim,
            k_cache,
            v_cache,
            slots: &step.slots,
        };
        self.fused_input(residual, input, GemvThen::Rotary(rope))
    }

    fn mlp_input(
        &self,
        residual: &mut GpuMatrix<T>,
        input: &SublayerInput<'_, GpuMatrix<T>, GpuMatrix<T>>,
    ) -> GpuMatrix<T> {
        if !self.fuses(residual, input) {
            return self.silu_mul(&sublayer_input_op_by_op(self, residual, input));
        }
        self.fused_input(residual, input, GemvThen::SiluMul)
    }

    fn output_head(
        &self,
        residual: &mut GpuMatrix<T>,
        input: &SublayerInput<'_, GpuMatrix<T>, GpuMatrix<T>>,
    ) -> GpuMatrix<T> {
        if !self.fuses(residual, input) {
            return sublayer_input_op_by_op(self, residual, input);
        }
        self.fused_input(residual, input, GemvThen::Store)
    }

    fn rotary(&self, qkv: &mut GpuMatrix<T>, shape: QkvShape, step: &GpuStep) {
        self.kernels
            .rotary_table(
                &mut qkv.data,
                qkv.cols,
                &step.cos,
                &step.sin,
                shape.num_heads + shape.num_kv_heads,
                shape.head_dim,
            )
            .or_die("rotary");
    }

    fn write_kv(
        &self,
        cache: &mut GpuKvCache<T>,
        layer: usize,
        qkv: &GpuMatrix<T>,
        shape: QkvShape,
        step: &GpuStep,
    ) {
        let (q, kv) = (shape.q_size(), shape.kv_size());
        let (kc, vc) = (&mut cache.k[layer], &mut cache.v[layer]);
        self.kernels
            .write_kv(
                &qkv.data.slice(q..),
                &qkv.data.slice(q + kv..),
                qkv.cols,
                kv,
                kc,
                vc,
                &step.slots,
            )
            .or_die("write_kv");
    }

    fn rotary_write_kv(
        &self,
        cache: &mut GpuKvCache<T>,
        layer: usize,
        qkv: &mut GpuMatrix<T>,
        shape: QkvShape,
        step: &GpuStep,
    ) {
        let (kc, vc) = (&mut cache.k[layer], &mut cache.v[layer]);
        self.kernels
            .rotary_write_kv(
                &mut qkv.data,
                qkv.cols,
                &step.cos,
                &step.sin,
                shape.num_heads,
                shape.num_kv_heads,
                shape.head_dim,
                kc,
                vc,
                &step.slots,
            )
            .or_die("rotary_write_kv");
    }

    fn attention(
        &self,
        qkv: &GpuMatrix<T>,
        cache: &GpuKvCache<T>,
        layer: usize,
        shape: QkvShape,
        step: &GpuStep,
    ) -> GpuMatrix<T> {
        let mut out = self.matrix(qkv.rows, shape.q_size());
        if step.context_lens.is_empty() {
            return out;
        }
        let paged = PagedCache {
            k: &cache.k[layer],
            v: &cache.v[layer],
            block_tables: &step.tables,
            max_blocks: step.max_blocks,
            context_lens: &step.context_lens,
            block_size: cache.layout.block_size,
            num_kv_heads: shape.num_kv_heads,
            head_dim: shape.head_dim,
        };
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        let q = qkv.data.slice(..);
        // Decode steps (one new token per sequence, packed in order) take the decode kernel;
        // anything else the prefill kernel, which also handles one-token rows.
        if step.decode {
            let max_context = match step.graph {
                Some(key) => key.max_blocks * cache.layout.block_size,
                None => step.max_context,
            };
            let plan = self.kernels.decode_plan(
                step.context_lens.len(),
                shape.num_heads,
                &paged,
                max_context,
                Split::Auto,
            );
            let mut part_out = self.alloc::<f32>(plan.scratch_len);
            let mut part_ml = self.alloc::<f32>(plan.ml_len);
            self.kernels
                .decode_attention_planned(
                    &mut out.data,
                    &q,
                    qkv.cols,
                    &paged,
                    shape.num_heads,
                    scale,
                    &plan,
                    &mut part_out,
                    &mut part_ml,
                )
                .or_die("decode attention");
        } else {
            self.kernels
                .prefill_attention(
                    &mut out.data,
                    &q,
                    qkv.cols,
                    &paged,
                    &step.cu_q,
                    shape.num_heads,
                    step.max_q,
                    scale,
                )
                .or_die("prefill attention");
        }
        out
    }

    fn silu_mul(&self, gate_up: &GpuMatrix<T>) -> GpuMatrix<T> {
        let inter = gate_up.cols / 2;
        let mut out = self.matrix(gate_up.rows, inter);
        self.kernels
            .silu_mul(&mut out.data, &gate_up.data, inter)
            .or_die("silu_mul");
        out
    }

    fn keep_logits_rows(&self, x: &mut GpuMatrix<T>, step: &GpuStep) {
        if step.every_row_logits {
            return;
        }
        let mut kept = self.matrix(step.logits_rows.len(), x.cols);
        self.kernels
            .embed(&mut kept.data, &x.data, &step.logits_rows, x.cols)
            .or_die("gathering logits rows");
        *x = kept;
    }

    fn shape(&self, x: &GpuMatrix<T>) -> (usize, usize) {
        (x.rows, x.cols)
    }

    fn edit_logits(&self, x: &mut GpuMatrix<T>, edits: &[LogitEdit]) {
        if edits.is_empty() {
            return;
        }
        let edits = self.upload(edits);
        self.kernels
            .edit_logits(&mut x.data, x.cols, &edits)
            .or_die("edit_logits");
    }

    fn draw_rows(&self, x: &GpuMatrix<T>, temperature: &[f32], u: &[f64]) -> Vec<u32> {
        let rows = temperature.len();
        let mut ids = self.alloc::<i32>(rows);
        if temperature.iter().all(|&t| t == 0.0) {
            // Greedy rows need no inputs.
            self.kernels
                .argmax(&x.first_rows(rows).data, x.cols, &mut ids)
                .or_die("argmax");
        } else {
            let mut packed = Packed::default();
            let t_at = packed.push(temperature);
            let u_at = packed.push(u);
            let inputs = self.upload(&packed.bytes);
            let (t, u) = (
                inputs.view::<f32>(t_at.0, t_at.1),
                inputs.view::<f64>(u_at.0, u_at.1),
            );
            self.kernels
                .softmax_draw(&x.data, x.cols, &t, &u, &mut ids)
                .or_die("softmax_draw");
        }
        self.download(&ids).into_iter().map(|i| i as u32).collect()
    }

    fn softmax_mass_rows(&self, x: &GpuMatrix<T>, temperature: &[f32]) -> Vec<f64> {
        let mut mass = self.alloc::<f32>(temperature.len());
        self.kernels
            .softmax_mass(&x.data, x.cols, &self.upload(temperature), &mut mass)
            .or_die("softmax_mass");
        self.download(&mass).into_iter().map(f64::from).collect()
    }

    fn top_k_rows(&self, x: &GpuMatrix<T>, rows: usize, k: usize) -> (Vec<f32>, Vec<u32>) {
        let mut values = self.alloc::<f32>(rows * k);
        let mut ids = self.alloc::<i32>(rows * k);
        self.kernels
            .top_k(&x.first_rows(rows).data, x.cols, k, &mut values, &mut ids)
            .or_die("top_k");
        let ids = self.download(&ids).into_iter().map(|i| i as u32).collect();
        (self.download(&values), ids)
    }

    fn logits_at(&self, x: &GpuMatrix<T>, at: &[(usize, u32)]) -> Vec<f32> {
        if at.is_empty() {
            return Vec::new();
        }
        // Each logit is a one-element row of x seen as `[rows × cols, 1]`, gathered by the
        // embedding kernel (which gives an out-of-range index a zero, never a fault).
        let flat: Vec<u32> = at
            .iter()
            .map(|&(row, token)| {
                u32::try_from(row * x.cols + token as usize).expect("logits index within u32")
            })
            .collect();
        let mut out = self.alloc::<T>(at.len());
        self.kernels
            .embed(&mut out, &x.data, &self.upload(&flat), 1)
            .or_die("gathering logits");
        self.download(&out).into_iter().map(T::to_f32).collect()
    }

    fn to_host(&self, x: &GpuMatrix<T>) -> Vec<f32> {
        self.stream
            .clone_dtoh(&*x.data)
            .or_die("copying to the host")
            .into_iter()
            .map(T::to_f32)
            .collect()
    }

    fn synchronize(&self) {
        self.stream.synchronize().or_die("waiting for the stream");
    }
}
