//! Which executor gets the next request: the state of each endpoint of a pool (outstanding
//! requests against its concurrency limit, consecutive failures, ejection) and the choice
//! itself, a pure function: least outstanding requests, with optional prefix affinity
//! (rendezvous hashing of the prompt prefix, honoured while the preferred endpoint is not much
//! busier than the least busy one). An endpoint that keeps failing is ejected for a cool-down,
//! then let back with one probe request.

use std::hash::{Hash, Hasher};
use std::time::Duration;

use tokio::time::Instant;

use crate::config::Endpoint;

/// How far (in outstanding requests) an affinity choice may exceed the least busy endpoint.
const AFFINITY_SLACK: usize = 4;

#[derive(Clone, Debug)]
pub struct EndpointState {
    pub info: Endpoint,
    pub outstanding: usize,
    pub failures: u32,
    pub ejected_until: Option<Instant>,
    /// Exports `outstanding` (a detached gauge until the queue registers one).
    pub gauge: prometheus_client::metrics::gauge::Gauge,
}

/// What a finished attempt says about its endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// Connect failure, 5xx, or death mid-stream.
    Failure,
}

impl EndpointState {
    pub fn new(info: Endpoint) -> Self {
        Self {
            info,
            outstanding: 0,
            failures: 0,
            ejected_until: None,
            gauge: Default::default(),
        }
    }

    /// Can take one more request now. An ejected endpoint past its cool-down takes a single
    /// probe (nothing else outstanding).
    pub fn available(&self, now: Instant) -> bool {
        match self.ejected_until {
            Some(until) if now < until => false,
            Some(_) => self.outstanding == 0,
            None => self.outstanding < self.info.max_concurrency,
        }
    }

    /// Records an attempt's end; true when this outcome ejected the endpoint.
    pub fn finish(
        &mut self,
        outcome: Outcome,
        now: Instant,
        eject_after: u32,
        cooldown: Duration,
    ) -> bool {
        self.outstanding = self.outstanding.saturating_sub(1);
        match outcome {
            Outcome::Success => {
                self.failures = 0;
                self.ejected_until = None;
                false
            }
            Outcome::Failure => {
                self.failures += 1;
                if self.failures >= eject_after {
                    let newly = self.ejected_until.is_none_or(|u| u <= now);
                    self.ejected_until = Some(now + cooldown);
                    newly
                } else {
                    false
                }
            }
        }
    }
}

fn rendezvous(key: u64, address: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    key.hash(&mut h);
    address.hash(&mut h);
    h.finish()
}

/// Picks an endpoint index for a request, or `None` if none can take it now. Endpoints in
/// `avoid` (where this request already failed) are used only when nothing else is available.
pub fn choose(
    endpoints: &[EndpointState],
    now: Instant,
    affinity: Option<u64>,
    avoid: &[String],
) -> Option<usize> {
    let pick = |skip_avoided: bool| -> Option<usize> {
        let candidates: Vec<usize> = (0..endpoints.len())
            .filter(|&i| endpoints[i].available(now))
            .filter(|&i| !skip_avoided || !avoid.contains(&endpoints[i].info.address))
            .collect();
        let least = candidates
            .iter()
            .copied()
            .min_by_key(|&i| (endpoints[i].outstanding, i))?;
        if let Some(key) = affinity {
            let preferred = candidates
                .iter()
                .copied()
                .max_by_key(|&i| rendezvous(key, &endpoints[i].info.address))?;
            if endpoints[preferred].outstanding <= endpoints[least].outstanding + AFFINITY_SLACK {
                return Some(preferred);
            }
        }
        Some(least)
    };
    pick(true).or_else(|| pick(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps(outstanding: &[usize]) -> Vec<EndpointState> {
        outstanding
            .iter()
            .enumerate()
            .map(|(i, &o)| EndpointState {
                outstanding: o,
                ..EndpointState::new(Endpoint {
                    name: format!("e{i}"),
                    address: format!("10.0.0.{i}:80"),
                    max_concurrency: 8,
                })
            })
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn least_outstanding_wins_and_full_endpoints_are_skipped() {
        let now = Instant::now();
        assert_eq!(choose(&eps(&[3, 1, 2]), now, None, &[]), Some(1));
        assert_eq!(choose(&eps(&[8, 8, 5]), now, None, &[]), Some(2));
        assert_eq!(choose(&eps(&[8, 8]), now, None, &[]), None);
        // Avoided endpoints are a last resort.
        assert_eq!(
            choose(&eps(&[3, 1]), now, None, &["10.0.0.1:80".into()]),
            Some(0)
        );
        assert_eq!(
            choose(&eps(&[8, 1]), now, None, &["10.0.0.1:80".into()]),
            Some(1)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn affinity_is_stable_but_yields_to_load() {
        let now = Instant::now();
        let key = 0xfeed;
        let first = choose(&eps(&[0, 0, 0, 0]), now, Some(key), &[]).unwrap();
        for _ in 0..3 {
            assert_eq!(
                choose(&eps(&[0, 0, 0, 0]), now, Some(key), &[]),
                Some(first)
            );
        }
        let mut busy = vec![0; 4];
        busy[first] = AFFINITY_SLACK + 1;
        assert_ne!(choose(&eps(&busy), now, Some(key), &[]), Some(first));
        // Different prefixes spread over endpoints.
        let spread: std::collections::HashSet<_> = (0..64)
            .map(|k| choose(&eps(&[0, 0, 0, 0]), now, Some(k), &[]).unwrap())
            .collect();
        assert!(spread.len() >= 3);
    }

    #[tokio::test(start_paused = true)]
    async fn failing_endpoints_are_ejected_then_probed() {
        let mut e = eps(&[0]).remove(0);
        let cooldown = Duration::from_secs(10);
        for i in 0..3 {
            e.outstanding += 1;
            let ejected = e.finish(Outcome::Failure, Instant::now(), 3, cooldown);
            assert_eq!(ejected, i == 2);
        }
        assert!(!e.available(Instant::now()));
        tokio::time::advance(cooldown).await;
        assert!(e.available(Instant::now()), "probe after the cool-down");
        e.outstanding += 1;
        assert!(!e.available(Instant::now()), "only one probe at a time");
        e.finish(Outcome::Success, Instant::now(), 3, cooldown);
        assert!(e.available(Instant::now()) && e.ejected_until.is_none() && e.failures == 0);
    }
}
