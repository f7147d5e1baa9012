//! The ops interface the model's forward pass is written against, and the batch description
//! one engine step hands to it. The CPU backend (`cpu`) implements it in f32 as the reference;
//! the CUDA backend (`cuda`) implements the same trait with cuBLAS and our kernels, so the
//! forward pass, engine and server do not change. Backends own device memory (weights, activations, the
//! paged KV cache); they know nothing of requests or scheduling.

pub mod cpu;
pub mod cuda;
pub mod profiled;

pub use llmctl_kernels::cuda::LogitEdit;
pub use llmctl_kernels::kv_layout::KvLayout;
use rayon::prelude::*;

use crate::model::ModelError;
use crate::model::config::ModelConfig;
use crate::model::weights::TensorView;

/// One sequence's share of a step: `query_len` new tokens starting at row `query_start` of the
/// packed batch, attending to `context_len` tokens in total (cached ones plus the new ones,
/// whose K/V the step writes before attention).
#[derive(Clone, Debug)]
pub struct SeqSlice {
    pub query_start: usize,
    pub query_len: usize,
    pub context_len: usize,
    pub block_table: Vec<u32>,
}

/// The packed input of one forward step.
#[derive(Clone, Debug, Default)]
pub struct StepBatch {
    /// New tokens of all sequences, packed in sequence order.
    pub tokens: Vec<u32>,
    /// Position of each new token within its sequence.
    pub positions: Vec<u32>,
    /// Cache slot of each new token (`block * block_size + offset`); negative = do not write.
    pub slot_mapping: Vec<i64>,
    pub seqs: Vec<SeqSlice>,
    /// Rows (indices into `tokens`) whose logits the step returns, in this order.
    pub logits_rows: Vec<usize>,
}

impl StepBatch {
    pub fn num_tokens(&self) -> usize {
        self.tokens.len()
    }
}

/// Rotary embedding of one step: `cos` and `sin` are `[num_tokens, head_dim / 2]`, computed
/// once per step from the positions and shared by every layer. Rotation is the Hugging Face
/// "rotate half" convention: dimension `i` pairs with `i + head_dim / 2`.
pub struct RopeRows {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub half: usize,
}

impl RopeRows {
    /// Angles as Hugging Face computes them: `inv_freq` in f32, `position * inv_freq` rounded to
    /// f32, then cos/sin of that angle. Matching this rounding matters at long positions.
    pub fn new(positions: &[u32], inv_freq: &[f32]) -> Self {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(positions.len() * half);
        let mut sin = Vec::with_capacity(positions.len() * half);
        for &p in positions {
            for &f in inv_freq {
                let angle = (p as f32 * f) as f64;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Self { cos, sin, half }
    }
}

/// Which columns of the fused `[q | k | v]` projection output hold what.
#[derive(Clone, Copy, Debug)]
pub struct QkvShape {
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl QkvShape {
    pub fn q_size(&self) -> usize {
        self.num_heads * self.head_dim
    }
    pub fn kv_size(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
    pub fn width(&self) -> usize {
        self.q_size() + 2 * self.kv_size()
    }
}

/// A projection's weight and bias.
pub struct Proj<'a, W> {
    pub weight: &'a W,
    pub bias: Option<&'a W>,
}

/// What goes into a sublayer (attention or MLP): the previous sublayer's output through its
/// output projection, added to the residual stream; then the stream, normed, through this
/// sublayer's input projection.
pub struct SublayerInput<'a, A, W> {
    /// The previous sublayer's output and its output projection (o or down); `None` before
    /// the first layer, whose residual stream is the embedding.
    pub prev: Option<(&'a A, Proj<'a, W>)>,
    /// This sublayer's input norm.
    pub norm: &'a W,
    pub eps: f32,
    /// This sublayer's input projection (`[q; k; v]` or `[gate; up]`).
    pub into: Proj<'a, W>,
}

/// Steps a backend recorded for replay and steps it replayed (CUDA graphs); zero for a backend
/// that runs every step op by op.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReplayCounts {
    pub recorded: u64,
    pub replayed: u64,
}

/// The operations of a Llama-family forward pass. Activations are row-major
/// `[rows, cols]` matrices, one row per token.
pub trait Backend: Send + Sync + 'static {
    type Activations: Send;
    type Weight: Send + Sync;
    type KvCache: Send;
    /// One step's inputs where the ops read them ([`Backend::prepare_step`]).
    type Step: Send;

    fn name(&self) -> &'static str;

