//! Relaying an executor's answer (from `upstream`) chunk by chunk. SSE streams are parsed
//! event by event only to find the `usage` the gateway asked for (and to remove it when the
//! client did not), JSON bodies are passed through while a bounded copy is kept to read
//! `usage`. An executor that dies mid-stream ends the client's stream with an OpenAI error
//! event. When the relay ends, the endpoint slot is freed, the tenant's token charge is trued
//! up and the request is counted.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::BodyExt;
use llmctl_protocol::ErrorResponse;
use llmctl_protocol::demand::DecodeHistory;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::auth::TenantState;
use crate::body::{self, Body};
use crate::external::ExternalBody;
use crate::metrics::Metrics;
use crate::queue::Permit;
use crate::upstream::UpstreamBody;

/// Largest JSON response copy kept to read `usage` from.
const USAGE_COPY_LIMIT: usize = 4 << 20;

/// Header names the gateway reads or writes, built at compile time.
pub mod names {
    use http::HeaderName;
    pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    pub const CORRELATION_ID: HeaderName = HeaderName::from_static("x-correlation-id");
    pub const DISPATCH_ID: HeaderName = HeaderName::from_static("x-llmctl-dispatch-id");
    pub const POOL: HeaderName = HeaderName::from_static("x-llmctl-pool");
    pub const EXECUTOR: HeaderName = HeaderName::from_static("x-llmctl-executor");
    pub const QUEUE_MS: HeaderName = HeaderName::from_static("x-llmctl-queue-ms");
    pub const SPILLED_FROM: HeaderName = HeaderName::from_static("x-llmctl-spilled-from");
    pub const SPILL_REASON: HeaderName = HeaderName::from_static("x-llmctl-spill-reason");
}

/// An answer being relayed: from one of our executors or from a hosted provider.
pub enum Answer {
    Executor(UpstreamBody),
    External(ExternalBody),
}

impl http_body::Body for Answer {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            Self::Executor(b) => std::pin::Pin::new(b).poll_frame(cx),
            Self::External(b) => std::pin::Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Executor(b) => b.is_end_stream(),
            Self::External(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            Self::Executor(b) => b.size_hint(),
            Self::External(b) => b.size_hint(),
        }
    }
}

/// What the relay needs to settle the request when it ends.
pub struct Settle {
    pub metrics: Arc<Metrics>,
    pub e2e: prometheus_client::metrics::histogram::Histogram,
    pub pool: Arc<str>,
    pub tenant: Arc<TenantState>,
    pub charged: u32,
    pub started: Instant,
    pub permit: Permit,
    /// The client asked for the final usage chunk (otherwise it is removed).
    pub client_wants_usage: bool,
    /// A stream that ends without `data: [DONE]` was cut short (true for chat and
    /// completions; the Responses API ends its streams with its last event).
    pub stream_ends_with_done: bool,
    pub request_id: String,
    pub dispatch_id: String,
    /// The executor or hosted upstream that answered.
    pub executor: String,
    /// A hosted upstream whose limits are trued up too.
    pub upstream_limits: Option<Arc<crate::external::External>>,
    /// Where the completion tokens of a successful response are recorded, and over how many
    /// choices.
    pub history: Arc<DecodeHistory>,
    pub choices: u32,
    /// Counts the request as in flight until the relay ends (the drain waits on it).
    pub _inflight: InflightGuard,
}

/// One request in flight; dropping it ends that.
pub struct InflightGuard(Arc<std::sync::atomic::AtomicUsize>);

impl InflightGuard {
    pub fn new(counter: &Arc<std::sync::atomic::AtomicUsize>) -> Self {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(counter.clone())
    }
}

impl Drop for InflightGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// How a relayed answer ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The upstream finished its answer; the `finish_reason` it gave, if any.
    Complete(Option<&'static str>),
    /// The client went away first.
    ClientGone,
    /// The client read nothing for the write-stall timeout.
    ClientStalled,
    /// The upstream failed mid-answer.
    UpstreamError,
    /// The upstream went silent mid-answer past the idle timeout.
    Timeout,
}

impl End {
    fn of(e: &std::io::Error) -> Self {
        if e.kind() == std::io::ErrorKind::TimedOut {
            Self::Timeout
        } else {
            Self::UpstreamError
        }
    }

    fn failed(self) -> bool {
        matches!(self, Self::UpstreamError | Self::Timeout)
    }

