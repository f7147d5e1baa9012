//! One message of a chat conversation as a client sends it: its role, its content (a string
//! or an array of typed parts), and the tool-calling fields of assistant and tool turns.
//! Which fields are allowed for which role is not checked here; neither is whether a
//! content part is supported (unknown part types parse as [`ContentPart::Unknown`] so the
//! worker can refuse them by name).

use std::borrow::Cow;
use std::fmt;

use serde::de::value::SeqAccessDeserializer;
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use crate::openai::tag::FunctionType;

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    /// OpenAI's newer name for system instructions; templates usually treat it as `system`.
    Developer,
    User,
    Assistant,
    Tool,
}

impl Role {
    /// The wire string, as chat templates expect it.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::Developer => "developer",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// One message of `messages`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: Role,
    /// May be `null` or absent for an assistant turn that only calls tools. Written as
    /// `null` when absent, the form clients send such a turn back in.
    #[serde(default)]
    pub content: Option<MessageContent>,
    /// Optional participant name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// An earlier assistant refusal, sent back as part of the history.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refusal: Option<String>,
    /// Tool calls an assistant turn made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
    /// The call a `tool` message answers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

impl ChatMessage {
    /// A message with plain-text content and nothing else.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        ChatMessage {
            role,
            content: Some(MessageContent::Text(content.into())),
            name: None,
            refusal: None,
            tool_calls: None,
            tool_call_id: None,
        }
    }

    /// The text of the content (see [`MessageContent::text`]); empty when there is none.
    pub fn text_content(&self) -> Cow<'_, str> {
        self.content
            .as_ref()
            .map_or(Cow::Borrowed(""), MessageContent::text)
    }
}

/// A message's `content`: a plain string or an array of typed parts. Written back in the
/// form it came in.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

impl MessageContent {
    /// The text of the content: the string itself, or the `text` parts joined with `"\n"`
    /// (as vLLM joins them). Parts of other types are skipped, so refuse those first.
    pub fn text(&self) -> Cow<'_, str> {
        match self {
            MessageContent::Text(text) => Cow::Borrowed(text),
            MessageContent::Parts(parts) => {
                let mut texts = parts.iter().filter_map(|part| match part {
                    ContentPart::Text { text } => Some(text.as_str()),
                    _ => None,
                });
                let Some(first) = texts.next() else {
                    return Cow::Borrowed("");
                };
                match texts.next() {
                    None => Cow::Borrowed(first),
                    Some(second) => {
                        let mut joined = format!("{first}\n{second}");
                        for text in texts {
                            joined.push('\n');
                            joined.push_str(text);
                        }
                        Cow::Owned(joined)
                    }
                }
            }
        }
    }

    /// The parts, or none for plain-string content.
    pub fn parts(&self) -> &[ContentPart] {
        match self {
            MessageContent::Text(_) => &[],
            MessageContent::Parts(parts) => parts,
        }
    }
}

impl<'de> Deserialize<'de> for MessageContent {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ContentVisitor;

        impl<'de> Visitor<'de> for ContentVisitor {
            type Value = MessageContent;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or an array of content parts")
            }

            fn visit_str<E: de::Error>(self, value: &str) -> Result<MessageContent, E> {
                Ok(MessageContent::Text(value.to_owned()))
            }

            fn visit_string<E: de::Error>(self, value: String) -> Result<MessageContent, E> {
                Ok(MessageContent::Text(value))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<MessageContent, A::Error> {
                Vec::deserialize(SeqAccessDeserializer::new(seq)).map(MessageContent::Parts)
            }
        }

        deserializer.deserialize_any(ContentVisitor)
    }
}

/// One element of an array `content`, tagged by `type`.
///
/// A part with a known `type` but a malformed body is a parse error; a part with a `type`
/// this crate does not know (`"file"`, `"input_video"`, ...) is kept whole as `Unknown` and
/// written back unchanged.
#[derive(Debug, Clone, PartialEq)]
pub enum ContentPart {
    /// `{"type": "text", "text": ...}`
    Text { text: String },
    /// `{"type": "image_url", "image_url": {"url": ..., "detail": ...}}`
    ImageUrl { image_url: ImageUrl },
    /// `{"type": "input_audio", "input_audio": {"data": ..., "format": ...}}`
    InputAudio { input_audio: InputAudio },
    /// `{"type": "refusal", "refusal": ...}`, in assistant history.
    Refusal { refusal: String },
    /// Any other `type`, the whole part as sent.
    Unknown(Value),
}

