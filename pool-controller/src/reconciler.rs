//! The reconciler of one pool, as an actor: it owns the pool's executor records, keeps the
//! demand samples the gateways report, asks the autoscaler for a decision on every tick, and
//! drives the provider to it (launch what is missing, drain what is reaped). Executors that die
//! unexpectedly are replaced by the next decision, after an exponential backoff so a crashing
//! executor does not spin. Ready endpoints are published on a watch channel (the gateways'
//! endpoint set).

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::autoscaler::{
    self, Class, Decision, ExecutorView, Memory, Observations, Phase, Sample, ScalingSpec,
};
use crate::provider::ExecutorEvent;
use crate::provider::local::LocalProvider;

#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub name: String,
    pub scaling: ScalingSpec,
    /// Time between decisions.
    pub tick: Duration,
    /// SIGTERM grace when draining an executor.
    pub drain_grace: Duration,
}

#[derive(Debug)]
struct Record {
    class: Class,
    phase: Phase,
    endpoint: Option<String>,
    /// Asked to stop by us (its exit is not a failure).
    stopping: bool,
}

/// The latest decision and the pool's executors, for metrics and the control API.
#[derive(Clone, Debug, Default)]
pub struct PoolStatus {
    pub endpoints: Vec<String>,
    pub starting: u32,
    pub ready: u32,
    pub draining: u32,
    pub last_decision: Option<Decision>,
    pub failures: u64,
}

pub struct Reconciler {
    config: PoolConfig,
    provider: LocalProvider,
    executors: HashMap<String, Record>,
    samples: VecDeque<Sample>,
    memory: Memory,
    origin: Instant,
    /// When demand last was zero-free (pool-level idleness).
    idle_since: Option<Duration>,
    next_id: u64,
    consecutive_failures: u32,
    hold_launches_until: Option<Instant>,
    status: watch::Sender<PoolStatus>,
}

impl Reconciler {
    pub fn new(config: PoolConfig, provider: LocalProvider) -> (Self, watch::Receiver<PoolStatus>) {
        let (status, rx) = watch::channel(PoolStatus::default());
        let r = Self {
            config,
            provider,
            executors: HashMap::new(),
            samples: VecDeque::new(),
            memory: Memory::default(),
            origin: Instant::now(),
            idle_since: Some(Duration::ZERO),
            next_id: 0,
            consecutive_failures: 0,
            hold_launches_until: None,
            status,
        };
        (r, rx)
    }

    /// Runs until the demand channel closes; then drains every executor.
    pub async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<ExecutorEvent>,
        mut demand: mpsc::Receiver<(u32, u32)>,
    ) {
        let mut tick = tokio::time::interval(self.config.tick);
        loop {
            tokio::select! {
                Some(event) = events.recv() => self.on_event(event),
                report = demand.recv() => match report {
                    Some((queued, in_flight)) => self.on_demand(queued, in_flight),
                    None => break,
                },
                _ = tick.tick() => self.reconcile().await,
            }
        }
        for id in self.executors.keys() {
            let _ = self.provider.terminate(id, self.config.drain_grace);
        }
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    fn on_demand(&mut self, queued: u32, in_flight: u32) {
        let now = self.now();
        self.samples.push_back(Sample {
            at: now,
            queued,
            in_flight,
        });
        let keep = self.config.scaling.stable_window;
        while self
            .samples
            .front()
            .is_some_and(|s| now.saturating_sub(s.at) > keep)
        {
            self.samples.pop_front();
        }
        if queued + in_flight > 0 {
            self.idle_since = None;
        } else if self.idle_since.is_none() {
            self.idle_since = Some(now);
        }
    }

    fn on_event(&mut self, event: ExecutorEvent) {
        match event {
            ExecutorEvent::Starting { .. } => {}
            ExecutorEvent::Ready { id, endpoint } => {
                if let Some(r) = self.executors.get_mut(&id) {
                    r.phase = Phase::Ready;
                    r.endpoint = Some(endpoint);
                    self.consecutive_failures = 0;
                }
            }
            ExecutorEvent::Terminated { id, reason } => {
                if let Some(r) = self.executors.remove(&id)
                    && !r.stopping
                {
                    self.consecutive_failures += 1;
                    let backoff = Duration::from_millis(250 << self.consecutive_failures.min(8))
                        .min(Duration::from_secs(60));
                    self.hold_launches_until = Some(Instant::now() + backoff);
                    tracing::warn!(pool = %self.config.name, executor = %id, %reason, backoff_ms = backoff.as_millis() as u64, "executor failed; replacing after backoff");
                    self.status.send_modify(|s| s.failures += 1);
                }
            }
        }
        self.publish(None);
    }

    async fn reconcile(&mut self) {
        let now = self.now();
        let views: Vec<ExecutorView> = self
            .executors
            .iter()
            .map(|(id, r)| ExecutorView {
                id: id.clone(),
                class: r.class,
                phase: if r.stopping { Phase::Draining } else { r.phase },
                in_flight: 0,
                idle_since: self.idle_since,
            })
            .collect();
        let samples: Vec<Sample> = self.samples.iter().copied().collect();
        let decision = autoscaler::decide(
            &self.config.scaling,
            &Observations {
                now,
                samples: &samples,
                executors: &views,
                memory: self.memory,
            },
        );
        self.memory = decision.memory;
        for id in &decision.reap {
            if let Some(r) = self.executors.get_mut(id) {
                r.stopping = true;
                let _ = self.provider.terminate(id, self.config.drain_grace);
                tracing::info!(pool = %self.config.name, executor = %id, "reaping idle ephemeral executor");
            }
        }
        if self.hold_launches_until.is_none_or(|t| Instant::now() >= t) {
            for (class, target) in [
                (Class::Warm, decision.warm),
                (Class::Ephemeral, decision.ephemeral),
            ] {
                let live = self
                    .executors
                    .values()
                    .filter(|r| r.class == class && !r.stopping)
                    .count() as u32;
                for _ in live..target {
                    self.next_id += 1;
                    let kind = if class == Class::Warm { "warm" } else { "eph" };
                    let id = format!("{}-{kind}-{}", self.config.name, self.next_id);
                    match self.provider.launch(&id, class).await {
                        Ok(()) => {
                            self.executors.insert(
                                id,
                                Record {
                                    class,
                                    phase: Phase::Starting,
                                    endpoint: None,
                                    stopping: false,
                                },
                            );
                        }
                        Err(e) => {
                            tracing::error!(pool = %self.config.name, "launch failed: {e}");
                            self.consecutive_failures += 1;
                            self.status.send_modify(|s| s.failures += 1);
                        }
                    }
                }
            }
        }
        self.publish(Some(decision));
    }

    fn publish(&self, decision: Option<Decision>) {
        let mut endpoints: Vec<String> = self
            .executors
            .values()
            .filter(|r| r.phase == Phase::Ready && !r.stopping)
            .filter_map(|r| r.endpoint.clone())
            .collect();
        endpoints.sort();
        let count = |p: Phase| {
            self.executors
                .values()
                .filter(|r| !r.stopping && r.phase == p)
                .count() as u32
        };
        let (starting, ready) = (count(Phase::Starting), count(Phase::Ready));
        let draining = self.executors.values().filter(|r| r.stopping).count() as u32;
        self.status.send_modify(|s| {
            s.endpoints = endpoints;
            s.starting = starting;
            s.ready = ready;
            s.draining = draining;
            if decision.is_some() {
                s.last_decision = decision;
            }
        });
    }
}
