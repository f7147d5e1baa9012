//! Serving HTTP/1.1 and HTTP/2 connections (hyper 1) with every wait bounded, for the gateway
//! and the worker alike. What a client can hold, and for how long:
//!
//! - **A connection that sends nothing**, or trickles its first request head or HTTP/2 preface:
//!   closed after `header_read` (hyper's own header timeout starts only once its HTTP/1 parser
//!   runs; the protocol sniff before it, and HTTP/2, had none).
//! - **A connection with no request in flight** (HTTP/1 keep-alive, or HTTP/2 idle after its
//!   SETTINGS): closed gracefully after `idle`. HTTP/2 peers are pinged every `h2_keepalive`,
//!   and a ping left unanswered that long ends the connection.
//! - **A client that stops reading**: once it has accepted no byte for `write_stall` while the
//!   server has bytes for it, the connection ends, which drops the response body (and, in the
//!   gateway, the relay behind it).
//! - **Connections beyond `max_connections`**: accepted and refused at once (a 503 with an
//!   OpenAI-format body on plain HTTP), so the listen backlog never silently fills.
//! - **Accept failures for lack of descriptors or memory** (EMFILE, ENFILE, ENOBUFS, ENOMEM):
//!   counted and backed off (5 ms doubling to 200 ms) instead of retried in a tight loop; the
//!   pending connection is taken as soon as a descriptor frees.
//!
//! - **Malformed HTTP** (a head, URI or header list too large, framing hyper cannot parse):
//!   hyper's own empty-bodied 400/414/431 gets an OpenAI-format body, like every other error.
//!
//! [`Server::shutdown`] closes every connection gracefully (responses in progress finish and
//! are flushed, then the connection closes) and waits for them, so a process that exits after
//! it never cuts a response short.
//!
//! Request bodies are read by the handlers, with [`read_body`]'s size and time limits.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::time::Sleep;

/// Length of the HTTP/2 connection preface: once this much has arrived (or a response has been
/// written) the protocol is settled and hyper's own timeouts take over.
const PREFACE_LEN: usize = 24;
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(5);
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_millis(200);
/// How long a refused connection gets to take its 503.
const REFUSAL_WRITE: Duration = Duration::from_secs(1);

/// What a connection may hold, and for how long. The defaults are what we would run in
/// production; each server exposes them as options.
#[derive(Clone, Debug)]
pub struct Limits {
    /// From accept to a complete request head (HTTP/1) or connection preface (HTTP/2).
    pub header_read: Duration,
    /// A connection with no request in flight is closed after this long.
    pub idle: Duration,
    /// A client that accepts no byte for this long, while bytes wait for it, is cut off.
    pub write_stall: Duration,
    /// HTTP/2 ping interval, and how long a ping may go unanswered.
    pub h2_keepalive: Duration,
    /// Connections open at once; more are refused.
    pub max_connections: usize,
    /// Largest request head (HTTP/1) or header list (HTTP/2), in bytes.
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(10),
            idle: Duration::from_secs(75),
            write_stall: Duration::from_secs(30),
            h2_keepalive: Duration::from_secs(20),
            max_connections: 10_000,
            max_header_bytes: 64 << 10,
        }
    }
}

/// Connection counters, registered into the owning server's metrics.
#[derive(Default)]
pub struct Stats {
    pub open: Gauge,
    pub accept_errors: Counter,
    pub refused: Counter,
    pub header_timeouts: Counter,
    pub idle_closed: Counter,
    pub write_stalls: Counter,
}

impl Stats {
    /// Registers the counters (names start `http_`; the registry's prefix names the server).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "http_connections_open",
            "Client connections open",
            self.open.clone(),
        );
        registry.register(
            "http_accept_errors",
            "Accept failures (descriptor or memory exhaustion is backed off)",
            self.accept_errors.clone(),
        );
        registry.register(
            "http_connections_refused",
            "Connections refused at the connection cap",
            self.refused.clone(),
        );
        registry.register(
            "http_header_timeouts",
            "Connections closed for sending no complete request head or preface in time",
            self.header_timeouts.clone(),
        );
        registry.register(
            "http_idle_closed",
            "Connections closed after the idle timeout with no request in flight",
            self.idle_closed.clone(),
        );
        registry.register(
            "http_write_stalls",
            "Connections cut off because the client accepted no bytes for the write-stall timeout",
            self.write_stalls.clone(),
        );
    }
}

