//! The executor model of the replay: what one executor does with requests, from a small TOML
//! file (`perf/executor-models/*.toml`):
//!
//! ```toml
//! cold_start_secs = 45.0          # launch to ready
//! prefill_tokens_per_s = 30000.0  # prompt tokens prefilled per second
//! decode_tokens_per_s = [[1, 120.0], [16, 1500.0], [64, 4200.0], [256, 7000.0]]  # by batch
//! max_running = 256               # requests in the running batch at most
//! kv_tokens = 400000              # tokens the KV cache holds
//! max_batched_tokens = 2048       # tokens in one engine step (decode + prefill chunk)
//! first_token_overhead_secs = 0.0 # per request, outside the engine (HTTP, tokenizing)
//! attention_secs_per_pair = 0.0   # per (token computed, token of its context) pair
//! ```
//!
//! Decode throughput between two listed batch sizes is interpolated linearly, and held flat
//! beyond the last one. `attention_secs_per_pair` is the part of a step that grows with
//! context: each token a step computes attends to every token before it, so a prefill chunk of
//! `n` tokens after `c` already computed adds `n * (c + n / 2)` pairs, and a decode token with
//! `L` tokens of context adds `L`. Where attention is a small share of the work (a GPU with
//! fused attention, short prompts) it can stay 0; a CPU worker's prefill time grows visibly
//! faster than its prompt (see `perf/src/bin/replay_check/calibrate.rs`).

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::autoscaler::Capacity;

#[derive(Clone, Debug, PartialEq)]
pub struct ExecutorModel {
    pub cold_start: Duration,
    pub prefill_tokens_per_s: f64,
    /// (batch, output tokens per second), batch ascending.
    pub decode_tokens_per_s: Vec<(u32, f64)>,
    pub max_running: u32,
    pub kv_tokens: u64,
    pub max_batched_tokens: u32,
    /// Added to every first token: the request's path outside the engine steps.
    pub first_token_overhead: Duration,
    /// Seconds per (computed token, context token) pair, beyond the rates above.
    pub attention_secs_per_pair: f64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    cold_start_secs: f64,
    prefill_tokens_per_s: f64,
    decode_tokens_per_s: Vec<(u32, f64)>,
    max_running: u32,
    kv_tokens: u64,
    max_batched_tokens: Option<u32>,
    first_token_overhead_secs: Option<f64>,
    attention_secs_per_pair: Option<f64>,
    /// Where the numbers come from (free text, kept for the reader).
    #[allow(dead_code)]
    source: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: `{field}` = {value}: {reason}")]
    Invalid {
        path: String,
        field: &'static str,
        value: String,
        reason: &'static str,
    },
}

