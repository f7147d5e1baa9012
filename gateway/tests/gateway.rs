//! The real `llmctl-gateway` binary, started on port 0 with a config file, in front of real
//! HTTP upstreams run in the test (a small OpenAI-shaped server whose behaviour each request
//! picks: slow, failing, dying mid-stream). Covers auth, limits and their headers, true-up,
//! streaming usage handling, retries, mid-stream death, queue deadline and disconnects,
//! fairness under a burst, TLS, HTTP/2, reload and bad input.

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use llmctl_protocol::{ChatCompletionChunk, ErrorResponse};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

// ---------- the fake upstream ----------

/// An OpenAI-shaped upstream. The user message text steers it: `slow:<ms>` waits first,
/// `fail500` answers 500, `die` streams two chunks then drops the connection.
async fn upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|req: hyper::Request<Incoming>| async move {
                        Ok::<_, Infallible>(answer(req).await)
                    });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

type UpBody = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

async fn answer(req: hyper::Request<Incoming>) -> hyper::Response<UpBody> {
    let correlation = req.headers().get("x-correlation-id").cloned();
    let request_id = req.headers().get("x-request-id").cloned();
    let body: Value =
        serde_json::from_slice(&req.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let text = body["messages"][0]["content"]
        .as_str()
        .or(body["prompt"].as_str())
        .unwrap_or("")
        .to_owned();
    if let Some(ms) = text
        .strip_prefix("slow:")
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let include_usage = body["stream_options"]["include_usage"]
        .as_bool()
        .unwrap_or(false);
    let mut builder =
        hyper::Response::builder().header("x-upstream-include-usage", include_usage.to_string());
    if let Some(c) = correlation {
        builder = builder.header("x-upstream-correlation", c);
    }
    if let Some(r) = request_id {
        builder = builder.header("x-upstream-request-id", r);
    }
    if text.contains("fail500") {
        return builder
            .status(500)
            .body(full(
                r#"{"error":{"message":"boom","type":"server_error","param":null,"code":null}}"#,
            ))
            .unwrap();
    }
    let usage = json!({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15});
    if body["stream"].as_bool() == Some(true) {
        let chunk = |content: &str| {
            let mut c = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                "choices": [{"index": 0, "delta": {"content": content}, "logprobs": null, "finish_reason": null}]});
            if include_usage {
                c["usage"] = Value::Null;
            }
            Ok::<_, std::io::Error>(Frame::data(Bytes::from(format!("data: {c}\n\n"))))
        };
        let mut frames = vec![chunk("Hel"), chunk("lo")];
        // `big:<n>`: n more chunks of about 1 kB, 64 to a frame.
        if let Some(n) = text
            .strip_prefix("big:")
            .and_then(|s| s.split_whitespace().next()?.parse::<usize>().ok())
        {
            let filler = "x".repeat(900);
            for start in (0..n).step_by(64) {
                let mut frame = Vec::new();
                for _ in start..n.min(start + 64) {
                    let Ok(f) = chunk(&filler) else {
                        unreachable!()
                    };
                    frame.extend_from_slice(f.data_ref().unwrap());
                }
                frames.push(Ok(Frame::data(Bytes::from(frame))));
            }
        }
        if text.contains("die") {
            frames.push(Err(std::io::Error::other("executor died")));
        } else {
            if include_usage {
                let u = json!({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": body["model"], "choices": [], "usage": usage});
                frames.push(Ok(Frame::data(Bytes::from(format!("data: {u}\n\n")))));
            }
            frames.push(Ok(Frame::data(Bytes::from_static(b"data: [DONE]\n\n"))));
        }
        let body = FrameBody {
            items: frames.into(),
            sleep: None,
            // `stall`: silent for 5 s after the first two chunks.
            pause_after: text
                .contains("stall")
                .then_some((2, Duration::from_secs(5))),
        };
        return builder
            .header("content-type", "text/event-stream")
            .body(BodyExt::boxed(body))
            .unwrap();
    }
    let resp = json!({"id": "c1", "object": "chat.completion", "created": 1, "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello", "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
        "usage": usage});
    builder
        .header("content-type", "application/json")
        .body(full(&resp.to_string()))
        .unwrap()
}

fn full(s: &str) -> UpBody {
    Full::new(Bytes::from(s.to_owned()))
        .map_err(|never| match never {})
        .boxed()
}

/// A body that yields the given frames with a short pause between them, so chunks arrive
/// separately; an `Err` frame makes the connection fail there.
struct FrameBody {
    items: std::collections::VecDeque<Result<Frame<Bytes>, std::io::Error>>,
    sleep: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// After this many frames, a pause this long.
    pause_after: Option<(usize, Duration)>,
}

impl hyper::body::Body for FrameBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        use std::future::Future;
        let pause = match self.pause_after {
            Some((0, pause)) => pause,
            _ => Duration::from_millis(5),
        };
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(pause)));
        if sleep.as_mut().poll(cx).is_pending() {
            return std::task::Poll::Pending;
        }
        self.sleep = None;
        self.pause_after = self
            .pause_after
            .and_then(|(n, p)| n.checked_sub(1).map(|n| (n, p)));
        std::task::Poll::Ready(self.items.pop_front())
    }
}

