//! Pools served by hosted providers instead of our executors: any OpenAI-compatible API over
//! HTTPS (a provider, Azure OpenAI, a vLLM/SGLang/TGI server elsewhere). Each upstream of such a
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
use http_body::{Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::config::UpstreamTimeouts;
use crate::inspect::Api;
use crate::upstream::AttemptError;

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
    /// The API's base URL, requests go to `{url}/chat/completions` and `{url}/completions`
    /// (OpenAI SDKs' `base_url`, e.g. `https://host/v1`).
    pub url: Uri,
    pub key: KeySource,
    /// Extra PEM roots trusted for this upstream besides the system's.
    pub ca_file: Option<PathBuf>,
    pub max_concurrency: usize,
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
    /// The key file's modification time and its key, as last read.
    file_key: Mutex<Option<(SystemTime, HeaderValue)>>,
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
            spec,
            client,
            file_key: Mutex::new(None),
        })
    }

    /// The `Authorization` value for this upstream, read now.
    fn authorization(&self) -> Result<Option<HeaderValue>, String> {
        let name = &self.spec.name;
        let bearer = |key: &str| {
            let mut v = HeaderValue::from_str(&format!("Bearer {}", key.trim()))
                .map_err(|_| format!("upstream {name}: the key is not a valid header value"))?;
            v.set_sensitive(true);
            Ok::<_, String>(v)
        };
        match &self.spec.key {
            KeySource::None => Ok(None),
            KeySource::Env(var) => {
                let key = std::env::var(var).map_err(|_| {
                    format!("upstream {name}: environment variable {var} is not set")
                })?;
                bearer(&key).map(Some)
            }
            KeySource::File(path) => {
                let modified = std::fs::metadata(path)
                    .and_then(|m| m.modified())
                    .map_err(|e| format!("upstream {name}: key file {}: {e}", path.display()))?;
                let mut cached = self.file_key.lock().unwrap_or_else(|p| p.into_inner());
                if let Some((at, value)) = cached.as_ref()
                    && *at == modified
                {
                    return Ok(Some(value.clone()));
                }
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("upstream {name}: key file {}: {e}", path.display()))?;
                let key = text.lines().next().unwrap_or("").trim();
                if key.is_empty() {
                    return Err(format!(
                        "upstream {name}: key file {} is empty",
                        path.display()
                    ));
                }
                let value = bearer(key)?;
                *cached = Some((modified, value.clone()));
                Ok(Some(value))
            }
        }
    }

    /// The URL of `api` on this upstream.
    fn uri(&self, api: Api) -> Result<Uri, String> {
        let base = self.spec.url.to_string();
        let path = match api {
            Api::Chat => "chat/completions",
            Api::Completions => "completions",
        };
        let sep = if base.ends_with('/') { "" } else { "/" };
        format!("{base}{sep}{path}")
            .parse()
            .map_err(|e| format!("upstream {}: {e}", self.spec.name))
    }

    /// The body with the model renamed to the provider's, when a mapping applies.
    fn body_for(&self, model: &str, body: &Bytes) -> Result<Bytes, String> {
        let Some(theirs) = self.spec.models.get(model) else {
            return Ok(body.clone());
        };
        let mut value: serde_json::Value = serde_json::from_slice(body)
            .map_err(|e| format!("re-reading the request body: {e}"))?;
        if let Some(obj) = value.as_object_mut() {
            obj.insert("model".into(), serde_json::Value::String(theirs.clone()));
        }
        serde_json::to_vec(&value)
            .map(Bytes::from)
            .map_err(|e| format!("writing the request body: {e}"))
    }

    /// Sends one request. A 5xx is [`AttemptError::Status`] and a 429
    /// [`AttemptError::Throttled`], so the caller can go elsewhere; the response head must
    /// come within `timeouts.response`, and each piece of the body within `timeouts.idle`.
    pub async fn send(
        &self,
        api: Api,
        model: &str,
        headers: &HeaderMap,
        body: &Bytes,
        timeouts: UpstreamTimeouts,
    ) -> Result<Response<ExternalBody>, AttemptError> {
        let uri = self.uri(api).map_err(AttemptError::Connect)?;
        let body = self.body_for(model, body).map_err(AttemptError::Connect)?;
        let mut request = Request::builder()
            .method(Method::POST)
            .uri(uri)
            .body(Full::new(body))
            .map_err(|e| AttemptError::Connect(format!("upstream {}: {e}", self.spec.name)))?;
        let h = request.headers_mut();
        h.extend(headers.iter().map(|(k, v)| (k.clone(), v.clone())));
        if let Some(auth) = self.authorization().map_err(AttemptError::Connect)? {
            h.insert(header::AUTHORIZATION, auth);
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
        let response = response.map(|incoming| ExternalBody {
            incoming,
            idle: timeouts.idle,
            silent: None,
        });
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

/// A provider's response body: hyper's, with the gap between two pieces bounded.
pub struct ExternalBody {
    incoming: hyper::body::Incoming,
    idle: Duration,
    silent: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl http_body::Body for ExternalBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.incoming).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.silent = None;
                Poll::Ready(frame.map(|f| f.map_err(io::Error::other)))
            }
            Poll::Pending => {
                let limit = this.idle;
                let timer = this
                    .silent
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                Poll::Ready(Some(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the upstream sent nothing for {limit:?}"),
                ))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.incoming.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.incoming.size_hint()
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
            url: "https://example.invalid/v1".parse().unwrap(),
            key: KeySource::Env("SOME_KEY_VAR".into()),
            ca_file: None,
            max_concurrency: 4,
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
        let auth = ext.authorization().unwrap().unwrap();
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
            url: "https://example.invalid/v1".parse().unwrap(),
            key: KeySource::File(file.clone()),
            ca_file: None,
            max_concurrency: 4,
            models: BTreeMap::new(),
        })
        .unwrap();
        assert_eq!(ext.authorization().unwrap().unwrap(), "Bearer first");
        // Rewritten with a new modification time (a Secret update swaps the file).
        std::fs::write(&file, "second").unwrap();
        let later = SystemTime::now() + Duration::from_secs(5);
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(later)
            .unwrap();
        assert_eq!(ext.authorization().unwrap().unwrap(), "Bearer second");
    }
}
