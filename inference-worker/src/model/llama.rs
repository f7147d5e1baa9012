//! The Llama-family decoder (Llama 2/3, Mistral, Qwen2): its weights, loaded through a
//! [`Backend`], and its forward pass over one packed [`StepBatch`], written once for every
//! backend. Owns tensor names and fusion (`[q; k; v]`, `[gate; up]`); does not own the cache
//! (the engine passes it in) or any scheduling.

use std::time::Instant;

use super::ModelError;
use super::config::ModelConfig;
use super::weights::WeightFiles;
use crate::backend::{Backend, Proj, QkvShape, RopeRows, StepBatch, SublayerInput};

struct Layer<B: Backend> {
    input_norm: B::Weight,
    qkv: B::Weight,
    qkv_bias: Option<B::Weight>,
    o: B::Weight,
    o_bias: Option<B::Weight>,
    post_norm: B::Weight,
    gate_up: B::Weight,
    gate_up_bias: Option<B::Weight>,
    down: B::Weight,
    down_bias: Option<B::Weight>,
}

/// A loaded model on a backend.
pub struct Llama<B: Backend> {
    pub config: ModelConfig,
    pub backend: B,
    embed: B::Weight,
    layers: Vec<Layer<B>>,
    norm: B::Weight,
    /// `None` when the embedding table doubles as the output head.
    lm_head: Option<B::Weight>,
    inv_freq: Vec<f32>,
}

impl<B: Backend> Llama<B> {
    /// Loads every tensor the config calls for, checking names and shapes.
    pub fn load(config: ModelConfig, files: &WeightFiles, backend: B) -> Result<Self, ModelError> {
        backend.prepare(&config)?;
        let started = Instant::now();
        let c = &config;
        let (h, q, kv, inter, v) = (
            c.hidden_size,
            c.q_size(),
            c.kv_size(),
            c.intermediate_size,
            c.vocab_size,
        );
        let load = |parts: &[(&str, Vec<usize>)]| -> Result<B::Weight, ModelError> {
            let views = parts
                .iter()
                .map(|(name, shape)| files.get(name, shape))
                .collect::<Result<Vec<_>, _>>()?;
            backend.load_weight(&views)
        };
        let load_if =
            |cond: bool, parts: &[(&str, Vec<usize>)]| cond.then(|| load(parts)).transpose();

        let embed = load(&[("model.embed_tokens.weight", vec![v, h])])?;
        let mut layers = Vec::with_capacity(c.num_layers);
        for i in 0..c.num_layers {
            let p = format!("model.layers.{i}");
            let n = |s: &str| format!("{p}.{s}");
            let (qn, kn, vn) = (
                n("self_attn.q_proj"),
                n("self_attn.k_proj"),
                n("self_attn.v_proj"),
            );
            let (gn, un, dn, on) = (
                n("mlp.gate_proj"),
                n("mlp.up_proj"),
                n("mlp.down_proj"),
                n("self_attn.o_proj"),
            );
            let w = |base: &str| format!("{base}.weight");
            let b = |base: &str| format!("{base}.bias");
            layers.push(Layer {
                input_norm: load(&[(&n("input_layernorm.weight"), vec![h])])?,
                qkv: load(&[
                    (&w(&qn), vec![q, h]),
                    (&w(&kn), vec![kv, h]),
                    (&w(&vn), vec![kv, h]),
                ])?,
                qkv_bias: load_if(
                    c.qkv_bias,
                    &[(&b(&qn), vec![q]), (&b(&kn), vec![kv]), (&b(&vn), vec![kv])],
                )?,
                o: load(&[(&w(&on), vec![h, q])])?,
                o_bias: load_if(c.o_bias, &[(&b(&on), vec![h])])?,
                post_norm: load(&[(&n("post_attention_layernorm.weight"), vec![h])])?,
                gate_up: load(&[(&w(&gn), vec![inter, h]), (&w(&un), vec![inter, h])])?,
                gate_up_bias: load_if(
                    c.mlp_bias,
                    &[(&b(&gn), vec![inter]), (&b(&un), vec![inter])],
                )?,
                down: load(&[(&w(&dn), vec![h, inter])])?,
                down_bias: load_if(c.mlp_bias, &[(&b(&dn), vec![h])])?,
            });
            tracing::debug!(layer = i, "loaded layer");
        }
        let norm = load(&[("model.norm.weight", vec![h])])?;
        // A tied model may still store `lm_head.weight`; an untied one must.
        let lm_head = match (c.tie_word_embeddings, files.contains("lm_head.weight")) {
            (true, false) => None,
            _ => Some(load(&[("lm_head.weight", vec![v, h])])?),
        };
        tracing::info!(
            backend = backend.name(),
            layers = c.num_layers,
            seconds = started.elapsed().as_secs_f64(),
            "loaded weights"
        );
        let inv_freq = config.rope_inv_freq();
        Ok(Self {
            config,
            backend,
            embed,
            layers,
            norm,
            lm_head,
            inv_freq,
        })
    }

