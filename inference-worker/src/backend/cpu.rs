//! The CPU backend: every op of [`Backend`] in f32, multi-threaded with rayon. GEMMs with many
//! rows go through the `gemm` crate; with few rows (decode) they are memory-bound, so a row-dot
//! kernel that reads each weight row once for all batch rows is faster. This backend is the
//! reference the CUDA backend is checked against.

use rayon::prelude::*;

use super::{Backend, KvLayout, LogitEdit, QkvShape, RopeRows, StepBatch};
use crate::model::ModelError;
use crate::model::weights::{TensorView, fuse_f32};

/// A row-major f32 matrix: activations and weights alike.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl Matrix {
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self {
            data: vec![0.0; rows * cols],
            rows,
            cols,
        }
    }

    pub fn row(&self, r: usize) -> &[f32] {
        &self.data[r * self.cols..(r + 1) * self.cols]
    }
}

/// K and V caches per layer in the shared NHD layout.
pub struct CpuKvCache {
    pub layout: KvLayout,
    pub k: Vec<Vec<f32>>,
    pub v: Vec<Vec<f32>>,
}

/// A step's inputs: on the CPU the ops read them where they are, so the batch is kept as given.
pub struct CpuStep {
    pub batch: StepBatch,
    pub rope: RopeRows,
}

/// Rows at or below this count use the row-dot kernel instead of the blocked GEMM.
const SMALL_M: usize = 8;

#[derive(Default)]
pub struct CpuBackend;

impl CpuBackend {
    pub fn new() -> Self {
        Self
    }
}

impl Backend for CpuBackend {
    type Activations = Matrix;
    type Weight = Matrix;
    type KvCache = CpuKvCache;
    type Step = CpuStep;

