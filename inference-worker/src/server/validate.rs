//! Raw OpenAI requests become [`ValidRequest`]s here, once, at the edge: prompts rendered and
//! tokenized, every sampling field range-checked, unsupported features refused. Errors name the
//! OpenAI parameter. Nothing downstream sees the raw request.

use llmctl_protocol::{
    ChatCompletionRequest, CompletionRequest, ContentPart, LogitBias, MessageContent, PromptInput,
    ResponseFormat, Stop,
};
use serde_json::json;

use super::engine_loop::EngineHandle;
use super::error::ServerError;
use crate::engine::SamplingParams;

/// How logprobs are reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogprobsFormat {
    None,
    /// Chat: `logprobs.content[]` with this many `top_logprobs`.
    Chat(usize),
    /// Legacy completions: `tokens`, `token_logprobs`, `top_logprobs` maps, `text_offset`.
    Legacy(usize),
}

#[derive(Clone, Debug)]
pub struct ValidPrompt {
    pub tokens: Vec<u32>,
    /// Text echoed in front of the completion (`echo`).
    pub echo: Option<String>,
}

#[derive(Clone, Debug)]
pub struct ValidRequest {
    pub prompts: Vec<ValidPrompt>,
    /// Per prompt; `n` completions each.
    pub params: SamplingParams,
    pub stream: bool,
    pub include_usage: bool,
    pub logprobs: LogprobsFormat,
}

/// Most prompts in one legacy completions request.
pub const MAX_PROMPTS: usize = 64;
/// OpenAI's limit for the legacy `logprobs` integer.
pub const MAX_LEGACY_LOGPROBS: u32 = 5;

/// The sampling fields both endpoints share.
struct Knobs<'a> {
    temperature: Option<f64>,
    top_p: Option<f64>,
    n: Option<u32>,
    stop: Option<&'a Stop>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    logit_bias: Option<&'a LogitBias>,
    seed: Option<i64>,
    top_k: Option<i32>,
    min_p: Option<f64>,
    repetition_penalty: Option<f64>,
    ignore_eos: Option<bool>,
    min_tokens: Option<u32>,
    stop_token_ids: Option<&'a Vec<u32>>,
    skip_special_tokens: Option<bool>,
}

/// The shared sampling fields of either request type (same names on both).
macro_rules! knobs {
    ($req:expr) => {
        Knobs {
            temperature: $req.temperature,
            top_p: $req.top_p,
            n: $req.n,
            stop: $req.stop.as_ref(),
            presence_penalty: $req.presence_penalty,
            frequency_penalty: $req.frequency_penalty,
            logit_bias: $req.logit_bias.as_ref(),
            seed: $req.seed,
            top_k: $req.top_k,
            min_p: $req.min_p,
            repetition_penalty: $req.repetition_penalty,
            ignore_eos: $req.ignore_eos,
            min_tokens: $req.min_tokens,
            stop_token_ids: $req.stop_token_ids.as_ref(),
            skip_special_tokens: $req.skip_special_tokens,
        }
    };
}

fn sampling(k: Knobs<'_>, vocab: usize) -> Result<SamplingParams, ServerError> {
    let top_k = match k.top_k {
        None | Some(-1) | Some(0) => 0,
        Some(t) if t > 0 => t as usize,
        Some(t) => {
            return Err(ServerError::param(
                "top_k",
                format!("`top_k` must be -1 (disabled) or positive, got {t}"),
            ));
        }
    };
    let mut logit_bias = Vec::new();
    for (token, &bias) in k.logit_bias.into_iter().flatten() {
        let id: u32 = token
            .parse()
            .ok()
            .filter(|&id: &u32| (id as usize) < vocab)
            .ok_or_else(|| {
                ServerError::param(
                    "logit_bias",
                    format!("`logit_bias` key `{token}` is not a token id of this model"),
                )
            })?;
        logit_bias.push((id, bias as f32));
    }
    let defaults = SamplingParams::default();
    Ok(SamplingParams {
        n: k.n.map_or(1, |n| n as usize),
        temperature: k.temperature.map_or(defaults.temperature, |v| v as f32),
        top_p: k.top_p.map_or(1.0, |v| v as f32),
        top_k,
        min_p: k.min_p.map_or(0.0, |v| v as f32),
        presence_penalty: k.presence_penalty.unwrap_or(0.0) as f32,
        frequency_penalty: k.frequency_penalty.unwrap_or(0.0) as f32,
        repetition_penalty: k.repetition_penalty.map_or(1.0, |v| v as f32),
        logit_bias,
        seed: k.seed.map(|s| s as u64),
        max_tokens: 0, // set by the caller once the prompt length is known
        min_tokens: k.min_tokens.unwrap_or(0) as usize,
        stop: k.stop.map(|s| s.as_slice().to_vec()).unwrap_or_default(),
        stop_token_ids: k.stop_token_ids.cloned().unwrap_or_default(),
        ignore_eos: k.ignore_eos.unwrap_or(false),
        logprobs: None,
        skip_special_tokens: k.skip_special_tokens.unwrap_or(true),
    })
}

