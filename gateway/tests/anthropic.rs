//! Anthropic's Messages API behind the gateway's chat API: the real `llmctl-gateway` binary in
//! front of a local HTTPS stand-in for the Messages API (named as a stand-in: no provider is
//! reachable from tests), driven by raw requests and by the official OpenAI Python SDK (chat,
//! streaming with usage, tools with `tool_choice="required"`, streamed tool calls).

mod common;

use std::sync::{Arc, Mutex};

use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Value, json};

use common::{Body, Gateway, full, header, key_hash};

const KEY: &str = "sk-ant-standin-5d1e0c";

/// What the stand-in saw of one request: its headers of interest and body.
#[derive(Clone, Debug)]
struct Seen {
    path: String,
    api_key: Option<String>,
    version: Option<String>,
    authorization: Option<String>,
    body: Value,
}

type Log = Arc<Mutex<Vec<Seen>>>;

/// The Messages API as the stand-in plays it: a tool call when tools are offered and one is
/// required, otherwise "Hello"; streamed when asked, in the event sequence the API documents.
async fn messages(req: hyper::Request<Incoming>, log: Log) -> hyper::Response<Body> {
    let h = |n: &str| req.headers().get(n).map(|v| v.to_str().unwrap().to_owned());
    let (api_key, version, authorization) =
        (h("x-api-key"), h("anthropic-version"), h("authorization"));
    let path = req.uri().path().to_owned();
    let body: Value =
        serde_json::from_slice(&req.into_body().collect().await.unwrap().to_bytes()).unwrap();
    log.lock().unwrap().push(Seen {
        path,
        api_key: api_key.clone(),
        version,
        authorization,
        body: body.clone(),
    });
    if api_key.as_deref() != Some(KEY) {
        return hyper::Response::builder()
            .status(401)
            .header("content-type", "application/json")
            .body(full(json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}).to_string()))
            .unwrap();
    }
    if body["max_tokens"].as_u64().is_none() || body.get("messages").is_none() {
        return hyper::Response::builder()
            .status(400)
            .header("content-type", "application/json")
            .body(full(json!({"type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}}).to_string()))
            .unwrap();
    }
    let tool = body["tool_choice"]["type"] == "any" || body["tool_choice"]["type"] == "tool";
    if body["stream"] == true {
        let mut events = vec![
            json!({"type": "message_start", "message": {"id": "msg_s1", "type": "message", "role": "assistant", "content": [], "model": body["model"], "stop_reason": null, "usage": {"input_tokens": 11, "output_tokens": 1}}}),
            json!({"type": "ping"}),
        ];
        if tool {
            events.extend([
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "toolu_s1", "name": "weather", "input": {}}}),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "{\"city\": "}}),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "input_json_delta", "partial_json": "\"Paris\"}"}}),
                json!({"type": "content_block_stop", "index": 0}),
                json!({"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 9}}),
            ]);
        } else {
            events.extend([
                json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}}),
                json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}}),
                json!({"type": "content_block_stop", "index": 0}),
                json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 4}}),
            ]);
        }
        events.push(json!({"type": "message_stop"}));
        let text: String = events
            .iter()
            .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()))
            .collect();
        return hyper::Response::builder()
            .header("content-type", "text/event-stream")
            .body(full(text))
            .unwrap();
    }
    let (content, stop) = if tool {
        (
            json!([{"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}]),
            "tool_use",
        )
    } else {
        (json!([{"type": "text", "text": "Hello"}]), "end_turn")
    };
    let answer = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": body["model"],
        "content": content, "stop_reason": stop, "stop_sequence": null,
        "usage": {"input_tokens": 11, "output_tokens": 4}});
    hyper::Response::builder()
        .header("content-type", "application/json")
        .body(full(answer.to_string()))
        .unwrap()
}

