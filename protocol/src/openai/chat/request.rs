//! The body of `POST /v1/chat/completions` as the client sent it: the conversation, every
//! sampling and behaviour field OpenAI documents for the endpoint, the tool and
//! response-format declarations, and the vLLM-style extensions (`top_k`, `min_p`, ...).
//! Nothing is range-checked here; the worker converts this into its validated request.
//!
//! Every optional field is omitted when unset on output: an absent field and `null` both
//! mean "use the default", and omitting keeps a forwarded request as small as it came.

use std::fmt;

use serde::de::value::{MapAccessDeserializer, StrDeserializer};
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::openai::chat::message::ChatMessage;
use crate::openai::common::{LogitBias, Stop, StreamOptions};
use crate::openai::tag::FunctionType;

/// A chat completions request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<ChatMessage>,

    // Sampling and length, as OpenAI documents them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    /// Number of choices to generate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    /// Deprecated by OpenAI in favour of `max_completion_tokens`; both are accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<LogitBias>,
    /// Return log probabilities of the sampled tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
    /// How many alternatives to return per token; needs `logprobs: true`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,

    // Behaviour.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Tool>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,

    // Less common OpenAI fields, kept raw: accepted, echoed or refused by the worker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_tier: Option<String>,
    /// Up to 16 string key-value pairs, kept as sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_effort: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub modalities: Option<Vec<String>>,
    /// Predicted output, kept as sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prediction: Option<Value>,

    // Extensions that vLLM and other servers accept.
    /// Keep only the `k` most likely tokens; `-1` or `0` conventionally disables it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_k: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repetition_penalty: Option<f64>,
    /// Keep generating past the end-of-sequence token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ignore_eos: Option<bool>,
    /// Do not stop (on EOS or stop tokens) before this many tokens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_tokens: Option<u32>,
    /// Token ids that end generation, in addition to `stop`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stop_token_ids: Option<Vec<u32>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub skip_special_tokens: Option<bool>,
}

impl ChatCompletionRequest {
    /// The output length limit the client asked for: `max_completion_tokens` if set,
    /// otherwise the deprecated `max_tokens`.
    pub fn effective_max_tokens(&self) -> Option<u32> {
        self.max_completion_tokens.or(self.max_tokens)
    }

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

/// A tool the model may call. Only function tools are accepted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tool {
    #[serde(rename = "type")]
    pub kind: FunctionType,
    pub function: FunctionDefinition,
}

/// A function tool's declaration, passed to the chat template.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FunctionDefinition {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// JSON Schema of the arguments, kept as sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameters: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// `tool_choice`: a mode string, or one named function the model must call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum ToolChoice {
    Mode(ToolChoiceMode),
    Function(NamedToolChoice),
}

/// `tool_choice` as a string.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ToolChoiceMode {
    /// Do not call tools.
    None,
    /// The model decides.
    Auto,
    /// Call at least one tool.
    Required,
}

/// `{"type": "function", "function": {"name": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedToolChoice {
    #[serde(rename = "type")]
    pub kind: FunctionType,
    pub function: FunctionName,
}

/// The function a [`NamedToolChoice`] names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionName {
    pub name: String,
}

impl<'de> Deserialize<'de> for ToolChoice {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ToolChoiceVisitor;

        impl<'de> Visitor<'de> for ToolChoiceVisitor {
            type Value = ToolChoice;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("\"none\", \"auto\", \"required\" or a named function object")
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<ToolChoice, E> {
                ToolChoiceMode::deserialize(StrDeserializer::<E>::new(value)).map(ToolChoice::Mode)
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<ToolChoice, A::Error> {
                NamedToolChoice::deserialize(MapAccessDeserializer::new(map))
                    .map(ToolChoice::Function)
            }
        }

        deserializer.deserialize_any(ToolChoiceVisitor)
    }
}

/// `response_format`, tagged by `type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    /// Free text, the default.
    Text,
    /// Any valid JSON object.
    JsonObject,
    /// JSON matching the given schema.
    JsonSchema { json_schema: JsonSchemaFormat },
}

/// The schema of a `json_schema` response format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonSchemaFormat {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The JSON Schema itself, kept as sent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub schema: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effective_max_tokens_prefers_max_completion_tokens() {
        let mut request = ChatCompletionRequest {
            max_tokens: Some(10),
            ..Default::default()
        };
        assert_eq!(request.effective_max_tokens(), Some(10));
        request.max_completion_tokens = Some(20);
        assert_eq!(request.effective_max_tokens(), Some(20));
        request.max_tokens = None;
        assert_eq!(request.effective_max_tokens(), Some(20));
        request.max_completion_tokens = None;
        assert_eq!(request.effective_max_tokens(), None);
    }

    #[test]
    fn include_usage_needs_stream_and_the_option() {
        let options = Some(StreamOptions {
            include_usage: Some(true),
        });
        let streamed = ChatCompletionRequest {
            stream: Some(true),
            stream_options: options.clone(),
            ..Default::default()
        };
        assert!(streamed.include_usage());
        let not_streamed = ChatCompletionRequest {
            stream: Some(false),
            stream_options: options,
            ..Default::default()
        };
        assert!(!not_streamed.include_usage());
        let no_option = ChatCompletionRequest {
            stream: Some(true),
            ..Default::default()
        };
        assert!(!no_option.include_usage());
    }

    #[test]
    fn tool_choice_reads_modes_and_named_functions() {
        let auto: ToolChoice = serde_json::from_str("\"required\"").unwrap();
        assert_eq!(auto, ToolChoice::Mode(ToolChoiceMode::Required));
        let named: ToolChoice =
            serde_json::from_str(r#"{"type":"function","function":{"name":"f"}}"#).unwrap();
        let ToolChoice::Function(named) = named else {
            panic!("expected a named choice, got {named:?}");
        };
        assert_eq!(named.function.name, "f");
        let err = serde_json::from_str::<ToolChoice>("\"sometimes\"").unwrap_err();
        assert!(err.to_string().contains("sometimes"), "{err}");
        assert!(serde_json::from_str::<ToolChoice>("3").is_err());
    }
}
