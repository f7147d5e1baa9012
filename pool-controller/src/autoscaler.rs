//! The autoscaler: a pure function from what the controller observes (demand samples from the
//! gateways, the pool's executors, the previous decision, the time) to a decision (how many
//! warm and ephemeral executors the pool should have, which idle ephemeral executors to reap,
//! and why). No I/O and no clock of its own, so it is tested with tables over simulated time and
//! replayed by the trace simulator.
//!
//! Baseline: Knative's KPA. Demand (queued + in-flight requests) is averaged over a stable
//! window and a shorter panic window; desired executors = ceil(demand / target_concurrency).
//! When the panic-window demand reaches `panic_threshold` times the current capacity the
//! autoscaler panics: it follows the panic window and never scales down until a whole stable
//! window passes without panic demand. Scale-up and scale-down per decision are bounded by rates.
//!
//! What LLM pools need on top: the first queued request scales a pool from zero at once (no
//! window to wait for); warm executors are a floor that never scales away; ephemeral executors
//! go only after `idle_ttl` with no work, idle ready ones first; executors still starting count
//! as capacity, so a slow boot does not cause overshoot and is never killed to keep an idle
//! ready one.

use std::time::Duration;

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
    /// An ephemeral executor idle this long may be reaped.
    pub idle_ttl: Duration,
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
        }
    }
}

/// Demand reported at time `at` (time is a duration since any fixed origin).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub at: Duration,
    pub queued: u32,
    pub in_flight: u32,
}

