//! Response bodies: whole JSON bodies, and SSE streams fed through a channel so a slow or gone
//! client pushes back on (or stops) the producer instead of buffering whole responses.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode, header};
use http_body::Frame;
use http_body_util::{BodyExt, Full};
use tokio::sync::mpsc;

use super::error::ServerError;

pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// Chunks buffered between the producer and the socket.
const STREAM_BUFFER: usize = 64;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

pub fn json_response(status: StatusCode, body: Vec<u8>) -> Response<Body> {
    let mut r = Response::new(full(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

pub fn error_response(e: &ServerError) -> Response<Body> {
    let body = serde_json::to_vec(&e.body()).expect("error bodies always serialize");
    json_response(e.status(), body)
}

pub fn text_response(
    status: StatusCode,
    content_type: &'static str,
    text: String,
) -> Response<Body> {
    let mut r = Response::new(full(text));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

/// A body fed by a channel; dropping it (the client went away) closes the channel.
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl http_body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}

/// The producing side of a streamed body.
pub struct StreamSender {
    tx: mpsc::Sender<Bytes>,
    stall: Duration,
}

/// The client is gone, or took nothing for the write-stall timeout while the buffer was full.
#[derive(Debug)]
pub struct ClientGone;

impl StreamSender {
    /// Queues one chunk for the client, waiting while the buffer is full, at most `stall`.
    pub async fn send(&self, chunk: Bytes) -> Result<(), ClientGone> {
        self.tx
            .send_timeout(chunk, self.stall)
            .await
            .map_err(|_| ClientGone)
    }
}

/// A bounded stream body: a client that reads nothing for `stall` with the buffer full ends it.
pub fn channel(stall: Duration) -> (StreamSender, ChannelBody) {
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    (StreamSender { tx, stall }, ChannelBody { rx })
}

pub fn sse_response(body: ChannelBody) -> Response<Body> {
    let mut r = Response::new(body.boxed_unsync());
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    h.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-cache"),
    );
    r
}
