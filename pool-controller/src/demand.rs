//! Demand as the controller sees it: each gateway reports, per pool, how many requests it has
//! queued and in flight (and in flight per executor endpoint). The book keeps each gateway's
//! latest report, sums them per pool, and forgets a gateway that has gone quiet for longer than
//! the report TTL (a dead gateway must not hold executors up forever). Pure bookkeeping over a
//! caller-supplied clock.

use std::collections::HashMap;
use std::time::Duration;

use llmctl_protocol::control::PoolDemand;

#[derive(Debug)]
pub struct DemandBook {
    ttl: Duration,
    /// (gateway, pool) → when reported, what.
    latest: HashMap<(String, String), (Duration, PoolDemand)>,
}

impl DemandBook {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            latest: HashMap::new(),
        }
    }

    /// Records `gateway`'s report received at `now`, replacing its previous one for the pool.
    pub fn report(&mut self, now: Duration, gateway: &str, demand: PoolDemand) {
        self.latest
            .insert((gateway.to_owned(), demand.pool.clone()), (now, demand));
    }

    /// Demand for `pool` summed across gateways heard from within the TTL.
    pub fn total(&mut self, now: Duration, pool: &str) -> PoolDemand {
        let ttl = self.ttl;
        self.latest
            .retain(|_, (at, _)| now.saturating_sub(*at) <= ttl);
        let mut sum = PoolDemand {
            pool: pool.to_owned(),
            ..PoolDemand::default()
        };
        for (_, d) in self.latest.values().filter(|(_, d)| d.pool == pool) {
            sum.queued += d.queued;
            sum.in_flight += d.in_flight;
            sum.prompt_tokens += d.prompt_tokens;
            sum.decode_tokens += d.decode_tokens;
            sum.arrivals_per_s += d.arrivals_per_s;
            sum.prompt_tokens_per_s += d.prompt_tokens_per_s;
            sum.decode_tokens_per_s += d.decode_tokens_per_s;
            for (endpoint, n) in &d.endpoints {
                *sum.endpoints.entry(endpoint.clone()).or_default() += n;
            }
        }
        sum
    }

    /// Gateways currently counted (for metrics).
    pub fn gateways(&self) -> usize {
        let mut names: Vec<&str> = self.latest.keys().map(|(g, _)| g.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(pool: &str, queued: u32, in_flight: u32) -> PoolDemand {
        PoolDemand {
            pool: pool.into(),
            queued,
            in_flight,
            endpoints: HashMap::from([("e1".to_owned(), in_flight)]),
            prompt_tokens: 100 * u64::from(queued + in_flight),
            decode_tokens_per_s: 10.0 * f64::from(in_flight),
            ..PoolDemand::default()
        }
    }

    fn pair(d: PoolDemand) -> (u32, u32) {
        (d.queued, d.in_flight)
    }

    #[test]
    fn sums_gateways_keeps_latest_and_forgets_the_quiet() {
        let s = Duration::from_secs;
        let mut book = DemandBook::new(s(10));
        book.report(s(0), "gw-a", d("p", 3, 1));
        book.report(s(1), "gw-b", d("p", 2, 2));
        book.report(s(1), "gw-b", d("other", 7, 7));
        let total = book.total(s(2), "p");
        assert_eq!(total.endpoints["e1"], 3);
        assert_eq!(
            (total.prompt_tokens, total.decode_tokens_per_s),
            (800, 30.0)
        );
        assert_eq!(pair(total), (5, 3));
        // A newer report replaces the older one from the same gateway.
        book.report(s(5), "gw-a", d("p", 0, 4));
        assert_eq!(pair(book.total(s(6), "p")), (2, 6));
        assert_eq!(book.gateways(), 2);
        // gw-b goes quiet: after the TTL its demand no longer counts.
        assert_eq!(pair(book.total(s(12), "p")), (0, 4));
        assert_eq!(pair(book.total(s(12), "other")), (0, 0));
        assert_eq!(book.gateways(), 1);
        assert_eq!(pair(book.total(s(30), "p")), (0, 0));
    }
}
