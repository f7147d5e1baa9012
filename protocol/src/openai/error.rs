//! The error envelope every endpoint answers with, `{"error": {"message", "type", "param",
//! "code"}}`, and constructors for the common cases with OpenAI's types and codes. The same
//! envelope is the payload of an SSE error event mid-stream. Which HTTP status goes with
//! which error is decided by the layer that raises it, not here.

use std::fmt;

use serde::{Deserialize, Serialize};

/// `type` of a malformed or unservable request (also OpenAI's type for a bad API key).
pub const INVALID_REQUEST_ERROR: &str = "invalid_request_error";
/// `type` of a failure on the server's side.
pub const SERVER_ERROR: &str = "server_error";

/// The body of every error response: `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub error: ApiError,
}

/// The payload of an SSE error event (`data: {"error": {...}}`), sent when a stream fails
/// after it started: the same envelope as a whole error response.
pub type StreamErrorEvent = ErrorResponse;

/// The error itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    /// For people; says what was wrong and, where there is one, names the field.
    pub message: String,
    /// A broad class: `invalid_request_error`, `server_error`, `requests`, `tokens`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault; written as `null` when none is.
    pub param: Option<String>,
    /// A stable snake_case code for programs; written as `null` when there is none.
    pub code: Option<String>,
}

/// Which rate limit a request ran into; OpenAI puts this in the error's `type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitKind {
    Requests,
    Tokens,
}

impl ErrorResponse {
    /// An error of the given `type` with no `param` and no `code`.
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        ErrorResponse {
            error: ApiError {
                message: message.into(),
                kind: kind.into(),
                param: None,
                code: None,
            },
        }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.error.param = Some(param.into());
        self
    }

    pub fn with_code(mut self, code: impl Into<String>) -> Self {
        self.error.code = Some(code.into());
        self
    }

    /// A request that cannot be served as written, not tied to one field (a body that is
    /// not JSON, say).
    pub fn invalid_request(message: impl Into<String>) -> Self {
        Self::new(INVALID_REQUEST_ERROR, message)
    }

    /// A request field with a value that is not allowed; `param` names the field.
    pub fn invalid_parameter(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::invalid_request(message).with_param(param)
    }

    /// The requested model is not served here (OpenAI's wording, type and code).
    pub fn model_not_found(model: &str) -> Self {
        Self::invalid_request(format!(
            "The model `{model}` does not exist or you do not have access to it."
        ))
        .with_code("model_not_found")
    }

    /// The API key was given but is not valid (OpenAI's type and code).
    pub fn invalid_api_key() -> Self {
        Self::invalid_request("Incorrect API key provided.").with_code("invalid_api_key")
    }

    /// No API key was given.
    pub fn missing_api_key() -> Self {
        Self::invalid_request(
            "You didn't provide an API key. Provide it in an Authorization header \
             using Bearer auth (Authorization: Bearer YOUR_KEY).",
        )
        .with_code("missing_api_key")
    }

    /// The prompt and the requested output do not fit in the model's context window.
    pub fn context_length_exceeded(message: impl Into<String>) -> Self {
        Self::invalid_parameter("messages", message).with_code("context_length_exceeded")
    }

    /// A rate limit was hit; OpenAI's type names the limit and the code is
    /// `rate_limit_exceeded`.
    pub fn rate_limit_exceeded(limit: RateLimitKind, message: impl Into<String>) -> Self {
        let kind = match limit {
            RateLimitKind::Requests => "requests",
            RateLimitKind::Tokens => "tokens",
        };
        Self::new(kind, message).with_code("rate_limit_exceeded")
    }

    /// A failure on the server's side.
    pub fn server_error(message: impl Into<String>) -> Self {
        Self::new(SERVER_ERROR, message)
    }
}

impl From<ApiError> for ErrorResponse {
    fn from(error: ApiError) -> Self {
        ErrorResponse { error }
    }
}

impl fmt::Display for ErrorResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ApiError {
            message,
            kind,
            code,
            ..
        } = &self.error;
        match code {
            Some(code) => write!(f, "{kind} ({code}): {message}"),
            None => write!(f, "{kind}: {message}"),
        }
    }
}

impl std::error::Error for ErrorResponse {}
