//! Text in and out of a model: `tokenizer.json` through the `tokenizers` crate, the chat
//! template of `tokenizer_config.json` rendered with minijinja (as transformers renders it with
//! jinja2), and incremental detokenization for streaming. Owns special tokens and templates;
//! does not know about sampling or stop conditions.

pub mod bpe_builder;
mod incremental;

use std::path::Path;

use minijinja::{Environment, ErrorKind, Value as JinjaValue};
use serde::Serialize;
use serde_json::Value;

pub use incremental::IncrementalDecoder;

use crate::model::ModelError;

/// A chat template that failed to render (bad template, or one that raised on the input).
#[derive(Debug, thiserror::Error)]
#[error("chat template: {0}")]
pub struct ChatTemplateError(pub String);

const TEMPLATE_NAME: &str = "chat";

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat: Option<Environment<'static>>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// For tokenizers that keep every input byte (byte-level, no normalizer): the most bytes
    /// one token stands for, so a text of `n` bytes is at least `n / this` tokens.
    max_token_bytes: Option<usize>,
}

impl Tokenizer {
    /// Loads `tokenizer.json` and, when present, `tokenizer_config.json` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("tokenizer.json");
        if !path.exists() {
            return Err(ModelError::Missing {
                path: path.display().to_string(),
                what: "tokenizer file".to_owned(),
            });
        }
        let inner = tokenizers::Tokenizer::from_file(&path).map_err(|e| ModelError::Tokenizer {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        let config_path = dir.join("tokenizer_config.json");
        let config: Value = if config_path.exists() {
            crate::model::config::read_json(&config_path)?
        } else {
            Value::Null
        };
        let token_field = |key: &str| match config.get(key) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_owned),
            _ => None,
        };
        // transformers 5 saves the template beside the config as `chat_template.jinja`.
        let jinja_path = dir.join("chat_template.jinja");
        let template = match config.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: the one called "default" is the chat template.
            Some(Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|t| t.get("template").and_then(Value::as_str))
                .map(str::to_owned),
            _ if jinja_path.exists() => Some(std::fs::read_to_string(&jinja_path).map_err(
                |source| ModelError::Io {
                    path: jinja_path.display().to_string(),
                    source,
                },
            )?),
            _ => None,
        };
        let chat = template
            .map(|source| {
                chat_environment(source).map_err(|e| ModelError::Field {
                    file: config_path.display().to_string(),
                    field: "chat_template".to_owned(),
                    reason: e.to_string(),
                })
            })
            .transpose()?;
        Ok(Self {
            max_token_bytes: max_token_bytes(&inner),
            inner,
            chat,
            bos_token: token_field("bos_token"),
            eos_token: token_field("eos_token"),
        })
    }

    pub fn from_parts(inner: tokenizers::Tokenizer) -> Self {
        Self {
            max_token_bytes: max_token_bytes(&inner),
            inner,
            chat: None,
            bos_token: None,
            eos_token: None,
        }
    }

    /// The fewest tokens `text` can encode to, without encoding it, where the tokenizer allows
    /// a sound bound (byte-level ones: every byte is kept, and no token stands for more bytes
    /// than the longest in the vocabulary); `None` otherwise.
    pub fn min_tokens(&self, text: &str) -> Option<usize> {
        self.max_token_bytes.map(|l| text.len().div_ceil(l))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat.is_some()
    }

    /// Token ids of `text`; `add_special_tokens` applies the tokenizer's post-processor (BOS).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, String> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| e.to_string())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| e.to_string())
    }

    /// The id of a token given by its exact vocabulary string.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The bytes one token stands for (its UTF-8 text may be incomplete), as OpenAI's
    /// `logprobs.bytes` reports them.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let Some(piece) = self.inner.id_to_token(id) else {
            return Vec::new();
        };
        if self.inner.get_added_vocabulary().is_special_token(&piece) {
            return piece.into_bytes();
        }
        byte_level_bytes(&piece).unwrap_or_else(|| piece.into_bytes())
    }

    /// Renders the chat template as transformers' `apply_chat_template(tokenize=False)` does.
    pub fn render_chat<M: Serialize>(
        &self,
        messages: &[M],
        add_generation_prompt: bool,
    ) -> Result<String, ChatTemplateError> {
        let env = self
            .chat
            .as_ref()
            .ok_or_else(|| ChatTemplateError("the model has no chat template".to_owned()))?;
        let template = env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ChatTemplateError(e.to_string()))?;
        template
            .render(minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => self.bos_token.clone().unwrap_or_default(),
                eos_token => self.eos_token.clone().unwrap_or_default(),
            })
            .map_err(|e| ChatTemplateError(describe(&e)))
    }
}