async fn setup() -> (Gateway, Log) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let log: Log = Arc::default();
    let shared = log.clone();
    let port = common::https_server(&cert, move |req| messages(req, shared.clone())).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, cert.cert.pem()).unwrap();
    let config = format!(
        r#"listen = "127.0.0.1:0"

[[tenants]]
name = "studio"
keys = ["{studio}"]

[[pools]]
name = "anthropic"
models = ["claude-sonnet"]

[[pools.upstreams]]
name = "anthropic-standin"
api = "anthropic"
url = "https://localhost:{port}/v1"
key_env = "STANDIN_ANTHROPIC_KEY"
ca_file = "{ca}"
default_max_tokens = 2048
models = {{ "claude-sonnet" = "claude-sonnet-4-5-20250929" }}
"#,
        studio = key_hash("ks"),
        ca = ca.display(),
    );
    let gw = Gateway::start(dir, &config, &[("STANDIN_ANTHROPIC_KEY", KEY)]);
    (gw, log)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_is_translated_to_messages_and_back() {
    let (gw, log) = setup().await;
    let (status, h, body) = gw.chat("ks", "claude-sonnet", json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["object"], "chat.completion");
    assert_eq!(body["model"], "claude-sonnet");
    assert_eq!(body["choices"][0]["message"]["content"], "Hello");
    assert_eq!(body["choices"][0]["finish_reason"], "stop");
    assert_eq!(body["usage"]["total_tokens"], 15);
    assert_eq!(header(&h, "x-llmctl-executor"), "anthropic-standin");
    let seen = log.lock().unwrap()[0].clone();
    assert_eq!(seen.path, "/v1/messages");
    assert_eq!(seen.api_key.as_deref(), Some(KEY));
    assert_eq!(seen.version.as_deref(), Some("2023-06-01"));
    assert!(
        seen.authorization.is_none(),
        "the key goes as x-api-key only"
    );
    assert_eq!(seen.body["model"], "claude-sonnet-4-5-20250929");
    assert_eq!(seen.body["max_tokens"], 10);
    assert_eq!(seen.body["messages"][0]["content"][0]["text"], "hi");

    // No max_tokens: the configured default, which the Messages API requires.
    let (status, _, _) = gw
        .chat("ks", "claude-sonnet", json!({"max_tokens": null}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(log.lock().unwrap()[1].body["max_tokens"], 2048);

    // A field the Messages API has no counterpart for: 400 naming it, nothing sent.
    let (status, _, body) = gw
        .chat("ks", "claude-sonnet", json!({"logprobs": true}))
        .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "logprobs");
    let (status, _, body) = gw
        .request(
            "POST",
            "/v1/completions",
            "ks",
            json!({"model": "claude-sonnet", "prompt": "hi"}),
        )
        .await;
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    assert_eq!(log.lock().unwrap().len(), 2);

    // Streamed, usage removed unless asked for.
    let (status, _, body) = gw
        .chat("ks", "claude-sonnet", json!({"stream": true}))
        .await;
    assert_eq!(status, 200);
    let text = body.as_str().unwrap();
    assert!(
        text.contains("\"Hel\"") && text.ends_with("data: [DONE]\n\n"),
        "{text}"
    );
    assert!(!text.contains("\"usage\""), "{text}");
    assert!(!gw.log().contains(KEY), "the key is never logged");
}

const SDK_SCRIPT: &str = r#"
import json, os, sys
from openai import OpenAI

client = OpenAI(base_url=os.environ["GATEWAY_URL"] + "/v1", api_key="ks", max_retries=0)
out = {}
r = client.chat.completions.create(model="claude-sonnet",
    messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
out["chat"] = {"content": r.choices[0].message.content, "finish": r.choices[0].finish_reason,
    "total": r.usage.total_tokens}

text, usage = "", None
for chunk in client.chat.completions.create(model="claude-sonnet", stream=True,
        stream_options={"include_usage": True}, messages=[{"role": "user", "content": "hi"}]):
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.usage:
        usage = chunk.usage.total_tokens
out["stream"] = {"content": text, "total": usage}

tools = [{"type": "function", "function": {"name": "weather", "description": "Weather now",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
r = client.chat.completions.create(model="claude-sonnet", tools=tools, tool_choice="required",
    messages=[{"role": "user", "content": "Weather in Paris?"}])
call = r.choices[0].message.tool_calls[0]
out["tools"] = {"name": call.function.name, "args": json.loads(call.function.arguments),
    "finish": r.choices[0].finish_reason, "id": call.id}

# The tool's answer goes back in the history; the provider sees a tool_result.
r = client.chat.completions.create(model="claude-sonnet", tools=tools, messages=[
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": call.id, "type": "function",
        "function": {"name": "weather", "arguments": call.function.arguments}}]},
    {"role": "tool", "tool_call_id": call.id, "content": "sunny"}])
out["after_tool"] = r.choices[0].message.content

args, name = "", None
for chunk in client.chat.completions.create(model="claude-sonnet", stream=True, tools=tools,
        tool_choice={"type": "function", "function": {"name": "weather"}},
        messages=[{"role": "user", "content": "Weather in Paris?"}]):
    for tc in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
        name = name or tc.function.name
        args += tc.function.arguments or ""
out["stream_tools"] = {"name": name, "args": json.loads(args)}
print(json.dumps(out))
"#;

/// The OpenAI Python SDK, installed when missing (the test command does all set-up).
fn python_with_openai() -> &'static str {
    let has = |py: &str| {
        std::process::Command::new(py)
            .args(["-c", "import openai"])
            .status()
            .is_ok_and(|s| s.success())
    };
    if !has("python3") {
        let status = std::process::Command::new("python3")
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "openai>=1.40,<3",
            ])
            .status()
            .expect("python3 runs");
        assert!(
            status.success() && has("python3"),
            "installing the OpenAI SDK failed"
        );
    }
    "python3"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_sdk_works_against_the_anthropic_stand_in() {
    let python = python_with_openai();
    let (gw, log) = setup().await;
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("sdk.py");
    std::fs::write(&script, SDK_SCRIPT).unwrap();
    let addr = gw.addr.clone();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(python)
            .arg(&script)
            .env("GATEWAY_URL", format!("http://{addr}"))
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        out["chat"],
        json!({"content": "Hello", "finish": "stop", "total": 15})
    );
    assert_eq!(out["stream"], json!({"content": "Hello", "total": 15}));
    assert_eq!(out["tools"]["name"], "weather");
    assert_eq!(out["tools"]["args"], json!({"city": "Paris"}));
    assert_eq!(out["tools"]["finish"], "tool_calls");
    assert_eq!(out["after_tool"], "Hello");
    assert_eq!(
        out["stream_tools"],
        json!({"name": "weather", "args": {"city": "Paris"}})
    );
    let seen = log.lock().unwrap().clone();
    assert_eq!(seen[0].body["system"], "Be brief.");
    assert_eq!(seen[2].body["tool_choice"]["type"], "any");
    assert_eq!(
        seen[3].body["messages"][2]["content"][0]["type"],
        "tool_result"
    );
    assert_eq!(
        seen[4].body["tool_choice"],
        json!({"type": "tool", "name": "weather"})
    );
}
