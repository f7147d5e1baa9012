//! Every metric the controller exports, prefix `llmctl_controller_`, in one registry. The
//! reconcilers write them as things happen; the control API serves them on `/metrics`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::autoscaler::{Class, Inputs, Reason};
use crate::scrape::ExecutorLoad;
use llmctl_protocol::control::PoolDemand;

type FloatGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabel {
    pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    pool: String,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    pool: String,
    class: &'static str,
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    pool: String,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SignalLabels {
    pool: String,
    signal: &'static str,
    window: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DemandLabels {
    pool: String,
    kind: &'static str,
}

pub fn class_name(class: Class) -> &'static str {
    match class {
        Class::Warm => "warm",
        Class::Ephemeral => "ephemeral",
    }
}

/// Executor counts of one pool by class, for the gauges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub starting: u32,
    pub ready: u32,
    pub draining: u32,
}

pub struct Metrics {
    registry: Registry,
    desired: Family<ClassLabels, Gauge>,
    executors: Family<PhaseLabels, Gauge>,
    cold_starts: Family<ClassLabels, Counter>,
    cold_start_seconds: Family<PoolLabel, Histogram>,
    decisions: Family<ReasonLabels, Counter>,
    failures: Family<ClassLabels, Counter>,
    restarts: Family<PoolLabel, Counter>,
    unresponsive: Family<PoolLabel, Counter>,
    demand: Family<DemandLabels, Gauge>,
    demand_tokens: Family<DemandLabels, Gauge>,
    demand_token_rate: Family<DemandLabels, FloatGauge>,
    signals: Family<SignalLabels, FloatGauge>,
    executor_requests: Family<DemandLabels, FloatGauge>,
    executor_kv_used: Family<PoolLabel, FloatGauge>,
    executors_reporting: Family<PoolLabel, Gauge>,
    gateways: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("llmctl_controller");
        let m = Self {
            registry: Registry::default(),
            desired: Family::default(),
            executors: Family::default(),
            cold_starts: Family::default(),
            cold_start_seconds: Family::new_with_constructor(|| {
                Histogram::new([
                    0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
                ])
            }),
            decisions: Family::default(),
            failures: Family::default(),
            restarts: Family::default(),
            unresponsive: Family::default(),
            demand: Family::default(),
            demand_tokens: Family::default(),
            demand_token_rate: Family::default(),
            signals: Family::default(),
            executor_requests: Family::default(),
            executor_kv_used: Family::default(),
            executors_reporting: Family::default(),
            gateways: Gauge::default(),
        };
        registry.register(
            "desired_executors",
            "Executors the autoscaler wants, by pool and class",
            m.desired.clone(),
        );
        registry.register(
            "executors",
            "Executors by pool, class and phase (starting, ready, draining)",
            m.executors.clone(),
        );
        registry.register(
            "cold_starts",
            "Executors that became ready, by pool and class",
            m.cold_starts.clone(),
        );
        registry.register(
            "cold_start_duration_seconds",
            "Time from launch to ready",
            m.cold_start_seconds.clone(),
        );
        registry.register(
            "scale_decisions",
            "Decisions that changed the pool's targets or reaped executors, by reason",
            m.decisions.clone(),
        );
        registry.register(
            "executor_failures",
            "Executors that exited or never became ready without being asked to stop",
            m.failures.clone(),
        );
        registry.register(
            "executor_restarts",
            "Executors launched to replace failed ones",
            m.restarts.clone(),
        );
        registry.register(
            "executor_unresponsive",
            "Ready executors that stopped answering (taken out of the endpoint set; replaced if they stay silent)",
            m.unresponsive.clone(),
        );
        registry.register(
            "demand",
            "Requests the gateways report, by pool and kind (queued, in_flight)",
            m.demand.clone(),
        );
        registry.register(
            "demand_tokens",
            "Tokens of the requests the gateways hold, by pool and kind (prompt, decode: expected)",
            m.demand_tokens.clone(),
        );
        registry.register(
            "demand_token_rate_per_second",
            "Tokens admitted per second by the gateways, by pool and kind (prompt, decode)",
            m.demand_token_rate.clone(),
        );
        registry.register(
            "demand_executors",
            "Demand in executors as the autoscaler sees it, by pool, signal (requests, token_rate, kv_tokens, ahead) and window (stable, panic)",
            m.signals.clone(),
        );
        registry.register(
            "executor_requests",
            "Requests the ready executors report in their engines, summed, by pool and kind (running, waiting)",
            m.executor_requests.clone(),
        );
        registry.register(
            "executor_kv_used_ratio",
            "Mean share of KV cache in use that the ready executors report, by pool",
            m.executor_kv_used.clone(),
        );
        registry.register(
            "executors_reporting_load",
            "Ready executors whose /metrics answered at the last scrape, by pool",
            m.executors_reporting.clone(),
        );
        registry.register(
            "demand_gateways",
            "Gateways whose demand reports currently count",
            m.gateways.clone(),
        );
        Self { registry, ..m }
    }

    pub fn desired(&self, pool: &str, warm: u32, ephemeral: u32) {
        for (class, n) in [(Class::Warm, warm), (Class::Ephemeral, ephemeral)] {
            self.desired
                .get_or_create(&ClassLabels {
                    pool: pool.into(),
                    class: class_name(class),
                })
                .set(n as i64);
        }
    }

    pub fn executors(&self, pool: &str, class: Class, counts: Counts) {
        for (phase, n) in [
            ("starting", counts.starting),
            ("ready", counts.ready),
            ("draining", counts.draining),
        ] {
            self.executors
                .get_or_create(&PhaseLabels {
                    pool: pool.into(),
                    class: class_name(class),
                    phase,
                })
                .set(n as i64);
        }
    }

    pub fn cold_start(&self, pool: &str, class: Class, seconds: f64) {
        self.cold_starts
            .get_or_create(&ClassLabels {
                pool: pool.into(),
                class: class_name(class),
            })
            .inc();
        self.cold_start_seconds
            .get_or_create(&PoolLabel { pool: pool.into() })
            .observe(seconds);
    }

    pub fn decision(&self, pool: &str, reason: Reason) {
        self.decisions
            .get_or_create(&ReasonLabels {
                pool: pool.into(),
                reason: reason.as_str(),
            })
            .inc();
    }

    pub fn failure(&self, pool: &str, class: Class) {
        self.failures
            .get_or_create(&ClassLabels {
                pool: pool.into(),
                class: class_name(class),
            })
            .inc();
    }

    pub fn unresponsive(&self, pool: &str) {
        self.unresponsive
            .get_or_create(&PoolLabel { pool: pool.into() })
            .inc();
    }

    pub fn restart(&self, pool: &str) {
        self.restarts
            .get_or_create(&PoolLabel { pool: pool.into() })
            .inc();
    }

    pub fn demand(&self, d: &PoolDemand, gateways: usize) {
        let labels = |kind| DemandLabels {
            pool: d.pool.clone(),
            kind,
        };
        for (kind, n) in [("queued", d.queued), ("in_flight", d.in_flight)] {
            self.demand.get_or_create(&labels(kind)).set(n as i64);
        }
        for (kind, n) in [("prompt", d.prompt_tokens), ("decode", d.decode_tokens)] {
            self.demand_tokens
                .get_or_create(&labels(kind))
                .set(n.min(i64::MAX as u64) as i64);
        }
        for (kind, r) in [
            ("prompt", d.prompt_tokens_per_s),
            ("decode", d.decode_tokens_per_s),
        ] {
            self.demand_token_rate.get_or_create(&labels(kind)).set(r);
        }
        self.gateways.set(gateways as i64);
    }

    /// The loads the pool's ready executors reported at the last scrape.
    pub fn executor_loads(&self, pool: &str, loads: &[ExecutorLoad]) {
        let sum = |f: fn(&ExecutorLoad) -> f64| loads.iter().map(f).sum::<f64>();
        for (kind, v) in [
            ("running", sum(|l| l.running)),
            ("waiting", sum(|l| l.waiting)),
        ] {
            self.executor_requests
                .get_or_create(&DemandLabels {
                    pool: pool.into(),
                    kind,
                })
                .set(v);
        }
        let label = PoolLabel { pool: pool.into() };
        let mean = if loads.is_empty() {
            0.0
        } else {
            sum(|l| l.kv_used) / loads.len() as f64
        };
        self.executor_kv_used.get_or_create(&label).set(mean);
        self.executors_reporting
            .get_or_create(&label)
            .set(loads.len() as i64);
    }

    /// The demand each signal measured for the latest decision, in executors.
    pub fn signals(&self, pool: &str, inputs: &Inputs) {
        let set = |signal, window, v: f64| {
            self.signals
                .get_or_create(&SignalLabels {
                    pool: pool.into(),
                    signal,
                    window,
                })
                .set(v);
        };
        for (window, load) in [("stable", inputs.stable), ("panic", inputs.panic)] {
            set("requests", window, load.requests);
            set("token_rate", window, load.token_rate);
            set("kv_tokens", window, load.kv_tokens);
        }
        set("ahead", "stable", inputs.ahead);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
