//! Anthropic's Messages API behind the OpenAI chat API: a chat completion request becomes a
//! Messages request, and the answer (whole or streamed) becomes a chat completion (or its
//! chunks), with tool calls, stop reasons and usage. Only what the two APIs share is
//! translated; a field with no counterpart is refused with a 400 that names it, before anything
//! is sent.
//!
//! Request: `system`/`developer` messages → `system`; user content parts (text, `image_url` as
//! a URL or a base64 `data:` URL) → blocks; assistant `tool_calls` → `tool_use` blocks;
//! `tool` messages → `tool_result` blocks in a user turn (consecutive user turns are merged, as
//! the API wants them alternating); `max_tokens` / `max_completion_tokens` (the configured
//! default when absent: the Messages API requires one), `temperature`, `top_p`, `stop` →
//! `stop_sequences`, `tools` → `input_schema` tools, `tool_choice` (`auto`, `none`,
//! `required` → `any`, a named function → `tool`), `parallel_tool_calls: false` →
//! `disable_parallel_tool_use`, `user` → `metadata.user_id`.
//!
//! Answer: text blocks → `content`, `tool_use` → `tool_calls` (arguments as JSON text),
//! `stop_reason` → `finish_reason` (`end_turn`/`stop_sequence` → `stop`, `max_tokens` →
//! `length`, `tool_use` → `tool_calls`, `refusal` → `content_filter`), `usage` →
//! `prompt_tokens` (input plus cache reads and writes) and `completion_tokens`. Streams:
//! `message_start` → a first chunk with the role, `text_delta` → content deltas,
//! `tool_use` blocks → a tool call delta with id and name, then its `input_json_delta` pieces
//! as argument deltas, `message_delta` → the finish reason, and the usage chunk when
//! `stream_options.include_usage` asked for it. Errors → OpenAI error bodies (or a stream error
//! event).

use bytes::{Bytes, BytesMut};
use serde_json::{Map, Value, json};

use crate::error::GatewayError;

/// The Messages API version sent as `anthropic-version`.
pub const VERSION: &str = "2023-06-01";

/// Chat request fields translated (those not listed are refused when present and not null).
const SUPPORTED: [&str; 14] = [
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "stream",
    "stream_options",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "user",
    "n",
];

fn unsupported(field: &str, why: &str) -> GatewayError {
    GatewayError::BadRequest {
        message: format!("`{field}` {why} by this model's provider (Anthropic Messages API)"),
        param: Some(field.to_owned()),
        code: "unsupported_parameter",
    }
}

fn invalid(field: &str, message: &str) -> GatewayError {
    GatewayError::BadRequest {
        message: format!("`{field}`: {message}"),
        param: Some(field.to_owned()),
        code: "invalid_value",
    }
}

