//! The controller's TOML file: where its control API listens, and one `[[pools]]` entry per
//! pool with the model it serves, the executor template (for the local provider: the model
//! folder and extra worker arguments) and the scaling parameters. Parsed and validated into
//! [`ControllerConfig`]; errors name the file, the field, the value and the reason.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::autoscaler::{Capacity, ScalingSpec};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    log_dir: Option<PathBuf>,
    demand_ttl_ms: Option<u64>,
    tick_ms: Option<u64>,
    #[serde(default)]
    pools: Vec<RawPool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    name: String,
    /// Model names the pool serves; the first is the executors' served name.
    models: Option<Vec<String>>,
    executor: RawExecutor,
    #[serde(default)]
    scaling: ScalingFields,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExecutor {
    model: PathBuf,
    #[serde(default)]
    args: Vec<String>,
    max_concurrency: Option<usize>,
    startup_timeout_secs: Option<u64>,
    drain_grace_secs: Option<u64>,
}

/// A pool's scaling parameters as written (every one optional), shared by the TOML spec and the
/// `InferencePool` resource; [`scaling`] validates them.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScalingFields {
    pub min_warm: Option<u32>,
    pub max_replicas: Option<u32>,
    pub target_concurrency: Option<f64>,
    pub stable_window_secs: Option<f64>,
    pub panic_window_secs: Option<f64>,
    pub panic_threshold: Option<f64>,
    pub max_scale_up_rate: Option<f64>,
    pub max_scale_down_rate: Option<f64>,
    pub idle_ttl_secs: Option<f64>,
    pub terminal_ttl_secs: Option<f64>,
    pub target_utilization: Option<f64>,
    pub lookahead: Option<bool>,
    /// One executor's capacity, for the token signals: all three or none.
    pub executor_prefill_tokens_per_s: Option<f64>,
    pub executor_decode_tokens_per_s: Option<f64>,
    pub executor_kv_tokens: Option<f64>,
}

/// Validates scaling fields into the autoscaler's spec and the terminal TTL; `invalid` builds
/// the error for a field name (relative to the scaling block), a value and a reason.
pub fn scaling(
    s: &ScalingFields,
    invalid: &dyn Fn(&str, &dyn std::fmt::Display, &str) -> SpecError,
) -> Result<(ScalingSpec, Duration), SpecError> {
    let secs = |field: &str, v: Option<f64>, default: Duration| -> Result<Duration, SpecError> {
        match v {
            None => Ok(default),
            Some(x) if x.is_finite() && x > 0.0 && x < 1e7 => Ok(Duration::from_secs_f64(x)),
            Some(x) => Err(invalid(field, &x, "must be a positive number of seconds")),
        }
    };
    let d = ScalingSpec::default();
    let spec = ScalingSpec {
        min_warm: s.min_warm.unwrap_or(d.min_warm),
        max_replicas: s.max_replicas.unwrap_or(d.max_replicas),
        target_concurrency: s.target_concurrency.unwrap_or(d.target_concurrency),
        stable_window: secs("stable_window_secs", s.stable_window_secs, d.stable_window)?,
        panic_window: secs("panic_window_secs", s.panic_window_secs, d.panic_window)?,
        panic_threshold: s.panic_threshold.unwrap_or(d.panic_threshold),
        max_scale_up_rate: s.max_scale_up_rate.unwrap_or(d.max_scale_up_rate),
        max_scale_down_rate: s.max_scale_down_rate.unwrap_or(d.max_scale_down_rate),
        idle_ttl: secs("idle_ttl_secs", s.idle_ttl_secs, d.idle_ttl)?,
        capacity: capacity(s, invalid)?,
        target_utilization: s.target_utilization.unwrap_or(d.target_utilization),
        lookahead: s.lookahead.unwrap_or(d.lookahead),
    };
    if !(spec.target_utilization > 0.0 && spec.target_utilization <= 1.0) {
        return Err(invalid(
            "target_utilization",
            &spec.target_utilization,
            "must be in (0, 1]",
        ));
    }
    if spec.max_replicas == 0 || spec.max_replicas < spec.min_warm {
        return Err(invalid(
            "max_replicas",
            &spec.max_replicas,
            "must be positive and at least min_warm",
        ));
    }
    if spec.panic_window > spec.stable_window {
        return Err(invalid(
            "panic_window_secs",
            &spec.panic_window.as_secs_f64(),
            "must not exceed stable_window_secs",
        ));
    }
    for (field, v, min) in [
        ("target_concurrency", spec.target_concurrency, 0.0),
        ("panic_threshold", spec.panic_threshold, 1.0),
        ("max_scale_up_rate", spec.max_scale_up_rate, 1.0),
        ("max_scale_down_rate", spec.max_scale_down_rate, 1.0),
    ] {
        if !(v.is_finite() && v > min) {
            return Err(invalid(field, &v, &format!("must be a number above {min}")));
        }
    }
    let terminal_ttl = secs(
        "terminal_ttl_secs",
        s.terminal_ttl_secs,
        Duration::from_secs(300),
    )?;
    Ok((spec, terminal_ttl))
}