    fn name(&self) -> &'static str {
        "cpu"
    }

    fn prepare_step(&self, batch: &StepBatch, rope: RopeRows) -> CpuStep {
        CpuStep {
            batch: batch.clone(),
            rope,
        }
    }

    fn load_weight(&self, parts: &[TensorView<'_>]) -> Result<Matrix, ModelError> {
        let (data, rows, cols) = fuse_f32(parts)?;
        Ok(Matrix { data, rows, cols })
    }

    fn alloc_kv_cache(&self, num_layers: usize, layout: KvLayout) -> CpuKvCache {
        let n = layout.elements();
        CpuKvCache {
            layout,
            k: (0..num_layers).map(|_| vec![0.0; n]).collect(),
            v: (0..num_layers).map(|_| vec![0.0; n]).collect(),
        }
    }

    fn embed(&self, table: &Matrix, step: &CpuStep) -> Matrix {
        let tokens = &step.batch.tokens;
        let mut out = Matrix::zeros(tokens.len(), table.cols);
        for (dst, &t) in out.data.chunks_exact_mut(table.cols).zip(tokens) {
            dst.copy_from_slice(table.row(t as usize));
        }
        out
    }

    fn rms_norm(&self, x: &Matrix, weight: &Matrix, eps: f32) -> Matrix {
        let mut out = Matrix::zeros(x.rows, x.cols);
        out.data
            .par_chunks_exact_mut(x.cols)
            .zip(x.data.par_chunks_exact(x.cols))
            .for_each(|(dst, src)| {
                rms_norm_row(src, &weight.data, eps, dst);
            });
        out
    }

    fn add_rms_norm(
        &self,
        residual: &mut Matrix,
        delta: &Matrix,
        weight: &Matrix,
        eps: f32,
    ) -> Matrix {
        let cols = residual.cols;
        let mut out = Matrix::zeros(residual.rows, cols);
        out.data
            .par_chunks_exact_mut(cols)
            .zip(residual.data.par_chunks_exact_mut(cols))
            .zip(delta.data.par_chunks_exact(cols))
            .for_each(|((dst, res), d)| {
                for (r, d) in res.iter_mut().zip(d) {
                    *r += d;
                }
                rms_norm_row(res, &weight.data, eps, dst);
            });
        out
    }

    fn linear(&self, x: &Matrix, weight: &Matrix, bias: Option<&Matrix>) -> Matrix {
        assert_eq!(
            x.cols, weight.cols,
            "linear: input width must equal the weight's in-features"
        );
        let (m, k, n) = (x.rows, x.cols, weight.rows);
        let mut out = Matrix::zeros(m, n);
        if m <= SMALL_M {
            row_dot_matmul(&x.data, m, k, &weight.data, n, &mut out.data);
        } else {
            // SAFETY: `out` is m×n row-major (col stride 1, row stride n), `x` is m×k row-major,
            // and `weight` is n×k row-major, read as its transpose k×n (row stride 1, column
            // stride k); all three buffers have exactly those sizes (asserted/allocated above).
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    out.data.as_mut_ptr(),
                    1,
                    n as isize,
                    false,
                    x.data.as_ptr(),
                    1,
                    k as isize,
                    weight.data.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                );
            }
        }
        if let Some(b) = bias {
            for row in out.data.chunks_exact_mut(n) {
                for (o, b) in row.iter_mut().zip(&b.data) {
                    *o += b;
                }
            }
        }
        out
    }

    fn rotary(&self, qkv: &mut Matrix, shape: QkvShape, step: &CpuStep) {
        let rope = &step.rope;
        let (hd, half) = (shape.head_dim, rope.half);
        let heads = shape.num_heads + shape.num_kv_heads;
        qkv.data
            .par_chunks_exact_mut(qkv.cols)
            .enumerate()
            .for_each(|(t, row)| {
                let cos = &rope.cos[t * half..(t + 1) * half];
                let sin = &rope.sin[t * half..(t + 1) * half];
                for h in 0..heads {
                    let x = &mut row[h * hd..(h + 1) * hd];
                    for i in 0..half {
                        let (a, b) = (x[i], x[i + half]);
                        x[i] = a * cos[i] - b * sin[i];
                        x[i + half] = b * cos[i] + a * sin[i];
                    }
                }
            });
    }

    fn write_kv(
        &self,
        cache: &mut CpuKvCache,
        layer: usize,
        qkv: &Matrix,
        shape: QkvShape,
        step: &CpuStep,
    ) {
        let slot_mapping = &step.batch.slot_mapping;
        let (q, kv) = (shape.q_size(), shape.kv_size());
        let stride = cache.layout.token_stride();
        let (kc, vc) = (&mut cache.k[layer], &mut cache.v[layer]);
        for (t, &slot) in slot_mapping.iter().enumerate() {
            if slot < 0 {
                continue;
            }
            let row = qkv.row(t);
            let at = slot as usize * stride;
            kc[at..at + kv].copy_from_slice(&row[q..q + kv]);
            vc[at..at + kv].copy_from_slice(&row[q + kv..q + 2 * kv]);
        }
    }

    fn attention(
        &self,
        qkv: &Matrix,
        cache: &CpuKvCache,
        layer: usize,
        shape: QkvShape,
        step: &CpuStep,
    ) -> Matrix {
        let seqs = &step.batch.seqs;
        let hd = shape.head_dim;
        let group = shape.num_heads / shape.num_kv_heads;
        let scale = 1.0 / (hd as f32).sqrt();
        let layout = cache.layout;
        let (kc, vc) = (&cache.k[layer], &cache.v[layer]);
        let tasks: Vec<(usize, usize)> = (0..seqs.len())
            .flat_map(|s| (0..shape.num_kv_heads).map(move |h| (s, h)))
            .collect();
        // Each task: one sequence and one KV head; it gathers that head's K/V once and serves
        // every query head of its GQA group.
        let results: Vec<Vec<f32>> = tasks
            .par_iter()
            .map(|&(s, kvh)| {
                let seq = &seqs[s];
                let ctx = seq.context_len;
                let mut keys = Vec::with_capacity(ctx * hd);
                let mut values = Vec::with_capacity(ctx * hd);
                for p in 0..ctx {
                    let at = layout.offset(layout.slot(&seq.block_table, p), kvh);
                    keys.extend_from_slice(&kc[at..at + hd]);
                    values.extend_from_slice(&vc[at..at + hd]);
                }
                let mut out = vec![0.0f32; group * seq.query_len * hd];
                let mut scores = vec![0.0f32; ctx];
                for g in 0..group {
                    let head = kvh * group + g;
                    for i in 0..seq.query_len {
                        let q = &qkv.row(seq.query_start + i)[head * hd..(head + 1) * hd];
                        let visible = ctx - seq.query_len + i + 1;
                        let mut max = f32::NEG_INFINITY;
                        for (j, score) in scores[..visible].iter_mut().enumerate() {
                            *score = dot(q, &keys[j * hd..(j + 1) * hd]) * scale;
                            max = max.max(*score);
                        }
                        let mut sum = 0.0f32;
                        for score in &mut scores[..visible] {
                            *score = (*score - max).exp();
                            sum += *score;
                        }
                        let dst = &mut out[(g * seq.query_len + i) * hd..][..hd];
                        for (j, &w) in scores[..visible].iter().enumerate() {
                            let w = w / sum;
                            for (o, v) in dst.iter_mut().zip(&values[j * hd..(j + 1) * hd]) {
                                *o += w * v;
                            }
                        }
                    }
                }
                out
            })
            .collect();
        let total: usize = seqs.iter().map(|s| s.query_len).sum();
        let mut out = Matrix::zeros(total, shape.q_size());
        for (&(s, kvh), res) in tasks.iter().zip(&results) {
            let seq = &seqs[s];
            for g in 0..group {
                let head = kvh * group + g;
                for i in 0..seq.query_len {
                    let row = seq.query_start + i;
                    out.data[row * out.cols + head * hd..][..hd]
                        .copy_from_slice(&res[(g * seq.query_len + i) * hd..][..hd]);
                }
            }
        }
        out
    }

    fn silu_mul(&self, gate_up: &Matrix) -> Matrix {
        let inter = gate_up.cols / 2;
        let mut out = Matrix::zeros(gate_up.rows, inter);
        out.data
            .par_chunks_exact_mut(inter)
            .zip(gate_up.data.par_chunks_exact(gate_up.cols))
            .for_each(|(dst, src)| {
                let (gate, up) = src.split_at(inter);
                for ((d, g), u) in dst.iter_mut().zip(gate).zip(up) {
                    *d = g / (1.0 + (-g).exp()) * u;
                }
            });
        out
    }

    fn keep_logits_rows(&self, x: &mut Matrix, step: &CpuStep) {
        let rows = &step.batch.logits_rows;
        if rows.iter().copied().eq(0..x.rows) {
            return;
        }
        let mut kept = Matrix::zeros(rows.len(), x.cols);
        for (dst, &r) in kept.data.chunks_exact_mut(x.cols).zip(rows) {
            dst.copy_from_slice(x.row(r));
        }
        *x = kept;
    }

    fn shape(&self, x: &Matrix) -> (usize, usize) {
        (x.rows, x.cols)
    }

    fn edit_logits(&self, x: &mut Matrix, edits: &[LogitEdit]) {
        super::edit_logits_on_host(&mut x.data, x.cols, edits);
    }

    fn draw_rows(&self, x: &Matrix, temperature: &[f32], u: &[f64]) -> Vec<u32> {
        super::draw_rows_on_host(&x.data, x.cols, temperature, u)
    }

    fn softmax_mass_rows(&self, x: &Matrix, temperature: &[f32]) -> Vec<f64> {
        super::softmax_mass_rows_on_host(&x.data, x.cols, temperature)
    }

    fn top_k_rows(&self, x: &Matrix, rows: usize, k: usize) -> (Vec<f32>, Vec<u32>) {
        super::top_k_rows_on_host(&x.data, x.cols, rows, k)
    }

    fn logits_at(&self, x: &Matrix, at: &[(usize, u32)]) -> Vec<f32> {
        super::logits_at_on_host(&x.data, x.cols, at)
    }

    fn to_host(&self, x: &Matrix) -> Vec<f32> {
        x.data.clone()
    }
}