/// How connections over the cap are turned away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A `503` with an OpenAI-format body, then close (plain HTTP listeners).
    Http503,
    /// Close at once (TLS listeners: no handshake is spent on a refusal).
    Close,
}

/// The connections of one listener.
pub struct Server {
    limits: Limits,
    refusal: Refusal,
    slots: Arc<Semaphore>,
    shutdown: watch::Sender<bool>,
    stats: Arc<Stats>,
}

/// One open connection's place under the cap; freed when the connection ends.
pub struct Slot {
    _permit: OwnedSemaphorePermit,
    stats: Arc<Stats>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.stats.open.dec();
    }
}

impl Server {
    pub fn new(limits: Limits, refusal: Refusal) -> Self {
        let slots = Arc::new(Semaphore::new(
            limits.max_connections.clamp(1, u32::MAX as usize),
        ));
        Self {
            limits,
            refusal,
            slots,
            shutdown: watch::channel(false).0,
            stats: Arc::default(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// The next connection under the cap. Connections over it are refused, and accept errors
    /// for lack of descriptors or memory back off instead of spinning.
    pub async fn accept(&self, listener: &TcpListener) -> (TcpStream, Slot) {
        let mut backoff = MIN_ACCEPT_BACKOFF;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => match self.slots.clone().try_acquire_owned() {
                    Ok(permit) => {
                        self.stats.open.inc();
                        let slot = Slot {
                            _permit: permit,
                            stats: self.stats.clone(),
                        };
                        return (stream, slot);
                    }
                    Err(_) => {
                        self.stats.refused.inc();
                        self.refuse(stream);
                    }
                },
                Err(e) if exhausted(&e) => {
                    self.stats.accept_errors.inc();
                    if backoff == MIN_ACCEPT_BACKOFF {
                        tracing::warn!("accept failed: {e}; backing off until one frees up");
                    }
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_ACCEPT_BACKOFF);
                }
                // A connection that failed before we took it (reset, aborted): the next one.
                Err(e) => {
                    self.stats.accept_errors.inc();
                    tracing::debug!("accept failed: {e}");
                }
            }
        }
    }

    fn refuse(&self, mut stream: TcpStream) {
        tracing::debug!(
            max = self.limits.max_connections,
            "connection refused at the cap"
        );
        if self.refusal == Refusal::Close {
            return;
        }
        tokio::spawn(async move {
            let body = br#"{"error":{"message":"the server has too many open connections; retry shortly","type":"server_error","param":null,"code":"too_many_connections"}}"#;
            let mut out = format!(
                "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
                body.len()
            )
            .into_bytes();
            out.extend_from_slice(body);
            let _ = tokio::time::timeout(REFUSAL_WRITE, async {
                stream.write_all(&out).await?;
                stream.shutdown().await
            })
            .await;
        });
    }

    /// Serves one connection (plain TCP, TLS, any byte stream) until it ends: spawn the
    /// returned future. `handler` answers each request.
    pub fn serve<I, F, Fut, B>(
        &self,
        io: I,
        slot: Slot,
        handler: F,
    ) -> impl Future<Output = ()> + Send + 'static
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<B>> + Send + 'static,
        B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let limits = self.limits.clone();
        let stats = self.stats.clone();
        let mut shutdown = self.shutdown.subscribe();
        async move {
            let _slot = slot;
            let activity = Arc::new(Activity::new());
            let io = TokioIo::new(Watched::new(io, activity.clone(), &limits, stats.clone()));
            let busy = activity.clone();
            let service = hyper::service::service_fn(move |req| {
                let busy = busy.begin();
                let answer = handler(req);
                async move {
                    let response = answer.await;
                    Ok::<_, Infallible>(response.map(|body| Tracked { body, _busy: busy }))
                }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_read)
                .max_buf_size(limits.max_header_bytes.max(8192));
            builder
                .http2()
                .timer(TokioTimer::new())
                .keep_alive_interval(limits.h2_keepalive)
                .keep_alive_timeout(limits.h2_keepalive)
                .max_header_list_size(limits.max_header_bytes.min(u32::MAX as usize) as u32);
            let conn = builder.serve_connection(io, service);
            tokio::pin!(conn);
            // Since when the connection is being closed gracefully. An HTTP/2 peer must answer
            // a ping before the final GOAWAY; one that does not, with no request of its own in
            // flight, is dropped `header_read` later.
            let mut closing = shutdown.borrow().then(Instant::now);
            if closing.is_some() {
                conn.as_mut().graceful_shutdown();
            }
            let mut check = tokio::time::interval(
                (limits.idle.min(limits.header_read) / 4)
                    .clamp(Duration::from_millis(10), Duration::from_secs(1)),
            );
            loop {
                tokio::select! {
                    result = conn.as_mut() => {
                        if let Err(e) = result {
                            tracing::debug!("connection ended: {e}");
                        }
                        return;
                    }
                    _ = shutdown.changed(), if closing.is_none() => {
                        closing = Some(Instant::now());
                        conn.as_mut().graceful_shutdown();
                    }
                    _ = check.tick() => match closing {
                        None if activity.idle_for() >= limits.idle => {
                            stats.idle_closed.inc();
                            closing = Some(Instant::now());
                            conn.as_mut().graceful_shutdown();
                        }
                        Some(since)
                            if !activity.is_busy() && since.elapsed() >= limits.header_read =>
                        {
                            return;
                        }
                        _ => {}
                    },
                }
            }
        }
    }

