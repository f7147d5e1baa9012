//! Knative's Pod Autoscaler (KPA) as a baseline for the replay, written from knative/serving's
//! `pkg/autoscaler/scaling/autoscaler.go` (`Scale`), the defaults in
//! `pkg/autoscaler/config/config.go` and `config/core/configmaps/autoscaler.yaml`, and the
//! scale-to-zero grace in `pkg/reconciler/autoscaling/kpa/scaler.go`:
//!
//! - observed concurrency (requests queued + in flight) averaged over the stable window (60 s)
//!   and the panic window (10% of it, 6 s);
//! - target per pod = container concurrency x target utilisation (70%);
//! - desired = ceil(observed / target) for each window, each clamped to
//!   `[floor(ready / max_scale_down_rate), ceil(ready x max_scale_up_rate)]` with `ready` the
//!   ready pods (at least 1), max scale-down rate 2, max scale-up rate 1000;
//! - panic when the panic-window desired count reaches 200% of the ready pods; while panicking
//!   the count follows the larger of the two windows and never goes down; panic ends a stable
//!   window after the last panic-level observation;
//! - a revision goes to zero only after the scale-to-zero grace period (30 s) at zero.
//!
//! What KPA leaves to Kubernetes is modelled by the replay, not here: which pods a scale-down
//! removes (the ReplicaSet's choice: the newest ready ones first) and their drain.

use std::time::Duration;

use super::Sample;

#[derive(Clone, Debug, PartialEq)]
pub struct KpaSpec {
    pub min_scale: u32,
    pub max_scale: u32,
    /// Requests per pod aimed at: container concurrency x target utilisation.
    pub target: f64,
    pub stable_window: Duration,
    pub panic_window: Duration,
    /// Panic when panic-window desired pods / ready pods reaches this (200% = 2.0).
    pub panic_threshold: f64,
    pub max_scale_up_rate: f64,
    pub max_scale_down_rate: f64,
    pub scale_to_zero_grace: Duration,
}

impl KpaSpec {
    /// Knative's defaults for pods that take `container_concurrency` requests at once.
    pub fn knative_defaults(container_concurrency: f64, min_scale: u32, max_scale: u32) -> Self {
        Self {
            min_scale,
            max_scale,
            target: container_concurrency * 0.7,
            stable_window: Duration::from_secs(60),
            panic_window: Duration::from_secs(6),
            panic_threshold: 2.0,
            max_scale_up_rate: 1000.0,
            max_scale_down_rate: 2.0,
            scale_to_zero_grace: Duration::from_secs(30),
        }
    }
}

/// What KPA keeps between decisions.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct KpaState {
    pub panic_time: Option<Duration>,
    pub max_panic_pods: u32,
    /// Last time the decision was above zero.
    pub last_nonzero: Option<Duration>,
}

fn average(samples: &[Sample], now: Duration, window: Duration) -> f64 {
    let (sum, n) = super::recent(samples, now, window).fold((0.0, 0.0), |(sum, n), s| {
        (sum + (s.queued + s.in_flight) as f64, n + 1.0)
    });
    if n > 0.0 { sum / n } else { 0.0 }
}

/// The pod count KPA asks for at `now`, with `ready` pods ready.
pub fn decide(
    spec: &KpaSpec,
    state: &mut KpaState,
    now: Duration,
    samples: &[Sample],
    ready: u32,
) -> u32 {
    let ready_pods = ready.max(1) as f64;
    let max_up = (spec.max_scale_up_rate * ready_pods).ceil();
    let max_down = (ready_pods / spec.max_scale_down_rate).floor();
    let target = spec.target.max(f64::MIN_POSITIVE);
    let dspc = (average(samples, now, spec.stable_window) / target).ceil();
    let dppc = (average(samples, now, spec.panic_window) / target).ceil();
    let stable = dspc.clamp(max_down, max_up) as u32;
    let panic = dppc.clamp(max_down, max_up) as u32;

    let over_threshold = dppc / ready_pods >= spec.panic_threshold;
    if over_threshold {
        state.panic_time = Some(now);
    } else if state
        .panic_time
        .is_some_and(|t| t + spec.stable_window < now)
    {
        state.panic_time = None;
        state.max_panic_pods = 0;
    }
    let mut desired = stable;
    if state.panic_time.is_some() {
        desired = desired.max(panic);
        state.max_panic_pods = state.max_panic_pods.max(desired);
        desired = state.max_panic_pods;
    }
    desired = desired.clamp(spec.min_scale, spec.max_scale.max(spec.min_scale));
    if desired > 0 {
        state.last_nonzero = Some(now);
    } else if state
        .last_nonzero
        .is_some_and(|t| now.saturating_sub(t) < spec.scale_to_zero_grace)
    {
        // The last pod stays through the grace period.
        desired = 1;
    }
    desired
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn steady(concurrency: u32, until: u64) -> Vec<Sample> {
        (0..=until)
            .map(|s| Sample {
                at: Duration::from_secs(s),
                in_flight: concurrency,
                ..Sample::default()
            })
            .collect()
    }

    #[test]
    fn follows_the_stable_window_at_seventy_percent_of_container_concurrency() {
        let spec = KpaSpec::knative_defaults(10.0, 0, 100);
        let mut state = KpaState::default();
        // 30 in flight over a target of 7 per pod: ceil(4.29) = 5 pods.
        assert_eq!(decide(&spec, &mut state, 120 * SEC, &steady(30, 120), 5), 5);
        assert_eq!(state.panic_time, None);
    }

    #[test]
    fn panics_on_a_burst_over_twice_the_ready_pods_and_never_drops_while_panicking() {
        let spec = KpaSpec::knative_defaults(10.0, 0, 100);
        let mut state = KpaState::default();
        let mut samples = steady(7, 60);
        // Burst: 70 in flight for 6 s against 1 ready pod: desired 10 >= 2 x 1 -> panic.
        for s in 61..=66 {
            samples.push(Sample {
                at: Duration::from_secs(s),
                in_flight: 70,
                ..Sample::default()
            });
        }
        let d = decide(&spec, &mut state, 66 * SEC, &samples, 1);
        assert_eq!(d, 10);
        assert!(state.panic_time.is_some());
        // Demand falls back at once; the panic keeps the count up for a stable window.
        for s in 67..=126 {
            samples.push(Sample {
                at: Duration::from_secs(s),
                in_flight: 7,
                ..Sample::default()
            });
        }
        assert_eq!(decide(&spec, &mut state, 120 * SEC, &samples, 10), 10);
        assert_eq!(
            decide(&spec, &mut state, 127 * SEC, &samples, 10),
            5,
            "halving at most"
        );
        assert_eq!(state.panic_time, None);
    }

    #[test]
    fn goes_to_zero_only_after_the_grace_period() {
        let spec = KpaSpec::knative_defaults(10.0, 0, 100);
        let mut state = KpaState::default();
        let samples = steady(3, 10);
        // Silence after 10 s: the stable window empties at 70 s, the last pod stays 30 s more.
        let first_zero = (1..=200)
            .find(|&s| decide(&spec, &mut state, Duration::from_secs(s), &samples, 1) == 0)
            .expect("it reaches zero");
        assert!((99..=101).contains(&first_zero), "zero at {first_zero} s");
    }
}