fn rms_norm_row(src: &[f32], weight: &[f32], eps: f32, dst: &mut [f32]) {
    let mean_sq = src.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / src.len() as f64;
    let inv = (1.0 / (mean_sq + eps as f64).sqrt()) as f32;
    for ((d, s), w) in dst.iter_mut().zip(src).zip(weight) {
        *d = w * (s * inv);
    }
}

/// Dot product with eight independent accumulators (vectorisable without reassociation flags).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ac, ar) = a.split_at(a.len() / 8 * 8);
    let (bc, br) = b.split_at(ac.len());
    for (x, y) in ac.chunks_exact(8).zip(bc.chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut sum = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ar.iter().zip(br) {
        sum += x * y;
    }
    sum
}

/// `out[m×n] = x[m×k] · w[n×k]ᵀ` for few rows (decode): memory-bound, so each weight row is
/// read once and used for every input row. Threads split the output columns in blocks.
fn row_dot_matmul(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
    const BLOCK: usize = 32;
    let mut transposed = vec![0.0f32; n * m];
    transposed
        .par_chunks_mut(BLOCK * m)
        .enumerate()
        .for_each(|(b, chunk)| {
            let first = b * BLOCK;
            let rows = chunk.len() / m;
            // With one input row the loop is bound by memory bandwidth and the plain dot streams
            // best (measured); with several, FMA tiles that reuse each weight load win.
            #[cfg(target_arch = "x86_64")]
            if m > 1
                && std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                // SAFETY: AVX2 and FMA are present (checked above); `x` holds m×k and the weight
                // rows first..first+rows each hold k elements, as `fma::block` requires.
                unsafe { fma::block(x, m, k, &w[first * k..(first + rows) * k], chunk) };
                return;
            }
            for (j, dst) in chunk.chunks_exact_mut(m).enumerate() {
                let wrow = &w[(first + j) * k..(first + j + 1) * k];
                for (i, d) in dst.iter_mut().enumerate() {
                    *d = dot(&x[i * k..(i + 1) * k], wrow);
                }
            }
        });
    for j in 0..n {
        for i in 0..m {
            out[i * n + j] = transposed[j * m + i];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod fma {
    use std::arch::x86_64::*;

    /// `dst[j*m + i] = x_i · w_j` for all weight rows `w` (each `k` long) and input rows `x`.
    /// Each weight row is streamed once, against up to four input rows at a time.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn block(x: &[f32], m: usize, k: usize, w: &[f32], dst: &mut [f32]) {
        for (j, wrow) in w.chunks_exact(k).enumerate() {
            let mut i = 0;
            while i < m {
                let r = (m - i).min(4);
                let out = &mut dst[j * m + i..j * m + i + r];
                match r {
                    4 => tile::<4>(&x[i * k..], k, wrow, out),
                    3 => tile::<3>(&x[i * k..], k, wrow, out),
                    2 => tile::<2>(&x[i * k..], k, wrow, out),
                    _ => tile::<1>(&x[i * k..], k, wrow, out),
                }
                i += r;
            }
        }
    }

    /// Dot products of the first `R` rows of `xs` (each `k` long) with `wrow`.
    #[target_feature(enable = "avx2,fma")]
    fn tile<const R: usize>(xs: &[f32], k: usize, wrow: &[f32], out: &mut [f32]) {
        assert!(xs.len() >= R * k && wrow.len() == k && out.len() == R);
        // Two accumulators per row (even and odd chunks of 8) hide the FMA latency.
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        let mut p = 0;
        while p + 16 <= k {
            // SAFETY: p + 16 <= k, wrow is k long and xs holds R rows of k (asserted above).
            unsafe {
                let a = _mm256_loadu_ps(wrow.as_ptr().add(p));
                let b = _mm256_loadu_ps(wrow.as_ptr().add(p + 8));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let row = xs.as_ptr().add(r * k + p);
                    acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(row), a, acc[0]);
                    acc[1] = _mm256_fmadd_ps(_mm256_loadu_ps(row.add(8)), b, acc[1]);
                }
            }
            p += 16;
        }
        for (r, acc) in acc.iter().enumerate() {
            let mut lanes = [0.0f32; 8];
            // SAFETY: `lanes` has room for eight f32.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), _mm256_add_ps(acc[0], acc[1])) };
            let mut s = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5]))
                + ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
            for q in p..k {
                s += xs[r * k + q] * wrow[q];
            }
            out[r] = s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f64> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                    .sum();
            }
        }
        out
    }

    #[test]
    fn linear_matches_f64_reference_for_small_and_large_batches() {
        let (k, n) = (77, 130);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let weight = Matrix {
            data: w.clone(),
            rows: n,
            cols: k,
        };
        let bias = Matrix {
            data: (0..n).map(|i| i as f32 * 0.01).collect(),
            rows: 1,
            cols: n,
        };
        for m in [1, 3, 8, 9, 40] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) / 14.0)
                .collect();
            let out = CpuBackend.linear(
                &Matrix {
                    data: x.clone(),
                    rows: m,
                    cols: k,
                },
                &weight,
                Some(&bias),
            );
            let want = naive(&x, m, k, &w, n);
            for (idx, (&got, &want)) in out.data.iter().zip(&want).enumerate() {
                let want = want + bias.data[idx % n] as f64;
                // 77 products of magnitude <= 1 summed in f32: error well under 1e-4.
                assert!(
                    (got as f64 - want).abs() < 1e-4,
                    "m={m} idx={idx}: {got} vs {want}"
                );
            }
        }
    }
}