    pub fn qkv_shape(&self) -> QkvShape {
        QkvShape {
            num_heads: self.config.num_heads,
            num_kv_heads: self.config.num_kv_heads,
            head_dim: self.config.head_dim,
        }
    }

    /// Runs one step: writes the new tokens' K/V into `cache` and returns the logits of
    /// `batch.logits_rows`, row-major `[logits_rows.len(), vocab_size]`.
    pub fn forward(&self, cache: &mut B::KvCache, batch: &StepBatch) -> Vec<f32> {
        let mut logits = self
            .forward_with(cache, batch, |l| self.backend.to_host(l))
            .unwrap_or_default();
        logits.truncate(batch.logits_rows.len() * self.config.vocab_size);
        logits
    }

    /// Like [`Self::forward`], but hands the logits, where the backend holds them, to `read`
    /// (which may edit them and find tokens there: [`Backend::edit_logits`],
    /// [`Backend::draw_rows`], [`Backend::top_k_rows`]) instead of copying them out. `None`
    /// for a step without logits rows. The logits may have more rows than asked (a backend
    /// that pads steps), the asked ones first.
    pub fn forward_with<R>(
        &self,
        cache: &mut B::KvCache,
        batch: &StepBatch,
        read: impl FnOnce(&mut B::Activations) -> R,
    ) -> Option<R> {
        self.logits(cache, batch).map(|mut l| read(&mut l))
    }

    /// The logits of `batch.logits_rows` where the backend holds them (`None` without rows);
    /// a backend that pads steps may return more rows, the asked ones first.
    fn logits(&self, cache: &mut B::KvCache, batch: &StepBatch) -> Option<B::Activations> {
        let rope = RopeRows::new(&batch.positions, &self.inv_freq);
        let step = self.backend.prepare_step(batch, rope);
        if batch.logits_rows.is_empty() {
            // A prefill chunk that does not end its prompt: the pass only writes its K/V.
            self.pass(cache, &step, false);
            return None;
        }
        Some(self.backend.run_step(cache, &step, |cache, step| {
            self.pass(cache, step, true)
                .expect("the pass returns logits when asked")
        }))
    }

    /// The forward pass over a prepared step: K/V written, and the logits rows if `logits`.
    /// Each sublayer's input (the previous sublayer's output projection, the residual add,
    /// the norm and the input projection, with rotary and the cache write into attention or
    /// SiLU-and-mul into the MLP) is one backend op, so a backend can fuse it; so is the
    /// output head (the last down projection, the final norm and `lm_head`).
    fn pass(&self, cache: &mut B::KvCache, step: &B::Step, logits: bool) -> Option<B::Activations> {
        let b = &self.backend;
        let eps = self.config.rms_norm_eps;
        let shape = self.qkv_shape();
        let mut residual = b.embed(&self.embed, step);
        // The previous layer's MLP output (and that layer), waiting for its down projection.
        let mut mlp_out: Option<(B::Activations, &Layer<B>)> = None;
        for (i, layer) in self.layers.iter().enumerate() {
            let input = SublayerInput {
                prev: mlp_out
                    .as_ref()
                    .map(|(act, l)| (act, proj(&l.down, &l.down_bias))),
                norm: &layer.input_norm,
                eps,
                into: proj(&layer.qkv, &layer.qkv_bias),
            };
            let qkv = b.attention_input(&mut residual, &input, cache, i, shape, step);
            if !logits && i + 1 == self.layers.len() {
                // A pass that only writes K/V is done once the last layer's are written.
                return None;
            }
            let mut attn = b.attention(&qkv, cache, i, shape, step);
            if i + 1 == self.layers.len() {
                // Past the last attention only the logits rows matter: the last o projection,
                // MLP and the output head run on those rows alone (at the end of a prompt, one
                // row per sequence instead of every prompt token).
                b.keep_logits_rows(&mut attn, step);
                b.keep_logits_rows(&mut residual, step);
            }
            let input = SublayerInput {
                prev: Some((&attn, proj(&layer.o, &layer.o_bias))),
                norm: &layer.post_norm,
                eps,
                into: proj(&layer.gate_up, &layer.gate_up_bias),
            };
            mlp_out = Some((b.mlp_input(&mut residual, &input), layer));
        }
        let (act, last) = mlp_out.expect("a model has layers");
        let head = SublayerInput {
            prev: Some((&act, proj(&last.down, &last.down_bias))),
            norm: &self.norm,
            eps,
            into: Proj {
                weight: self.lm_head.as_ref().unwrap_or(&self.embed),
                bias: None,
            },
        };
        Some(b.output_head(&mut residual, &head))
    }
}

fn proj<'a, W>(weight: &'a W, bias: &'a Option<W>) -> Proj<'a, W> {
    Proj {
        weight,
        bias: bias.as_ref(),
    }
}