// ---------- the gateway under test ----------

fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

struct Gateway {
    child: Child,
    addr: String,
    config_path: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Two tenants (`alice`: key `ka`, high priority; `bob`: key `kb`) unless `tenants` replaces them.
fn config_text(endpoints: &[String], tenants: &str, extra: &str) -> String {
    let eps: String = endpoints
        .iter()
        .map(|a| format!("[[pools.endpoints]]\naddress = \"{a}\"\nmax_concurrency = 1\n"))
        .collect();
    format!(
        "listen = \"127.0.0.1:0\"\n{extra}\n{tenants}\n[[pools]]\nname = \"main\"\nmodels = [\"m\"]\n{eps}"
    )
}

fn default_tenants() -> String {
    format!(
        "[[tenants]]\nname = \"alice\"\npriority = \"high\"\nkeys = [\"sha256:{}\"]\n\n[[tenants]]\nname = \"bob\"\nkeys = [\"{}\"]\n",
        key_hash("ka"),
        key_hash("kb")
    )
}

impl Gateway {
    async fn start(config: String) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("gateway.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_llmctl-gateway"))
            .args(["--config", config_path.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("listening line {line:?}: {e}"));
        Gateway {
            child,
            addr: v["addr"].as_str().unwrap().to_owned(),
            config_path,
            _dir: dir,
        }
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> hyper::Response<Incoming> {
        send(&self.addr, method, path, key, headers, body).await
    }

    async fn chat(&self, key: &str, content: &str, extra: Value) -> (u16, hyper::HeaderMap, Value) {
        let mut body = json!({"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 10});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let r = self
            .send(
                "POST",
                "/v1/chat/completions",
                Some(key),
                &[],
                serde_json::to_vec(&body).unwrap(),
            )
            .await;
        let (status, headers) = (r.status().as_u16(), r.headers().clone());
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            headers,
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned())),
        )
    }

    async fn metrics(&self) -> String {
        let r = self.send("GET", "/metrics", None, &[], Vec::new()).await;
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }
}

async fn send(
    addr: &str,
    method: &str,
    path: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
    body: Vec<u8>,
) -> hyper::Response<Incoming> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "gw")
        .header("content-type", "application/json");
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    sender
        .send_request(req.body(Full::new(Bytes::from(body))).unwrap())
        .await
        .unwrap()
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name_and_labels)
                .and_then(|r| r.strip_prefix(' '))
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0.0)
}

fn error_code(body: &Value) -> String {
    let e: ErrorResponse = serde_json::from_value(body.clone())
        .unwrap_or_else(|e| panic!("not an OpenAI error body ({e}): {body}"));
    e.error.code.unwrap_or_default()
}