/// The Messages request for a chat completion request `body` (its top level already checked
/// by the gateway), asking for the provider's `model`.
pub fn request(body: &[u8], model: &str, default_max_tokens: u32) -> Result<Bytes, GatewayError> {
    let chat: Map<String, Value> =
        serde_json::from_slice(body).map_err(|e| GatewayError::BadRequest {
            message: format!("invalid JSON body: {e}"),
            param: None,
            code: "invalid_json",
        })?;
    for (k, v) in &chat {
        if !v.is_null() && !SUPPORTED.contains(&k.as_str()) {
            return Err(unsupported(k, "is not supported"));
        }
    }
    if chat
        .get("n")
        .and_then(Value::as_u64)
        .is_some_and(|n| n != 1)
    {
        return Err(unsupported("n", "other than 1 is not supported"));
    }
    let mut out = Map::new();
    out.insert("model".into(), model.into());
    let max_tokens = chat
        .get("max_completion_tokens")
        .filter(|v| !v.is_null())
        .or_else(|| chat.get("max_tokens").filter(|v| !v.is_null()))
        .and_then(Value::as_u64)
        .unwrap_or(u64::from(default_max_tokens));
    out.insert("max_tokens".into(), max_tokens.into());
    for (from, to) in [("temperature", "temperature"), ("top_p", "top_p")] {
        if let Some(v) = chat.get(from).filter(|v| !v.is_null()) {
            out.insert(to.into(), v.clone());
        }
    }
    match chat.get("stop") {
        Some(Value::String(s)) => {
            out.insert("stop_sequences".into(), json!([s]));
        }
        Some(Value::Array(a)) if !a.is_empty() => {
            out.insert("stop_sequences".into(), Value::Array(a.clone()));
        }
        _ => {}
    }
    if chat.get("stream") == Some(&Value::Bool(true)) {
        out.insert("stream".into(), true.into());
    }
    if let Some(user) = chat.get("user").and_then(Value::as_str) {
        out.insert("metadata".into(), json!({ "user_id": user }));
    }
    let (system, messages) = messages(chat.get("messages").unwrap_or(&Value::Null))?;
    if !system.is_empty() {
        out.insert("system".into(), system.join("\n\n").into());
    }
    out.insert("messages".into(), Value::Array(messages));
    if let Some(tools) = chat.get("tools").and_then(Value::as_array) {
        let tools = tools
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let f = &t["function"];
                let name = f["name"]
                    .as_str()
                    .ok_or_else(|| invalid(&format!("tools[{i}].function.name"), "missing"))?;
                let mut tool = json!({
                    "name": name,
                    "input_schema": f.get("parameters").filter(|p| !p.is_null()).cloned()
                        .unwrap_or_else(|| json!({"type": "object", "properties": {}})),
                });
                if let Some(d) = f.get("description").and_then(Value::as_str) {
                    tool["description"] = d.into();
                }
                Ok(tool)
            })
            .collect::<Result<Vec<_>, GatewayError>>()?;
        if !tools.is_empty() {
            out.insert("tools".into(), Value::Array(tools));
        }
    }
    let parallel = chat.get("parallel_tool_calls").and_then(Value::as_bool);
    let mut choice = match chat.get("tool_choice") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(match s.as_str() {
            "auto" => json!({"type": "auto"}),
            "none" => json!({"type": "none"}),
            "required" => json!({"type": "any"}),
            other => return Err(invalid("tool_choice", &format!("unknown value {other:?}"))),
        }),
        Some(v) => {
            let name = v["function"]["name"]
                .as_str()
                .ok_or_else(|| invalid("tool_choice", "expected a function name"))?;
            Some(json!({"type": "tool", "name": name}))
        }
    };
    if parallel == Some(false) && out.contains_key("tools") {
        let c = choice.get_or_insert_with(|| json!({"type": "auto"}));
        if c["type"] != "none" {
            c["disable_parallel_tool_use"] = true.into();
        }
    }
    if let Some(c) = choice
        && out.contains_key("tools")
    {
        out.insert("tool_choice".into(), c);
    }
    Ok(Bytes::from(
        serde_json::to_vec(&Value::Object(out)).expect("JSON values serialize"),
    ))
}

