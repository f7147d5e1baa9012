//! The replay's simulation core: a pool of executors (the executor model's engine: continuous
//! batching with chunked prefill over a KV budget) behind one gateway queue (bounded, FIFO, each
//! entry with a deadline), in simulated time. The gateway places requests with the very
//! function it runs in production (`llmctl_protocol::routing::pick`: least outstanding, prefix
//! affinity), demand is sampled once a tick as the gateways report it, and the policy under test
//! decides once a tick: our autoscaler (`autoscaler::decide`, the code the reconciler runs), the
//! Knative KPA baseline (`autoscaler::kpa`), or a static pool. A drained executor gets nothing
//! new and stops when its last request ends.

use std::collections::VecDeque;
use std::time::Duration;

use llmctl_protocol::demand::{DEFAULT_MAX_TOKENS, DecodeHistory};
use llmctl_protocol::routing::{self, Candidate};

use super::executor::ExecutorModel;
use super::trace::TraceRequest;
use crate::autoscaler::{
    self, Class, ExecutorView, Memory, Observations, Phase, Sample, ScalingSpec,
    kpa::{self, KpaSpec, KpaState},
};

/// Time resolution of arrivals and dispatch (engine steps are timed exactly).
const QUANTUM: f64 = 0.01;

#[derive(Clone, Debug, PartialEq)]
pub enum Policy {
    Llmctl,
    Kpa(KpaSpec),
    Static(u32),
}

impl Policy {
    pub fn name(&self) -> String {
        match self {
            Self::Llmctl => "llmctl".into(),
            Self::Kpa(_) => "kpa".into(),
            Self::Static(n) => format!("static:{n}"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The pool's scaling (its `capacity` filled from the executor model if it had none).
    pub scaling: ScalingSpec,
    /// Requests the gateway sends one executor at once.
    pub max_concurrency: usize,
    pub queue_deadline: Duration,
    pub queue_max: usize,
    /// Time between demand samples and decisions.
    pub tick: Duration,
    pub affinity: bool,
    /// Executors ready when the replay starts under an autoscaler (at least its floor): a trace
    /// starts with traffic under way, not with the pool at its floor.
    pub initial: u32,
}

/// What happened to one request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Fate {
    /// Seconds from arrival to first token.
    Served { ttft: f64 },
    /// The queue was full, or the request cannot fit an executor's KV cache.
    Refused,
    /// Its queue deadline passed.
    TimedOut,
}

/// One tick of the run, for the plot.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Point {
    pub t: f64,
    /// Requests queued + in flight.
    pub demand: u32,
    /// Demand in executors as our autoscaler measures it (stable window, largest signal).
    pub demand_executors: f64,
    pub desired: u32,
    pub ready: u32,
    /// Age of the oldest queued request, seconds.
    pub queue_wait: f64,
}

#[derive(Clone, Debug, Default)]
pub struct Outcome {
    pub fates: Vec<Fate>,
    pub executor_seconds: f64,
    pub scale_ups: u32,
    pub scale_downs: u32,
    pub flaps: u32,
    pub launched: u32,
    pub timeline: Vec<Point>,
    /// When the last request ended.
    pub end: f64,
}

struct Running {
    req: usize,
    prefilled: u32,
    generated: u32,
}

struct Executor {
    id: String,
    address: String,
    class: Class,
    launched_at: f64,
    ready_at: f64,
    draining: bool,
    stopped_at: Option<f64>,
    /// Gateway slots taken (dispatched, not finished).
    outstanding: usize,
    waiting: VecDeque<usize>,
    running: Vec<Running>,
    kv_used: u64,
    /// The current engine step ends then (`None`: idle).
    step_end: Option<f64>,
    /// Prefill chunks of the current step, by running index.
    chunks: Vec<(usize, u32)>,
    idle_since: Option<f64>,
}

impl Executor {
    fn live(&self) -> bool {
        self.stopped_at.is_none() && !self.draining
    }

