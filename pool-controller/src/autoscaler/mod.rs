//! The autoscaler: a pure function from what the controller observes (demand samples from the
//! gateways, the pool's executors, the observed cold start, the previous decision, the time) to
//! a decision (how many warm and ephemeral executors the pool should have, which executors to
//! drain, why, and the inputs that led there). No I/O and no clock of its own, so it is tested
//! with tables over simulated time and replayed over production traces by `crate::replay`
//! (`llmctl autoscaler replay`), beside the Knative KPA baseline in [`kpa`].
//!
//! The skeleton is Knative's: demand is averaged over a stable window and a shorter panic
//! window; when the panic-window demand reaches `panic_threshold` times the current capacity the
//! autoscaler panics, follows the panic window and never scales down until a whole stable window
//! passes without panic demand; growth and shrinkage per decision are bounded by rates.
//!
//! What LLM pools need on top:
//! - **Token signals.** Demand is measured three ways, each turned into executors: requests
//!   (queued + in flight over `target_concurrency`), token throughput (prompt and decode tokens
//!   admitted per second over what one executor processes, at `target_utilization`) and KV
//!   footprint (prompt + expected decode tokens of the requests in the system over one
//!   executor's KV capacity, at `target_utilization`). The pool follows the largest; the
//!   decision names it. The token signals need the executor's [`Capacity`]; without one the
//!   autoscaler counts requests only.
//! - **Looking ahead by the cold start.** A rising load is extrapolated over the observed
//!   launch-to-ready time, so executors launched now are ready when the ramp gets there. The
//!   trend must rise through all three thirds of the stable window by a margin (a step rises
//!   between two thirds only, noise by less). Only upward, at most doubling the current load.
//! - **Bursts shorter than a boot are absorbed, not chased.** A panic launches executors only
//!   when the live ones would still be working through the backlog (prompt and decode tokens
//!   held, over their token capacity) when a new one became ready. Unless bursts recur (the
//!   last one within a stable window, a cold start and `idle_ttl`): then the panic launches and
//!   holds what it launched that long, so the next burst finds it ready.
//! - **Scale from zero** on the first queued request, without waiting for a window.
//! - **Drain-based scale-down.** Capacity that has been above what the stable window asks for
//!   during `idle_ttl` is given back: the decision names the executors to drain (ephemeral
//!   before warm, fewest in flight, longest idle), the controller takes them out of dispatch at
//!   once and stops them when their requests have finished. Routing that spreads requests over
//!   every executor therefore no longer pins the pool at its peak. Warm executors are the floor
//!   (`min_warm`) and never drain below it; executors still starting count as capacity and are
//!   never drained, so a slow boot neither overshoots nor is killed to keep an idle one.

pub mod kpa;

use std::time::Duration;

/// What one executor of the pool processes, for the token signals (the replay's executor model
/// gives it; on a live pool, the pool spec).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Capacity {
    /// Prompt tokens prefilled per second.
    pub prefill_tokens_per_s: f64,
    /// Output tokens per second at the batch the executor runs when loaded.
    pub decode_tokens_per_s: f64,
    /// Tokens its KV cache holds.
    pub kv_tokens: f64,
}

impl Capacity {
    /// Seconds one executor spends prefilling `prompt` tokens and generating `decode` tokens
    /// (given rates instead of counts: the executors those rates keep busy).
    pub fn seconds(&self, prompt: f64, decode: f64) -> f64 {
        let per = |x: f64| if x > 0.0 { 1.0 / x } else { 0.0 };
        prompt * per(self.prefill_tokens_per_s) + decode * per(self.decode_tokens_per_s)
    }
}

/// The scaling parameters of a pool.
#[derive(Clone, Debug, PartialEq)]
pub struct ScalingSpec {
    /// Executors kept running whatever the demand.
    pub min_warm: u32,
    /// Warm plus ephemeral executors at most.
    pub max_replicas: u32,
    /// Concurrent requests one executor is sized for.
    pub target_concurrency: f64,
    pub stable_window: Duration,
    pub panic_window: Duration,
    /// Panic when panic-window demand reaches this multiple of current capacity.
    pub panic_threshold: f64,
    /// Most growth per decision, as a factor of current capacity (at least +1).
    pub max_scale_up_rate: f64,
    /// Most shrinkage per decision, as a divisor of current capacity.
    pub max_scale_down_rate: f64,
    /// Capacity unneeded this long is given back (an idle ephemeral executor leaves after it).
    pub idle_ttl: Duration,
    /// One executor's token capacity; `None` scales on requests only.
    pub capacity: Option<Capacity>,
    /// Share of an executor's token throughput and KV cache the token signals plan to use.
    pub target_utilization: f64,
    /// Extrapolate rising load over the observed cold start.
    pub lookahead: bool,
}