impl Sample {
    fn demand(&self) -> f64 {
        (self.queued + self.in_flight) as f64
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

/// What the previous decision carries forward (panic mode is stateful).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Memory {
    /// Last time panic-level demand was seen, while panicking.
    pub panic_since: Option<Duration>,
    /// Most executors wanted while panicking (never lowered during panic).
    pub panic_peak: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Observations<'a> {
    pub now: Duration,
    /// Demand samples, oldest first; those older than the stable window are ignored.
    pub samples: &'a [Sample],
    pub executors: &'a [ExecutorView],
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
    /// Bounded by the warm floor.
    WarmFloor,
    /// Bounded by `max_replicas`.
    MaxReplicas,
    /// Ephemeral executors idle past `idle_ttl` are reaped.
    IdleReap,
    /// Nothing to change.
    Hold,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ScaleFromZero => "scale_from_zero",
            Self::Panic => "panic",
            Self::Stable => "stable",
            Self::WarmFloor => "warm_floor",
            Self::MaxReplicas => "max_replicas",
            Self::IdleReap => "idle_reap",
            Self::Hold => "hold",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub warm: u32,
    pub ephemeral: u32,
    /// Ephemeral executors to drain now (idle past `idle_ttl`, longest idle first).
    pub reap: Vec<String>,
    pub reason: Reason,
    pub memory: Memory,
}

impl Decision {
    pub fn total(&self) -> u32 {
        self.warm + self.ephemeral
    }
}

fn average(samples: &[Sample], now: Duration, window: Duration) -> f64 {
    let from = now.saturating_sub(window);
    let recent: Vec<f64> = samples
        .iter()
        .filter(|s| s.at > from && s.at <= now)
        .map(Sample::demand)
        .collect();
    if recent.is_empty() {
        0.0
    } else {
        recent.iter().sum::<f64>() / recent.len() as f64
    }
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
    let target = spec.target_concurrency.max(f64::MIN_POSITIVE);
    let want = |demand: f64| (demand / target).ceil() as u32;

    let stable = want(average(obs.samples, now, spec.stable_window));
    let panic_level = want(average(obs.samples, now, spec.panic_window));
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
    if panicking_now {
        memory.panic_since = Some(now);
    } else if memory
        .panic_since
        .is_some_and(|t| now.saturating_sub(t) >= spec.stable_window)
    {
        memory = Memory::default();
    }
    let in_panic = memory.panic_since.is_some();

    let (mut desired, mut reason) = if in_panic {
        let d = panic_level.max(memory.panic_peak).max(capacity);
        (d, Reason::Panic)
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

    let warm = spec.min_warm.min(spec.max_replicas);
    let mut ephemeral = desired.saturating_sub(warm);
    let mut reap = Vec::new();
    if ephemeral < eph_now {
        // Ephemeral executors leave only when idle past the TTL: idle ready ones, longest idle
        // first; starting ones are coming capacity and are not reaped here.
        let mut idle: Vec<&ExecutorView> = obs
            .executors
            .iter()
            .filter(|e| e.class == Class::Ephemeral && e.phase == Phase::Ready && e.in_flight == 0)
            .filter(|e| {
                e.idle_since
                    .is_some_and(|t| now.saturating_sub(t) >= spec.idle_ttl)
            })
            .collect();
        idle.sort_by_key(|e| (e.idle_since, e.id.clone()));
        let removable = (eph_now - ephemeral) as usize;
        reap = idle
            .into_iter()
            .take(removable)
            .map(|e| e.id.clone())
            .collect();
        ephemeral = eph_now - reap.len() as u32;
        if !reap.is_empty() {
            reason = Reason::IdleReap;
        }
    }
    // A stable decision that changes nothing is a hold; panic, caps and scale-from-zero keep
    // their reason so SREs can see what holds the pool where it is.
    if warm + ephemeral == capacity
        && warm == warm_now
        && reap.is_empty()
        && reason == Reason::Stable
    {
        reason = Reason::Hold;
    }
    Decision {
        warm,
        ephemeral,
        reap,
        reason,
        memory,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    /// A pool simulated in whole seconds: executors take `startup` to become ready, demand is
    /// spread over ready executors, and every decision is applied at once.
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

        /// One second with `demand` requests wanting service; returns the decision.
        fn tick(&mut self, demand: u32) -> Decision {
            for (e, ready_at) in &mut self.executors {
                if e.phase == Phase::Starting && self.now >= *ready_at {
                    e.phase = Phase::Ready;
                    e.idle_since = Some(self.now);
                }
            }
            let per = self.spec.target_concurrency as u32;
            let mut left = demand;
            for (e, _) in self
                .executors
                .iter_mut()
                .filter(|(e, _)| e.phase == Phase::Ready)
            {
                e.in_flight = left.min(per);
                left -= e.in_flight;
                e.idle_since = if e.in_flight > 0 {
                    None
                } else {
                    e.idle_since.or(Some(self.now))
                };
            }
            self.samples.push(Sample {
                at: self.now,
                queued: left,
                in_flight: demand - left,
            });
            let views: Vec<ExecutorView> = self.executors.iter().map(|(e, _)| e.clone()).collect();
            let d = decide(
                &self.spec,
                &Observations {
                    now: self.now,
                    samples: &self.samples,
                    executors: &views,
                    memory: self.memory,
                },
            );
            self.memory = d.memory;
            self.executors.retain(|(e, _)| !d.reap.contains(&e.id));
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
        assert!(sim.decisions.iter().all(|d| d.reap.is_empty()));
        assert_eq!(sim.launched, 3);
    }

    #[test]
    fn ephemeral_executors_are_reaped_only_after_idle_ttl_down_to_the_warm_floor() {
        let s = ScalingSpec {
            idle_ttl: Duration::from_secs(120),
            ..spec(2, 8, 4.0)
        };
        let mut sim = Sim::new(s, 5 * SEC);
        sim.run(90, |_| 30);
        assert_eq!(sim.executors.len(), 8);
        // Load stops. The stable window has to drain, then each ephemeral waits out its TTL.
        sim.run(119, |_| 0);
        assert_eq!(sim.executors.len(), 8, "nothing reaped before idle_ttl");
        sim.run(200, |_| 0);
        assert_eq!(
            (sim.count(Class::Warm), sim.count(Class::Ephemeral)),
            (2, 0),
            "back to the warm floor"
        );
        assert!(sim.decisions.iter().any(|d| d.reason == Reason::IdleReap));
        // Warm executors are never reaped however long they idle.
        sim.run(1000, |_| 0);
        assert_eq!(sim.count(Class::Warm), 2);
    }

    #[test]
    fn idle_ready_executors_go_before_starting_ones() {
        let spec = ScalingSpec {
            idle_ttl: 60 * SEC,
            ..spec(0, 4, 4.0)
        };
        let now = 1000 * SEC;
        let executors = vec![
            ExecutorView {
                id: "booting".into(),
                class: Class::Ephemeral,
                phase: Phase::Starting,
                in_flight: 0,
                idle_since: None,
            },
            ExecutorView {
                id: "idle-long".into(),
                class: Class::Ephemeral,
                phase: Phase::Ready,
                in_flight: 0,
                idle_since: Some(now - 300 * SEC),
            },
            ExecutorView {
                id: "idle-short".into(),
                class: Class::Ephemeral,
                phase: Phase::Ready,
                in_flight: 0,
                idle_since: Some(now - 10 * SEC),
            },
            ExecutorView {
                id: "busy".into(),
                class: Class::Ephemeral,
                phase: Phase::Ready,
                in_flight: 2,
                idle_since: None,
            },
        ];
        let samples = [Sample {
            at: now,
            queued: 0,
            in_flight: 2,
        }];
        let d = decide(
            &spec,
            &Observations {
                now,
                samples: &samples,
                executors: &executors,
                memory: Memory::default(),
            },
        );
        assert_eq!(d.reap, vec!["idle-long".to_owned()], "{d:?}");
        assert_eq!(d.ephemeral, 3);
        assert_eq!(d.reason, Reason::IdleReap);
    }
}
