//! Every metric the worker exports, prefix `llmctl_worker_`, in one registry. The engine loop
//! updates them after each step; `/metrics` encodes them in the Prometheus text format.
//! `docs/worker-metrics.md` maps them to the vLLM names SREs already alert on.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::engine::EngineStats;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub requests_running: Gauge,
    pub requests_waiting: Gauge,
    pub kv_blocks_used: Gauge,
    pub kv_blocks_total: Gauge,
    pub prefix_cache_queried_tokens: Counter,
    pub prefix_cache_hit_tokens: Counter,
    pub preemptions: Counter,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    pub graph_recorded_steps: Counter,
    pub graph_replayed_steps: Counter,
    pub time_to_first_token: Histogram,
    pub time_per_output_token: Histogram,
    pub e2e_latency: Histogram,
    pub queue_time: Histogram,
    pub requests_finished: Family<ReasonLabel, Counter>,
    /// Engine counters at the last update, to turn cumulative stats into increments.
    last: std::sync::Mutex<EngineStats>,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    [
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
        120.0,
    ]
    .into_iter()
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("llmctl_worker");
        let m = Self {
            requests_running: Gauge::default(),
            requests_waiting: Gauge::default(),
            kv_blocks_used: Gauge::default(),
            kv_blocks_total: Gauge::default(),
            prefix_cache_queried_tokens: Counter::default(),
            prefix_cache_hit_tokens: Counter::default(),
            preemptions: Counter::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            graph_recorded_steps: Counter::default(),
            graph_replayed_steps: Counter::default(),
            time_to_first_token: Histogram::new(latency_buckets()),
            time_per_output_token: Histogram::new(latency_buckets()),
            e2e_latency: Histogram::new(latency_buckets()),
            queue_time: Histogram::new(latency_buckets()),
            requests_finished: Family::default(),
            last: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests_running",
            "Requests in the running batch",
            m.requests_running.clone(),
        );
        registry.register(
            "requests_waiting",
            "Requests waiting to be scheduled",
            m.requests_waiting.clone(),
        );
        registry.register(
            "kv_blocks_used",
            "KV cache blocks held by sequences",
            m.kv_blocks_used.clone(),
        );
        registry.register(
            "kv_blocks_total",
            "KV cache blocks allocated",
            m.kv_blocks_total.clone(),
        );
        registry.register(
            "prefix_cache_queried_tokens",
            "Prompt tokens looked up in the prefix cache",
            m.prefix_cache_queried_tokens.clone(),
        );
        registry.register(
            "prefix_cache_hit_tokens",
            "Prompt tokens served from the prefix cache",
            m.prefix_cache_hit_tokens.clone(),
        );
        registry.register(
            "preemptions",
            "Sequences preempted for recompute",
            m.preemptions.clone(),
        );
        registry.register(
            "prompt_tokens",
            "Prompt tokens computed",
            m.prompt_tokens.clone(),
        );
        registry.register(
            "generation_tokens",
            "Tokens generated",
            m.generation_tokens.clone(),
        );
        registry.register(
            "time_to_first_token_seconds",
            "Time from arrival to the first generated token",
            m.time_to_first_token.clone(),
        );
        registry.register(
            "time_per_output_token_seconds",
            "Time between generated tokens after the first",
            m.time_per_output_token.clone(),
        );
        registry.register(
            "e2e_request_latency_seconds",
            "Time from arrival to the last token",
            m.e2e_latency.clone(),
        );
        registry.register(
            "request_queue_time_seconds",
            "Time from arrival to first scheduling",
            m.queue_time.clone(),
        );
        registry.register(
            "graph_recorded_steps",
            "Decode steps recorded into CUDA graphs (CUDA backend)",
            m.graph_recorded_steps.clone(),
        );
        registry.register(
            "graph_replayed_steps",
            "Decode steps replayed from CUDA graphs instead of launched op by op (CUDA backend)",
            m.graph_replayed_steps.clone(),
        );
        registry.register(
            "requests_finished",
            "Requests finished, by reason",
            m.requests_finished.clone(),
        );
        Self { registry, ..m }
    }

    /// Copies the engine's gauges and counter increments.
    pub fn observe_engine(&self, stats: &EngineStats) {
        self.requests_running.set(stats.running as i64);
        self.requests_waiting.set(stats.waiting as i64);
        self.kv_blocks_used.set(stats.blocks_used as i64);
        self.kv_blocks_total.set(stats.blocks_total as i64);
        let mut last = self
            .last
            .lock()
            .expect("metrics lock is never poisoned: no panics while held");
        self.prefix_cache_queried_tokens
            .inc_by(stats.cache.queried_tokens - last.cache.queried_tokens);
        self.prefix_cache_hit_tokens
            .inc_by(stats.cache.hit_tokens - last.cache.hit_tokens);
        self.preemptions
            .inc_by(stats.preemptions - last.preemptions);
        self.prompt_tokens
            .inc_by(stats.prompt_tokens - last.prompt_tokens);
        self.generation_tokens
            .inc_by(stats.generation_tokens - last.generation_tokens);
        self.graph_recorded_steps
            .inc_by(stats.replays.recorded - last.replays.recorded);
        self.graph_replayed_steps
            .inc_by(stats.replays.replayed - last.replays.replayed);
        *last = *stats;
    }

    pub fn finished(&self, reason: &'static str) {
        self.requests_finished
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    /// Adds the HTTP server's connection counters (`llmctl_worker_http_*`).
    pub fn register_http(&mut self, stats: &llmctl_http_server::Stats) {
        stats.register(&mut self.registry);
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String cannot fail");
        out
    }
}
