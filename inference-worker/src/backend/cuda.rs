//! The CUDA backend: the same ops as the CPU backend, on one GPU. Weights and activations are
//! stored in `T` (bf16, or f16 for f16 models); GEMMs go through cuBLAS (`T` inputs, f32
//! accumulation); everything else through llmctl's kernels (`llmctl-kernels`). The KV cache is
//! the shared paged layout in device memory. Logits come back to the host as f32 for the
//! sampler.
//!
//! The trait's ops are infallible: a CUDA error in the middle of a step (a lost device, an
//! illegal address) cannot be recovered from by the engine, so it panics with the error; the
//! worker's engine task then fails its requests and the process exits for the controller to
//! replace. Everything that can be checked before a step (driver, device, kernel compilation,
//! memory for weights and cache) is checked in [`CudaBackend::new`] and at load, as errors.

use std::sync::Arc;

use cudarc::cublas::{CudaBlas, Gemm, GemmConfig, sys::cublasOperation_t};
use cudarc::driver::{CudaSlice, CudaStream};
use llmctl_kernels::cuda::{Dtype, KernelError, Kernels, PagedCache};

use super::{Backend, KvLayout, QkvShape, RopeRows, SeqSlice};
use crate::model::ModelError;
use crate::model::weights::{TensorView, fuse_f32};

/// A row-major matrix in device memory.
pub struct GpuMatrix<T> {
    pub data: CudaSlice<T>,
    pub rows: usize,
    pub cols: usize,
}

/// One K and one V cache per layer, in the shared paged layout.
pub struct GpuKvCache<T> {
    pub layout: KvLayout,
    pub k: Vec<CudaSlice<T>>,
    pub v: Vec<CudaSlice<T>>,
}

pub struct CudaBackend<T> {
    kernels: Kernels,
    blas: CudaBlas,
    stream: Arc<CudaStream>,
    _dtype: std::marker::PhantomData<T>,
}

/// The storage type the kernels and cuBLAS both handle.
pub trait GpuDtype: Dtype {}
impl GpuDtype for half::bf16 {}
impl GpuDtype for half::f16 {}
/// f32 end to end: for checking the GPU path against the CPU backend without rounding.
impl GpuDtype for f32 {}

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

impl<T: GpuDtype> CudaBackend<T>
where
    CudaBlas: Gemm<T>,
{
    /// Opens device `ordinal`, compiles (or loads from the cache) every kernel, creates the
    /// cuBLAS handle. Errors say what is missing (driver, NVRTC, cuBLAS, device).
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
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| KernelError::Shape(format!("cuBLAS: {e}")))?;
        tracing::info!(device = %kernels.device_name, arch = kernels.arch, sms = kernels.sm_count, dtype = T::SUFFIX, "CUDA backend ready");
        Ok(Self {
            kernels,
            blas,
            stream,
            _dtype: std::marker::PhantomData,
        })
    }

    fn zeros(&self, rows: usize, cols: usize) -> GpuMatrix<T> {
        GpuMatrix {
            data: self
                .stream
                .alloc_zeros::<T>(rows * cols)
                .or_die("allocating activations"),
            rows,
            cols,
        }
    }

    fn upload<U: cudarc::driver::DeviceRepr>(&self, host: &[U]) -> CudaSlice<U> {
        self.stream.clone_htod(host).or_die("copying to the device")
    }
}

