//! Demand as the controller sees it: each gateway reports, per pool, how many requests it has
//! queued and in flight. The book keeps each gateway's latest report, sums them per pool, and
//! forgets a gateway that has gone quiet for longer than the report TTL (a dead gateway must not
//! hold executors up forever). Pure bookkeeping over a caller-supplied clock.

use std::collections::HashMap;
use std::time::Duration;

#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct DemandReport {
    pub gateway: String,
    pub pool: String,
    pub queued: u32,
    pub in_flight: u32,
}

#[derive(Debug)]
pub struct DemandBook {
    ttl: Duration,
    latest: HashMap<(String, String), (Duration, DemandReport)>,
}

impl DemandBook {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            latest: HashMap::new(),
        }
    }

    /// Records a report received at `now`, replacing that gateway's previous one for the pool.
    pub fn report(&mut self, now: Duration, report: DemandReport) {
        self.latest
            .insert((report.gateway.clone(), report.pool.clone()), (now, report));
    }

    /// Total (queued, in flight) for `pool` across gateways heard from within the TTL.
    pub fn total(&mut self, now: Duration, pool: &str) -> (u32, u32) {
        let ttl = self.ttl;
        self.latest
            .retain(|_, (at, _)| now.saturating_sub(*at) <= ttl);
        self.latest
            .values()
            .filter(|(_, r)| r.pool == pool)
            .fold((0, 0), |(q, f), (_, r)| (q + r.queued, f + r.in_flight))
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

    fn r(gateway: &str, pool: &str, queued: u32, in_flight: u32) -> DemandReport {
        DemandReport {
            gateway: gateway.into(),
            pool: pool.into(),
            queued,
            in_flight,
        }
    }

    #[test]
    fn sums_gateways_keeps_latest_and_forgets_the_quiet() {
        let s = Duration::from_secs;
        let mut book = DemandBook::new(s(10));
        book.report(s(0), r("gw-a", "p", 3, 1));
        book.report(s(1), r("gw-b", "p", 2, 2));
        book.report(s(1), r("gw-b", "other", 7, 7));
        assert_eq!(book.total(s(2), "p"), (5, 3));
        // A newer report replaces the older one from the same gateway.
        book.report(s(5), r("gw-a", "p", 0, 4));
        assert_eq!(book.total(s(6), "p"), (2, 6));
        assert_eq!(book.gateways(), 2);
        // gw-b goes quiet: after the TTL its demand no longer counts.
        assert_eq!(book.total(s(12), "p"), (0, 4));
        assert_eq!(book.total(s(12), "other"), (0, 0));
        assert_eq!(book.gateways(), 1);
        assert_eq!(book.total(s(30), "p"), (0, 0));
    }
}
