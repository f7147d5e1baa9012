//! The gateway's one TOML file, parsed and validated into [`Config`]: listen address and
//! limits, TLS, tenants with hashed keys and rate limits, pools with their endpoints, and queue
//! settings. Errors name the field, the value and the reason. Tenants, keys and limits can be
//! reloaded at run time; listen address, TLS and pools need a restart.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::external::{ExternalSpec, KeySource, ProviderApi};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: `{field}` = {value}: {reason}")]
    Invalid {
        path: String,
        field: String,
        value: String,
        reason: String,
    },
}

/// Priority classes, highest first. A request may lower its tenant's class, never raise it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    High,
    Normal,
    Low,
}

impl Priority {
    pub const ALL: [Priority; 3] = [Priority::High, Priority::Normal, Priority::Low];

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "high" => Some(Self::High),
            "normal" => Some(Self::Normal),
            "low" => Some(Self::Low),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::High => "high",
            Self::Normal => "normal",
            Self::Low => "low",
        }
    }
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    #[serde(default)]
    open: bool,
    max_body_bytes: Option<usize>,
    max_header_bytes: Option<usize>,
    header_read_timeout_ms: Option<u64>,
    body_read_timeout_ms: Option<u64>,
    idle_timeout_ms: Option<u64>,
    write_stall_timeout_ms: Option<u64>,
    max_connections: Option<usize>,
    upstream_response_timeout_ms: Option<u64>,
    upstream_idle_timeout_ms: Option<u64>,
    drain_grace_secs: Option<u64>,
    tls: Option<RawTls>,
    #[serde(default)]
    tenants: Vec<RawTenant>,
    #[serde(default)]
    pools: Vec<RawPool>,
    #[serde(default)]
    queue: RawQueue,
    controller: Option<RawController>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawController {
    /// The controller's control API, `http://host:port`.
    url: String,
    report_interval_ms: Option<u64>,
    gateway_id: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTenant {
    name: String,
    #[serde(default = "normal")]
    priority: Priority,
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u32>,
    /// SHA-256 of each API key, hex, optionally prefixed `sha256:`.
    #[serde(default)]
    keys: Vec<String>,
    /// Models (or pools, by name) the tenant's keys may use; absent: all.
    models: Option<Vec<String>>,
}

fn normal() -> Priority {
    Priority::Normal
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: String,
    /// Model names this pool serves (the `model` field of requests).
    models: Vec<String>,
    #[serde(default)]
    endpoints: Vec<RawEndpoint>,
    /// Hosted OpenAI-compatible APIs serving the pool instead of executors.
    #[serde(default)]
    upstreams: Vec<RawUpstream>,
    /// The pool a request goes to when this one cannot serve it in time.
    fallback: Option<String>,
    /// Share of a request's queue deadline it waits here before it spills to `fallback`.
    spill_after: Option<f64>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpstream {
    name: String,
    /// `openai` (default) or `anthropic`.
    api: Option<String>,
    /// Base URL of the API, e.g. `https://host/v1`.
    url: String,
    /// `max_tokens` sent to an API that requires one when the client named none.
    default_max_tokens: Option<u32>,
    /// Environment variable holding the provider key.
    key_env: Option<String>,
    /// File holding the provider key (a mounted Secret).
    key_file: Option<PathBuf>,
    /// PEM roots trusted for this upstream besides the system's.
    ca_file: Option<PathBuf>,
    max_concurrency: Option<usize>,
    /// The provider's limits for our key (requests and tokens per minute).
    requests_per_minute: Option<u32>,
    tokens_per_minute: Option<u32>,
    /// Public model name → the provider's model id.
    #[serde(default)]
    models: std::collections::BTreeMap<String, String>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEndpoint {
    /// `host:port` (plain HTTP to the executor).
    address: String,
    name: Option<String>,
    max_concurrency: Option<usize>,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawQueue {
    max_size: Option<usize>,
    max_bytes: Option<usize>,
    tenant_share: Option<f64>,
    deadline_ms: Option<u64>,
    prefix_affinity: Option<bool>,
    max_retries: Option<usize>,
    eject_after_failures: Option<u32>,
    eject_cooldown_ms: Option<u64>,
}

#[derive(Clone, Debug)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug)]
pub struct Tenant {
    pub name: String,
    pub priority: Priority,
    pub requests_per_minute: Option<u32>,
    pub tokens_per_minute: Option<u32>,
    /// SHA-256 digests of the tenant's keys.
    pub key_hashes: Vec<[u8; 32]>,
    /// Models or pool names its keys may use (`None`: every one).
    pub models: Option<Vec<String>>,
}

/// An executor endpoint (the same type the controller's endpoint stream carries).
pub use llmctl_protocol::control::Endpoint;

#[derive(Clone, Debug)]
pub struct Pool {
    pub name: String,
    pub models: Vec<String>,
    /// Executors, or (for a pool of hosted upstreams) one endpoint per upstream.
    pub endpoints: Vec<Endpoint>,
    /// Hosted upstreams; empty for a pool of executors.
    pub externals: Vec<ExternalSpec>,
    /// Where requests spill: a request not dispatched within `spill_after` of its queue
    /// deadline, or whose attempts all failed before a byte reached the client.
    pub fallback: Option<String>,
    pub spill_after: f64,
}

#[derive(Clone, Debug)]
pub struct QueueConfig {
    pub max_size: usize,
    /// Bytes of request bodies waiting at once, at most (bodies of up to 8 MiB make a queue
    /// bounded in entries alone a memory hazard).
    pub max_bytes: usize,
    /// Share of `max_size` one tenant's waiting requests may take.
    pub tenant_share: f64,
    pub deadline: Duration,
    pub prefix_affinity: bool,
    pub max_retries: usize,
    pub eject_after_failures: u32,
    pub eject_cooldown: Duration,
}

/// Where live endpoint sets come from and demand goes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ControllerLink {
    /// `host:port` of the control API.
    pub address: String,
    pub report_interval: Duration,
    /// This gateway's id in demand reports.
    pub gateway_id: String,
}

#[derive(Clone, Debug)]
pub struct Config {
    pub path: Option<PathBuf>,
    pub listen: SocketAddr,
    /// No authentication: every request is the `open` tenant. Only for the local default.
    pub open: bool,
    pub max_body_bytes: usize,
    pub max_header_bytes: usize,
    pub header_read_timeout: Duration,
    /// A request body must arrive whole within this (408 otherwise).
    pub body_read_timeout: Duration,
    /// Client connections with no request in flight are closed after this.
    pub idle_timeout: Duration,
    /// A client that accepts no bytes for this long, with bytes waiting for it, is cut off.
    pub write_stall_timeout: Duration,
    /// Client connections open at once (read at start).
    pub max_connections: usize,
    /// Toward executors: from sending a request to its response head, and between body bytes.
    pub upstream: UpstreamTimeouts,
    pub drain_grace: Duration,
    pub tls: Option<TlsConfig>,
    pub tenants: Vec<Tenant>,
    pub pools: Vec<Pool>,
    pub queue: QueueConfig,
    /// Endpoints from a pool controller (static `endpoints` are then the initial set).
    pub controller: Option<ControllerLink>,
}

/// How long the gateway waits on an executor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UpstreamTimeouts {
    /// From the request sent to the response head (non-streamed responses come after the
    /// whole generation, so this bounds the longest one).
    pub response: Duration,
    /// Between two reads of a response body (a stream's tokens, or a prefill before the first).
    pub idle: Duration,
}

impl Config {
    /// The client-connection limits, as the HTTP server applies them.
    pub fn connection_limits(&self) -> llmctl_http_server::Limits {
        llmctl_http_server::Limits {
            header_read: self.header_read_timeout,
            idle: self.idle_timeout,
            write_stall: self.write_stall_timeout,
            max_connections: self.max_connections,
            max_header_bytes: self.max_header_bytes,
            ..llmctl_http_server::Limits::default()
        }
    }
}

/// SHA-256 of an API key, as stored in the config.
pub fn hash_key(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let mut config = Self::parse(&text, &path.display().to_string())?;
        config.path = Some(path.to_path_buf());
        Ok(config)
    }

    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        let invalid =
            |field: &str, value: &dyn std::fmt::Display, reason: &str| ConfigError::Invalid {
                path: origin.to_owned(),
                field: field.to_owned(),
                value: value.to_string(),
                reason: reason.to_owned(),
            };
        let listen_text = raw.listen.unwrap_or_else(|| "127.0.0.1:8080".to_owned());
        let listen: SocketAddr = listen_text
            .parse()
            .map_err(|_| invalid("listen", &listen_text, "not an address like 127.0.0.1:8080"))?;

        let mut tenants = Vec::new();
        let mut names = HashSet::new();
        let mut all_keys = HashSet::new();
        for (i, t) in raw.tenants.into_iter().enumerate() {
            if t.name.is_empty() || !names.insert(t.name.clone()) {
                return Err(invalid(
                    &format!("tenants[{i}].name"),
                    &t.name,
                    "must be non-empty and unique",
                ));
            }
            for (field, v) in [
                ("requests_per_minute", t.requests_per_minute),
                ("tokens_per_minute", t.tokens_per_minute),
            ] {
                if v == Some(0) {
                    return Err(invalid(
                        &format!("tenants[{i}].{field}"),
                        &0,
                        "must be positive (omit it for no limit)",
                    ));
                }
            }
            let mut key_hashes = Vec::new();
            for (k, key) in t.keys.iter().enumerate() {
                let hexed = key.strip_prefix("sha256:").unwrap_or(key);
                let bytes: [u8; 32] = hex::decode(hexed)
                    .ok()
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| {
                        invalid(
                            &format!("tenants[{i}].keys[{k}]"),
                            &"(hidden)",
                            "must be a SHA-256 digest: 64 hex digits",
                        )
                    })?;
                if !all_keys.insert(bytes) {
                    return Err(invalid(
                        &format!("tenants[{i}].keys[{k}]"),
                        &"(hidden)",
                        "the same key belongs to two tenants",
                    ));
                }
                key_hashes.push(bytes);
            }
            tenants.push(Tenant {
                name: t.name,
                priority: t.priority,
                requests_per_minute: t.requests_per_minute,
                tokens_per_minute: t.tokens_per_minute,
                key_hashes,
                models: t.models,
            });
        }
        if !raw.open && tenants.iter().all(|t| t.key_hashes.is_empty()) {
            return Err(invalid(
                "tenants",
                &"[]",
                "no API keys are configured; add keys or set `open = true` (local use only)",
            ));
        }

        let mut pools = Vec::new();
        let mut models = HashSet::new();
        for (i, p) in raw.pools.into_iter().enumerate() {
            if p.models.is_empty() {
                return Err(invalid(
                    &format!("pools[{i}].models"),
                    &"[]",
                    "a pool serves at least one model",
                ));
            }
            for m in &p.models {
                if !models.insert(m.clone()) {
                    return Err(invalid(
                        &format!("pools[{i}].models"),
                        m,
                        "served by two pools",
                    ));
                }
            }
            let mut endpoints = Vec::new();
            for (e, ep) in p.endpoints.into_iter().enumerate() {
                if ep.address.parse::<SocketAddr>().is_err() && !ep.address.contains(':') {
                    return Err(invalid(
                        &format!("pools[{i}].endpoints[{e}].address"),
                        &ep.address,
                        "expected host:port",
                    ));
                }
                let max_concurrency = ep.max_concurrency.unwrap_or(64);
                if max_concurrency == 0 {
                    return Err(invalid(
                        &format!("pools[{i}].endpoints[{e}].max_concurrency"),
                        &0,
                        "must be positive",
                    ));
                }
                endpoints.push(Endpoint {
                    name: ep.name.unwrap_or_else(|| ep.address.clone()),
                    address: ep.address,
                    max_concurrency,
                    draining: false,
                });
            }
            if !p.upstreams.is_empty() && !endpoints.is_empty() {
                return Err(invalid(
                    &format!("pools[{i}].upstreams"),
                    &p.name,
                    "a pool has executors (`endpoints`) or hosted `upstreams`, not both",
                ));
            }
            let mut externals = Vec::new();
            for (u, up) in p.upstreams.into_iter().enumerate() {
                let field = |f: &str| format!("pools[{i}].upstreams[{u}].{f}");
                if up.name.is_empty() || externals.iter().any(|e: &ExternalSpec| e.name == up.name)
                {
                    return Err(invalid(
                        &field("name"),
                        &up.name,
                        "must be non-empty and unique",
                    ));
                }
                let url: http::Uri = up.url.parse().map_err(|_| {
                    invalid(&field("url"), &up.url, "not a URL like https://host/v1")
                })?;
                if !matches!(url.scheme_str(), Some("https" | "http")) || url.authority().is_none()
                {
                    return Err(invalid(
                        &field("url"),
                        &up.url,
                        "must be an http:// or https:// URL with a host",
                    ));
                }
                let key = match (up.key_env, up.key_file) {
                    (Some(_), Some(_)) => {
                        return Err(invalid(
                            &field("key_env"),
                            &"key_file too",
                            "name one of key_env and key_file",
                        ));
                    }
                    (Some(var), None) => {
                        if std::env::var_os(&var).is_none() {
                            return Err(invalid(
                                &field("key_env"),
                                &var,
                                "this environment variable is not set",
                            ));
                        }
                        KeySource::Env(var)
                    }
                    (None, Some(path)) => {
                        if !path.is_file() {
                            return Err(invalid(
                                &field("key_file"),
                                &path.display(),
                                "no such file",
                            ));
                        }
                        KeySource::File(path)
                    }
                    (None, None) => KeySource::None,
                };
                if let Some(ca) = &up.ca_file
                    && !ca.is_file()
                {
                    return Err(invalid(&field("ca_file"), &ca.display(), "no such file"));
                }
                let max_concurrency = up.max_concurrency.unwrap_or(64);
                if max_concurrency == 0 {
                    return Err(invalid(&field("max_concurrency"), &0, "must be positive"));
                }
                let api = match up.api.as_deref().unwrap_or("openai") {
                    "openai" => ProviderApi::OpenAi,
                    "anthropic" => ProviderApi::Anthropic,
                    other => {
                        return Err(invalid(
                            &field("api"),
                            &other,
                            "expected openai or anthropic",
                        ));
                    }
                };
                if externals
                    .first()
                    .is_some_and(|e: &ExternalSpec| e.api != api)
                {
                    return Err(invalid(
                        &field("api"),
                        &up.api.unwrap_or_default(),
                        "the upstreams of one pool speak one API (a fallback pool can speak another)",
                    ));
                }
                for (f, v) in [
                    ("requests_per_minute", up.requests_per_minute),
                    ("tokens_per_minute", up.tokens_per_minute),
                ] {
                    if v == Some(0) {
                        return Err(invalid(
                            &field(f),
                            &0,
                            "must be positive (omit it for no limit)",
                        ));
                    }
                }
                let default_max_tokens = up.default_max_tokens.unwrap_or(4096);
                if default_max_tokens == 0 {
                    return Err(invalid(
                        &field("default_max_tokens"),
                        &0,
                        "must be positive",
                    ));
                }
                let spec = ExternalSpec {
                    name: up.name,
                    api,
                    default_max_tokens,
                    url,
                    key,
                    ca_file: up.ca_file,
                    max_concurrency,
                    requests_per_minute: up.requests_per_minute,
                    tokens_per_minute: up.tokens_per_minute,
                    models: up.models,
                };
                endpoints.push(Endpoint {
                    name: spec.name.clone(),
                    address: spec.address(),
                    max_concurrency,
                    draining: false,
                });
                externals.push(spec);
            }
            let spill_after = p.spill_after.unwrap_or(0.25);
            if !(spill_after > 0.0 && spill_after <= 1.0) {
                return Err(invalid(
                    &format!("pools[{i}].spill_after"),
                    &spill_after,
                    "a share of the queue deadline: above 0, at most 1",
                ));
            }
            pools.push(Pool {
                name: p.name,
                models: p.models,
                endpoints,
                externals,
                fallback: p.fallback,
                spill_after,
            });
        }
        if pools.is_empty() {
            return Err(invalid("pools", &"[]", "at least one pool is needed"));
        }
        for (i, p) in pools.iter().enumerate() {
            if let Some(f) = &p.fallback
                && (f == &p.name || !pools.iter().any(|q| &q.name == f))
            {
                return Err(invalid(
                    &format!("pools[{i}].fallback"),
                    f,
                    "must name another pool of this file",
                ));
            }
            // A hosted upstream maps the pool's models and those spilled to it.
            for (u, up) in p.externals.iter().enumerate() {
                let served = |m: &String| {
                    p.models.contains(m)
                        || pools
                            .iter()
                            .any(|q| q.fallback.as_ref() == Some(&p.name) && q.models.contains(m))
                };
                if let Some(m) = up.models.keys().find(|m| !served(m)) {
                    return Err(invalid(
                        &format!("pools[{i}].upstreams[{u}].models"),
                        m,
                        "maps a model the pool does not serve (nor any pool spilling to it)",
                    ));
                }
            }
        }

        let q = raw.queue;
        let queue = QueueConfig {
            max_size: q.max_size.unwrap_or(10_000),
            max_bytes: q.max_bytes.unwrap_or(1 << 30),
            tenant_share: q.tenant_share.unwrap_or(0.5),
            deadline: Duration::from_millis(q.deadline_ms.unwrap_or(60_000)),
            prefix_affinity: q.prefix_affinity.unwrap_or(true),
            max_retries: q.max_retries.unwrap_or(2),
            eject_after_failures: q.eject_after_failures.unwrap_or(3),
            eject_cooldown: Duration::from_millis(q.eject_cooldown_ms.unwrap_or(10_000)),
        };
        if queue.max_size == 0 {
            return Err(invalid("queue.max_size", &0, "must be positive"));
        }
        if queue.max_bytes == 0 {
            return Err(invalid("queue.max_bytes", &0, "must be positive"));
        }
        if !(queue.tenant_share > 0.0 && queue.tenant_share <= 1.0) {
            return Err(invalid(
                "queue.tenant_share",
                &queue.tenant_share,
                "a share of max_size: above 0, at most 1",
            ));
        }
        if queue.eject_after_failures == 0 {
            return Err(invalid(
                "queue.eject_after_failures",
                &0,
                "must be positive",
            ));
        }
        let controller = match raw.controller {
            None => None,
            Some(c) => {
                let address = c
                    .url
                    .strip_prefix("http://")
                    .unwrap_or(&c.url)
                    .trim_end_matches('/');
                if address.is_empty() || !address.contains(':') || address.contains('/') {
                    return Err(invalid(
                        "controller.url",
                        &c.url,
                        "expected http://host:port (the controller's control API)",
                    ));
                }
                let report_interval = Duration::from_millis(c.report_interval_ms.unwrap_or(1000));
                if report_interval.is_zero() {
                    return Err(invalid(
                        "controller.report_interval_ms",
                        &0,
                        "must be positive",
                    ));
                }
                Some(ControllerLink {
                    address: address.to_owned(),
                    report_interval,
                    gateway_id: c.gateway_id.unwrap_or_else(|| {
                        let nanos = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.subsec_nanos());
                        format!("gateway-{}-{nanos:08x}", std::process::id())
                    }),
                })
            }
        };
        let tls = raw.tls.map(|t| TlsConfig {
            cert: t.cert,
            key: t.key,
        });
        Ok(Config {
            path: None,
            listen,
            open: raw.open,
            max_body_bytes: raw.max_body_bytes.unwrap_or(8 << 20),
            max_header_bytes: raw.max_header_bytes.unwrap_or(64 << 10),
            header_read_timeout: Duration::from_millis(
                raw.header_read_timeout_ms.unwrap_or(10_000),
            ),
            body_read_timeout: Duration::from_millis(raw.body_read_timeout_ms.unwrap_or(30_000)),
            idle_timeout: Duration::from_millis(raw.idle_timeout_ms.unwrap_or(75_000)),
            write_stall_timeout: Duration::from_millis(
                raw.write_stall_timeout_ms.unwrap_or(30_000),
            ),
            max_connections: raw.max_connections.unwrap_or(10_000),
            upstream: UpstreamTimeouts {
                response: Duration::from_millis(
                    raw.upstream_response_timeout_ms.unwrap_or(300_000),
                ),
                idle: Duration::from_millis(raw.upstream_idle_timeout_ms.unwrap_or(120_000)),
            },
            drain_grace: Duration::from_secs(raw.drain_grace_secs.unwrap_or(30)),
            tls,
            tenants,
            pools,
            queue,
            controller,
        })
    }

    pub fn pool_for_model(&self, model: &str) -> Option<&Pool> {
        self.pools
            .iter()
            .find(|p| p.models.iter().any(|m| m == model))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"; // "test"

    fn base() -> String {
        format!(
            "listen = \"127.0.0.1:0\"\n[[tenants]]\nname = \"a\"\nkeys = [\"sha256:{KEY_HASH}\"]\nrequests_per_minute = 5\n\
             [[pools]]\nname = \"p\"\nmodels = [\"tiny\"]\n[[pools.endpoints]]\naddress = \"127.0.0.1:9\"\n"
        )
    }

    #[test]
    fn parses_and_hashes_keys() {
        let c = Config::parse(&base(), "gw.toml").unwrap();
        assert_eq!(c.tenants[0].key_hashes[0], hash_key("test"));
        assert_eq!(c.pool_for_model("tiny").unwrap().name, "p");
        assert_eq!(c.pools[0].endpoints[0].max_concurrency, 64);
        assert_eq!(c.tenants[0].priority, Priority::Normal);
    }

    #[test]
    fn errors_name_field_value_and_reason() {
        let e = Config::parse(&base().replace("127.0.0.1:0", "nowhere"), "gw.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("gw.toml") && e.contains("`listen`") && e.contains("nowhere"),
            "{e}"
        );
        let e = Config::parse(&base().replace(KEY_HASH, "abc"), "gw.toml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tenants[0].keys[0]") && e.contains("64 hex"),
            "{e}"
        );
        let e = Config::parse(
            &base().replace("requests_per_minute = 5", "requests_per_minute = 0"),
            "gw.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("tenants[0].requests_per_minute"), "{e}");
        let e = Config::parse(&(base() + "bogus = 1\n"), "gw.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = Config::parse(
            &base().replace("keys = [\"sha256:", "keys2 = [\"sha256:"),
            "gw.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("keys2"), "unknown tenant field: {e}");
    }

    #[test]
    fn keyless_config_needs_explicit_open_mode() {
        let text = "[[pools]]\nname = \"p\"\nmodels = [\"m\"]\n";
        let e = Config::parse(text, "gw.toml").unwrap_err().to_string();
        assert!(e.contains("open = true"), "{e}");
        assert!(
            Config::parse(&format!("open = true\n{text}"), "gw.toml")
                .unwrap()
                .open
        );
    }

    #[test]
    fn hosted_upstreams_are_validated_with_the_field_named() {
        let pool = |upstream: &str| {
            format!(
                "open = true\n[[pools]]\nname = \"f\"\nmodels = [\"m\"]\n[[pools.upstreams]]\nname = \"u\"\n{upstream}\n"
            )
        };
        let ok = Config::parse(
            &pool("url = \"https://example.invalid/v1\"\nmodels = { \"m\" = \"theirs\" }"),
            "gw.toml",
        )
        .unwrap();
        let p = &ok.pools[0];
        assert_eq!(p.endpoints[0].address, "external:u");
        assert_eq!(p.externals[0].models["m"], "theirs");
        for (upstream, field, reason) in [
            (
                "url = \"ftp://x/v1\"",
                "upstreams[0].url",
                "http:// or https://",
            ),
            ("url = \"not a url\"", "upstreams[0].url", "not a URL"),
            (
                "url = \"https://x/v1\"\nkey_env = \"LLMCTL_TEST_NO_SUCH_VARIABLE\"",
                "upstreams[0].key_env",
                "not set",
            ),
            (
                "url = \"https://x/v1\"\nkey_env = \"A\"\nkey_file = \"/k\"",
                "upstreams[0].key_env",
                "one of",
            ),
            (
                "url = \"https://x/v1\"\nkey_file = \"/nonexistent/key\"",
                "upstreams[0].key_file",
                "no such file",
            ),
            (
                "url = \"https://x/v1\"\nmodels = { \"other\" = \"x\" }",
                "upstreams[0].models",
                "does not serve",
            ),
        ] {
            let e = Config::parse(&pool(upstream), "gw.toml")
                .unwrap_err()
                .to_string();
            assert!(e.contains(field) && e.contains(reason), "{upstream}: {e}");
        }
        let both =
            pool("url = \"https://x/v1\"") + "[[pools.endpoints]]\naddress = \"127.0.0.1:9\"\n";
        let e = Config::parse(&both, "gw.toml").unwrap_err().to_string();
        assert!(e.contains("not both"), "{e}");
    }

    #[test]
    fn tenants_may_be_limited_to_models() {
        let text = base().replace(
            "requests_per_minute = 5",
            "requests_per_minute = 5\nmodels = [\"tiny\"]",
        );
        let c = Config::parse(&text, "gw.toml").unwrap();
        assert_eq!(
            c.tenants[0].models.as_deref(),
            Some(&["tiny".to_owned()][..])
        );
    }

    #[test]
    fn fallbacks_name_another_pool_and_spill_after_is_a_share() {
        let two = |extra: &str| {
            base().replace(
                "models = [\"tiny\"]\n",
                &format!("models = [\"tiny\"]\nfallback = \"q\"\n{extra}"),
            ) + "[[pools]]\nname = \"q\"\nmodels = [\"other\"]\n"
        };
        let c = Config::parse(&two(""), "gw.toml").unwrap();
        assert_eq!(c.pools[0].fallback.as_deref(), Some("q"));
        assert_eq!(c.pools[0].spill_after, 0.25);
        for (text, field) in [
            (
                two("").replace("fallback = \"q\"", "fallback = \"nowhere\""),
                "pools[0].fallback",
            ),
            (
                two("").replace("fallback = \"q\"", "fallback = \"p\""),
                "pools[0].fallback",
            ),
            (two("spill_after = 0.0\n"), "pools[0].spill_after"),
            (two("spill_after = 1.5\n"), "pools[0].spill_after"),
        ] {
            let e = Config::parse(&text, "gw.toml").unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }
}
