//! What each ready executor says of its own load, read from its `/metrics`: requests running
//! and waiting in its engine, and the share of its KV cache in use. The gateways can only
//! estimate a request's KV footprint (prompt length from bytes, decode from `max_tokens` and
//! history); the executor knows it. Our worker's metrics and vLLM's are understood.

use std::collections::HashMap;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use tokio::sync::{mpsc, watch};

use crate::reconciler::PoolStatus;

/// A `/metrics` body larger than this is not read.
const MAX_METRICS_BYTES: usize = 4 << 20;

/// One executor's load, as its metrics report it.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ExecutorLoad {
    /// Requests in the running batch.
    pub running: f64,
    /// Requests admitted but waiting for a slot or KV blocks.
    pub waiting: f64,
    /// Share of the KV cache in use, 0 to 1.
    pub kv_used: f64,
}

/// Reads an executor's load from its Prometheus text: ours (`llmctl_worker_requests_running`,
/// `_requests_waiting`, `_kv_blocks_used` / `_kv_blocks_total`) or vLLM's
/// (`vllm:num_requests_running`, `vllm:num_requests_waiting`, `vllm:kv_cache_usage_perc` or the
/// older `vllm:gpu_cache_usage_perc`, both a fraction despite the name). Series with labels
/// (vLLM's `model_name`) are summed; the KV share of several is their mean. `None` when the
/// text has neither family.
pub fn parse(text: &str) -> Option<ExecutorLoad> {
    let mut sums: HashMap<&str, (f64, u32)> = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).unwrap_or(line.len());
        let name = &line[..name_end];
        // The value follows the labels (which may hold spaces inside quotes) or the name.
        let rest = match line[name_end..].strip_prefix('{') {
            Some(labels) => labels.rsplit_once('}').map_or("", |(_, v)| v),
            None => &line[name_end..],
        };
        let Some(value) = rest
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite())
        else {
            continue;
        };
        let e = sums.entry(name).or_default();
        e.0 += value;
        e.1 += 1;
    }
    let sum = |name: &str| sums.get(name).map(|&(s, _)| s);
    let mean = |name: &str| sums.get(name).map(|&(s, n)| s / f64::from(n.max(1)));
    if let Some(running) = sum("llmctl_worker_requests_running") {
        let kv_used = match (
            sum("llmctl_worker_kv_blocks_used"),
            sum("llmctl_worker_kv_blocks_total"),
        ) {
            (Some(used), Some(total)) if total > 0.0 => used / total,
            _ => 0.0,
        };
        return Some(ExecutorLoad {
            running,
            waiting: sum("llmctl_worker_requests_waiting").unwrap_or(0.0),
            kv_used: kv_used.clamp(0.0, 1.0),
        });
    }
    let running = sum("vllm:num_requests_running")?;
    Some(ExecutorLoad {
        running,
        waiting: sum("vllm:num_requests_waiting").unwrap_or(0.0),
        kv_used: mean("vllm:kv_cache_usage_perc")
            .or_else(|| mean("vllm:gpu_cache_usage_perc"))
            .unwrap_or(0.0)
            .clamp(0.0, 1.0),
    })
}

/// Why a scrape read no load.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScrapeError {
    /// No answer at all (connection refused or reset, or nothing within the timeout): the
    /// executor may be frozen.
    Silent(String),
    /// An answer without a load in it (an error status, a body that is not metrics).
    Unreadable(String),
}

impl std::fmt::Display for ScrapeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Silent(e) | Self::Unreadable(e) => f.write_str(e),
        }
    }
}

/// Fetches `http://{address}/metrics` and reads the load from it.
pub async fn scrape(address: &str, timeout: Duration) -> Result<ExecutorLoad, ScrapeError> {
    let fetch = async {
        let silent = ScrapeError::Silent;
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|e| silent(format!("connect: {e}")))?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| silent(format!("handshake: {e}")))?;
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .uri("/metrics")
            .header("host", address)
            .body(Empty::<bytes::Bytes>::new())
            .map_err(|e| ScrapeError::Unreadable(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| silent(format!("request: {e}")))?;
        let unreadable = ScrapeError::Unreadable;
        if !resp.status().is_success() {
            return Err(unreadable(format!("status {}", resp.status())));
        }
        let body = Limited::new(resp.into_body(), MAX_METRICS_BYTES)
            .collect()
            .await
            .map_err(|e| unreadable(format!("body: {e}")))?
            .to_bytes();
        let text =
            std::str::from_utf8(&body).map_err(|_| unreadable("body is not UTF-8".to_owned()))?;
        parse(text).ok_or_else(|| unreadable("no load metrics in the body".to_owned()))
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| ScrapeError::Silent(format!("no answer within {timeout:?}")))?
}

/// One round of scrapes.
#[derive(Debug, Default)]
pub struct Scraped {
    /// The loads read, by executor id.
    pub loads: HashMap<String, ExecutorLoad>,
    /// The executors that did not answer at all.
    pub silent: Vec<String>,
    /// How many answered (with a load or without).
    pub answered: usize,
}

