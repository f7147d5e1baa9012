//! Pieces shared by the chat and legacy completion endpoints: stop sequences, logit bias,
//! stream options, finish reasons, token usage, and both shapes of log probabilities (the
//! chat `content` list and the legacy parallel arrays). The request and response types of
//! each endpoint live in `chat` and `completion`.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::value::SeqAccessDeserializer;
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};

/// `logit_bias`: token id, written as a decimal string, to a bias added to that token's
/// logit. Keys are not parsed here; the worker checks them against its vocabulary.
pub type LogitBias = BTreeMap<String, f64>;

/// `stop`: one sequence or a list of them. Written back in the form it came in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    /// The stop sequences, whichever form they came in.
    pub fn as_slice(&self) -> &[String] {
        match self {
            Stop::One(sequence) => std::slice::from_ref(sequence),
            Stop::Many(sequences) => sequences,
        }
    }
}

impl<'de> Deserialize<'de> for Stop {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StopVisitor;

        impl<'de> Visitor<'de> for StopVisitor {
            type Value = Stop;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or an array of strings")
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<Stop, E> {
                Ok(Stop::One(value.to_owned()))
            }

            fn visit_string<E: de::Error>(self, value: String) -> Result<Stop, E> {
                Ok(Stop::One(value))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Stop, A::Error> {
                Vec::deserialize(SeqAccessDeserializer::new(seq)).map(Stop::Many)
            }
        }

        deserializer.deserialize_any(StopVisitor)
    }
}

/// `stream_options`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// Ask for a final chunk with empty `choices` and the request's `usage`; every other
    /// chunk then carries `"usage": null`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub include_usage: Option<bool>,
}

impl StreamOptions {
    /// Whether a request with these options ends its stream with a usage chunk: only when it
    /// streams and asked for it.
    pub fn usage_requested(stream: Option<bool>, options: Option<&StreamOptions>) -> bool {
        stream == Some(true) && options.and_then(|o| o.include_usage) == Some(true)
    }
}

/// Why a choice stopped generating.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop sequence, a stop token or end of sequence.
    Stop,
    /// The token limit (`max_tokens` or the context window).
    Length,
    /// The model called one or more tools.
    ToolCalls,
    /// Output was withheld by a content filter.
    ContentFilter,
    /// Deprecated single-function calling; kept so such bodies still parse.
    FunctionCall,
}

impl FinishReason {
    /// The wire string, also usable as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ToolCalls => "tool_calls",
            FinishReason::ContentFilter => "content_filter",
            FinishReason::FunctionCall => "function_call",
        }
    }
}

/// Token counts for a whole request (all choices together).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Omitted when unset; the legacy endpoint's usage has no details.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_tokens_details: Option<PromptTokensDetails>,
    /// Omitted when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completion_tokens_details: Option<CompletionTokensDetails>,
}

impl Usage {
    /// Usage with `total_tokens` computed and no details.
    pub fn new(prompt_tokens: u64, completion_tokens: u64) -> Self {
        Usage {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
            prompt_tokens_details: None,
            completion_tokens_details: None,
        }
    }
}

/// `usage.prompt_tokens_details`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    #[serde(default)]
    pub cached_tokens: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audio_tokens: Option<u64>,
}

/// `usage.completion_tokens_details`; every count is omitted when unset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompletionTokensDetails {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audio_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub accepted_prediction_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rejected_prediction_tokens: Option<u64>,
}

/// A chat choice's `logprobs` object.
///
/// Log probabilities must be finite: JSON has no `-inf`, and serde_json writes non-finite
/// numbers as `null`, which does not parse back. Clamp them (OpenAI uses `-9999.0`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatLogprobs {
    /// One entry per generated content token; written as `null` when absent, as OpenAI does.
    pub content: Option<Vec<ChatTokenLogprob>>,
    /// Per-token log probabilities of a refusal; written as `null` when absent.
    pub refusal: Option<Vec<ChatTokenLogprob>>,
}

/// One sampled token with its log probability and the most likely alternatives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatTokenLogprob {
    pub token: String,
    pub logprob: f64,
    /// UTF-8 bytes of the token; `null` when the token has no byte form.
    pub bytes: Option<Vec<u8>>,
    /// `top_logprobs` alternatives, most likely first; written as `[]` when none were asked.
    #[serde(default)]
    pub top_logprobs: Vec<TopLogprob>,
}

/// One alternative token in a chat `top_logprobs` list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TopLogprob {
    pub token: String,
    pub logprob: f64,
    pub bytes: Option<Vec<u8>>,
}

/// A legacy completion choice's `logprobs`: four arrays, one entry per token.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompletionLogprobs {
    pub tokens: Vec<String>,
    /// `null` for a token with no log probability (the first echoed prompt token).
    pub token_logprobs: Vec<Option<f64>>,
    /// The `logprobs` most likely alternatives per position; `null` where there are none.
    pub top_logprobs: Vec<Option<TopLogprobMap>>,
    /// Character offset of each token in the choice's text.
    pub text_offset: Vec<u32>,
}

/// One position's alternatives in the legacy shape, `{token: logprob}`, kept in the order
/// given (most likely first) and written in that order: clients read the first key as the
/// top token. Two token ids that decode to the same string must be merged by the producer,
/// since a JSON object cannot hold the key twice.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopLogprobMap(pub Vec<(String, f64)>);

impl Serialize for TopLogprobMap {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (token, logprob) in &self.0 {
            map.serialize_entry(token, logprob)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for TopLogprobMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor;

        impl<'de> Visitor<'de> for MapVisitor {
            type Value = TopLogprobMap;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object from token to log probability")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TopLogprobMap, A::Error> {
                let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
                while let Some(entry) = map.next_entry::<String, f64>()? {
                    entries.push(entry);
                }
                Ok(TopLogprobMap(entries))
            }
        }

        deserializer.deserialize_map(MapVisitor)
    }
}

/// Deserializes a field that is present, even as `null`, as `Some`. With `#[serde(default)]`
/// a missing field stays `None`, giving `Option<Option<T>>` its three states: absent, `null`,
/// a value. Used for a stream chunk's `usage`.
pub(crate) fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_as_slice_covers_both_forms() {
        assert_eq!(Stop::One("\n".into()).as_slice(), ["\n".to_string()]);
        let many = Stop::Many(vec!["a".into(), "b".into()]);
        assert_eq!(many.as_slice(), ["a".to_string(), "b".to_string()]);
    }

    #[test]
    fn stop_rejects_numbers_and_mixed_arrays() {
        assert!(serde_json::from_str::<Stop>("5").is_err());
        assert!(serde_json::from_str::<Stop>(r#"["a", 5]"#).is_err());
    }

    #[test]
    fn usage_new_sums_total() {
        let usage = Usage::new(19, 10);
        assert_eq!(usage.total_tokens, 29);
    }

    #[test]
    fn top_logprob_map_keeps_order_on_output() {
        let map = TopLogprobMap(vec![("z".into(), -0.5), ("a".into(), -1.5)]);
        assert_eq!(
            serde_json::to_string(&map).unwrap(),
            r#"{"z":-0.5,"a":-1.5}"#
        );
        let back: TopLogprobMap = serde_json::from_str(r#"{"z":-0.5,"a":-1.5}"#).unwrap();
        assert_eq!(back, map);
    }
}
