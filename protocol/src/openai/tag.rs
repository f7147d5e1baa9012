//! Constant strings on the wire, as types: the `object` field of each response and the
//! `"type": "function"` of tools and tool calls. Each tag is a zero-sized type that always
//! serializes to its one string and refuses any other on input, so a response cannot be
//! built with the wrong `object`, and a body labelled as something else fails to parse
//! with a message that names the expected string.

use serde::de::{self, Deserialize, Deserializer, Unexpected};
use serde::{Serialize, Serializer};

macro_rules! tag {
    ($(#[$doc:meta])* $name:ident = $value:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
        pub struct $name;

        impl $name {
            /// The string this tag stands for on the wire.
            pub const VALUE: &'static str = $value;
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str($value)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let found = String::deserialize(deserializer)?;
                if found == $value {
                    Ok($name)
                } else {
                    Err(de::Error::invalid_value(
                        Unexpected::Str(&found),
                        &concat!("\"", $value, "\""),
                    ))
                }
            }
        }
    };
}

tag!(
    /// `"object": "chat.completion"`.
    ChatCompletionObject = "chat.completion"
);
tag!(
    /// `"object": "chat.completion.chunk"`.
    ChatCompletionChunkObject = "chat.completion.chunk"
);
tag!(
    /// `"object": "text_completion"`, used by both the legacy completion response and its
    /// stream chunks (OpenAI does not give the chunks a name of their own).
    TextCompletionObject = "text_completion"
);
tag!(
    /// `"object": "list"`.
    ListObject = "list"
);
tag!(
    /// `"object": "model"`.
    ModelObject = "model"
);
tag!(
    /// `"type": "function"` of a tool, a tool call and a named tool choice: the only kind
    /// of tool this server takes. Any other kind (`"custom"`) is a parse error.
    FunctionType = "function"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_writes_its_string_and_rejects_any_other() {
        assert_eq!(
            serde_json::to_string(&ChatCompletionChunkObject).unwrap(),
            "\"chat.completion.chunk\""
        );
        assert!(serde_json::from_str::<ChatCompletionObject>("\"chat.completion\"").is_ok());
        let err = serde_json::from_str::<ChatCompletionObject>("\"chat.completion.chunk\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"chat.completion\""), "{err}");
        assert!(serde_json::from_str::<ModelObject>("7").is_err());
    }
}