    fn ready(&self, t: f64) -> bool {
        self.stopped_at.is_none() && t >= self.ready_at
    }
}

pub struct Sim<'a> {
    config: &'a SimConfig,
    model: &'a ExecutorModel,
    trace: &'a [TraceRequest],
    policy: Policy,
    executors: Vec<Executor>,
    /// The gateway's queue: indexes into the trace.
    queue: VecDeque<usize>,
    fates: Vec<Option<Fate>>,
    t: f64,
    next_id: u32,
    samples: Vec<Sample>,
    memory: Memory,
    kpa: KpaState,
    /// What finished requests generated: the gateway's own estimator.
    history: DecodeHistory,
    /// Decode tokens each request was expected to generate when it arrived (the gateway fixes
    /// a request's estimate at admission); indexes follow the trace.
    expected: Vec<u32>,
    /// Tokens admitted since the last sample (prompt, expected decode).
    arrived: (f64, f64),
    last_desired: Option<u32>,
    last_change: Option<(f64, i8)>,
    out: Outcome,
}

impl<'a> Sim<'a> {
    pub fn new(
        config: &'a SimConfig,
        model: &'a ExecutorModel,
        trace: &'a [TraceRequest],
        policy: Policy,
    ) -> Self {
        let mut sim = Self {
            config,
            model,
            trace,
            policy,
            executors: Vec::new(),
            queue: VecDeque::new(),
            fates: vec![None; trace.len()],
            t: 0.0,
            next_id: 0,
            samples: Vec::new(),
            memory: Memory::default(),
            kpa: KpaState::default(),
            history: DecodeHistory::default(),
            expected: vec![0; trace.len()],
            arrived: (0.0, 0.0),
            last_desired: None,
            last_change: None,
            out: Outcome::default(),
        };
        // Autoscalers start where the trace's first minute needs them (at least their floor),
        // ready; a static pool starts whole.
        let (floor, initial) = match &sim.policy {
            Policy::Llmctl => (config.scaling.min_warm, config.initial),
            Policy::Kpa(k) => (k.min_scale, config.initial),
            Policy::Static(n) => (*n, *n),
        };
        for i in 0..initial.max(floor) {
            let class = if i < floor {
                Class::Warm
            } else {
                Class::Ephemeral
            };
            sim.launch(class, true);
        }
        sim.out.launched = 0;
        sim
    }

    fn launch(&mut self, class: Class, ready_now: bool) {
        self.next_id += 1;
        let cold = if ready_now {
            0.0
        } else {
            self.model.cold_start.as_secs_f64()
        };
        self.executors.push(Executor {
            id: format!("e{}", self.next_id),
            address: format!("10.0.{}.{}:8000", self.next_id / 256, self.next_id % 256),
            class,
            launched_at: self.t,
            ready_at: self.t + cold,
            draining: false,
            stopped_at: None,
            outstanding: 0,
            waiting: VecDeque::new(),
            running: Vec::new(),
            kv_used: 0,
            step_end: None,
            chunks: Vec::new(),
            idle_since: Some(self.t + cold),
        });
        self.out.launched += 1;
    }

    /// Runs the whole trace and until every request has ended.
    pub fn run(mut self) -> Outcome {
        let tick = self.config.tick.as_secs_f64();
        let mut next_arrival = 0;
        let mut next_tick = 0.0;
        loop {
            let t = self.t;
            while next_arrival < self.trace.len() && self.trace[next_arrival].at <= t {
                self.arrive(next_arrival);
                next_arrival += 1;
            }
            self.expire();
            self.dispatch();
            self.advance(t + QUANTUM);
            if t >= next_tick {
                self.decide();
                next_tick += tick;
            }
            self.stop_drained();
            let done = next_arrival == self.trace.len()
                && self.queue.is_empty()
                && self.executors.iter().all(|e| e.outstanding == 0);
            if done {
                break;
            }
            self.t += QUANTUM;
        }
        self.out.end = self.t;
        let end = self.t;
        self.out.executor_seconds = self
            .executors
            .iter()
            .map(|e| e.stopped_at.unwrap_or(end).min(end) - e.launched_at)
            .sum();
        self.out.fates = self
            .fates
            .into_iter()
            .map(|f| f.expect("every request ends before the run does"))
            .collect();
        self.out
    }

