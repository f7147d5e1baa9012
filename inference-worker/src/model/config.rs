//! `config.json` and `generation_config.json` of a Hugging Face model folder, parsed into a
//! checked [`ModelConfig`]. Owns the architecture rules (which families we run, their biases,
//! rope scaling); does not touch weights.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::ModelError;

/// The decoder families we run. All are the Llama block (RMSNorm, rotary attention with GQA,
/// SwiGLU MLP); they differ in biases and defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Architecture {
    Llama,
    Mistral,
    Qwen2,
}

impl Architecture {
    fn from_hf(name: &str) -> Option<Self> {
        match name {
            "LlamaForCausalLM" => Some(Self::Llama),
            "MistralForCausalLM" => Some(Self::Mistral),
            "Qwen2ForCausalLM" => Some(Self::Qwen2),
            _ => None,
        }
    }
}

/// Rotary position embedding frequency rule.
#[derive(Clone, Debug, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE: `inv_freq[i] = theta^(-2i/d)`.
    None,
    /// Positions divided by `factor`.
    Linear { factor: f32 },
    /// Llama 3.x: long wavelengths divided by `factor`, short ones kept, smooth in between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
}

/// A model's shape and rules, checked.
#[derive(Clone, Debug)]
pub struct ModelConfig {
    pub architecture: Architecture,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f32,
    pub rope_scaling: RopeScaling,
    /// Longest sequence (prompt + output) served: `max_position_embeddings`, lowered to the
    /// sliding window when one is active so attention never needs the window.
    pub max_model_len: usize,
    pub tie_word_embeddings: bool,
    /// q, k and v projections carry a bias (Qwen2 always; Llama when `attention_bias`).
    pub qkv_bias: bool,
    /// The output projection carries a bias (Llama `attention_bias`).
    pub o_bias: bool,
    /// gate/up/down carry biases (Llama `mlp_bias`).
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    /// End-of-sequence ids from `config.json`, replaced by `generation_config.json` when present.
    pub eos_token_ids: Vec<u32>,
}

impl ModelConfig {
    pub fn q_size(&self) -> usize {
        self.num_heads * self.head_dim
    }