impl Default for ScalingSpec {
    fn default() -> Self {
        Self {
            min_warm: 1,
            max_replicas: 4,
            target_concurrency: 8.0,
            stable_window: Duration::from_secs(60),
            panic_window: Duration::from_secs(6),
            panic_threshold: 2.0,
            max_scale_up_rate: 10.0,
            max_scale_down_rate: 2.0,
            idle_ttl: Duration::from_secs(120),
            capacity: None,
            target_utilization: 0.8,
            lookahead: true,
        }
    }
}

/// Demand reported at time `at` (time is a duration since any fixed origin), summed over the
/// gateways.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Sample {
    pub at: Duration,
    pub queued: u32,
    pub in_flight: u32,
    /// Prompt tokens of the queued and running requests.
    pub prompt_tokens: u64,
    /// Decode tokens the queued and running requests may still generate.
    pub decode_tokens: u64,
    /// Prompt tokens admitted per second.
    pub prompt_tokens_per_s: f64,
    /// Expected decode tokens admitted per second.
    pub decode_tokens_per_s: f64,
    /// KV cache in use as the executors themselves report it, in executors' worth: the sum over
    /// the ready executors of each one's share in use (0 where none reports).
    pub kv_used: f64,
}

/// The signal a decision followed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Signal {
    Requests,
    TokenRate,
    KvTokens,
}

impl Signal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::TokenRate => "token_rate",
            Self::KvTokens => "kv_tokens",
        }
    }
}

/// Demand over a window, in executors (unrounded), by signal.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Load {
    pub requests: f64,
    pub token_rate: f64,
    pub kv_tokens: f64,
}

impl Load {
    /// The largest signal and its value.
    pub fn max(&self) -> (Signal, f64) {
        let mut best = (Signal::Requests, self.requests);
        for (s, v) in [
            (Signal::TokenRate, self.token_rate),
            (Signal::KvTokens, self.kv_tokens),
        ] {
            if v > best.1 {
                best = (s, v);
            }
        }
        best
    }
}

impl ScalingSpec {
    /// One sample's demand in executors, by signal.
    pub fn load(&self, s: &Sample) -> Load {
        let requests =
            (s.queued + s.in_flight) as f64 / self.target_concurrency.max(f64::MIN_POSITIVE);
        let util = self.target_utilization.clamp(0.01, 1.0);
        // What the executors report holds with or without a configured capacity.
        let measured_kv = s.kv_used / util;
        let Some(c) = self.capacity else {
            return Load {
                requests,
                kv_tokens: measured_kv,
                ..Load::default()
            };
        };
        let kv = if c.kv_tokens > 0.0 {
            c.kv_tokens
        } else {
            f64::INFINITY
        };
        Load {
            requests,
            token_rate: c.seconds(s.prompt_tokens_per_s, s.decode_tokens_per_s) / util,
            // The gateways' estimate of what the requests will hold, or what the executors hold
            // now, whichever is more.
            kv_tokens: ((s.prompt_tokens + s.decode_tokens) as f64 / kv / util).max(measured_kv),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Class {
    Warm,
    Ephemeral,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Launched, not ready yet (counted as coming capacity).
    Starting,
    Ready,
    /// Being drained or terminated (not capacity).
    Draining,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ExecutorView {
    pub id: String,
    pub class: Class,
    pub phase: Phase,
    /// Requests running on it now.
    pub in_flight: u32,
    /// Since when it has had no work (`None` while busy).
    pub idle_since: Option<Duration>,
}

/// What the previous decision carries forward.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Memory {
    /// Last time panic-level demand was seen, while panicking.
    pub panic_since: Option<Duration>,
    /// Most executors wanted while panicking (never lowered during panic).
    pub panic_peak: u32,
    /// Since when the pool has had more capacity than the stable window asks for.
    pub excess_since: Option<Duration>,
    /// Last time a burst was seen (panic-window demand at the panic threshold over the stable
    /// window's or over capacity), kept after the panic ends.
    pub last_burst: Option<Duration>,
    /// The current panic began within [`recurrence`] of the last burst before it.
    pub recurring: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Observations<'a> {
    pub now: Duration,
    /// Demand samples, oldest first; those older than the stable window are ignored.
    pub samples: &'a [Sample],
    pub executors: &'a [ExecutorView],
    /// Launch to ready, as observed lately (`None` before the first cold start).
    pub cold_start: Option<Duration>,
    pub memory: Memory,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// A request is waiting and no executor exists or is coming.
    ScaleFromZero,
    /// Panic mode: following the panic window.
    Panic,
    /// Following the stable window.
    Stable,
    /// Rising load extrapolated over the cold start asks for more than the stable window.
    Lookahead,
    /// Bounded by the warm floor.
    WarmFloor,
    /// Bounded by `max_replicas`.
    MaxReplicas,
    /// Capacity unneeded for `idle_ttl` is drained.
    ScaleDown,
    /// Nothing to change.
    Hold,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ScaleFromZero => "scale_from_zero",
            Self::Panic => "panic",
            Self::Stable => "stable",
            Self::Lookahead => "lookahead",
            Self::WarmFloor => "warm_floor",
            Self::MaxReplicas => "max_replicas",
            Self::ScaleDown => "scale_down",
            Self::Hold => "hold",
        }
    }
}

/// What a decision was made from, for logs, metrics and the replay's plot.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Inputs {
    /// Stable-window demand in executors, by signal.
    pub stable: Load,
    /// Panic-window demand in executors, by signal.
    pub panic: Load,
    /// The stable demand extrapolated over the cold start (equal to it when not rising).
    pub ahead: f64,
    /// Live capacity (starting + ready executors) when deciding.
    pub capacity: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub warm: u32,
    pub ephemeral: u32,
    /// Executors to drain now (in the order chosen).
    pub drain: Vec<String>,
    pub reason: Reason,
    /// The signal the pool's size followed.
    pub signal: Signal,
    pub inputs: Inputs,
    pub memory: Memory,
}