    /// The terminal reason: the model's finish reason, or why the request ended otherwise.
    pub fn reason(self, status: u16) -> &'static str {
        match self {
            Self::Complete(Some(r)) => r,
            Self::Complete(None) if (200..300).contains(&status) => "stop",
            Self::Complete(None) if status == 429 => "rate_limited",
            Self::Complete(None) if status >= 500 => "upstream_error",
            Self::Complete(None) => "rejected",
            Self::ClientGone => "client_gone",
            Self::ClientStalled => "client_stalled",
            Self::UpstreamError => "upstream_error",
            Self::Timeout => "timeout",
        }
    }
}

/// The `finish_reason` an answer or chunk names (the first one), if any.
fn finish_reason(json: &[u8]) -> Option<&'static str> {
    const KEY: &[u8] = b"\"finish_reason\":\"";
    let at = memchr::memmem::find(json, KEY)? + KEY.len();
    let rest = &json[at..];
    Some(
        [
            "stop",
            "length",
            "tool_calls",
            "content_filter",
            "function_call",
        ]
        .into_iter()
        .find(|r| rest.starts_with(r.as_bytes()) && rest.get(r.len()) == Some(&b'"'))
        .unwrap_or("other"),
    )
}

/// The SSE comment that ends a stream with its terminal reason (clients ignore comments;
/// those that want it read it before `[DONE]`).
fn finish_comment(reason: &str, request_id: &str) -> Vec<u8> {
    format!(": llmctl-finish reason={reason} request_id={request_id}\n\n").into_bytes()
}

impl Settle {
    fn finish(mut self, status: u16, usage: Option<Usage>, end: End) {
        let failed = end.failed();
        if failed {
            self.permit.fail();
        }
        // Without a usage report the charge stands.
        let total = usage.map_or(self.charged, |u| u.total);
        self.tenant.limits.true_up(self.charged, total);
        if let Some(upstream) = &self.upstream_limits {
            upstream.true_up(self.charged, total);
        }
        if let Some(completion) = usage
            .and_then(|u| u.completion)
            .filter(|_| !failed && (200..300).contains(&status))
        {
            self.history.record(completion.into(), self.choices);
        }
        self.e2e.observe(self.started.elapsed().as_secs_f64());
        self.metrics.request(&self.pool, &self.tenant.name, status);
        let reason = end.reason(status);
        self.metrics.finished(&self.pool, reason);
        if let Some(u) = usage.filter(|u| u.total > 0) {
            let completion = u.completion.unwrap_or(0).min(u.total);
            self.metrics.tokens(
                &self.pool,
                &self.tenant.name,
                u64::from(u.total - completion),
                u64::from(completion),
            );
        }
        let tokens = usage.map(|u| u.total);
        tracing::info!(request_id = %self.request_id, dispatch_id = %self.dispatch_id, pool = %self.pool, executor = %self.executor, tenant = %self.tenant.name, status, reason, tokens = ?tokens, "request finished");
    }
}

/// Only the `usage` of a response body: everything else is skipped without being built.
#[derive(serde::Deserialize)]
struct UsageOnly {
    usage: Option<UsageCounts>,
}

#[derive(serde::Deserialize)]
struct UsageCounts {
    total_tokens: Option<u64>,
    /// `input_tokens` in the Responses API.
    #[serde(alias = "input_tokens")]
    prompt_tokens: Option<u64>,
    #[serde(alias = "output_tokens")]
    completion_tokens: Option<u64>,
}

/// What a response reports in its `usage`: all tokens, and the generated ones where it says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Usage {
    total: u32,
    completion: Option<u32>,
}

/// Tokens a JSON response (or stream chunk) reports in its `usage`. Fast path: `usage` is
/// normally the last key, so its object is read from the last `"usage":` on (an unescaped
/// quote can only open a key or string, never sit inside one); otherwise the whole body.
fn usage_tokens(json: &[u8]) -> Option<Usage> {
    const KEY: &[u8] = b"\"usage\":";
    let tail = json
        .windows(KEY.len())
        .rposition(|w| w == KEY)
        .and_then(|at| {
            use serde::Deserialize;
            let mut de = serde_json::Deserializer::from_slice(&json[at + KEY.len()..]);
            Option::<UsageCounts>::deserialize(&mut de).ok()
        });
    let u = match tail {
        Some(u) => u?,
        None => serde_json::from_slice::<UsageOnly>(json).ok()?.usage?,
    };
    let total = u
        .total_tokens
        .or_else(|| Some(u.prompt_tokens? + u.completion_tokens.unwrap_or(0)))?;
    let clamp = |n: u64| n.min(u32::MAX as u64) as u32;
    Some(Usage {
        total: clamp(total),
        completion: u.completion_tokens.map(clamp),
    })
}

