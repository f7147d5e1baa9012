//! The worker's HTTP errors: one enum, one mapping to status and OpenAI error body, used for
//! plain responses and for SSE error events alike.

use http::StatusCode;
use llmctl_protocol::ErrorResponse;

use crate::engine::EngineError;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// A request OpenAI would refuse: `param` names the offending field.
    #[error("{message}")]
    BadRequest {
        param: Option<String>,
        message: String,
        code: Option<&'static str>,
    },
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    #[error("no route for {0}")]
    RouteNotFound(String),
    #[error("method {0} is not allowed here")]
    MethodNotAllowed(String),
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(std::time::Duration),
    /// Loading, or draining for shutdown.
    #[error("{0}")]
    Unavailable(&'static str),
    #[error("{0}")]
    Internal(String),
}

impl ServerError {
    pub fn param(param: &str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            param: Some(param.to_owned()),
            message: message.into(),
            code: None,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::BadRequest { .. } => StatusCode::BAD_REQUEST,
            Self::ModelNotFound(_) | Self::RouteNotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn body(&self) -> ErrorResponse {
        let message = self.to_string();
        match self {
            Self::BadRequest { param, code, .. } => {
                let mut e = ErrorResponse::invalid_request(message);
                if let Some(p) = param {
                    e = e.with_param(p.clone());
                }
                if let Some(c) = code {
                    e = e.with_code(*c);
                }
                e
            }
            Self::ModelNotFound(model) => ErrorResponse::model_not_found(model),
            Self::RouteNotFound(_) => {
                ErrorResponse::invalid_request(message).with_code("not_found")
            }
            Self::MethodNotAllowed(_) => {
                ErrorResponse::invalid_request(message).with_code("method_not_allowed")
            }
            Self::TooLarge(_) => {
                ErrorResponse::invalid_request(message).with_code("request_too_large")
            }
            Self::BodyTimeout(_) => {
                ErrorResponse::invalid_request(message).with_code("request_timeout")
            }
            Self::Unavailable(_) => {
                ErrorResponse::new("service_unavailable", message).with_code("service_unavailable")
            }
            Self::Internal(_) => ErrorResponse::server_error(message),
        }
    }
}

impl From<EngineError> for ServerError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::Param(p) => Self::param(p.param, p.to_string()),
            EngineError::TooLong { .. } => Self::BadRequest {
                param: Some("messages".into()),
                message: e.to_string(),
                code: Some("context_length_exceeded"),
            },
            EngineError::TooLargeForCache { .. } => Self::param("max_tokens", e.to_string()),
            EngineError::EmptyPrompt => Self::param("prompt", e.to_string()),
            EngineError::BadToken(_) => Self::param("prompt", e.to_string()),
            EngineError::DuplicateId(_) => Self::Internal(e.to_string()),
        }
    }
}