fn chat_environment(source: String) -> Result<Environment<'static>, minijinja::Error> {
    let mut env = Environment::new();
    // transformers renders with jinja2's trim_blocks and lstrip_blocks.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    minijinja_contrib::add_to_environment(&mut env);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function(
        "raise_exception",
        |msg: String| -> Result<JinjaValue, minijinja::Error> {
            Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
        },
    );
    env.add_template_owned(TEMPLATE_NAME, source)?;
    Ok(env)
}

fn describe(e: &minijinja::Error) -> String {
    match e.detail() {
        Some(detail) if e.kind() == ErrorKind::InvalidOperation => detail.to_owned(),
        _ => e.to_string(),
    }
}

/// Inverse of GPT-2's byte-to-unicode map: the bytes a byte-level BPE token string stands for.
/// The longest vocabulary entry in bytes, for a tokenizer whose encoding keeps every input byte:
/// no normalizer, and a byte-level pre-tokenizer (alone or in a sequence) that maps each byte to
/// a character. Other set-ups can drop input (whitespace splitting, stripping normalizers).
fn max_token_bytes(inner: &tokenizers::Tokenizer) -> Option<usize> {
    let json = serde_json::to_value(inner).ok()?;
    if !json["normalizer"].is_null() {
        return None;
    }
    // An added token that strips the whitespace beside it can swallow any amount of it.
    let strips = |t: &Value| t["lstrip"] == true || t["rstrip"] == true;
    if json["added_tokens"]
        .as_array()
        .is_some_and(|ts| ts.iter().any(strips))
    {
        return None;
    }
    let pre = &json["pre_tokenizer"];
    let byte_level = |p: &Value| p["type"] == "ByteLevel";
    let keeping_split = |p: &Value| p["type"] == "Split" && p["behavior"] != "Removed";
    let keeps_bytes = byte_level(pre)
        || (pre["type"] == "Sequence"
            && pre["pretokenizers"].as_array().is_some_and(|ps| {
                ps.iter().any(byte_level) && ps.iter().all(|p| byte_level(p) || keeping_split(p))
            }));
    if !keeps_bytes {
        return None;
    }
    // Special tokens are matched before the model: a piece's string is what it stands for,
    // and a byte-level piece's characters each stand for one byte, at most.
    inner
        .get_vocab(true)
        .keys()
        .map(|piece| piece.len())
        .max()
        .filter(|&l| l > 0)
}

fn byte_level_bytes(piece: &str) -> Option<Vec<u8>> {
    piece.chars().map(bpe_builder::char_to_byte).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size bound never claims more tokens than encoding gives, whatever the text.
    #[test]
    fn the_size_bound_is_never_above_the_real_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        bpe_builder::write_tokenizer(&path, 512, 7).unwrap();
        let tok = Tokenizer::load(dir.path()).unwrap();
        let texts = [
            String::new(),
            "hello world".to_owned(),
            " ".repeat(5000),
            "aaaa".repeat(3000),
            "ünïcödé 漢字 🎉 ".repeat(200),
            (0..4000u32)
                .map(|i| char::from_u32(32 + i % 5000).unwrap_or('x'))
                .collect(),
        ];
        for text in &texts {
            let bound = tok.min_tokens(text).expect("a byte-level tokenizer");
            let real = tok.encode(text, false).unwrap().len();
            assert!(bound <= real, "bound {bound} > {real} tokens");
        }
        // A tokenizer that may drop input gives no bound.
        let mut json: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        json["normalizer"] =
            serde_json::json!({"type": "Strip", "strip_left": true, "strip_right": true});
        std::fs::write(&path, json.to_string()).unwrap();
        assert_eq!(
            Tokenizer::load(dir.path()).unwrap().min_tokens("  x  "),
            None
        );
    }
}
