//! CPU references for every kernel: plain loops in f64, written for clarity, not speed. The GPU
//! tests feed a kernel and its reference the same inputs (already rounded to the kernel's
//! storage type) and compare within the tolerance of that type.

use crate::kv_layout::KvLayout;

/// A small deterministic generator for test inputs (SplitMix64).
pub struct TestRng(u64);

impl TestRng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform()).collect()
    }
}

/// `x / rms(x) * weight` per row of `hidden`.
pub fn rms_norm(x: &[f32], weight: &[f32], hidden: usize, eps: f32) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks(hidden) {
        let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / hidden as f64;
        let inv = 1.0 / (ms + eps as f64).sqrt();
        out.extend(
            row.iter()
                .zip(weight)
                .map(|(&v, &w)| v as f64 * inv * w as f64),
        );
    }
    out
}

/// `residual += delta` (rounded with `round`, as the kernel stores it), then the norm of the
/// new residual. Returns (new residual, output).
pub fn add_rms_norm(
    residual: &[f32],
    delta: &[f32],
    weight: &[f32],
    hidden: usize,
    eps: f32,
    round: impl Fn(f32) -> f32,
) -> (Vec<f32>, Vec<f64>) {
    let sum: Vec<f32> = residual
        .iter()
        .zip(delta)
        .map(|(&r, &d)| round(r + d))
        .collect();
    let out = rms_norm(&sum, weight, hidden, eps);
    (sum, out)
}

/// Hugging Face "rotate half" rotary embedding of the first `num_q_heads + num_kv_heads` heads
/// of each row (row stride `row_stride`); the angle is `position * inv_freq[i]` rounded to f32.
pub fn rotary(
    qk: &[f32],
    row_stride: usize,
    positions: &[i32],
    inv_freq: &[f32],
    heads: usize,
    head_dim: usize,
) -> Vec<f64> {
    let half = head_dim / 2;
    let mut out: Vec<f64> = qk.iter().map(|&v| v as f64).collect();
    for (t, &p) in positions.iter().enumerate() {
        for h in 0..heads {
            let base = t * row_stride + h * head_dim;
            for j in 0..half {
                let angle = (p as f32 * inv_freq[j]) as f64;
                let (s, c) = angle.sin_cos();
                let (a, b) = (qk[base + j] as f64, qk[base + j + half] as f64);
                out[base + j] = a * c - b * s;
                out[base + j + half] = b * c + a * s;
            }
        }
    }
    out
}

/// Rotate-half rotary embedding with per-token angle tables `cos`/`sin` (`[tokens, head_dim/2]`).
pub fn rotary_table(
    qk: &[f32],
    row_stride: usize,
    cos: &[f32],
    sin: &[f32],
    heads: usize,
    head_dim: usize,
) -> Vec<f64> {
    let half = head_dim / 2;
    let mut out: Vec<f64> = qk.iter().map(|&v| v as f64).collect();
    for t in 0..cos.len() / half {
        for h in 0..heads {
            let base = t * row_stride + h * head_dim;
            for j in 0..half {
                let (c, s) = (cos[t * half + j] as f64, sin[t * half + j] as f64);
                let (a, b) = (qk[base + j] as f64, qk[base + j + half] as f64);
                out[base + j] = a * c - b * s;
                out[base + j + half] = b * c + a * s;
            }
        }
    }
    out
}

/// `x[r] + bias` for every row.
pub fn add_bias(x: &[f32], bias: &[f32]) -> Vec<f64> {
    x.iter()
        .enumerate()
        .map(|(i, &v)| v as f64 + bias[i % bias.len()] as f64)
        .collect()
}

/// `x · wᵀ` for the rows of `x` (each `k` wide) and `w` `[n, k]`, summed in f64.
pub fn matmul_t(x: &[f32], w: &[f32], k: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(x.len() / k * (w.len() / k));
    for row in x.chunks(k) {
        for wr in w.chunks(k) {
            out.push(row.iter().zip(wr).map(|(&a, &b)| a as f64 * b as f64).sum());
        }
    }
    out
}