/// Bytes of a stream held for a client that reads slower than its executor writes; when they
/// are full the executor is read no further until the client catches up (or stalls out).
const RELAY_BUFFER: usize = 256 << 10;

/// Relays `upstream` to the client; settles when the executor is done (freeing its slot
/// whatever the client does next), or when the client leaves or stalls first. A client that
/// takes nothing for `write_stall` while bytes wait for it ends the request (`client_stalled`).
pub async fn relay(
    upstream: Response<Answer>,
    settle: Settle,
    write_stall: Duration,
) -> Response<Body> {
    let (parts, incoming) = upstream.into_parts();
    let sse = parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"));
    let mut headers = parts.headers;
    if sse {
        headers.remove(header::CONTENT_LENGTH);
    }
    let status = parts.status;
    let whole = http_body::Body::size_hint(&incoming)
        .exact()
        .is_some_and(|n| n <= USAGE_COPY_LIMIT as u64);
    let client_body = if sse {
        let (tx, client_body) = body::channel();
        tokio::spawn(relay_sse(incoming, tx, settle, status, write_stall));
        client_body.boxed_unsync()
    } else {
        let mut json = JsonRelay {
            incoming,
            copy: Vec::new(),
            copied: 0,
            settle: Some(settle),
            status,
            failed: false,
        };
        if !whole {
            // Plain bodies need no task: the body itself forwards frames and settles at the end.
            json.boxed_unsync()
        } else {
            // An answer of known, bounded size (the executor is done generating): read it
            // whole, which settles and frees the executor's slot, then send it at the
            // client's pace.
            let mut bytes = Vec::new();
            while let Some(Ok(frame)) = json.frame().await {
                if let Ok(data) = frame.into_data() {
                    bytes.extend_from_slice(&data);
                }
            }
            if json.failed {
                return crate::error::GatewayError::Upstream(
                    "the executor failed mid-response".into(),
                )
                .response();
            }
            headers.remove(header::CONTENT_LENGTH);
            body::full(bytes)
        }
    };
    let mut response = Response::new(client_body);
    *response.status_mut() = status;
    *response.headers_mut() = headers;
    response
}

/// A JSON response passed through frame by frame, keeping a bounded copy to read `usage` from;
/// settles when the body ends, fails, or is dropped unfinished (client gone).
struct JsonRelay {
    incoming: Answer,
    /// The frames so far (shared, not copied), while they fit the limit.
    copy: Vec<Bytes>,
    copied: usize,
    settle: Option<Settle>,
    status: StatusCode,
    /// The executor failed before the end of the body.
    failed: bool,
}

impl http_body::Body for JsonRelay {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        use std::task::Poll;
        let this = &mut *self;
        loop {
            return match std::pin::Pin::new(&mut this.incoming).poll_frame(cx) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Some(Ok(frame))) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if this.copied + data.len() <= USAGE_COPY_LIMIT {
                        this.copied += data.len();
                        this.copy.push(data.clone());
                    }
                    // With a known length the server may never poll past the last frame.
                    if http_body::Body::is_end_stream(&this.incoming) {
                        this.settle_complete();
                    }
                    Poll::Ready(Some(Ok(http_body::Frame::data(data))))
                }
                Poll::Ready(Some(Err(e))) => {
                    this.failed = true;
                    if let Some(settle) = this.settle.take() {
                        settle.metrics.upstream_error(&settle.pool, "mid_body");
                        tracing::warn!(request_id = %settle.request_id, "executor failed mid-response: {e}");
                        settle.finish(502, None, End::of(&e));
                    }
                    Poll::Ready(None)
                }
                Poll::Ready(None) => {
                    this.settle_complete();
                    Poll::Ready(None)
                }
            };
        }
    }
}

