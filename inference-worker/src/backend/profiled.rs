//! A backend that times another backend's operations by kind — GEMMs, attention (with the KV
//! cache write), everything else — for the decode benchmark's breakdown. It waits for the
//! device before and after each operation so each time is that operation's own; the waits
//! remove the overlap a plain run has, so totals come from a plain run and only the shares
//! from this one. Steps always run op by op here (the inner backend's CUDA graphs, which
//! cannot be timed by op, are not used).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::{
    Backend, KvLayout, LogitEdit, QkvShape, ReplayCounts, RopeRows, StepBatch, SublayerInput,
};
use crate::model::ModelError;
use crate::model::config::ModelConfig;
use crate::model::weights::TensorView;

/// Time spent in each kind of operation since the last [`Profiled::take`].
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct OpTimes {
    /// `linear` (the output head, the last down projection) and the sublayer inputs as a
    /// whole (`attention_input`, `mlp_input`: the projections with the residual add, norm,
    /// SiLU-and-mul, rotary and cache write around them, which the CUDA backend fuses into
    /// them at small batch).
    pub gemm: Duration,
    /// `attention`.
    pub attention: Duration,
    /// Step inputs to the device, embedding, the last norm, row gathers, argmax, copies to the
    /// host.
    pub other: Duration,
}

#[derive(Clone, Copy)]
enum Kind {
    Gemm,
    Attention,
    Other,
}

pub struct Profiled<B> {
    inner: B,
    times: Mutex<OpTimes>,
}

impl<B: Backend> Profiled<B> {
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            times: Mutex::default(),
        }
    }

    /// The times so far, reset to zero.
    pub fn take(&self) -> OpTimes {
        std::mem::take(&mut *self.times.lock().unwrap_or_else(|p| p.into_inner()))
    }

    fn timed<R>(&self, kind: Kind, op: impl FnOnce() -> R) -> R {
        self.inner.synchronize();
        let start = Instant::now();
        let out = op();
        self.inner.synchronize();
        let took = start.elapsed();
        let mut times = self.times.lock().unwrap_or_else(|p| p.into_inner());
        match kind {
            Kind::Gemm => times.gemm += took,
            Kind::Attention => times.attention += took,
            Kind::Other => times.other += took,
        }
        out
    }
}

impl<B: Backend> Backend for Profiled<B> {
    type Activations = B::Activations;
    type Weight = B::Weight;
    type KvCache = B::KvCache;
    type Step = B::Step;

    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn prepare(&self, config: &ModelConfig) -> Result<(), ModelError> {
        self.inner.prepare(config)
    }

