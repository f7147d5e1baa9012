//! The gateway's HTTP/1.1 client to executors. A request is written, and its response read, by
//! the task that serves the client: no connection task, no channel between them, no pool lookup
//! by URI. Kept-alive connections wait per executor address (newest first) until reused, found
//! closed, or idle past `IDLE_TIMEOUT`.
//!
//! Why not hyper's client: it drives every connection from a task of its own and hands each
//! request over a channel, so a proxied request costs two extra task wake-ups, a pool checkout
//! keyed by a parsed URI and a second HTTP state machine; on the gateway benchmark that was a
//! quarter of the gateway's user CPU (perf/results/2026-11-24-gateway.md).
//!
//! Responses are framed by `Transfer-Encoding: chunked`, `Content-Length` or the end of the
//! connection (RFC 9112 §6.3). Hop-by-hop headers (with those named in `Connection`) are dropped
//! while the head is parsed. A connection goes back to the idle set only after its response
//! ended exactly at the end of what was read; a body dropped early closes its connection.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body::{Frame, SizeHint};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::UpstreamTimeouts;

/// Longest response head accepted from an executor.
const MAX_HEAD: usize = 64 << 10;
/// Most headers in a response head.
const MAX_HEADERS: usize = 64;
/// Longest chunk-size or trailer line.
const MAX_LINE: usize = 4 << 10;
/// Idle connections kept per executor.
const MAX_IDLE_PER_ENDPOINT: usize = 256;
/// An idle connection older than this is closed rather than reused (executors close theirs
/// after a while too, and a reaped executor's connections must not linger).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A reused connection that fails this soon after the request, unanswered, was closed by the
/// executor before the request arrived (a close racing the reuse shows up at once).
const STALE_WINDOW: Duration = Duration::from_millis(250);
/// Read buffer growth step.
const READ_CHUNK: usize = 16 << 10;

/// Headers that belong to one connection, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// The body of a failed attempt's response (an executor's or a provider's), kept to pass on
/// when no retry is left.
pub type ErrorBody = http_body_util::combinators::UnsyncBoxBody<Bytes, io::Error>;

/// Why an attempt failed before anything reached the client (so it may be retried).
#[derive(Debug)]
pub enum AttemptError {
    Connect(String),
    /// No response head within the response timeout (the request may have been worked on).
    Timeout(String),
    /// A 5xx.
    Status(Box<Response<ErrorBody>>),
    /// A provider's 429: the upstream is cooled down for `retry_after`, the request goes
    /// elsewhere or waits.
    Throttled {
        retry_after: Duration,
        response: Box<Response<ErrorBody>>,
    },
    /// The request cannot be expressed in the upstream's API: the client's error, nothing
    /// was sent, no retry.
    Refused(Box<crate::error::GatewayError>),
}

/// One connection to an executor and what has been read from it but not yet consumed.
struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    /// The executor address this connection belongs to (its idle-set key).
    address: Arc<str>,
}

struct Idle {
    conn: Conn,
    since: Instant,
}

#[derive(Default)]
struct IdleSet {
    by_address: Mutex<HashMap<Arc<str>, Vec<Idle>>>,
}

impl IdleSet {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Vec<Idle>>> {
        self.by_address.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The newest idle connection to `address` that still looks open.
    fn take(&self, address: &str) -> Option<Conn> {
        let mut map = self.lock();
        let list = map.get_mut(address)?;
        while let Some(idle) = list.pop() {
            if idle.since.elapsed() < IDLE_TIMEOUT && still_open(&idle.conn.stream) {
                return Some(idle.conn);
            }
        }
        None
    }