    pub fn kv_size(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// Inverse frequencies for the rotary embedding, one per pair of dimensions.
    pub fn rope_inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / (self.rope_theta as f64).powf(2.0 * i as f64 / d as f64))
            .collect();
        let scaled = match self.rope_scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f64).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let (factor, low, high) = (
                    factor as f64,
                    low_freq_factor as f64,
                    high_freq_factor as f64,
                );
                let old_len = original_max_position_embeddings as f64;
                let low_freq_wavelen = old_len / low;
                let high_freq_wavelen = old_len / high;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_freq_wavelen {
                            f
                        } else if wavelen > low_freq_wavelen {
                            f / factor
                        } else {
                            let smooth = (old_len / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        scaled.into_iter().map(|f| f as f32).collect()
    }

    /// Reads `config.json` and, when present, `generation_config.json` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("config.json");
        let raw: Value = read_json(&path)?;
        let mut config = Self::from_json(&raw, &path.display().to_string())?;
        let gen_path = dir.join("generation_config.json");
        if gen_path.exists() {
            let gen_cfg: Value = read_json(&gen_path)?;
            let file = gen_path.display().to_string();
            if let Some(ids) = token_ids(&gen_cfg, "eos_token_id", &file)? {
                config.eos_token_ids = ids;
            }
            if let Some(ids) = token_ids(&gen_cfg, "bos_token_id", &file)? {
                config.bos_token_id = ids.first().copied();
            }
        }
        Ok(config)
    }

    /// Checks a parsed `config.json`; `file` names it in errors.
    pub fn from_json(raw: &Value, file: &str) -> Result<Self, ModelError> {
        let f = Fields { raw, file };
        // Without `architectures`, a known `model_type` names it, as transformers accepts.
        let arch_name = match raw.get("architectures") {
            Some(Value::Array(list)) => list.first().and_then(Value::as_str).map(str::to_owned),
            _ => None,
        }
        .or_else(|| {
            let by_type = match raw.get("model_type")?.as_str()? {
                "llama" => "LlamaForCausalLM",
                "mistral" => "MistralForCausalLM",
                "qwen2" => "Qwen2ForCausalLM",
                _ => return None,
            };
            Some(by_type.to_owned())
        })
        .ok_or_else(|| {
            f.err(
                "architectures",
                "missing or not a list of strings (and no known `model_type`: llama, mistral, qwen2)",
            )
        })?;
        let architecture = Architecture::from_hf(&arch_name).ok_or_else(|| {
            f.err(
                "architectures",
                &format!(
                    "unsupported architecture `{arch_name}` (supported: LlamaForCausalLM, \
                     MistralForCausalLM, Qwen2ForCausalLM)"
                ),
            )
        })?;

        let hidden_size = f.usize("hidden_size")?;
        let num_heads = f.usize("num_attention_heads")?;
        let num_kv_heads = f.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match f.opt_usize("head_dim")? {
            Some(d) => d,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(f.err(
                        "num_attention_heads",
                        &format!("{num_heads} does not divide hidden_size {hidden_size}"),
                    ));
                }
                hidden_size / num_heads
            }
        };
        if num_heads % num_kv_heads != 0 {
            return Err(f.err(
                "num_key_value_heads",
                &format!("{num_kv_heads} does not divide num_attention_heads {num_heads}"),
            ));
        }
        if head_dim % 2 != 0 {
            return Err(f.err(
                "head_dim",
                &format!("{head_dim} is odd; rotary needs pairs"),
            ));
        }
        if let Some(act) = raw.get("hidden_act").and_then(Value::as_str)
            && act != "silu"
        {
            return Err(f.err(
                "hidden_act",
                &format!("`{act}` is not supported (only silu)"),
            ));
        }

        // transformers 5 writes rope settings into `rope_parameters`; older files use
        // `rope_theta` and `rope_scaling` at the top level.
        let rope_params = raw.get("rope_parameters").filter(|v| v.is_object());
        let rope_theta = match rope_params.and_then(|p| p.get("rope_theta")) {
            Some(v) => v
                .as_f64()
                .ok_or_else(|| f.err("rope_parameters.rope_theta", "not a number"))?,
            None => f.opt_f64("rope_theta")?.unwrap_or(10000.0),
        } as f32;
        let (scaling_field, scaling) = match raw.get("rope_scaling").filter(|v| !v.is_null()) {
            Some(v) => ("rope_scaling", Some(v)),
            None => ("rope_parameters", rope_params),
        };
        let rope_scaling = match scaling {
            None => RopeScaling::None,
            Some(v) => parse_rope_scaling(v, file, scaling_field)?,
        };

        let max_position_embeddings = f.usize("max_position_embeddings")?;
        let sliding_window = match architecture {
            Architecture::Qwen2 if !f.opt_bool("use_sliding_window")?.unwrap_or(false) => None,
            Architecture::Llama => None,
            _ => f.opt_usize("sliding_window")?,
        };
        let max_model_len =
            sliding_window.map_or(max_position_embeddings, |w| w.min(max_position_embeddings));

        let attention_bias = f.opt_bool("attention_bias")?.unwrap_or(false);
        let (qkv_bias, o_bias) = match architecture {
            Architecture::Qwen2 => (true, false),
            Architecture::Llama => (attention_bias, attention_bias),
            Architecture::Mistral => (false, false),
        };
        let eos_token_ids = token_ids(raw, "eos_token_id", file)?.unwrap_or_default();
        let bos_token_id =
            token_ids(raw, "bos_token_id", file)?.and_then(|ids| ids.first().copied());

        let config = ModelConfig {
            architecture,
            vocab_size: f.usize("vocab_size")?,
            hidden_size,
            intermediate_size: f.usize("intermediate_size")?,
            num_layers: f.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: f.opt_f64("rms_norm_eps")?.unwrap_or(1e-6) as f32,
            rope_theta,
            rope_scaling,
            max_model_len,
            tie_word_embeddings: f.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias: f.opt_bool("mlp_bias")?.unwrap_or(false),
            bos_token_id,
            eos_token_ids,
        };
        for (field, value) in [
            ("vocab_size", config.vocab_size),
            ("hidden_size", config.hidden_size),
            ("intermediate_size", config.intermediate_size),
            ("num_hidden_layers", config.num_layers),
            ("num_attention_heads", config.num_heads),
            ("num_key_value_heads", config.num_kv_heads),
            ("max_position_embeddings", max_position_embeddings),
        ] {
            if value == 0 {
                return Err(f.err(field, "must be positive"));
            }
        }
        Ok(config)
    }
}

fn parse_rope_scaling(v: &Value, file: &str, field: &str) -> Result<RopeScaling, ModelError> {
    let err = |sub: &str, reason: &str| ModelError::Field {
        file: file.to_owned(),
        field: format!("{field}.{sub}"),
        reason: reason.to_owned(),
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64, ModelError> {
        v.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| err(key, "missing or not a number"))
    };
    match kind {
        "default" => Ok(RopeScaling::None),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")? as f32,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")? as f32,
            low_freq_factor: num("low_freq_factor")? as f32,
            high_freq_factor: num("high_freq_factor")? as f32,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        }),
        other => Err(err(
            "rope_type",
            &format!("`{other}` is not supported (supported: default, linear, llama3)"),
        )),
    }
}

/// A token id or a list of token ids (`eos_token_id` may be either); `None` when absent or null.
fn token_ids(raw: &Value, key: &str, file: &str) -> Result<Option<Vec<u32>>, ModelError> {
    let bad = || ModelError::Field {
        file: file.to_owned(),
        field: key.to_owned(),
        reason: "not a token id or a list of token ids".to_owned(),
    };
    let as_id = |v: &Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
    match raw.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| as_id(v).ok_or_else(bad))
            .collect::<Result<_, _>>()
            .map(Some),
        Some(v) => as_id(v).map(|id| Some(vec![id])).ok_or_else(bad),
    }
}