/// `silu(gate) * up` for rows of `[gate | up]`, each `inter` wide.
pub fn silu_mul(gate_up: &[f32], inter: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(gate_up.len() / 2);
    for row in gate_up.chunks(2 * inter) {
        for j in 0..inter {
            let g = row[j] as f64;
            out.push(g / (1.0 + (-g).exp()) * row[inter + j] as f64);
        }
    }
    out
}

/// Rows of `table` for `ids`; ids outside the vocabulary give zero rows.
pub fn embed(table: &[f32], ids: &[u32], hidden: usize) -> Vec<f32> {
    let vocab = table.len() / hidden;
    let mut out = Vec::with_capacity(ids.len() * hidden);
    for &id in ids {
        if (id as usize) < vocab {
            out.extend_from_slice(&table[id as usize * hidden..][..hidden]);
        } else {
            out.extend(std::iter::repeat_n(0.0, hidden));
        }
    }
    out
}

/// Scatters rows of `k` and `v` (stride `row_stride`, `width` elements each) to their slots.
pub fn write_kv(
    k: &[f32],
    v: &[f32],
    row_stride: usize,
    width: usize,
    slots: &[i64],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
) {
    for (t, &slot) in slots.iter().enumerate() {
        if slot < 0 {
            continue;
        }
        let dst = slot as usize * width;
        k_cache[dst..dst + width].copy_from_slice(&k[t * row_stride..][..width]);
        v_cache[dst..dst + width].copy_from_slice(&v[t * row_stride..][..width]);
    }
}

/// Ranking of the sampling kernels: higher value first, ties to the lower id, NaN as -inf.
fn ranked(row: &[f32]) -> Vec<(f32, usize)> {
    let mut v: Vec<(f32, usize)> = row
        .iter()
        .enumerate()
        .map(|(i, &x)| (if x.is_nan() { f32::NEG_INFINITY } else { x }, i))
        .collect();
    v.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    v
}

pub fn argmax(logits: &[f32], vocab: usize) -> Vec<i32> {
    logits
        .chunks(vocab)
        .map(|row| ranked(row)[0].1 as i32)
        .collect()
}

/// The `k` best (value, id) of each row, best first; missing entries are (-inf, -1).
pub fn top_k(logits: &[f32], vocab: usize, k: usize) -> (Vec<f32>, Vec<i32>) {
    let (mut values, mut ids) = (Vec::new(), Vec::new());
    for row in logits.chunks(vocab) {
        let r = ranked(row);
        for n in 0..k {
            let (v, i) = r
                .get(n)
                .map_or((f32::NEG_INFINITY, -1), |&(v, i)| (v, i as i32));
            values.push(v);
            ids.push(i);
        }
    }
    (values, ids)
}

/// The running sum of each token's softmax weight `exp((l - max) / temperature)` in token
/// order (NaN and -inf weigh nothing): entry `i` is the mass of tokens `0..=i`, the last the
/// row's total. A draw with uniform `u` takes the first token whose entry exceeds `u` times the
/// total.
pub fn softmax_cumulative(row: &[f32], temperature: f32) -> Vec<f64> {
    let max = row
        .iter()
        .filter(|v| !v.is_nan())
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
    let mut sum = 0.0;
    row.iter()
        .map(|&v| {
            if !v.is_nan() && v != f32::NEG_INFINITY {
                sum += ((v as f64 - max) / temperature as f64).exp();
            }
            sum
        })
        .collect()
}

/// One sequence of an attention batch: `q_len` query rows from row `q_start` of the packed
/// queries, the last `q_len` of its `context_len` tokens (whose K/V are all in the cache).
#[derive(Clone, Debug)]
pub struct SeqAttention {
    pub q_start: usize,
    pub q_len: usize,
    pub context_len: usize,
    pub block_table: Vec<u32>,
}