    fn load_weight(&self, parts: &[TensorView<'_>]) -> Result<Self::Weight, ModelError> {
        self.inner.load_weight(parts)
    }

    fn alloc_kv_cache(&self, num_layers: usize, layout: KvLayout) -> Self::KvCache {
        self.inner.alloc_kv_cache(num_layers, layout)
    }

    fn replay_counts(&self) -> ReplayCounts {
        self.inner.replay_counts()
    }

    fn prepare_step(&self, batch: &StepBatch, rope: RopeRows) -> Self::Step {
        self.timed(Kind::Other, || self.inner.prepare_step(batch, rope))
    }

    fn embed(&self, table: &Self::Weight, step: &Self::Step) -> Self::Activations {
        self.timed(Kind::Other, || self.inner.embed(table, step))
    }

    fn rms_norm(
        &self,
        x: &Self::Activations,
        weight: &Self::Weight,
        eps: f32,
    ) -> Self::Activations {
        self.timed(Kind::Other, || self.inner.rms_norm(x, weight, eps))
    }

    fn add_rms_norm(
        &self,
        residual: &mut Self::Activations,
        delta: &Self::Activations,
        weight: &Self::Weight,
        eps: f32,
    ) -> Self::Activations {
        self.timed(Kind::Other, || {
            self.inner.add_rms_norm(residual, delta, weight, eps)
        })
    }

    fn linear(
        &self,
        x: &Self::Activations,
        weight: &Self::Weight,
        bias: Option<&Self::Weight>,
    ) -> Self::Activations {
        self.timed(Kind::Gemm, || self.inner.linear(x, weight, bias))
    }

    fn attention_input(
        &self,
        residual: &mut Self::Activations,
        input: &SublayerInput<'_, Self::Activations, Self::Weight>,
        cache: &mut Self::KvCache,
        layer: usize,
        shape: QkvShape,
        step: &Self::Step,
    ) -> Self::Activations {
        self.timed(Kind::Gemm, || {
            self.inner
                .attention_input(residual, input, cache, layer, shape, step)
        })
    }

    fn mlp_input(
        &self,
        residual: &mut Self::Activations,
        input: &SublayerInput<'_, Self::Activations, Self::Weight>,
    ) -> Self::Activations {
        self.timed(Kind::Gemm, || self.inner.mlp_input(residual, input))
    }

    fn output_head(
        &self,
        residual: &mut Self::Activations,
        input: &SublayerInput<'_, Self::Activations, Self::Weight>,
    ) -> Self::Activations {
        self.timed(Kind::Gemm, || self.inner.output_head(residual, input))
    }

    fn rotary(&self, qkv: &mut Self::Activations, shape: QkvShape, step: &Self::Step) {
        self.timed(Kind::Other, || self.inner.rotary(qkv, shape, step))
    }

    fn write_kv(
        &self,
        cache: &mut Self::KvCache,
        layer: usize,
        qkv: &Self::Activations,
        shape: QkvShape,
        step: &Self::Step,
    ) {
        self.timed(Kind::Attention, || {
            self.inner.write_kv(cache, layer, qkv, shape, step)
        })
    }

    fn attention(
        &self,
        qkv: &Self::Activations,
        cache: &Self::KvCache,
        layer: usize,
        shape: QkvShape,
        step: &Self::Step,
    ) -> Self::Activations {
        self.timed(Kind::Attention, || {
            self.inner.attention(qkv, cache, layer, shape, step)
        })
    }

    fn silu_mul(&self, gate_up: &Self::Activations) -> Self::Activations {
        self.timed(Kind::Other, || self.inner.silu_mul(gate_up))
    }

    fn keep_logits_rows(&self, x: &mut Self::Activations, step: &Self::Step) {
        self.timed(Kind::Other, || self.inner.keep_logits_rows(x, step))
    }

    fn to_host(&self, x: &Self::Activations) -> Vec<f32> {
        self.timed(Kind::Other, || self.inner.to_host(x))
    }

    fn shape(&self, x: &Self::Activations) -> (usize, usize) {
        self.inner.shape(x)
    }

    fn edit_logits(&self, x: &mut Self::Activations, edits: &[LogitEdit]) {
        self.timed(Kind::Other, || self.inner.edit_logits(x, edits))
    }

    fn draw_rows(&self, x: &Self::Activations, temperature: &[f32], u: &[f64]) -> Vec<u32> {
        self.timed(Kind::Other, || self.inner.draw_rows(x, temperature, u))
    }

    fn softmax_mass_rows(&self, x: &Self::Activations, temperature: &[f32]) -> Vec<f64> {
        self.timed(Kind::Other, || self.inner.softmax_mass_rows(x, temperature))
    }

    fn top_k_rows(&self, x: &Self::Activations, rows: usize, k: usize) -> (Vec<f32>, Vec<u32>) {
        self.timed(Kind::Other, || self.inner.top_k_rows(x, rows, k))
    }

    fn logits_at(&self, x: &Self::Activations, at: &[(usize, u32)]) -> Vec<f32> {
        self.timed(Kind::Other, || self.inner.logits_at(x, at))
    }

    fn synchronize(&self) {
        self.inner.synchronize()
    }
}
