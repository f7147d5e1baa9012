//! What the gateway reads from a request body before forwarding it: the body must parse as the
//! endpoint's OpenAI type (so bad input is refused at the edge with a clear 400), and from it
//! come the model, streaming flags, a token estimate for rate limiting and a prompt-prefix
//! hash for affinity. The body forwarded upstream is the client's, with one change: a
//! streaming request always asks the executor for the final usage chunk.

use std::hash::{Hash, Hasher};

use bytes::Bytes;
use llmctl_protocol::demand::DEFAULT_MAX_TOKENS;
use llmctl_protocol::{CompletionRequest, PromptInput};
use serde_json::{Value, json};

use crate::error::GatewayError;

pub(crate) mod scan;

/// Bytes of prompt text that decide prefix affinity.
const AFFINITY_PREFIX: usize = 512;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completions,
    /// `/v1/embeddings`: passed through, checked only for what the gateway needs.
    Embeddings,
    /// `/v1/responses`: passed through likewise.
    Responses,
}

impl Api {
    /// The path under `/v1` (executors take it as is; a hosted upstream under its base URL).
    pub fn path(self) -> &'static str {
        match self {
            Self::Chat => "chat/completions",
            Self::Completions => "completions",
            Self::Embeddings => "embeddings",
            Self::Responses => "responses",
        }
    }

    /// Its streams end with `data: [DONE]` (the Responses API ends them with its last event).
    pub fn stream_ends_with_done(self) -> bool {
        matches!(self, Self::Chat | Self::Completions)
    }
}

/// What the gateway reads of a body it passes through: the model, whether it streams, the
/// output cap; the rest is left to the upstream.
#[derive(serde::Deserialize)]
struct PassThrough {
    model: String,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    max_output_tokens: Option<u32>,
}

#[derive(Debug)]
pub struct Inspected {
    pub model: String,
    pub stream: bool,
    pub client_wants_usage: bool,
    /// Estimated prompt tokens plus `max_tokens`.
    pub charge: u32,
    /// Estimated prompt tokens.
    pub prompt_tokens: u32,
    /// Its `max_tokens`, if it names one (per choice).
    pub max_tokens: Option<u32>,
    /// Choices asked for (`n`, at least 1).
    pub choices: u32,
    pub affinity: Option<u64>,
    /// The body to send upstream.
    pub upstream_body: Bytes,
}

/// A body that is not the JSON the endpoint takes; `param` names the field when one is to blame.
fn invalid_json(what: impl std::fmt::Display, param: Option<&str>) -> GatewayError {
    GatewayError::BadRequest {
        message: format!("invalid JSON body: {what}"),
        param: param.map(str::to_owned),
        code: "invalid_json",
    }
}

fn bad_json(e: serde_json::Error) -> GatewayError {
    invalid_json(e, None)
}

/// The prompt's parts joined by newlines, as far as the gateway needs them: the total length
/// (for the token estimate) and the first bytes (for affinity), without building the whole.
#[derive(Default)]
struct PromptText {
    len: usize,
    prefix: String,
}

impl PromptText {
    fn push(&mut self, part: &str) {
        let sep = usize::from(self.len > 0);
        self.len += sep + part.len();
        if self.prefix.len() < AFFINITY_PREFIX {
            if sep == 1 {
                self.prefix.push('\n');
            }
            let mut end = part
                .len()
                .min(AFFINITY_PREFIX.saturating_sub(self.prefix.len()));
            while !part.is_char_boundary(end) {
                end -= 1;
            }
            self.prefix.push_str(&part[..end]);
        }
    }
}

/// About four bytes of text per token for English-like text: the estimate is trued up later.
fn estimate_tokens(chars: usize) -> u32 {
    (chars / 4 + 1) as u32
}

/// The affinity key of a prompt's first bytes (up to [`AFFINITY_PREFIX`]); none for an empty one.
fn affinity(prefix: &[u8]) -> Option<u64> {
    if prefix.is_empty() {
        return None;
    }
    let mut h = std::hash::DefaultHasher::new();
    prefix[..prefix.len().min(AFFINITY_PREFIX)].hash(&mut h);
    Some(h.finish())
}