/// The system prompt's parts and the Messages turns of chat `messages`.
fn messages(chat: &Value) -> Result<(Vec<String>, Vec<Value>), GatewayError> {
    let list = chat
        .as_array()
        .ok_or_else(|| invalid("messages", "expected an array"))?;
    let mut system = Vec::new();
    let mut turns: Vec<(String, Vec<Value>)> = Vec::new();
    let mut push = |role: &str, blocks: Vec<Value>| {
        if blocks.is_empty() {
            return;
        }
        match turns.last_mut() {
            Some((r, b)) if r == role => b.extend(blocks),
            _ => turns.push((role.to_owned(), blocks)),
        }
    };
    for (i, m) in list.iter().enumerate() {
        let field = |f: &str| format!("messages[{i}].{f}");
        let role = m["role"].as_str().unwrap_or("");
        match role {
            "system" | "developer" => system.push(text_of(&m["content"], &field("content"))?),
            "user" => push("user", blocks(&m["content"], &field("content"))?),
            "assistant" => {
                let mut b = match &m["content"] {
                    Value::Null => Vec::new(),
                    c => blocks(c, &field("content"))?,
                };
                for (k, call) in m["tool_calls"].as_array().into_iter().flatten().enumerate() {
                    let f = &call["function"];
                    let arguments = f["arguments"].as_str().unwrap_or("{}");
                    let input: Value = serde_json::from_str(if arguments.trim().is_empty() {
                        "{}"
                    } else {
                        arguments
                    })
                    .map_err(|_| {
                        invalid(
                            &field(&format!("tool_calls[{k}].function.arguments")),
                            "not a JSON object",
                        )
                    })?;
                    b.push(json!({
                        "type": "tool_use",
                        "id": call["id"],
                        "name": f["name"],
                        "input": input,
                    }));
                }
                push("assistant", b);
            }
            "tool" => {
                let content = text_of(&m["content"], &field("content"))?;
                push(
                    "user",
                    vec![json!({
                        "type": "tool_result",
                        "tool_use_id": m["tool_call_id"],
                        "content": content,
                    })],
                );
            }
            other => {
                return Err(invalid(
                    &field("role"),
                    &format!("{other:?} is not translated"),
                ));
            }
        }
    }
    let turns = turns
        .into_iter()
        .map(|(role, content)| json!({"role": role, "content": content}))
        .collect();
    Ok((system, turns))
}

/// Text content (a string, or text parts joined).
fn text_of(content: &Value, field: &str) -> Result<String, GatewayError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p["type"].as_str() {
                Some("text") => Ok(p["text"].as_str().unwrap_or("").to_owned()),
                _ => Err(invalid(field, "only text parts are translated here")),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(|t| t.join("\n")),
        Value::Null => Ok(String::new()),
        _ => Err(invalid(field, "expected a string or content parts")),
    }
}

/// Content blocks of user or assistant content.
fn blocks(content: &Value, field: &str) -> Result<Vec<Value>, GatewayError> {
    match content {
        Value::String(s) => Ok(vec![json!({"type": "text", "text": s})]),
        Value::Array(parts) => parts
            .iter()
            .enumerate()
            .map(|(k, p)| match p["type"].as_str() {
                Some("text") => Ok(json!({"type": "text", "text": p["text"]})),
                Some("image_url") => {
                    let url = p["image_url"]["url"].as_str().unwrap_or("");
                    Ok(
                        match url
                            .strip_prefix("data:")
                            .and_then(|d| d.split_once(";base64,"))
                        {
                            Some((media_type, data)) => json!({"type": "image", "source":
                            {"type": "base64", "media_type": media_type, "data": data}}),
                            None => json!({"type": "image", "source": {"type": "url", "url": url}}),
                        },
                    )
                }
                other => Err(unsupported(
                    &format!("{field}[{k}].type = {}", other.unwrap_or("?")),
                    "is not supported",
                )),
            })
            .collect(),
        _ => Err(invalid(field, "expected a string or content parts")),
    }
}

fn finish_reason(stop: &Value) -> Value {
    match stop.as_str() {
        Some("end_turn" | "stop_sequence" | "pause_turn") => "stop".into(),
        Some("max_tokens") => "length".into(),
        Some("tool_use") => "tool_calls".into(),
        Some("refusal") => "content_filter".into(),
        _ => Value::Null,
    }
}

