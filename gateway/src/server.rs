//! The gateway's HTTP edge: accept (HTTP/1.1 and HTTP/2, TLS by rustls when configured, header
//! size and header read-time limits), then each request in the order of DESIGN.md: request id,
//! authenticate, read and inspect the body, rate limit, queue, dispatch with retries, relay.
//! Also `/healthz`, `/readyz`, `/metrics`, `/v1/models`, reload on SIGHUP or file change, and
//! the SIGTERM drain.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use llmctl_http_server::{BodyError, Refusal, Server};
use llmctl_protocol::demand::{DEFAULT_MAX_TOKENS, DecodeHistory};
use llmctl_protocol::{Model, ModelList};
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};

use crate::auth::{AuthError, Tenants};
use crate::body::{self, Body};
use crate::config::{Config, Priority};
use crate::error::GatewayError;
use crate::external::External;
use crate::inspect::{self, Api};
use crate::limit;
use crate::metrics::{Metrics, PoolHandles};
use crate::proxy::{self, Answer, InflightGuard, Settle, names};
use crate::queue::{self, QueueError, QueueHandle, Ticket, Tokens};
use crate::upstream::{AttemptError, Upstream};

/// A request may lower its priority with this header (never raise it).
pub const PRIORITY_HEADER: http::HeaderName = http::HeaderName::from_static("x-llmctl-priority");

struct PoolRuntime {
    name: Arc<str>,
    /// `name` as the `x-llmctl-pool` header value.
    header: http::HeaderValue,
    models: Vec<String>,
    queue: QueueHandle,
    metrics: PoolHandles,
    /// What its requests generated, for the decode tokens its demand reports expect.
    decode_history: Arc<DecodeHistory>,
    /// Hosted upstreams, by dispatch address (empty for a pool of executors).
    externals: Vec<(String, Arc<External>)>,
    /// Index of the pool requests spill to, and after what share of their queue deadline.
    fallback: Option<usize>,
    spill_after: f64,
}

impl PoolRuntime {
    /// The hosted upstream behind a dispatch address, if it is one.
    fn external(&self, address: &str) -> Option<&Arc<External>> {
        self.externals
            .iter()
            .find(|(a, _)| a == address)
            .map(|(_, e)| e)
    }
}

/// The paths the gateway answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    Healthz,
    Readyz,
    Metrics,
    Models,
    /// `/v1/models/{id}`.
    Model,
    Chat,
    Completions,
    Embeddings,
    Responses,
    Other,
}

impl Route {
    fn of(path: &str) -> Self {
        match path {
            "/healthz" => Self::Healthz,
            "/readyz" => Self::Readyz,
            "/metrics" => Self::Metrics,
            "/v1/models" => Self::Models,
            "/v1/chat/completions" => Self::Chat,
            "/v1/completions" => Self::Completions,
            "/v1/embeddings" => Self::Embeddings,
            "/v1/responses" => Self::Responses,
            p if p.starts_with("/v1/models/") => Self::Model,
            _ => Self::Other,
        }
    }
}

pub struct Gateway {
    config: std::sync::RwLock<Arc<Config>>,
    tenants: Tenants,
    pools: Vec<PoolRuntime>,
    upstream: Upstream,
    /// Client connections: their limits, and the graceful close at the end of a drain.
    http: Server,
    pub metrics: Arc<Metrics>,
    draining: AtomicBool,
    /// Requests from arrival until their response body is fully relayed.
    inflight: Arc<AtomicUsize>,
}