/// Reads a body passed through (embeddings, responses): its model, stream flag and output
/// cap; the prompt is estimated from the body's size. Nothing is rewritten.
fn inspect_pass_through(api: Api, body: &Bytes) -> Result<Inspected, GatewayError> {
    let req: PassThrough = serde_json::from_slice(body).map_err(bad_json)?;
    if req.model.is_empty() {
        return Err(GatewayError::BadRequest {
            message: "`model` must name a model".into(),
            param: Some("model".into()),
            code: "invalid_value",
        });
    }
    let stream = req.stream == Some(true);
    if stream && api == Api::Embeddings {
        return Err(GatewayError::BadRequest {
            message: "embeddings are not streamed".into(),
            param: Some("stream".into()),
            code: "invalid_value",
        });
    }
    let prompt_tokens = estimate_tokens(body.len());
    let max_tokens = match api {
        Api::Embeddings => Some(0),
        _ => req.max_output_tokens,
    };
    let decode = max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    Ok(Inspected {
        model: req.model,
        stream,
        // The upstream's answer goes to the client as it is, usage included.
        client_wants_usage: true,
        charge: prompt_tokens.saturating_add(decode),
        prompt_tokens,
        max_tokens,
        choices: 1,
        affinity: None,
        upstream_body: body.clone(),
    })
}

/// Reads a chat request from its top-level members only (`model`, `stream`,
/// `stream_options`, `n`, `max_tokens`, `max_completion_tokens`, `messages` as a range): the
/// messages are not parsed, so the cost does not grow with the conversation. The prompt
/// estimate and the affinity prefix come from the raw `messages`; the executor checks them in
/// full. A stream's body gets `stream_options.include_usage` spliced in, not re-serialized.
fn inspect_chat(body: &Bytes) -> Result<Inspected, GatewayError> {
    let bytes: &[u8] = body;
    let members = scan::members(bytes).map_err(|e| invalid_json(e, None))?;
    fn read<'a, T: serde::Deserialize<'a>>(
        bytes: &'a [u8],
        range: &std::ops::Range<usize>,
        field: &str,
    ) -> Result<T, GatewayError> {
        serde_json::from_slice(&bytes[range.clone()])
            .map_err(|e| invalid_json(format!("`{field}`: {e}"), Some(field)))
    }
    #[derive(serde::Deserialize)]
    struct Options {
        include_usage: Option<bool>,
    }
    let (mut model, mut stream, mut include_usage, mut n) = (None, None, None, None);
    let (mut max_tokens, mut max_completion_tokens) = (None, None);
    let mut messages = None;
    let mut seen: Vec<&str> = Vec::new();
    for m in &members {
        let (key, r) = (m.key.as_ref(), &m.value);
        match key {
            "model" => model = Some(read::<String>(bytes, r, "model")?),
            "stream" => stream = read::<Option<bool>>(bytes, r, "stream")?,
            "stream_options" => {
                include_usage = read::<Option<Options>>(bytes, r, "stream_options")?
                    .and_then(|o| o.include_usage);
            }
            "n" => n = read::<Option<u32>>(bytes, r, "n")?,
            "max_tokens" => max_tokens = read::<Option<u32>>(bytes, r, "max_tokens")?,
            "max_completion_tokens" => {
                max_completion_tokens = read::<Option<u32>>(bytes, r, "max_completion_tokens")?
            }
            "messages" => messages = Some(r.clone()),
            _ => continue,
        }
        // A field read twice could route by one value and be served by the other.
        if seen.contains(&key) {
            return Err(invalid_json(format!("duplicate field `{key}`"), Some(key)));
        }
        seen.push(key);
    }
    let missing = |field: &str| invalid_json(format!("missing field `{field}`"), Some(field));
    let model = model.ok_or_else(|| missing("model"))?;
    let messages = messages.ok_or_else(|| missing("messages"))?;
    let raw = &bytes[messages.clone()];
    if raw.first() != Some(&b'[') {
        return Err(invalid_json(
            "`messages` must be an array",
            Some("messages"),
        ));
    }
    // Inside the brackets.
    let inner = raw[1..raw.len() - 1].trim_ascii();
    if inner.is_empty() {
        return Err(GatewayError::BadRequest {
            message: "`messages` must contain at least one message".into(),
            param: Some("messages".into()),
            code: "invalid_value",
        });
    }
    let stream_on = stream == Some(true);
    let n = n.unwrap_or(1).max(1);
    let max_tokens = max_completion_tokens.or(max_tokens);
    let prompt_tokens = estimate_tokens(inner.len());
    let decode_tokens = max_tokens.unwrap_or(DEFAULT_MAX_TOKENS).saturating_mul(n);
    let upstream_body = if stream_on {
        let usage = br#"{"include_usage":true}"#;
        Bytes::from(scan::set_member(bytes, &members, "stream_options", usage))
    } else {
        body.clone()
    };
    Ok(Inspected {
        model,
        stream: stream_on,
        client_wants_usage: stream_on && include_usage == Some(true),
        charge: prompt_tokens.saturating_add(decode_tokens),
        prompt_tokens,
        max_tokens,
        choices: n,
        affinity: affinity(inner),
        upstream_body,
    })
}