impl JsonRelay {
    /// The whole body went through: settle with the usage it reports.
    fn settle_complete(&mut self) {
        if let Some(settle) = self.settle.take() {
            let whole;
            let body: &[u8] = match self.copy.as_slice() {
                [one] => one,
                many => {
                    whole = many.concat();
                    &whole
                }
            };
            let usage = usage_tokens(body);
            let end = End::Complete(finish_reason(body));
            let ok = self.status.is_success();
            settle.finish(
                self.status.as_u16(),
                if ok {
                    usage
                } else {
                    Some(Usage {
                        total: 0,
                        completion: None,
                    })
                },
                end,
            );
        }
    }
}

impl Drop for JsonRelay {
    fn drop(&mut self) {
        if let Some(settle) = self.settle.take() {
            settle.finish(499, None, End::ClientGone);
        }
    }
}

/// Reads the executor's stream at its own pace into a bounded buffer and feeds the client from
/// it; see [`relay`].
async fn relay_sse(
    mut incoming: Answer,
    tx: mpsc::Sender<Bytes>,
    settle: Settle,
    status: StatusCode,
    write_stall: Duration,
) {
    let (metrics, pool, request_id, wants_usage, needs_done) = (
        settle.metrics.clone(),
        settle.pool.clone(),
        settle.request_id.clone(),
        settle.client_wants_usage,
        settle.stream_ends_with_done,
    );
    let mut settle = Some(settle);
    let mut pending = BytesMut::new();
    let mut usage = None;
    let mut done = false;
    // The last finish reason a chunk gave.
    let mut finish = None;
    let mut reading = true;
    let mut out: VecDeque<Bytes> = VecDeque::new();
    let mut buffered = 0;
    // Since when bytes have waited for the client without it taking any.
    let mut waiting_since = Instant::now();
    loop {
        if !reading && out.is_empty() {
            return;
        }
        tokio::select! {
            frame = incoming.frame(), if reading && buffered < RELAY_BUFFER => {
                let mut broke = End::UpstreamError;
                let data_ended_cleanly = frame.is_none();
                let data = match frame {
                    None => None,
                    Some(Ok(frame)) => frame.into_data().ok().map(Some).unwrap_or(Some(Bytes::new())),
                    Some(Err(e)) => {
                        tracing::warn!(%request_id, "executor failed mid-stream: {e}");
                        broke = End::of(&e);
                        None
                    }
                };
                let mut forward = BytesMut::new();
                match data {
                    Some(data) => {
                        pending.extend_from_slice(&data);
                        while let Some(end) = find_event_end(&pending) {
                            let event = pending.split_to(end);
                            if let Some(r) = finish_reason(&event) {
                                finish = Some(r);
                            }
                            let was_done = done;
                            let out = process_event(&event, &mut usage, &mut done, wants_usage);
                            if done && !was_done {
                                let reason = End::Complete(finish).reason(status.as_u16());
                                forward.extend_from_slice(&finish_comment(reason, &request_id));
                            }
                            forward.extend_from_slice(&out);
                        }
                    }
                    None => {
                        reading = false;
                        let settle = settle.take().expect("settled once, when reading ends");
                        // A stream without `[DONE]` in its API ended well if its upstream
                        // closed it cleanly.
                        if !needs_done && data_ended_cleanly {
                            let reason = End::Complete(finish).reason(status.as_u16());
                            forward.extend_from_slice(&finish_comment(reason, &request_id));
                            done = true;
                        }
                        if done {
                            settle.finish(status.as_u16(), usage, End::Complete(finish));
                        } else {
                            // The executor went away before `[DONE]`: end the client's stream
                            // with an error event.
                            metrics.upstream_error(&pool, "mid_stream");
                            forward.extend_from_slice(&stream_error_event(broke.reason(502), &request_id));
                            settle.finish(502, usage, broke);
                        }
                    }
                }
                if !forward.is_empty() {
                    if out.is_empty() {
                        waiting_since = Instant::now();
                    }
                    buffered += forward.len();
                    out.push_back(forward.freeze());
                }
            }
            permit = tx.reserve(), if !out.is_empty() => {
                let Ok(permit) = permit else {
                    // The client is gone.
                    if let Some(settle) = settle.take() {
                        settle.finish(499, usage, End::ClientGone);
                    }
                    return;
                };
                let chunk = out.pop_front().expect("only reserved with bytes waiting");
                buffered -= chunk.len();
                permit.send(chunk);
                waiting_since = Instant::now();
            }
            () = tokio::time::sleep_until((waiting_since + write_stall).into()), if !out.is_empty() => {
                metrics.client_stalled(&pool);
                tracing::warn!(%request_id, %pool, buffered, "client_stalled: it read nothing for {write_stall:?}; request ended");
                if let Some(settle) = settle.take() {
                    settle.finish(499, usage, End::ClientStalled);
                }
                return;
            }
        }
    }
}

