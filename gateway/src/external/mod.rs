//! Pools served by hosted providers instead of our executors: any OpenAI-compatible API over
//! HTTPS (a provider, Azure OpenAI, a vLLM/SGLang/TGI server elsewhere), or Anthropic's
//! Messages API behind the chat API ([`anthropic`] translates). Each upstream of such a
//! pool is one dispatch endpoint (its concurrency cap, least outstanding, ejection) and has its
//! own client: rustls with the system roots (plus an optional CA file), HTTP/2 where the
//! provider offers it by ALPN, kept-alive connections.
//!
//! The provider key comes from an environment variable or a file (a mounted Secret). It is read
//! when a request needs it (a file again only when it changed), so a rotated Secret is used
//! without a restart; it is sent only to its own upstream and never logged or shown in `Debug`.
//! Public model names map to the provider's (`models = { "gpt-mini" = "gpt-4o-mini" }`); the
//! body is rewritten only when a mapping applies. A provider's 429 becomes
//! [`AttemptError::Throttled`] with its `retry-after`, so the gateway cools that upstream down
//! and serves the request elsewhere or later instead of failing it.

use std::collections::BTreeMap;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body::{Body as _, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::UpstreamTimeouts;
use crate::error::GatewayError;
use crate::inspect::{Api, scan};
use crate::limit::TenantLimits;
use crate::upstream::{AttemptError, ErrorBody, Silence};

pub mod anthropic;

/// The API a hosted upstream speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProviderApi {
    /// OpenAI's chat and completions APIs (passed through).
    OpenAi,
    /// Anthropic's Messages API (chat translated both ways).
    Anthropic,
}

/// Where the provider key comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum KeySource {
    /// No key (an upstream on a trusted network).
    None,
    /// The environment variable of this name.
    Env(String),
    /// The first line of this file (a mounted Secret; re-read when it changes).
    File(PathBuf),
}

impl std::fmt::Debug for KeySource {
    /// Names where the key is, never the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::Env(v) => write!(f, "Env({v})"),
            Self::File(p) => write!(f, "File({})", p.display()),
        }
    }
}

/// One hosted upstream of a pool, as configured.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalSpec {
    /// Shown in `x-llmctl-executor` and metrics.
    pub name: String,
    pub api: ProviderApi,
    /// The API's base URL, requests go to `{url}/chat/completions` and `{url}/completions`
    /// (OpenAI SDKs' `base_url`, e.g. `https://host/v1`), or `{url}/messages` for Anthropic.
    pub url: Uri,
    /// `max_tokens` sent to an API that requires one when the client named none.
    pub default_max_tokens: u32,
    pub key: KeySource,
    /// Extra PEM roots trusted for this upstream besides the system's.
    pub ca_file: Option<PathBuf>,
    pub max_concurrency: usize,
    /// The provider's limits for our key: requests and tokens per minute.
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    /// Public model name → the provider's.
    pub models: BTreeMap<String, String>,
}

impl ExternalSpec {
    /// The dispatch key of this upstream (never a `host:port`, so it cannot collide with an
    /// executor's).
    pub fn address(&self) -> String {
        format!("external:{}", self.name)
    }
}

type HttpsClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A hosted upstream with its client and key.
pub struct External {
    pub spec: ExternalSpec,
    client: HttpsClient,
    /// The provider's limits, kept on our side so it is not sent what it would refuse.
    limits: TenantLimits,
    /// The key file's modification time and its key, as last read.
    file_key: Mutex<Option<(SystemTime, String)>>,
}