    /// Readies whatever the backend builds per model shape before the weights load (the CUDA
    /// backend compiles its kernels for the model's storage type and head size), so the first
    /// step pays nothing and a failure shows at start-up.
    fn prepare(&self, _config: &ModelConfig) -> Result<(), ModelError> {
        Ok(())
    }

    /// Uploads a weight made of `parts` concatenated along their first dimension (a fused
    /// projection such as `[q; k; v]`, or a single tensor). 1-D tensors become a row vector.
    fn load_weight(&self, parts: &[TensorView<'_>]) -> Result<Self::Weight, ModelError>;

    /// Allocates `num_layers` K and V caches of the shared paged layout.
    fn alloc_kv_cache(&self, num_layers: usize, layout: KvLayout) -> Self::KvCache;

    /// Puts one step's inputs where the ops read them, once for the whole step rather than
    /// once per layer: the tokens, the rotary rows, the cache slots, each sequence's block
    /// table and lengths, the logits rows.
    fn prepare_step(&self, batch: &StepBatch, rope: RopeRows) -> Self::Step;

    /// Runs one step's forward pass, `forward`, which writes the step's K/V into `cache` and
    /// computes its logits rows. A backend may record the pass the first time a step of some
    /// shape comes and replay the recording for later steps of that shape on the same cache
    /// (CUDA graphs); then `forward` is not called, so it must do nothing but issue the
    /// backend's ops. Every activation a step makes is dropped before the next step is
    /// prepared.
    fn run_step<F>(
        &self,
        cache: &mut Self::KvCache,
        step: &Self::Step,
        mut forward: F,
    ) -> Self::Activations
    where
        F: FnMut(&mut Self::KvCache, &Self::Step) -> Self::Activations,
    {
        forward(cache, step)
    }

    /// Steps recorded and replayed so far ([`ReplayCounts`]).
    fn replay_counts(&self) -> ReplayCounts {
        ReplayCounts::default()
    }

    /// Rows of the embedding table for the step's tokens.
    fn embed(&self, table: &Self::Weight, step: &Self::Step) -> Self::Activations;

    /// `rms_norm(x) * weight`, row by row.
    fn rms_norm(&self, x: &Self::Activations, weight: &Self::Weight, eps: f32)
    -> Self::Activations;

    /// `residual += delta`, then returns `rms_norm(residual) * weight` (fused residual add).
    fn add_rms_norm(
        &self,
        residual: &mut Self::Activations,
        delta: &Self::Activations,
        weight: &Self::Weight,
        eps: f32,
    ) -> Self::Activations;

    /// `x · weightᵀ (+ bias)`: weight is `[out, in]` as stored by Hugging Face.
    fn linear(
        &self,
        x: &Self::Activations,
        weight: &Self::Weight,
        bias: Option<&Self::Weight>,
    ) -> Self::Activations;

    /// Layer `layer`'s attention input: `input` into its `[q; k; v]`, rotated, with its K and
    /// V written to the cache. By default the separate ops ([`sublayer_input_op_by_op`], then
    /// [`Backend::rotary_write_kv`]); a backend may fuse them (the CUDA backend at small batch:
    /// two kernels, each reading its weight once).
    fn attention_input(
        &self,
        residual: &mut Self::Activations,
        input: &SublayerInput<'_, Self::Activations, Self::Weight>,
        cache: &mut Self::KvCache,
        layer: usize,
        shape: QkvShape,
        step: &Self::Step,
    ) -> Self::Activations {
        let mut qkv = sublayer_input_op_by_op(self, residual, input);
        self.rotary_write_kv(cache, layer, &mut qkv, shape, step);
        qkv
    }

    /// An MLP's input: `input` into its `[gate; up]`, then `silu(gate) * up`. By default the
    /// separate ops; a backend may fuse them (as [`Backend::attention_input`]).
    fn mlp_input(
        &self,
        residual: &mut Self::Activations,
        input: &SublayerInput<'_, Self::Activations, Self::Weight>,
    ) -> Self::Activations {
        self.silu_mul(&sublayer_input_op_by_op(self, residual, input))
    }

    /// The output head: the last MLP's output through its down projection into the residual
    /// stream, the final norm (`input.norm`) and the output head (`input.into`: `lm_head`, or
    /// the tied embedding table), giving logits. By default the separate ops; a backend may
    /// fuse them (as [`Backend::attention_input`]).
    fn output_head(
        &self,
        residual: &mut Self::Activations,
        input: &SublayerInput<'_, Self::Activations, Self::Weight>,
    ) -> Self::Activations {
        sublayer_input_op_by_op(self, residual, input)
    }

    /// Rotates the q and k columns of a fused qkv activation in place by the step's rotary rows.
    fn rotary(&self, qkv: &mut Self::Activations, shape: QkvShape, step: &Self::Step);

    /// Scatters the k and v columns of `qkv` into layer `layer`'s cache by the step's slot
    /// mapping.
    fn write_kv(
        &self,
        cache: &mut Self::KvCache,
        layer: usize,
        qkv: &Self::Activations,
        shape: QkvShape,
        step: &Self::Step,
    );

    /// [`Backend::rotary`] then [`Backend::write_kv`], the pair every layer runs; a backend may
    /// do both in one pass (the CUDA backend: one kernel launch instead of two).
    fn rotary_write_kv(
        &self,
        cache: &mut Self::KvCache,
        layer: usize,
        qkv: &mut Self::Activations,
        shape: QkvShape,
        step: &Self::Step,
    ) {
        self.rotary(qkv, shape, step);
        self.write_kv(cache, layer, qkv, shape, step);
    }

    /// Causal attention of each of the step's sequences' new queries over its paged context
    /// (which already holds the new tokens' K/V). Returns `[num_tokens, num_heads * head_dim]`.
    fn attention(
        &self,
        qkv: &Self::Activations,
        cache: &Self::KvCache,
        layer: usize,
        shape: QkvShape,
        step: &Self::Step,
    ) -> Self::Activations;

    /// `silu(gate) * up` for a fused `[gate | up]` activation.
    fn silu_mul(&self, gate_up: &Self::Activations) -> Self::Activations;

    /// Keeps only the step's logits rows of `x`, in order (a backend that pads steps to fixed
    /// shapes may keep rows after them; the model drops those). Leaves `x` as it is when those
    /// rows are all of its rows, in order (a decode step).
    fn keep_logits_rows(&self, x: &mut Self::Activations, step: &Self::Step);

    /// Copies an activation to host memory as f32, row-major.
    fn to_host(&self, x: &Self::Activations) -> Vec<f32>;

    /// `(rows, cols)` of an activation.
    fn shape(&self, x: &Self::Activations) -> (usize, usize);

    /// Applies `edits` to logits `x` where they are (each (row, token) at most once).
    fn edit_logits(&self, x: &mut Self::Activations, edits: &[LogitEdit]);

    /// A token for each of the first `temperature.len()` rows of logits `x`, found where `x`
    /// lives: the row's argmax ([`argmax`]) where the temperature is 0, else a draw from its
    /// softmax at that temperature with the uniform `u[row]` ([`softmax_draw`]). By default on
    /// a host copy.
    fn draw_rows(&self, x: &Self::Activations, temperature: &[f32], u: &[f64]) -> Vec<u32> {
        draw_rows_on_host(&self.to_host(x), self.shape(x).1, temperature, u)
    }

    /// The softmax mass of each of the first `temperature.len()` rows of logits `x` at that
    /// temperature (> 0), relative to the row's largest logit ([`softmax_mass`]), found where
    /// `x` lives. By default on a host copy.
    fn softmax_mass_rows(&self, x: &Self::Activations, temperature: &[f32]) -> Vec<f64> {
        softmax_mass_rows_on_host(&self.to_host(x), self.shape(x).1, temperature)
    }

    /// The `k` best logits of each of the first `rows` rows of `x` and their tokens, best
    /// first ([`top_k`]), found where `x` lives: `rows × k` values and `rows × k` tokens. By
    /// default on a host copy.
    fn top_k_rows(&self, x: &Self::Activations, rows: usize, k: usize) -> (Vec<f32>, Vec<u32>) {
        top_k_rows_on_host(&self.to_host(x), self.shape(x).1, rows, k)
    }

    /// The logits at `at` (row, token) of `x`, found where `x` lives. By default on a host
    /// copy.
    fn logits_at(&self, x: &Self::Activations, at: &[(usize, u32)]) -> Vec<f32> {
        logits_at_on_host(&self.to_host(x), self.shape(x).1, at)
    }

    /// Waits until every operation issued so far has finished (a device runs them
    /// asynchronously; on the CPU they are done when they return).
    fn synchronize(&self) {}
}

/// A [`SublayerInput`] as separate ops: the previous output's projection and the fused
/// residual add and norm ([`Backend::linear`], [`Backend::add_rms_norm`]; the plain
/// [`Backend::rms_norm`] before the first layer), then the input projection.
pub fn sublayer_input_op_by_op<B: Backend + ?Sized>(
    backend: &B,
    residual: &mut B::Activations,
    input: &SublayerInput<'_, B::Activations, B::Weight>,
) -> B::Activations {
    let hidden = match &input.prev {
        Some((x, out)) => {
            let delta = backend.linear(x, out.weight, out.bias);
            backend.add_rms_norm(residual, &delta, input.norm, input.eps)
        }
        None => backend.rms_norm(residual, input.norm, input.eps),
    };
    backend.linear(&hidden, input.into.weight, input.into.bias)
}

/// Index of the largest value (the lowest index among equals).
pub fn argmax(values: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best as u32
}

/// [`Backend::edit_logits`] on host logits, rows `vocab` wide.
pub fn edit_logits_on_host(logits: &mut [f32], vocab: usize, edits: &[LogitEdit]) {
    for e in edits {
        let at = e.row as usize * vocab + e.token as usize;
        logits[at] = e.apply(logits[at]);
    }
}

/// [`Backend::draw_rows`] over host logits, rows `vocab` wide.
pub fn draw_rows_on_host(logits: &[f32], vocab: usize, temperature: &[f32], u: &[f64]) -> Vec<u32> {
    logits
        .par_chunks(vocab)
        .zip(temperature.par_iter().zip(u))
        .map(|(row, (&t, &u))| {
            if t == 0.0 {
                argmax(row)
            } else {
                softmax_draw(row, t, u)
            }
        })
        .collect()
}

/// [`Backend::softmax_mass_rows`] over host logits, rows `vocab` wide.
pub fn softmax_mass_rows_on_host(logits: &[f32], vocab: usize, temperature: &[f32]) -> Vec<f64> {
    logits
        .par_chunks(vocab)
        .zip(temperature)
        .map(|(row, &t)| softmax_mass(row, t))
        .collect()
}

/// [`Backend::logits_at`] over host logits, rows `vocab` wide.
pub fn logits_at_on_host(logits: &[f32], vocab: usize, at: &[(usize, u32)]) -> Vec<f32> {
    at.iter()
        .map(|&(row, token)| logits[row * vocab + token as usize])
        .collect()
}

/// [`Backend::top_k_rows`] over host logits, rows `vocab` wide.
pub fn top_k_rows_on_host(
    logits: &[f32],
    vocab: usize,
    rows: usize,
    k: usize,
) -> (Vec<f32>, Vec<u32>) {
    let best: Vec<(Vec<f32>, Vec<u32>)> = logits
        .par_chunks(vocab)
        .take(rows)
        .map(|row| {
            let best = top_k(row, k);
            (best.iter().map(|&t| row[t as usize]).collect(), best)
        })
        .collect();
    best.into_iter().fold(
        (Vec::new(), Vec::new()),
        |(mut values, mut tokens), (v, t)| {
            values.extend(v);
            tokens.extend(t);
            (values, tokens)
        },
    )
}

/// The indices of the `k` largest values, largest first (the lower index first among equals).
pub fn top_k(values: &[f32], k: usize) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..values.len() as u32).collect();
    let by_value = |a: &u32, b: &u32| {
        values[*b as usize]
            .total_cmp(&values[*a as usize])
            .then(a.cmp(b))
    };
    if k < idx.len() {
        idx.select_nth_unstable_by(k, by_value);
        idx.truncate(k);
    }
    idx.sort_by(by_value);
    idx
}

