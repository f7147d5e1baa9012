//! Which executor gets the next request: the state of each endpoint of a pool (outstanding
//! requests against its concurrency limit, consecutive failures, ejection, draining) and the
//! choice among those that can take one, `llmctl_protocol::routing::pick` (least outstanding
//! requests, with optional prefix affinity; the controller's trace replay runs the same
//! function). An endpoint that keeps failing is ejected for a cool-down, then let back with one
//! probe request; one the controller is draining gets nothing new.

use std::time::Duration;

use llmctl_protocol::routing::{self, Candidate};
use tokio::time::Instant;

use crate::config::Endpoint;

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
    /// A provider's 429: no new request until the cool-down it asked for has passed (not a
    /// failure: the upstream is healthy, only busy).
    Throttled(Duration),
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
    /// probe (nothing else outstanding); a draining one takes none.
    pub fn available(&self, now: Instant) -> bool {
        if self.info.draining {
            return false;
        }
        match self.ejected_until {
            Some(until) if now < until => false,
            Some(_) => self.outstanding == 0,
            None => self.outstanding < self.info.max_concurrency,
        }
    }

    /// Records an attempt's end; true when this outcome ejected the endpoint (or cooled it
    /// down).
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
            Outcome::Throttled(wait) => {
                let until = now + wait;
                self.ejected_until = Some(self.ejected_until.map_or(until, |u| u.max(until)));
                true
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

/// Picks an endpoint index for a request, or `None` if none can take it now. Endpoints in
/// `avoid` (where this request already failed) are used only when nothing else is available.
pub fn choose(
    endpoints: &[EndpointState],
    now: Instant,
    affinity: Option<u64>,
    avoid: &[String],
) -> Option<usize> {
    let pick = |skip_avoided: bool| -> Option<usize> {
        let candidates: Vec<Candidate<'_>> = endpoints
            .iter()
            .enumerate()
            .filter(|(_, e)| e.available(now))
            .filter(|(_, e)| !skip_avoided || !avoid.contains(&e.info.address))
            .map(|(index, e)| Candidate {
                index,
                address: &e.info.address,
                outstanding: e.outstanding,
            })
            .collect();
        routing::pick(&candidates, affinity)
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
                    draining: false,
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
    async fn draining_endpoints_take_nothing_new_even_with_affinity() {
        let now = Instant::now();
        let mut e = eps(&[0, 3]);
        let key = (0..64)
            .find(|&k| choose(&e, now, Some(k), &[]) == Some(0))
            .expect("some prefix prefers the idle endpoint");
        e[0].info.draining = true;
        assert_eq!(choose(&e, now, Some(key), &[]), Some(1));
        e[1].info.draining = true;
        assert_eq!(choose(&e, now, None, &[]), None);
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
