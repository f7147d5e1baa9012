//! `POST /v1/completions`, the legacy text endpoint: the request with its four forms of
//! `prompt`, the whole response, and the stream chunks. Range checks (`logprobs` in 0..=5,
//! `best_of >= n`) belong to the worker's validation, not here.
//!
//! Output follows OpenAI: a choice's `logprobs` and a chunk choice's `finish_reason` are
//! always written, `null` when unset; optional request fields are omitted when unset.

use std::fmt;

use serde::de::value::SeqAccessDeserializer;
use serde::de::{self, Deserializer, SeqAccess, Unexpected, Visitor};
use serde::{Deserialize, Serialize};

use crate::openai::common::{
    CompletionLogprobs, FinishReason, LogitBias, Stop, StreamOptions, Usage, present,
};
use crate::openai::tag::TextCompletionObject;

/// A legacy completions request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionRequest {
    pub model: String,
    pub prompt: Prompt,
    /// Text that comes after the completion (fill-in-the-middle).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suffix: Option<String>,
    /// Return the prompt in front of the completion.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub echo: Option<bool>,
    /// Generate this many candidates per prompt and return the `n` best.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best_of: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Choices per prompt.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    /// On this endpoint a count: return the log probabilities of this many most likely
    /// tokens per position (OpenAI allows 0 to 5).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<LogitBias>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,

    // Extensions that vLLM and other servers accept; see `ChatCompletionRequest`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ignore_eos: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_token_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_special_tokens: Option<bool>,
}

impl CompletionRequest {
    /// Whether the client asked for a stream.
    pub fn is_stream(&self) -> bool {
        self.stream == Some(true)
    }

    /// Whether a stream should end with a usage chunk and carry `"usage": null` before it.
    pub fn include_usage(&self) -> bool {
        StreamOptions::usage_requested(self.stream, self.stream_options.as_ref())
    }

    /// The stop sequences; empty when `stop` is unset.
    pub fn stop_sequences(&self) -> &[String] {
        self.stop.as_ref().map_or(&[], Stop::as_slice)
    }
}

/// `prompt` in the four forms OpenAI accepts. Written back in the form it came in.
///
/// The form of an array is decided by its first element; a later element of another form
/// is a parse error. An empty array parses as `Texts(vec![])`, zero prompts, for the worker
/// to refuse.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Prompt {
    /// `"text"`
    Text(String),
    /// `["text", "text"]`: one prompt each.
    Texts(Vec<String>),
    /// `[1, 2, 3]`: one prompt, already tokenized.
    Tokens(Vec<u32>),
    /// `[[1, 2], [3]]`: one tokenized prompt each.
    TokenBatches(Vec<Vec<u32>>),
}

impl Default for Prompt {
    fn default() -> Self {
        Prompt::Text(String::new())
    }
}

/// One prompt of a request, after [`Prompt::into_prompts`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptInput {
    Text(String),
    Tokens(Vec<u32>),
}

impl Prompt {
    /// The prompts this request holds, in order: one for `Text` and `Tokens`, one per
    /// element for `Texts` and `TokenBatches`.
    pub fn into_prompts(self) -> Vec<PromptInput> {
        match self {
            Prompt::Text(text) => vec![PromptInput::Text(text)],
            Prompt::Texts(texts) => texts.into_iter().map(PromptInput::Text).collect(),
            Prompt::Tokens(tokens) => vec![PromptInput::Tokens(tokens)],
            Prompt::TokenBatches(batches) => batches.into_iter().map(PromptInput::Tokens).collect(),
        }
    }

    /// How many prompts [`Prompt::into_prompts`] will give.
    pub fn len(&self) -> usize {
        match self {
            Prompt::Text(_) | Prompt::Tokens(_) => 1,
            Prompt::Texts(texts) => texts.len(),
            Prompt::TokenBatches(batches) => batches.len(),
        }
    }

    /// True for an empty array (no prompts at all).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<'de> Deserialize<'de> for Prompt {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct PromptVisitor;

        impl<'de> Visitor<'de> for PromptVisitor {
            type Value = Prompt;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str(
                    "a string, an array of strings, an array of token ids \
                     or an array of arrays of token ids",
                )
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<Prompt, E> {
                Ok(Prompt::Text(value.to_owned()))
            }

            fn visit_string<E: de::Error>(self, value: String) -> Result<Prompt, E> {
                Ok(Prompt::Text(value))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Prompt, A::Error> {
                // The first element fixes the form; the rest must match it.
                let Some(first) = seq.next_element::<PromptElement>()? else {
                    return Ok(Prompt::Texts(Vec::new()));
                };
                let rest = SeqAccessDeserializer::new(seq);
                Ok(match first {
                    PromptElement::Text(text) => {
                        Prompt::Texts(prepend(text, Vec::deserialize(rest)?))
                    }
                    PromptElement::Token(token) => {
                        Prompt::Tokens(prepend(token, Vec::deserialize(rest)?))
                    }
                    PromptElement::Tokens(tokens) => {
                        Prompt::TokenBatches(prepend(tokens, Vec::deserialize(rest)?))
                    }
                })
            }
        }

        deserializer.deserialize_any(PromptVisitor)
    }
}

fn prepend<T>(first: T, mut rest: Vec<T>) -> Vec<T> {
    rest.insert(0, first);
    rest
}

/// The first element of an array `prompt`, which decides the array's form.
enum PromptElement {
    Text(String),
    Token(u32),
    Tokens(Vec<u32>),
}

