//! Pools of hosted upstreams: the real `llmctl-gateway` binary in front of local HTTPS
//! stand-ins for an OpenAI-compatible provider (hyper over rustls, certificates from rcgen;
//! named as stand-ins: no provider is reachable from tests). Covers TLS with a configured CA,
//! HTTP/2 by ALPN, provider keys from a file and from the environment (sent only upstream,
//! never logged), model mapping, streaming with usage, a provider's 429 with `retry-after`
//! (served elsewhere, or later), a provider that stops answering (504), and tenant model
//! access.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Value, json};

use common::{Body, Gateway, full, header, key_hash};

/// What a stand-in saw of one request.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    version: hyper::Version,
    authorization: Option<String>,
    dispatch_id: Option<String>,
    body: Value,
}

#[derive(Default)]
struct StandInState {
    seen: Vec<Seen>,
    /// Answer the next this many requests with 429 and this `retry-after`.
    throttle: (u32, &'static str),
    /// Never answer (a provider that hangs).
    silent: bool,
}

/// A local HTTPS stand-in for an OpenAI-compatible provider at `https://localhost:PORT/v1`.
struct StandIn {
    url: String,
    state: Arc<Mutex<StandInState>>,
}

impl StandIn {
    async fn start(cert: &rcgen::CertifiedKey<rcgen::KeyPair>) -> StandIn {
        let state = Arc::new(Mutex::new(StandInState::default()));
        let shared = state.clone();
        let port = common::https_server(cert, move |req| answer(req, shared.clone())).await;
        StandIn {
            url: format!("https://localhost:{port}/v1"),
            state,
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }
}

async fn answer(
    req: hyper::Request<Incoming>,
    state: Arc<Mutex<StandInState>>,
) -> hyper::Response<Body> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    let (authorization, dispatch_id) = (header("authorization"), header("x-llmctl-dispatch-id"));
    let (path, version) = (req.uri().path().to_owned(), req.version());
    let body: Value =
        serde_json::from_slice(&req.into_body().collect().await.unwrap().to_bytes()).unwrap();
    let (throttled, silent) = {
        let mut s = state.lock().unwrap();
        s.seen.push(Seen {
            path,
            version,
            authorization,
            dispatch_id,
            body: body.clone(),
        });
        let throttled = (s.throttle.0 > 0).then(|| {
            s.throttle.0 -= 1;
            s.throttle.1
        });
        (throttled, s.silent)
    };
    if silent {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    if let Some(after) = throttled {
        return hyper::Response::builder()
            .status(429)
            .header("retry-after", after)
            .header("content-type", "application/json")
            .body(full(
                json!({"error": {"message": "Rate limit reached", "type": "requests", "param": null, "code": "rate_limit_exceeded"}}).to_string(),
            ))
            .unwrap();
    }
    let path = state.lock().unwrap().seen.last().unwrap().path.clone();
    if path.ends_with("/embeddings") {
        let e = json!({"object": "list", "model": body["model"],
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
            "usage": {"prompt_tokens": 4, "total_tokens": 4}});
        return hyper::Response::builder()
            .header("content-type", "application/json")
            .body(full(e.to_string()))
            .unwrap();
    }
    if path.ends_with("/responses") {
        let response = json!({"id": "resp_1", "object": "response", "status": "completed", "model": body["model"],
            "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hello"}]}],
            "usage": {"input_tokens": 5, "output_tokens": 2, "total_tokens": 7}});
        if body["stream"] == true {
            // The Responses API's stream: named events, no `[DONE]`.
            let events: String = [
                json!({"type": "response.created", "response": {"id": "resp_1", "status": "in_progress"}}),
                json!({"type": "response.output_text.delta", "delta": "Hello"}),
                json!({"type": "response.completed", "response": response}),
            ]
            .iter()
            .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()))
            .collect();
            return hyper::Response::builder()
                .header("content-type", "text/event-stream")
                .body(full(events))
                .unwrap();
        }
        return hyper::Response::builder()
            .header("content-type", "application/json")
            .body(full(response.to_string()))
            .unwrap();
    }
    let usage = json!({"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15});
    if body["stream"] == true {
        let mut events = String::new();
        for piece in ["Hel", "lo"] {
            let c = json!({"id": "p1", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}]});
            events.push_str(&format!("data: {c}\n\n"));
        }
        if body["stream_options"]["include_usage"] == true {
            let u = json!({"id": "p1", "object": "chat.completion.chunk", "created": 1, "model": body["model"], "choices": [], "usage": usage});
            events.push_str(&format!("data: {u}\n\n"));
        }
        events.push_str("data: [DONE]\n\n");
        return hyper::Response::builder()
            .header("content-type", "text/event-stream")
            .body(full(events))
            .unwrap();
    }
    let resp = json!({"id": "p1", "object": "chat.completion", "created": 1, "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}],
        "usage": usage});
    hyper::Response::builder()
        .header("content-type", "application/json")
        .body(full(resp.to_string()))
        .unwrap()
}