// ---------- tests ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_runtime_evidence_and_bad_input() {
    let up = upstream().await;
    let gw = Gateway::start(config_text(
        &[up.to_string()],
        &default_tenants(),
        "max_body_bytes = 2048",
    ))
    .await;
    let r = gw
        .send("POST", "/v1/chat/completions", None, &[], b"{}".to_vec())
        .await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        error_code(
            &serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap()
        ),
        "missing_api_key"
    );
    let (status, _, body) = gw.chat("wrong", "hi", json!({})).await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (401, "invalid_api_key")
    );

    let r = gw
        .send(
            "POST",
            "/v1/chat/completions",
            Some("kb"),
            &[("x-request-id", "req-123"), ("x-correlation-id", "corr-9")],
            serde_json::to_vec(
                &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
            )
            .unwrap(),
        )
        .await;
    assert_eq!(r.status(), 200);
    let h = r.headers();
    assert_eq!(h["x-request-id"], "req-123");
    assert_eq!(h["x-correlation-id"], "corr-9");
    assert_eq!(
        h["x-upstream-correlation"], "corr-9",
        "passed through to the executor"
    );
    assert_eq!(h["x-upstream-request-id"], "req-123");
    assert_eq!(h["x-llmctl-pool"], "main");
    assert_eq!(h["x-llmctl-executor"], up.to_string().as_str());
    assert!(!h["x-llmctl-dispatch-id"].is_empty());
    assert!(
        h["x-llmctl-queue-ms"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .is_ok()
    );
    // A request id is made when none is given.
    let (_, h, _) = gw.chat("kb", "hi", json!({})).await;
    assert_eq!(h["x-request-id"].len(), 32);

    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "/v1/chat/completions",
            b"{not json".to_vec(),
            400,
            "invalid_json",
        ),
        (
            "/v1/chat/completions",
            br#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":"two"}"#.to_vec(),
            400,
            "invalid_json",
        ),
        (
            "/v1/chat/completions",
            br#"{"model":"m","messages":[]}"#.to_vec(),
            400,
            "invalid_value",
        ),
        (
            "/v1/chat/completions",
            br#"{"model":"other","messages":[{"role":"user","content":"x"}]}"#.to_vec(),
            404,
            "model_not_found",
        ),
        (
            "/v1/completions",
            br#"{"model":"m"}"#.to_vec(),
            400,
            "invalid_json",
        ),
        (
            "/v1/completions",
            vec![b' '; 4000],
            413,
            "request_too_large",
        ),
        ("/v2/anything", b"{}".to_vec(), 404, "not_found"),
    ];
    for (path, body, status, code) in cases {
        let r = gw.send("POST", path, Some("kb"), &[], body).await;
        assert_eq!(r.status(), status, "{path}");
        let body: Value =
            serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
        assert_eq!(error_code(&body), code, "{path}: {body}");
    }
    let r = gw
        .send("GET", "/v1/chat/completions", Some("kb"), &[], Vec::new())
        .await;
    assert_eq!(r.status(), 405);
    let r = gw
        .send("GET", "/v1/models", Some("kb"), &[], Vec::new())
        .await;
    let models: Value =
        serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(models["data"][0]["id"], "m");
    assert!(
        metric(
            &gw.metrics().await,
            "llmctl_gateway_requests_total{pool=\"main\",tenant=\"bob\",status=\"200\"}"
        ) >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_refuse_with_headers_and_true_up_from_usage() {
    let up = upstream().await;
    let tenants = format!(
        "[[tenants]]\nname = \"rpm\"\nrequests_per_minute = 2\nkeys = [\"{}\"]\n[[tenants]]\nname = \"tpm\"\ntokens_per_minute = 1000\nkeys = [\"{}\"]\n",
        key_hash("r"),
        key_hash("t")
    );
    let gw = Gateway::start(config_text(&[up.to_string()], &tenants, "")).await;
    let (status, h, _) = gw.chat("r", "hi", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(h["x-ratelimit-limit-requests"], "2");
    assert_eq!(h["x-ratelimit-remaining-requests"], "1");
    assert!(h.contains_key("x-ratelimit-reset-requests"));
    gw.chat("r", "hi", json!({})).await;
    let (status, h, body) = gw.chat("r", "hi", json!({})).await;
    assert_eq!(status, 429);
    assert_eq!(error_code(&body), "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "requests");
    assert!(h["retry-after"].to_str().unwrap().parse::<u64>().unwrap() >= 1);
    // The refusal carries the limits' state too.
    assert_eq!(h["x-ratelimit-limit-requests"], "2");
    assert_eq!(h["x-ratelimit-remaining-requests"], "0");
    assert!(h.contains_key("x-ratelimit-reset-requests"));

    // 600 tokens charged up front, 15 used: after the true-up a second 600-token request fits
    // in the 1000-token minute; without it, it would not.
    let (status, h, _) = gw.chat("t", "hi", json!({"max_tokens": 600})).await;
    assert_eq!(status, 200);
    assert_eq!(h["x-ratelimit-limit-tokens"], "1000");
    let (status, _, body) = gw.chat("t", "hi", json!({"max_tokens": 600})).await;
    assert_eq!(status, 200, "true-up refunded the unused charge: {body}");
    // A request larger than the whole minute can never be admitted: a 400 that names the
    // field, without Retry-After (SDKs retry a 429 forever).
    let (status, h, body) = gw.chat("t", "hi", json!({"max_tokens": 5000})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(error_code(&body), "request_exceeds_limit");
    assert_eq!(body["error"]["param"], "max_tokens");
    assert!(!h.contains_key("retry-after"));
    assert_eq!(h["x-ratelimit-limit-tokens"], "1000");
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "llmctl_gateway_rate_limited_total{tenant=\"rpm\",kind=\"requests\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_get_usage_only_when_asked_and_die_with_an_error_event() {
    let up = upstream().await;
    let gw = Gateway::start(config_text(&[up.to_string()], &default_tenants(), "")).await;
    let read = |r: hyper::Response<Incoming>| async move {
        assert_eq!(
            r.headers()["x-upstream-include-usage"],
            "true",
            "the gateway always asks for usage"
        );
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    };
    let body = |extra: Value, content: &str| {
        let mut b = json!({"model": "m", "messages": [{"role": "user", "content": content}], "stream": true});
        for (k, v) in extra.as_object().unwrap() {
            b[k] = v.clone();
        }
        serde_json::to_vec(&b).unwrap()
    };
    let text = read(
        gw.send(
            "POST",
            "/v1/chat/completions",
            Some("ka"),
            &[],
            body(json!({}), "hi"),
        )
        .await,
    )
    .await;
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.is_empty() && !e.starts_with(':'))
        .collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    for e in &events[..events.len() - 1] {
        let chunk: ChatCompletionChunk =
            serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap();
        assert!(
            chunk.usage.is_none(),
            "no usage for a client that did not ask: {e}"
        );
        assert!(!chunk.choices.is_empty());
    }
    let text = read(
        gw.send(
            "POST",
            "/v1/chat/completions",
            Some("ka"),
            &[],
            body(json!({"stream_options": {"include_usage": true}}), "hi"),
        )
        .await,
    )
    .await;
    assert!(text.contains("\"total_tokens\":15"), "{text}");

    let text = read(
        gw.send(
            "POST",
            "/v1/chat/completions",
            Some("ka"),
            &[],
            body(json!({}), "die"),
        )
        .await,
    )
    .await;
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.is_empty() && !e.starts_with(':'))
        .collect();
    assert!(events[0].contains("Hel"));
    let err: ErrorResponse =
        serde_json::from_str(events[events.len() - 2].strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(err.error.code.as_deref(), Some("upstream_failed"));
    assert_eq!(events.last(), Some(&"data: [DONE]"));
    // The terminal reason, as a comment event just before `[DONE]`.
    assert!(
        text.contains(": llmctl-finish reason=upstream_error"),
        "{text}"
    );
    assert_eq!(
        metric(
            &gw.metrics().await,
            "llmctl_gateway_upstream_errors_total{pool=\"main\",reason=\"mid_stream\"}"
        ),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_and_5xx_are_retried_on_another_executor() {
    let up = upstream().await;
    // A port with nothing listening: bind, read the port, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    // Without affinity, ties go to the first endpoint: the dead one is tried first.
    let gw = Gateway::start(config_text(
        &[dead.clone(), up.to_string()],
        &default_tenants(),
        "[queue]\nprefix_affinity = false\neject_after_failures = 1\neject_cooldown_ms = 300\n",
    ))
    .await;
    for _ in 0..3 {
        let (status, h, _) = gw.chat("kb", "hi", json!({})).await;
        assert_eq!(status, 200);
        assert_eq!(h["x-llmctl-executor"], up.to_string().as_str());
    }
    let m = gw.metrics().await;
    assert!(
        metric(&m, "llmctl_gateway_retries_total{pool=\"main\"}") >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            &format!(
                "llmctl_gateway_endpoint_ejections_total{{pool=\"main\",endpoint=\"{dead}\"}}"
            )
        ),
        1.0,
        "{m}"
    );
    // An upstream 5xx is retried too; with every executor failing, the client gets the 5xx.
    let (status, _, body) = gw.chat("kb", "fail500", json!({})).await;
    assert_eq!(status, 500, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_deadline_disconnect_and_fairness() {
    let up = upstream().await;
    let gw = Arc::new(
        Gateway::start(config_text(
            &[up.to_string()],
            &default_tenants(),
            "[queue]\ndeadline_ms = 400\n",
        ))
        .await,
    );
    // The only slot is busy for 1.5 s: a queued request passes its deadline.
    let busy = tokio::spawn({
        let gw = gw.clone();
        async move { gw.chat("kb", "slow:1500", json!({})).await.0 }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    let (status, h, body) = gw.chat("kb", "hi", json!({})).await;
    assert_eq!((status, error_code(&body).as_str()), (503, "no_capacity"));
    assert!(h.contains_key("retry-after"));
    assert!(
        started.elapsed() >= Duration::from_millis(350)
            && started.elapsed() < Duration::from_millis(1200)
    );

    // A client that gives up while queued leaves the queue at once.
    let waiting = tokio::spawn({
        let addr = gw.addr.clone();
        async move {
            let body = serde_json::to_vec(
                &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
            )
            .unwrap();
            send(&addr, "POST", "/v1/chat/completions", Some("kb"), &[], body).await
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        metric(
            &gw.metrics().await,
            "llmctl_gateway_queue_depth{pool=\"main\"}"
        ),
        1.0
    );
    waiting.abort();
    let deadline = Instant::now() + Duration::from_secs(2);
    while metric(
        &gw.metrics().await,
        "llmctl_gateway_queue_left_total{pool=\"main\",reason=\"client_gone\"}",
    ) != 1.0
    {
        assert!(Instant::now() < deadline, "the cancelled entry never left");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        metric(
            &gw.metrics().await,
            "llmctl_gateway_queue_depth{pool=\"main\"}"
        ),
        0.0
    );
    assert_eq!(busy.await.unwrap(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_burst_does_not_starve_another() {
    let up = upstream().await;
    let both_normal = format!(
        "[[tenants]]\nname = \"burst\"\nkeys = [\"{}\"]\n[[tenants]]\nname = \"calm\"\nkeys = [\"{}\"]\n",
        key_hash("kx"),
        key_hash("ky")
    );
    let gw = Arc::new(Gateway::start(config_text(&[up.to_string()], &both_normal, "")).await);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (gw, tx) = (gw.clone(), tx.clone());
        tasks.push(tokio::spawn(async move {
            gw.chat("kx", "slow:60", json!({})).await;
            tx.send(format!("burst{i}")).unwrap();
        }));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let calm = tokio::spawn({
        let (gw, tx) = (gw.clone(), tx.clone());
        async move {
            gw.chat("ky", "slow:60", json!({})).await;
            tx.send("calm".to_owned()).unwrap();
        }
    });
    calm.await.unwrap();
    for t in tasks {
        t.await.unwrap();
    }
    drop(tx);
    let mut order = Vec::new();
    while let Some(n) = rx.recv().await {
        order.push(n);
    }
    let position = order.iter().position(|n| n == "calm").unwrap();
    assert!(
        position <= 2,
        "the calm tenant waited behind the burst: {order:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_swaps_keys_without_restart() {
    let up = upstream().await;
    let gw = Gateway::start(config_text(&[up.to_string()], &default_tenants(), "")).await;
    assert_eq!(gw.chat("kb", "hi", json!({})).await.0, 200);
    let rotated = default_tenants().replace(&key_hash("kb"), &key_hash("kb2"));
    std::fs::write(
        &gw.config_path,
        config_text(&[up.to_string()], &rotated, ""),
    )
    .unwrap();
    assert!(
        Command::new("kill")
            .args(["-HUP", &gw.child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while gw.chat("kb2", "hi", json!({})).await.0 != 200 {
        assert!(Instant::now() < deadline, "the new key never worked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        gw.chat("kb", "hi", json!({})).await.0,
        401,
        "the old key is gone"
    );
    // A broken file is ignored: the gateway keeps serving with the last good config.
    std::fs::write(&gw.config_path, "listen = 5").unwrap();
    assert!(
        Command::new("kill")
            .args(["-HUP", &gw.child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(gw.chat("kb2", "hi", json!({})).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_http2() {
    let up = upstream().await;
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    let tls = format!(
        "[tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert_path.display(),
        key_path.display()
    );
    let gw = Gateway::start(config_text(&[up.to_string()], &default_tenants(), &tls)).await;

    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.cert.der().clone()).unwrap();
    let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    client.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
    let tcp = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
    let tls_stream = connector
        .connect(
            rustls_pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    assert_eq!(tls_stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls_stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method("POST")
        .uri("https://localhost/v1/chat/completions")
        .header("authorization", "Bearer ka")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(
            serde_json::to_vec(
                &json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
            )
            .unwrap(),
        )))
        .unwrap();
    let r = sender.send_request(req).await.unwrap();
    assert_eq!(r.version(), hyper::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    let body: Value =
        serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
    assert_eq!(body["choices"][0]["message"]["content"], "Hello");
    // Plain HTTP to a TLS port gets nowhere.
    let plain = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
    let handshake = tokio::time::timeout(Duration::from_secs(5), async {
        let (mut s, c) =
            hyper::client::conn::http1::handshake::<_, Full<Bytes>>(TokioIo::new(plain))
                .await
                .ok()?;
        tokio::spawn(c);
        s.send_request(
            hyper::Request::builder()
                .uri("/healthz")
                .body(Full::new(Bytes::new()))
                .unwrap(),
        )
        .await
        .ok()
    })
    .await
    .unwrap();
    assert!(handshake.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_header_client_is_cut_off() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = upstream().await;
    let gw = Gateway::start(config_text(
        &[up.to_string()],
        &default_tenants(),
        "header_read_timeout_ms = 300",
    ))
    .await;
    let mut tcp = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
    tcp.write_all(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    // The gateway closes the connection (possibly after a 408) instead of waiting forever.
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut buf)).await;
    assert!(read.is_ok(), "the connection stayed open");
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert!(
        buf.is_empty() || buf.starts_with(b"HTTP/1.1 408"),
        "{}",
        String::from_utf8_lossy(&buf)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests_and_refuses_new_ones() {
    let up = upstream().await;
    let mut gw = Gateway::start(config_text(
        &[up.to_string()],
        &default_tenants(),
        "drain_grace_secs = 30",
    ))
    .await;
    let slow = tokio::spawn({
        let addr = gw.addr.clone();
        async move {
            let body = serde_json::to_vec(
                &json!({"model": "m", "messages": [{"role": "user", "content": "slow:800"}]}),
            )
            .unwrap();
            let r = send(&addr, "POST", "/v1/chat/completions", Some("kb"), &[], body).await;
            let status = r.status().as_u16();
            let body: Value =
                serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
            (status, body)
        }
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let pid = gw.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let r = gw.send("GET", "/readyz", None, &[], Vec::new()).await;
    assert_eq!(r.status(), 503);
    let (status, h, body) = gw.chat("kb", "hi", json!({})).await;
    assert_eq!((status, error_code(&body).as_str()), (503, "shutting_down"));
    assert!(h.contains_key("retry-after"));
    let (status, body) = slow.await.unwrap();
    assert_eq!(status, 200, "the in-flight request finished: {body}");
    assert_eq!(body["choices"][0]["message"]["content"], "Hello");
    let exit = gw.child.wait().unwrap();
    assert_eq!(exit.code(), Some(0));
}

// ---------- a double of the pool controller's control API ----------

/// Serves `GET /v1/endpoints?watch=true` (every value of `snapshots` as an NDJSON line) and
/// records `POST /v1/demand` bodies; raw HTTP/1.1, so the test controls every byte. Aborting
/// the returned task closes the listener and every connection (the controller "dies").
async fn fake_controller(
    snapshots: tokio::sync::watch::Receiver<Value>,
    demand: tokio::sync::mpsc::UnboundedSender<Value>,
) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let (mut snapshots, demand) = (snapshots.clone(), demand.clone());
            connections.spawn(async move {
                let mut stream = tokio::io::BufReader::new(stream);
                loop {
                    let mut head = Vec::new();
                    let mut length = 0;
                    loop {
                        let mut line = String::new();
                        if stream.read_line(&mut line).await.unwrap_or(0) == 0 {
                            return;
                        }
                        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap();
                        }
                        if line == "\r\n" {
                            break;
                        }
                        head.push(line);
                    }
                    if head[0].starts_with("POST /v1/demand") {
                        let mut body = vec![0; length];
                        stream.read_exact(&mut body).await.unwrap();
                        let _ = demand.send(serde_json::from_slice(&body).unwrap());
                        let ok = b"HTTP/1.1 204 No Content\r\n\r\n";
                        if stream.write_all(ok).await.is_err() {
                            return;
                        }
                        continue;
                    }
                    assert!(head[0].starts_with("GET /v1/endpoints?watch=true"), "{head:?}");
                    let ok = "HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\nconnection: close\r\n\r\n";
                    stream.write_all(ok.as_bytes()).await.unwrap();
                    loop {
                        let line = format!("{}\n", *snapshots.borrow_and_update());
                        if stream.write_all(line.as_bytes()).await.is_err()
                            || snapshots.changed().await.is_err()
                        {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follows_the_controller_and_keeps_the_last_endpoints_when_it_goes_away() {
    let up = upstream().await;
    let (snapshots, snapshots_rx) =
        tokio::sync::watch::channel(json!({"revision": 1, "pools": {"main": []}}));
    let (demand_tx, mut demand) = tokio::sync::mpsc::unbounded_channel();
    let (controller, controller_task) = fake_controller(snapshots_rx, demand_tx).await;
    let gw = Arc::new(
        Gateway::start(config_text(
            &[],
            &default_tenants(),
            &format!("[controller]\nurl = \"http://{controller}\"\nreport_interval_ms = 100\ngateway_id = \"gw-test\"\n"),
        ))
        .await,
    );

    // No executor yet: the request waits, and the gateway says so in its demand reports.
    let waiting = tokio::spawn({
        let gw = gw.clone();
        async move { gw.chat("kb", "hi", json!({})).await }
    });
    let report = loop {
        let r = tokio::time::timeout(Duration::from_secs(10), demand.recv())
            .await
            .expect("demand reports arrive")
            .unwrap();
        if r["pools"][0]["queued"] == 1 {
            break r;
        }
    };
    assert_eq!(report["gateway"], "gw-test");
    assert_eq!(report["pools"][0]["pool"], "main");
    // No history yet: the request's max_tokens.
    assert_eq!(report["pools"][0]["decode_tokens"], 10);

    // The controller publishes an executor: the queued request is dispatched to it.
    let endpoint = json!({"name": "exec-1", "address": up.to_string(), "max_concurrency": 4});
    snapshots.send_replace(json!({"revision": 2, "pools": {"main": [endpoint]}}));
    let (status, headers, _) = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("dispatched once an endpoint appears")
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(headers["x-llmctl-executor"], "exec-1");

    // Once enough requests have finished (each generating 5 tokens), a request's expected
    // decode is what the pool generates, not its max_tokens ceiling: two choices, 10 tokens.
    for _ in 0..llmctl_protocol::demand::MIN_SAMPLES {
        assert_eq!(gw.chat("ka", "hi", json!({})).await.0, 200);
    }
    let running = tokio::spawn({
        let gw = gw.clone();
        async move {
            gw.chat("ka", "slow:1500", json!({"max_tokens": 1000, "n": 2}))
                .await
        }
    });
    let report = loop {
        let r = tokio::time::timeout(Duration::from_secs(10), demand.recv())
            .await
            .expect("demand reports arrive")
            .unwrap();
        if r["pools"][0]["in_flight"] == 1 {
            break r;
        }
    };
    assert_eq!(report["pools"][0]["decode_tokens"], 10);
    assert_eq!(running.await.unwrap().0, 200);

    // The controller dies: the gateway keeps serving from the last endpoint set.
    controller_task.abort();
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..3 {
        let (status, headers, _) = gw.chat("ka", "still here", json!({})).await;
        assert_eq!(status, 200);
        assert_eq!(headers["x-llmctl-executor"], "exec-1");
    }
}

/// Opens a stream and never reads it, from a socket with a small receive buffer.
async fn stalled_stream(addr: &str, content: &str) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut tcp = socket.connect(addr.parse().unwrap()).await.unwrap();
    let body = serde_json::to_vec(&json!({"model": "m", "stream": true,
        "messages": [{"role": "user", "content": content}]}))
    .unwrap();
    let head = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\nauthorization: Bearer kb\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    tcp.write_all(&body).await.unwrap();
    tcp
}

/// A client that stops reading its stream costs a bounded buffer, not the executor: when the
/// executor's answer fits the buffer its slot is free as soon as the executor is done; when it
/// does not, the request ends after the write-stall timeout (`client_stalled`) and frees it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_holds_no_executor_slot() {
    let up = upstream().await;
    let gw = Gateway::start(config_text(
        &[up.to_string()],
        &default_tenants(),
        "write_stall_timeout_ms = 2000",
    ))
    .await;
    // 200 kB: buffered whole; the one slot (max_concurrency 1) is free at once.
    let _small = stalled_stream(&gw.addr, "big:200").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let (status, _, _) = gw.chat("kb", "hi", json!({})).await;
    assert_eq!(status, 200);
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "waited {:?} for a slot a stalled reader held",
        started.elapsed()
    );
    // 16 MB: more than the buffer and the sockets hold; ended after the stall timeout.
    let _big = stalled_stream(&gw.addr, "big:16000").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let (status, _, _) = gw.chat("kb", "hi", json!({})).await;
    assert_eq!(status, 200);
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(4),
        "the stalled reader kept the slot for {waited:?}"
    );
    // Seen by the connection (its socket took nothing: HTTP/1) or by the relay (its buffer
    // stayed full), whichever comes first.
    let m = gw.metrics().await;
    let stalls = |m: &str| {
        metric(m, "llmctl_gateway_client_stalled_total{pool=\"main\"}")
            + metric(m, "llmctl_gateway_http_write_stalls_total")
    };
    assert_eq!(stalls(&m), 1.0, "{m}");
    // HTTP/2: a stream whose client reads nothing keeps its flow-control window closed while the
    // connection itself stays lively; the relay's buffer is what notices.
    let tcp = tokio::net::TcpStream::connect(&gw.addr).await.unwrap();
    let (mut h2, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let body = serde_json::to_vec(&json!({"model": "m", "stream": true,
        "messages": [{"role": "user", "content": "big:16000"}]}))
    .unwrap();
    let request = hyper::Request::post("/v1/chat/completions")
        .header("authorization", "Bearer kb")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let unread = h2.send_request(request).await.unwrap();
    assert_eq!(unread.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let (status, _, _) = gw.chat("kb", "hi", json!({})).await;
    assert_eq!(status, 200);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    let m = gw.metrics().await;
    assert_eq!(stalls(&m), 2.0, "{m}");
    assert_eq!(
        metric(&m, "llmctl_gateway_client_stalled_total{pool=\"main\"}"),
        1.0,
        "{m}"
    );
    drop(unread);
    assert_eq!(
        metric(
            &m,
            &format!("llmctl_gateway_endpoint_inflight{{pool=\"main\",endpoint=\"{up}\"}}")
        ),
        0.0
    );
}

/// An executor that never answers, or stops mid-stream without closing, is timed out: a 504
/// in OpenAI format, or an error event and `[DONE]` in the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_executor_is_timed_out() {
    let up = upstream().await;
    let gw = Gateway::start(config_text(
        &[up.to_string()],
        &default_tenants(),
        "upstream_response_timeout_ms = 300\nupstream_idle_timeout_ms = 300\n[queue]\nmax_retries = 0\n",
    ))
    .await;
    let started = Instant::now();
    let (status, _, body) = gw.chat("kb", "slow:3000", json!({})).await;
    assert_eq!(
        (status, error_code(&body).as_str()),
        (504, "upstream_timeout")
    );
    assert!(started.elapsed() < Duration::from_secs(2));

    let started = Instant::now();
    let r = gw
        .send(
            "POST",
            "/v1/chat/completions",
            Some("kb"),
            &[],
            serde_json::to_vec(&json!({"model": "m", "stream": true,
                "messages": [{"role": "user", "content": "stall"}]}))
            .unwrap(),
        )
        .await;
    assert_eq!(r.status(), 200);
    let text =
        String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
    assert!(started.elapsed() < Duration::from_secs(3));
    let events: Vec<&str> = text
        .split("\n\n")
        .filter(|e| !e.is_empty() && !e.starts_with(':'))
        .collect();
    assert_eq!(events.last(), Some(&"data: [DONE]"), "{text}");
    assert!(
        events[events.len() - 2].contains("upstream_failed"),
        "{text}"
    );
    assert!(text.contains(": llmctl-finish reason=timeout"), "{text}");
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "llmctl_gateway_upstream_errors_total{pool=\"main\",reason=\"timeout\"}"
        ),
        1.0,
        "{m}"
    );
}