impl Gateway {
    /// Builds the gateway (spawns one queue actor per pool, builds the hosted upstreams'
    /// clients; needs a tokio runtime).
    pub fn new(config: Config) -> Result<Arc<Self>> {
        let refusal = if config.tls.is_some() {
            Refusal::Close
        } else {
            Refusal::Http503
        };
        let http = Server::new(config.connection_limits(), refusal);
        let mut metrics = Metrics::new();
        metrics.register_http(http.stats());
        let metrics = Arc::new(metrics);
        let mut pools = Vec::new();
        for p in &config.pools {
            let externals = p
                .externals
                .iter()
                .map(|spec| Ok((spec.address(), Arc::new(External::new(spec.clone())?))))
                .collect::<Result<Vec<_>, String>>()
                .map_err(|e| anyhow::anyhow!("pool {}: {e}", p.name))?;
            pools.push(PoolRuntime {
                name: Arc::from(p.name.as_str()),
                header: proxy::header_value(&p.name),
                models: p.models.clone(),
                metrics: metrics.pool_handles(&p.name),
                decode_history: Arc::default(),
                externals,
                fallback: p
                    .fallback
                    .as_ref()
                    .and_then(|f| config.pools.iter().position(|q| &q.name == f)),
                spill_after: p.spill_after,
                queue: QueueHandle::spawn(
                    p.name.clone(),
                    p.endpoints.clone(),
                    config.queue.clone(),
                    metrics.clone(),
                ),
            });
        }
        Ok(Arc::new(Self {
            tenants: Tenants::new(&config),
            config: std::sync::RwLock::new(Arc::new(config)),
            pools,
            upstream: Upstream::spawn(),
            http,
            metrics,
            draining: AtomicBool::new(false),
            inflight: Arc::new(AtomicUsize::new(0)),
        }))
    }

    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .expect("config lock is never poisoned")
            .clone()
    }

    /// Re-reads the config file; tenants, keys and limits take effect, in-flight requests keep
    /// what they started with. A bad file is logged and ignored.
    pub fn reload(&self) {
        let Some(path) = self.config().path.clone() else {
            return;
        };
        match Config::load(&path) {
            Ok(new) => {
                self.tenants.reload(&new);
                *self.config.write().expect("config lock is never poisoned") = Arc::new(new);
                tracing::info!(path = %path.display(), "configuration reloaded");
            }
            Err(e) => tracing::error!("configuration reload failed, keeping the old one: {e}"),
        }
    }

    pub fn pool_names(&self) -> Vec<String> {
        self.pools.iter().map(|p| p.name.to_string()).collect()
    }

    /// Whether the pool is served by hosted upstreams (the controller's endpoint sets do not
    /// apply to it).
    pub fn is_external(&self, pool: &str) -> bool {
        self.pools
            .iter()
            .any(|p| &*p.name == pool && !p.externals.is_empty())
    }

    /// Queue of the pool serving `name`, for tests and the controller integration.
    pub fn queue(&self, pool: &str) -> Option<&QueueHandle> {
        self.pools
            .iter()
            .find(|p| &*p.name == pool)
            .map(|p| &p.queue)
    }

    pub async fn handle(self: &Arc<Self>, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        // The client's id when it is usable (its header value is reused as is), else a new one.
        let given = req
            .headers()
            .get(names::REQUEST_ID)
            .and_then(|v| Some((v.to_str().ok()?, v)))
            .filter(|(s, _)| !s.is_empty() && s.len() <= 128)
            .map(|(s, v)| (s.to_owned(), v.clone()));
        let (request_id, id_header) = given.unwrap_or_else(|| {
            let id = new_id();
            let header = proxy::header_value(&id);
            (id, header)
        });
        let correlation = req.headers().get(names::CORRELATION_ID).cloned();
        let route = (req.method().clone(), Route::of(req.uri().path()));
        let mut response = match route {
            (Method::GET, Route::Healthz) => body::with_type(StatusCode::OK, "text/plain", "ok\n"),
            (Method::GET, Route::Readyz) => {
                if self.draining.load(Ordering::SeqCst) {
                    body::with_type(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "draining\n")
                } else {
                    body::with_type(StatusCode::OK, "text/plain", "ready\n")
                }
            }
            (Method::GET, Route::Metrics) => body::with_type(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics.encode(),
            ),
            (Method::GET, Route::Models) => match self.tenants.authenticate(req.headers()) {
                Ok(tenant) => self.models(&tenant),
                Err(e) => self.refuse(auth_error(e), "-", "-", &request_id),
            },
            (Method::GET, Route::Model) => match self.tenants.authenticate(req.headers()) {
                Ok(tenant) => {
                    let id = req.uri().path().trim_start_matches("/v1/models/");
                    self.model(&tenant, id, &request_id)
                }
                Err(e) => self.refuse(auth_error(e), "-", "-", &request_id),
            },
            (
                Method::POST,
                Route::Chat | Route::Completions | Route::Embeddings | Route::Responses,
            ) => {
                let api = match route.1 {
                    Route::Chat => Api::Chat,
                    Route::Completions => Api::Completions,
                    Route::Embeddings => Api::Embeddings,
                    _ => Api::Responses,
                };
                let ids = (request_id.as_str(), &id_header);
                self.complete(req, api, ids, correlation.clone(), started)
                    .await
            }
            (_, Route::Other) => GatewayError::NotFound(req.uri().path().to_owned()).response(),
            _ => GatewayError::MethodNotAllowed.response(),
        };
        let h = response.headers_mut();
        h.insert(names::REQUEST_ID, id_header);
        if let Some(c) = correlation {
            h.insert(names::CORRELATION_ID, c);
        }
        response
    }

    /// One model, if the tenant may use it (404 `model_not_found` otherwise, as for a model
    /// that does not exist).
    fn model(
        &self,
        tenant: &crate::auth::TenantState,
        id: &str,
        request_id: &str,
    ) -> Response<Body> {
        if self.route(tenant, id).is_none() {
            return self.refuse(
                GatewayError::UnknownModel(id.to_owned()),
                "-",
                &tenant.name,
                request_id,
            );
        }
        body::with_type(
            StatusCode::OK,
            "application/json",
            serde_json::to_vec(&Model::new(id.to_owned(), 0, "llmctl")).expect("models serialize"),
        )
    }

    /// The models the tenant may use.
    fn models(&self, tenant: &crate::auth::TenantState) -> Response<Body> {
        let data = self
            .pools
            .iter()
            .flat_map(|p| {
                p.models
                    .iter()
                    .filter(|m| tenant.may_use(m, &p.name))
                    .map(|m| Model::new(m.clone(), 0, "llmctl"))
            })
            .collect();
        body::with_type(
            StatusCode::OK,
            "application/json",
            serde_json::to_vec(&ModelList::new(data)).expect("model lists serialize"),
        )
    }

    async fn complete(
        self: &Arc<Self>,
        req: Request<Incoming>,
        api: Api,
        (request_id, id_header): (&str, &http::HeaderValue),
        correlation: Option<http::HeaderValue>,
        started: Instant,
    ) -> Response<Body> {
        if self.draining.load(Ordering::SeqCst) {
            return GatewayError::Draining.response();
        }
        let inflight = InflightGuard::new(&self.inflight);
        let tenant = match self.tenants.authenticate(req.headers()) {
            Ok(t) => t,
            Err(e) => return self.refuse(auth_error(e), "-", "-", request_id),
        };
        let config = self.config();
        let requested_priority = req
            .headers()
            .get(PRIORITY_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(Priority::parse);
        // Lower only: a larger enum value is a lower class.
        let priority = requested_priority.map_or(tenant.priority, |p| p.max(tenant.priority));
        let (parts, incoming) = req.into_parts();
        let bytes = match read_body(
            incoming,
            &parts.headers,
            config.max_body_bytes,
            config.body_read_timeout,
        )
        .await
        {
            Ok(b) => b,
            Err(e) => return self.refuse(e, "-", &tenant.name, request_id),
        };
        let inspected = match inspect::inspect(api, &bytes) {
            Ok(i) => i,
            Err(e) => return self.refuse(e, "-", &tenant.name, request_id),
        };
        let Some(mut pool) = self.route(&tenant, &inspected.model) else {
            return self.refuse(
                GatewayError::UnknownModel(inspected.model.clone()),
                "-",
                &tenant.name,
                request_id,
            );
        };
        let snapshot = match tenant.limits.admit(inspected.charge) {
            Ok(s) => s,
            Err(refusal) => {
                self.metrics
                    .rate_limited(&tenant.name, refusal.kind.as_str());
                // The refusal says where the limits stand, as an answer would.
                let state = refusal.snapshot.clone();
                let e = if refusal.never {
                    GatewayError::ExceedsLimit(inspected.charge)
                } else {
                    GatewayError::RateLimited(refusal)
                };
                let mut refused = self.refuse(e, &pool.name, &tenant.name, request_id);
                limit::write_headers(refused.headers_mut(), &state);
                return refused;
            }
        };
        let refund = |tenant: &crate::auth::TenantState| tenant.limits.true_up(inspected.charge, 0);

        let mut forward_headers = forward_headers(&parts.headers, id_header);
        let tenant_name: Arc<str> = tenant.name.clone();
        let deadline = queue::deadline(&config.queue);
        let mut avoid: Vec<String> = Vec::new();
        let mut attempt = 0;
        // The pause the last provider 429 asked for, while the request waits for another turn.
        let mut throttled: Option<Duration> = None;
        let queued_at = Instant::now();
        // A request waits this long in a pool with a fallback before it spills (once).
        let spill_at = {
            let now = tokio::time::Instant::now();
            now + deadline
                .saturating_duration_since(now)
                .mul_f64(pool.spill_after)
        };
        // The pool it spilled from, and why.
        let mut spilled: Option<(Arc<str>, &'static str)> = None;
        loop {
            let spill_to = pool.fallback.filter(|_| spilled.is_none());
            // Moves the request to the fallback pool, when there is one it has not used yet.
            macro_rules! spill {
                ($reason:expr) => {
                    if let Some(next) = spill_to {
                        let reason: &'static str = $reason;
                        let next = &self.pools[next];
                        tracing::info!(%request_id, from = %pool.name, to = %next.name, reason, "spilling to the fallback pool");
                        self.metrics.spilled(&pool.name, reason);
                        spilled = Some((pool.name.clone(), reason));
                        pool = next;
                        avoid.clear();
                        attempt = 0;
                        throttled = None;
                        continue;
                    }
                };
            }
            let ticket = Ticket {
                tenant: tenant_name.clone(),
                priority,
                affinity: if config.queue.prefix_affinity {
                    inspected.affinity
                } else {
                    None
                },
                avoid: avoid.clone(),
                deadline: if spill_to.is_some() {
                    spill_at
                } else {
                    deadline
                },
                retry: attempt > 0 || throttled.is_some() || spilled.is_some(),
                bytes: inspected.upstream_body.len(),
                tokens: Tokens {
                    prompt: inspected.prompt_tokens.into(),
                    decode: pool
                        .decode_history
                        .expect(inspected.max_tokens, DEFAULT_MAX_TOKENS, inspected.choices)
                        .into(),
                },
            };
            let grant = match pool.queue.acquire(ticket).await {
                Ok(g) => g,
                Err(e) => {
                    match e {
                        QueueError::Expired => spill!("no_capacity"),
                        QueueError::Full => spill!("queue_full"),
                        QueueError::Closed => {}
                    }
                    refund(&tenant);
                    let err = queue_refusal(e, throttled, &config.queue);
                    return self.refuse(err, &pool.name, &tenant.name, request_id);
                }
            };
            let queue_ms = queued_at.elapsed().as_millis();
            if attempt == 0 && throttled.is_none() {
                pool.metrics
                    .queue_wait
                    .observe(queued_at.elapsed().as_secs_f64());
            }
            let dispatch_id = new_id();
            let dispatch_header = proxy::header_value(&dispatch_id);
            forward_headers.insert(names::DISPATCH_ID, dispatch_header.clone());
            let mut grant = grant;
            tracing::debug!(%request_id, %dispatch_id, pool = %pool.name, endpoint = %grant.endpoint.name, attempt, "dispatching");
            let sent = self
                .send(
                    pool,
                    &grant.endpoint.address,
                    api,
                    &inspected,
                    &forward_headers,
                    config.upstream,
                )
                .await;
            // What every answer carries, whatever its outcome.
            let evidence = |h: &mut HeaderMap| {
                h.insert(names::DISPATCH_ID, dispatch_header.clone());
                h.insert(names::POOL, pool.header.clone());
                h.insert(names::EXECUTOR, proxy::header_value(&grant.endpoint.name));
                h.insert(names::QUEUE_MS, http::HeaderValue::from(queue_ms as u64));
                if let Some(c) = &correlation {
                    h.insert(names::CORRELATION_ID, c.clone());
                }
                if let Some((from, reason)) = &spilled {
                    h.insert(names::SPILLED_FROM, proxy::header_value(from));
                    h.insert(names::SPILL_REASON, http::HeaderValue::from_static(reason));
                }
            };
            match sent {
                Ok(upstream) => {
                    pool.metrics.ttfb.observe(started.elapsed().as_secs_f64());
                    let settle = Settle {
                        metrics: self.metrics.clone(),
                        e2e: pool.metrics.e2e.clone(),
                        pool: pool.name.clone(),
                        tenant: tenant.clone(),
                        charged: inspected.charge,
                        started,
                        permit: grant.permit,
                        client_wants_usage: inspected.client_wants_usage,
                        stream_ends_with_done: api.stream_ends_with_done(),
                        request_id: request_id.to_owned(),
                        dispatch_id: dispatch_id.clone(),
                        executor: grant.endpoint.name.clone(),
                        upstream_limits: pool.external(&grant.endpoint.address).cloned(),
                        history: pool.decode_history.clone(),
                        choices: inspected.choices,
                        _inflight: inflight,
                    };
                    let mut response =
                        proxy::relay(upstream, settle, config.write_stall_timeout).await;
                    let h = response.headers_mut();
                    h.reserve(12);
                    limit::write_headers(h, &snapshot);
                    evidence(h);
                    return response;
                }
                Err(AttemptError::Throttled { retry_after, .. }) => {
                    // Not a failure of the upstream: it is cooled down for what it asked, and
                    // the request goes to another upstream or waits for this one.
                    self.metrics.upstream_error(&pool.name, "throttled");
                    tracing::info!(%request_id, %dispatch_id, endpoint = %grant.endpoint.name, ?retry_after, "upstream asked for a pause (its 429, or its configured limit): trying elsewhere or later");
                    grant.permit.throttle(retry_after);
                    if !avoid.contains(&grant.endpoint.address) {
                        avoid.push(grant.endpoint.address.clone());
                    }
                    throttled = Some(retry_after);
                }
                Err(AttemptError::Refused(e)) => {
                    // The request cannot be sent to this pool's provider: the client's error.
                    refund(&tenant);
                    return self.refuse(*e, &pool.name, &tenant.name, request_id);
                }
                Err(failure) => {
                    grant.permit.fail();
                    let reason = match &failure {
                        AttemptError::Connect(_) => "connect",
                        AttemptError::Timeout(_) => "timeout",
                        _ => "status_5xx",
                    };
                    self.metrics.upstream_error(&pool.name, reason);
                    tracing::warn!(%request_id, %dispatch_id, endpoint = %grant.endpoint.name, attempt, ?failure, "executor attempt failed");
                    avoid.push(grant.endpoint.address.clone());
                    attempt += 1;
                    if attempt > config.queue.max_retries {
                        spill!("upstream_failed");
                        refund(&tenant);
                        let mut response = match failure {
                            // Nothing reached the client yet: pass the executor's own 5xx on.
                            AttemptError::Status(r)
                            | AttemptError::Throttled { response: r, .. } => {
                                let resp = passed_on(*r).await;
                                let status = resp.status().as_u16();
                                self.metrics.request(&pool.name, &tenant.name, status);
                                let reason = proxy::End::Complete(None).reason(status);
                                self.metrics.finished(&pool.name, reason);
                                tracing::info!(%request_id, %dispatch_id, pool = %pool.name, executor = %grant.endpoint.name, tenant = %tenant.name, status, reason, "request finished: the upstream's error passed on after the retries");
                                resp
                            }
                            AttemptError::Connect(e) => self.refuse(
                                GatewayError::Upstream(e),
                                &pool.name,
                                &tenant.name,
                                request_id,
                            ),
                            AttemptError::Timeout(e) => self.refuse(
                                GatewayError::UpstreamTimeout(e),
                                &pool.name,
                                &tenant.name,
                                request_id,
                            ),
                            AttemptError::Refused(e) => {
                                self.refuse(*e, &pool.name, &tenant.name, request_id)
                            }
                        };
                        evidence(response.headers_mut());
                        return response;
                    }
                    self.metrics.retry(&pool.name);
                }
            }
        }
    }

    /// The pool serving `model` for this tenant; a model it may not use is as one that does not
    /// exist.
    fn route(&self, tenant: &crate::auth::TenantState, model: &str) -> Option<&PoolRuntime> {
        self.pools
            .iter()
            .find(|p| p.models.iter().any(|m| m == model))
            .filter(|p| tenant.may_use(model, &p.name))
    }

    /// One attempt: to the pool's hosted upstream at `address`, or to the executor there.
    async fn send(
        &self,
        pool: &PoolRuntime,
        address: &str,
        api: Api,
        inspected: &inspect::Inspected,
        headers: &HeaderMap,
        timeouts: crate::config::UpstreamTimeouts,
    ) -> Result<Response<Answer>, AttemptError> {
        let body = &inspected.upstream_body;
        match pool.external(address) {
            Some(external) => external
                .send(
                    api,
                    &inspected.model,
                    inspected.charge,
                    headers,
                    body,
                    timeouts,
                )
                .await
                .map(|r| r.map(Answer::External)),
            None => {
                let path = format!("/v1/{}", api.path());
                self.upstream
                    .send(address, &path, headers, body, timeouts)
                    .await
                    .map(|r| r.map(Answer::Executor))
            }
        }
    }

    /// Answers a request the gateway will not serve: counted, and logged with its ids and
    /// reason.
    fn refuse(
        &self,
        e: GatewayError,
        pool: &str,
        tenant: &str,
        request_id: &str,
    ) -> Response<Body> {
        let status = e.status().as_u16();
        self.metrics.request(pool, tenant, status);
        self.metrics.finished(pool, e.reason());
        tracing::info!(%request_id, %tenant, %pool, status, reason = e.reason(), code = e.code(), "request refused: {e}");
        e.response()
    }

    /// Stops taking requests; returns once in-flight work is done or `grace` passed.
    pub async fn drain(&self, grace: Duration) -> bool {
        self.draining.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + grace;
        while self.inflight.load(Ordering::SeqCst) > 0 {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }
}

/// Why a request that left its queue without an endpoint is refused.
fn queue_refusal(
    e: QueueError,
    throttled: Option<Duration>,
    queue_config: &crate::config::QueueConfig,
) -> GatewayError {
    match (e, throttled) {
        // Every upstream that could serve it asked for a pause past the deadline: the
        // provider's limit, with its retry-after.
        (QueueError::Expired, Some(wait)) => GatewayError::UpstreamRateLimited(wait),
        (QueueError::Expired, None) => GatewayError::NoCapacity(queue::retry_after(queue_config)),
        (QueueError::Full, _) => GatewayError::QueueFull(queue::retry_after(queue_config)),
        (QueueError::Closed, _) => GatewayError::Draining,
    }
}

/// The headers an upstream gets: the client's content type, accept and correlation id, and the
/// request id (never its credentials or hop-by-hop headers).
fn forward_headers(client: &HeaderMap, request_id: &http::HeaderValue) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in [
        http::header::CONTENT_TYPE,
        names::CORRELATION_ID,
        http::header::ACCEPT,
    ] {
        if let Some(v) = client.get(&name) {
            out.insert(name, v.clone());
        }
    }
    out.insert(names::REQUEST_ID, request_id.clone());
    out
}

/// An upstream's error answer, read whole and passed on as it was (framed anew).
async fn passed_on(r: Response<crate::upstream::ErrorBody>) -> Response<Body> {
    let (parts, body) = r.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let mut resp = Response::new(body::full(bytes));
    *resp.status_mut() = parts.status;
    *resp.headers_mut() = parts.headers;
    resp.headers_mut().remove(http::header::CONTENT_LENGTH);
    resp
}

fn auth_error(e: AuthError) -> GatewayError {
    match e {
        AuthError::Missing => GatewayError::MissingKey,
        AuthError::Invalid => GatewayError::InvalidKey,
    }
}

async fn read_body(
    body: Incoming,
    headers: &HeaderMap,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, GatewayError> {
    llmctl_http_server::read_body(headers, body, limit, timeout)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge => GatewayError::TooLarge(limit),
            BodyError::TimedOut => GatewayError::BodyTimeout(timeout),
            BodyError::Broken(e) => GatewayError::BadRequest {
                message: format!("reading the body: {e}"),
                param: None,
                code: "bad_body",
            },
        })
}