impl<T: GpuDtype> Backend for CudaBackend<T>
where
    CudaBlas: Gemm<T>,
{
    type Activations = GpuMatrix<T>;
    type Weight = GpuMatrix<T>;
    type KvCache = GpuKvCache<T>;

    fn name(&self) -> &'static str {
        "cuda"
    }

    fn load_weight(&self, parts: &[TensorView<'_>]) -> Result<GpuMatrix<T>, ModelError> {
        let (fused, rows, cols) = fuse_f32(parts)?;
        let host: Vec<T> = fused.into_iter().map(T::from_f32).collect();
        let data = self
            .stream
            .clone_htod(&host)
            .map_err(|e| ModelError::Tensor {
                file: parts[0].file.display().to_string(),
                tensor: parts[0].name.to_owned(),
                reason: format!("copying to the GPU: {e}"),
            })?;
        Ok(GpuMatrix { data, rows, cols })
    }

    fn alloc_kv_cache(&self, num_layers: usize, layout: KvLayout) -> GpuKvCache<T> {
        let n = layout.elements();
        let alloc = || {
            self.stream
                .alloc_zeros::<T>(n)
                .or_die("allocating the KV cache")
        };
        GpuKvCache {
            layout,
            k: (0..num_layers).map(|_| alloc()).collect(),
            v: (0..num_layers).map(|_| alloc()).collect(),
        }
    }

    fn embed(&self, table: &GpuMatrix<T>, tokens: &[u32]) -> GpuMatrix<T> {
        let mut out = self.zeros(tokens.len(), table.cols);
        let ids = self.upload(tokens);
        self.kernels
            .embed(&mut out.data, &table.data, &ids, table.cols)
            .or_die("embed");
        out
    }

    fn rms_norm(&self, x: &GpuMatrix<T>, weight: &GpuMatrix<T>, eps: f32) -> GpuMatrix<T> {
        let mut out = self.zeros(x.rows, x.cols);
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
        let mut out = self.zeros(residual.rows, residual.cols);
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
        let mut out = self.zeros(m, n);
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
            unsafe { self.blas.gemm(cfg, &weight.data, &x.data, &mut out.data) }
                .or_die("cuBLAS GEMM");
        }
        if let Some(b) = bias {
            self.kernels.add_bias(&mut out.data, &b.data).or_die("bias");
        }
        out
    }

    fn rotary(&self, qkv: &mut GpuMatrix<T>, shape: QkvShape, rope: &RopeRows) {
        let (cos, sin) = (self.upload(&rope.cos), self.upload(&rope.sin));
        self.kernels
            .rotary_table(
                &mut qkv.data,
                qkv.cols,
                &cos,
                &sin,
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
        slot_mapping: &[i64],
    ) {
        let slots = self.upload(slot_mapping);
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
                &slots,
            )
            .or_die("write_kv");
    }

    fn attention(
        &self,
        qkv: &GpuMatrix<T>,
        cache: &GpuKvCache<T>,
        layer: usize,
        shape: QkvShape,
        seqs: &[SeqSlice],
    ) -> GpuMatrix<T> {
        let rows: usize = seqs.iter().map(|s| s.query_len).sum();
        let mut out = self.zeros(rows, shape.q_size());
        if seqs.is_empty() {
            return out;
        }
        let max_blocks = seqs
            .iter()
            .map(|s| s.block_table.len())
            .max()
            .unwrap_or(1)
            .max(1);
        let mut tables = vec![0i32; seqs.len() * max_blocks];
        for (i, s) in seqs.iter().enumerate() {
            for (j, &b) in s.block_table.iter().enumerate() {
                tables[i * max_blocks + j] = b as i32;
            }
        }
        let lens: Vec<i32> = seqs.iter().map(|s| s.context_len as i32).collect();
        let (tables, lens) = (self.upload(&tables), self.upload(&lens));
        let paged = PagedCache {
            k: &cache.k[layer],
            v: &cache.v[layer],
            block_tables: &tables,
            max_blocks,
            context_lens: &lens,
            block_size: cache.layout.block_size,
            num_kv_heads: shape.num_kv_heads,
            head_dim: shape.head_dim,
        };
        let scale = 1.0 / (shape.head_dim as f32).sqrt();
        let q = qkv.data.slice(..);
        // Decode steps (one new token per sequence, packed in order) take the decode kernel;
        // anything else the prefill kernel, which also handles one-token rows.
        let decode = seqs
            .iter()
            .enumerate()
            .all(|(i, s)| s.query_len == 1 && s.query_start == i);
        if decode {
            let max_context = seqs.iter().map(|s| s.context_len).max().unwrap_or(1);
            self.kernels
                .decode_attention(
                    &mut out.data,
                    &q,
                    qkv.cols,
                    &paged,
                    shape.num_heads,
                    max_context,
                    scale,
                    llmctl_kernels::cuda::Split::Auto,
                )
                .or_die("decode attention");
        } else {
            let mut cu = Vec::with_capacity(seqs.len() + 1);
            cu.push(seqs[0].query_start as i32);
            for s in seqs {
                assert_eq!(
                    s.query_start as i32,
                    *cu.last().expect("starts with one entry"),
                    "sequences are packed in order"
                );
                cu.push((s.query_start + s.query_len) as i32);
            }
            let max_q = seqs.iter().map(|s| s.query_len).max().unwrap_or(0);
            let cu = self.upload(&cu);
            self.kernels
                .prefill_attention(
                    &mut out.data,
                    &q,
                    qkv.cols,
                    &paged,
                    &cu,
                    shape.num_heads,
                    max_q,
                    scale,
                )
                .or_die("prefill attention");
        }
        out
    }

    fn silu_mul(&self, gate_up: &GpuMatrix<T>) -> GpuMatrix<T> {
        let inter = gate_up.cols / 2;
        let mut out = self.zeros(gate_up.rows, inter);
        self.kernels
            .silu_mul(&mut out.data, &gate_up.data, inter)
            .or_die("silu_mul");
        out
    }

    fn gather_rows(&self, x: &GpuMatrix<T>, rows: &[usize]) -> GpuMatrix<T> {
        let ids: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
        self.embed(x, &ids)
    }

    fn argmax_rows(&self, x: &GpuMatrix<T>) -> Vec<u32> {
        let mut ids = self
            .stream
            .alloc_zeros::<i32>(x.rows)
            .or_die("allocating argmax ids");
        self.kernels
            .argmax(&x.data, x.cols, &mut ids)
            .or_die("argmax");
        self.stream
            .clone_dtoh(&ids)
            .or_die("copying argmax ids to the host")
            .into_iter()
            .map(|i| i as u32)
            .collect()
    }

    fn to_host(&self, x: &GpuMatrix<T>) -> Vec<f32> {
        self.stream
            .clone_dtoh(&x.data)
            .or_die("copying to the host")
            .into_iter()
            .map(T::to_f32)
            .collect()
    }

    fn synchronize(&self) {
        self.stream.synchronize().or_die("waiting for the stream");
    }
}