impl ContentPart {
    /// The part's `type` string, for error messages ("content part type `file` is not
    /// supported").
    pub fn kind(&self) -> &str {
        match self {
            ContentPart::Text { .. } => "text",
            ContentPart::ImageUrl { .. } => "image_url",
            ContentPart::InputAudio { .. } => "input_audio",
            ContentPart::Refusal { .. } => "refusal",
            ContentPart::Unknown(part) => part.get("type").and_then(Value::as_str).unwrap_or(""),
        }
    }
}

/// The payload of an `image_url` part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageUrl {
    /// An `https:` URL or a `data:` URL with base64 image bytes.
    pub url: String,
    /// `auto`, `low` or `high`; omitted when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The payload of an `input_audio` part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputAudio {
    /// Base64 audio bytes.
    pub data: String,
    /// `wav` or `mp3`.
    pub format: String,
}

/// The known part types, as serde derives them; [`ContentPart`] wraps this with the
/// `Unknown` fallback, which serde's derive cannot express without also swallowing
/// malformed known parts.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum KnownPart {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
    InputAudio { input_audio: InputAudio },
    Refusal { refusal: String },
}

impl Serialize for ContentPart {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        /// `{"type": kind, field: value}`: every known part has a type and one payload.
        fn part<S: Serializer, T: Serialize + ?Sized>(
            serializer: S,
            kind: &str,
            field: &str,
            value: &T,
        ) -> Result<S::Ok, S::Error> {
            let mut map = serializer.serialize_map(Some(2))?;
            map.serialize_entry("type", kind)?;
            map.serialize_entry(field, value)?;
            map.end()
        }

        match self {
            ContentPart::Text { text } => part(serializer, "text", "text", text),
            ContentPart::ImageUrl { image_url } => {
                part(serializer, "image_url", "image_url", image_url)
            }
            ContentPart::InputAudio { input_audio } => {
                part(serializer, "input_audio", "input_audio", input_audio)
            }
            ContentPart::Refusal { refusal } => part(serializer, "refusal", "refusal", refusal),
            ContentPart::Unknown(whole) => whole.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for ContentPart {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let part = Value::deserialize(deserializer)?;
        let Some(kind) = part.get("type").and_then(Value::as_str) else {
            return Err(de::Error::custom("content part needs a string `type`"));
        };
        if !matches!(kind, "text" | "image_url" | "input_audio" | "refusal") {
            return Ok(ContentPart::Unknown(part));
        }
        let known = KnownPart::deserialize(part).map_err(de::Error::custom)?;
        Ok(match known {
            KnownPart::Text { text } => ContentPart::Text { text },
            KnownPart::ImageUrl { image_url } => ContentPart::ImageUrl { image_url },
            KnownPart::InputAudio { input_audio } => ContentPart::InputAudio { input_audio },
            KnownPart::Refusal { refusal } => ContentPart::Refusal { refusal },
        })
    }
}

/// A tool call made by the assistant: in a response message, and in the history a client
/// sends back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ToolCall {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: FunctionType,
    pub function: FunctionCall,
}

/// The function a tool call invokes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    /// The arguments as a JSON-encoded string, exactly as the model wrote them.
    pub arguments: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(text: &str) -> ContentPart {
        ContentPart::Text { text: text.into() }
    }

    #[test]
    fn text_joins_text_parts_and_skips_others() {
        let image = ContentPart::ImageUrl {
            image_url: ImageUrl {
                url: "https://example.invalid/a.png".into(),
                detail: None,
            },
        };
        let content = MessageContent::Parts(vec![text("a"), image, text("b"), text("c")]);
        assert_eq!(content.text(), "a\nb\nc");
        let single = MessageContent::Parts(vec![text("only")]);
        assert!(matches!(single.text(), Cow::Borrowed("only")));
        assert_eq!(MessageContent::Parts(vec![]).text(), "");
    }

    #[test]
    fn text_content_of_null_content_is_empty() {
        let mut message = ChatMessage::new(Role::Assistant, "x");
        message.content = None;
        assert_eq!(message.text_content(), "");
    }

    #[test]
    fn part_without_type_is_an_error() {
        let err = serde_json::from_str::<ContentPart>(r#"{"text": "hi"}"#).unwrap_err();
        assert!(err.to_string().contains("`type`"), "{err}");
    }
}