    fn put(&self, conn: Conn) {
        let mut map = self.lock();
        let list = match map.get_mut(&*conn.address) {
            Some(list) => list,
            None => map.entry(conn.address.clone()).or_default(),
        };
        if list.len() < MAX_IDLE_PER_ENDPOINT {
            list.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }

    /// Closes connections idle too long; forgets executors with none left.
    fn sweep(&self) {
        let mut map = self.lock();
        for list in map.values_mut() {
            list.retain(|idle| idle.since.elapsed() < IDLE_TIMEOUT);
        }
        map.retain(|_, list| !list.is_empty());
    }
}

/// An idle connection has nothing to read: readable means the executor closed it (or sent
/// something unasked), either way it cannot carry a request. The reactor's readiness may be
/// left over from the last response's reads, so a ready socket is asked once more.
fn still_open(stream: &TcpStream) -> bool {
    matches!(stream.try_read(&mut [0; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

/// The client: cheap to clone, one idle set shared by the clones.
#[derive(Clone)]
pub struct Upstream {
    idle: Arc<IdleSet>,
}

impl Upstream {
    /// Needs a tokio runtime (a task closes idle connections past their time).
    pub fn spawn() -> Self {
        let idle = Arc::new(IdleSet::default());
        let weak: Weak<IdleSet> = Arc::downgrade(&idle);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(IDLE_TIMEOUT / 4);
            loop {
                tick.tick().await;
                match weak.upgrade() {
                    Some(idle) => idle.sweep(),
                    None => return,
                }
            }
        });
        Self { idle }
    }

    /// Sends one `POST path` to `address`; a 5xx is an error so the caller can retry elsewhere.
    /// `headers` are the gateway's own choice (no hop-by-hop, host, length or credentials).
    pub async fn send(
        &self,
        address: &str,
        path: &str,
        headers: &HeaderMap,
        body: &[u8],
        timeouts: UpstreamTimeouts,
    ) -> Result<Response<UpstreamBody>, AttemptError> {
        // A large body is written from where it is, after its head, not copied behind it.
        let inline = body.len() <= INLINE_BODY;
        let head = encode_request(address, path, headers, body.len(), inline.then_some(body));
        let (head, rest) = (&head, if inline { &[][..] } else { body });
        let exchange = |conn| async move {
            tokio::time::timeout(timeouts.response, exchange(conn, head, rest))
                .await
                .map_err(|_| {
                    AttemptError::Timeout(format!(
                        "{address} sent no response head within {:?}",
                        timeouts.response
                    ))
                })
        };
        // A kept-alive connection may have been closed by the executor since its last use
        // without the reactor having seen it yet. When such a connection fails at once, with
        // not one byte of a response, the request was never taken up and is sent again on a
        // fresh connection. A failure later than that may follow real work (a generation the
        // executor died in): it is not resent here, the caller decides.
        let mut exchanged = None;
        if let Some(conn) = self.idle.take(address) {
            let sent = Instant::now();
            match exchange(conn).await? {
                Ok(r) => exchanged = Some(r),
                Err(Failure::Unanswered(_)) if sent.elapsed() < STALE_WINDOW => {}
                Err(f) => return Err(AttemptError::Connect(f.message())),
            }
        }
        let (conn, head) = match exchanged {
            Some(r) => r,
            None => {
                let conn = connect(address).await.map_err(AttemptError::Connect)?;
                exchange(conn)
                    .await?
                    .map_err(|f| AttemptError::Connect(f.message()))?
            }
        };
        let mut body = UpstreamBody {
            conn: Some(conn),
            framing: head.framing,
            reusable: head.reusable,
            idle: self.idle.clone(),
            silence: Silence::new(timeouts.idle),
        };
        if matches!(body.framing, Framing::Done) {
            body.end();
        }
        let mut response = Response::new(body);
        *response.status_mut() = head.status;
        *response.headers_mut() = head.headers;
        if head.status.is_server_error() {
            return Err(AttemptError::Status(Box::new(
                response.map(http_body_util::BodyExt::boxed_unsync),
            )));
        }
        Ok(response)
    }
}

async fn connect(address: &str) -> Result<Conn, String> {
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(address))
        .await
        .map_err(|_| format!("connecting to {address} timed out"))?
        .map_err(|e| format!("connecting to {address}: {e}"))?;
    stream
        .set_nodelay(true)
        .map_err(|e| format!("connecting to {address}: {e}"))?;
    Ok(Conn {
        stream,
        buf: BytesMut::with_capacity(READ_CHUNK),
        address: Arc::from(address),
    })
}

/// Bodies up to this size go in the same write as the head.
const INLINE_BODY: usize = 16 << 10;

/// The request head for a body of `length` bytes, followed by `body` when given.
fn encode_request(
    address: &str,
    path: &str,
    headers: &HeaderMap,
    length: usize,
    body: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(256 + body.map_or(0, <[u8]>::len));
    out.extend_from_slice(b"POST ");
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(address.as_bytes());
    out.extend_from_slice(b"\r\ncontent-length: ");
    out.extend_from_slice(itoa::Buffer::new().format(length).as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if let Some(body) = body {
        out.extend_from_slice(body);
    }
    out
}

/// How an exchange failed.
enum Failure {
    /// Not one byte of a response came back.
    Unanswered(String),
    /// The executor answered something that is not a usable response head.
    Broken(String),
}

impl Failure {
    fn message(self) -> String {
        match self {
            Self::Unanswered(m) | Self::Broken(m) => m,
        }
    }
}

/// A parsed response head.
#[derive(Debug)]
struct Head {
    status: StatusCode,
    headers: HeaderMap,
    framing: Framing,
    reusable: bool,
}

/// Writes the request (`head`, then `body` when it was not inlined) and reads the response
/// head; the body's first bytes stay in the buffer.
async fn exchange(mut conn: Conn, head: &[u8], body: &[u8]) -> Result<(Conn, Head), Failure> {
    let address = conn.address.clone();
    for part in [head, body] {
        if part.is_empty() {
            continue;
        }
        conn.stream
            .write_all(part)
            .await
            .map_err(|e| Failure::Unanswered(format!("sending to {address}: {e}")))?;
    }
    conn.buf.clear();
    loop {
        if !conn.buf.is_empty() {
            match parse_head(&conn.buf).map_err(|e| Failure::Broken(format!("{address}: {e}")))? {
                Some((consumed, head)) => {
                    conn.buf.advance(consumed);
                    match head {
                        Some(head) => return Ok((conn, head)),
                        // An interim 1xx answer: the real one follows.
                        None => continue,
                    }
                }
                None if conn.buf.len() > MAX_HEAD => {
                    return Err(Failure::Broken(format!(
                        "{address}: response head larger than {MAX_HEAD} bytes"
                    )));
                }
                None => {}
            }
        }
        let nothing_yet = conn.buf.is_empty();
        conn.buf.reserve(READ_CHUNK);
        match std::future::poll_fn(|cx| poll_read(&conn.stream, &mut conn.buf, cx)).await {
            Ok(0) if nothing_yet => {
                return Err(Failure::Unanswered(format!(
                    "{address} closed the connection without answering"
                )));
            }
            Ok(0) => {
                return Err(Failure::Broken(format!(
                    "{address} closed the connection inside a response head"
                )));
            }
            Ok(_) => {}
            Err(e) if nothing_yet => {
                return Err(Failure::Unanswered(format!("reading from {address}: {e}")));
            }
            Err(e) => return Err(Failure::Broken(format!("reading from {address}: {e}"))),
        }
    }
}

/// Reads what is there into `buf`'s spare room; 0 is the end of the connection.
fn poll_read(
    stream: &TcpStream,
    buf: &mut BytesMut,
    cx: &mut Context<'_>,
) -> Poll<io::Result<usize>> {
    loop {
        ready!(stream.poll_read_ready(cx))?;
        match stream.try_read_buf(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            other => return Poll::Ready(other),
        }
    }
}

/// Parses a response head from the start of `buf`: `None` when more bytes are needed,
/// `Some((consumed, None))` for an interim 1xx, `Some((consumed, Some(head)))` otherwise.
fn parse_head(buf: &[u8]) -> Result<Option<(usize, Option<Head>)>, String> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Response::new(&mut slots);
    let consumed = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(format!("invalid response head: {e}")),
    };
    let code = parsed.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| format!("invalid status {code}"))?;
    if status.is_informational() {
        if code == 101 {
            return Err("unexpected protocol switch".into());
        }
        return Ok(Some((consumed, None)));
    }
    let http10 = parsed.version == Some(0);
    let mut headers = HeaderMap::with_capacity(parsed.headers.len());
    let (mut chunked, mut other_coding) = (false, false);
    let mut length: Option<u64> = None;
    let (mut saw_close, mut saw_keep_alive) = (false, false);
    // Headers named in `Connection` are hop-by-hop too.
    let mut named: Vec<HeaderName> = Vec::new();
    for h in parsed.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes())
            .map_err(|_| format!("invalid header name {:?}", h.name))?;
        if name == header::CONTENT_LENGTH {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok())
                .ok_or("invalid content-length")?;
            if length.is_some_and(|l| l != n) {
                return Err("conflicting content-length headers".into());
            }
            length = Some(n);
        } else if name == header::TRANSFER_ENCODING {
            // Chunked must be the last coding; anything else is read to the end of the
            // connection (RFC 9112 §6.3).
            let last = h.value.rsplit(|b| *b == b',').next().unwrap_or_default();
            chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
            other_coding |= !chunked;
        } else if name == header::CONNECTION {
            for token in h.value.split(|b| *b == b',').map(<[u8]>::trim_ascii) {
                if token.eq_ignore_ascii_case(b"close") {
                    saw_close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") {
                    saw_keep_alive = true;
                } else if let Ok(n) = HeaderName::from_bytes(token) {
                    named.push(n);
                }
            }
        }
        if HOP_BY_HOP.contains(&name) {
            continue;
        }
        let value = HeaderValue::from_bytes(h.value)
            .map_err(|_| format!("invalid value for header {name}"))?;
        headers.append(name, value);
    }
    for name in named {
        headers.remove(name);
    }
    let mut close = saw_close || (http10 && !saw_keep_alive);
    let bodiless = status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED;
    let framing = if bodiless {
        Framing::Done
    } else if chunked {
        // A length next to chunked is ignored and not forwarded (RFC 9112 §6.3).
        headers.remove(header::CONTENT_LENGTH);
        Framing::Chunked(Chunked::Size)
    } else if other_coding {
        // Read to the end of the connection; a length next to a transfer coding is ignored
        // and not forwarded (RFC 9112 §6.3).
        headers.remove(header::CONTENT_LENGTH);
        close = true;
        Framing::UntilClose
    } else if let Some(n) = length {
        if n == 0 {
            Framing::Done
        } else {
            Framing::Length(n)
        }
    } else {
        close = true;
        Framing::UntilClose
    };
    Ok(Some((
        consumed,
        Some(Head {
            status,
            headers,
            framing,
            reusable: !close,
        }),
    )))
}

