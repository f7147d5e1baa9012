//! The reconciler of one pool, as an actor: it owns the pool's executor records, keeps the
//! demand the gateways report, asks the autoscaler for a decision on every tick, and drives the
//! provider to it (launch what is missing, drain what the decision names). A drained executor
//! stays in the endpoint set marked `draining`, so gateways send it nothing new while its
//! requests finish; once the gateways report none in flight on it (or the drain grace has
//! passed) the provider stops it. Executors that die unexpectedly
//! are replaced by the next decision, after an exponential backoff so a crashing executor does
//! not spin; terminated executors stay listed for `terminal_ttl`. The pool's state (ready
//! endpoints for the gateways, executors for the control API) is published on a watch channel,
//! and every step is counted in the controller's metrics.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::autoscaler::{
    self, Class, Decision, ExecutorView, Memory, Observations, Phase, Sample, ScalingSpec,
};
use crate::metrics::{Counts, Metrics, class_name};
use crate::provider::{Adopted, ExecutorEvent, Provider};
use crate::scrape::{self, ExecutorLoad};
use llmctl_protocol::control::{Endpoint, PoolDemand};

#[derive(Clone, Debug)]
pub struct PoolConfig {
    pub name: String,
    pub scaling: ScalingSpec,
    /// Time between decisions.
    pub tick: Duration,
    /// SIGTERM grace when draining an executor.
    pub drain_grace: Duration,
    /// How long terminated executors stay listed.
    pub terminal_ttl: Duration,
    /// Concurrency limit the gateways apply to each endpoint.
    pub endpoint_concurrency: usize,
}

#[derive(Debug)]
struct Record {
    class: Class,
    phase: Phase,
    endpoint: Option<String>,
    pid: Option<u32>,
    launched: Instant,
    ready_after: Option<Duration>,
    in_flight: u32,
    /// Since when (pool clock) it has had no work; `None` while busy or starting.
    idle_since: Option<Duration>,
    /// Being drained since then: out of dispatch, not yet stopped.
    draining_since: Option<Instant>,
    /// Asked to stop by us (its exit is not a failure).
    stopping: bool,
    /// Its load as its `/metrics` said at the last scrape (`None`: not ready, or no answer).
    load: Option<ExecutorLoad>,
    /// Scrapes in a row it did not answer at all.
    silent_scrapes: u32,
    /// Unresponsive since then: out of the endpoint set, replaced if it stays so.
    unresponsive_since: Option<Instant>,
    /// Killed for staying unresponsive: its end is a failure, and it is replaced.
    replacing: bool,
}

impl Record {
    fn new(class: Class, phase: Phase, endpoint: Option<String>) -> Self {
        Self {
            class,
            phase,
            endpoint,
            pid: None,
            launched: Instant::now(),
            ready_after: None,
            in_flight: 0,
            idle_since: None,
            draining_since: None,
            stopping: false,
            load: None,
            silent_scrapes: 0,
            unresponsive_since: None,
            replacing: false,
        }
    }

    /// Leaving: draining, asked to stop, or killed for a replacement.
    fn leaving(&self) -> bool {
        self.stopping || self.draining_since.is_some() || self.replacing
    }
}

/// A drained executor is stopped no sooner than this after it was marked, so every gateway has
/// seen the mark (the snapshot is pushed at once) and reported its last requests on it.
const DRAIN_SETTLE: Duration = Duration::from_secs(2);
/// Cold starts remembered for the autoscaler's look-ahead (the median is used).
const COLD_STARTS_KEPT: usize = 8;
/// How often the ready executors' `/metrics` are read, at the least (the tick, if longer).
const SCRAPE_INTERVAL: Duration = Duration::from_secs(1);
/// A ready executor that answers this many scrapes in a row with nothing at all (no
/// connection, or no answer within the scrape interval) while another executor of its pool
/// answers is unresponsive: frozen, stuck, or partitioned away. It leaves the endpoint set at
/// once, so gateways stop choosing it.
const SILENT_SCRAPES_UNRESPONSIVE: u32 = 3;
/// An executor unresponsive this long is killed and replaced (counted as a failure).
const UNRESPONSIVE_REPLACE_AFTER: Duration = Duration::from_secs(15);