impl<'de> Deserialize<'de> for PromptElement {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ElementVisitor;

        impl<'de> Visitor<'de> for ElementVisitor {
            type Value = PromptElement;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, a token id or an array of token ids")
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<PromptElement, E> {
                Ok(PromptElement::Text(value.to_owned()))
            }

            fn visit_string<E: de::Error>(self, value: String) -> Result<PromptElement, E> {
                Ok(PromptElement::Text(value))
            }

            fn visit_u64<E: de::Error>(self, value: u64) -> Result<PromptElement, E> {
                u32::try_from(value)
                    .map(PromptElement::Token)
                    .map_err(|_| E::invalid_value(Unexpected::Unsigned(value), &"a token id"))
            }

            fn visit_i64<E: de::Error>(self, value: i64) -> Result<PromptElement, E> {
                u64::try_from(value)
                    .map_err(|_| E::invalid_value(Unexpected::Signed(value), &"a token id"))
                    .and_then(|value| self.visit_u64(value))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<PromptElement, A::Error> {
                Vec::deserialize(SeqAccessDeserializer::new(seq)).map(PromptElement::Tokens)
            }
        }

        deserializer.deserialize_any(ElementVisitor)
    }
}

/// A whole legacy completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionResponse {
    pub id: String,
    pub object: TextCompletionObject,
    /// Unix time in seconds.
    pub created: u64,
    pub model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    pub choices: Vec<CompletionChoice>,
    pub usage: Usage,
}

/// One choice of a whole legacy completion. With several prompts, choice `index` runs
/// over prompts first: prompt `p`'s choice `i` has index `p * n + i`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChoice {
    pub text: String,
    pub index: u32,
    /// Written as `null` unless the request asked for `logprobs`.
    pub logprobs: Option<CompletionLogprobs>,
    pub finish_reason: FinishReason,
}

/// One chunk of a streamed legacy completion; OpenAI names it `text_completion` too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompletionChunk {
    pub id: String,
    pub object: TextCompletionObject,
    pub created: u64,
    pub model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    /// Empty on the final usage chunk.
    pub choices: Vec<CompletionChunkChoice>,
    /// Three states, as for [`ChatCompletionChunk::usage`](crate::ChatCompletionChunk):
    /// omitted, `null`, or the final usage.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub usage: Option<Option<Usage>>,
}

impl CompletionChunk {
    /// A chunk carrying `choices`; `usage` is written as `null` when the client asked for
    /// usage and omitted otherwise.
    pub fn new(
        id: impl Into<String>,
        created: u64,
        model: impl Into<String>,
        choices: Vec<CompletionChunkChoice>,
        include_usage: bool,
    ) -> Self {
        CompletionChunk {
            id: id.into(),
            object: TextCompletionObject,
            created,
            model: model.into(),
            system_fingerprint: None,
            choices,
            usage: include_usage.then_some(None),
        }
    }

    /// The last chunk of a stream with `include_usage`: no choices, the request's usage.
    pub fn usage_only(
        id: impl Into<String>,
        created: u64,
        model: impl Into<String>,
        usage: Usage,
    ) -> Self {
        CompletionChunk {
            usage: Some(Some(usage)),
            ..CompletionChunk::new(id, created, model, Vec::new(), true)
        }
    }
}

/// One choice's part of a legacy chunk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionChunkChoice {
    pub text: String,
    pub index: u32,
    /// Written as `null` when not asked for.
    pub logprobs: Option<CompletionLogprobs>,
    /// Written as `null` on every chunk but the choice's last.
    pub finish_reason: Option<FinishReason>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prompt(json: &str) -> Result<Prompt, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn array_form_is_decided_by_the_first_element() {
        assert_eq!(
            prompt(r#"["a","b"]"#).unwrap(),
            Prompt::Texts(vec!["a".into(), "b".into()])
        );
        assert_eq!(prompt("[1,2]").unwrap(), Prompt::Tokens(vec![1, 2]));
        assert_eq!(
            prompt("[[1],[2,3]]").unwrap(),
            Prompt::TokenBatches(vec![vec![1], vec![2, 3]])
        );
        assert_eq!(prompt("[]").unwrap(), Prompt::Texts(Vec::new()));
    }

    #[test]
    fn mixed_arrays_and_bad_token_ids_are_errors() {
        assert!(prompt(r#"["a", 1]"#).is_err());
        assert!(prompt(r#"[1, "a"]"#).is_err());
        assert!(prompt("[[1], 2]").is_err());
        assert!(prompt("[-1]").is_err());
        assert!(prompt("[4294967296]").is_err());
        assert!(prompt("[1.5]").is_err());
        assert!(prompt("7").is_err());
    }

    #[test]
    fn into_prompts_gives_one_prompt_per_element() {
        let prompts = Prompt::TokenBatches(vec![vec![1], vec![2, 3]]).into_prompts();
        assert_eq!(
            prompts,
            [
                PromptInput::Tokens(vec![1]),
                PromptInput::Tokens(vec![2, 3])
            ]
        );
        assert_eq!(
            Prompt::Tokens(vec![1, 2]).into_prompts(),
            [PromptInput::Tokens(vec![1, 2])]
        );
        assert_eq!(Prompt::Texts(Vec::new()).len(), 0);
        assert!(Prompt::Texts(Vec::new()).is_empty());
    }
}