/// A 128-bit id as 32 hex digits: a per-process random seed and a counter, mixed (SplitMix64),
/// so ids are unique within the process and unpredictable across processes.
fn new_id() -> String {
    use std::sync::OnceLock;
    static SEED: OnceLock<u64> = OnceLock::new();
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seed = *SEED.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.write_u32(std::process::id());
        h.finish()
    });
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mix = |mut z: u64| {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let a = mix(seed.wrapping_add(n.wrapping_mul(0x9e37_79b9_7f4a_7c15)));
    let b = mix(a ^ seed.rotate_left(32));
    let mut out = String::with_capacity(32);
    for word in [a, b] {
        for shift in (0..16).rev() {
            out.push(char::from(
                b"0123456789abcdef"[((word >> (shift * 4)) & 0xf) as usize],
            ));
        }
    }
    out
}

fn tls_acceptor(config: &Config) -> Result<Option<tokio_rustls::TlsAcceptor>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let Some(tls) = &config.tls else {
        return Ok(None);
    };
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .with_context(|| format!("tls.cert: reading {}", tls.cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("tls.cert: parsing {}", tls.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .with_context(|| format!("tls.key: reading {}", tls.key.display()))?;
    let mut server = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .context("tls: the certificate and key do not match")?;
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(server))))
}

