//! `/v1/chat/completions` and `/v1/completions`: a validated request is submitted to the engine
//! (one engine request per prompt, `n` sequences each), and its outputs are either gathered
//! into one response or streamed as SSE chunks. Both endpoints share the generation and the
//! accounting; they differ only in how a piece of output is written.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use llmctl_protocol::{
    ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionMessage,
    ChatCompletionResponse, ChatDelta, ChatLogprobs, ChatTokenLogprob, CompletionChoice,
    CompletionChunk, CompletionChunkChoice, CompletionLogprobs, CompletionResponse,
    FinishReason as WireFinish, PromptTokensDetails, Role, TopLogprob, TopLogprobMap, Usage,
};
use serde::Serialize;
use tokio::sync::mpsc;

use super::AppState;
use super::body::{self, Body};
use super::error::ServerError;
use super::lifecycle::InflightGuard;
use super::validate::{LogprobsFormat, ValidRequest};
use crate::engine::{FinishReason, SeqOutput, TokenLogprob};
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    Chat,
    Completions,
}

/// One output of one choice, as the endpoints need it.
struct Piece {
    choice: usize,
    out: SeqOutput,
}

/// Submits every prompt and merges their outputs into one channel, tagged with the choice
/// index (`prompt * n + sequence`). Dropping the receiver aborts everything.
async fn submit(
    state: &AppState,
    valid: &ValidRequest,
) -> Result<mpsc::UnboundedReceiver<Piece>, ServerError> {
    let engine = state
        .engine()
        .ok_or(ServerError::Unavailable("the model is still loading"))?;
    let (tx, rx) = mpsc::unbounded_channel();
    let n = valid.params.n;
    for (p, prompt) in valid.prompts.iter().enumerate() {
        let mut events = engine
            .generate(prompt.tokens.clone(), valid.params.clone())
            .await
            .map_err(|e| ServerError::Internal(e.to_string()))??;
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    // The merged receiver is gone: drop `events` so the engine aborts.
                    () = tx.closed() => return,
                    event = events.recv() => match event {
                        Some(out) => {
                            if tx.send(Piece { choice: p * n + out.index, out }).is_err() {
                                return;
                            }
                        }
                        None => return,
                    },
                }
            }
        });
    }
    Ok(rx)
}

#[derive(Default)]
struct Choice {
    text: String,
    tokens: Vec<u32>,
    logprobs: Vec<(u32, f32, Vec<TokenLogprob>)>,
    finish: Option<FinishReason>,
}

/// Token counts of a request: prompts counted once each, completions per choice.
#[derive(Default)]
struct Accounting {
    prompt: Vec<Option<(usize, usize)>>,
    completion: usize,
}

impl Accounting {
    fn new(prompts: usize) -> Self {
        Self {
            prompt: vec![None; prompts],
            completion: 0,
        }
    }

    fn record(&mut self, prompt: usize, out: &SeqOutput) {
        self.prompt[prompt] = Some((out.prompt_tokens, out.cached_tokens));
        if out.token.is_some() {
            self.completion += 1;
        }
    }

    fn usage(&self) -> Usage {
        let prompt: usize = self.prompt.iter().flatten().map(|p| p.0).sum();
        let cached: usize = self.prompt.iter().flatten().map(|p| p.1).sum();
        let mut usage = Usage::new(prompt as u64, self.completion as u64);
        usage.prompt_tokens_details = Some(PromptTokensDetails {
            cached_tokens: cached as u64,
            ..Default::default()
        });
        usage
    }
}

pub async fn handle(
    state: Arc<AppState>,
    endpoint: Endpoint,
    valid: ValidRequest,
    guard: InflightGuard,
) -> Result<http::Response<Body>, ServerError> {
    let rx = submit(&state, &valid).await?;
    tracing::info!(
        prompts = valid.prompts.len(),
        n = valid.params.n,
        stream = valid.stream,
        "request accepted"
    );
    let prefix = if endpoint == Endpoint::Chat {
        "chatcmpl"
    } else {
        "cmpl"
    };
    let meta = Meta {
        id: format!("{prefix}-{}", random_id()),
        created: unix_now(),
        model: state.served_model_name.clone(),
    };
    if valid.stream {
        let (tx, body) = body::channel(state.write_stall);
        tokio::spawn(tracing::Instrument::in_current_span(stream(
            state, endpoint, valid, meta, rx, tx, guard,
        )));
        Ok(body::sse_response(body))
    } else {
        let response = gather(&state, endpoint, &valid, meta, rx).await;
        drop(guard);
        response
    }
}

struct Meta {
    id: String,
    created: u64,
    model: String,
}