/// OpenAI usage from Messages usage (cache reads and writes count as prompt tokens).
fn usage(u: &Value, output: Option<u64>) -> Value {
    let n = |k: &str| u[k].as_u64().unwrap_or(0);
    let prompt =
        n("input_tokens") + n("cache_read_input_tokens") + n("cache_creation_input_tokens");
    let completion = output.unwrap_or_else(|| n("output_tokens"));
    json!({
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    })
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An OpenAI error body for a Messages error body (`{"type":"error","error":{...}}`).
pub fn error_body(status: u16, bytes: &[u8]) -> Vec<u8> {
    let parsed: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
    let message = parsed["error"]["message"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| format!("the provider answered {status}"));
    let kind = parsed["error"]["type"].as_str().unwrap_or("api_error");
    let openai_type = match status {
        400..=499 => "invalid_request_error",
        _ => "server_error",
    };
    serde_json::to_vec(&json!({"error": {
        "message": message, "type": openai_type, "param": null, "code": kind,
    }}))
    .expect("JSON values serialize")
}

/// A chat completion for a whole Messages answer; `model` is the name the client asked for.
pub fn completion(bytes: &[u8], model: &str) -> Result<Vec<u8>, String> {
    let m: Value = serde_json::from_slice(bytes).map_err(|e| format!("provider answer: {e}"))?;
    let mut text = String::new();
    let mut calls = Vec::new();
    for block in m["content"].as_array().into_iter().flatten() {
        match block["type"].as_str() {
            Some("text") => text.push_str(block["text"].as_str().unwrap_or("")),
            Some("tool_use") => calls.push(json!({
                "id": block["id"], "type": "function",
                "function": {"name": block["name"], "arguments": block["input"].to_string()},
            })),
            _ => {}
        }
    }
    let mut message = json!({"role": "assistant", "content": if text.is_empty() && !calls.is_empty() { Value::Null } else { text.into() }});
    if !calls.is_empty() {
        message["tool_calls"] = Value::Array(calls);
    }
    let out = json!({
        "id": m["id"], "object": "chat.completion", "created": now(), "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": null,
            "finish_reason": finish_reason(&m["stop_reason"])}],
        "usage": usage(&m["usage"], None),
    });
    Ok(serde_json::to_vec(&out).expect("JSON values serialize"))
}

/// Turns a Messages event stream into chat completion chunks, event by event, whatever the
/// read boundaries.
pub struct StreamTranslator {
    model: String,
    include_usage: bool,
    pending: BytesMut,
    id: Value,
    created: u64,
    /// Usage of `message_start` (input side).
    start_usage: Value,
    output_tokens: Option<u64>,
    /// Content block index → tool call index, for tool blocks.
    tools: Vec<(u64, usize)>,
    finish: Value,
    done: bool,
}

impl StreamTranslator {
    pub fn new(model: &str, include_usage: bool) -> Self {
        Self {
            model: model.to_owned(),
            include_usage,
            pending: BytesMut::new(),
            id: Value::Null,
            created: now(),
            start_usage: Value::Null,
            output_tokens: None,
            tools: Vec::new(),
            finish: Value::Null,
            done: false,
        }
    }

    /// The stream ended properly (`message_stop` seen).
    pub fn done(&self) -> bool {
        self.done
    }