#[cfg(test)]
mod attention_tests {
    use super::*;
    use crate::backend::SeqSlice;
    use crate::rng::Rng;

    /// Causal attention over contiguous K/V in f64: the reference paged attention must equal.
    fn contiguous_reference(
        q: &[f32],
        k: &[f32],
        v: &[f32],
        shape: QkvShape,
        ctx: usize,
        query_len: usize,
    ) -> Vec<f64> {
        let (hd, group) = (shape.head_dim, shape.num_heads / shape.num_kv_heads);
        let kvw = shape.kv_size();
        let mut out = vec![0.0f64; query_len * shape.q_size()];
        for i in 0..query_len {
            let visible = ctx - query_len + i + 1;
            for h in 0..shape.num_heads {
                let kvh = h / group;
                let qv = &q[i * shape.q_size() + h * hd..][..hd];
                let scores: Vec<f64> = (0..visible)
                    .map(|j| {
                        let kr = &k[j * kvw + kvh * hd..][..hd];
                        qv.iter()
                            .zip(kr)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                for (j, s) in scores.iter().enumerate() {
                    let w = (s - max).exp() / z;
                    for d in 0..hd {
                        out[i * shape.q_size() + h * hd + d] +=
                            w * v[j * kvw + kvh * hd + d] as f64;
                    }
                }
            }
        }
        out
    }

    #[test]
    fn paged_attention_equals_contiguous_attention() {
        let shape = QkvShape {
            num_heads: 6,
            num_kv_heads: 2,
            head_dim: 16,
        };
        let layout = KvLayout {
            num_blocks: 40,
            block_size: 4,
            num_kv_heads: 2,
            head_dim: 16,
        };
        let mut rng = Rng::new(11);
        let mut rand = |n: usize| (0..n).map(|_| rng.normal() as f32).collect::<Vec<f32>>();
        // Ragged batch: (context, new tokens) — a prefill, a chunk after a cached prefix, decodes.
        let cases = [(13usize, 13usize), (22, 5), (9, 1), (31, 1)];
        // Scattered, interleaved block tables.
        let mut free: Vec<u32> = (0..layout.num_blocks as u32).rev().step_by(1).collect();
        free.sort_by_key(|b| (b * 7) % 40);
        let backend = CpuBackend::new();
        let mut cache = backend.alloc_kv_cache(1, layout);
        let mut seqs = Vec::new();
        let mut all_q = Vec::new();
        let mut contiguous = Vec::new();
        let mut query_start = 0;
        for &(ctx, new) in &cases {
            let table: Vec<u32> = (0..ctx.div_ceil(4)).map(|_| free.pop().unwrap()).collect();
            let (k, v) = (rand(ctx * shape.kv_size()), rand(ctx * shape.kv_size()));
            let q = rand(new * shape.q_size());
            // Write every token's K/V through the slot mapping, as steps would have.
            let mut qkv = Matrix::zeros(ctx, shape.width());
            for t in 0..ctx {
                let row = &mut qkv.data[t * shape.width()..(t + 1) * shape.width()];
                row[shape.q_size()..shape.q_size() + shape.kv_size()]
                    .copy_from_slice(&k[t * shape.kv_size()..][..shape.kv_size()]);
                row[shape.q_size() + shape.kv_size()..]
                    .copy_from_slice(&v[t * shape.kv_size()..][..shape.kv_size()]);
            }
            let slots: Vec<i64> = (0..ctx).map(|p| layout.slot(&table, p) as i64).collect();
            let step = CpuStep {
                batch: StepBatch {
                    slot_mapping: slots,
                    ..StepBatch::default()
                },
                rope: RopeRows::new(&[], &[]),
            };
            backend.write_kv(&mut cache, 0, &qkv, shape, &step);
            contiguous.push(contiguous_reference(&q, &k, &v, shape, ctx, new));
            all_q.push(q);
            seqs.push(SeqSlice {
                query_start,
                query_len: new,
                context_len: ctx,
                block_table: table,
            });
            query_start += new;
        }
        let mut qkv = Matrix::zeros(query_start, shape.width());
        for (s, q) in seqs.iter().zip(&all_q) {
            for i in 0..s.query_len {
                qkv.data[(s.query_start + i) * shape.width()..][..shape.q_size()]
                    .copy_from_slice(&q[i * shape.q_size()..][..shape.q_size()]);
            }
        }
        let step = CpuStep {
            batch: StepBatch {
                seqs,
                ..StepBatch::default()
            },
            rope: RopeRows::new(&[], &[]),
        };
        let out = backend.attention(&qkv, &cache, 0, shape, &step);
        for (s, want) in step.batch.seqs.iter().zip(&contiguous) {
            let got = &out.data[s.query_start * shape.q_size()..][..s.query_len * shape.q_size()];
            for (g, w) in got.iter().zip(want) {
                // Softmax-weighted sums of unit normals over <= 31 keys in f32: error ~1e-6.
                assert!((*g as f64 - w).abs() < 1e-5, "{g} vs {w}");
            }
        }
    }
}