/// The executor capacity for the token signals: all three fields, positive, or none.
fn capacity(
    s: &ScalingFields,
    invalid: &dyn Fn(&str, &dyn std::fmt::Display, &str) -> SpecError,
) -> Result<Option<Capacity>, SpecError> {
    let fields = [
        (
            "executor_prefill_tokens_per_s",
            s.executor_prefill_tokens_per_s,
        ),
        (
            "executor_decode_tokens_per_s",
            s.executor_decode_tokens_per_s,
        ),
        ("executor_kv_tokens", s.executor_kv_tokens),
    ];
    if fields.iter().all(|(_, v)| v.is_none()) {
        return Ok(None);
    }
    let mut values = [0.0; 3];
    for (slot, (field, v)) in values.iter_mut().zip(fields) {
        match v {
            Some(x) if x.is_finite() && x > 0.0 => *slot = x,
            Some(x) => return Err(invalid(field, &x, "must be a positive number")),
            None => {
                return Err(invalid(
                    field,
                    &"(missing)",
                    "the executor capacity needs all of executor_prefill_tokens_per_s, executor_decode_tokens_per_s and executor_kv_tokens",
                ));
            }
        }
    }
    Ok(Some(Capacity {
        prefill_tokens_per_s: values[0],
        decode_tokens_per_s: values[1],
        kv_tokens: values[2],
    }))
}

/// How each executor of a pool is started.
#[derive(Clone, Debug, PartialEq)]
pub struct ExecutorTemplate {
    /// Hugging Face model folder.
    pub model: PathBuf,
    /// Extra `llmctl worker` arguments.
    pub args: Vec<String>,
    /// Concurrent requests the gateway sends one executor at most.
    pub max_concurrency: usize,
    pub startup_timeout: Duration,
    /// SIGTERM grace when draining.
    pub drain_grace: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PoolSpec {
    pub name: String,
    pub models: Vec<String>,
    pub executor: ExecutorTemplate,
    pub scaling: ScalingSpec,
    /// How long a terminated executor stays listed.
    pub terminal_ttl: Duration,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ControllerConfig {
    pub listen: SocketAddr,
    pub log_dir: PathBuf,
    /// A gateway not heard from for this long no longer counts as demand.
    pub demand_ttl: Duration,
    /// Time between autoscaler decisions.
    pub tick: Duration,
    pub pools: Vec<PoolSpec>,
}

impl ControllerConfig {
    pub fn load(path: &Path) -> Result<Self, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, SpecError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| SpecError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })?;
        let invalid =
            |field: &str, value: &dyn std::fmt::Display, reason: &str| SpecError::Invalid {
                path: origin.to_owned(),
                field: field.to_owned(),
                value: value.to_string(),
                reason: reason.to_owned(),
            };
        let listen_text = raw.listen.unwrap_or_else(|| "127.0.0.1:9090".to_owned());
        let listen: SocketAddr = listen_text
            .parse()
            .map_err(|_| invalid("listen", &listen_text, "not an address like 127.0.0.1:9090"))?;

