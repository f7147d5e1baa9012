//! The gateway's client-facing errors: one enum, one mapping to status, OpenAI error body and
//! `Retry-After`. Codes are stable snake_case and double as log fields.

use std::time::Duration;

use http::{Response, StatusCode, header};
use llmctl_protocol::{ErrorResponse, RateLimitKind};

use crate::body::{self, Body};
use crate::limit::{LimitKind, Refusal};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("You didn't provide an API key.")]
    MissingKey,
    #[error("Incorrect API key provided.")]
    InvalidKey,
    #[error("{message}")]
    BadRequest {
        message: String,
        param: Option<String>,
        code: &'static str,
    },
    #[error("The model `{0}` does not exist or you do not have access to it.")]
    UnknownModel(String),
    #[error("no route for {0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(Duration),
    #[error("rate limit reached for {}: retry after {:.1}s", .0.kind.as_str(), .0.retry_after.as_secs_f64())]
    RateLimited(Refusal),
    /// The request's token charge is more than its tenant's whole tokens-per-minute limit: no
    /// wait admits it, so it is not a 429 (which SDKs retry forever).
    #[error(
        "this request needs about {0} tokens (prompt estimate plus max_tokens x n), more than \
         your tokens-per-minute limit allows in a minute; lower max_tokens or shorten the prompt"
    )]
    ExceedsLimit(u32),
    #[error("the queue for this model is full")]
    QueueFull(Duration),
    #[error("no executor became available before the deadline")]
    NoCapacity(Duration),
    #[error("the gateway is shutting down")]
    Draining,
    #[error("the executor failed: {0}")]
    Upstream(String),
    #[error("the executor did not answer in time: {0}")]
    UpstreamTimeout(String),
    #[error("the provider serving this model is rate limiting: retry after {:.1}s", .0.as_secs_f64())]
    UpstreamRateLimited(Duration),
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::MissingKey | Self::InvalidKey => StatusCode::UNAUTHORIZED,
            Self::BadRequest { .. } | Self::ExceedsLimit(_) => StatusCode::BAD_REQUEST,
            Self::UnknownModel(_) | Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            Self::RateLimited(_) | Self::QueueFull(_) | Self::UpstreamRateLimited(_) => {
                StatusCode::TOO_MANY_REQUESTS
            }
            Self::NoCapacity(_) | Self::Draining => StatusCode::SERVICE_UNAVAILABLE,
            Self::Upstream(_) => StatusCode::BAD_GATEWAY,
            Self::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::MissingKey => "missing_api_key",
            Self::InvalidKey => "invalid_api_key",
            Self::BadRequest { code, .. } => code,
            Self::UnknownModel(_) => "model_not_found",
            Self::NotFound(_) => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::TooLarge(_) => "request_too_large",
            Self::BodyTimeout(_) => "request_timeout",
            Self::RateLimited(_) => "rate_limit_exceeded",
            Self::ExceedsLimit(_) => "request_exceeds_limit",
            Self::QueueFull(_) => "queue_full",
            Self::NoCapacity(_) => "no_capacity",
            Self::Draining => "shutting_down",
            Self::Upstream(_) => "upstream_failed",
            Self::UpstreamTimeout(_) => "upstream_timeout",
            Self::UpstreamRateLimited(_) => "upstream_rate_limited",
        }
    }

    /// The terminal reason in logs and `finished_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::MissingKey | Self::InvalidKey => "unauthorized",
            Self::BadRequest { .. } | Self::TooLarge(_) | Self::BodyTimeout(_) => "bad_request",
            Self::UnknownModel(_) => "model_not_found",
            Self::NotFound(_) | Self::MethodNotAllowed => "not_found",
            Self::RateLimited(_) | Self::UpstreamRateLimited(_) | Self::ExceedsLimit(_) => {
                "rate_limited"
            }
            Self::QueueFull(_) => "queue_full",
            Self::NoCapacity(_) => "no_capacity",
            Self::Draining => "shutting_down",
            Self::Upstream(_) => "upstream_error",
            Self::UpstreamTimeout(_) => "timeout",
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::RateLimited(r) => Some(r.retry_after),
            Self::QueueFull(d) | Self::NoCapacity(d) | Self::UpstreamRateLimited(d) => Some(*d),
            Self::Draining => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    pub fn body(&self) -> ErrorResponse {
        let message = self.to_string();
        match self {
            Self::MissingKey => ErrorResponse::missing_api_key(),
            Self::InvalidKey => ErrorResponse::invalid_api_key(),
            Self::UnknownModel(m) => ErrorResponse::model_not_found(m),
            Self::RateLimited(r) => ErrorResponse::rate_limit_exceeded(
                match r.kind {
                    LimitKind::Requests => RateLimitKind::Requests,
                    LimitKind::Tokens => RateLimitKind::Tokens,
                },
                message,
            ),
            Self::ExceedsLimit(_) => ErrorResponse::invalid_request(message)
                .with_code(self.code())
                .with_param("max_tokens".to_owned()),
            Self::BadRequest { param, .. } => {
                let e = ErrorResponse::invalid_request(message).with_code(self.code());
                match param {
                    Some(p) => e.with_param(p.clone()),
                    None => e,
                }
            }
            Self::Upstream(_) | Self::UpstreamTimeout(_) | Self::NoCapacity(_) | Self::Draining => {
                ErrorResponse::server_error(message).with_code(self.code())
            }
            _ => ErrorResponse::invalid_request(message).with_code(self.code()),
        }
    }

    pub fn response(&self) -> Response<Body> {
        let bytes = serde_json::to_vec(&self.body()).expect("error bodies serialize");
        let mut r = body::with_type(self.status(), "application/json", bytes);
        if let Some(after) = self.retry_after() {
            let secs = after.as_secs_f64().ceil().max(1.0) as u64;
            r.headers_mut()
                .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        }
        r
    }
}