impl std::fmt::Debug for External {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("External")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

/// Longest `retry-after` honoured; a provider asking for more is cooled down this long.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);
/// Cool-down after a 429 without a usable `retry-after`.
const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

impl External {
    /// Builds the client (reads the system roots and the CA file). Needs a tokio runtime to
    /// send.
    pub fn new(spec: ExternalSpec) -> Result<Self, String> {
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            // A system certificate rustls cannot use is skipped, as browsers do.
            let _ = roots.add(cert);
        }
        if let Some(path) = &spec.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| format!("upstream {}: ca_file {}: {e}", spec.name, path.display()))?;
            let mut added = 0;
            for cert in rustls_pki_types::pem::PemObject::pem_slice_iter(&pem) {
                let cert: rustls_pki_types::CertificateDer<'static> = cert.map_err(|e| {
                    format!("upstream {}: ca_file {}: {e}", spec.name, path.display())
                })?;
                roots
                    .add(cert)
                    .map_err(|e| format!("upstream {}: ca_file: {e}", spec.name))?;
                added += 1;
            }
            if added == 0 {
                return Err(format!(
                    "upstream {}: ca_file {} holds no PEM certificate",
                    spec.name,
                    path.display()
                ));
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("upstream {}: TLS: {e}", spec.name))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(60))
            .build(connector);
        Ok(Self {
            limits: TenantLimits::new(spec.requests_per_minute, spec.tokens_per_minute),
            spec,
            client,
            file_key: Mutex::new(None),
        })
    }

    /// The provider key, read now (a file again only when it changed).
    fn key(&self) -> Result<Option<String>, String> {
        let name = &self.spec.name;
        match &self.spec.key {
            KeySource::None => Ok(None),
            KeySource::Env(var) => std::env::var(var)
                .map(|k| Some(k.trim().to_owned()))
                .map_err(|_| format!("upstream {name}: environment variable {var} is not set")),
            KeySource::File(path) => {
                let modified = std::fs::metadata(path)
                    .and_then(|m| m.modified())
                    .map_err(|e| format!("upstream {name}: key file {}: {e}", path.display()))?;
                let mut cached = self.file_key.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((at, key)) = cached.as_ref()
                    && *at == modified
                {
                    return Ok(Some(key.clone()));
                }
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("upstream {name}: key file {}: {e}", path.display()))?;
                let key = text.lines().next().unwrap_or("").trim().to_owned();
                if key.is_empty() {
                    return Err(format!(
                        "upstream {name}: key file {} is empty",
                        path.display()
                    ));
                }
                *cached = Some((modified, key.clone()));
                Ok(Some(key))
            }
        }
    }

    /// The credential header for this upstream (`Authorization: Bearer`, or Anthropic's
    /// `x-api-key`), marked sensitive.
    fn credential(&self) -> Result<Option<(http::HeaderName, HeaderValue)>, String> {
        let Some(key) = self.key()? else {
            return Ok(None);
        };
        let (name, value) = match self.spec.api {
            ProviderApi::OpenAi => (header::AUTHORIZATION, format!("Bearer {key}")),
            ProviderApi::Anthropic => (http::HeaderName::from_static("x-api-key"), key),
        };
        let mut value = HeaderValue::from_str(&value).map_err(|_| {
            format!(
                "upstream {}: the key is not a valid header value",
                self.spec.name
            )
        })?;
        value.set_sensitive(true);
        Ok(Some((name, value)))
    }

    /// The URL of `api` on this upstream.
    fn uri(&self, api: Api) -> Result<Uri, String> {
        let base = self.spec.url.to_string();
        let path = match self.spec.api {
            ProviderApi::Anthropic => "messages",
            ProviderApi::OpenAi => api.path(),
        };
        let sep = if base.ends_with('/') { "" } else { "/" };
        format!("{base}{sep}{path}")
            .parse()
            .map_err(|e| format!("upstream {}: {e}", self.spec.name))
    }

    /// The body this upstream takes: translated to its API, with the model renamed to the
    /// provider's when a mapping applies (spliced in: the rest of the body is not rebuilt). A
    /// request its API cannot express is refused here.
    fn body_for(&self, api: Api, model: &str, body: &Bytes) -> Result<Bytes, GatewayError> {
        let theirs = self.spec.models.get(model).map_or(model, String::as_str);
        match self.spec.api {
            ProviderApi::Anthropic if api == Api::Chat => {
                anthropic::request(body, theirs, self.spec.default_max_tokens)
            }
            ProviderApi::Anthropic => Err(GatewayError::BadRequest {
                message: "this model's provider (Anthropic Messages API) serves chat \
                          completions only; use /v1/chat/completions"
                    .into(),
                param: None,
                code: "unsupported_endpoint",
            }),
            ProviderApi::OpenAi if theirs == model => Ok(body.clone()),
            ProviderApi::OpenAi => {
                let members = scan::members(body)
                    .map_err(|e| GatewayError::Upstream(format!("request body: {e}")))?;
                let value = serde_json::to_vec(theirs).expect("strings serialize");
                Ok(Bytes::from(scan::set_member(
                    body, &members, "model", &value,
                )))
            }
        }
    }

    /// Settles a request charged `charged` tokens against the provider's limits that used
    /// `actual`.
    pub fn true_up(&self, charged: u32, actual: u32) {
        self.limits.true_up(charged, actual);
    }

    /// Sends one request weighing `charge` tokens. Past the provider's configured limits it
    /// is not sent: [`AttemptError::Throttled`] for as long as the limit needs, as for the
    /// provider's own 429. A 5xx is [`AttemptError::Status`], so the caller can go
    /// elsewhere; the response head must come within `timeouts.response`, and each piece of
    /// the body within `timeouts.idle`. A failed attempt gives its tokens back.
    pub async fn send(
        &self,
        api: Api,
        model: &str,
        charge: u32,
        headers: &HeaderMap,
        body: &Bytes,
        timeouts: UpstreamTimeouts,
    ) -> Result<Response<ExternalBody>, AttemptError> {
        if let Err(refusal) = self.limits.admit(charge) {
            let wait = refusal.retry_after;
            let refused = GatewayError::UpstreamRateLimited(wait)
                .response()
                .map(|b| ErrorBody::new(b.map_err(|never| match never {})));
            return Err(AttemptError::Throttled {
                retry_after: wait,
                response: Box::new(refused),
            });
        }
        let sent = self.attempt(api, model, headers, body, timeouts).await;
        if sent.is_err() {
            self.limits.true_up(charge, 0);
        }
        sent
    }

    async fn attempt(
        &self,
        api: Api,
        model: &str,
        headers: &HeaderMap,
        body: &Bytes,
        timeouts: UpstreamTimeouts,
    ) -> Result<Response<ExternalBody>, AttemptError> {
        let uri = self.uri(api).map_err(AttemptError::Connect)?;
        let body = self
            .body_for(api, model, body)
            .map_err(|e| AttemptError::Refused(Box::new(e)))?;
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .body(Full::new(body))
            .map_err(|e| AttemptError::Connect(format!("upstream {}: {e}", self.spec.name)))?;
        let h = request.headers_mut();
        h.extend(headers.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Some((name, value)) = self.credential().map_err(AttemptError::Connect)? {
            h.insert(name, value);
        }
        if self.spec.api == ProviderApi::Anthropic {
            h.insert(
                http::HeaderName::from_static("anthropic-version"),
                HeaderValue::from_static(anthropic::VERSION),
            );
        }
        let name = &self.spec.name;
        let response = tokio::time::timeout(timeouts.response, self.client.request(request))
            .await
            .map_err(|_| {
                AttemptError::Timeout(format!(
                    "upstream {name} sent no response head within {:?}",
                    timeouts.response
                ))
            })?
            .map_err(|e| AttemptError::Connect(format!("upstream {name}: {}", error_chain(&e))))?;
        let (mut parts, incoming) = response.into_parts();
        let translate = match self.spec.api {
            ProviderApi::OpenAi => Translate::None,
            ProviderApi::Anthropic => {
                let stream = parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("text/event-stream"));
                parts.headers.remove(header::CONTENT_LENGTH);
                if stream && parts.status.is_success() {
                    Translate::Stream(Box::new(anthropic::StreamTranslator::new(model, true)))
                } else {
                    parts.headers.insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    Translate::Whole {
                        read: Vec::new(),
                        model: model.to_owned(),
                        status: parts.status.as_u16(),
                    }
                }
            }
        };
        let response = Response::from_parts(
            parts,
            ExternalBody {
                incoming,
                silence: Silence::new(timeouts.idle),
                translate,
                ended: false,
            },
        );
        let status = response.status();
        if status == StatusCode::TOO_MANY_REQUESTS {
            let retry_after = retry_after(response.headers());
            return Err(AttemptError::Throttled {
                retry_after,
                response: Box::new(response.map(|b| b.boxed_unsync())),
            });
        }
        if status.is_server_error() {
            return Err(AttemptError::Status(Box::new(
                response.map(|b| b.boxed_unsync()),
            )));
        }
        Ok(response)
    }
}

