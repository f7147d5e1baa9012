//! `llmctl autoscaler replay`: a production trace through a simulated pool, in simulated time,
//! under our autoscaler, Knative's KPA or a static pool; a table (or JSON) of what each policy
//! cost and how fast it served, and an SVG plot of demand, desired and ready executors and
//! queue wait over time. `trace` reads the traces, `executor` the executor model, `sim` runs
//! the pool (with the same autoscaler and dispatch code as production), `report` sums up and
//! draws.

pub mod executor;
pub mod report;
pub mod sim;
pub mod trace;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};

use crate::autoscaler::kpa::KpaSpec;
use crate::spec::ControllerConfig;
use executor::ExecutorModel;
use sim::{Policy, SimConfig};

/// The executor models shipped with llmctl, usable by name.
const SHIPPED_MODELS: [(&str, &str); 2] = [
    (
        "cpu-small",
        include_str!("../../../perf/executor-models/cpu-small.toml"),
    ),
    (
        "h200-llama-8b",
        include_str!("../../../perf/executor-models/h200-llama-8b.toml"),
    ),
];

#[derive(Clone, Debug, clap::Args)]
pub struct ReplayArgs {
    /// The trace: Azure LLM inference CSV or Mooncake JSON lines.
    #[arg(long)]
    pub trace: PathBuf,
    /// The controller's pool spec file (TOML, as for `llmctl controller --config`).
    #[arg(long)]
    pub pool: PathBuf,
    /// Which pool of the file (default: the first).
    #[arg(long)]
    pub pool_name: Option<String>,
    /// Policies to compare, comma-separated: `llmctl`, `kpa`, `static:N`, `static:peak`.
    #[arg(long, default_value = "llmctl", value_delimiter = ',')]
    pub policy: Vec<String>,
    /// Executor model: a TOML file, or a shipped one by name (`cpu-small`, `h200-llama-8b`).
    #[arg(long, default_value = "h200-llama-8b")]
    pub executor_model: String,
    /// Time-to-first-token objective, seconds.
    #[arg(long, default_value_t = 2.0)]
    pub slo_ttft: f64,
    /// `table` or `json` (one object per policy, one per line).
    #[arg(long, default_value = "table")]
    pub format: String,
    /// Write the plot here (SVG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Replay only from this many seconds into the trace.
    #[arg(long, default_value_t = 0.0)]
    pub start: f64,
    /// Replay only this many seconds of the trace (after `--start`).
    #[arg(long)]
    pub duration: Option<f64>,
    /// Compress time by this factor (2 replays twice as fast).
    #[arg(long, default_value_t = 1.0)]
    pub time_scale: f64,
    /// Multiply prompt and output lengths by this factor.
    #[arg(long, default_value_t = 1.0)]
    pub token_scale: f64,
    /// The gateway queue's deadline, seconds (the gateway's default).
    #[arg(long, default_value_t = 60.0)]
    pub queue_deadline_secs: f64,
    /// The gateway queue's bound (the gateway's default).
    #[arg(long, default_value_t = 10_000)]
    pub queue_max: usize,
    /// Seconds between demand samples and decisions.
    #[arg(long, default_value_t = 1.0)]
    pub tick_secs: f64,
    /// Place requests without prefix affinity.
    #[arg(long)]
    pub no_affinity: bool,
}

/// Loads a shipped executor model by name, or a file.
pub fn executor_model(name_or_path: &str) -> anyhow::Result<ExecutorModel> {
    if let Some((name, text)) = SHIPPED_MODELS.iter().find(|(n, _)| *n == name_or_path) {
        return Ok(ExecutorModel::parse(text, name)?);
    }
    Ok(ExecutorModel::load(std::path::Path::new(name_or_path))?)
}

/// Which part of a trace to replay, and how scaled.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Span {
    /// Seconds into the trace.
    pub start: f64,
    pub duration: Option<f64>,
    /// Time compression (2: twice as fast).
    pub time_scale: f64,
    /// Factor on prompt and output lengths.
    pub token_scale: f64,
}