/// One executor as the control API lists it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ExecutorInfo {
    pub id: String,
    pub class: &'static str,
    /// `starting`, `ready`, `draining` or `terminated`.
    pub phase: &'static str,
    pub endpoint: Option<String>,
    pub pid: Option<u32>,
    pub age_secs: f64,
    /// Launch to ready.
    pub cold_start_secs: Option<f64>,
    pub in_flight: u32,
    /// What its own `/metrics` said at the last scrape: requests running and waiting in its
    /// engine, and the share of its KV cache in use (ready executors that answered only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub running: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kv_used: Option<f64>,
    /// Why it terminated (terminated executors only).
    pub reason: Option<String>,
}

/// The pool's state, published after every change.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PoolStatus {
    pub name: String,
    /// The executors that already existed were taken over. Until then the endpoint set is not
    /// known, and the controller leaves the pool out of what it publishes (so gateways keep the
    /// set they had, e.g. across a leader hand-over or a pool's reconciler restart).
    pub adopted: bool,
    pub endpoints: Vec<Endpoint>,
    pub starting: u32,
    pub ready: u32,
    pub draining: u32,
    pub desired_warm: u32,
    pub desired_ephemeral: u32,
    pub last_reason: Option<&'static str>,
    pub failures: u64,
    /// What the latest failure was (an exit, a failed launch, a deleted pod).
    pub last_failure: Option<String>,
    pub restarts: u64,
    pub queued: u32,
    pub in_flight: u32,
    pub executors: Vec<ExecutorInfo>,
}

impl PoolStatus {
    pub fn endpoint_addresses(&self) -> Vec<&str> {
        self.endpoints.iter().map(|e| e.address.as_str()).collect()
    }
}

struct Terminal {
    info: ExecutorInfo,
    at: Instant,
}

pub struct Reconciler<P> {
    config: PoolConfig,
    provider: P,
    metrics: Arc<Metrics>,
    executors: HashMap<String, Record>,
    terminal: VecDeque<Terminal>,
    samples: VecDeque<Sample>,
    demand: PoolDemand,
    memory: Memory,
    /// The latest launch-to-ready times, newest last.
    cold_starts: VecDeque<Duration>,
    origin: Instant,
    next_id: u64,
    consecutive_failures: u32,
    /// Failed executors not yet replaced (launches for them count as restarts).
    to_replace: u32,
    hold_launches_until: Option<Instant>,
    last_targets: Option<(u32, u32)>,
    /// The executors that existed before were taken over (see `PoolStatus::adopted`).
    adopted: bool,
    status: watch::Sender<PoolStatus>,
}

impl<P: Provider> Reconciler<P> {
    pub fn new(
        config: PoolConfig,
        provider: P,
        metrics: Arc<Metrics>,
    ) -> (Self, watch::Receiver<PoolStatus>) {
        let (status, rx) = watch::channel(PoolStatus {
            name: config.name.clone(),
            ..PoolStatus::default()
        });
        let r = Self {
            config,
            provider,
            metrics,
            executors: HashMap::new(),
            terminal: VecDeque::new(),
            samples: VecDeque::new(),
            demand: PoolDemand::default(),
            memory: Memory::default(),
            cold_starts: VecDeque::new(),
            origin: Instant::now(),
            next_id: 0,
            consecutive_failures: 0,
            to_replace: 0,
            hold_launches_until: None,
            last_targets: None,
            adopted: false,
            status,
        };
        (r, rx)
    }