    /// Closes every connection gracefully (a response in progress finishes first; connections
    /// accepted from now on close after at most one response) and waits up to `grace` for all
    /// of them to end; true when they did.
    pub async fn shutdown(&self, grace: Duration) -> bool {
        self.shutdown.send_replace(true);
        let all = self.limits.max_connections.clamp(1, u32::MAX as usize) as u32;
        match tokio::time::timeout(grace, self.slots.acquire_many(all)).await {
            Ok(Ok(permits)) => {
                drop(permits);
                true
            }
            _ => false,
        }
    }
}

/// Accept errors that say the process or system is out of descriptors or memory.
fn exhausted(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Reads a request body with `limit` bytes and `timeout` as its bounds: a declared length over
/// the limit is refused before reading, and a body trickled slower than the timeout is refused
/// rather than held.
pub async fn read_body<B>(
    headers: &http::HeaderMap,
    body: B,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, BodyError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    use http_body_util::BodyExt;
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(BodyError::TooLarge);
    }
    let limited = http_body_util::Limited::new(body, limit);
    match tokio::time::timeout(timeout, limited.collect()).await {
        Err(_) => Err(BodyError::TimedOut),
        Ok(Ok(collected)) => Ok(collected.to_bytes()),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => Err(BodyError::TooLarge),
        Ok(Err(e)) => Err(BodyError::Broken(e.to_string())),
    }
}

/// Why a request body could not be read.
#[derive(Debug, PartialEq, Eq)]
pub enum BodyError {
    TooLarge,
    TimedOut,
    /// The connection failed or the framing was invalid.
    Broken(String),
}

/// When a connection last moved bytes, and how many of its requests are in flight.
struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    busy: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(now, Ordering::Relaxed);
    }

    /// Time since the last byte moved, or zero while a request is in flight.
    fn idle_for(&self) -> Duration {
        if self.is_busy() {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.epoch.elapsed().saturating_sub(last)
    }

    fn is_busy(&self) -> bool {
        self.busy.load(Ordering::SeqCst) > 0
    }

    fn begin(self: &Arc<Self>) -> Busy {
        self.busy.fetch_add(1, Ordering::SeqCst);
        self.touch();
        Busy(self.clone())
    }
}

/// A request in flight on its connection, until its response body is done or dropped.
struct Busy(Arc<Activity>);

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A response body that keeps its connection counted busy while it lives.
struct Tracked<B> {
    body: B,
    _busy: Busy,
}

impl<B: http_body::Body + Unpin> http_body::Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// A connection's byte stream with the preface deadline and the write-stall limit applied,
/// and its activity noted for the idle check.
struct Watched<I> {
    io: I,
    activity: Arc<Activity>,
    /// Bytes read so far and the deadline, until the protocol is settled.
    preface: Option<(usize, Pin<Box<Sleep>>)>,
    write_stall: Duration,
    /// Running while writes are refused.
    stall: Option<Pin<Box<Sleep>>>,
    stats: Arc<Stats>,
    /// hyper's own error answer, rewritten with an OpenAI-format body, and how much of it is
    /// written; the bytes hyper asked to write count as written once all of it is.
    rewritten: Option<(Vec<u8>, usize, usize)>,
}

impl<I> Watched<I> {
    fn new(io: I, activity: Arc<Activity>, limits: &Limits, stats: Arc<Stats>) -> Self {
        Self {
            io,
            activity,
            preface: Some((0, Box::pin(tokio::time::sleep(limits.header_read)))),
            write_stall: limits.write_stall,
            stall: None,
            stats,
            rewritten: None,
        }
    }