        let mut pools = Vec::new();
        let mut names = HashSet::new();
        let mut served = HashSet::new();
        for (i, p) in raw.pools.into_iter().enumerate() {
            let at = |f: &str| format!("pools[{i}].{f}");
            let valid_name = !p.name.is_empty()
                && p.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
            if !valid_name || !names.insert(p.name.clone()) {
                return Err(invalid(
                    &at("name"),
                    &p.name,
                    "must be unique and made of letters, digits, '-' and '_'",
                ));
            }
            let models = p.models.unwrap_or_else(|| vec![p.name.clone()]);
            if models.is_empty() {
                return Err(invalid(
                    &at("models"),
                    &"[]",
                    "a pool serves at least one model",
                ));
            }
            for m in &models {
                if !served.insert(m.clone()) {
                    return Err(invalid(&at("models"), m, "served by two pools"));
                }
            }
            let e = p.executor;
            let max_concurrency = e.max_concurrency.unwrap_or(32);
            if max_concurrency == 0 {
                return Err(invalid(
                    &at("executor.max_concurrency"),
                    &0,
                    "must be positive",
                ));
            }
            let executor = ExecutorTemplate {
                model: e.model,
                args: e.args,
                max_concurrency,
                startup_timeout: Duration::from_secs(e.startup_timeout_secs.unwrap_or(120)),
                drain_grace: Duration::from_secs(e.drain_grace_secs.unwrap_or(30)),
            };
            if executor.startup_timeout.is_zero() {
                return Err(invalid(
                    &at("executor.startup_timeout_secs"),
                    &0,
                    "must be positive",
                ));
            }

            let (scaling, terminal_ttl) = scaling(&p.scaling, &|f, v, r| {
                invalid(&at(&format!("scaling.{f}")), v, r)
            })?;
            pools.push(PoolSpec {
                name: p.name,
                models,
                executor,
                scaling,
                terminal_ttl,
            });
        }
        if pools.is_empty() {
            return Err(invalid("pools", &"[]", "at least one pool is needed"));
        }
        Ok(Self {
            listen,
            log_dir: raw.log_dir.unwrap_or_else(|| PathBuf::from(".llmctl/logs")),
            demand_ttl: Duration::from_millis(raw.demand_ttl_ms.unwrap_or(10_000).max(1)),
            tick: Duration::from_millis(raw.tick_ms.unwrap_or(250).max(10)),
            pools,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "listen = \"127.0.0.1:0\"\n[[pools]]\nname = \"default\"\nmodels = [\"tiny\"]\n\
        [pools.executor]\nmodel = \"models/tiny\"\nargs = [\"--kv-cache-mib\", \"64\"]\n\
        [pools.scaling]\nmin_warm = 1\nmax_replicas = 3\nidle_ttl_secs = 30\n";

    #[test]
    fn parses_with_defaults() {
        let c = ControllerConfig::parse(BASE, "c.toml").unwrap();
        let p = &c.pools[0];
        assert_eq!(p.models, ["tiny"]);
        assert_eq!(p.executor.max_concurrency, 32);
        assert_eq!(p.scaling.max_replicas, 3);
        assert_eq!(p.scaling.idle_ttl, Duration::from_secs(30));
        assert_eq!(
            p.scaling.stable_window,
            ScalingSpec::default().stable_window
        );
        assert_eq!(p.terminal_ttl, Duration::from_secs(300));
    }

    #[test]
    fn errors_name_the_field() {
        for (from, to, field) in [
            (
                "max_replicas = 3",
                "max_replicas = 0",
                "pools[0].scaling.max_replicas",
            ),
            (
                "idle_ttl_secs = 30",
                "idle_ttl_secs = -1",
                "pools[0].scaling.idle_ttl_secs",
            ),
            (
                "min_warm = 1",
                "min_warm = 1\ntarget_concurrency = 0",
                "target_concurrency",
            ),
            ("name = \"default\"", "name = \"a b\"", "pools[0].name"),
            ("min_warm = 1", "min_wram = 1", "min_wram"),
            ("127.0.0.1:0", "localhost", "`listen`"),
        ] {
            let e = ControllerConfig::parse(&BASE.replace(from, to), "c.toml")
                .unwrap_err()
                .to_string();
            assert!(e.contains("c.toml") && e.contains(field), "{field}: {e}");
        }
        let e = ControllerConfig::parse("", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("at least one pool"), "{e}");
    }
}
