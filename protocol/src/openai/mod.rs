//! The OpenAI-compatible wire format, laid out in the order a request meets it: the shared
//! pieces (`common`), the two generation endpoints (`chat`, `completion`), the models list
//! (`models`) and the error envelope every endpoint may answer with (`error`). `tag` holds
//! the constant strings (`"object": "chat.completion"`, `"type": "function"`) as types.
//!
//! Serialization choices, field by field, follow what OpenAI emits: fields OpenAI sends as an
//! explicit `null` (a choice's `logprobs`, a chunk's `finish_reason`, a message's `content`
//! and `refusal`) are always written; optional request fields and optional extras are
//! omitted when unset.

pub mod chat;
pub mod common;
pub mod completion;
pub mod error;
pub mod models;
pub mod tag;

pub use chat::*;
pub use common::*;
pub use completion::*;
pub use error::*;
pub use models::*;
pub use tag::*;
