//! `llmctl model init`: writes a random-weight Llama model as a complete Hugging Face folder
//! (config, safetensors, byte-level BPE tokenizer with a chat template, generation config),
//! deterministic by seed. No hub can be reached, so this is how tests, benchmarks and the local
//! default get a model; the files are exactly what the loader reads for real checkpoints.

use std::collections::BTreeMap;
use std::path::Path;

use half::{bf16, f16};
use safetensors::Dtype;
use serde_json::json;

use super::ModelError;
use crate::rng::Rng;
use crate::tokenizer::bpe_builder;

/// Model sizes `model init` can write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Preset {
    /// About 0.1 M parameters: for fast tests.
    Tiny,
    /// About 30 M parameters: large enough for meaningful CPU throughput numbers.
    Small,
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tiny" => Ok(Self::Tiny),
            "small" => Ok(Self::Small),
            other => Err(format!("unknown preset `{other}` (tiny, small)")),
        }
    }
}

/// Weight dtype written to the safetensors file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InitDtype {
    F32,
    F16,
    Bf16,
}

impl std::str::FromStr for InitDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(format!("unknown dtype `{other}` (f32, f16, bf16)")),
        }
    }
}

struct Shape {
    hidden: usize,
    layers: usize,
    heads: usize,
    kv_heads: usize,
    intermediate: usize,
    vocab_target: usize,
    max_positions: usize,
}

impl Preset {
    fn shape(self) -> Shape {
        match self {
            Preset::Tiny => Shape {
                hidden: 64,
                layers: 2,
                heads: 4,
                kv_heads: 2,
                intermediate: 192,
                vocab_target: 512,
                max_positions: 2048,
            },
            Preset::Small => Shape {
                hidden: 512,
                layers: 8,
                heads: 8,
                kv_heads: 4,
                intermediate: 1408,
                vocab_target: 4096,
                max_positions: 4096,
            },
        }
    }
}

/// Options of `llmctl model init`.
#[derive(Clone, Debug)]
pub struct InitOptions {
    pub preset: Preset,
    pub seed: u64,
    pub dtype: InitDtype,
}