/// Every `interval`, scrapes the pool's serving executors (ready, or ready but unresponsive:
/// those are watched until they answer again or are replaced), concurrently, each within the
/// interval, and sends what it read. Ends when the receiver or the status goes away.
pub fn spawn(
    pool: String,
    status: watch::Receiver<PoolStatus>,
    interval: Duration,
    results: mpsc::Sender<Scraped>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned: std::collections::HashSet<String> = Default::default();
        loop {
            tick.tick().await;
            if status.has_changed().is_err() {
                return;
            }
            let targets: Vec<(String, String)> = status
                .borrow()
                .executors
                .iter()
                .filter(|e| matches!(e.phase, "ready" | "unresponsive"))
                .filter_map(|e| Some((e.id.clone(), e.endpoint.clone()?)))
                .collect();
            let scrapes = targets.into_iter().map(|(id, address)| async move {
                let load = scrape(&address, interval).await;
                (id, load)
            });
            let mut round = Scraped::default();
            for (id, load) in futures_util::future::join_all(scrapes).await {
                if !matches!(load, Err(ScrapeError::Silent(_))) {
                    round.answered += 1;
                }
                match load {
                    Ok(load) => {
                        warned.remove(&id);
                        round.loads.insert(id, load);
                    }
                    Err(e) => {
                        if warned.insert(id.clone()) {
                            tracing::debug!(%pool, executor = %id, error = %e, "cannot read the executor's load from its /metrics");
                        }
                        if matches!(e, ScrapeError::Silent(_)) {
                            round.silent.push(id);
                        }
                    }
                }
            }
            if results.send(round).await.is_err() {
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_our_workers_metrics() {
        let text = "# HELP llmctl_worker_requests_running Requests in the running batch.\n\
            # TYPE llmctl_worker_requests_running gauge\n\
            llmctl_worker_requests_running 3\n\
            llmctl_worker_requests_waiting 2\n\
            llmctl_worker_kv_blocks_used 96\n\
            llmctl_worker_kv_blocks_total 128\n\
            llmctl_worker_time_to_first_token_seconds_bucket{le=\"0.1\"} 7\n\
            # EOF\n";
        assert_eq!(
            parse(text),
            Some(ExecutorLoad {
                running: 3.0,
                waiting: 2.0,
                kv_used: 0.75
            })
        );
    }

    #[test]
    fn reads_vllms_metrics_summed_over_models() {
        let text = "vllm:num_requests_running{engine=\"0\",model_name=\"a b\"} 4.0\n\
            vllm:num_requests_running{engine=\"0\",model_name=\"lora\"} 1.0\n\
            vllm:num_requests_waiting{engine=\"0\",model_name=\"a b\"} 7.0\n\
            vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"a b\"} 0.5\n";
        assert_eq!(
            parse(text),
            Some(ExecutorLoad {
                running: 5.0,
                waiting: 7.0,
                kv_used: 0.5
            })
        );
        let older = "vllm:num_requests_running 1\nvllm:gpu_cache_usage_perc 0.25\n";
        assert_eq!(parse(older).map(|l| l.kv_used), Some(0.25));
    }

    #[test]
    fn other_text_reads_as_nothing_and_bad_values_are_skipped() {
        assert_eq!(parse(""), None);
        assert_eq!(parse("process_cpu_seconds_total 12\n"), None);
        let bad = "llmctl_worker_requests_running NaN\nllmctl_worker_requests_running 2\n\
            llmctl_worker_kv_blocks_used 5\nllmctl_worker_kv_blocks_total 0\n";
        assert_eq!(
            parse(bad),
            Some(ExecutorLoad {
                running: 2.0,
                waiting: 0.0,
                kv_used: 0.0
            })
        );
    }

    /// A real HTTP server answers `/metrics`; an address nobody listens on is an error.
    #[tokio::test]
    async fn scrapes_over_http_and_reports_failures() {
        use std::convert::Infallible;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        |req: hyper::Request<hyper::body::Incoming>| async move {
                            assert_eq!(req.uri().path(), "/metrics");
                            let body = "llmctl_worker_requests_running 1\nllmctl_worker_kv_blocks_used 1\nllmctl_worker_kv_blocks_total 4\n";
                            Ok::<_, Infallible>(hyper::Response::new(http_body_util::Full::new(
                                bytes::Bytes::from_static(body.as_bytes()),
                            )))
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        let load = scrape(&addr, Duration::from_secs(2)).await.unwrap();
        assert_eq!(load.kv_used, 0.25);
        // Nothing listens on port 1.
        assert!(matches!(
            scrape("127.0.0.1:1", Duration::from_secs(2)).await,
            Err(ScrapeError::Silent(_))
        ));
        // Accepts and never answers: a frozen executor.
        let frozen = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let frozen_addr = frozen.local_addr().unwrap().to_string();
        let started = std::time::Instant::now();
        assert!(matches!(
            scrape(&frozen_addr, Duration::from_millis(200)).await,
            Err(ScrapeError::Silent(_))
        ));
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