/// How the rest of a response body is delimited.
#[derive(Debug)]
enum Framing {
    Length(u64),
    Chunked(Chunked),
    UntilClose,
    Done,
}

/// Where a chunked body's decoder stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    /// Expecting a chunk-size line.
    Size,
    /// Inside a chunk's data, this much left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one.
    Trailers,
}

/// One decoding step on `buf`.
enum Step {
    Data(Bytes),
    /// Decoder state changed without producing data; go on.
    Again,
    NeedMore,
    End,
}

fn take_line(buf: &mut BytesMut) -> Result<Option<BytesMut>, String> {
    match buf.windows(2).position(|w| w == b"\r\n") {
        Some(at) => {
            let line = buf.split_to(at);
            buf.advance(2);
            Ok(Some(line))
        }
        None if buf.len() > MAX_LINE => Err("chunk line too long".into()),
        None => Ok(None),
    }
}

impl Chunked {
    fn step(&mut self, buf: &mut BytesMut) -> Result<Step, String> {
        match *self {
            Chunked::Size => {
                let Some(line) = take_line(buf)? else {
                    return Ok(Step::NeedMore);
                };
                // The size, then optional `;extensions`.
                let digits = line[..]
                    .split(|b| *b == b';')
                    .next()
                    .unwrap_or_default()
                    .trim_ascii();
                if digits.is_empty() || digits.len() > 15 {
                    return Err("invalid chunk size".into());
                }
                let mut size = 0u64;
                for d in digits {
                    let v = (*d as char).to_digit(16).ok_or("invalid chunk size")?;
                    size = size * 16 + u64::from(v);
                }
                *self = if size == 0 {
                    Chunked::Trailers
                } else {
                    Chunked::Data(size)
                };
                Ok(Step::Again)
            }
            Chunked::Data(left) => {
                if buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                let n = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                let data = buf.split_to(n).freeze();
                let left = left - n as u64;
                *self = if left == 0 {
                    Chunked::DataEnd
                } else {
                    Chunked::Data(left)
                };
                Ok(Step::Data(data))
            }
            Chunked::DataEnd => {
                if buf.len() < 2 {
                    return Ok(Step::NeedMore);
                }
                if &buf[..2] != b"\r\n" {
                    return Err("chunk data not followed by CRLF".into());
                }
                buf.advance(2);
                *self = Chunked::Size;
                Ok(Step::Again)
            }
            Chunked::Trailers => match take_line(buf)? {
                None => Ok(Step::NeedMore),
                Some(line) if line.is_empty() => Ok(Step::End),
                // Trailer fields are not forwarded.
                Some(_) => Ok(Step::Again),
            },
        }
    }
}

