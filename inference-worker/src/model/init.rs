//! `llmctl model init`: writes a random-weight Llama model as a complete Hugging Face folder
//! (config, safetensors, byte-level BPE tokenizer with a chat template, generation config),
//! deterministic by seed. No hub can be reached, so this is how tests, benchmarks and the local
//! default get a model; the files are exactly what the loader reads for real checkpoints.

use std::collections::BTreeMap;
use std::path::Path;

use half::{bf16, f16};
use rayon::prelude::*;
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
    /// Shaped like Llama-3.2-1B (1.24 B parameters, tied embeddings): for GPU benchmarks.
    Llama32_1b,
    /// Shaped like Llama-3.1-8B (8.03 B parameters): for GPU benchmarks.
    Llama31_8b,
}

impl Preset {
    pub const ALL: [Preset; 4] = [
        Preset::Tiny,
        Preset::Small,
        Preset::Llama32_1b,
        Preset::Llama31_8b,
    ];

    /// The name `--preset` takes.
    pub fn name(self) -> &'static str {
        match self {
            Preset::Tiny => "tiny",
            Preset::Small => "small",
            Preset::Llama32_1b => "llama-3.2-1b",
            Preset::Llama31_8b => "llama-3.1-8b",
        }
    }
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Preset::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Preset::ALL.iter().map(|p| p.name()).collect();
                format!("unknown preset `{s}` ({})", names.join(", "))
            })
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
    /// Vocabulary the tokenizer is trained to (a small corpus cannot give more).
    vocab_target: usize,
    /// The embedding's rows when larger than the tokenizer's vocabulary (shape-faithful
    /// presets: rows past the tokenizer's are never produced but cost the same bytes).
    embedding_rows: Option<usize>,
    tie_embeddings: bool,
    max_positions: usize,
    /// Llama-3 RoPE scaling factor and the context the scaling starts from.
    rope_factor: f64,
    original_max_positions: usize,
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
                embedding_rows: None,
                tie_embeddings: false,
                max_positions: 2048,
                rope_factor: 8.0,
                original_max_positions: 512,
            },
            Preset::Small => Shape {
                hidden: 512,
                layers: 8,
                heads: 8,
                kv_heads: 4,
                intermediate: 1408,
                vocab_target: 4096,
                embedding_rows: None,
                tie_embeddings: false,
                max_positions: 4096,
                rope_factor: 8.0,
                original_max_positions: 1024,
            },
            // The shapes of these models' published config.json files.
            Preset::Llama32_1b => Shape {
                hidden: 2048,
                layers: 16,
                heads: 32,
                kv_heads: 8,
                intermediate: 8192,
                vocab_target: 4096,
                embedding_rows: Some(128_256),
                tie_embeddings: true,
                max_positions: 131_072,
                rope_factor: 32.0,
                original_max_positions: 8192,
            },
            Preset::Llama31_8b => Shape {
                hidden: 4096,
                layers: 32,
                heads: 32,
                kv_heads: 8,
                intermediate: 14_336,
                vocab_target: 4096,
                embedding_rows: Some(128_256),
                tie_embeddings: false,
                max_positions: 131_072,
                rope_factor: 8.0,
                original_max_positions: 8192,
            },
        }
    }

    /// The size its tokenizer is built to (the BPE vocabulary the special tokens join).
    pub fn tokenizer_vocab(self) -> usize {
        self.shape().vocab_target
    }

    /// Parameters of the model this preset writes when its tokenizer has `tokenizer_vocab`
    /// tokens (shape-faithful presets have a fixed embedding size whatever the tokenizer).
    pub fn parameter_count(self, tokenizer_vocab: usize) -> usize {
        let shape = self.shape();
        tensors(&shape, shape.vocab(tokenizer_vocab))
            .values()
            .map(|(dims, _)| dims.iter().product::<usize>())
            .sum()
    }
}

impl Shape {
    fn vocab(&self, tokenizer_vocab: usize) -> usize {
        self.embedding_rows
            .map_or(tokenizer_vocab, |rows| rows.max(tokenizer_vocab))
    }
}

/// Every weight tensor of the model: name, dimensions and initialisation.
fn tensors(shape: &Shape, vocab: usize) -> BTreeMap<String, (Vec<usize>, Init)> {
    let head_dim = shape.hidden / shape.heads;
    let (h, i, v) = (shape.hidden, shape.intermediate, vocab);
    let (q, kv) = (shape.heads * head_dim, shape.kv_heads * head_dim);
    let mut tensors: BTreeMap<String, (Vec<usize>, Init)> = BTreeMap::new();
    tensors.insert(
        "model.embed_tokens.weight".into(),
        (vec![v, h], Init::Normal(1.0)),
    );
    tensors.insert("model.norm.weight".into(), (vec![h], Init::Norm));
    if !shape.tie_embeddings {
        tensors.insert("lm_head.weight".into(), (vec![v, h], Init::Fan(h)));
    }
    for l in 0..shape.layers {
        let p = format!("model.layers.{l}");
        for (name, dims, init) in [
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
            tensors.insert(format!("{p}.{name}"), (dims, init));
        }
    }
    tensors
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
    let vocab = shape.vocab(tokenizer.get_vocab_size(true));
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
            "rope_type": "llama3", "factor": shape.rope_factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": shape.original_max_positions
        },
        "attention_bias": false,
        "mlp_bias": false,
        "tie_word_embeddings": shape.tie_embeddings,
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

    write_safetensors(&out.join("model.safetensors"), tensors(&shape, vocab), opts)
}