/// The trace cut to the span, starting at 0, scaled in time and tokens.
pub fn shape(
    mut trace: Vec<trace::TraceRequest>,
    span: Span,
) -> anyhow::Result<Vec<trace::TraceRequest>> {
    for (name, v) in [
        ("--time-scale", span.time_scale),
        ("--token-scale", span.token_scale),
    ] {
        if !(v.is_finite() && v > 0.0) {
            bail!("{name} = {v}: must be a positive number");
        }
    }
    if !(span.start.is_finite() && span.start >= 0.0) {
        bail!("--start = {}: must be seconds, 0 or more", span.start);
    }
    let end = span.duration.map_or(f64::INFINITY, |d| span.start + d);
    trace.retain(|r| r.at >= span.start && r.at < end);
    if trace.is_empty() {
        bail!("no request of the trace falls in the chosen span");
    }
    let t0 = trace[0].at;
    let tokens = |n: u32| ((n as f64 * span.token_scale).round() as u32).max(1);
    for r in &mut trace {
        r.at = (r.at - t0) / span.time_scale;
        r.prompt_tokens = tokens(r.prompt_tokens);
        r.output_tokens = tokens(r.output_tokens);
    }
    Ok(trace)
}

/// Runs `llmctl autoscaler replay`.
pub fn run(args: ReplayArgs) -> anyhow::Result<()> {
    let model = executor_model(&args.executor_model)?;
    let span = Span {
        start: args.start,
        duration: args.duration,
        time_scale: args.time_scale,
        token_scale: args.token_scale,
    };
    let trace = shape(trace::load(&args.trace)?, span)?;
    let config = ControllerConfig::load(&args.pool)?;
    let pool = match &args.pool_name {
        Some(name) => config
            .pools
            .iter()
            .find(|p| &p.name == name)
            .with_context(|| format!("{}: no pool named {name:?}", args.pool.display()))?,
        None => config
            .pools
            .first()
            .with_context(|| format!("{}: no pools", args.pool.display()))?,
    };
    if !(args.slo_ttft.is_finite() && args.slo_ttft > 0.0) {
        bail!("--slo-ttft = {}: must be positive seconds", args.slo_ttft);
    }
    if !(args.tick_secs.is_finite() && args.tick_secs >= 0.05) {
        bail!("--tick-secs = {}: must be at least 0.05", args.tick_secs);
    }
    if !(args.queue_deadline_secs.is_finite() && args.queue_deadline_secs > 0.0) {
        bail!(
            "--queue-deadline-secs = {}: must be positive",
            args.queue_deadline_secs
        );
    }
    let format = args.format.as_str();
    if !matches!(format, "table" | "json") {
        bail!("--format = {format:?}: `table` or `json`");
    }
    let mut scaling = pool.scaling.clone();
    // The pool's own capacity figures win; otherwise the executor model's.
    scaling.capacity = scaling.capacity.or(Some(model.capacity()));
    let sim_config = SimConfig {
        scaling: scaling.clone(),
        max_concurrency: pool.executor.max_concurrency,
        queue_deadline: Duration::from_secs_f64(args.queue_deadline_secs),
        queue_max: args.queue_max.max(1),
        tick: Duration::from_secs_f64(args.tick_secs),
        affinity: !args.no_affinity,
        // The trace is sorted by arrival: its first minute is a prefix.
        initial: sim::peak_executors(
            &trace[..trace.partition_point(|r| r.at < 60.0)],
            &model,
            &scaling,
        ),
    };
    let mut policies = Vec::new();
    for p in &args.policy {
        policies.push(match p.trim() {
            "llmctl" => Policy::Llmctl,
            "kpa" => Policy::Kpa(KpaSpec::knative_defaults(
                pool.executor.max_concurrency as f64,
                scaling.min_warm,
                scaling.max_replicas,
            )),
            "static:peak" => Policy::Static(sim::peak_executors(&trace, &model, &scaling)),
            other => match other.strip_prefix("static:").map(str::parse::<u32>) {
                Some(Ok(n)) if n > 0 => Policy::Static(n),
                _ => bail!("--policy {other:?}: one of llmctl, kpa, static:N (N > 0), static:peak"),
            },
        });
    }
    let mut results = Vec::new();
    let mut panels = Vec::new();
    for policy in policies {
        let name = policy.name();
        let outcome = sim::Sim::new(&sim_config, &model, &trace, policy).run();
        results.push(report::Summary::of(&name, &outcome, args.slo_ttft));
        panels.push((name, outcome.timeline));
    }
    if let Some(path) = &args.plot {
        std::fs::write(path, report::plot(&panels))
            .with_context(|| format!("writing the plot {}", path.display()))?;
    }
    match format {
        "json" => {
            for r in &results {
                println!("{}", serde_json::to_string(r)?);
            }
        }
        _ => print!(
            "{}",
            report::table(&results, &args.trace.display().to_string(), trace.len())
        ),
    }
    Ok(())
}