    fn chunk(&self, delta: Value, finish: Value) -> Vec<u8> {
        let c = json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}],
        });
        sse(&c)
    }

    /// The chat chunks for the bytes read so far.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<u8> {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = crate::proxy::find_event_end(&self.pending) {
            let event = self.pending.split_to(end);
            let data: String = String::from_utf8_lossy(&event)
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(str::trim_start)
                .collect::<Vec<_>>()
                .join("\n");
            if let Ok(v) = serde_json::from_str::<Value>(&data) {
                out.extend(self.event(&v));
            }
        }
        out
    }

    fn event(&mut self, v: &Value) -> Vec<u8> {
        match v["type"].as_str() {
            Some("message_start") => {
                self.id = v["message"]["id"].clone();
                self.start_usage = v["message"]["usage"].clone();
                self.chunk(json!({"role": "assistant", "content": ""}), Value::Null)
            }
            Some("content_block_start") => {
                let block = &v["content_block"];
                if block["type"] != "tool_use" {
                    return Vec::new();
                }
                let index = self.tools.len();
                self.tools.push((v["index"].as_u64().unwrap_or(0), index));
                self.chunk(
                    json!({"tool_calls": [{"index": index, "id": block["id"], "type": "function",
                        "function": {"name": block["name"], "arguments": ""}}]}),
                    Value::Null,
                )
            }
            Some("content_block_delta") => {
                let d = &v["delta"];
                match d["type"].as_str() {
                    Some("text_delta") => self.chunk(json!({"content": d["text"]}), Value::Null),
                    Some("input_json_delta") => {
                        let block = v["index"].as_u64().unwrap_or(0);
                        let Some(&(_, index)) = self.tools.iter().find(|(b, _)| *b == block) else {
                            return Vec::new();
                        };
                        self.chunk(
                            json!({"tool_calls": [{"index": index,
                                "function": {"arguments": d["partial_json"]}}]}),
                            Value::Null,
                        )
                    }
                    _ => Vec::new(),
                }
            }
            Some("message_delta") => {
                self.finish = finish_reason(&v["delta"]["stop_reason"]);
                if let Some(n) = v["usage"]["output_tokens"].as_u64() {
                    self.output_tokens = Some(n);
                }
                self.chunk(json!({}), self.finish.clone())
            }
            Some("message_stop") => {
                self.done = true;
                let mut out = Vec::new();
                if self.include_usage {
                    let c = json!({
                        "id": self.id, "object": "chat.completion.chunk", "created": self.created,
                        "model": self.model, "choices": [],
                        "usage": usage(&self.start_usage, self.output_tokens),
                    });
                    out.extend(sse(&c));
                }
                out.extend_from_slice(b"data: [DONE]\n\n");
                out
            }
            Some("error") => {
                // The stream failed: an OpenAI error event; the relay ends it as failed.
                let body = error_body(500, &serde_json::to_vec(v).unwrap_or_default());
                let mut out = b"data: ".to_vec();
                out.extend(body);
                out.extend_from_slice(b"\n\n");
                out
            }
            _ => Vec::new(),
        }
    }
}