/// Sets `max_tokens` (default: the rest of the context) and checks the context length.
/// Refuses, before tokenizing it, a prompt whose size alone shows it cannot fit the context
/// (where the tokenizer allows a sound bound; see `Tokenizer::min_tokens`).
fn check_size(engine: &EngineHandle, text: &str, param: &str) -> Result<(), ServerError> {
    let Some(at_least) = engine.tokenizer.min_tokens(text) else {
        return Ok(());
    };
    if at_least < engine.max_model_len {
        return Ok(());
    }
    Err(ServerError::BadRequest {
        param: Some(param.to_owned()),
        message: format!(
            "This model's maximum context length is {} tokens. However, your {param} has at least {at_least} tokens ({} bytes), leaving no room for a completion.",
            engine.max_model_len,
            text.len()
        ),
        code: Some("context_length_exceeded"),
    })
}

fn fit_context(
    params: &mut SamplingParams,
    requested: Option<u32>,
    default: Option<usize>,
    prompt_len: usize,
    max_len: usize,
    prompt_param: &str,
) -> Result<(), ServerError> {
    if prompt_len >= max_len {
        return Err(ServerError::BadRequest {
            param: Some(prompt_param.to_owned()),
            message: format!(
                "This model's maximum context length is {max_len} tokens. However, your {prompt_param} has {prompt_len} tokens, leaving no room for a completion."
            ),
            code: Some("context_length_exceeded"),
        });
    }
    let room = max_len - prompt_len;
    params.max_tokens = match requested {
        Some(0) => {
            return Err(ServerError::param(
                "max_tokens",
                "`max_tokens` must be at least 1",
            ));
        }
        Some(m) if m as usize > room => {
            return Err(ServerError::BadRequest {
                param: Some("max_tokens".to_owned()),
                message: format!(
                    "This model's maximum context length is {max_len} tokens. However, you requested {} tokens ({prompt_len} in the {prompt_param}, {m} in the completion).",
                    prompt_len + m as usize
                ),
                code: Some("context_length_exceeded"),
            });
        }
        Some(m) => m as usize,
        None => default.unwrap_or(room).min(room),
    };
    Ok(())
}

fn check_model(model: &str, served: &str) -> Result<(), ServerError> {
    if model == served {
        Ok(())
    } else {
        Err(ServerError::ModelNotFound(model.to_owned()))
    }
}

fn check_stream_options(stream: bool, has_options: bool) -> Result<(), ServerError> {
    if has_options && !stream {
        return Err(ServerError::param(
            "stream_options",
            "`stream_options` is only allowed when `stream` is true",
        ));
    }
    Ok(())
}