/// Bounds the silence inside a response body: a timer starts when a read has to wait, and the
/// next bytes clear it.
pub struct Silence {
    limit: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Silence {
    pub fn new(limit: Duration) -> Self {
        Self { limit, timer: None }
    }

    /// Bytes arrived.
    pub fn heard(&mut self) {
        self.timer = None;
    }

    /// After a read that had to wait: pending while the silence is within the limit, then the
    /// timeout error naming `who` went silent.
    pub fn poll_over(&mut self, cx: &mut Context<'_>, who: &str) -> Poll<io::Error> {
        let limit = self.limit;
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(timer.as_mut().poll(cx));
        Poll::Ready(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{who} sent nothing for {limit:?}"),
        ))
    }
}

/// An executor's response body, read as the client's side polls it. Ends with an error when
/// the executor breaks the framing or goes away before the end.
pub struct UpstreamBody {
    /// `None` once the body ended (the connection went back to the idle set or was closed).
    conn: Option<Conn>,
    framing: Framing,
    reusable: bool,
    idle: Arc<IdleSet>,
    /// Bounds the wait for the next bytes of the body.
    silence: Silence,
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("framing", &self.framing)
            .finish_non_exhaustive()
    }
}

fn broken(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

impl UpstreamBody {
    /// The body is complete: its connection is reused when nothing beyond it was read.
    fn end(&mut self) {
        self.framing = Framing::Done;
        if let Some(conn) = self.conn.take()
            && self.reusable
            && conn.buf.is_empty()
        {
            self.idle.put(conn);
        }
    }

    /// The next piece of body already in the buffer, if any.
    fn step(&mut self) -> Result<Step, io::Error> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(Step::End);
        };
        match &mut self.framing {
            Framing::Done => Ok(Step::End),
            Framing::Length(left) => {
                if conn.buf.is_empty() {
                    return Ok(Step::NeedMore);
                }
                let n = conn
                    .buf
                    .len()
                    .min(usize::try_from(*left).unwrap_or(usize::MAX));
                *left -= n as u64;
                let data = conn.buf.split_to(n).freeze();
                if *left == 0 {
                    self.end();
                }
                Ok(Step::Data(data))
            }
            Framing::UntilClose => {
                if conn.buf.is_empty() {
                    Ok(Step::NeedMore)
                } else {
                    Ok(Step::Data(conn.buf.split().freeze()))
                }
            }
            Framing::Chunked(state) => match state.step(&mut conn.buf).map_err(|e| broken(&e))? {
                Step::End => {
                    self.end();
                    Ok(Step::End)
                }
                other => Ok(other),
            },
        }
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        loop {
            match this.step() {
                Ok(Step::Data(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Step::Again) => continue,
                Ok(Step::End) => return Poll::Ready(None),
                Err(e) => {
                    this.conn = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(e)));
                }
                Ok(Step::NeedMore) => {}
            }
            let conn = this
                .conn
                .as_mut()
                .expect("a body that needs more has its connection");
            conn.buf.reserve(READ_CHUNK);
            let read = match poll_read(&conn.stream, &mut conn.buf, cx) {
                Poll::Ready(read) => {
                    this.silence.heard();
                    read
                }
                Poll::Pending => {
                    let timed_out = ready!(this.silence.poll_over(cx, "the executor"));
                    this.conn = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(timed_out)));
                }
            };
            match read {
                Ok(0) if matches!(this.framing, Framing::UntilClose) => {
                    this.conn = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(None);
                }
                Ok(0) => {
                    this.conn = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the executor closed the connection before the end of the body",
                    ))));
                }
                Ok(_) => {}
                Err(e) => {
                    this.conn = None;
                    this.framing = Framing::Done;
                    return Poll::Ready(Some(Err(e)));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self.framing, Framing::Done)
    }

    fn size_hint(&self) -> SizeHint {
        match self.framing {
            Framing::Length(n) => SizeHint::with_exact(n),
            Framing::Done => SizeHint::with_exact(0),
            _ => SizeHint::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const TIMEOUTS: UpstreamTimeouts = UpstreamTimeouts {
        response: Duration::from_secs(10),
        idle: Duration::from_secs(10),
    };
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;

    /// Decodes `wire` fed in pieces of `piece` bytes; the data, or the first error.
    fn decode_chunked(wire: &[u8], piece: usize) -> Result<Vec<u8>, String> {
        let mut state = Chunked::Size;
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut rest = wire;
        loop {
            match state.step(&mut buf)? {
                Step::Data(d) => out.extend_from_slice(&d),
                Step::Again => {}
                Step::End => return Ok(out),
                Step::NeedMore if rest.is_empty() => return Err("truncated".into()),
                Step::NeedMore => {
                    let n = piece.min(rest.len());
                    buf.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                }
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig {
            rng_seed: proptest::test_runner::RngSeed::Fixed(0x11c7),
            ..Default::default()
        })]

        /// Any body, chunked any way, read in pieces of any size, decodes to itself.
        #[test]
        fn any_chunked_body_decodes_to_itself(
            body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
            sizes in proptest::collection::vec(1usize..100, 1..12),
            piece in 1usize..40,
            extension in proptest::prelude::any::<bool>(),
        ) {
            let mut wire = Vec::new();
            let mut rest = &body[..];
            for size in sizes.iter().cycle() {
                if rest.is_empty() {
                    break;
                }
                let n = (*size).min(rest.len());
                let ext = if extension { ";name=value" } else { "" };
                wire.extend_from_slice(format!("{n:x}{ext}\r\n").as_bytes());
                wire.extend_from_slice(&rest[..n]);
                wire.extend_from_slice(b"\r\n");
                rest = &rest[n..];
            }
            wire.extend_from_slice(b"0\r\n\r\n");
            proptest::prop_assert_eq!(decode_chunked(&wire, piece), Ok(body));
        }

        /// Any bytes as a chunked body: an error or a body, never a panic or a loop.
        #[test]
        fn arbitrary_chunked_wire_never_panics(
            wire in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300),
            piece in 1usize..40,
        ) {
            let _ = decode_chunked(&wire, piece);
        }
    }

    #[test]
    fn chunked_bodies_decode_whatever_the_read_boundaries() {
        let wire =
            b"5\r\nhello\r\n1;name=value\r\n,\r\nA \r\n world!!!!\r\n0\r\nx-trailer: 1\r\n\r\n";
        for piece in 1..=wire.len() {
            assert_eq!(
                decode_chunked(wire, piece).unwrap(),
                b"hello, world!!!!",
                "piece {piece}"
            );
        }
    }

    #[test]
    fn malformed_chunked_bodies_are_errors() {
        for (wire, why) in [
            (&b"zz\r\nhello\r\n0\r\n\r\n"[..], "invalid chunk size"),
            (b"\r\n0\r\n\r\n", "invalid chunk size"),
            (b"1234567890abcdef\r\n", "invalid chunk size"),
            (b"5\r\nhelloXX0\r\n\r\n", "chunk data not followed by CRLF"),
            (b"5\r\nhel", "truncated"),
        ] {
            assert_eq!(decode_chunked(wire, 3).unwrap_err(), why, "{wire:?}");
        }
        let long_line = vec![b'1'; MAX_LINE + 10];
        assert_eq!(
            decode_chunked(&long_line, 1 << 20).unwrap_err(),
            "chunk line too long"
        );
    }

    fn head(wire: &str) -> Head {
        let (consumed, head) = parse_head(wire.as_bytes()).unwrap().unwrap();
        assert_eq!(consumed, wire.len());
        head.unwrap()
    }

    #[test]
    fn response_heads_lose_hop_by_hop_headers_and_pick_their_framing() {
        let h = head(
            "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive, x-private\r\n\
             X-Private: 1\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\n\
             Content-Length: 12\r\nX-Request-Id: r1\r\n\r\n",
        );
        let names: Vec<&str> = h.headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["content-type", "x-request-id"]);
        assert!(matches!(h.framing, Framing::Chunked(Chunked::Size)));
        assert!(h.reusable);

        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n");
        assert!(matches!(h.framing, Framing::Length(7)) && h.reusable);
        assert_eq!(h.headers[header::CONTENT_LENGTH], "7");

        let h = head("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert!(matches!(h.framing, Framing::Done) && h.reusable);

        // No length: the body runs to the end of the connection, which is then not reusable.
        let h = head("HTTP/1.1 200 OK\r\n\r\n");
        assert!(matches!(h.framing, Framing::UntilClose) && !h.reusable);
        let h = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 5\r\n\r\n");
        assert!(matches!(h.framing, Framing::UntilClose) && !h.reusable);
        assert!(!h.headers.contains_key(header::CONTENT_LENGTH));

        // HTTP/1.0 closes unless asked to keep alive; `close` always closes.
        assert!(!head("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n").reusable);
        assert!(
            head("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 1\r\n\r\n").reusable
        );
        assert!(
            !head("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n").reusable
        );

        let h = head("HTTP/1.1 204 No Content\r\n\r\n");
        assert!(matches!(h.framing, Framing::Done) && h.reusable);
    }

    #[test]
    fn interim_partial_and_invalid_heads() {
        let wire = b"HTTP/1.1 100 Continue\r\n\r\n";
        let (consumed, head) = parse_head(wire).unwrap().unwrap();
        assert_eq!(consumed, wire.len());
        assert!(head.is_none());
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Le")
                .unwrap()
                .is_none()
        );
        for (wire, why) in [
            (
                "HTTP/1.1 101 Switching Protocols\r\n\r\n",
                "unexpected protocol switch",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
                "invalid content-length",
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "conflicting content-length headers",
            ),
        ] {
            assert_eq!(parse_head(wire.as_bytes()).err().unwrap(), why);
        }
        assert!(
            parse_head(b"SMTP ready\r\n\r\n")
                .unwrap_err()
                .starts_with("invalid response head")
        );
    }

    /// A raw HTTP/1.1 server: answers each request (read up to its blank line plus
    /// `content-length` bytes) with the next of `answers` on the same connection, then closes;
    /// counts the connections it accepted.
    async fn raw_server(answers: &'static [&'static str]) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut seen = Vec::new();
                    for answer in answers {
                        loop {
                            let text = String::from_utf8_lossy(&seen).into_owned();
                            if let Some(end) = text.find("\r\n\r\n") {
                                let length: usize = text[..end]
                                    .lines()
                                    .find_map(|l| l.strip_prefix("content-length: "))
                                    .map_or(0, |v| v.parse().unwrap());
                                if seen.len() >= end + 4 + length {
                                    seen.drain(..end + 4 + length);
                                    break;
                                }
                            }
                            let mut chunk = [0u8; 4096];
                            let n = socket.read(&mut chunk).await.unwrap();
                            if n == 0 {
                                return;
                            }
                            seen.extend_from_slice(&chunk[..n]);
                        }
                        socket.write_all(answer.as_bytes()).await.unwrap();
                    }
                });
            }
        });
        (address, accepted)
    }

    async fn post(upstream: &Upstream, address: &str) -> (StatusCode, Vec<u8>) {
        let response = match upstream
            .send(address, "/v1/x", &HeaderMap::new(), b"{}", TIMEOUTS)
            .await
        {
            Ok(r) => r,
            Err(AttemptError::Status(r)) => {
                let (parts, body) = r.into_parts();
                let bytes = body.collect().await.unwrap().to_bytes();
                return (parts.status, bytes.to_vec());
            }
            Err(e) => panic!("{e:?}"),
        };
        let status = response.status();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, body.to_vec())
    }

    /// An executor that takes requests and then goes silent (frozen, or stuck mid-stream).
    async fn silent_server(answer: &'static str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                socket.write_all(answer.as_bytes()).await.unwrap();
                held.push(socket);
            }
        });
        address
    }

    #[tokio::test]
    async fn a_silent_executor_times_out_before_its_head_and_within_its_body() {
        let upstream = Upstream::spawn();
        let short = UpstreamTimeouts {
            response: Duration::from_millis(200),
            idle: Duration::from_millis(200),
        };
        let mute = silent_server("").await;
        let started = Instant::now();
        match upstream
            .send(&mute, "/v1/x", &HeaderMap::new(), b"", short)
            .await
        {
            Err(AttemptError::Timeout(m)) => assert!(m.contains("no response head"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert!(started.elapsed() < Duration::from_secs(2));

        let stuck = silent_server(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n",
        )
        .await;
        let response = upstream
            .send(&stuck, "/v1/x", &HeaderMap::new(), b"", short)
            .await
            .unwrap();
        let mut body = response.into_body();
        let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
        assert_eq!(&first[..], b"hello");
        let started = Instant::now();
        let err = body.frame().await.unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn connections_are_kept_alive_and_reused() {
        const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        const CHUNKED: &str =
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n";
        const EMPTY: &str = "HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
        const FAIL: &str = "HTTP/1.1 503 Busy\r\ncontent-length: 4\r\n\r\nbusy";
        let (address, accepted) = raw_server(&[OK, CHUNKED, EMPTY, FAIL, OK]).await;
        let upstream = Upstream::spawn();
        assert_eq!(
            post(&upstream, &address).await,
            (StatusCode::OK, b"ok".to_vec())
        );
        assert_eq!(
            post(&upstream, &address).await,
            (StatusCode::OK, b"hi".to_vec())
        );
        assert_eq!(
            post(&upstream, &address).await,
            (StatusCode::OK, Vec::new())
        );
        let (status, body) = post(&upstream, &address).await;
        assert_eq!((status.as_u16(), body), (503, b"busy".to_vec()));
        assert_eq!(
            post(&upstream, &address).await,
            (StatusCode::OK, b"ok".to_vec())
        );
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "every exchange on one connection"
        );
    }

    #[tokio::test]
    async fn a_connection_the_executor_closed_while_idle_is_replaced() {
        const OK: &str = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
        // One answer per connection, then the server closes it without saying so.
        let (address, accepted) = raw_server(&[OK]).await;
        let upstream = Upstream::spawn();
        for _ in 0..3 {
            assert_eq!(
                post(&upstream, &address).await,
                (StatusCode::OK, b"ok".to_vec())
            );
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_body_cut_short_is_an_error_and_a_refused_connect_is_named() {
        let (address, _) =
            raw_server(&["HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort"]).await;
        let upstream = Upstream::spawn();
        let response = upstream
            .send(&address, "/v1/x", &HeaderMap::new(), b"", TIMEOUTS)
            .await
            .unwrap();
        let error = response.into_body().collect().await.unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::UnexpectedEof);

        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = closed.local_addr().unwrap().to_string();
        drop(closed);
        match upstream
            .send(&dead, "/v1/x", &HeaderMap::new(), b"", TIMEOUTS)
            .await
        {
            Err(AttemptError::Connect(e)) => assert!(e.contains(&dead), "{e}"),
            other => panic!("expected a connect error, got {other:?}"),
        }
    }

    #[test]
    fn requests_carry_host_length_and_the_given_headers() {
        let mut headers = HeaderMap::new();
        headers.insert("x-request-id", HeaderValue::from_static("r1"));
        let wire = encode_request(
            "10.0.0.1:8000",
            "/v1/chat/completions",
            &headers,
            2,
            Some(b"{}"),
        );
        assert_eq!(
            String::from_utf8(wire).unwrap(),
            "POST /v1/chat/completions HTTP/1.1\r\nhost: 10.0.0.1:8000\r\ncontent-length: 2\r\n\
             x-request-id: r1\r\n\r\n{}"
        );
    }
}