/// Reads a legacy completions request in full (its prompts are short enough to type-check).
/// Every prompt gets `n` choices of up to `max_tokens`: the charge counts them all, so a batch
/// of prompts cannot buy more than one request's worth of its tenant's budget.
fn inspect_completions(body: &Bytes) -> Result<Inspected, GatewayError> {
    let req: CompletionRequest = serde_json::from_slice(body).map_err(bad_json)?;
    let (model, stream, wants_usage, max_tokens) = (
        req.model.clone(),
        req.is_stream(),
        req.include_usage(),
        req.max_tokens,
    );
    let n = req.n.unwrap_or(1).max(1);
    let mut text = PromptText::default();
    let prompts = req.prompt.into_prompts();
    let choices = n.saturating_mul(u32::try_from(prompts.len().max(1)).unwrap_or(u32::MAX));
    for p in prompts {
        match p {
            PromptInput::Text(t) => text.push(&t),
            // Token ids: four bytes each keeps the estimate at one token per id.
            PromptInput::Tokens(ids) => {
                text.push(&ids.iter().map(|i| format!("{i:03} ")).collect::<String>())
            }
        }
    }
    let prompt_tokens = estimate_tokens(text.len);
    let decode_tokens = max_tokens
        .unwrap_or(DEFAULT_MAX_TOKENS)
        .saturating_mul(choices);
    let upstream_body = if stream {
        // Only streaming bodies are rewritten, through a plain JSON value so that every field
        // the client sent, known or not, is kept.
        let mut value: Value = serde_json::from_slice(body).map_err(bad_json)?;
        value["stream_options"] = json!({ "include_usage": true });
        Bytes::from(serde_json::to_vec(&value).expect("JSON values serialize"))
    } else {
        body.clone()
    };
    Ok(Inspected {
        model,
        stream,
        client_wants_usage: wants_usage,
        charge: prompt_tokens.saturating_add(decode_tokens),
        prompt_tokens,
        max_tokens,
        choices,
        affinity: affinity(text.prefix.as_bytes()),
        upstream_body,
    })
}