async fn gather(
    state: &AppState,
    endpoint: Endpoint,
    valid: &ValidRequest,
    meta: Meta,
    mut rx: mpsc::UnboundedReceiver<Piece>,
) -> Result<http::Response<Body>, ServerError> {
    let total = valid.prompts.len() * valid.params.n;
    let mut choices: Vec<Choice> = (0..total).map(|_| Choice::default()).collect();
    let mut acct = Accounting::new(valid.prompts.len());
    let mut done = 0;
    while done < total {
        let Some(Piece { choice, out }) = rx.recv().await else {
            state.metrics.finished("error");
            return Err(ServerError::Internal(
                "the engine stopped before the request finished".into(),
            ));
        };
        acct.record(choice / valid.params.n, &out);
        let c = &mut choices[choice];
        c.text.push_str(&out.text);
        if let Some(t) = out.token {
            c.tokens.push(t);
            if let Some((lp, top)) = out.logprobs {
                c.logprobs.push((t, lp, top));
            }
        }
        if out.finish.is_some() {
            c.finish = out.finish;
            done += 1;
        }
    }
    let tok = &state
        .engine()
        .expect("a request ran, so the engine is loaded")
        .tokenizer;
    let usage = acct.usage();
    let body = match endpoint {
        Endpoint::Chat => serde_json::to_vec(&ChatCompletionResponse {
            id: meta.id,
            object: Default::default(),
            created: meta.created,
            model: meta.model,
            system_fingerprint: None,
            service_tier: None,
            choices: choices
                .into_iter()
                .enumerate()
                .map(|(i, c)| ChatChoice {
                    index: i as u32,
                    logprobs: chat_logprobs(valid.logprobs, tok, &c.logprobs),
                    message: ChatCompletionMessage::assistant(c.text),
                    finish_reason: wire_finish(c.finish),
                })
                .collect(),
            usage,
        }),
        Endpoint::Completions => serde_json::to_vec(&CompletionResponse {
            id: meta.id,
            object: Default::default(),
            created: meta.created,
            model: meta.model,
            system_fingerprint: None,
            choices: choices
                .into_iter()
                .enumerate()
                .map(|(i, c)| {
                    let echo = valid.prompts[i / valid.params.n]
                        .echo
                        .clone()
                        .unwrap_or_default();
                    CompletionChoice {
                        index: i as u32,
                        logprobs: legacy_logprobs(valid.logprobs, tok, &c.logprobs, echo.len()),
                        text: echo + &c.text,
                        finish_reason: wire_finish(c.finish),
                    }
                })
                .collect(),
            usage,
        }),
    };
    Ok(body::json_response(
        http::StatusCode::OK,
        body.expect("responses always serialize"),
    ))
}

async fn stream(
    state: Arc<AppState>,
    endpoint: Endpoint,
    valid: ValidRequest,
    meta: Meta,
    mut rx: mpsc::UnboundedReceiver<Piece>,
    tx: body::StreamSender,
    _guard: InflightGuard,
) {
    let tok = state
        .engine()
        .expect("a request ran, so the engine is loaded")
        .tokenizer
        .clone();
    let n = valid.params.n;
    let total = valid.prompts.len() * n;
    let mut acct = Accounting::new(valid.prompts.len());
    let mut started = vec![false; total];
    let mut done = 0;
    let chunk = |choices_chat: Vec<ChatChunkChoice>, choices_legacy: Vec<CompletionChunkChoice>| {
        match endpoint {
            Endpoint::Chat => sse(&ChatCompletionChunk::new(
                &meta.id,
                meta.created,
                &meta.model,
                choices_chat,
                valid.include_usage,
            )),
            Endpoint::Completions => sse(&CompletionChunk::new(
                &meta.id,
                meta.created,
                &meta.model,
                choices_legacy,
                valid.include_usage,
            )),
        }
    };
    let mut offsets = vec![0usize; total];
    while done < total {
        let Some(Piece { choice, out }) = rx.recv().await else {
            state.metrics.finished("error");
            let err =
                ServerError::Internal("the engine stopped before the request finished".into());
            let _ = tx.send(sse(&err.body())).await;
            let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
            return;
        };
        acct.record(choice / n, &out);
        let logprobs: Vec<(u32, f32, Vec<TokenLogprob>)> = out
            .token
            .zip(out.logprobs.clone())
            .map(|(t, (lp, top))| (t, lp, top))
            .into_iter()
            .collect();
        let mut text = out.text.clone();
        if !started[choice] {
            started[choice] = true;
            if endpoint == Endpoint::Completions
                && let Some(echo) = &valid.prompts[choice / n].echo
            {
                text = echo.clone() + &text;
            }
        }
        if out.finish.is_some() {
            done += 1;
        }
        let bytes = match endpoint {
            Endpoint::Chat => {
                let first = out.completion_tokens <= 1;
                let delta = ChatDelta {
                    role: first.then_some(Role::Assistant),
                    content: (!text.is_empty() || first).then_some(text),
                    ..Default::default()
                };
                let c = ChatChunkChoice {
                    index: choice as u32,
                    delta,
                    logprobs: chat_logprobs(valid.logprobs, &tok, &logprobs),
                    finish_reason: out.finish.map(|f| wire_finish(Some(f))),
                };
                chunk(vec![c], Vec::new())
            }
            Endpoint::Completions => {
                let c = CompletionChunkChoice {
                    index: choice as u32,
                    logprobs: legacy_logprobs(valid.logprobs, &tok, &logprobs, offsets[choice]),
                    text,
                    finish_reason: out.finish.map(|f| wire_finish(Some(f))),
                };
                offsets[choice] += c.text.len();
                chunk(Vec::new(), vec![c])
            }
        };
        if tx.send(bytes).await.is_err() {
            // The client is gone (or stalled): dropping `rx` aborts the request in the engine.
            return;
        }
    }
    if valid.include_usage {
        let usage = acct.usage();
        let bytes = match endpoint {
            Endpoint::Chat => sse(&ChatCompletionChunk::usage_only(
                &meta.id,
                meta.created,
                &meta.model,
                usage,
            )),
            Endpoint::Completions => sse(&CompletionChunk::usage_only(
                &meta.id,
                meta.created,
                &meta.model,
                usage,
            )),
        };
        let _ = tx.send(bytes).await;
    }
    let _ = tx.send(Bytes::from_static(b"data: [DONE]\n\n")).await;
}