    /// Adopts the executors that exist already, then runs until the demand channel closes, and
    /// hands the provider its shutdown (the local one drains its children and waits for them).
    pub async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<ExecutorEvent>,
        mut demand: mpsc::Receiver<PoolDemand>,
    ) {
        // Adoption waits for the provider's first complete listing; a pool removed meanwhile
        // (its demand channel closed) stops without it. Reports that come meanwhile count after.
        let mut early: Option<PoolDemand> = None;
        let adopted = {
            let adopt = self.provider.adopt();
            tokio::pin!(adopt);
            loop {
                tokio::select! {
                    adopted = &mut adopt => break Some(adopted),
                    report = demand.recv() => match report {
                        Some(report) => early = Some(report),
                        None => break None,
                    },
                }
            }
        };
        let Some(adopted) = adopted else {
            self.provider
                .shutdown(self.config.drain_grace, events)
                .await;
            return;
        };
        for a in adopted {
            self.adopt(a);
        }
        self.adopted = true;
        if let Some(report) = early {
            self.on_demand(report);
        }
        self.publish();
        let (loads_tx, mut loads) = mpsc::channel(2);
        let scraper = scrape::spawn(
            self.config.name.clone(),
            self.status.subscribe(),
            self.config.tick.max(SCRAPE_INTERVAL),
            loads_tx,
        );
        let mut tick = tokio::time::interval(self.config.tick);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                Some(event) = events.recv() => self.on_event(event),
                Some(scraped) = loads.recv() => self.on_scraped(scraped),
                report = demand.recv() => match report {
                    Some(report) => {
                        // The first queued request of an empty pool is not kept waiting for
                        // the next tick.
                        let wake = report.queued > 0 && self.demand.queued == 0;
                        self.on_demand(report);
                        if wake {
                            self.reconcile().await;
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => self.reconcile().await,
            }
        }
        scraper.abort();
        self.provider
            .shutdown(self.config.drain_grace, events)
            .await;
    }

    /// Takes over an executor a predecessor left; ids continue after the highest one seen so a
    /// new executor never takes a name still in use.
    fn adopt(&mut self, a: Adopted) {
        if let Some(n) = a.id.rsplit('-').next().and_then(|n| n.parse::<u64>().ok()) {
            self.next_id = self.next_id.max(n);
        }
        if a.leaving {
            return;
        }
        tracing::info!(pool = %self.config.name, executor = %a.id, class = class_name(a.class), ready = a.endpoint.is_some(), "adopted executor");
        let now = self.now();
        let ready = a.endpoint.is_some();
        let mut record = Record::new(
            a.class,
            if ready { Phase::Ready } else { Phase::Starting },
            a.endpoint,
        );
        record.idle_since = ready.then_some(now);
        self.executors.insert(a.id, record);
    }

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }

    /// The latest scrapes: each executor's load, and which ones did not answer at all (those
    /// that stay silent become unresponsive; one that answers again is back).
    fn on_scraped(&mut self, mut scraped: scrape::Scraped) {
        let pool = self.config.name.clone();
        let mut changed = false;
        for (id, r) in &mut self.executors {
            r.load = scraped.loads.remove(id).filter(|_| r.phase == Phase::Ready);
            if r.phase != Phase::Ready || r.leaving() {
                continue;
            }
            if scraped.silent.contains(id) {
                r.silent_scrapes += 1;
                // When no executor of the pool answers, the fault is more likely the
                // controller's own network (a NetworkPolicy, a partition) than every executor:
                // none is taken out.
                if r.silent_scrapes >= SILENT_SCRAPES_UNRESPONSIVE
                    && r.unresponsive_since.is_none()
                    && scraped.answered > 0
                {
                    tracing::warn!(%pool, executor = %id, silent_scrapes = r.silent_scrapes, "executor unresponsive (no answer to its metrics); out of the endpoint set");
                    r.unresponsive_since = Some(Instant::now());
                    self.metrics.unresponsive(&pool);
                    changed = true;
                }
            } else {
                r.silent_scrapes = 0;
                if r.unresponsive_since.take().is_some() {
                    tracing::info!(%pool, executor = %id, "executor answers again; back in the endpoint set");
                    changed = true;
                }
            }
        }
        let loads: Vec<ExecutorLoad> = self.executors.values().filter_map(|r| r.load).collect();
        self.metrics.executor_loads(&pool, &loads);
        if changed {
            self.publish();
        }
    }

    /// Kills the executors unresponsive for too long; their exit counts as a failure, so they
    /// are replaced like a crashed one.
    async fn replace_unresponsive(&mut self) {
        let stuck: Vec<String> = self
            .executors
            .iter()
            .filter(|(_, r)| !r.leaving())
            .filter(|(_, r)| {
                r.unresponsive_since
                    .is_some_and(|t| t.elapsed() >= UNRESPONSIVE_REPLACE_AFTER)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in stuck {
            if let Some(r) = self.executors.get_mut(&id) {
                r.replacing = true;
                // Its replacement may launch before its exit is seen: counted as a restart.
                self.to_replace += 1;
            }
            tracing::warn!(pool = %self.config.name, executor = %id, after_secs = UNRESPONSIVE_REPLACE_AFTER.as_secs(), "executor still unresponsive; killing it for a replacement");
            if let Err(e) = self.provider.terminate(&id, Duration::from_secs(1)).await {
                tracing::warn!(pool = %self.config.name, executor = %id, "terminate failed: {e}");
            }
        }
    }

    fn on_demand(&mut self, demand: PoolDemand) {
        let now = self.now();
        let kv_used = self
            .executors
            .values()
            .filter(|r| !r.leaving())
            .filter_map(|r| r.load)
            .map(|l| l.kv_used)
            .sum();
        self.samples.push_back(Sample {
            at: now,
            queued: demand.queued,
            in_flight: demand.in_flight,
            prompt_tokens: demand.prompt_tokens,
            decode_tokens: demand.decode_tokens,
            prompt_tokens_per_s: demand.prompt_tokens_per_s,
            decode_tokens_per_s: demand.decode_tokens_per_s,
            kv_used,
        });
        let keep = self.config.scaling.stable_window;
        while self
            .samples
            .front()
            .is_some_and(|s| now.saturating_sub(s.at) > keep)
        {
            self.samples.pop_front();
        }
        for r in self.executors.values_mut() {
            let Some(endpoint) = &r.endpoint else {
                continue;
            };
            r.in_flight = demand.endpoints.get(endpoint).copied().unwrap_or(0);
            if r.in_flight > 0 {
                r.idle_since = None;
            } else if r.idle_since.is_none() {
                r.idle_since = Some(now);
            }
        }
        self.demand = demand;
    }

    fn on_event(&mut self, event: ExecutorEvent) {
        let pool = self.config.name.clone();
        match event {
            ExecutorEvent::Starting { id, pid, .. } => {
                if let Some(r) = self.executors.get_mut(&id) {
                    r.pid = pid;
                }
            }
            ExecutorEvent::Ready { id, endpoint } => {
                let now = self.now();
                if let Some(r) = self.executors.get_mut(&id) {
                    r.phase = Phase::Ready;
                    r.endpoint = Some(endpoint);
                    r.idle_since = Some(now);
                    // Ready again after a spell of not ready is not a cold start.
                    if r.ready_after.is_none() {
                        let took = r.launched.elapsed();
                        r.ready_after = Some(took);
                        self.consecutive_failures = 0;
                        self.metrics.cold_start(&pool, r.class, took.as_secs_f64());
                        self.cold_starts.push_back(took);
                        if self.cold_starts.len() > COLD_STARTS_KEPT {
                            self.cold_starts.pop_front();
                        }
                    }
                }
            }
            ExecutorEvent::Unready { id, reason } => {
                if let Some(r) = self.executors.get_mut(&id)
                    && r.phase == Phase::Ready
                {
                    tracing::warn!(%pool, executor = %id, %reason, "executor no longer ready; out of the endpoint set");
                    // Counted as coming capacity, like a starting one, until ready again.
                    r.phase = Phase::Starting;
                    r.idle_since = None;
                }
            }
            ExecutorEvent::Terminated { id, reason } => {
                if let Some(r) = self.executors.remove(&id) {
                    if !r.stopping {
                        self.consecutive_failures += 1;
                        if !r.replacing {
                            self.to_replace += 1;
                        }
                        let backoff =
                            Duration::from_millis(250 << self.consecutive_failures.min(8))
                                .min(Duration::from_secs(60));
                        self.hold_launches_until = Some(Instant::now() + backoff);
                        tracing::warn!(%pool, executor = %id, %reason, backoff_ms = backoff.as_millis() as u64, "executor failed; replacing after backoff");
                        self.metrics.failure(&pool, r.class);
                        let failure = format!("{id}: {reason}");
                        self.status.send_modify(|s| {
                            s.failures += 1;
                            s.last_failure = Some(failure);
                        });
                    }
                    let mut info = self.info(&id, &r);
                    info.phase = "terminated";
                    info.reason = Some(reason);
                    self.terminal.push_back(Terminal {
                        info,
                        at: Instant::now(),
                    });
                }
            }
        }
        self.publish();
    }

    async fn reconcile(&mut self) {
        let now = self.now();
        let ttl = self.config.terminal_ttl;
        while self.terminal.front().is_some_and(|t| t.at.elapsed() > ttl) {
            self.terminal.pop_front();
        }
        let views: Vec<ExecutorView> = self
            .executors
            .iter()
            .map(|(id, r)| ExecutorView {
                id: id.clone(),
                class: r.class,
                phase: if r.leaving() {
                    Phase::Draining
                } else {
                    r.phase
                },
                in_flight: r.in_flight,
                idle_since: r.idle_since,
            })
            .collect();
        let samples: Vec<Sample> = self.samples.iter().copied().collect();
        let decision = autoscaler::decide(
            &self.config.scaling,
            &Observations {
                now,
                samples: &samples,
                executors: &views,
                cold_start: self.cold_start(),
                memory: self.memory,
            },
        );
        self.memory = decision.memory;
        self.record_decision(&decision);
        let pool = self.config.name.clone();
        for id in &decision.drain {
            if let Some(r) = self.executors.get_mut(id) {
                r.draining_since = Some(Instant::now());
                tracing::info!(%pool, executor = %id, in_flight = r.in_flight, "draining executor: no new requests, stops when its requests finish");
            }
        }
        self.stop_drained().await;
        self.replace_unresponsive().await;
        if self.hold_launches_until.is_none_or(|t| Instant::now() >= t) {
            for (class, target) in [
                (Class::Warm, decision.warm),
                (Class::Ephemeral, decision.ephemeral),
            ] {
                let live = self
                    .executors
                    .values()
                    .filter(|r| r.class == class && !r.leaving())
                    .count() as u32;
                for _ in live..target {
                    self.launch(class).await;
                }
            }
        }
        self.publish();
    }

    async fn launch(&mut self, class: Class) {
        let pool = self.config.name.clone();
        self.next_id += 1;
        let kind = if class == Class::Warm { "warm" } else { "eph" };
        let id = format!("{pool}-{kind}-{}", self.next_id);
        // Registered before launching: the provider's first events may arrive at once.
        self.executors
            .insert(id.clone(), Record::new(class, Phase::Starting, None));
        match self.provider.launch(&id, class).await {
            Ok(()) => {
                tracing::info!(%pool, executor = %id, class = class_name(class), "launched executor");
                if self.to_replace > 0 {
                    self.to_replace -= 1;
                    self.metrics.restart(&pool);
                    self.status.send_modify(|s| s.restarts += 1);
                }
            }
            Err(e) => {
                self.executors.remove(&id);
                let backoff = self.back_off();
                tracing::error!(%pool, backoff_ms = backoff.as_millis() as u64, "launch failed: {e}");
                self.metrics.failure(&pool, class);
                let failure = e.to_string();
                self.status.send_modify(|s| {
                    s.failures += 1;
                    s.last_failure = Some(failure);
                });
            }
        }
    }

    /// The median of the latest cold starts.
    fn cold_start(&self) -> Option<Duration> {
        let mut seen: Vec<Duration> = self.cold_starts.iter().copied().collect();
        seen.sort_unstable();
        seen.get(seen.len() / 2).copied()
    }

    /// Stops the draining executors whose requests have finished (no gateway reports any on
    /// them), or whose drain grace has run out; the provider's own drain (SIGTERM, pod
    /// termination) then covers anything still running.
    async fn stop_drained(&mut self) {
        let grace = self.config.drain_grace;
        let done: Vec<String> = self
            .executors
            .iter()
            .filter(|(_, r)| !r.stopping)
            .filter_map(|(id, r)| {
                let since = r.draining_since?.elapsed();
                (since >= DRAIN_SETTLE && r.in_flight == 0 || since >= grace).then(|| id.clone())
            })
            .collect();
        for id in done {
            let Some(r) = self.executors.get_mut(&id) else {
                continue;
            };
            r.stopping = true;
            tracing::info!(pool = %self.config.name, executor = %id, in_flight = r.in_flight, "drained executor stopping");
            if let Err(e) = self.provider.terminate(&id, grace).await {
                tracing::warn!(pool = %self.config.name, executor = %id, "terminate failed: {e}");
            }
        }
    }

    /// One more failure in a row: launches wait 0.5 s, 1 s, 2 s, ... up to a minute.
    fn back_off(&mut self) -> Duration {
        self.consecutive_failures += 1;
        let backoff = Duration::from_millis(250 << self.consecutive_failures.min(8))
            .min(Duration::from_secs(60));
        self.hold_launches_until = Some(Instant::now() + backoff);
        backoff
    }

    /// Counts decisions that change something, by reason, and exports the targets.
    fn record_decision(&mut self, d: &Decision) {
        let targets = (d.warm, d.ephemeral);
        if self.last_targets != Some(targets) || !d.drain.is_empty() {
            if self.last_targets.is_some() || targets != (0, 0) {
                self.metrics.decision(&self.config.name, d.reason);
                let i = &d.inputs;
                tracing::info!(
                    pool = %self.config.name,
                    warm = d.warm,
                    ephemeral = d.ephemeral,
                    drain = ?d.drain,
                    reason = d.reason.as_str(),
                    signal = d.signal.as_str(),
                    capacity = i.capacity,
                    stable_requests = i.stable.requests,
                    stable_token_rate = i.stable.token_rate,
                    stable_kv = i.stable.kv_tokens,
                    panic = i.panic.max().1,
                    ahead = i.ahead,
                    "scale decision"
                );
            }
            self.last_targets = Some(targets);
        }
        self.metrics.desired(&self.config.name, d.warm, d.ephemeral);
        self.metrics.signals(&self.config.name, &d.inputs);
        self.status.send_modify(|s| {
            s.desired_warm = d.warm;
            s.desired_ephemeral = d.ephemeral;
            s.last_reason = Some(d.reason.as_str());
        });
    }

    fn info(&self, id: &str, r: &Record) -> ExecutorInfo {
        ExecutorInfo {
            id: id.to_owned(),
            class: class_name(r.class),
            phase: match (r.leaving(), r.phase) {
                (true, _) | (_, Phase::Draining) => "draining",
                (false, Phase::Starting) => "starting",
                (false, Phase::Ready) if r.unresponsive_since.is_some() => "unresponsive",
                (false, Phase::Ready) => "ready",
            },
            endpoint: r.endpoint.clone(),
            pid: r.pid,
            age_secs: r.launched.elapsed().as_secs_f64(),
            cold_start_secs: r.ready_after.map(|d| d.as_secs_f64()),
            in_flight: r.in_flight,
            running: r.load.map(|l| l.running),
            waiting: r.load.map(|l| l.waiting),
            kv_used: r.load.map(|l| l.kv_used),
            reason: None,
        }
    }

    fn publish(&self) {
        let mut endpoints: Vec<Endpoint> = self
            .executors
            .iter()
            .filter(|(_, r)| {
                r.phase == Phase::Ready && !r.stopping && r.unresponsive_since.is_none()
            })
            .filter_map(|(id, r)| {
                Some(Endpoint {
                    name: id.clone(),
                    address: r.endpoint.clone()?,
                    max_concurrency: self.config.endpoint_concurrency,
                    draining: r.draining_since.is_some(),
                })
            })
            .collect();
        endpoints.sort_by(|a, b| a.address.cmp(&b.address));
        let mut executors: Vec<ExecutorInfo> = self
            .executors
            .iter()
            .map(|(id, r)| self.info(id, r))
            .collect();
        executors.sort_by(|a, b| a.id.cmp(&b.id));
        executors.extend(self.terminal.iter().map(|t| t.info.clone()));
        let mut total = Counts::default();
        for class in [Class::Warm, Class::Ephemeral] {
            let mut c = Counts::default();
            for r in self.executors.values().filter(|r| r.class == class) {
                match (r.leaving(), r.phase) {
                    (true, _) | (_, Phase::Draining) => c.draining += 1,
                    (false, Phase::Starting) => c.starting += 1,
                    (false, Phase::Ready) => c.ready += 1,
                }
            }
            self.metrics.executors(&self.config.name, class, c);
            total.starting += c.starting;
            total.ready += c.ready;
            total.draining += c.draining;
        }
        let (queued, in_flight) = (self.demand.queued, self.demand.in_flight);
        let adopted = self.adopted;
        self.status.send_if_modified(|s| {
            let before = (
                s.adopted,
                s.endpoints.clone(),
                s.starting,
                s.ready,
                s.draining,
            );
            // With the endpoints in one change: never adopted with an empty set in between.
            s.adopted = adopted;
            s.endpoints = endpoints;
            s.starting = total.starting;
            s.ready = total.ready;
            s.draining = total.draining;
            s.queued = queued;
            s.in_flight = in_flight;
            s.executors = executors;
            // Watchers wake for changes to the endpoint set and counts, not for ages.
            before
                != (
                    s.adopted,
                    s.endpoints.clone(),
                    s.starting,
                    s.ready,
                    s.draining,
                )
        });
    }
}