pub(crate) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, ModelError> {
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| ModelError::Json {
        path: path.display().to_string(),
        source,
    })
}

/// Typed access to a JSON object's fields with errors naming file and field.
struct Fields<'a> {
    raw: &'a Value,
    file: &'a str,
}

impl Fields<'_> {
    fn err(&self, field: &str, reason: &str) -> ModelError {
        ModelError::Field {
            file: self.file.to_owned(),
            field: field.to_owned(),
            reason: reason.to_owned(),
        }
    }

    fn present(&self, key: &str) -> Option<&Value> {
        self.raw.get(key).filter(|v| !v.is_null())
    }

    fn opt_usize(&self, key: &str) -> Result<Option<usize>, ModelError> {
        self.present(key)
            .map(|v| {
                v.as_u64()
                    .map(|n| n as usize)
                    .ok_or_else(|| self.err(key, "not a non-negative integer"))
            })
            .transpose()
    }

    fn usize(&self, key: &str) -> Result<usize, ModelError> {
        self.opt_usize(key)?.ok_or_else(|| self.err(key, "missing"))
    }

    fn opt_f64(&self, key: &str) -> Result<Option<f64>, ModelError> {
        self.present(key)
            .map(|v| v.as_f64().ok_or_else(|| self.err(key, "not a number")))
            .transpose()
    }

    fn opt_bool(&self, key: &str) -> Result<Option<bool>, ModelError> {
        self.present(key)
            .map(|v| v.as_bool().ok_or_else(|| self.err(key, "not a boolean")))
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama() -> Value {
        json!({
            "architectures": ["LlamaForCausalLM"], "vocab_size": 100, "hidden_size": 64,
            "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 256, "eos_token_id": [1, 2],
            "bos_token_id": 0
        })
    }

    #[test]
    fn parses_llama_with_gqa_and_eos_list() {
        let c = ModelConfig::from_json(&llama(), "config.json").unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.num_kv_heads, 2);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert_eq!(c.bos_token_id, Some(0));
        assert!(!c.qkv_bias);
    }

    #[test]
    fn a_known_model_type_stands_in_for_missing_architectures() {
        let mut raw = llama();
        raw.as_object_mut().unwrap().remove("architectures");
        raw["model_type"] = json!("qwen2");
        let c = ModelConfig::from_json(&raw, "config.json").unwrap();
        assert_eq!(c.architecture, Architecture::Qwen2);
        raw["model_type"] = json!("gpt2");
        let e = ModelConfig::from_json(&raw, "config.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("architectures") && e.contains("model_type"),
            "{e}"
        );
    }

    #[test]
    fn errors_name_file_and_field() {
        let mut raw = llama();
        raw["architectures"] = json!(["GPT2LMHeadModel"]);
        let e = ModelConfig::from_json(&raw, "m/config.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("m/config.json")
                && e.contains("architectures")
                && e.contains("GPT2LMHeadModel"),
            "{e}"
        );

        let mut raw = llama();
        raw.as_object_mut().unwrap().remove("hidden_size");
        let e = ModelConfig::from_json(&raw, "config.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("`hidden_size`") && e.contains("missing"), "{e}");

        let mut raw = llama();
        raw["num_key_value_heads"] = json!(3);
        let e = ModelConfig::from_json(&raw, "config.json")
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_key_value_heads"), "{e}");
    }

    #[test]
    fn llama3_rope_scaling_keeps_high_and_divides_low_frequencies() {
        let mut raw = llama();
        raw["rope_theta"] = json!(500000.0);
        raw["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64});
        let c = ModelConfig::from_json(&raw, "config.json").unwrap();
        let plain = ModelConfig {
            rope_scaling: RopeScaling::None,
            ..c.clone()
        }
        .rope_inv_freq();
        let scaled = c.rope_inv_freq();
        assert_eq!(scaled[0], plain[0], "highest frequency is kept");
        let last = plain.len() - 1;
        assert!(
            (scaled[last] - plain[last] / 8.0).abs() < 1e-12,
            "lowest frequency divided by factor"
        );
    }

    #[test]
    fn qwen2_sliding_window_only_when_enabled() {
        let mut raw = llama();
        raw["architectures"] = json!(["Qwen2ForCausalLM"]);
        raw["sliding_window"] = json!(32);
        let c = ModelConfig::from_json(&raw, "config.json").unwrap();
        assert!(c.qkv_bias && !c.o_bias);
        assert_eq!(c.max_model_len, 256);
        raw["use_sliding_window"] = json!(true);
        assert_eq!(
            ModelConfig::from_json(&raw, "config.json")
                .unwrap()
                .max_model_len,
            32
        );
    }
}