/// `exp((l - max) / temperature)`: a logit's softmax weight relative to the row's largest
/// (NaN weighs nothing). In f32, the logits' own precision (sums over weights are taken in
/// f64).
pub fn softmax_weight(l: f32, max: f32, temperature: f32) -> f64 {
    if l.is_nan() {
        return 0.0;
    }
    ((l - max) / temperature).exp() as f64
}

/// The largest of `values` (-inf for none).
pub fn max_value(values: &[f32]) -> f32 {
    values.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

/// The softmax mass of `values` at `temperature` relative to the largest,
/// `sum exp((v - max) / temperature)`.
pub fn softmax_mass(values: &[f32], temperature: f32) -> f64 {
    let max = max_value(values);
    values
        .iter()
        .map(|&l| softmax_weight(l, max, temperature))
        .sum()
}

/// A draw from the softmax of `values` at `temperature` with the uniform `u` in [0, 1), walking
/// the values in order: the first whose running weight exceeds `u` times the total (if
/// rounding leaves the target past the end, the last with any weight).
pub fn softmax_draw(values: &[f32], temperature: f32, u: f64) -> u32 {
    let max = max_value(values);
    let mut target = u * softmax_mass(values, temperature);
    let mut last = 0;
    for (t, &l) in values.iter().enumerate() {
        let q = softmax_weight(l, max, temperature);
        if target < q {
            return t as u32;
        }
        if q > 0.0 {
            last = t;
        }
        target -= q;
    }
    last as u32
}
