//! The worker binary as a real server: started on port 0 with a `model init` model, talked to
//! over HTTP with hyper. Responses must parse as OpenAI's schema (our `llmctl-protocol` types),
//! bad input must get its status and error body, disconnects must free KV blocks, and SIGTERM
//! must drain.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use llmctl_inference_worker::model::{
    self,
    init::{InitDtype, InitOptions, Preset},
};
use llmctl_protocol::{
    ChatCompletionChunk, ChatCompletionResponse, CompletionChunk, CompletionResponse,
    ErrorResponse, FinishReason, ModelList,
};
use serde_json::{Value, json};

/// A folder holding `tiny` and `small` models (the small one is slow enough on CPU that a
/// request is reliably still running when the test acts on it).
fn model_dir(preset: Preset) -> std::path::PathBuf {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    static SMALL: OnceLock<()> = OnceLock::new();
    let dir = DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        model::init::write_model(
            &dir.path().join("tiny"),
            &InitOptions {
                preset: Preset::Tiny,
                seed: 5,
                dtype: InitDtype::Bf16,
            },
        )
        .unwrap();
        dir
    });
    if preset == Preset::Small {
        SMALL.get_or_init(|| {
            model::init::write_model(
                &dir.path().join("small"),
                &InitOptions {
                    preset: Preset::Small,
                    seed: 5,
                    dtype: InitDtype::Bf16,
                },
            )
            .unwrap();
        });
        return dir.path().join("small");
    }
    dir.path().join("tiny")
}