/// Reads `body`; the upstream body shares its bytes unless it must be rewritten.
pub fn inspect(api: Api, body: &Bytes) -> Result<Inspected, GatewayError> {
    match api {
        Api::Chat => inspect_chat(body),
        Api::Completions => inspect_completions(body),
        Api::Embeddings | Api::Responses => inspect_pass_through(api, body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ins(api: Api, body: &'static [u8]) -> Result<Inspected, GatewayError> {
        inspect(api, &Bytes::from_static(body))
    }

    #[test]
    fn streaming_requests_ask_upstream_for_usage() {
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hello there"}],"stream":true,"max_tokens":10}"#;
        let i = ins(Api::Chat, body).unwrap();
        assert!(i.stream && !i.client_wants_usage);
        let up: Value = serde_json::from_slice(&i.upstream_body).unwrap();
        assert_eq!(up["stream_options"]["include_usage"], true);
        // The estimate is by size: the raw messages, about four bytes a token.
        let raw = r#"{"role":"user","content":"hello there"}"#;
        assert_eq!(i.charge, estimate_tokens(raw.len()) + 10);
        // Spliced, not rebuilt: every other byte is the client's.
        let body = br#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":false},"x_vendor":{"k":[1]}}"#;
        let i = ins(Api::Chat, body).unwrap();
        assert_eq!(
            std::str::from_utf8(&i.upstream_body).unwrap(),
            r#"{"model":"m","messages":[{"role":"user","content":"hi"}],"stream":true,"stream_options":{"include_usage":true},"x_vendor":{"k":[1]}}"#
        );
        assert!(!i.client_wants_usage);
        let body = br#" {"stream":true,"model":"m","messages":[{"role":"user","content":"hi"}],"stream_options":{"include_usage":true}}"#;
        assert!(ins(Api::Chat, body).unwrap().client_wants_usage);
        // The same field twice is refused: the gateway and the upstream might each take another.
        let body = br#"{"model":"a","messages":[{"role":"user","content":"hi"}],"model":"b"}"#;
        assert!(matches!(
            ins(Api::Chat, body),
            Err(GatewayError::BadRequest {
                code: "invalid_json",
                ..
            })
        ));
    }

    #[test]
    fn every_prompt_of_a_batch_is_charged_its_choices() {
        let one = ins(
            Api::Completions,
            br#"{"model":"m","prompt":"a","max_tokens":100,"n":2}"#,
        )
        .unwrap();
        assert_eq!((one.choices, one.charge), (2, estimate_tokens(1) + 200));
        let batch = ins(
            Api::Completions,
            br#"{"model":"m","prompt":["a","b","c"],"max_tokens":100,"n":2}"#,
        )
        .unwrap();
        assert_eq!(batch.choices, 6);
        assert_eq!(batch.charge, estimate_tokens("a\nb\nc".len()) + 600);
    }

    #[test]
    fn embeddings_and_responses_pass_through_untouched() {
        let body = br#"{"model":"e","input":["a","b"],"dimensions":64}"#;
        let i = ins(Api::Embeddings, body).unwrap();
        assert_eq!(
            (i.model.as_str(), i.stream, i.max_tokens),
            ("e", false, Some(0))
        );
        assert_eq!(i.upstream_body.as_ref(), body);
        let body = br#"{"model":"r","input":"hi","stream":true,"max_output_tokens":20,"tools":[]}"#;
        let i = ins(Api::Responses, body).unwrap();
        assert!(i.stream && i.client_wants_usage);
        assert_eq!(i.max_tokens, Some(20));
        assert_eq!(
            i.upstream_body.as_ref(),
            body,
            "not rewritten, even streamed"
        );
        let bad: [&'static [u8]; 3] = [
            br#"{"input":"x"}"#,
            br#"{"model":""}"#,
            br#"{"model":"e","stream":true}"#,
        ];
        for body in bad {
            assert!(ins(Api::Embeddings, body).is_err());
        }
    }

    #[test]
    fn same_prefix_same_affinity_and_bad_bodies_refused() {
        let a = ins(
            Api::Completions,
            br#"{"model":"m","prompt":"shared system prompt, then A"}"#,
        )
        .unwrap();
        let b = ins(
            Api::Completions,
            br#"{"model":"m","prompt":"shared system prompt, then A"}"#,
        )
        .unwrap();
        assert_eq!(a.affinity, b.affinity);
        assert_eq!(
            a.upstream_body.as_ref(),
            br#"{"model":"m","prompt":"shared system prompt, then A"}"#
        );
        assert!(matches!(
            ins(Api::Chat, b"{nope"),
            Err(GatewayError::BadRequest {
                code: "invalid_json",
                ..
            })
        ));
        assert!(matches!(
            ins(Api::Chat, br#"{"model":"m","messages":"x"}"#),
            Err(GatewayError::BadRequest { .. })
        ));
        assert!(matches!(
            ins(Api::Chat, br#"{"model":"m","messages":[]}"#),
            Err(GatewayError::BadRequest { .. })
        ));
    }
}