fn sse(v: &Value) -> Vec<u8> {
    let mut out = b"data: ".to_vec();
    out.extend(serde_json::to_vec(v).expect("JSON values serialize"));
    out.extend_from_slice(b"\n\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn translate(chat: Value) -> Result<Value, GatewayError> {
        request(&serde_json::to_vec(&chat).unwrap(), "claude-x", 1024)
            .map(|b| serde_json::from_slice(&b).unwrap())
    }

    #[test]
    fn chat_requests_become_messages_requests() {
        let m = translate(json!({
            "model": "claude", "stream": true, "stream_options": {"include_usage": true},
            "temperature": 0.2, "stop": "END", "user": "u-1",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Weather?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                    "function": {"name": "weather", "arguments": "{\"city\":\"Paris\"}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "user", "content": "Thanks"}
            ],
            "tools": [{"type": "function", "function": {"name": "weather", "description": "Weather now",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}],
            "tool_choice": "required", "parallel_tool_calls": false
        }))
        .unwrap();
        assert_eq!(m["system"], "Be brief.");
        assert_eq!(
            m["max_tokens"], 1024,
            "the default when the client names none"
        );
        assert_eq!(m["stop_sequences"], json!(["END"]));
        assert_eq!(m["metadata"]["user_id"], "u-1");
        assert_eq!(m["stream"], true);
        let turns = m["messages"].as_array().unwrap();
        assert_eq!(turns.len(), 3, "{turns:?}");
        assert_eq!(turns[0]["content"][1]["source"]["media_type"], "image/png");
        assert_eq!(turns[1]["content"][0]["type"], "tool_use");
        assert_eq!(turns[1]["content"][0]["input"]["city"], "Paris");
        // The tool result and the next user message share one user turn.
        assert_eq!(turns[2]["role"], "user");
        assert_eq!(turns[2]["content"][0]["tool_use_id"], "call_1");
        assert_eq!(turns[2]["content"][1]["text"], "Thanks");
        assert_eq!(
            m["tools"][0]["input_schema"]["properties"]["city"]["type"],
            "string"
        );
        assert_eq!(
            m["tool_choice"],
            json!({"type": "any", "disable_parallel_tool_use": true})
        );
    }

    #[test]
    fn fields_without_a_counterpart_are_refused_by_name() {
        for (field, value) in [
            ("logprobs", json!(true)),
            ("presence_penalty", json!(0.5)),
            ("response_format", json!({"type": "json_object"})),
            ("n", json!(2)),
        ] {
            let mut chat = json!({"model": "c", "messages": [{"role": "user", "content": "hi"}]});
            chat[field] = value;
            let e = translate(chat).unwrap_err();
            assert_eq!(e.status(), 400);
            assert!(e.to_string().contains(field), "{e}");
        }
        // Nulls are as good as absent.
        translate(json!({"model": "c", "logprobs": null, "messages": [{"role": "user", "content": "hi"}]}))
            .unwrap();
    }

    #[test]
    fn whole_answers_become_chat_completions() {
        let answer = json!({"id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
            "content": [{"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}}],
            "stop_reason": "tool_use",
            "usage": {"input_tokens": 20, "cache_read_input_tokens": 5, "output_tokens": 7}});
        let c: Value = serde_json::from_slice(
            &completion(&serde_json::to_vec(&answer).unwrap(), "claude").unwrap(),
        )
        .unwrap();
        assert_eq!(c["model"], "claude");
        let choice = &c["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls");
        assert_eq!(choice["message"]["content"], "Checking.");
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["id"], "toolu_1");
        let args: Value =
            serde_json::from_str(call["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args["city"], "Paris");
        assert_eq!(
            c["usage"],
            json!({"prompt_tokens": 25, "completion_tokens": 7, "total_tokens": 32})
        );
    }

    const STREAM: &str = concat!(
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_1\",\"usage\":{\"input_tokens\":9,\"output_tokens\":1}}}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
        "event: ping\ndata: {\"type\":\"ping\"}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hel\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"lo\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_1\",\"name\":\"weather\",\"input\":{}}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"city\\\":\"}}\n\n",
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"\\\"Paris\\\"}\"}}\n\n",
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":12}}\n\n",
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
    );

    fn chunks(out: &[u8]) -> Vec<Value> {
        String::from_utf8(out.to_vec())
            .unwrap()
            .split("\n\n")
            .filter_map(|e| e.strip_prefix("data: "))
            .filter(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str(d).unwrap())
            .collect()
    }

    #[test]
    fn streams_translate_whatever_the_read_boundaries() {
        let whole = {
            let mut t = StreamTranslator::new("claude", true);
            let out = t.feed(STREAM.as_bytes());
            assert!(t.done());
            out
        };
        for piece in [1, 7, 64] {
            let mut t = StreamTranslator::new("claude", true);
            let mut out = Vec::new();
            for part in STREAM.as_bytes().chunks(piece) {
                out.extend(t.feed(part));
            }
            assert_eq!(chunks(&out).len(), chunks(&whole).len());
        }
        let c = chunks(&whole);
        assert_eq!(c[0]["choices"][0]["delta"]["role"], "assistant");
        let text: String = c
            .iter()
            .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(text, "Hello");
        let args: String = c
            .iter()
            .filter_map(|c| {
                c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"].as_str()
            })
            .collect();
        assert_eq!(args, "{\"city\":\"Paris\"}");
        let named = c
            .iter()
            .find(|c| !c["choices"][0]["delta"]["tool_calls"][0]["id"].is_null())
            .unwrap();
        assert_eq!(
            named["choices"][0]["delta"]["tool_calls"][0]["function"]["name"],
            "weather"
        );
        let finish = c
            .iter()
            .find(|c| !c["choices"][0]["finish_reason"].is_null())
            .unwrap();
        assert_eq!(finish["choices"][0]["finish_reason"], "tool_calls");
        let last = c.last().unwrap();
        assert_eq!(
            last["usage"],
            json!({"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21})
        );
        assert!(
            String::from_utf8(whole)
                .unwrap()
                .ends_with("data: [DONE]\n\n")
        );
    }
}