/// A running `llmctl-worker`; killed when dropped.
struct Worker {
    child: Child,
    addr: String,
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Worker {
    async fn start(extra: &[&str]) -> Worker {
        Self::start_with(Preset::Tiny, extra).await
    }

    async fn start_with(preset: Preset, extra: &[&str]) -> Worker {
        Self::start_at(&model_dir(preset), extra).await
    }

    async fn start_at(model: &std::path::Path, extra: &[&str]) -> Worker {
        Self::start_env(model, extra, &[]).await
    }

    async fn start_env(model: &std::path::Path, extra: &[&str], env: &[(&str, String)]) -> Worker {
        let mut child = Command::new(env!("CARGO_BIN_EXE_llmctl-worker"))
            .envs(env.iter().map(|(k, v)| (k, v)))
            .args([
                "--model",
                model.to_str().unwrap(),
                "--port",
                "0",
                "--kv-cache-mib",
                "64",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let announced: Value =
            serde_json::from_str(&line).expect("first stdout line is the listening event");
        assert_eq!(announced["event"], "listening");
        let worker = Worker {
            child,
            addr: announced["addr"].as_str().unwrap().to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while worker.get("/health").await.0 != 200 {
            assert!(Instant::now() < deadline, "worker never became ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        worker
    }

    async fn send(&self, method: &str, path: &str, body: Vec<u8>) -> hyper::Response<Incoming> {
        send(self.addr.clone(), method.to_owned(), path.to_owned(), body).await
    }
}

/// One request on its own HTTP/1.1 connection (dropping the response closes it).
async fn send(
    addr: String,
    method: String,
    path: String,
    body: Vec<u8>,
) -> hyper::Response<Incoming> {
    let stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method.as_str())
        .uri(path)
        .header("host", "worker")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    sender.send_request(req).await.unwrap()
}

impl Worker {
    async fn get(&self, path: &str) -> (u16, String) {
        let r = self.send("GET", path, Vec::new()).await;
        let status = r.status().as_u16();
        (
            status,
            String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap(),
        )
    }

    async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, serde_json::to_vec(body).unwrap()).await
    }

    async fn post_raw(&self, path: &str, body: Vec<u8>) -> (u16, Value) {
        let r = self.send("POST", path, body).await;
        let status = r.status().as_u16();
        let bytes = r.into_body().collect().await.unwrap().to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// The `data:` payloads of an SSE response, up to and excluding `[DONE]`.
    async fn stream(&self, path: &str, body: &Value) -> Vec<String> {
        let r = self
            .send("POST", path, serde_json::to_vec(body).unwrap())
            .await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        let text =
            String::from_utf8(r.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap();
        let events: Vec<String> = text
            .split("\n\n")
            .filter(|e| !e.is_empty())
            .map(|e| e.strip_prefix("data: ").expect("SSE data line").to_owned())
            .collect();
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        events[..events.len() - 1].to_vec()
    }

    async fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics").await;
        text.lines()
            .find_map(|l| {
                l.strip_prefix(name)
                    .and_then(|rest| rest.strip_prefix(' '))
                    .map(|v| v.trim().parse().unwrap())
            })
            .unwrap_or(0.0)
    }

    async fn wait_metric(&self, name: &str, pred: impl Fn(f64) -> bool) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = self.metric(name).await;
            if pred(v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{name} stuck at {v}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_streaming_responses_parse_as_openai_schema() {
    let w = Worker::start(&[]).await;
    let (status, body) = w.get("/v1/models").await;
    assert_eq!(status, 200);
    let models: ModelList = serde_json::from_str(&body).unwrap();
    assert_eq!(
        models.data[0].id, "tiny",
        "served name defaults to the folder name"
    );

    let req = json!({"model": "tiny", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}],
        "max_tokens": 12, "n": 2, "temperature": 0.8, "seed": 7, "ignore_eos": true, "logprobs": true, "top_logprobs": 3});
    let (status, body) = w.post("/v1/chat/completions", &req).await;
    assert_eq!(status, 200, "{body}");
    let chat: ChatCompletionResponse = serde_json::from_value(body.clone()).unwrap();
    assert_eq!(chat.choices.len(), 2);
    assert_eq!(chat.usage.completion_tokens, 24);
    assert_eq!(chat.usage.total_tokens, chat.usage.prompt_tokens + 24);
    for c in &chat.choices {
        assert_eq!(c.finish_reason, FinishReason::Length);
        let lp = c.logprobs.as_ref().unwrap().content.as_ref().unwrap();
        assert_eq!(lp.len(), 12);
        assert!(
            lp.iter()
                .all(|t| t.top_logprobs.len() == 3 && t.logprob <= 0.0)
        );
    }
    // Same seed, same completions.
    let (_, again) = w.post("/v1/chat/completions", &req).await;
    assert_eq!(again["choices"], body["choices"]);

    let req = json!({"model": "tiny", "prompt": ["Once upon", "a time"], "max_tokens": 5, "temperature": 0, "logprobs": 2, "ignore_eos": true, "echo": false});
    let (status, body) = w.post("/v1/completions", &req).await;
    assert_eq!(status, 200, "{body}");
    let cmpl: CompletionResponse = serde_json::from_value(body).unwrap();
    assert_eq!(cmpl.choices.len(), 2);
    assert_eq!(cmpl.usage.completion_tokens, 10);
    let lp = cmpl.choices[0].logprobs.as_ref().unwrap();
    assert_eq!(lp.tokens.len(), 5);
    assert_eq!(lp.top_logprobs.len(), 5);

    // A repeated prompt is served from the prefix cache and says so.
    let long = json!({"model": "tiny", "prompt": "The serving plane takes requests from many clients and keeps the pool busy today.", "max_tokens": 2});
    w.post("/v1/completions", &long).await;
    let (_, body) = w.post("/v1/completions", &long).await;
    assert!(
        body["usage"]["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .unwrap()
            >= 16,
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_matches_non_streaming_and_ends_with_usage() {
    let w = Worker::start(&[]).await;
    let base = json!({"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 20, "temperature": 0, "ignore_eos": true});
    let (_, whole) = w.post("/v1/chat/completions", &base).await;
    let mut req = base.clone();
    req["stream"] = json!(true);
    req["stream_options"] = json!({"include_usage": true});
    let events = w.stream("/v1/chat/completions", &req).await;
    let chunks: Vec<ChatCompletionChunk> = events
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    let text: String = chunks
        .iter()
        .flat_map(|c| &c.choices)
        .filter_map(|c| c.delta.content.clone())
        .collect();
    assert_eq!(
        text,
        whole["choices"][0]["message"]["content"].as_str().unwrap()
    );
    assert_eq!(
        chunks[0].choices[0].delta.role,
        Some(llmctl_protocol::Role::Assistant)
    );
    let last_choice = chunks.iter().rev().find(|c| !c.choices.is_empty()).unwrap();
    assert_eq!(
        last_choice.choices[0].finish_reason,
        Some(FinishReason::Length)
    );
    let usage = chunks
        .last()
        .unwrap()
        .usage
        .clone()
        .flatten()
        .expect("final usage chunk");
    assert!(chunks.last().unwrap().choices.is_empty());
    assert_eq!(usage.completion_tokens, 20);
    assert_eq!(
        usage.prompt_tokens,
        whole["usage"]["prompt_tokens"].as_u64().unwrap()
    );
    assert!(
        chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c.usage == Some(None)),
        "usage is null until the end"
    );

    // Without include_usage there is no usage field at all; legacy chunks parse too.
    let events = w.stream("/v1/completions", &json!({"model": "tiny", "prompt": "Hi", "max_tokens": 4, "stream": true, "logprobs": 1})).await;
    for e in &events {
        let c: CompletionChunk = serde_json::from_str(e).unwrap();
        assert!(c.usage.is_none());
        assert!(c.choices[0].logprobs.is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_concurrent_streams_complete_with_correct_usage() {
    let w = std::sync::Arc::new(Worker::start(&[]).await);
    let tasks: Vec<_> = (0..32)
        .map(|i| {
            let w = w.clone();
            tokio::spawn(async move {
                let max = 8 + i % 9;
                let req = json!({"model": "tiny", "prompt": format!("request number {i} says"), "max_tokens": max, "stream": true,
                    "stream_options": {"include_usage": true}, "ignore_eos": true, "temperature": 0.7, "seed": i});
                let events = w.stream("/v1/completions", &req).await;
                let chunks: Vec<CompletionChunk> = events.iter().map(|e| serde_json::from_str(e).unwrap()).collect();
                let usage = chunks.last().unwrap().usage.clone().flatten().unwrap();
                assert_eq!(usage.completion_tokens, max as u64, "request {i}");
                let finished = chunks.iter().flat_map(|c| &c.choices).filter(|c| c.finish_reason.is_some()).count();
                assert_eq!(finished, 1);
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(w.metric("llmctl_worker_kv_blocks_used").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_frees_its_blocks() {
    let w = Worker::start_with(Preset::Small, &["--served-model-name", "tiny"]).await;
    for stream in [true, false] {
        let req = json!({"model": "tiny", "prompt": "a long story", "max_tokens": 1500, "ignore_eos": true, "stream": stream});
        let before = w
            .metric("llmctl_worker_requests_finished_total{reason=\"abort\"}")
            .await;
        let response = tokio::spawn({
            let r = send(
                w.addr.clone(),
                "POST".into(),
                "/v1/completions".into(),
                serde_json::to_vec(&req).unwrap(),
            );
            async move {
                let mut r = r.await;
                if stream {
                    // Read one chunk, then hang until the test drops the connection.
                    r.body_mut().frame().await;
                }
                std::future::pending::<()>().await;
            }
        });
        w.wait_metric("llmctl_worker_kv_blocks_used", |v| v > 0.0)
            .await;
        response.abort();
        let _ = response.await;
        w.wait_metric("llmctl_worker_kv_blocks_used", |v| v == 0.0)
            .await;
        w.wait_metric(
            "llmctl_worker_requests_finished_total{reason=\"abort\"}",
            |v| v == before + 1.0,
        )
        .await;
        assert_eq!(
            w.metric("llmctl_worker_requests_running").await,
            0.0,
            "stream={stream}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_work_and_refuses_new_work() {
    let mut w = Worker::start_with(
        Preset::Small,
        &["--drain-grace-secs", "60", "--served-model-name", "tiny"],
    )
    .await;
    let req =
        json!({"model": "tiny", "prompt": "keep going", "max_tokens": 400, "ignore_eos": true});
    let in_flight = tokio::spawn({
        let r = send(
            w.addr.clone(),
            "POST".into(),
            "/v1/completions".into(),
            serde_json::to_vec(&req).unwrap(),
        );
        async move {
            let r = r.await;
            let status = r.status().as_u16();
            let body: Value =
                serde_json::from_slice(&r.into_body().collect().await.unwrap().to_bytes()).unwrap();
            (status, body)
        }
    });
    w.wait_metric("llmctl_worker_requests_running", |v| v == 1.0)
        .await;
    let pid = w.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while w.get("/health").await.0 != 503 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, body) = w
        .post(
            "/v1/completions",
            &json!({"model": "tiny", "prompt": "new", "max_tokens": 2}),
        )
        .await;
    assert_eq!(status, 503);
    assert_eq!(body["error"]["code"], "service_unavailable");
    let (status, body) = in_flight.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        body["usage"]["completion_tokens"], 400,
        "the in-flight request finished whole"
    );
    let exit = w.child.wait().unwrap();
    assert_eq!(exit.code(), Some(0));
}

/// Fault injection (debug builds only): the engine panics at its fourth step, as a CUDA error
/// would. Both requests in flight end with an explicit OpenAI error (the stream with an error
/// event and `[DONE]`), and the worker exits non-zero for its controller to replace it instead
/// of serving on with a dead engine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_engine_ends_its_requests_with_errors_and_the_worker_exits_for_a_replacement() {
    let mut w = Worker::start_env(
        &model_dir(Preset::Tiny),
        &["--served-model-name", "tiny"],
        &[("LLMCTL_TEST_ENGINE_PANIC_AFTER_STEPS", "3".to_owned())],
    )
    .await;
    let req = |stream: bool| json!({"model": "tiny", "prompt": "go on", "max_tokens": 64, "ignore_eos": true, "stream": stream});
    let (streaming, plain) = (serde_json::to_vec(&req(true)).unwrap(), req(false));
    let (streamed, plain) = tokio::join!(
        w.send("POST", "/v1/completions", streaming),
        w.post("/v1/completions", &plain),
    );
    let status = streamed.status().as_u16();
    let text = String::from_utf8(
        streamed
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    if status == 200 {
        let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
        assert_eq!(events.last(), Some(&"data: [DONE]"), "{text}");
        let error: Value =
            serde_json::from_str(events[events.len() - 2].strip_prefix("data: ").unwrap()).unwrap();
        assert!(error["error"]["message"].is_string(), "{text}");
    } else {
        // It reached the engine only after the failure: refused outright.
        let body: Value = serde_json::from_str(&text).unwrap();
        assert!(
            status >= 500 && body["error"]["message"].is_string(),
            "{status} {text}"
        );
    }
    let (status, body) = plain;
    assert!(status >= 500, "{status} {body}");
    assert!(body["error"]["message"].is_string(), "{body}");
    // Exits on its own, non-zero, once its handlers have answered.
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(exit) = w.child.try_wait().unwrap() {
            break exit;
        }
        assert!(
            Instant::now() < deadline,
            "the worker kept running with a failed engine"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(exit.code(), Some(70));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_its_status_and_an_openai_error_body() {
    let w = Worker::start(&["--max-body-bytes", "4096", "--max-model-len", "256"]).await;
    let chat = |extra: Value| {
        let mut req = json!({"model": "tiny", "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            req[k] = v.clone();
        }
        req
    };
    // (path, body, status, error param, error code)
    type Case<'a> = (&'a str, Value, u16, Option<&'a str>, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "/v1/chat/completions",
            chat(json!({"n": "two"})),
            400,
            None,
            Some("invalid_json"),
        ),
        (
            "/v1/chat/completions",
            chat(json!({"n": 1_000_000_000})),
            400,
            Some("n"),
            None,
        ),
        (
            "/v1/chat/completions",
            chat(json!({"max_tokens": -5})),
            400,
            None,
            Some("invalid_json"),
        ),
        (
            "/v1/chat/completions",
            chat(json!({"max_tokens": 0})),
            400,
            Some("max_tokens"),
            None,
        ),
        (
            "/v1/chat/completions",
            chat(json!({"max_tokens": 100_000})),
            400,
            Some("max_tokens"),
            Some("context_length_exceeded"),
        ),
        (
            "/v1/chat/completions",
            chat(json!({"temperature": -1})),
            400,
            Some("temperature"),
            None,
        ),
        (
            "/v1/chat/completions",
            chat(json!({"top_p": 0})),
            400,
            Some("top_p"),
            None,
        ),
        (
            "/v1/chat/completions",
            chat(json!({"presence_penalty": 3})),
            400,
            Some("presence_penalty"),
            None,
        ),
        (
            "/v1/chat/completions",
            chat(json!({"logprobs": true, "top_logprobs": 30})),
            400,
            Some("top_logprobs"),
            None,
        ),
        (
            "/v1/chat/completions",
            chat(json!({"top_logprobs": 2})),
            400,
            Some("top_logprobs"),
            None,
        ),
        (
            "/v1/chat/completions",
            chat(json!({"logit_bias": {"abc": 1}})),
            400,
            Some("logit_bias"),
            None,
        ),
        (
            "/v1/chat/completions",
            chat(json!({"stream_options": {"include_usage": true}})),
            400,
            Some("stream_options"),
            None,
        ),
        (
            "/v1/chat/completions",
            chat(json!({"messages": []})),
            400,
            Some("messages"),
            None,
        ),
        (
            "/v1/chat/completions",
            chat(
                json!({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]}),
            ),
            400,
            Some("messages[0].content"),
            None,
        ),
        (
            "/v1/chat/completions",
            chat(json!({"messages": [{"role": "user", "content": "word ".repeat(300)}]})),
            400,
            Some("messages"),
            Some("context_length_exceeded"),
        ),
        (
            "/v1/chat/completions",
            chat(json!({"model": "gpt-4"})),
            404,
            None,
            Some("model_not_found"),
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": []}),
            400,
            Some("prompt"),
            None,
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": [5, 99999]}),
            400,
            Some("prompt"),
            None,
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "x", "logprobs": 6}),
            400,
            Some("logprobs"),
            None,
        ),
        (
            "/v1/completions",
            json!({"model": "tiny", "prompt": "x", "suffix": "y"}),
            400,
            Some("suffix"),
            None,
        ),
        (
            "/v1/completions",
            json!({"model": "tiny"}),
            400,
            None,
            Some("invalid_json"),
        ),
    ];
    for (path, body, status, param, code) in cases {
        let (got, err) = w.post(path, &body).await;
        assert_eq!(got, status, "{body} -> {err}");
        let err: ErrorResponse = serde_json::from_value(err.clone())
            .unwrap_or_else(|e| panic!("{body}: not an OpenAI error body: {e}: {err}"));
        assert_eq!(
            err.error.param.as_deref(),
            param,
            "{body}: {}",
            err.error.message
        );
        if let Some(code) = code {
            assert_eq!(err.error.code.as_deref(), Some(code), "{body}");
        }
        assert!(!err.error.message.is_empty());
    }
    let (status, err) = w
        .post_raw("/v1/chat/completions", b"{not json".to_vec())
        .await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (400, Some("invalid_json"))
    );
    let (status, err) = w.post_raw("/v1/completions", vec![b' '; 10_000]).await;
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (413, Some("request_too_large"))
    );
    let (status, _) = w.get("/v1/chat/completions").await;
    assert_eq!(status, 405);
    let (status, _) = w.get("/v2/nothing").await;
    assert_eq!(status, 404);
    // The worker is still healthy after all of that.
    assert_eq!(w.get("/health").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_template_that_raises_is_a_400_naming_messages() {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(model_dir(Preset::Tiny)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let config_path = dir.path().join("tokenizer_config.json");
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(&config_path).unwrap()).unwrap();
    config["chat_template"] = json!(
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}{{ m['content'] }}{% endfor %}"
    );
    std::fs::write(&config_path, config.to_string()).unwrap();
    let w = Worker::start_at(dir.path(), &["--served-model-name", "tiny"]).await;
    let (status, err) = w
        .post(
            "/v1/chat/completions",
            &json!({"model": "tiny", "messages": [{"role": "system", "content": "x"}]}),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(err["error"]["param"], "messages");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("System role not supported"),
        "{err}"
    );
    let (status, _) = w.post("/v1/chat/completions", &json!({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2})).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_is_served_and_a_second_signal_exits_at_once() {
    let mut w = Worker::start_with(
        Preset::Small,
        &["--drain-grace-secs", "600", "--served-model-name", "tiny"],
    )
    .await;
    let stream = tokio::net::TcpStream::connect(&w.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .uri(format!("http://{}/v1/models", w.addr))
        .body(Full::new(Bytes::new()))
        .unwrap();
    let r = sender.send_request(req).await.unwrap();
    assert_eq!(r.version(), hyper::Version::HTTP_2);
    assert_eq!(r.status(), 200);

    // A long request keeps the drain waiting; the second signal must not wait for it.
    let _long = tokio::spawn(send(
        w.addr.clone(),
        "POST".into(),
        "/v1/completions".into(),
        serde_json::to_vec(
            &json!({"model": "tiny", "prompt": "go", "max_tokens": 2000, "ignore_eos": true}),
        )
        .unwrap(),
    ));
    w.wait_metric("llmctl_worker_requests_running", |v| v == 1.0)
        .await;
    let pid = w.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    while w.get("/health").await.0 != 503 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let started = Instant::now();
    let exit = w.child.wait().unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(exit.code(), Some(1));
}

/// `--device cuda` where CUDA cannot be used fails at once with a clear message, before
/// listening; an unknown device is refused by the argument parser. (Every other test here runs
/// with the default `--device auto`, which falls back to the CPU on a machine without a GPU.)
/// On a machine with a usable GPU the first half cannot happen and is not checked.
#[test]
fn cuda_device_without_cuda_is_a_clear_error() {
    let dir = model_dir(Preset::Tiny);
    // SAFETY: only tries to dlopen the driver library.
    let cuda = unsafe { cudarc::driver::sys::is_culib_present() }
        && cudarc::driver::CudaContext::device_count().is_ok_and(|n| n > 0);
    if !cuda {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmctl-worker"))
            .args([
                "--model",
                dir.to_str().unwrap(),
                "--port",
                "0",
                "--device",
                "cuda:0",
            ])
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--device cuda:0") && err.contains("no usable CUDA"),
            "{err}"
        );
        assert!(
            out.stdout.is_empty(),
            "nothing listens: {:?}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_llmctl-worker"))
        .args([
            "--model",
            dir.to_str().unwrap(),
            "--port",
            "0",
            "--device",
            "gpu",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown device `gpu`"));
}

/// The whole worker on `--device cuda:0` (the CUDA backend: weights uploaded, KV cache sized
/// from free device memory, kernels and cuBLAS GEMMs) serving real requests, on the CPU
/// emulator of the CUDA driver and cuBLAS (`llmctl_kernels::emulator`), put on the worker's
/// loader path. `--device cuda:0` never falls back to the CPU, so a 200 here came from the CUDA
/// backend. Needs NVRTC 13 on LD_LIBRARY_PATH and a C++ compiler; `.ci/run` runs it.
#[tokio::test]
#[ignore = "needs libnvrtc.so.13 on LD_LIBRARY_PATH and a C++ compiler; .ci/run runs it"]
async fn serves_on_the_emulated_cuda_device() {
    let emulator =
        llmctl_kernels::emulator::build(std::path::Path::new(env!("CARGO_TARGET_TMPDIR")))
            .unwrap_or_else(|e| panic!("{e}"));
    let path = match std::env::var("LD_LIBRARY_PATH") {
        Ok(p) if !p.is_empty() => format!("{}:{p}", emulator.display()),
        _ => emulator.display().to_string(),
    };
    let env = [
        ("LD_LIBRARY_PATH", path),
        ("LLMCTL_EMULATOR_MEMORY_MIB", "1600".to_owned()),
    ];
    let w = Worker::start_env(&model_dir(Preset::Tiny), &["--device", "cuda:0"], &env).await;
    let (status, body) = w
        .post(
            "/v1/chat/completions",
            &json!({"model": "tiny", "messages": [{"role": "user", "content": "hello there"}],
                    "max_tokens": 8, "temperature": 0, "ignore_eos": true}),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let r: ChatCompletionResponse = serde_json::from_value(body.clone()).unwrap();
    assert_eq!(r.usage.completion_tokens, 8);
    // Greedy is deterministic on one device: the streamed text equals the non-streamed one.
    let events = w
        .stream(
            "/v1/chat/completions",
            &json!({"model": "tiny", "messages": [{"role": "user", "content": "hello there"}],
                    "max_tokens": 8, "temperature": 0, "ignore_eos": true, "stream": true}),
        )
        .await;
    let streamed: String = events
        .iter()
        .map(|e| serde_json::from_str::<ChatCompletionChunk>(e).unwrap())
        .flat_map(|c| c.choices.into_iter().filter_map(|ch| ch.delta.content))
        .collect();
    assert_eq!(
        streamed,
        body["choices"][0]["message"]["content"].as_str().unwrap()
    );
    // The KV cache came from the emulated device's memory and is reported.
    assert!(w.metric("llmctl_worker_kv_blocks_total").await > 0.0);
    // Decode steps were recorded into CUDA graphs once and replayed after.
    assert!(w.metric("llmctl_worker_graph_recorded_steps_total").await >= 1.0);
    assert!(w.metric("llmctl_worker_graph_replayed_steps_total").await >= 1.0);
}

/// A client that holds a connection without finishing its request: a trickled body gets a 408
/// in OpenAI format once the body timeout passes, and a connection that sends nothing is closed
/// after the header timeout; the worker keeps answering others meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_clients_are_timed_out() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let w = Worker::start(&[
        "--body-read-timeout-secs",
        "1",
        "--header-read-timeout-secs",
        "1",
    ])
    .await;
    let mut silent = tokio::net::TcpStream::connect(&w.addr).await.unwrap();
    let mut trickle = tokio::net::TcpStream::connect(&w.addr).await.unwrap();
    trickle
        .write_all(b"POST /v1/completions HTTP/1.1\r\nhost: w\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\"")
        .await
        .unwrap();
    let (status, _) = w.get("/health").await;
    assert_eq!(status, 200, "others are served meanwhile");
    let started = Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), trickle.read_to_end(&mut answer))
        .await
        .expect("the trickled request was answered and closed")
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let body: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "request_timeout");
    assert!(started.elapsed() < Duration::from_secs(3));
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "a connection that sent nothing was kept open"
    );
}

/// Prompts megabytes long: refused from their size before tokenizing (the tiny model's
/// tokenizer is byte-level), while the worker keeps answering others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_prompt_is_refused_from_its_size_and_freezes_nothing() {
    let w = Worker::start(&["--max-model-len", "256"]).await;
    let huge = "lorem ipsum dolor sit amet ".repeat(280_000);
    let chat = json!({"model": "tiny", "messages": [{"role": "user", "content": huge}]});
    let completion = json!({"model": "tiny", "prompt": huge});
    let started = Instant::now();
    let (a, b, health) = tokio::join!(
        w.post("/v1/chat/completions", &chat),
        w.post("/v1/completions", &completion),
        async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let asked = Instant::now();
            (w.get("/health").await.0, asked.elapsed())
        },
    );
    for ((status, body), param) in [(a, "messages"), (b, "prompt")] {
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"]["code"], "context_length_exceeded", "{body}");
        assert_eq!(body["error"]["param"], param, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("at least"),
            "refused from its size: {body}"
        );
    }
    assert_eq!(health.0, 200);
    assert!(
        health.1 < Duration::from_secs(1),
        "/health took {:?}",
        health.1
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
