//! A Hugging Face model folder: its config (`config`), safetensors weights (`weights`), the
//! Llama-family forward pass over a backend (`llama`), and `model init`, which writes a random
//! model in the same format (`init`). Every error names the file and the field or tensor.

pub mod config;
pub mod init;
pub mod llama;
pub mod weights;

use std::path::Path;
use std::time::Instant;

pub use config::{Architecture, ModelConfig, RopeScaling};
pub use llama::Llama;

use crate::backend::Backend;
use crate::tokenizer::Tokenizer;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: invalid JSON: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("{path}: missing: {what}")]
    Missing { path: String, what: String },
    #[error("{file}: field `{field}`: {reason}")]
    Field {
        file: String,
        field: String,
        reason: String,
    },
    #[error("{file}: tensor `{tensor}`: {reason}")]
    Tensor {
        file: String,
        tensor: String,
        reason: String,
    },
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer { path: String, reason: String },
    #[error("{backend} backend: {reason}")]
    Backend {
        backend: &'static str,
        reason: String,
    },
}

/// A loaded model: weights on a backend plus its tokenizer.
pub struct LoadedModel<B: Backend> {
    pub model: Llama<B>,
    pub tokenizer: Tokenizer,
}

/// Loads the model folder `dir` onto `backend`, logging progress.
pub fn load<B: Backend>(dir: &Path, backend: B) -> Result<LoadedModel<B>, ModelError> {
    let started = Instant::now();
    if !dir.is_dir() {
        return Err(ModelError::Missing {
            path: dir.display().to_string(),
            what: "model folder".to_owned(),
        });
    }
    let config = ModelConfig::load(dir)?;
    tracing::info!(
        dir = %dir.display(),
        architecture = ?config.architecture,
        layers = config.num_layers,
        hidden = config.hidden_size,
        vocab = config.vocab_size,
        "read model config"
    );
    let tokenizer = Tokenizer::load(dir)?;
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(ModelError::Field {
            file: dir.join("config.json").display().to_string(),
            field: "vocab_size".to_owned(),
            reason: format!(
                "{} is smaller than the tokenizer's {} tokens",
                config.vocab_size,
                tokenizer.vocab_size()
            ),
        });
    }
    let files = weights::WeightFiles::open(dir)?;
    let paths: Vec<String> = files
        .file_paths()
        .map(|p| p.display().to_string())
        .collect();
    tracing::info!(
        files = ?paths,
        tensors = files.names().count(),
        bytes = files.total_bytes(),
        "mapped weight files"
    );
    let model = Llama::load(config, &files, backend)?;
    tracing::info!(seconds = started.elapsed().as_secs_f64(), "model ready");
    Ok(LoadedModel { model, tokenizer })
}