    fn arrive(&mut self, req: usize) {
        let r = &self.trace[req];
        self.arrived.0 += r.prompt_tokens as f64;
        // Trace requests name no `max_tokens`, like clients that leave it out.
        let expected = self.history.expect(None, DEFAULT_MAX_TOKENS, 1);
        self.expected[req] = expected;
        self.arrived.1 += f64::from(expected);
        let fits =
            u64::from(r.prompt_tokens) + u64::from(r.output_tokens.max(1)) <= self.model.kv_tokens;
        if !fits || self.queue.len() >= self.config.queue_max {
            self.fates[req] = Some(Fate::Refused);
            return;
        }
        self.queue.push_back(req);
    }

    fn expire(&mut self) {
        let deadline = self.config.queue_deadline.as_secs_f64();
        let t = self.t;
        let trace = self.trace;
        let fates = &mut self.fates;
        self.queue.retain(|&req| {
            let late = t - trace[req].at >= deadline;
            if late {
                fates[req] = Some(Fate::TimedOut);
            }
            !late
        });
    }

    /// The gateway: the head of the queue goes where `routing::pick` says, while anything can
    /// take it.
    fn dispatch(&mut self) {
        let t = self.t;
        while let Some(head) = self.queue.front() {
            let affinity = if self.config.affinity {
                self.trace[*head].affinity
            } else {
                None
            };
            let choice = {
                let candidates: Vec<Candidate<'_>> = self
                    .executors
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| {
                        e.ready(t) && !e.draining && e.outstanding < self.config.max_concurrency
                    })
                    .map(|(index, e)| Candidate {
                        index,
                        address: &e.address,
                        outstanding: e.outstanding,
                    })
                    .collect();
                routing::pick(&candidates, affinity)
            };
            let Some(i) = choice else {
                return;
            };
            let req = self.queue.pop_front().expect("the head exists");
            let e = &mut self.executors[i];
            e.outstanding += 1;
            e.idle_since = None;
            e.waiting.push_back(req);
            if e.step_end.is_none() {
                Self::start_step(e, self.model, self.trace, t);
            }
        }
    }

    /// Admits waiting requests and plans the next engine step starting at `t`.
    fn start_step(e: &mut Executor, model: &ExecutorModel, trace: &[TraceRequest], t: f64) {
        while let Some(&req) = e.waiting.front() {
            let r = &trace[req];
            let need = u64::from(r.prompt_tokens) + u64::from(r.output_tokens.max(1));
            if e.running.len() as u32 >= model.max_running || e.kv_used + need > model.kv_tokens {
                break;
            }
            e.waiting.pop_front();
            e.kv_used += need;
            e.running.push(Running {
                req,
                prefilled: 0,
                generated: 0,
            });
        }
        // Decoding requests (their first token out), and the attention pairs of their tokens:
        // each sees its whole context.
        let (decoders, decode_pairs) =
            e.running
                .iter()
                .filter(|r| r.generated > 0)
                .fold((0u32, 0.0), |(n, pairs), r| {
                    (
                        n + 1,
                        pairs + f64::from(trace[r.req].prompt_tokens + r.generated),
                    )
                });
        let mut budget = model.max_batched_tokens.saturating_sub(decoders);
        e.chunks.clear();
        for (i, r) in e.running.iter().enumerate() {
            if budget == 0 {
                break;
            }
            let left = trace[r.req].prompt_tokens.saturating_sub(r.prefilled);
            if r.generated == 0 {
                // A zero-token prompt still takes one step to produce its first token.
                let chunk = left.min(budget);
                e.chunks.push((i, chunk));
                budget -= chunk;
            }
        }
        let prefill: u32 = e.chunks.iter().map(|c| c.1).sum();
        if decoders == 0 && e.chunks.is_empty() {
            e.step_end = None;
            return;
        }
        // A chunk's tokens see the prefix before it and the chunk's earlier tokens.
        let prefill_pairs: f64 = e
            .chunks
            .iter()
            .map(|&(i, n)| f64::from(n) * (f64::from(e.running[i].prefilled) + f64::from(n) / 2.0))
            .sum();
        let seconds = model.step_seconds(decoders, prefill, decode_pairs + prefill_pairs);
        e.step_end = Some(t + seconds.max(1e-6));
    }

    /// Runs every executor's engine up to `until`.
    fn advance(&mut self, until: f64) {
        for e in &mut self.executors {
            while let Some(end) = e.step_end.filter(|&end| end <= until) {
                let overhead = self.model.first_token_overhead.as_secs_f64();
                let finished = Self::end_step(e, self.trace, &mut self.fates, end, overhead);
                for output in finished {
                    self.history.record(output.into(), 1);
                }
                Self::start_step(e, self.model, self.trace, end);
                if e.step_end.is_none() && e.outstanding == 0 {
                    e.idle_since = Some(end);
                }
            }
        }
    }

    /// Applies a finished step at time `end`; returns the output lengths of the requests that
    /// completed.
    fn end_step(
        e: &mut Executor,
        trace: &[TraceRequest],
        fates: &mut [Option<Fate>],
        end: f64,
        overhead: f64,
    ) -> Vec<u32> {
        let chunks = std::mem::take(&mut e.chunks);
        for r in e.running.iter_mut() {
            if r.generated > 0 {
                r.generated += 1;
            }
        }
        for (i, chunk) in chunks {
            let r = &mut e.running[i];
            r.prefilled += chunk;
            if r.prefilled >= trace[r.req].prompt_tokens {
                r.generated = 1;
                fates[r.req] = Some(Fate::Served {
                    ttft: end - trace[r.req].at + overhead,
                });
            }
        }
        let mut finished = Vec::new();
        let (kv_used, outstanding) = (&mut e.kv_used, &mut e.outstanding);
        e.running.retain(|r| {
            let tr = &trace[r.req];
            let done = r.generated > 0 && r.generated >= tr.output_tokens.max(1);
            if done {
                finished.push(tr.output_tokens);
                *kv_used -= u64::from(tr.prompt_tokens) + u64::from(tr.output_tokens.max(1));
                *outstanding -= 1;
            }
            !done
        });
        e.step_end = None;
        finished
    }

    fn stop_drained(&mut self) {
        let t = self.t;
        for e in &mut self.executors {
            if e.draining && e.stopped_at.is_none() && e.outstanding == 0 {
                e.stopped_at = Some(t);
            }
        }
    }

    /// The demand sample the gateways would report now.
    fn sample(&mut self) -> Sample {
        let tick = self.config.tick.as_secs_f64();
        let queued = self.queue.len() as u32;
        let in_flight: u32 = self.executors.iter().map(|e| e.outstanding as u32).sum();
        // Prompt and expected decode tokens of every request queued or on an executor.
        let live = self
            .queue
            .iter()
            .copied()
            .chain(self.executors.iter().flat_map(|e| {
                e.waiting
                    .iter()
                    .copied()
                    .chain(e.running.iter().map(|r| r.req))
            }));
        let (mut prompt, mut decode) = (0u64, 0u64);
        for r in live {
            prompt += u64::from(self.trace[r].prompt_tokens);
            decode += u64::from(self.expected[r]);
        }
        let s = Sample {
            at: Duration::from_secs_f64(self.t),
            queued,
            in_flight,
            prompt_tokens: prompt,
            decode_tokens: decode,
            prompt_tokens_per_s: self.arrived.0 / tick,
            decode_tokens_per_s: self.arrived.1 / tick,
            // What the executors' /metrics would say: each one's share of its KV in use.
            kv_used: self
                .executors
                .iter()
                .map(|e| e.kv_used as f64 / self.model.kv_tokens.max(1) as f64)
                .sum(),
        };
        self.arrived = (0.0, 0.0);
        s
    }

    fn views(&self) -> Vec<ExecutorView> {
        let t = self.t;
        self.executors
            .iter()
            .filter(|e| e.stopped_at.is_none())
            .map(|e| ExecutorView {
                id: e.id.clone(),
                class: e.class,
                phase: if e.draining {
                    Phase::Draining
                } else if e.ready(t) {
                    Phase::Ready
                } else {
                    Phase::Starting
                },
                in_flight: e.outstanding as u32,
                idle_since: e.idle_since.map(|s| Duration::from_secs_f64(s.max(0.0))),
            })
            .collect()
    }

    /// One tick: sample demand, ask the policy, act on its answer, record the point.
    fn decide(&mut self) {
        let sample = self.sample();
        self.samples.push(sample);
        let keep = self.config.scaling.stable_window;
        let now = sample.at;
        let cut = self
            .samples
            .iter()
            .position(|s| now.saturating_sub(s.at) <= keep)
            .unwrap_or(0);
        self.samples.drain(..cut);
        let t = self.t;
        let live = |s: &Self, c: Class| {
            s.executors
                .iter()
                .filter(|e| e.class == c && e.live())
                .count() as u32
        };
        let desired = match self.policy.clone() {
            Policy::Llmctl => {
                let views = self.views();
                let d = autoscaler::decide(
                    &self.config.scaling,
                    &Observations {
                        now,
                        samples: &self.samples,
                        executors: &views,
                        cold_start: Some(self.model.cold_start),
                        memory: self.memory,
                    },
                );
                self.memory = d.memory;
                if Some(d.total()) != self.last_desired || !d.drain.is_empty() {
                    tracing::debug!(t, total = d.total(), reason = d.reason.as_str(), signal = d.signal.as_str(), inputs = ?d.inputs, "replay decision");
                }
                for id in &d.drain {
                    if let Some(e) = self.executors.iter_mut().find(|e| &e.id == id) {
                        e.draining = true;
                    }
                }
                for (class, target) in [(Class::Warm, d.warm), (Class::Ephemeral, d.ephemeral)] {
                    for _ in live(self, class)..target {
                        self.launch(class, false);
                    }
                }
                d.total()
            }
            Policy::Kpa(spec) => {
                let ready = self
                    .executors
                    .iter()
                    .filter(|e| e.live() && e.ready(t))
                    .count() as u32;
                let desired = kpa::decide(&spec, &mut self.kpa, now, &self.samples, ready);
                let have = live(self, Class::Warm) + live(self, Class::Ephemeral);
                for _ in have..desired {
                    self.launch(Class::Ephemeral, false);
                }
                if desired < have {
                    self.remove_like_a_replicaset(have - desired);
                }
                desired
            }
            Policy::Static(n) => n,
        };
        self.count_change(desired);
        let demand_executors = self.config.scaling.load(&sample).max().1.max(0.0);
        let queue_wait = self.queue.front().map_or(0.0, |&r| t - self.trace[r].at);
        self.out.timeline.push(Point {
            t,
            demand: sample.queued + sample.in_flight,
            demand_executors,
            desired,
            ready: self
                .executors
                .iter()
                .filter(|e| e.live() && e.ready(t))
                .count() as u32,
            queue_wait,
        });
    }

    /// Kubernetes' ReplicaSet scale-down order: pods not ready first, then the newest.
    fn remove_like_a_replicaset(&mut self, mut count: u32) {
        let t = self.t;
        let mut order: Vec<usize> = (0..self.executors.len())
            .filter(|&i| self.executors[i].live())
            .collect();
        order.sort_by(|&a, &b| {
            let (ea, eb) = (&self.executors[a], &self.executors[b]);
            (ea.ready(t), std::cmp::Reverse(ea.launched_at.to_bits()))
                .cmp(&(eb.ready(t), std::cmp::Reverse(eb.launched_at.to_bits())))
        });
        for i in order {
            if count == 0 {
                break;
            }
            let e = &mut self.executors[i];
            if e.ready(t) {
                e.draining = true;
            } else {
                e.stopped_at = Some(t);
            }
            count -= 1;
        }
    }

    /// Counts scale-ups, scale-downs and flaps (a reversal within one stable window).
    fn count_change(&mut self, desired: u32) {
        let Some(before) = self.last_desired.replace(desired) else {
            return;
        };
        if desired == before {
            return;
        }
        let direction: i8 = if desired > before { 1 } else { -1 };
        if direction > 0 {
            self.out.scale_ups += 1;
        } else {
            self.out.scale_downs += 1;
        }
        let window = self.config.scaling.stable_window.as_secs_f64();
        if let Some((at, previous)) = self.last_change
            && previous != direction
            && self.t - at < window
        {
            self.out.flaps += 1;
        }
        self.last_change = Some((self.t, direction));
    }
}