impl Decision {
    pub fn total(&self) -> u32 {
        self.warm + self.ephemeral
    }
}

/// Samples within `window` before `now`.
pub(super) fn recent(
    samples: &[Sample],
    now: Duration,
    window: Duration,
) -> impl Iterator<Item = &Sample> {
    let from = now.saturating_sub(window);
    samples.iter().filter(move |s| s.at > from && s.at <= now)
}

/// Mean demand by signal over `window`.
fn average(spec: &ScalingSpec, samples: &[Sample], now: Duration, window: Duration) -> Load {
    let mut sum = Load::default();
    let mut n = 0.0;
    for s in recent(samples, now, window) {
        let l = spec.load(s);
        sum.requests += l.requests;
        sum.token_rate += l.token_rate;
        sum.kv_tokens += l.kv_tokens;
        n += 1.0;
    }
    if n > 0.0 {
        sum.requests /= n;
        sum.token_rate /= n;
        sum.kv_tokens /= n;
    }
    sum
}

/// The least growth that counts as a trend, as a share of the current level per third of the
/// stable window (below it, the thirds' means differ by noise).
const TREND_MIN_GROWTH: f64 = 0.05;

/// The current load carried `ahead` along its trend. The stable window is cut in thirds; a
/// trend is a rise from each third to the next by at least [`TREND_MIN_GROWTH`] of the latest
/// third's mean, the two rises within a factor of two of each other (so a step, which rises
/// mostly between two thirds, or noise is not taken for a ramp); it is the smaller rise. The latest third's mean is carried ahead by
/// that slope over `ahead` plus half a third (the mean stands for the middle of its third).
/// Never below `floor`, never above twice the latest third's mean.
fn extrapolate(
    spec: &ScalingSpec,
    samples: &[Sample],
    now: Duration,
    floor: f64,
    ahead: Duration,
) -> f64 {
    let third = spec.stable_window / 3;
    if third.is_zero() {
        return floor;
    }
    let mean = |end: Duration| {
        let (sum, n) = recent(samples, end, third).fold((0.0, 0.0), |(sum, n), s| {
            (sum + spec.load(s).max().1, n + 1.0)
        });
        (n > 0.0).then(|| sum / n)
    };
    let (Some(m3), Some(m2), Some(m1)) = (
        mean(now),
        now.checked_sub(third).and_then(mean),
        now.checked_sub(2 * third).and_then(mean),
    ) else {
        return floor;
    };
    let (late, early) = (m3 - m2, m2 - m1);
    let growth = late.min(early);
    // A ramp rises about evenly; a step caught across a boundary rises mostly in one third.
    if growth <= TREND_MIN_GROWTH * m3 || growth < 0.5 * late.max(early) {
        return floor;
    }
    let steps = (ahead + third / 2).as_secs_f64() / third.as_secs_f64();
    (m3 + growth * steps).min(2.0 * m3).max(floor)
}

/// Share of demand kept above it when scaling down.
const SCALE_DOWN_HEADROOM: f64 = 0.1;

/// The panic window's demand in executors. With a token capacity: what the arrival rate needs
/// plus what clears the queued work within one cold start, so a queue that grows while
/// executors boot does not count again and again; without one, the largest signal. The queued
/// share of the tokens held is taken pro rata by request count (gateways report the tokens of
/// queued and running requests together).
fn panic_demand(spec: &ScalingSpec, obs: &Observations<'_>, panic: Load) -> f64 {
    let (Some(c), Some(s)) = (spec.capacity, obs.samples.last()) else {
        return panic.max().1;
    };
    let horizon = obs
        .cold_start
        .unwrap_or(spec.panic_window)
        .max(spec.panic_window);
    let held = c.seconds(s.prompt_tokens as f64, s.decode_tokens as f64);
    let queued = s.queued as f64 / (s.queued + s.in_flight).max(1) as f64;
    panic.token_rate + held * queued / horizon.as_secs_f64()
}