    fn wrote(&mut self, n: usize) {
        self.stall = None;
        if n > 0 {
            self.activity.touch();
            self.preface = None;
        }
    }

    /// A write that cannot proceed: pending until the stall limit, then an error.
    fn stalled<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let limit = self.write_stall;
        let timer = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if timer.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.stats.write_stalls.inc();
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("the client accepted no bytes for {limit:?}"),
        )))
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let n = buf.filled().len() - before;
                if n > 0 {
                    this.activity.touch();
                    if let Some((got, _)) = &mut this.preface {
                        *got += n;
                        if *got >= PREFACE_LEN {
                            this.preface = None;
                        }
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = match &mut this.preface {
                    Some((_, deadline)) => deadline.as_mut().poll(cx).is_ready(),
                    None => false,
                };
                if !expired {
                    return Poll::Pending;
                }
                this.stats.header_timeouts.inc();
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no request head within the header timeout",
                )))
            }
            other => other,
        }
    }
}

impl<I: AsyncWrite + Unpin> Watched<I> {
    /// Writes the rewritten error answer; `Ready(n)` once all of it is out.
    fn poll_rewritten(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        loop {
            let Some((bytes, done, claimed)) = &mut self.rewritten else {
                return Poll::Ready(Ok(0));
            };
            if *done == bytes.len() {
                let claimed = *claimed;
                return Poll::Ready(Ok(claimed));
            }
            match Pin::new(&mut self.io).poll_write(cx, &bytes[*done..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    *done += n;
                    self.wrote(n);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return self.stalled(cx),
            }
        }
    }

    /// Notes a write that went through; one that could not proceed runs the stall timer.
    fn after_write(
        &mut self,
        cx: &mut Context<'_>,
        written: Poll<io::Result<usize>>,
    ) -> Poll<io::Result<usize>> {
        match written {
            Poll::Ready(Ok(n)) => {
                self.wrote(n);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => self.stalled(cx),
        }
    }

    /// hyper answers an HTTP request it cannot parse (malformed, head or URI too large) itself,
    /// with an empty body; no request is in flight then. That answer gets an OpenAI-format body.
    fn rewrite_bare_error(&mut self, buf: &[u8]) -> bool {
        if self.rewritten.is_some() || self.activity.is_busy() {
            return false;
        }
        let Some(status) = bare_error_status(buf) else {
            return false;
        };
        self.rewritten = Some((openai_error_answer(status), 0, buf.len()));
        true
    }
}

/// The status of an HTTP/1 error head hyper wrote with an empty body.
fn bare_error_status(buf: &[u8]) -> Option<u16> {
    let head = std::str::from_utf8(buf.strip_prefix(b"HTTP/1.1 ")?).ok()?;
    let status: u16 = head.get(..3)?.parse().ok()?;
    let empty = head
        .to_ascii_lowercase()
        .contains("\r\ncontent-length: 0\r\n");
    ((400..600).contains(&status) && empty && head.ends_with("\r\n\r\n")).then_some(status)
}

fn openai_error_answer(status: u16) -> Vec<u8> {
    let (message, code) = match status {
        414 => ("the request URI is too long", "uri_too_long"),
        431 => ("the request headers are too large", "headers_too_large"),
        408 => ("the request head did not arrive in time", "request_timeout"),
        _ => ("the HTTP request is malformed", "bad_http_request"),
    };
    let kind = if status >= 500 {
        "server_error"
    } else {
        "invalid_request_error"
    };
    let body = format!(
        r#"{{"error":{{"message":"{message}","type":"{kind}","param":null,"code":"{code}"}}}}"#
    );
    let reason = http::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("Error");
    let mut out = format!(
        "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.rewritten.is_some() || this.rewrite_bare_error(buf) {
            return this.poll_rewritten(cx);
        }
        let written = Pin::new(&mut this.io).poll_write(cx, buf);
        this.after_write(cx, written)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.rewritten.is_some() || (bufs.len() == 1 && this.rewrite_bare_error(&bufs[0])) {
            return this.poll_rewritten(cx);
        }
        let written = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.after_write(cx, written)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.io).poll_flush(cx) {
            Poll::Ready(r) => {
                this.stall = None;
                Poll::Ready(r)
            }
            Poll::Pending => this.stalled(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
