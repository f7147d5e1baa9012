//! What `POST /v1/chat/completions` answers: the whole [`ChatCompletionResponse`], or a
//! stream of [`ChatCompletionChunk`]s, each sent as one SSE `data:` line.
//!
//! Nulls follow OpenAI's output: a choice's `logprobs`, a message's `content` and
//! `refusal`, and a chunk choice's `finish_reason` are always written, `null` when unset.
//! A chunk's `usage` has three states (see [`ChatCompletionChunk::usage`]). Delta fields
//! and optional extras (`system_fingerprint`, `service_tier`, `tool_calls`) are omitted
//! when unset.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::openai::chat::message::{Role, ToolCall};
use crate::openai::common::{ChatLogprobs, FinishReason, Usage, present};
use crate::openai::tag::{ChatCompletionChunkObject, ChatCompletionObject, FunctionType};

/// A whole chat completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionResponse {
    pub id: String,
    pub object: ChatCompletionObject,
    /// Unix time in seconds.
    pub created: u64,
    pub model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_tier: Option<String>,
    pub choices: Vec<ChatChoice>,
    pub usage: Usage,
}

/// One choice of a whole completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatChoice {
    pub index: u32,
    pub message: ChatCompletionMessage,
    /// Written as `null` unless the request asked for `logprobs`.
    pub logprobs: Option<ChatLogprobs>,
    pub finish_reason: FinishReason,
}

/// The assistant message of a choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionMessage {
    /// Always `assistant` in practice.
    pub role: Role,
    /// Written as `null` when the message only calls tools.
    pub content: Option<String>,
    /// Written as `null` unless the model refused.
    pub refusal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// URL citations and the like, kept raw; omitted when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub annotations: Option<Vec<Value>>,
}

impl ChatCompletionMessage {
    /// An assistant message with text content.
    pub fn assistant(content: impl Into<String>) -> Self {
        ChatCompletionMessage {
            role: Role::Assistant,
            content: Some(content.into()),
            refusal: None,
            tool_calls: None,
            annotations: None,
        }
    }
}

/// One chunk of a streamed chat completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    /// The same for every chunk of a stream.
    pub id: String,
    pub object: ChatCompletionChunkObject,
    /// The same for every chunk of a stream.
    pub created: u64,
    pub model: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system_fingerprint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_tier: Option<String>,
    /// Empty on the final usage chunk.
    pub choices: Vec<ChatChunkChoice>,
    /// Three states, as OpenAI emits them:
    /// - `None`: the field is omitted (the client did not set `include_usage`);
    /// - `Some(None)`: `"usage": null` (`include_usage` set, not the last chunk);
    /// - `Some(Some(usage))`: the final usage chunk.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub usage: Option<Option<Usage>>,
}

impl ChatCompletionChunk {
    /// A chunk carrying `choices`; `usage` is written as `null` when the client asked for
    /// usage and omitted otherwise.
    pub fn new(
        id: impl Into<String>,
        created: u64,
        model: impl Into<String>,
        choices: Vec<ChatChunkChoice>,
        include_usage: bool,
    ) -> Self {
        ChatCompletionChunk {
            id: id.into(),
            object: ChatCompletionChunkObject,
            created,
            model: model.into(),
            system_fingerprint: None,
            service_tier: None,
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
        ChatCompletionChunk {
            usage: Some(Some(usage)),
            ..ChatCompletionChunk::new(id, created, model, Vec::new(), true)
        }
    }
}

/// One choice's part of a chunk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatChunkChoice {
    pub index: u32,
    pub delta: ChatDelta,
    /// Log probabilities of this chunk's tokens; written as `null` when not asked for.
    pub logprobs: Option<ChatLogprobs>,
    /// Written as `null` on every chunk but the choice's last.
    pub finish_reason: Option<FinishReason>,
}

/// What a chunk adds to a choice's message. Every field is omitted when unset, so the
/// closing chunk of a choice carries `"delta": {}`. (OpenAI sometimes writes
/// `"content": null` in a first chunk; clients read absent and `null` deltas alike, and
/// both parse as `None` here.)
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChatDelta {
    /// Sent on a choice's first chunk only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// A piece of a tool call: the first piece of a call carries `id`, `type` and the function
/// name; later pieces carry only `index` and more `arguments` text.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCallDelta {
    /// Which of the message's tool calls this piece extends.
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<FunctionType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub function: Option<FunctionCallDelta>,
}

/// A piece of a tool call's function.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCallDelta {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The next fragment of the JSON-encoded arguments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}