/// Seconds the `capacity` live executors need for the work the latest sample holds (prompt
/// tokens to prefill and decode tokens to generate), or `None` without a token capacity.
fn backlog_seconds(spec: &ScalingSpec, samples: &[Sample], capacity: u32) -> Option<f64> {
    let c = spec.capacity?;
    let s = samples.last()?;
    let work = c.seconds(s.prompt_tokens as f64, s.decode_tokens as f64);
    Some(work / capacity.max(1) as f64)
}

/// Bursts that follow the previous one within this time recur: a stable window for the panic
/// to end, a cold start for an executor launched then to boot, and `idle_ttl` it would be kept
/// idle anyway. A panic among recurring bursts launches even for a backlog that drains before a
/// boot, and holds what it launched for this long after its last burst.
fn recurrence(spec: &ScalingSpec, cold_start: Option<Duration>) -> Duration {
    spec.stable_window + cold_start.unwrap_or_default() + spec.idle_ttl
}

/// Rounds executors up, forgiving float noise just above a whole number.
fn executors(load: f64) -> u32 {
    (load - 1e-9).ceil().max(0.0) as u32
}

pub fn decide(spec: &ScalingSpec, obs: &Observations<'_>) -> Decision {
    let now = obs.now;
    let live = |c: Class| {
        obs.executors
            .iter()
            .filter(|e| e.class == c && e.phase != Phase::Draining)
            .count() as u32
    };
    let (warm_now, eph_now) = (live(Class::Warm), live(Class::Ephemeral));
    let capacity = warm_now + eph_now;

    let stable_load = average(spec, obs.samples, now, spec.stable_window);
    let panic_load = average(spec, obs.samples, now, spec.panic_window);
    let (signal, stable_level) = stable_load.max();
    let panic_level = executors(panic_demand(spec, obs, panic_load));
    let ahead = match obs.cold_start {
        Some(cold) if spec.lookahead => extrapolate(spec, obs.samples, now, stable_level, cold),
        _ => stable_level,
    };
    let stable = executors(stable_level);
    let latest_queued = obs
        .samples
        .last()
        .filter(|s| s.at + spec.panic_window > now)
        .map_or(0, |s| s.queued);

    // Panic mode: entered when panic-window demand reaches the threshold over capacity; kept
    // until a whole stable window passes without it.
    let mut memory = obs.memory;
    let panicking_now =
        panic_level > 0 && panic_level as f64 >= spec.panic_threshold * capacity.max(1) as f64;
    // A burst is panic-level demand over what the stable window asks for, whatever the
    // capacity now (a pool held for bursts still sees them).
    let bursting =
        panic_level > 0 && panic_level as f64 >= spec.panic_threshold * stable.max(1) as f64;
    let recurrence = recurrence(spec, obs.cold_start);
    if panicking_now && memory.panic_since.is_none() {
        memory.recurring = memory
            .last_burst
            .is_some_and(|t| now.saturating_sub(t) <= recurrence);
    }
    if panicking_now {
        memory.panic_since = Some(now);
    } else if memory.panic_since.is_some_and(|t| {
        let hold = if memory.recurring {
            recurrence
        } else {
            spec.stable_window
        };
        now.saturating_sub(t) >= hold
    }) {
        memory.panic_since = None;
        memory.panic_peak = 0;
        memory.recurring = false;
    }
    if panicking_now || bursting {
        memory.last_burst = Some(now);
    }
    let in_panic = memory.panic_since.is_some();

    // A burst whose backlog the live executors clear before a new one could boot is not worth
    // a launch: those executors would arrive to an empty queue. Unless bursts recur: then the
    // executor launched now is held for the next one.
    let outlasts_boot = memory.recurring
        || match (obs.cold_start, backlog_seconds(spec, obs.samples, capacity)) {
            (Some(cold), Some(clear)) => clear > cold.as_secs_f64(),
            _ => true,
        };
    let (mut desired, mut reason) = if in_panic && (outlasts_boot || capacity == 0) {
        let d = panic_level.max(memory.panic_peak).max(capacity).max(stable);
        (d, Reason::Panic)
    } else if in_panic {
        (capacity.max(stable), Reason::Panic)
    } else if executors(ahead) > stable && executors(ahead) > capacity {
        (executors(ahead), Reason::Lookahead)
    } else {
        (stable, Reason::Stable)
    };
    // Scale from zero without waiting for a window.
    if capacity == 0 && latest_queued > 0 {
        desired = desired.max(1);
        reason = Reason::ScaleFromZero;
    }

    // Rate bounds relative to current capacity.
    if capacity > 0 {
        let up = ((capacity as f64 * spec.max_scale_up_rate).ceil() as u32).max(capacity + 1);
        let down = (capacity as f64 / spec.max_scale_down_rate.max(1.0)).floor() as u32;
        desired = desired.clamp(down, up);
    }
    if desired > spec.max_replicas {
        desired = spec.max_replicas;
        reason = Reason::MaxReplicas;
    }
    if desired < spec.min_warm {
        desired = spec.min_warm;
        if reason != Reason::ScaleFromZero {
            reason = Reason::WarmFloor;
        }
    }
    if in_panic {
        memory.panic_peak = memory.panic_peak.max(desired);
    }

    // Scale-down keeps a margin over the demand (hysteresis against the scale-up threshold), and
    // only once the excess has lasted `idle_ttl`; until then the pool holds.
    if desired < capacity {
        let keep = executors(stable_level.max(panic_load.max().1) * (1.0 + SCALE_DOWN_HEADROOM));
        desired = desired.max(keep).min(capacity);
    }
    if desired < capacity {
        let since = *memory.excess_since.get_or_insert(now);
        if now.saturating_sub(since) < spec.idle_ttl {
            desired = capacity;
        }
    } else {
        memory.excess_since = None;
    }

    let warm = spec.min_warm.min(spec.max_replicas);
    let drain = if desired < capacity {
        choose_drains(
            obs.executors,
            capacity - desired,
            warm_now.saturating_sub(warm),
        )
    } else {
        Vec::new()
    };
    let drained = |c: Class| {
        drain
            .iter()
            .filter(|id| obs.executors.iter().any(|e| &e.id == *id && e.class == c))
            .count() as u32
    };
    let ephemeral = if desired < capacity {
        eph_now - drained(Class::Ephemeral)
    } else {
        desired.saturating_sub(warm)
    };
    if !drain.is_empty() {
        // The excess lasts on (it is still there while the drained ones finish), so the next
        // decision may take the next step the rate allows.
        reason = Reason::ScaleDown;
    }
    // A stable decision that changes nothing is a hold; panic, caps and scale-from-zero keep
    // their reason so SREs can see what holds the pool where it is.
    if warm + ephemeral == capacity
        && warm == warm_now
        && drain.is_empty()
        && reason == Reason::Stable
    {
        reason = Reason::Hold;
    }
    Decision {
        warm,
        ephemeral,
        drain,
        reason,
        signal,
        inputs: Inputs {
            stable: stable_load,
            panic: panic_load,
            ahead,
            capacity,
        },
        memory,
    }
}

