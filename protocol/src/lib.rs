//! Wire types of llmctl's APIs, with serde and nothing else: no I/O and no validation.
//!
//! - [`openai`]: the OpenAI-compatible surface that clients talk to — chat and legacy
//!   completion requests, responses and stream chunks, the models list and the error
//!   envelope. Requests are kept raw: ranges and combinations are checked later, when the
//!   worker converts them into its validated types. Fields a client sends that are not
//!   modelled here are accepted and ignored; a modelled field of the wrong type is a parse
//!   error.
//! - [`control`]: the control API between gateways and the pool controller (demand reports,
//!   endpoint snapshots).
//! - [`demand`]: the expected decode tokens of a request, from what a pool's requests generated
//!   (the gateway's demand reports and the replay's simulated gateway share it).
//! - [`routing`]: the dispatch choice gateways make (least outstanding, prefix affinity), a pure
//!   function kept here so the controller's trace replay runs the very same code.
//!
//! The OpenAI types are re-exported at the crate root, so `llmctl_protocol::ChatCompletionRequest`
//! and `llmctl_protocol::openai::ChatCompletionRequest` name the same type.

pub mod control;
pub mod demand;
pub mod openai;
pub mod routing;

pub use openai::*;