/// One layer's paged K and V caches.
#[derive(Clone, Copy, Debug)]
pub struct PagedKv<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
    pub layout: KvLayout,
}

/// Causal attention over the paged cache; returns `[rows, num_q_heads * head_dim]` with
/// `rows = sum of q_len`, in packed order.
pub fn paged_attention(
    q: &[f32],
    q_stride: usize,
    cache: PagedKv<'_>,
    num_q_heads: usize,
    seqs: &[SeqAttention],
    scale: f32,
) -> Vec<f64> {
    let PagedKv {
        k: k_cache,
        v: v_cache,
        layout,
    } = cache;
    let d = layout.head_dim;
    let group = num_q_heads / layout.num_kv_heads;
    let rows: usize = seqs.iter().map(|s| s.q_len).sum();
    let mut out = vec![0.0; rows * num_q_heads * d];
    for s in seqs {
        for i in 0..s.q_len {
            let pos = s.context_len - s.q_len + i;
            let row = s.q_start + i;
            for h in 0..num_q_heads {
                let kvh = h / group;
                let qv = &q[row * q_stride + h * d..][..d];
                let scores: Vec<f64> = (0..=pos)
                    .map(|t| {
                        let off = layout.offset(layout.slot(&s.block_table, t), kvh);
                        let k = &k_cache[off..off + d];
                        qv.iter()
                            .zip(k)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            * scale as f64
                    })
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let total: f64 = weights.iter().sum();
                let o = &mut out[(row * num_q_heads + h) * d..][..d];
                for (t, w) in weights.iter().enumerate() {
                    let off = layout.offset(layout.slot(&s.block_table, t), kvh);
                    for (x, &v) in o.iter_mut().zip(&v_cache[off..off + d]) {
                        *x += w / total * v as f64;
                    }
                }
            }
        }
    }
    out
}