impl ExecutorModel {
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Parse {
            path: origin.clone(),
            message: e.to_string(),
        })?;
        Self::parse(&text, &origin)
    }

    pub fn parse(text: &str, origin: &str) -> Result<Self, ModelError> {
        let raw: Raw = toml::from_str(text).map_err(|e| ModelError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        let invalid = |field, value: String, reason| ModelError::Invalid {
            path: origin.to_owned(),
            field,
            value,
            reason,
        };
        if !(raw.cold_start_secs.is_finite() && (0.0..1e6).contains(&raw.cold_start_secs)) {
            let v = raw.cold_start_secs.to_string();
            return Err(invalid("cold_start_secs", v, "must be seconds, 0 or more"));
        }
        if !(raw.prefill_tokens_per_s.is_finite() && raw.prefill_tokens_per_s > 0.0) {
            let v = raw.prefill_tokens_per_s.to_string();
            return Err(invalid("prefill_tokens_per_s", v, "must be positive"));
        }
        let table = &raw.decode_tokens_per_s;
        let ascending = table.windows(2).all(|w| w[0].0 < w[1].0);
        if table.is_empty()
            || !ascending
            || table
                .iter()
                .any(|&(b, t)| b == 0 || !(t.is_finite() && t > 0.0))
        {
            return Err(invalid(
                "decode_tokens_per_s",
                format!("{table:?}"),
                "must list [batch, tokens per second] pairs, batches ascending from 1, rates positive",
            ));
        }
        if raw.max_running == 0 {
            return Err(invalid("max_running", "0".into(), "must be positive"));
        }
        if raw.kv_tokens == 0 {
            return Err(invalid("kv_tokens", "0".into(), "must be positive"));
        }
        let max_batched_tokens = raw.max_batched_tokens.unwrap_or(2048);
        if max_batched_tokens == 0 {
            return Err(invalid(
                "max_batched_tokens",
                "0".into(),
                "must be positive",
            ));
        }
        let overhead = raw.first_token_overhead_secs.unwrap_or(0.0);
        if !(overhead.is_finite() && (0.0..60.0).contains(&overhead)) {
            let v = overhead.to_string();
            return Err(invalid(
                "first_token_overhead_secs",
                v,
                "must be seconds, 0 to 60",
            ));
        }
        let attention = raw.attention_secs_per_pair.unwrap_or(0.0);
        if !(attention.is_finite() && (0.0..1.0).contains(&attention)) {
            return Err(invalid(
                "attention_secs_per_pair",
                attention.to_string(),
                "must be seconds, 0 or more and below 1",
            ));
        }
        Ok(Self {
            attention_secs_per_pair: attention,
            first_token_overhead: Duration::from_secs_f64(overhead),
            cold_start: Duration::from_secs_f64(raw.cold_start_secs),
            prefill_tokens_per_s: raw.prefill_tokens_per_s,
            decode_tokens_per_s: raw.decode_tokens_per_s,
            max_running: raw.max_running,
            kv_tokens: raw.kv_tokens,
            max_batched_tokens,
        })
    }

    /// Output tokens per second of the whole batch at batch size `batch`.
    pub fn decode_rate(&self, batch: u32) -> f64 {
        let t = &self.decode_tokens_per_s;
        let b = batch.max(1);
        if b <= t[0].0 {
            // Below the first point the step time holds (a smaller batch is no faster a step).
            return t[0].1 * b as f64 / t[0].0 as f64;
        }
        for w in t.windows(2) {
            let ((b0, r0), (b1, r1)) = (w[0], w[1]);
            if b <= b1 {
                let f = (b - b0) as f64 / (b1 - b0) as f64;
                return r0 + f * (r1 - r0);
            }
        }
        t[t.len() - 1].1
    }

    /// Seconds one engine step takes: `batch` decode tokens and `prefill` prompt tokens, whose
    /// attention covers `pairs` (token, context token) pairs in all. A step with no decodes
    /// still costs what a step of one does (the pass over the weights every step makes), so
    /// the decode table's batch-1 time is the floor of every step.
    pub fn step_seconds(&self, batch: u32, prefill: u32, pairs: f64) -> f64 {
        let batch = batch.max(1);
        let decode = batch as f64 / self.decode_rate(batch);
        decode + prefill as f64 / self.prefill_tokens_per_s + pairs * self.attention_secs_per_pair
    }

    /// The autoscaler's view of one executor: decode throughput at its full batch.
    pub fn capacity(&self) -> Capacity {
        Capacity {
            prefill_tokens_per_s: self.prefill_tokens_per_s,
            decode_tokens_per_s: self.decode_rate(self.max_running),
            kv_tokens: self.kv_tokens as f64,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = r#"
        cold_start_secs = 30
        prefill_tokens_per_s = 10000.0
        decode_tokens_per_s = [[1, 100.0], [8, 600.0], [32, 1600.0]]
        max_running = 32
        kv_tokens = 100000
        source = "test"
    "#;

    #[test]
    fn decode_rate_interpolates_and_holds_flat() {
        let m = ExecutorModel::parse(MODEL, "m").unwrap();
        assert_eq!(m.decode_rate(1), 100.0);
        assert_eq!(m.decode_rate(20), 1100.0);
        assert_eq!(m.decode_rate(64), 1600.0);
        // A step of 8 decodes and 2,000 prompt tokens: 8/600 s + 0.2 s.
        assert!((m.step_seconds(8, 2000, 1e6) - (8.0 / 600.0 + 0.2)).abs() < 1e-12);
        // With an attention cost, pairs add to the step.
        let with =
            ExecutorModel::parse(&format!("{MODEL}\nattention_secs_per_pair = 1e-9"), "m").unwrap();
        assert!((with.step_seconds(8, 2000, 1e6) - (8.0 / 600.0 + 0.2 + 1e-3)).abs() < 1e-12);
        assert!(
            ExecutorModel::parse(&format!("{MODEL}\nattention_secs_per_pair = -1"), "m").is_err()
        );
        // A prefill-only step pays the batch-1 step's pass over the weights.
        assert!((m.step_seconds(0, 2000, 0.0) - (1.0 / 100.0 + 0.2)).abs() < 1e-12);
        assert_eq!(m.capacity().decode_tokens_per_s, 1600.0);
        assert_eq!(m.max_batched_tokens, 2048);
    }

    #[test]
    fn bad_models_name_the_field() {
        for (text, field) in [
            (
                MODEL.replace(
                    "[[1, 100.0], [8, 600.0], [32, 1600.0]]",
                    "[[8, 1.0], [1, 2.0]]",
                ),
                "decode_tokens_per_s",
            ),
            (
                MODEL.replace("max_running = 32", "max_running = 0"),
                "max_running",
            ),
            (MODEL.replace("10000.0", "-1.0"), "prefill_tokens_per_s"),
            (
                MODEL.replace("kv_tokens = 100000", "kv_tokens = 0"),
                "kv_tokens",
            ),
            (
                MODEL.replace("cold_start_secs = 30", "cold_start_secs = -2"),
                "cold_start_secs",
            ),
        ] {
            let err = ExecutorModel::parse(&text, "m").unwrap_err().to_string();
            assert!(err.contains(&format!("`{field}`")), "{err}");
        }
        assert!(ExecutorModel::parse("cold_start_secs = 1\nextra = 2", "m").is_err());
    }
}