/// Two stand-ins behind one pool (key from a file, key from the environment), one behind a
/// second pool alone; a CA file trusting the stand-ins' certificate.
struct Setup {
    a: StandIn,
    b: StandIn,
    solo: StandIn,
    gw: Gateway,
}

const KEY_A: &str = "sk-standin-a-7f3c9e1d";
const KEY_B: &str = "sk-standin-b-2b8a4f60";

/// `extra` goes before the tenants (top-level settings), `pools` after the pools, with
/// `{A_URL}` and `{CA}` standing for stand-in A's URL and the CA file.
async fn setup(extra: &str, pools: &str) -> Setup {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (a, b, solo) = (
        StandIn::start(&cert).await,
        StandIn::start(&cert).await,
        StandIn::start(&cert).await,
    );
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let key_file = dir.path().join("key-a");
    std::fs::write(&key_file, format!("{KEY_A}\n")).unwrap();
    let config = format!(
        r#"listen = "127.0.0.1:0"
upstream_response_timeout_ms = 2000
{extra}

[[tenants]]
name = "studio"
keys = ["{studio}"]

[[tenants]]
name = "narrow"
keys = ["{narrow}"]
models = ["gpt-mini"]

[[pools]]
name = "frontier"
models = ["gpt-mini", "gpt-big"]

[[pools.upstreams]]
name = "provider-a"
url = "{a}"
key_file = "{key_file}"
ca_file = "{ca}"
models = {{ "gpt-mini" = "provider-mini-2025" }}

[[pools.upstreams]]
name = "provider-b"
url = "{b}"
key_env = "STANDIN_B_KEY"
ca_file = "{ca}"
models = {{ "gpt-mini" = "provider-mini-2025" }}

[[pools]]
name = "solo"
models = ["solo-model"]

[[pools.upstreams]]
name = "provider-solo"
url = "{solo}"
key_env = "STANDIN_B_KEY"
ca_file = "{ca}"
{solo_models}
{pools}
"#,
        // The spill test's `cold` pool falls back to `solo`, whose upstream maps its model.
        solo_models = if pools.contains("\"llama\"") {
            r#"models = { "llama" = "provider-llama" }"#
        } else {
            ""
        },
        studio = key_hash("ks"),
        narrow = key_hash("kn"),
        a = a.url,
        b = b.url,
        solo = solo.url,
        key_file = key_file.display(),
        ca = ca.display(),
    )
    .replace("{A_URL}", &a.url)
    .replace("{CA}", &ca.display().to_string());
    let gw = Gateway::start(dir, &config, &[("STANDIN_B_KEY", KEY_B)]);
    Setup { a, b, solo, gw }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosted_upstreams_over_https_with_keys_mapping_and_streams() {
    let s = setup("", "").await;
    // Non-streamed, spread over both upstreams by least outstanding.
    let mut executors = Vec::new();
    for _ in 0..4 {
        let (status, h, body) = s.gw.chat("ks", "gpt-mini", json!({})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["message"]["content"], "Hello");
        assert_eq!(header(&h, "x-llmctl-pool"), "frontier");
        assert!(!header(&h, "x-llmctl-dispatch-id").is_empty());
        assert!(!header(&h, "x-request-id").is_empty());
        executors.push(header(&h, "x-llmctl-executor").to_owned());
    }
    assert!(executors.iter().any(|e| e == "provider-a"), "{executors:?}");
    let seen: Vec<Seen> = s.a.seen().into_iter().chain(s.b.seen()).collect();
    assert_eq!(seen.len(), 4);
    for (upstream, key) in [(&s.a, KEY_A), (&s.b, KEY_B)] {
        for r in upstream.seen() {
            // Each key goes to its own upstream only, over HTTP/2 (offered by ALPN).
            assert_eq!(r.authorization.as_deref(), Some(&*format!("Bearer {key}")));
            assert_eq!(r.version, hyper::Version::HTTP_2);
            assert_eq!(r.path, "/v1/chat/completions");
            // The public name is mapped to the provider's; the rest passes unchanged.
            assert_eq!(r.body["model"], "provider-mini-2025");
            assert_eq!(r.body["max_tokens"], 10);
            assert!(r.dispatch_id.is_some());
        }
    }
    // A model without a mapping goes under its own name.
    let (status, _, _) = s.gw.chat("ks", "gpt-big", json!({})).await;
    assert_eq!(status, 200);
    let all: Vec<Seen> = s.a.seen().into_iter().chain(s.b.seen()).collect();
    assert!(all.iter().any(|r| r.body["model"] == "gpt-big"));

    // Streamed: the usage chunk the gateway asked for is read, and removed unless the client
    // asked for it too.
    let (status, h, body) = s.gw.chat("ks", "gpt-mini", json!({"stream": true})).await;
    assert_eq!(status, 200);
    assert!(header(&h, "content-type").starts_with("text/event-stream"));
    let text = body.as_str().unwrap();
    assert!(
        text.contains("Hel") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
    assert!(!text.contains("\"usage\""), "{text}");
    let (_, _, body) =
        s.gw.chat(
            "ks",
            "gpt-mini",
            json!({"stream": true, "stream_options": {"include_usage": true}}),
        )
        .await;
    assert!(body.as_str().unwrap().contains("\"total_tokens\":15"));

    // Per-tenant token counters from the providers' usage.
    let (_, _, metrics) = s.gw.request("GET", "/metrics", "ks", Value::Null).await;
    let metrics = String::from_utf8(metrics).unwrap();
    let tokens = |kind: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("llmctl_gateway_tokens_total{")
                    && l.contains("tenant=\"studio\"")
                    && l.contains(&format!("kind=\"{kind}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert_eq!(tokens("prompt"), 7.0 * 12.0, "{metrics}");
    assert_eq!(tokens("completion"), 7.0 * 3.0);

    // The keys appear nowhere in the gateway's log (at debug).
    let log = s.gw.log();
    assert!(log.contains("request finished"), "the log is being written");
    assert!(!log.contains(KEY_A) && !log.contains(KEY_B));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_providers_429_is_served_elsewhere_or_after_its_retry_after() {
    let s = setup("", "").await;
    // provider-a asks for a 30 s pause: the request is served by provider-b instead, and
    // provider-a gets nothing new while cooling down.
    s.a.state.lock().unwrap().throttle = (1, "30");
    s.b.state.lock().unwrap().throttle = (0, "0");
    for _ in 0..4 {
        let (status, h, body) = s.gw.chat("ks", "gpt-mini", json!({})).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(header(&h, "x-llmctl-executor"), "provider-b");
    }
    assert_eq!(
        s.a.seen().len(),
        1,
        "tried once, then cooled down after its 429"
    );

    // A pool with one upstream: a 1 s pause is waited out within the queue deadline.
    s.solo.state.lock().unwrap().throttle = (1, "1");
    let started = Instant::now();
    let (status, h, body) = s.gw.chat("ks", "solo-model", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(header(&h, "x-llmctl-executor"), "provider-solo");
    assert_eq!(s.solo.seen().len(), 2);
    let (_, _, metrics) = s.gw.request("GET", "/metrics", "ks", Value::Null).await;
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics
            .contains("llmctl_gateway_upstream_errors_total{pool=\"solo\",reason=\"throttled\"} 1"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pause_past_the_deadline_is_the_providers_429_and_a_silent_one_a_504() {
    let s = setup("[queue]\ndeadline_ms = 1500\n", "").await;
    s.solo.state.lock().unwrap().throttle = (5, "20");
    let (status, h, body) = s.gw.chat("ks", "solo-model", json!({})).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "upstream_rate_limited");
    assert_eq!(header(&h, "retry-after"), "20");

    // While it cools down, nothing is sent to it: the queue deadline passes first (503).
    let (status, h, body) = s.gw.chat("ks", "solo-model", json!({})).await;
    assert_eq!(status, 503, "{body}");
    assert!(!header(&h, "retry-after").is_empty());
    assert_eq!(s.solo.seen().len(), 1);

    // A provider that stops answering: 504 after the response timeout, with an OpenAI body.
    let s = setup("", "").await;
    s.solo.state.lock().unwrap().silent = true;
    let started = Instant::now();
    let (status, _, body) = s.gw.chat("ks", "solo-model", json!({})).await;
    assert_eq!(status, 504, "{body}");
    assert_eq!(body["error"]["code"], "upstream_timeout");
    assert!(started.elapsed() < Duration::from_secs(15));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_see_and_use_only_their_models() {
    let s = setup("", "").await;
    let (status, _, body) = s.gw.chat("kn", "gpt-mini", json!({})).await;
    assert_eq!(status, 200, "{body}");
    // A model it may not use is answered as one that does not exist.
    for model in ["gpt-big", "solo-model"] {
        let (status, _, body) = s.gw.chat("kn", model, json!({})).await;
        assert_eq!(status, 404, "{body}");
        assert_eq!(body["error"]["code"], "model_not_found");
    }
    let list = |key: &'static str| {
        let gw = &s.gw;
        async move {
            let (_, _, bytes) = gw.request("GET", "/v1/models", key, Value::Null).await;
            let v: Value = serde_json::from_slice(&bytes).unwrap();
            let mut ids: Vec<String> = v["data"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m["id"].as_str().unwrap().to_owned())
                .collect();
            ids.sort();
            ids
        }
    };
    assert_eq!(list("kn").await, ["gpt-mini"]);
    assert_eq!(list("ks").await, ["gpt-big", "gpt-mini", "solo-model"]);
    // Nothing reached a provider for the refused ones.
    assert!(s.solo.seen().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spill_to_the_fallback_pool_and_say_why() {
    // `cold`: no executor yet (a pool scaling from zero); `broken`: an executor that refuses
    // connections. Both fall back to the hosted `solo` pool.
    let pools = r#"
[[pools]]
name = "cold"
models = ["llama"]
fallback = "solo"
spill_after = 0.1

[[pools]]
name = "broken"
models = ["llama-b"]
fallback = "solo"
[[pools.endpoints]]
address = "127.0.0.1:1"
"#;
    let s = setup("[queue]\ndeadline_ms = 3000\nmax_retries = 1\n", pools).await;
    let started = Instant::now();
    let (status, h, body) = s.gw.chat("ks", "llama", json!({})).await;
    assert_eq!(status, 200, "{body}");
    let waited = started.elapsed();
    // Spilled after a tenth of the 3 s deadline, not at its end.
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_millis(2500),
        "{waited:?}"
    );
    assert_eq!(header(&h, "x-llmctl-pool"), "solo");
    assert_eq!(header(&h, "x-llmctl-executor"), "provider-solo");
    assert_eq!(header(&h, "x-llmctl-spilled-from"), "cold");
    assert_eq!(header(&h, "x-llmctl-spill-reason"), "no_capacity");
    // The fallback's upstream maps the spilled model to its own.
    assert_eq!(s.solo.seen()[0].body["model"], "provider-llama");

    let (status, h, body) = s.gw.chat("ks", "llama-b", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(header(&h, "x-llmctl-spilled-from"), "broken");
    assert_eq!(header(&h, "x-llmctl-spill-reason"), "upstream_failed");
    assert_eq!(s.solo.seen()[1].body["model"], "llama-b");

    let (_, _, metrics) = s.gw.request("GET", "/metrics", "ks", Value::Null).await;
    let metrics = String::from_utf8(metrics).unwrap();
    for line in [
        "llmctl_gateway_spills_total{pool=\"cold\",reason=\"no_capacity\"} 1",
        "llmctl_gateway_spills_total{pool=\"broken\",reason=\"upstream_failed\"} 1",
    ] {
        assert!(metrics.contains(line), "{line}\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embeddings_responses_and_model_lookups_pass_through() {
    let s = setup("", "").await;
    let (status, h, body) =
        s.gw.request(
            "POST",
            "/v1/embeddings",
            "ks",
            json!({"model": "solo-model", "input": ["a", "b"], "dimensions": 2}),
        )
        .await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(header(&h, "x-llmctl-executor"), "provider-solo");
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["data"][0]["embedding"], json!([0.1, 0.2]));
    let seen = s.solo.seen();
    assert_eq!(seen[0].path, "/v1/embeddings");
    // Forwarded unchanged, fields the gateway does not know included.
    assert_eq!(seen[0].body["dimensions"], 2);

    let (status, _, body) =
        s.gw.request(
            "POST",
            "/v1/responses",
            "ks",
            json!({"model": "solo-model", "input": "hi", "store": false}),
        )
        .await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(v["output"][0]["content"][0]["text"], "Hello");
    // Streamed: the Responses API's events pass through whole, usage kept, and a stream that
    // ends after its last event is complete (no `[DONE]` in this API, no error appended).
    let (status, _, body) =
        s.gw.request(
            "POST",
            "/v1/responses",
            "ks",
            json!({"model": "solo-model", "input": "hi", "stream": true}),
        )
        .await;
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    assert!(text.contains("event: response.completed"), "{text}");
    assert!(
        text.contains("\"total_tokens\":7") && !text.contains("upstream_failed"),
        "{text}"
    );
    assert!(text.contains(": llmctl-finish reason=stop"), "{text}");
    assert_eq!(
        s.solo.seen()[2].body.get("stream_options"),
        None,
        "not rewritten"
    );

    // Bad pass-through bodies are refused at the edge.
    let (status, _, _) =
        s.gw.request("POST", "/v1/embeddings", "ks", json!({"input": "x"}))
            .await;
    assert_eq!(status, 400);

    // One model by id, as the tenant may see it.
    let (status, _, body) =
        s.gw.request("GET", "/v1/models/gpt-mini", "kn", Value::Null)
            .await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        (v["id"].as_str(), v["object"].as_str()),
        (Some("gpt-mini"), Some("model"))
    );
    let (status, _, _) =
        s.gw.request("GET", "/v1/models/solo-model", "kn", Value::Null)
            .await;
    assert_eq!(
        status, 404,
        "a model the tenant may not use does not exist for it"
    );
    let (status, _, _) =
        s.gw.request("GET", "/v1/models/nope", "ks", Value::Null)
            .await;
    assert_eq!(status, 404);

    // Token counters include the pass-through APIs' usage.
    let (_, _, metrics) = s.gw.request("GET", "/metrics", "ks", Value::Null).await;
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics.contains(
            "llmctl_gateway_tokens_total{pool=\"solo\",tenant=\"studio\",kind=\"prompt\"} 14"
        ),
        "4 + 5 + 5 (the Responses API's input_tokens): {metrics}"
    );
    assert!(metrics.contains(
        "llmctl_gateway_tokens_total{pool=\"solo\",tenant=\"studio\",kind=\"completion\"} 4"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_providers_configured_limits_are_kept_on_our_side() {
    // Provider A allows our key 2 requests a minute: the third is not sent to it but waits
    // for the limit, and past the deadline gets 429 upstream_rate_limited with the wait.
    let pools = r#"
[[pools]]
name = "capped"
models = ["capped-model"]
[[pools.upstreams]]
name = "provider-a-capped"
url = "{A_URL}"
ca_file = "{CA}"
requests_per_minute = 2
"#;
    let s = setup("[queue]\ndeadline_ms = 1000\n", pools).await;
    for _ in 0..2 {
        let (status, _, body) = s.gw.chat("ks", "capped-model", json!({})).await;
        assert_eq!(status, 200, "{body}");
    }
    let (status, h, body) = s.gw.chat("ks", "capped-model", json!({})).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "upstream_rate_limited");
    let wait: u64 = header(&h, "retry-after").parse().unwrap();
    assert!(
        (20..=31).contains(&wait),
        "the limit refills one request in 30 s: {wait}"
    );
    assert_eq!(
        s.a.seen().len(),
        2,
        "the provider was not sent what it would refuse"
    );
}