/// An OpenAI error event, the finish comment and `[DONE]`, for a stream whose executor
/// failed.
fn stream_error_event(reason: &str, request_id: &str) -> Vec<u8> {
    let err = ErrorResponse::server_error("the executor serving this request failed mid-stream")
        .with_code("upstream_failed");
    let mut event = b"data: ".to_vec();
    event.extend(serde_json::to_vec(&err).expect("error bodies serialize"));
    event.extend_from_slice(b"\n\n");
    event.extend(finish_comment(reason, request_id));
    event.extend_from_slice(b"data: [DONE]\n\n");
    event
}

/// End of the first complete SSE event (after its blank line, `\n\n` or `\r\n\r\n`), if any.
pub(crate) fn find_event_end(buf: &[u8]) -> Option<usize> {
    let lf = memchr::memmem::find(buf, b"\n\n").map(|p| p + 2);
    let crlf = memchr::memmem::find(buf, b"\r\n\r\n").map(|p| p + 4);
    match (lf, crlf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Returns the bytes to forward for one event, noting usage and `[DONE]`.
fn process_event(
    event: &[u8],
    usage: &mut Option<Usage>,
    done: &mut bool,
    client_wants_usage: bool,
) -> Bytes {
    // The data line: first in OpenAI's events, after an `event:` line in the Responses API's.
    let data = event.strip_prefix(b"data: ").or_else(|| {
        let at = event.windows(7).position(|w| w == b"\ndata: ")?;
        Some(&event[at + 7..])
    });
    let Some(payload) = data.map(|p| p.trim_ascii_end()) else {
        return Bytes::copy_from_slice(event);
    };
    if payload == b"[DONE]" {
        *done = true;
        return Bytes::copy_from_slice(event);
    }
    // Cheap test first: only chunks that mention usage need parsing.
    if !contains(payload, b"\"usage\"") {
        return Bytes::copy_from_slice(event);
    }
    let total = usage_tokens(payload);
    if total.is_some() {
        *usage = total;
    }
    if client_wants_usage {
        return Bytes::copy_from_slice(event);
    }
    // The client did not ask for usage: drop the usage-only chunk, strip `usage` elsewhere.
    let Ok(mut v) = serde_json::from_slice::<Value>(payload) else {
        return Bytes::copy_from_slice(event);
    };
    let usage_only = v
        .get("choices")
        .and_then(Value::as_array)
        .is_some_and(Vec::is_empty);
    if total.is_some() && usage_only {
        return Bytes::new();
    }
    if let Some(obj) = v.as_object_mut() {
        obj.remove("usage");
    }
    let mut out = b"data: ".to_vec();
    out.extend(serde_json::to_vec(&v).expect("JSON values serialize"));
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    memchr::memmem::find(haystack, needle).is_some()
}

/// Header value from a string the gateway made (ids, names).
pub fn header_value(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_read_and_stripped_unless_asked_for() {
        let (mut usage, mut done) = (None, false);
        let chunk = br#"data: {"id":"x","choices":[{"index":0,"text":"hi"}],"usage":null}

"#;
        let out = process_event(chunk, &mut usage, &mut done, false);
        let v: Value = serde_json::from_slice(out.strip_prefix(b"data: ").unwrap()).unwrap();
        assert!(
            v.get("usage").is_none(),
            "usage:null removed for a client that did not ask"
        );
        assert_eq!(
            process_event(chunk, &mut usage, &mut done, true),
            Bytes::copy_from_slice(chunk)
        );

        let last = br#"data: {"id":"x","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}

"#;
        assert!(
            process_event(last, &mut usage, &mut done, false).is_empty(),
            "usage chunk dropped"
        );
        assert_eq!(
            usage,
            Some(Usage {
                total: 12,
                completion: Some(7)
            })
        );
        assert_eq!(
            process_event(last, &mut usage, &mut done, true),
            Bytes::copy_from_slice(last)
        );
        process_event(b"data: [DONE]\n\n", &mut usage, &mut done, false);
        assert!(done);
    }

    #[test]
    fn usage_is_found_wherever_it_is() {
        let last = br#"{"id":"x","choices":[{"message":{"content":"a \"usage\": {} trap"}}],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#;
        let total = |json: &[u8]| usage_tokens(json).map(|u| u.total);
        assert_eq!(total(last), Some(12));
        let middle = br#"{"usage":{"prompt_tokens":2,"completion_tokens":3},"choices":[]}"#;
        assert_eq!(usage_tokens(middle).and_then(|u| u.completion), Some(3));
        assert_eq!(total(middle), Some(5));
        assert_eq!(
            usage_tokens(br#"{"usage":{"prompt_tokens":2}}"#),
            Some(Usage {
                total: 2,
                completion: None
            })
        );
        assert_eq!(usage_tokens(br#"{"choices":[],"usage":null}"#), None);
        assert_eq!(usage_tokens(br#"{"choices":[]}"#), None);
        assert_eq!(usage_tokens(b"not json"), None);
    }

    /// The relay's event splitting, as `relay_sse` runs it, over chunks cut anywhere.
    fn relay_events(chunks: &[Vec<u8>], wants_usage: bool) -> (Vec<u8>, Option<Usage>, bool) {
        let (mut pending, mut out) = (BytesMut::new(), Vec::new());
        let (mut usage, mut done) = (None, false);
        for chunk in chunks {
            pending.extend_from_slice(chunk);
            while let Some(end) = find_event_end(&pending) {
                let event = pending.split_to(end);
                out.extend_from_slice(&process_event(&event, &mut usage, &mut done, wants_usage));
            }
        }
        (out, usage, done)
    }

    #[test]
    fn events_end_at_a_blank_line_of_either_kind() {
        // Some OpenAI-compatible servers end their events with CRLF pairs.
        let wire =
            b"data: {\"choices\":[],\"usage\":{\"total_tokens\":7}}\r\n\r\ndata: [DONE]\r\n\r\n";
        let (_, usage, done) = relay_events(&[wire.to_vec()], true);
        assert!(done);
        assert_eq!(usage.map(|u| u.total), Some(7));
        assert_eq!(find_event_end(b"a\n\nb\r\n\r\n"), Some(3));
        assert_eq!(find_event_end(b"a\r\n\r\nb\n\n"), Some(5));
        assert_eq!(find_event_end(b"a\r\nb"), None);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            cases: 256,
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x11c7),
            ..Default::default()
        })]

        /// Whatever the read boundaries, a client that asked for usage gets the stream byte for
        /// byte, and the usage and `[DONE]` are found; one that did not gets no usage.
        #[test]
        fn sse_relay_is_independent_of_read_boundaries(
            texts in proptest::collection::vec("[a-z \"\\\\{}:,\n]{0,40}", 0..8),
            cuts in proptest::collection::vec(1usize..64, 1..16),
            prompt in 0u64..1000,
            completion in 0u64..1000,
        ) {
            let mut wire = Vec::new();
            for t in &texts {
                let chunk = serde_json::json!({"id": "x", "choices": [{"index": 0, "delta": {"content": t}}], "usage": null});
                wire.extend_from_slice(format!("data: {chunk}\n\n").as_bytes());
            }
            let last = serde_json::json!({"id": "x", "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}});
            wire.extend_from_slice(format!("data: {last}\n\ndata: [DONE]\n\n").as_bytes());
            let mut chunks = Vec::new();
            let mut rest = &wire[..];
            for c in cuts.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let n = (*c).min(rest.len());
                chunks.push(rest[..n].to_vec());
                rest = &rest[n..];
            }
            let (out, usage, done) = relay_events(&chunks, true);
            proptest::prop_assert_eq!(&out, &wire);
            proptest::prop_assert!(done);
            let total = (prompt + completion) as u32;
            proptest::prop_assert_eq!(usage, Some(Usage { total, completion: Some(completion as u32) }));
            let (stripped, usage, done) = relay_events(&chunks, false);
            proptest::prop_assert!(done);
            proptest::prop_assert_eq!(usage.map(|u| u.total), Some(total));
            proptest::prop_assert!(!contains(&stripped, b"\"usage\""));
        }

        /// Any bytes from an executor: usage reading and event processing never panic.
        #[test]
        fn arbitrary_executor_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..400)) {
            let _ = usage_tokens(&bytes);
            let _ = relay_events(std::slice::from_ref(&bytes), false);
            let _ = relay_events(&[bytes], true);
        }
    }
}