/// Static provisioning at the trace's peak: the most executors any minute of the trace needs
/// for its prompt and output tokens at the executor model's rates and the pool's target
/// utilisation, within the pool's `max_replicas`.
pub fn peak_executors(trace: &[TraceRequest], model: &ExecutorModel, scaling: &ScalingSpec) -> u32 {
    let minute = 60.0;
    let c = model.capacity();
    let mut busiest: f64 = 0.0;
    let mut start = 0;
    let mut work = 0.0;
    let cost = |r: &TraceRequest| c.seconds(r.prompt_tokens as f64, r.output_tokens as f64);
    for r in trace {
        work += cost(r);
        while trace[start].at <= r.at - minute {
            work -= cost(&trace[start]);
            start += 1;
        }
        busiest = busiest.max(work);
    }
    let util = scaling.target_utilization.clamp(0.01, 1.0);
    ((busiest / minute / util).ceil() as u32).clamp(1, scaling.max_replicas.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> ExecutorModel {
        ExecutorModel::parse(
            r#"
            cold_start_secs = 20
            prefill_tokens_per_s = 5000.0
            decode_tokens_per_s = [[1, 50.0], [8, 300.0], [32, 800.0]]
            max_running = 32
            kv_tokens = 50000
            "#,
            "test",
        )
        .unwrap()
    }

    fn config(model: &ExecutorModel) -> SimConfig {
        SimConfig {
            scaling: ScalingSpec {
                min_warm: 1,
                max_replicas: 16,
                target_concurrency: 16.0,
                idle_ttl: Duration::from_secs(30),
                capacity: Some(model.capacity()),
                ..ScalingSpec::default()
            },
            max_concurrency: 32,
            queue_deadline: Duration::from_secs(60),
            queue_max: 10_000,
            tick: Duration::from_secs(1),
            affinity: true,
            initial: 1,
        }
    }

    /// `rate(t)` requests a second for `seconds`, evenly spaced, 200 prompt and 50 output
    /// tokens each.
    fn trace(seconds: u32, rate: impl Fn(u32) -> u32) -> Vec<TraceRequest> {
        let mut out = Vec::new();
        for s in 0..seconds {
            let n = rate(s);
            for i in 0..n {
                out.push(TraceRequest {
                    at: s as f64 + i as f64 / n as f64,
                    prompt_tokens: 200,
                    output_tokens: 50,
                    affinity: Some(u64::from(i % 7)),
                });
            }
        }
        out
    }

    fn ttfts(o: &Outcome) -> Vec<f64> {
        o.fates
            .iter()
            .filter_map(|f| match f {
                Fate::Served { ttft } => Some(*ttft),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_static_pool_serves_everything_and_never_scales() {
        let m = model();
        let c = config(&m);
        let t = trace(120, |_| 4);
        let o = Sim::new(&c, &m, &t, Policy::Static(2)).run();
        assert_eq!(o.fates.len(), t.len());
        assert_eq!(ttfts(&o).len(), t.len(), "every request served");
        assert_eq!((o.scale_ups, o.scale_downs, o.launched), (0, 0, 0));
        // Two executors for the whole run.
        assert!((o.executor_seconds - 2.0 * o.end).abs() < 1e-6, "{o:?}");
        // Unloaded, a first token takes at least one prefill step: 200 tokens at 5,000/s.
        assert!(ttfts(&o).iter().all(|&x| x >= 0.04 - 1e-9));
    }

    #[test]
    fn our_autoscaler_follows_a_step_up_and_back_down_without_losing_a_request() {
        let m = model();
        let c = config(&m);
        // 2/s, then 30/s for four minutes, then 2/s: the pool grows and drains back. The step
        // comes after three minutes, once the gateway's decode estimate has left its cold
        // ceiling (512 tokens a request until 16 have finished, which sizes the first minute
        // for twice the executors) and the pool has settled.
        let t = trace(720, |s| if (180..420).contains(&s) { 30 } else { 2 });
        let o = Sim::new(&c, &m, &t, Policy::Llmctl).run();
        assert_eq!(ttfts(&o).len(), t.len(), "every request served");
        let peak = o.timeline.iter().map(|p| p.ready).max().unwrap();
        assert!(peak >= 3, "scaled up to {peak}");
        let last = o.timeline.last().unwrap();
        assert!(last.ready <= 2, "drained back: {last:?}");
        assert!(o.scale_downs >= 1);
        assert_eq!(
            o.flaps, 0,
            "no reversal within a stable window on a clean step"
        );
    }

    #[test]
    fn a_burst_shorter_than_a_boot_is_absorbed_but_recurring_bursts_are_met() {
        let m = model();
        let c = config(&m);
        // 1/s with 3 s bursts of 20/s, 1,000 prompt and 10 output tokens each: a burst is
        // about 13 s of one executor's work, enough to panic (more than twice one executor over
        // the 6 s panic window) but cleared within the 20 s boot, so a lone burst launches
        // nothing. (The first minute is sized by the gateway's cold decode estimate, 512 tokens a
        // request, which launches one executor at the start; it is gone by the first burst.)
        let trace = |starts: &[u32]| -> Vec<TraceRequest> {
            let mut out = Vec::new();
            for s in 0..600 {
                let n = if starts.iter().any(|&b| (b..b + 3).contains(&s)) {
                    20
                } else {
                    1
                };
                out.extend((0..n).map(|i| TraceRequest {
                    at: s as f64 + i as f64 / n as f64,
                    prompt_tokens: 1000,
                    output_tokens: 10,
                    affinity: None,
                }));
            }
            out
        };
        let lone = trace(&[120]);
        let o = Sim::new(&c, &m, &lone, Policy::Llmctl).run();
        assert_eq!(ttfts(&o).len(), lone.len(), "every request served");
        let desired_from = |o: &Outcome, t: usize| o.timeline[t..].iter().map(|p| p.desired).max();
        assert_eq!(desired_from(&o, 110), Some(1), "a lone burst is absorbed");
        // The same bursts every 80 s, within a stable window, a boot and idle_ttl of each
        // other: the second panics and launches although its backlog drains before a boot, and
        // what it launched is held for the third. The third, absorbed by held executors, does
        // not panic and so does not extend the hold: the fourth panics and launches again, and
        // the fifth is met.
        let starts = [120, 200, 280, 360, 440];
        let recurring = trace(&starts);
        let o = Sim::new(&c, &m, &recurring, Policy::Llmctl).run();
        assert_eq!(ttfts(&o).len(), recurring.len(), "every request served");
        let ready_at = |t: u32| o.timeline[t as usize].ready;
        assert_eq!(ready_at(119), 1, "one executor before the bursts");
        for b in [280, 440] {
            assert!(ready_at(b) >= 2, "burst at {b} met by {}", ready_at(b));
        }
        let last = o.timeline.last().unwrap();
        assert_eq!(last.ready, 1, "given back once the bursts stop");
    }

    #[test]
    fn kpa_and_static_peak_run_the_same_trace() {
        let m = model();
        let c = config(&m);
        let t = trace(300, |s| if s % 100 < 50 { 20 } else { 2 });
        let peak = peak_executors(&t, &m, &c.scaling);
        assert!(peak >= 2, "{peak}");
        let kpa = Policy::Kpa(KpaSpec::knative_defaults(32.0, 1, 16));
        for p in [kpa, Policy::Static(peak)] {
            let o = Sim::new(&c, &m, &t, p).run();
            assert_eq!(o.fates.len(), t.len());
            assert!(o.executor_seconds > 0.0);
        }
    }

    #[test]
    fn a_full_queue_refuses_and_a_late_one_times_out() {
        let m = model();
        let mut c = config(&m);
        c.queue_max = 5;
        c.queue_deadline = Duration::from_secs(1);
        // 400 requests in one second against one executor of 32 slots.
        let t = trace(1, |_| 400);
        let o = Sim::new(&c, &m, &t, Policy::Static(1)).run();
        let refused = o.fates.iter().filter(|f| **f == Fate::Refused).count();
        let late = o.fates.iter().filter(|f| **f == Fate::TimedOut).count();
        assert!(refused > 300, "{refused}");
        assert!(late > 0, "{late}");
        assert_eq!(o.fates.len(), 400);
    }
}