fn sse<T: Serialize>(value: &T) -> Bytes {
    let mut out = b"data: ".to_vec();
    serde_json::to_writer(&mut out, value).expect("chunks always serialize");
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

fn wire_finish(f: Option<FinishReason>) -> WireFinish {
    match f {
        Some(FinishReason::Length) => WireFinish::Length,
        _ => WireFinish::Stop,
    }
}

/// JSON has no -inf; OpenAI writes -9999 for impossible tokens.
fn finite(lp: f32) -> f64 {
    if lp.is_finite() { lp as f64 } else { -9999.0 }
}

fn token_text(tok: &Tokenizer, id: u32) -> (String, Vec<u8>) {
    let bytes = tok.token_bytes(id);
    (String::from_utf8_lossy(&bytes).into_owned(), bytes)
}

fn chat_logprobs(
    format: LogprobsFormat,
    tok: &Tokenizer,
    entries: &[(u32, f32, Vec<TokenLogprob>)],
) -> Option<ChatLogprobs> {
    let LogprobsFormat::Chat(k) = format else {
        return None;
    };
    let content = entries
        .iter()
        .map(|(t, lp, top)| {
            let (token, bytes) = token_text(tok, *t);
            ChatTokenLogprob {
                token,
                logprob: finite(*lp),
                bytes: Some(bytes),
                top_logprobs: top
                    .iter()
                    .take(k)
                    .map(|e| {
                        let (token, bytes) = token_text(tok, e.token);
                        TopLogprob {
                            token,
                            logprob: finite(e.logprob),
                            bytes: Some(bytes),
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    Some(ChatLogprobs {
        content: Some(content),
        refusal: None,
    })
}

fn legacy_logprobs(
    format: LogprobsFormat,
    tok: &Tokenizer,
    entries: &[(u32, f32, Vec<TokenLogprob>)],
    start: usize,
) -> Option<CompletionLogprobs> {
    let LogprobsFormat::Legacy(k) = format else {
        return None;
    };
    let mut out = CompletionLogprobs {
        tokens: Vec::new(),
        token_logprobs: Vec::new(),
        top_logprobs: Vec::new(),
        text_offset: Vec::new(),
    };
    let mut offset = start;
    for (t, lp, top) in entries {
        let (text, _) = token_text(tok, *t);
        out.text_offset.push(offset as u32);
        offset += text.len();
        out.tokens.push(text);
        out.token_logprobs.push(Some(finite(*lp)));
        let mut map: Vec<(String, f64)> = Vec::new();
        for e in top.iter().take(k) {
            let (s, _) = token_text(tok, e.token);
            // Distinct tokens can print alike (partial UTF-8): keep the first, most likely.
            if !map.iter().any(|(m, _)| *m == s) {
                map.push((s, finite(e.logprob)));
            }
        }
        out.top_logprobs.push(Some(TopLogprobMap(map)));
    }
    Some(out)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random_id() -> String {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let c = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut rng = Rng::new(nanos ^ c.rotate_left(17) ^ std::process::id() as u64);
    format!("{:016x}{:08x}", rng.next_u64(), rng.next_u64() as u32)
}
