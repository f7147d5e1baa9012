//! Every metric the gateway exports, prefix `llmctl_gateway_`, in one registry.

use std::collections::HashMap;
use std::sync::RwLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub pool: String,
    pub tenant: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabel {
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub pool: String,
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub pool: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TokenLabels {
    pub pool: String,
    pub tenant: String,
    /// `prompt` or `completion`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub tenant: String,
    pub kind: String,
}

fn histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        60.0, 120.0,
    ])
}

/// Metric handles of one pool, taken once so the request path neither allocates label
/// strings nor hashes them.
#[derive(Clone, Debug)]
pub struct PoolHandles {
    pub queue_wait: Histogram,
    pub ttfb: Histogram,
    pub e2e: Histogram,
}

type RequestCounters = HashMap<String, HashMap<String, HashMap<u16, Counter>>>;

pub struct Metrics {
    registry: Registry,
    /// pool → tenant → status → counter, in front of the `requests` family.
    request_cache: RwLock<RequestCounters>,
    requests: Family<RequestLabels, Counter>,
    queue_depth: Family<PoolLabel, Gauge>,
    queue_wait: Family<PoolLabel, Histogram>,
    queue_left: Family<ReasonLabels, Counter>,
    ttfb: Family<PoolLabel, Histogram>,
    e2e: Family<PoolLabel, Histogram>,
    rate_limited: Family<LimitLabels, Counter>,
    retries: Family<PoolLabel, Counter>,
    ejections: Family<EndpointLabels, Counter>,
    inflight: Family<EndpointLabels, Gauge>,
    upstream_errors: Family<ReasonLabels, Counter>,
    client_stalled: Family<PoolLabel, Counter>,
    tokens: Family<TokenLabels, Counter>,
    spills: Family<ReasonLabels, Counter>,
    finished: Family<ReasonLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("llmctl_gateway");
        let m = Self {
            registry: Registry::default(),
            request_cache: RwLock::default(),
            requests: Family::default(),
            queue_depth: Family::default(),
            queue_wait: Family::new_with_constructor(histogram),
            queue_left: Family::default(),
            ttfb: Family::new_with_constructor(histogram),
            e2e: Family::new_with_constructor(histogram),
            rate_limited: Family::default(),
            retries: Family::default(),
            ejections: Family::default(),
            inflight: Family::default(),
            upstream_errors: Family::default(),
            client_stalled: Family::default(),
            tokens: Family::default(),
            spills: Family::default(),
            finished: Family::default(),
        };
        registry.register(
            "requests",
            "Requests answered, by pool, tenant and status",
            m.requests.clone(),
        );
        registry.register(
            "queue_depth",
            "Requests waiting in the admission queue",
            m.queue_depth.clone(),
        );
        registry.register(
            "queue_wait_seconds",
            "Time from admission to dispatch",
            m.queue_wait.clone(),
        );
        registry.register(
            "queue_left",
            "Requests that left the queue without dispatch, by reason",
            m.queue_left.clone(),
        );
        registry.register(
            "time_to_first_byte_seconds",
            "Time from arrival to the first response byte from the executor",
            m.ttfb.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from arrival to the end of the response",
            m.e2e.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused by a rate limit, by tenant and kind",
            m.rate_limited.clone(),
        );
        registry.register(
            "retries",
            "Requests retried on another executor",
            m.retries.clone(),
        );
        registry.register(
            "endpoint_ejections",
            "Executors ejected after repeated failures",
            m.ejections.clone(),
        );
        registry.register(
            "endpoint_inflight",
            "Requests outstanding at each executor",
            m.inflight.clone(),
        );
        registry.register(
            "upstream_errors",
            "Executor failures seen by the proxy, by reason",
            m.upstream_errors.clone(),
        );
        registry.register(
            "client_stalled",
            "Requests ended because their client read nothing for the write-stall timeout",
            m.client_stalled.clone(),
        );
        registry.register(
            "tokens",
            "Prompt and completion tokens of answered requests, as their usage reports them, by pool and tenant",
            m.tokens.clone(),
        );
        registry.register(
            "finished",
            "Requests ended, by pool and terminal reason (the model's finish reason, or client_gone, client_stalled, upstream_error, timeout, rate_limited, queue_full, no_capacity, ...)",
            m.finished.clone(),
        );
        registry.register(
            "spills",
            "Requests moved to their pool's fallback, by the pool they left and why",
            m.spills.clone(),
        );
        Self { registry, ..m }
    }

    /// Counts a request's end by its terminal reason.
    pub fn finished(&self, pool: &str, reason: &str) {
        self.finished
            .get_or_create(&ReasonLabels {
                pool: pool.into(),
                reason: reason.into(),
            })
            .inc();
    }

    pub fn spilled(&self, pool: &str, reason: &str) {
        self.spills
            .get_or_create(&ReasonLabels {
                pool: pool.into(),
                reason: reason.into(),
            })
            .inc();
    }

    /// Counts an answered request's tokens by its usage report.
    pub fn tokens(&self, pool: &str, tenant: &str, prompt: u64, completion: u64) {
        for (kind, n) in [("prompt", prompt), ("completion", completion)] {
            self.tokens
                .get_or_create(&TokenLabels {
                    pool: pool.into(),
                    tenant: tenant.into(),
                    kind,
                })
                .inc_by(n);
        }
    }

    /// Adds the HTTP server's connection counters (`llmctl_gateway_http_*`).
    pub fn register_http(&mut self, stats: &llmctl_http_server::Stats) {
        stats.register(&mut self.registry);
    }

    pub fn client_stalled(&self, pool: &str) {
        self.client_stalled
            .get_or_create(&PoolLabel { pool: pool.into() })
            .inc();
    }

    pub fn request(&self, pool: &str, tenant: &str, status: u16) {
        let cached = self
            .request_cache
            .read()
            .expect("metrics cache lock")
            .get(pool)
            .and_then(|t| t.get(tenant)?.get(&status).cloned());
        let counter = cached.unwrap_or_else(|| {
            let c = self
                .requests
                .get_or_create(&RequestLabels {
                    pool: pool.into(),
                    tenant: tenant.into(),
                    status,
                })
                .clone();
            self.request_cache
                .write()
                .expect("metrics cache lock")
                .entry(pool.to_owned())
                .or_default()
                .entry(tenant.to_owned())
                .or_default()
                .insert(status, c.clone());
            c
        });
        counter.inc();
    }

    pub fn pool_handles(&self, pool: &str) -> PoolHandles {
        let label = PoolLabel { pool: pool.into() };
        PoolHandles {
            queue_wait: self.queue_wait.get_or_create(&label).clone(),
            ttfb: self.ttfb.get_or_create(&label).clone(),
            e2e: self.e2e.get_or_create(&label).clone(),
        }
    }

    /// The in-flight gauge of one endpoint (kept by the queue with the endpoint's state).
    pub fn endpoint_gauge(&self, pool: &str, endpoint: &str) -> Gauge {
        self.inflight
            .get_or_create(&EndpointLabels {
                pool: pool.into(),
                endpoint: endpoint.into(),
            })
            .clone()
    }

    /// Drops an executor's in-flight series once it left the endpoint set.
    pub fn remove_endpoint_gauge(&self, pool: &str, endpoint: &str) {
        self.inflight.remove(&EndpointLabels {
            pool: pool.into(),
            endpoint: endpoint.into(),
        });
    }

    pub fn queue_depth(&self, pool: &str, depth: usize) {
        self.queue_depth
            .get_or_create(&PoolLabel { pool: pool.into() })
            .set(depth as i64);
    }

    pub fn queue_left(&self, pool: &str, reason: &str) {
        self.queue_left
            .get_or_create(&ReasonLabels {
                pool: pool.into(),
                reason: reason.into(),
            })
            .inc();
    }

    pub fn rate_limited(&self, tenant: &str, kind: &str) {
        self.rate_limited
            .get_or_create(&LimitLabels {
                tenant: tenant.into(),
                kind: kind.into(),
            })
            .inc();
    }

    pub fn retry(&self, pool: &str) {
        self.retries
            .get_or_create(&PoolLabel { pool: pool.into() })
            .inc();
    }

    pub fn ejected(&self, pool: &str, endpoint: &str) {
        self.ejections
            .get_or_create(&EndpointLabels {
                pool: pool.into(),
                endpoint: endpoint.into(),
            })
            .inc();
    }

    pub fn upstream_error(&self, pool: &str, reason: &str) {
        self.upstream_errors
            .get_or_create(&ReasonLabels {
                pool: pool.into(),
                reason: reason.into(),
            })
            .inc();
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
