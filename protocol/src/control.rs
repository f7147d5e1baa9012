//! The control API between gateways and the pool controller (docs/controller-api.md): the
//! demand reports gateways `POST` and the endpoint snapshots they watch.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// `POST /v1/demand`: one gateway's demand, per pool. A newer report from the same gateway
/// replaces the older one; a gateway that stops reporting stops counting.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DemandReport {
    /// Stable id of the reporting gateway (one per process).
    pub gateway: String,
    pub pools: Vec<PoolDemand>,
}

/// Demand for one pool: requests waiting in the admission queue and requests running.
#[derive(Clone, Debug, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PoolDemand {
    pub pool: String,
    pub queued: u32,
    pub in_flight: u32,
    /// In-flight requests per executor endpoint (`host:port`), so the controller can tell
    /// idle executors from busy ones.
    #[serde(default)]
    pub endpoints: HashMap<String, u32>,
    /// Prompt tokens of the queued requests and of the running ones that have not answered
    /// yet (prefill still to do, as far as the gateway can tell).
    #[serde(default)]
    pub prompt_tokens: u64,
    /// Decode tokens the queued and running requests are expected to generate: each one's
    /// `max_tokens` (or a default of 512), lowered to what the pool's recent requests generated
    /// once enough have finished (the gateway's `history`).
    #[serde(default)]
    pub decode_tokens: u64,
    /// Requests admitted per second, averaged over the gateway's last few seconds.
    #[serde(default)]
    pub arrivals_per_s: f64,
    /// Prompt tokens admitted per second, over the same span.
    #[serde(default)]
    pub prompt_tokens_per_s: f64,
    /// Expected decode tokens admitted per second, over the same span.
    #[serde(default)]
    pub decode_tokens_per_s: f64,
}

/// One ready executor as gateways dispatch to it.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
pub struct Endpoint {
    /// The executor's id (shown in `x-llmctl-executor`).
    pub name: String,
    /// `host:port`, plain HTTP.
    pub address: String,
    /// Requests a gateway sends it at once, at most.
    pub max_concurrency: usize,
    /// Being scaled down: gateways send it nothing new, and the requests it has finish before
    /// it stops.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

/// `GET /v1/endpoints` (and each line of its `?watch=true` stream): every pool's ready
/// endpoints. `revision` grows with every change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
pub struct EndpointSnapshot {
    pub revision: u64,
    pub pools: BTreeMap<String, Vec<Endpoint>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demand_report_round_trips_and_rejects_unknown_fields() {
        let text = r#"{"gateway":"gw-1","pools":[{"pool":"default","queued":2,"in_flight":1,"endpoints":{"127.0.0.1:5000":1}}]}"#;
        let r: DemandReport = serde_json::from_str(text).unwrap();
        assert_eq!(r.pools[0].endpoints["127.0.0.1:5000"], 1);
        assert_eq!(
            serde_json::from_str::<DemandReport>(&serde_json::to_string(&r).unwrap()).unwrap(),
            r
        );
        let minimal: PoolDemand =
            serde_json::from_str(r#"{"pool":"p","queued":0,"in_flight":0}"#).unwrap();
        assert!(minimal.endpoints.is_empty());
        assert!(
            serde_json::from_str::<PoolDemand>(r#"{"pool":"p","queued":0,"in_flight":0,"x":1}"#)
                .is_err()
        );
        assert!(
            serde_json::from_str::<PoolDemand>(r#"{"pool":"p","queued":-1,"in_flight":0}"#)
                .is_err()
        );
    }
}