/// Up to `count` executors to drain: ready ones only (starting ones are coming capacity),
/// ephemeral before warm (and warm only beyond the floor, `spare_warm` of them), then fewest in
/// flight, then longest idle.
fn choose_drains(executors: &[ExecutorView], count: u32, spare_warm: u32) -> Vec<String> {
    let mut ready: Vec<&ExecutorView> = executors
        .iter()
        .filter(|e| e.phase == Phase::Ready)
        .collect();
    ready.sort_by_key(|e| {
        (
            e.class == Class::Warm,
            e.in_flight,
            e.idle_since.unwrap_or(Duration::MAX),
            e.id.clone(),
        )
    });
    let mut warm_left = spare_warm;
    let mut out = Vec::new();
    for e in ready {
        if out.len() as u32 == count {
            break;
        }
        if e.class == Class::Warm {
            if warm_left == 0 {
                continue;
            }
            warm_left -= 1;
        }
        out.push(e.id.clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use llmctl_protocol::routing::{self, Candidate};

    const SEC: Duration = Duration::from_secs(1);

    /// A pool simulated in whole seconds: executors take `startup` to become ready, `demand`
    /// concurrent requests are placed one by one as the gateway places them (least outstanding,
    /// `routing::pick`, up to `2 x target_concurrency` each), what finds no slot is queued, and
    /// every decision is applied at once (drained executors leave at once).
    struct Sim {
        spec: ScalingSpec,
        now: Duration,
        startup: Duration,
        executors: Vec<(ExecutorView, Duration)>,
        samples: Vec<Sample>,
        memory: Memory,
        next_id: u32,
        launched: u32,
        decisions: Vec<Decision>,
        /// Tokens each request weighs (prompt, expected decode).
        tokens: (u64, u64),
    }

    impl Sim {
        fn new(spec: ScalingSpec, startup: Duration) -> Self {
            Self {
                spec,
                now: Duration::ZERO,
                startup,
                executors: Vec::new(),
                samples: Vec::new(),
                memory: Memory::default(),
                next_id: 0,
                launched: 0,
                decisions: Vec::new(),
                tokens: (0, 0),
            }
        }

        fn count(&self, class: Class) -> u32 {
            self.executors
                .iter()
                .filter(|(e, _)| e.class == class)
                .count() as u32
        }

        fn ready(&self) -> u32 {
            self.executors
                .iter()
                .filter(|(e, _)| e.phase == Phase::Ready)
                .count() as u32
        }

        fn launch(&mut self, class: Class) {
            self.next_id += 1;
            self.launched += 1;
            let e = ExecutorView {
                id: format!("e{:03}", self.next_id),
                class,
                phase: Phase::Starting,
                in_flight: 0,
                idle_since: None,
            };
            self.executors.push((e, self.now + self.startup));
        }

        /// Places `demand` requests over the ready executors; returns how many found no slot.
        fn spread(&mut self, demand: u32) -> u32 {
            let cap = (2.0 * self.spec.target_concurrency) as usize;
            for (e, _) in &mut self.executors {
                e.in_flight = 0;
            }
            let mut queued = 0;
            for _ in 0..demand {
                let addresses: Vec<String> =
                    self.executors.iter().map(|(e, _)| e.id.clone()).collect();
                let candidates: Vec<Candidate<'_>> = self
                    .executors
                    .iter()
                    .enumerate()
                    .filter(|(_, (e, _))| e.phase == Phase::Ready && (e.in_flight as usize) < cap)
                    .map(|(index, (e, _))| Candidate {
                        index,
                        address: &addresses[index],
                        outstanding: e.in_flight as usize,
                    })
                    .collect();
                match routing::pick(&candidates, None) {
                    Some(i) => self.executors[i].0.in_flight += 1,
                    None => queued += 1,
                }
            }
            let now = self.now;
            for (e, _) in &mut self.executors {
                e.idle_since = if e.in_flight > 0 {
                    None
                } else {
                    e.idle_since.or(Some(now))
                };
            }
            queued
        }

        /// One second with `demand` requests wanting service; returns the decision.
        fn tick(&mut self, demand: u32) -> Decision {
            for (e, ready_at) in &mut self.executors {
                if e.phase == Phase::Starting && self.now >= *ready_at {
                    e.phase = Phase::Ready;
                    e.idle_since = Some(self.now);
                }
            }
            let queued = self.spread(demand);
            let (prompt, decode) = self.tokens;
            self.samples.push(Sample {
                at: self.now,
                queued,
                in_flight: demand - queued,
                prompt_tokens: prompt * demand as u64,
                decode_tokens: decode * demand as u64,
                ..Sample::default()
            });
            let views: Vec<ExecutorView> = self.executors.iter().map(|(e, _)| e.clone()).collect();
            let d = decide(
                &self.spec,
                &Observations {
                    now: self.now,
                    samples: &self.samples,
                    executors: &views,
                    cold_start: Some(self.startup),
                    memory: self.memory,
                },
            );
            self.memory = d.memory;
            self.executors.retain(|(e, _)| !d.drain.contains(&e.id));
            for _ in self.count(Class::Warm)..d.warm {
                self.launch(Class::Warm);
            }
            for _ in self.count(Class::Ephemeral)..d.ephemeral {
                self.launch(Class::Ephemeral);
            }
            self.now += SEC;
            self.decisions.push(d.clone());
            d
        }

        fn run(&mut self, seconds: u32, demand: impl Fn(u32) -> u32) {
            for s in 0..seconds {
                self.tick(demand(s));
            }
        }
    }

    fn spec(min_warm: u32, max_replicas: u32, target: f64) -> ScalingSpec {
        ScalingSpec {
            min_warm,
            max_replicas,
            target_concurrency: target,
            ..ScalingSpec::default()
        }
    }

    #[test]
    fn the_first_queued_request_scales_from_zero_at_once() {
        let mut sim = Sim::new(spec(0, 4, 4.0), 10 * SEC);
        assert_eq!(sim.tick(0).total(), 0, "nothing asked, nothing runs");
        let d = sim.tick(1);
        assert_eq!((d.total(), d.reason), (1, Reason::ScaleFromZero));
        // While it boots, the request still waits: no second executor for the same request.
        for _ in 0..9 {
            assert_eq!(sim.tick(1).total(), 1);
        }
        assert_eq!(sim.launched, 1);
    }

    #[test]
    fn starting_executors_count_as_capacity_so_slow_boots_do_not_overshoot() {
        let mut sim = Sim::new(
            ScalingSpec {
                panic_threshold: 100.0,
                ..spec(1, 10, 4.0)
            },
            60 * SEC,
        );
        sim.run(5, |_| 0);
        // 12 requests want 3 executors; boots take a minute, demand keeps queueing meanwhile.
        // The step is not a ramp: looking ahead (on by default) must not extrapolate it.
        sim.run(120, |_| 12);
        assert_eq!(
            sim.launched, 3,
            "launched {} executors for a demand of 3",
            sim.launched
        );
        assert_eq!(sim.ready(), 3);
    }

    #[test]
    fn a_burst_panics_up_to_max_replicas_and_holds_through_the_panic() {
        let mut sim = Sim::new(spec(1, 6, 4.0), 5 * SEC);
        sim.run(70, |_| 2);
        assert_eq!(sim.executors.len(), 1);
        // The panic window (6 s) averages the burst in: panic at once, max_replicas within it.
        let first = sim.tick(60);
        assert_eq!(first.reason, Reason::Panic, "{first:?}");
        assert!(first.total() > 1);
        sim.run(5, |_| 60);
        let d = sim.decisions.last().unwrap();
        assert_eq!(d.total(), 6, "{d:?}");
        assert!(
            sim.decisions
                .iter()
                .any(|d| d.reason == Reason::MaxReplicas),
            "the cap was what stopped it: {:?}",
            sim.decisions
                .iter()
                .rev()
                .take(7)
                .map(|d| (d.total(), d.reason))
                .collect::<Vec<_>>()
        );
        assert!(d.memory.panic_since.is_some());
        // A dip inside the panic does not scale down.
        sim.run(10, |_| 3);
        assert!(
            sim.decisions
                .iter()
                .rev()
                .take(10)
                .all(|d| d.total() == 6 && matches!(d.reason, Reason::Panic | Reason::MaxReplicas))
        );
        assert_eq!(sim.launched, 6, "never more than max_replicas");
    }

    #[test]
    fn scale_up_per_decision_is_bounded_by_the_rate() {
        let mut sim = Sim::new(
            ScalingSpec {
                max_scale_up_rate: 2.0,
                ..spec(2, 50, 1.0)
            },
            3 * SEC,
        );
        sim.run(10, |_| 1);
        let d = sim.tick(40);
        assert_eq!(d.total(), 4, "2 executors may at most double: {d:?}");
    }

    #[test]
    fn steady_load_does_not_flap() {
        let mut sim = Sim::new(spec(1, 20, 4.0), 10 * SEC);
        // 10 +- 2 in flight for 30 minutes.
        sim.run(1800, |s| 10 + [0, 2, 1, 0, 3, 1][s as usize % 6] - 1);
        let totals: Vec<u32> = sim
            .decisions
            .iter()
            .skip(120)
            .map(Decision::total)
            .collect();
        assert!(
            totals.windows(2).all(|w| w[0] == w[1]),
            "the executor count changed under steady load"
        );
        assert_eq!(totals[0], 3);
        assert!(sim.decisions.iter().all(|d| d.drain.is_empty()));
        assert_eq!(sim.launched, 3);
    }

    #[test]
    fn ephemeral_executors_leave_only_after_idle_ttl_down_to_the_warm_floor() {
        let s = ScalingSpec {
            idle_ttl: Duration::from_secs(120),
            ..spec(2, 8, 4.0)
        };
        let mut sim = Sim::new(s, 5 * SEC);
        sim.run(90, |_| 30);
        assert_eq!(sim.executors.len(), 8);
        // Load stops. The stable window has to drain, then the excess has to last idle_ttl.
        sim.run(119, |_| 0);
        assert_eq!(sim.executors.len(), 8, "nothing drained before idle_ttl");
        sim.run(200, |_| 0);
        assert_eq!(
            (sim.count(Class::Warm), sim.count(Class::Ephemeral)),
            (2, 0),
            "back to the warm floor"
        );
        assert!(sim.decisions.iter().any(|d| d.reason == Reason::ScaleDown));
        // Warm executors never drain however long they idle.
        sim.run(1000, |_| 0);
        assert_eq!(sim.count(Class::Warm), 2);
    }

    #[test]
    fn partial_load_spread_over_every_executor_still_scales_down_within_two_windows() {
        // The case that pinned the old autoscaler: 8 executors, demand for 2, and routing that
        // keeps every one of them busy, so none is ever idle.
        let s = ScalingSpec {
            idle_ttl: Duration::from_secs(30),
            ..spec(1, 8, 4.0)
        };
        let mut sim = Sim::new(s.clone(), 5 * SEC);
        sim.run(90, |_| 32);
        assert_eq!(sim.executors.len(), 8);
        let start = sim.decisions.len();
        sim.run(2 * 60, |_| 7);
        let after: Vec<&Decision> = sim.decisions[start..].iter().collect();
        assert_eq!(sim.executors.len(), 2, "what 7 requests at 4 each need");
        assert!(
            sim.executors.iter().all(|(e, _)| e.in_flight > 0),
            "spread routing keeps every executor busy, yet the pool shrank"
        );
        let scale_downs = after
            .iter()
            .filter(|d| d.reason == Reason::ScaleDown)
            .count();
        assert!((1..=3).contains(&scale_downs), "{scale_downs} steps down");
        // No direction reversal on the way down.
        let totals: Vec<u32> = after.iter().map(|d| d.total()).collect();
        assert!(totals.windows(2).all(|w| w[1] <= w[0]), "{totals:?}");
    }

    #[test]
    fn drains_pick_ready_ephemerals_with_fewest_in_flight_never_starting_or_the_floor() {
        let e = |id: &str, class, phase, in_flight, idle: Option<u64>| ExecutorView {
            id: id.into(),
            class,
            phase,
            in_flight,
            idle_since: idle.map(Duration::from_secs),
        };
        let executors = vec![
            e("warm-idle", Class::Warm, Phase::Ready, 0, Some(1)),
            e("booting", Class::Ephemeral, Phase::Starting, 0, None),
            e("busy", Class::Ephemeral, Phase::Ready, 5, None),
            e("light", Class::Ephemeral, Phase::Ready, 1, None),
            e("idle-short", Class::Ephemeral, Phase::Ready, 0, Some(90)),
            e("idle-long", Class::Ephemeral, Phase::Ready, 0, Some(10)),
        ];
        assert_eq!(
            choose_drains(&executors, 3, 0),
            ["idle-long", "idle-short", "light"]
        );
        assert_eq!(
            choose_drains(&executors, 9, 0).len(),
            4,
            "never the booting one"
        );
        assert_eq!(choose_drains(&executors, 9, 1).last().unwrap(), "warm-idle");
    }

    #[test]
    fn long_prompts_are_sized_by_tokens_not_by_request_count() {
        let capacity = Capacity {
            prefill_tokens_per_s: 10_000.0,
            decode_tokens_per_s: 1_000.0,
            kv_tokens: 100_000.0,
        };
        let base = ScalingSpec {
            capacity: Some(capacity),
            target_utilization: 1.0,
            ..spec(1, 20, 8.0)
        };
        // 4 requests: by count, one executor of 8; but each holds 60k tokens of KV.
        let mut sim = Sim::new(base.clone(), 5 * SEC);
        sim.tokens = (59_000, 1_000);
        // (Starting from zero, the first 236k queued prompt tokens are a burst worth more
        // executors for a while; the steady state is what counts here.)
        sim.run(400, |_| 4);
        let d = sim.decisions.last().unwrap();
        assert_eq!(d.signal, Signal::KvTokens, "{d:?}");
        assert_eq!(sim.executors.len(), 3, "240k tokens over 100k a piece");
        // Short prompts: the request count decides, as before.
        let mut sim = Sim::new(base, 5 * SEC);
        sim.tokens = (20, 100);
        sim.run(120, |_| 4);
        assert_eq!(sim.decisions.last().unwrap().signal, Signal::Requests);
        assert_eq!(sim.executors.len(), 1);
        // Token throughput: 2,500 decode tokens/s admitted need 3 executors of 1,000.
        let rate = ScalingSpec {
            capacity: Some(capacity),
            target_utilization: 1.0,
            ..spec(1, 20, 8.0)
        };
        let samples: Vec<Sample> = (0..60)
            .map(|s| Sample {
                at: s * SEC,
                in_flight: 4,
                decode_tokens_per_s: 2_500.0,
                ..Sample::default()
            })
            .collect();
        let d = decide(
            &rate,
            &Observations {
                now: 59 * SEC,
                samples: &samples,
                executors: &[],
                cold_start: None,
                memory: Memory::default(),
            },
        );
        assert_eq!((d.total(), d.signal), (3, Signal::TokenRate), "{d:?}");
    }

    #[test]
    fn kv_the_executors_report_in_use_counts_beside_the_gateways_estimate() {
        // 4 short requests by the gateways' estimate, but the 2 executors report their KV
        // caches 90% full (long contexts the gateway could not see): at 80% utilisation that is
        // 1.8 / 0.8 = 2.25 executors' worth, so 3, with or without a configured capacity.
        let samples = |kv_used: f64| -> Vec<Sample> {
            (0..60)
                .map(|s| Sample {
                    at: s * SEC,
                    in_flight: 4,
                    prompt_tokens: 400,
                    decode_tokens: 400,
                    kv_used,
                    ..Sample::default()
                })
                .collect()
        };
        let with_capacity = ScalingSpec {
            capacity: Some(Capacity {
                prefill_tokens_per_s: 10_000.0,
                decode_tokens_per_s: 1_000.0,
                kv_tokens: 100_000.0,
            }),
            ..spec(1, 20, 8.0)
        };
        for spec in [with_capacity, spec(1, 20, 8.0)] {
            let decide_at = |kv_used| {
                decide(
                    &spec,
                    &Observations {
                        now: 59 * SEC,
                        samples: &samples(kv_used),
                        executors: &[],
                        cold_start: None,
                        memory: Memory::default(),
                    },
                )
            };
            let d = decide_at(1.8);
            assert_eq!((d.total(), d.signal), (3, Signal::KvTokens), "{d:?}");
            // Nothing reported: the request count decides, as before.
            let d = decide_at(0.0);
            assert_eq!((d.total(), d.signal), (1, Signal::Requests), "{d:?}");
        }
    }

    #[test]
    fn a_ramp_is_met_ahead_by_the_cold_start() {
        // Demand rises by one request every 2 s for 4 minutes; boots take 40 s.
        let ramp = |s: u32| 4 + s.saturating_sub(60).min(240) / 2;
        let queued = |lookahead: bool| {
            let mut sim = Sim::new(
                ScalingSpec {
                    lookahead,
                    panic_threshold: 100.0,
                    ..spec(1, 40, 4.0)
                },
                40 * SEC,
            );
            sim.run(400, ramp);
            let waiting: u32 = sim.samples.iter().map(|s| s.queued).sum();
            (
                waiting,
                sim.decisions.iter().any(|d| d.reason == Reason::Lookahead),
            )
        };
        let ((ahead, looked), (behind, _)) = (queued(true), queued(false));
        assert!(looked, "the ramp was extrapolated");
        assert!(
            4 * ahead < 3 * behind,
            "request-seconds queued: {ahead} looking ahead, {behind} not"
        );
    }
}