/// Writes the weights as one safetensors file, each tensor generated as it is written (the
/// 8 B preset is 16 GB: it never has to fit in memory). Tensors in name order; each tensor in
/// chunks of `CHUNK` elements, each chunk from its own stream seeded by the seed, the tensor's
/// name and the chunk's index, generated a batch at a time on every core and written in order:
/// the bytes depend only on the seed, never on the thread count.
fn write_safetensors(
    path: &Path,
    tensors: BTreeMap<String, (Vec<usize>, Init)>,
    opts: &InitOptions,
) -> Result<(), ModelError> {
    use std::io::Write;
    let (dtype, elem) = match opts.dtype {
        InitDtype::F32 => ("F32", 4),
        InitDtype::F16 => ("F16", 2),
        InitDtype::Bf16 => ("BF16", 2),
    };
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, (dims, _)) in &tensors {
        let bytes = dims.iter().product::<usize>() * elem;
        header.insert(
            name.clone(),
            json!({"dtype": dtype, "shape": dims, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut header = serde_json::to_vec(&header).expect("JSON values always serialize");
    // The data starts 8-byte aligned.
    header.resize(header.len().next_multiple_of(8), b' ');

    let io = |source| ModelError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut file =
        std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).map_err(io)?);
    file.write_all(&(header.len() as u64).to_le_bytes())
        .map_err(io)?;
    file.write_all(&header).map_err(io)?;
    const CHUNK: usize = 1 << 16;
    // Chunks generated at once: 16 Mi elements, at most 64 MiB held.
    const BATCH: usize = 256;
    for (name, (dims, init)) in &tensors {
        let seed = opts.seed ^ fnv1a(name.as_bytes());
        let total: usize = dims.iter().product();
        let chunks = total.div_ceil(CHUNK);
        let chunk = |c: usize| {
            let n = CHUNK.min(total - c * CHUNK);
            let mut rng = Rng::new(seed ^ (c as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut bytes = Vec::with_capacity(n * elem);
            for _ in 0..n {
                let x = init.sample(&mut rng) as f32;
                match opts.dtype {
                    InitDtype::F32 => bytes.extend_from_slice(&x.to_le_bytes()),
                    InitDtype::F16 => bytes.extend_from_slice(&f16::from_f32(x).to_le_bytes()),
                    InitDtype::Bf16 => bytes.extend_from_slice(&bf16::from_f32(x).to_le_bytes()),
                }
            }
            bytes
        };
        for first in (0..chunks).step_by(BATCH) {
            let batch: Vec<Vec<u8>> = (first..chunks.min(first + BATCH))
                .into_par_iter()
                .map(chunk)
                .collect();
            for bytes in &batch {
                file.write_all(bytes).map_err(io)?;
            }
        }
    }
    file.flush().map_err(io)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_faithful_presets_have_the_published_parameter_counts() {
        // Whatever the tokenizer's size: their embeddings have 128,256 rows.
        assert_eq!(Preset::Llama32_1b.parameter_count(4096), 1_235_814_400);
        assert_eq!(Preset::Llama31_8b.parameter_count(4096), 8_030_261_248);
        assert!(Preset::Tiny.parameter_count(512) < 200_000);
    }

    #[test]
    fn weights_depend_on_the_seed_not_on_the_thread_count() {
        let dir = tempfile::tempdir().unwrap();
        // Several chunks and a ragged last one, so chunks run on different threads.
        let tensors = || {
            BTreeMap::from([
                ("a".to_string(), (vec![3, (1 << 16) + 7], Init::Fan(64))),
                ("b".to_string(), (vec![5], Init::Norm)),
            ])
        };
        let write = |threads: usize, seed: u64, name: &str| {
            let path = dir.path().join(name);
            let opts = InitOptions {
                preset: Preset::Tiny,
                seed,
                dtype: InitDtype::Bf16,
            };
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(|| write_safetensors(&path, tensors(), &opts))
                .unwrap();
            std::fs::read(path).unwrap()
        };
        let one = write(1, 3, "one");
        assert_eq!(one, write(2, 3, "two"));
        assert_ne!(one, write(2, 4, "other seed"));
        // Chunks are not copies of each other.
        let data = &one[one.len() - (3 * ((1 << 16) + 7) + 5) * 2..];
        assert_ne!(data[..64], data[(1 << 17)..(1 << 17) + 64]);
    }

    #[test]
    fn weights_stream_into_a_valid_safetensors_file() {
        let dir = tempfile::tempdir().unwrap();
        let opts = InitOptions {
            preset: Preset::Tiny,
            seed: 5,
            dtype: InitDtype::F16,
        };
        write_model(dir.path(), &opts).unwrap();
        let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).unwrap())
                .unwrap();
        let vocab = config["vocab_size"].as_u64().unwrap() as usize;
        let expected = tensors(&Preset::Tiny.shape(), vocab);
        assert_eq!(file.len(), expected.len());
        for (name, (dims, _)) in &expected {
            let t = file.tensor(name).unwrap();
            assert_eq!(
                (t.dtype(), t.shape()),
                (safetensors::Dtype::F16, &dims[..]),
                "{name}"
            );
        }
        assert_eq!(
            Preset::Tiny.parameter_count(vocab),
            expected
                .values()
                .map(|(d, _)| d.iter().product::<usize>())
                .sum::<usize>()
        );
    }
}