pub fn chat(
    req: ChatCompletionRequest,
    engine: &EngineHandle,
    served: &str,
) -> Result<ValidRequest, ServerError> {
    check_model(&req.model, served)?;
    if req.messages.is_empty() {
        return Err(ServerError::param(
            "messages",
            "`messages` must contain at least one message",
        ));
    }
    if req.tools.as_ref().is_some_and(|t| !t.is_empty()) {
        return Err(ServerError::param(
            "tools",
            "tool calling is not supported by this worker",
        ));
    }
    if let Some(ResponseFormat::JsonObject | ResponseFormat::JsonSchema { .. }) =
        req.response_format
    {
        return Err(ServerError::param(
            "response_format",
            "only `{\"type\": \"text\"}` is supported",
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        if let Some(MessageContent::Parts(parts)) = &m.content
            && let Some(bad) = parts
                .iter()
                .find(|p| !matches!(p, ContentPart::Text { .. }))
        {
            return Err(ServerError::param(
                &format!("messages[{i}].content"),
                format!(
                    "content part type `{}` is not supported by this model (text only)",
                    bad.kind()
                ),
            ));
        }
        let mut msg = json!({ "role": m.role.as_str(), "content": m.text_content() });
        if let Some(name) = &m.name {
            msg["name"] = json!(name);
        }
        messages.push(msg);
    }
    let rendered = engine
        .tokenizer
        .render_chat(&messages, true)
        .map_err(|e| ServerError::param("messages", e.to_string()))?;
    check_size(engine, &rendered, "messages")?;
    let tokens = engine
        .tokenizer
        .encode(&rendered, false)
        .map_err(|e| ServerError::param("messages", e))?;

    let stream = req.is_stream();
    check_stream_options(stream, req.stream_options.is_some())?;
    let top = match (req.logprobs.unwrap_or(false), req.top_logprobs) {
        (false, Some(_)) => {
            return Err(ServerError::param(
                "top_logprobs",
                "`top_logprobs` requires `logprobs` to be true",
            ));
        }
        (false, None) => None,
        (true, t) => Some(t.unwrap_or(0) as usize),
    };
    let mut params = sampling(knobs!(req), engine.vocab_size)?;
    params.logprobs = top;
    fit_context(
        &mut params,
        req.effective_max_tokens(),
        None,
        tokens.len(),
        engine.max_model_len,
        "messages",
    )?;
    params
        .validate(engine.vocab_size)
        .map_err(|e| ServerError::param(e.param, e.to_string()))?;
    Ok(ValidRequest {
        prompts: vec![ValidPrompt { tokens, echo: None }],
        params,
        stream,
        include_usage: req.include_usage(),
        logprobs: top.map_or(LogprobsFormat::None, LogprobsFormat::Chat),
    })
}

pub fn completion(
    req: CompletionRequest,
    engine: &EngineHandle,
    served: &str,
) -> Result<ValidRequest, ServerError> {
    check_model(&req.model, served)?;
    if req.suffix.as_ref().is_some_and(|s| !s.is_empty()) {
        return Err(ServerError::param(
            "suffix",
            "`suffix` is not supported by this model",
        ));
    }
    let n = req.n.unwrap_or(1);
    if let Some(best_of) = req.best_of
        && best_of != n
    {
        return Err(ServerError::param(
            "best_of",
            "`best_of` other than `n` is not supported",
        ));
    }
    if let Some(lp) = req.logprobs
        && lp > MAX_LEGACY_LOGPROBS
    {
        return Err(ServerError::param(
            "logprobs",
            format!("`logprobs` must be between 0 and {MAX_LEGACY_LOGPROBS}, got {lp}"),
        ));
    }
    let stream = req.is_stream();
    check_stream_options(stream, req.stream_options.is_some())?;
    let include_usage = req.include_usage();
    let echo = req.echo.unwrap_or(false);
    if echo && req.logprobs.is_some() {
        return Err(ServerError::param(
            "echo",
            "`echo` together with `logprobs` is not supported",
        ));
    }
    let mut params = sampling(knobs!(req), engine.vocab_size)?;
    params.logprobs = req.logprobs.map(|k| k as usize);
    let inputs = req.prompt.into_prompts();
    if inputs.is_empty() {
        return Err(ServerError::param("prompt", "`prompt` must not be empty"));
    }
    if inputs.len() > MAX_PROMPTS {
        return Err(ServerError::param(
            "prompt",
            format!(
                "at most {MAX_PROMPTS} prompts per request, got {}",
                inputs.len()
            ),
        ));
    }
    let mut prompts = Vec::with_capacity(inputs.len());
    let mut longest = 0;
    for input in inputs {
        let (tokens, text) = match input {
            PromptInput::Text(text) => {
                check_size(engine, &text, "prompt")?;
                (
                    engine
                        .tokenizer
                        .encode(&text, true)
                        .map_err(|e| ServerError::param("prompt", e))?,
                    text,
                )
            }
            PromptInput::Tokens(tokens) => {
                if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= engine.vocab_size) {
                    return Err(ServerError::param(
                        "prompt",
                        format!(
                            "token id {bad} is outside the vocabulary of {}",
                            engine.vocab_size
                        ),
                    ));
                }
                let text = if echo {
                    engine.tokenizer.decode(&tokens, false).unwrap_or_default()
                } else {
                    String::new()
                };
                (tokens, text)
            }
        };
        if tokens.is_empty() {
            return Err(ServerError::param("prompt", "the prompt is empty"));
        }
        longest = longest.max(tokens.len());
        prompts.push(ValidPrompt {
            tokens,
            echo: echo.then_some(text),
        });
    }
    // OpenAI's default for the legacy endpoint is 16 tokens.
    fit_context(
        &mut params,
        req.max_tokens,
        Some(16),
        longest,
        engine.max_model_len,
        "prompt",
    )?;
    params
        .validate(engine.vocab_size)
        .map_err(|e| ServerError::param(e.param, e.to_string()))?;
    Ok(ValidRequest {
        prompts,
        params,
        stream,
        include_usage,
        logprobs: req
            .logprobs
            .map_or(LogprobsFormat::None, |k| LogprobsFormat::Legacy(k as usize)),
    })
}
