//! Following the pool controller: the gateway watches the controller's endpoint stream and
//! replaces each pool's endpoints with every snapshot (keeping the last known set while the
//! controller is unreachable, and reconnecting with backoff), and reports its demand (queued
//! and in-flight requests per pool and endpoint) every `report_interval`, at once when a pool
//! that had nothing waiting gets a queued request, so a pool at zero scales up without waiting.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Method, Request, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use llmctl_protocol::control::{DemandReport, EndpointSnapshot, PoolDemand};

use crate::config::ControllerLink;
use crate::queue::Arrived;
use crate::server::Gateway;

/// A watch stream silent for this long is presumed dead (the controller heartbeats every 5 s).
const WATCH_SILENCE: Duration = Duration::from_secs(15);
/// How often queues are checked for a first queued request between reports.
const QUICK_CHECK: Duration = Duration::from_millis(50);

/// Starts following the controller; the tasks live as long as the runtime.
pub fn follow(gateway: Arc<Gateway>, link: ControllerLink) {
    tokio::spawn(watch_endpoints(gateway.clone(), link.clone()));
    tokio::spawn(report_demand(gateway, link));
}

async fn connect(address: &str) -> Result<SendRequest<Full<Bytes>>, String> {
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| format!("connecting to {address}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake with {address}: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

fn request(link: &ControllerLink, method: Method, path: &str, body: Bytes) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, &link.address)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))
        .expect("static request parts are valid")
}