/// A bound gateway socket, before it serves.
pub struct Listening {
    listener: TcpListener,
    pub addr: SocketAddr,
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Listening {
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }
}

/// Binds the configured address and loads the TLS certificate, if any.
pub async fn listen(config: &Config) -> Result<Listening> {
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    let addr: SocketAddr = listener.local_addr()?;
    let tls = tls_acceptor(config)?;
    Ok(Listening {
        listener,
        addr,
        tls,
    })
}

/// Binds, prints `{"event":"listening","addr":...}` on stdout, and serves until drained.
pub async fn serve(config: Config) -> Result<()> {
    let listening = listen(&config).await?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "{}",
            serde_json::json!({"event": "listening", "addr": listening.addr.to_string(), "tls": listening.tls()})
        )?;
        out.flush()?;
    }
    run(listening, config).await
}

/// Serves on a bound socket (following the pool controller when one is configured) until
/// SIGTERM or SIGINT, then drains and returns.
pub async fn run(listening: Listening, config: Config) -> Result<()> {
    let Listening {
        listener,
        addr,
        tls,
    } = listening;
    tracing::info!(%addr, tls = tls.is_some(), open = config.open, pools = config.pools.len(), controller = ?config.controller.as_ref().map(|c| &c.address), "gateway listening");
    let link = config.controller.clone();
    let gateway = Gateway::new(config)?;
    if let Some(link) = link {
        crate::controller::follow(gateway.clone(), link);
    }
    let drained = Arc::new(tokio::sync::Notify::new());
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let mut watch = tokio::time::interval(Duration::from_secs(2));
    let mut last_modified = modified(&gateway.config());
    loop {
        tokio::select! {
            (stream, slot) = gateway.http.accept(&listener) => {
                let _ = stream.set_nodelay(true);
                let gateway = gateway.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let handler = {
                        let gateway = gateway.clone();
                        move |req| {
                            let gateway = gateway.clone();
                            async move { gateway.handle(req).await }
                        }
                    };
                    let Some(acceptor) = tls else {
                        return gateway.http.serve(stream, slot, handler).await;
                    };
                    let handshake = gateway.http.limits().header_read;
                    match tokio::time::timeout(handshake, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => gateway.http.serve(tls_stream, slot, handler).await,
                        Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                });
            }
            _ = hup.recv() => gateway.reload(),
            _ = watch.tick() => {
                let now = modified(&gateway.config());
                if now != last_modified {
                    last_modified = now;
                    gateway.reload();
                }
            }
            _ = term.recv() => begin_drain(&gateway, &drained),
            _ = int.recv() => begin_drain(&gateway, &drained),
            () = drained.notified() => return Ok(()),
        }
    }
}

/// First signal: keep accepting (so clients get a clear 503, and `/readyz` says draining), let
/// in-flight requests finish, then `drained` is notified. Second signal: exit at once.
fn begin_drain(gateway: &Arc<Gateway>, drained: &Arc<tokio::sync::Notify>) {
    if gateway.draining.swap(true, Ordering::SeqCst) {
        tracing::warn!("second signal: exiting now");
        std::process::exit(1);
    }
    let grace = gateway.config().drain_grace;
    tracing::info!(grace_secs = grace.as_secs(), "draining");
    let gateway = gateway.clone();
    let done = drained.clone();
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + grace;
        let drained = gateway.drain(grace).await;
        // Every response sent in full before the process exits.
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let closed = gateway.http.shutdown(left).await;
        tracing::info!(drained, closed, "gateway drained");
        done.notify_one();
    });
}

fn modified(config: &Config) -> Option<std::time::SystemTime> {
    config
        .path
        .as_ref()
        .and_then(|p| std::fs::metadata(p).ok()?.modified().ok())
}