/// Writes the model folder `out` (created if needed).
pub fn write_model(out: &Path, opts: &InitOptions) -> Result<(), ModelError> {
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| ModelError::Io {
            path: path.clone(),
            source,
        }
    };
    std::fs::create_dir_all(out).map_err(io(out))?;
    let shape = opts.preset.shape();

    let tok_path = out.join("tokenizer.json");
    bpe_builder::write_tokenizer(&tok_path, shape.vocab_target, opts.seed).map_err(|reason| {
        ModelError::Tokenizer {
            path: tok_path.display().to_string(),
            reason,
        }
    })?;
    let tokenizer =
        tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| ModelError::Tokenizer {
            path: tok_path.display().to_string(),
            reason: e.to_string(),
        })?;
    let vocab = tokenizer.get_vocab_size(true);
    let id = |t: &str| {
        tokenizer
            .token_to_id(t)
            .expect("special tokens are in the trained vocabulary")
    };
    let (bos, eos, eot) = (
        id(bpe_builder::BOS),
        id(bpe_builder::EOS),
        id(bpe_builder::EOT),
    );

    let head_dim = shape.hidden / shape.heads;
    let dtype_name = match opts.dtype {
        InitDtype::F32 => "float32",
        InitDtype::F16 => "float16",
        InitDtype::Bf16 => "bfloat16",
    };
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": shape.max_positions,
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": shape.max_positions / 4
        },
        "attention_bias": false,
        "mlp_bias": false,
        "tie_word_embeddings": false,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "torch_dtype": dtype_name,
        "initializer_range": 0.02,
    });
    write_json(&out.join("config.json"), &config)?;
    write_json(
        &out.join("generation_config.json"),
        &json!({ "bos_token_id": bos, "eos_token_id": [eos, eot], "do_sample": false }),
    )?;
    write_json(
        &out.join("tokenizer_config.json"),
        &json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": bpe_builder::BOS,
            "eos_token": bpe_builder::EOT,
            "model_max_length": shape.max_positions,
            "clean_up_tokenization_spaces": false,
            "chat_template": bpe_builder::CHAT_TEMPLATE,
        }),
    )?;

    let (h, i, v) = (shape.hidden, shape.intermediate, vocab);
    let (q, kv) = (shape.heads * head_dim, shape.kv_heads * head_dim);
    let mut tensors: BTreeMap<String, (Vec<usize>, Init)> = BTreeMap::new();
    tensors.insert(
        "model.embed_tokens.weight".into(),
        (vec![v, h], Init::Normal(1.0)),
    );
    tensors.insert("model.norm.weight".into(), (vec![h], Init::Norm));
    tensors.insert("lm_head.weight".into(), (vec![v, h], Init::Fan(h)));
    for l in 0..shape.layers {
        let p = format!("model.layers.{l}");
        for (name, shape, init) in [
            ("input_layernorm.weight", vec![h], Init::Norm),
            ("post_attention_layernorm.weight", vec![h], Init::Norm),
            ("self_attn.q_proj.weight", vec![q, h], Init::Fan(h)),
            ("self_attn.k_proj.weight", vec![kv, h], Init::Fan(h)),
            ("self_attn.v_proj.weight", vec![kv, h], Init::Fan(h)),
            ("self_attn.o_proj.weight", vec![h, q], Init::Fan(q)),
            ("mlp.gate_proj.weight", vec![i, h], Init::Fan(h)),
            ("mlp.up_proj.weight", vec![i, h], Init::Fan(h)),
            ("mlp.down_proj.weight", vec![h, i], Init::Fan(i)),
        ] {
            tensors.insert(format!("{p}.{name}"), (shape, init));
        }
    }
    let (st_dtype, elem) = match opts.dtype {
        InitDtype::F32 => (Dtype::F32, 4),
        InitDtype::F16 => (Dtype::F16, 2),
        InitDtype::Bf16 => (Dtype::BF16, 2),
    };
    let encoded: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .into_iter()
        .map(|(name, (shape, init))| {
            let n: usize = shape.iter().product();
            let mut rng = Rng::new(opts.seed ^ fnv1a(name.as_bytes()));
            let mut bytes = Vec::with_capacity(n * elem);
            for _ in 0..n {
                let x = init.sample(&mut rng) as f32;
                match opts.dtype {
                    InitDtype::F32 => bytes.extend_from_slice(&x.to_le_bytes()),
                    InitDtype::F16 => bytes.extend_from_slice(&f16::from_f32(x).to_le_bytes()),
                    InitDtype::Bf16 => bytes.extend_from_slice(&bf16::from_f32(x).to_le_bytes()),
                }
            }
            (name, shape, bytes)
        })
        .collect();
    let views = encoded
        .iter()
        .map(|(name, shape, bytes)| {
            safetensors::tensor::TensorView::new(st_dtype, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| ModelError::Tensor {
                    file: "model.safetensors".into(),
                    tensor: name.clone(),
                    reason: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_owned(),
        "pt".to_owned(),
    )]));
    let st_path = out.join("model.safetensors");
    safetensors::serialize_to_file(views, metadata, &st_path).map_err(|e| ModelError::Tensor {
        file: st_path.display().to_string(),
        tensor: "(file)".into(),
        reason: e.to_string(),
    })?;
    Ok(())
}

#[derive(Clone, Copy)]
enum Init {
    /// Normal with this standard deviation.
    Normal(f64),
    /// Normal with std `1/sqrt(fan_in)`: activations keep unit scale, logits spread a few units.
    Fan(usize),
    /// RMSNorm gain: `1 + 0.1 * normal`.
    Norm,
}

impl Init {
    fn sample(self, rng: &mut Rng) -> f64 {
        match self {
            Init::Normal(std) => std * rng.normal(),
            Init::Fan(fan_in) => rng.normal() / (fan_in as f64).sqrt(),
            Init::Norm => 1.0 + 0.1 * rng.normal(),
        }
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), ModelError> {
    let text = serde_json::to_string_pretty(value).expect("JSON values always serialize");
    std::fs::write(path, text + "\n").map_err(|source| ModelError::Io {
        path: path.display().to_string(),
        source,
    })
}