/// Split-KV choice for decode: how many partitions each sequence's context is cut into, and
/// how many tokens each holds. A CTA walks its partition in iterations of a few dozen tokens
/// (32 for bf16 at head size 128), each a round trip to memory that the next waits for, so a
/// grid of few CTAs over long partitions is latency-bound: batch 1 at 512 tokens is 8 CTAs of
/// 16 iterations for an 8-KV-head model. One partition when the grid already fills the GPU (at
/// least two CTAs per SM) or contexts are at most two partitions; otherwise enough partitions
/// of at least 64 tokens for four CTAs per SM (as many as the decode kernel's registers let one
/// SM hold, each with its rows' loads in flight), which the last of them to finish merges.
pub fn decode_partitions(
    num_seqs: usize,
    kv_head_ctas: usize,
    max_context: usize,
    sm_count: usize,
) -> (usize, usize) {
    const MIN_PARTITION: usize = 64;
    let ctas = num_seqs * kv_head_ctas;
    let max_context = max_context.max(1);
    if ctas >= 2 * sm_count || max_context <= 2 * MIN_PARTITION {
        return (1, max_context);
    }
    let wanted = (4 * sm_count).div_ceil(ctas);
    let parts = wanted.min(max_context.div_ceil(MIN_PARTITION)).max(1);
    (parts, max_context.div_ceil(parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The paged reference equals plain causal attention over contiguous K/V, whatever the
    /// block table's order, for ragged sequences and GQA.
    #[test]
    fn paged_attention_matches_dense_causal_attention() {
        let mut rng = TestRng::new(7);
        let (q_heads, kv_heads, d, bs) = (8, 2, 16, 4);
        let lens = [(3usize, 9usize), (1, 5), (6, 6)]; // (q_len, context_len)
        let num_blocks = 16;
        let layout = KvLayout {
            num_blocks,
            block_size: bs,
            num_kv_heads: kv_heads,
            head_dim: d,
        };
        let mut k_cache = vec![0.0; layout.elements()];
        let mut v_cache = vec![0.0; layout.elements()];
        // Hand out blocks in a scrambled order.
        let mut free: Vec<u32> = (0..num_blocks as u32).rev().collect();
        free.swap(0, 7);
        let mut seqs = Vec::new();
        let mut dense = Vec::new();
        let mut q_start = 0;
        for &(q_len, ctx) in &lens {
            let table: Vec<u32> = (0..ctx.div_ceil(bs)).map(|_| free.pop().unwrap()).collect();
            let k = rng.vec(ctx * kv_heads * d);
            let v = rng.vec(ctx * kv_heads * d);
            let slots: Vec<i64> = (0..ctx).map(|t| layout.slot(&table, t) as i64).collect();
            write_kv(
                &k,
                &v,
                kv_heads * d,
                kv_heads * d,
                &slots,
                &mut k_cache,
                &mut v_cache,
            );
            dense.push((k, v));
            seqs.push(SeqAttention {
                q_start,
                q_len,
                context_len: ctx,
                block_table: table,
            });
            q_start += q_len;
        }
        let q = rng.vec(q_start * q_heads * d);
        let scale = 0.25;
        let cache = PagedKv {
            k: &k_cache,
            v: &v_cache,
            layout,
        };
        let got = paged_attention(&q, q_heads * d, cache, q_heads, &seqs, scale);
        for (s, (k, v)) in seqs.iter().zip(&dense) {
            for i in 0..s.q_len {
                let pos = s.context_len - s.q_len + i;
                for h in 0..q_heads {
                    let kvh = h / (q_heads / kv_heads);
                    let qv = &q[((s.q_start + i) * q_heads + h) * d..][..d];
                    let scores: Vec<f64> = (0..=pos)
                        .map(|t| {
                            (0..d)
                                .map(|x| qv[x] as f64 * k[(t * kv_heads + kvh) * d + x] as f64)
                                .sum::<f64>()
                                * scale as f64
                        })
                        .collect();
                    let max = scores.iter().cloned().fold(f64::MIN, f64::max);
                    let total: f64 = scores.iter().map(|x| (x - max).exp()).sum();
                    for x in 0..d {
                        let want: f64 = (0..=pos)
                            .map(|t| {
                                (scores[t] - max).exp() / total
                                    * v[(t * kv_heads + kvh) * d + x] as f64
                            })
                            .sum();
                        let g = got[((s.q_start + i) * q_heads + h) * d + x];
                        assert!(
                            (g - want).abs() < 1e-9,
                            "seq {s:?} row {i} head {h} dim {x}: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn sampling_references_rank_ties_and_nan() {
        let logits = [0.5, f32::NAN, 2.0, 2.0, -1.0, 0.1];
        assert_eq!(argmax(&logits, 6), vec![2]);
        let (values, ids) = top_k(&logits, 3, 4);
        assert_eq!(ids, vec![2, 0, 1, -1, 0, 2, 1, -1]);
        assert_eq!(values[0], 2.0);
        assert_eq!(values[2], f32::NEG_INFINITY);
        assert_eq!(values[3], f32::NEG_INFINITY);
    }

    #[test]
    fn decode_partitions_split_only_when_the_grid_is_small() {
        // Many sequences: the grid fills the GPU, no split.
        assert_eq!(decode_partitions(64, 8, 4096, 132), (1, 4096));
        // One long sequence: split to fill 132 SMs four times over.
        let (parts, size) = decode_partitions(1, 8, 65536, 132);
        assert_eq!(parts, 66);
        assert!(size >= 64 && parts * size >= 65536);
        // Batch 1 at 512 tokens: 8 partitions of 64 rather than 8 CTAs walking 512 tokens.
        assert_eq!(decode_partitions(1, 8, 512, 132), (8, 64));
        // Contexts of at most two partitions are never split.
        assert_eq!(decode_partitions(1, 8, 128, 132), (1, 128));
        // 8 sequences of 3k over 8 KV-head CTAs each: 9 partitions make 576 CTAs.
        let (parts, size) = decode_partitions(8, 8, 1024 * 3, 132);
        assert_eq!((parts, size), (9, 342));
    }
}