/// An error with its causes, for logs (hyper's own message says little).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The cool-down a 429 asks for: `retry-after` in seconds (an HTTP date counts as the
/// default), or OpenAI's `x-ratelimit-reset-requests` style durations are not parsed. Capped at
/// [`MAX_RETRY_AFTER`].
pub fn retry_after(headers: &HeaderMap) -> Duration {
    headers
        .get(header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map_or(DEFAULT_RETRY_AFTER, Duration::from_secs_f64)
        .min(MAX_RETRY_AFTER)
}

/// How a provider's answer is turned into an OpenAI one.
enum Translate {
    /// Already OpenAI's.
    None,
    /// A Messages event stream, event by event.
    Stream(Box<anthropic::StreamTranslator>),
    /// A whole Messages answer (or error), read to its end then translated.
    Whole {
        read: Vec<u8>,
        model: String,
        status: u16,
    },
}

/// A provider's response body: hyper's, with the gap between two pieces bounded, translated
/// to OpenAI's API where the provider speaks another.
pub struct ExternalBody {
    incoming: hyper::body::Incoming,
    silence: Silence,
    translate: Translate,
    /// The translated end was given.
    ended: bool,
}

impl ExternalBody {
    /// The next piece of the provider's body, with the silence between pieces bounded.
    fn poll_incoming(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, io::Error>>> {
        loop {
            match Pin::new(&mut self.incoming).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    self.silence.heard();
                    match frame.into_data() {
                        Ok(data) => return Poll::Ready(Some(Ok(data))),
                        Err(_) => continue,
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(io::Error::other(e)))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => {
                    let timed_out = std::task::ready!(self.silence.poll_over(cx, "the upstream"));
                    return Poll::Ready(Some(Err(timed_out)));
                }
            }
        }
    }
}

impl http_body::Body for ExternalBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            let piece = std::task::ready!(this.poll_incoming(cx));
            let out = match (&mut this.translate, piece) {
                (_, Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                (Translate::None, Some(Ok(data))) => data,
                (Translate::None, None) => return Poll::Ready(None),
                (Translate::Stream(t), Some(Ok(data))) => Bytes::from(t.feed(&data)),
                (Translate::Stream(_), None) => return Poll::Ready(None),
                (Translate::Whole { read, .. }, Some(Ok(data))) => {
                    read.extend_from_slice(&data);
                    continue;
                }
                (
                    Translate::Whole {
                        read,
                        model,
                        status,
                    },
                    None,
                ) => {
                    this.ended = true;
                    let translated = if (200..300).contains(status) {
                        anthropic::completion(read, model)
                    } else {
                        Ok(anthropic::error_body(*status, read))
                    };
                    match translated {
                        Ok(bytes) => Bytes::from(bytes),
                        Err(e) => return Poll::Ready(Some(Err(io::Error::other(e)))),
                    }
                }
            };
            if !out.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(out))));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self.translate {
            Translate::None => self.incoming.is_end_stream(),
            _ => self.ended,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self.translate {
            Translate::None => self.incoming.size_hint(),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_caps_them() {
        let mut h = HeaderMap::new();
        assert_eq!(retry_after(&h), DEFAULT_RETRY_AFTER);
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Duration::from_secs(3));
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("0.5"));
        assert_eq!(retry_after(&h), Duration::from_millis(500));
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("86400"));
        assert_eq!(retry_after(&h), MAX_RETRY_AFTER);
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), DEFAULT_RETRY_AFTER);
    }

    #[test]
    fn keys_never_show_in_debug_output() {
        let spec = ExternalSpec {
            name: "p".into(),
            api: ProviderApi::OpenAi,
            default_max_tokens: 4096,
            url: "https://example.invalid/v1".parse().unwrap(),
            key: KeySource::Env("SOME_KEY_VAR".into()),
            ca_file: None,
            max_concurrency: 4,
            requests_per_minute: None,
            tokens_per_minute: None,
            models: BTreeMap::new(),
        };
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "sk-secret-value\n").unwrap();
        let ext = External::new(ExternalSpec {
            key: KeySource::File(file),
            ..spec
        })
        .unwrap();
        let (name, auth) = ext.credential().unwrap().unwrap();
        assert_eq!(name, header::AUTHORIZATION);
        assert_eq!(auth.to_str().unwrap(), "Bearer sk-secret-value");
        assert!(auth.is_sensitive());
        assert!(!format!("{ext:?} {auth:?}").contains("sk-secret"));
    }

    #[test]
    fn a_rotated_key_file_is_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "first").unwrap();
        let ext = External::new(ExternalSpec {
            name: "p".into(),
            api: ProviderApi::OpenAi,
            default_max_tokens: 4096,
            url: "https://example.invalid/v1".parse().unwrap(),
            key: KeySource::File(file.clone()),
            ca_file: None,
            max_concurrency: 4,
            requests_per_minute: None,
            tokens_per_minute: None,
            models: BTreeMap::new(),
        })
        .unwrap();
        assert_eq!(ext.key().unwrap().unwrap(), "first");
        // Rewritten with a new modification time (a Secret update swaps the file).
        std::fs::write(&file, "second").unwrap();
        let later = SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(ext.key().unwrap().unwrap(), "second");
    }
}