async fn watch_endpoints(gateway: Arc<Gateway>, link: ControllerLink) {
    let mut backoff = Duration::from_millis(100);
    let mut connected_once = false;
    loop {
        match watch_once(&gateway, &link).await {
            Ok(()) => backoff = Duration::from_millis(100),
            Err(e) if connected_once || backoff == Duration::from_millis(100) => {
                tracing::warn!(controller = %link.address, "endpoint watch: {e}; keeping the last known endpoints and retrying");
            }
            Err(e) => tracing::debug!(controller = %link.address, "endpoint watch: {e}"),
        }
        connected_once = true;
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// One watch connection, until it ends; applies every snapshot it carries.
async fn watch_once(gateway: &Gateway, link: &ControllerLink) -> Result<(), String> {
    let mut sender = connect(&link.address).await?;
    let response = sender
        .send_request(request(
            link,
            Method::GET,
            "/v1/endpoints?watch=true",
            Bytes::new(),
        ))
        .await
        .map_err(|e| format!("watch request: {e}"))?;
    if response.status() != StatusCode::OK {
        return Err(format!("watch answered {}", response.status()));
    }
    tracing::info!(controller = %link.address, "watching the controller's endpoints");
    let mut body = response.into_body();
    let mut buf = BytesMut::new();
    loop {
        let frame = match tokio::time::timeout(WATCH_SILENCE, body.frame()).await {
            Err(_) => return Err(format!("no snapshot for {}s", WATCH_SILENCE.as_secs())),
            Ok(None) => return Ok(()),
            Ok(Some(Err(e))) => return Err(format!("watch stream: {e}")),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line = buf.split_to(end + 1);
            match serde_json::from_slice::<EndpointSnapshot>(&line) {
                Ok(snapshot) => apply(gateway, snapshot),
                Err(e) => return Err(format!("bad snapshot from the controller: {e}")),
            }
        }
    }
}

/// Requests, prompt tokens and decode tokens admitted per second between two counts.
fn arrival_rates(before: Arrived, now: Arrived, elapsed: Duration) -> (f64, f64, f64) {
    let secs = elapsed.as_secs_f64();
    if secs <= 0.0 {
        return (0.0, 0.0, 0.0);
    }
    let per_s = |a: u64, b: u64| b.saturating_sub(a) as f64 / secs;
    (
        per_s(before.requests, now.requests),
        per_s(before.tokens.prompt, now.tokens.prompt),
        per_s(before.tokens.decode, now.tokens.decode),
    )
}

fn apply(gateway: &Gateway, snapshot: EndpointSnapshot) {
    for (pool, endpoints) in snapshot.pools {
        // A pool of hosted upstreams keeps its configured ones.
        if gateway.is_external(&pool) {
            continue;
        }
        if let Some(queue) = gateway.queue(&pool) {
            tracing::debug!(%pool, revision = snapshot.revision, endpoints = endpoints.len(), "endpoint set");
            queue.set_endpoints(endpoints);
        }
    }
}

async fn report_demand(gateway: Arc<Gateway>, link: ControllerLink) {
    let mut sender: Option<SendRequest<Full<Bytes>>> = None;
    let mut last_sent = tokio::time::Instant::now() - link.report_interval;
    let mut had_queued: Vec<bool> = Vec::new();
    // Per pool: the arrival counters at the previous report, to turn into rates.
    let mut counted: HashMap<String, (tokio::time::Instant, Arrived)> = HashMap::new();
    let mut failing = false;
    loop {
        tokio::time::sleep(QUICK_CHECK).await;
        let pools = gateway.pool_names();
        // Between reports only a pool going from nothing waiting to something waiting (a
        // scale-from-zero signal) triggers one early.
        let queued_now: Vec<bool> = pools
            .iter()
            .map(|p| gateway.queue(p).is_some_and(|q| q.depth() > 0))
            .collect();
        let early = queued_now
            .iter()
            .enumerate()
            .any(|(i, &q)| q && !had_queued.get(i).copied().unwrap_or(false));
        had_queued = queued_now;
        if !early && last_sent.elapsed() < link.report_interval {
            continue;
        }
        let mut report = DemandReport {
            gateway: link.gateway_id.clone(),
            pools: Vec::with_capacity(pools.len()),
        };
        for pool in &pools {
            let Some(queue) = gateway.queue(pool) else {
                continue;
            };
            let load = queue.load();
            let now = tokio::time::Instant::now();
            let rates = counted
                .get(pool)
                .map(|(at, before)| arrival_rates(*before, load.arrived, now.duration_since(*at)));
            let (arrivals_per_s, prompt_tokens_per_s, decode_tokens_per_s) =
                rates.unwrap_or_default();
            report.pools.push(PoolDemand {
                pool: pool.clone(),
                queued: load.queued as u32,
                in_flight: load.in_flight as u32,
                endpoints: load
                    .per_endpoint
                    .into_iter()
                    .map(|(a, n)| (a, n as u32))
                    .collect(),
                prompt_tokens: load.tokens.prompt,
                decode_tokens: load.tokens.decode,
                arrivals_per_s,
                prompt_tokens_per_s,
                decode_tokens_per_s,
            });
            counted.insert(pool.clone(), (now, load.arrived));
        }
        last_sent = tokio::time::Instant::now();
        let body = Bytes::from(serde_json::to_vec(&report).expect("reports serialize"));
        match send_report(&mut sender, &link, body).await {
            Ok(()) => {
                if failing {
                    tracing::info!(controller = %link.address, "demand reports delivered again");
                }
                failing = false;
            }
            Err(e) => {
                sender = None;
                if !failing {
                    tracing::warn!(controller = %link.address, "demand report: {e}");
                }
                failing = true;
            }
        }
    }
}

async fn send_report(
    sender: &mut Option<SendRequest<Full<Bytes>>>,
    link: &ControllerLink,
    body: Bytes,
) -> Result<(), String> {
    if sender.as_ref().is_none_or(|s| s.is_closed()) {
        *sender = Some(connect(&link.address).await?);
    }
    let s = sender.as_mut().expect("connected above");
    s.ready().await.map_err(|e| e.to_string())?;
    let response = tokio::time::timeout(
        Duration::from_secs(5),
        s.send_request(request(link, Method::POST, "/v1/demand", body)),
    )
    .await
    .map_err(|_| "the controller did not answer within 5s".to_owned())?
    .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("{status}: {}", String::from_utf8_lossy(&body)))
    }
}
