//! Each limit against a real socket: what a silent, slow, idle or non-reading client can hold,
//! the connection cap, and a shutdown that lets a response in progress finish.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use llmctl_http_server::{Limits, Refusal, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An endless response body that notes when it is dropped.
struct Endless(Arc<AtomicBool>);

impl http_body::Body for Endless {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from(vec![
            b'x';
            1 << 16
        ])))))
    }
}

impl Drop for Endless {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// Serves `/slow` (answers after 400 ms), `/endless` (never ends) and anything else at once.
async fn start(limits: Limits) -> (String, Arc<Server>, Arc<AtomicBool>) {
    use http_body_util::BodyExt;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = Arc::new(Server::new(limits, Refusal::Http503));
    let dropped = Arc::new(AtomicBool::new(false));
    let (s, d) = (server.clone(), dropped.clone());
    tokio::spawn(async move {
        loop {
            let (stream, slot) = s.accept(&listener).await;
            let d = d.clone();
            tokio::spawn(s.serve(stream, slot, move |req: Request<Incoming>| {
                let d = d.clone();
                async move {
                    let body: Body = match req.uri().path() {
                        "/slow" => {
                            tokio::time::sleep(Duration::from_millis(400)).await;
                            Full::new(Bytes::from_static(b"slow done")).boxed_unsync()
                        }
                        "/endless" => Endless(d).boxed_unsync(),
                        _ => Full::new(Bytes::from_static(b"ok")).boxed_unsync(),
                    };
                    Response::new(body)
                }
            }));
        }
    });
    (addr, server, dropped)
}

fn limits() -> Limits {
    Limits {
        header_read: Duration::from_millis(300),
        idle: Duration::from_millis(300),
        write_stall: Duration::from_millis(300),
        h2_keepalive: Duration::from_secs(5),
        max_connections: 64,
        max_header_bytes: 16 << 10,
    }
}

/// Reads until the server closes; how long that took, and what came.
async fn until_closed(stream: &mut TcpStream, within: Duration) -> (Duration, Vec<u8>) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(
            within.saturating_sub(start.elapsed()),
            stream.read(&mut buf),
        )
        .await
        .unwrap_or_else(|_| panic!("still open after {within:?}"));
        match read {
            Ok(0) | Err(_) => return (start.elapsed(), got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
}

#[tokio::test]
async fn a_connection_that_sends_nothing_or_trickles_its_preface_is_closed() {
    let (addr, server, _) = start(Limits {
        idle: Duration::from_secs(30),
        ..limits()
    })
    .await;
    let mut silent = TcpStream::connect(&addr).await.unwrap();
    let (took, _) = until_closed(&mut silent, Duration::from_secs(3)).await;
    assert!(took >= Duration::from_millis(250), "{took:?}");

    // The HTTP/2 preface, one byte every 50 ms: not done within 300 ms.
    let mut trickle = TcpStream::connect(&addr).await.unwrap();
    let start = Instant::now();
    for b in b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" {
        if trickle.write_all(&[*b]).await.is_err() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, _) = until_closed(&mut trickle, Duration::from_secs(3)).await;
    assert!(
        start.elapsed() < Duration::from_millis(1500),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(server.stats().header_timeouts.get(), 2);
}

#[tokio::test]
async fn idle_connections_close_but_a_request_in_flight_keeps_its_connection() {
    let (addr, server, _) = start(limits()).await;
    // HTTP/1 keep-alive: answered, then closed once idle.
    let mut h1 = TcpStream::connect(&addr).await.unwrap();
    h1.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let (took, got) = until_closed(&mut h1, Duration::from_secs(3)).await;
    let text = String::from_utf8_lossy(&got);
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("slow done"),
        "{text}"
    );
    // 400 ms of work (longer than the idle limit) and then 300 ms idle.
    assert!(took >= Duration::from_millis(650), "{took:?}");

    // HTTP/2 idle after SETTINGS: the preface and an empty SETTINGS frame, then nothing.
    let mut h2 = TcpStream::connect(&addr).await.unwrap();
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let (took, _) = until_closed(&mut h2, Duration::from_secs(3)).await;
    assert!(took >= Duration::from_millis(250), "{took:?}");
    // The HTTP/1 connection may meet hyper's own header timeout for its next request first.
    assert!(server.stats().idle_closed.get() >= 1);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_and_its_body_dropped() {
    let (addr, server, dropped) = start(limits()).await;
    let mut reader = TcpStream::connect(&addr).await.unwrap();
    reader
        .write_all(b"GET /endless HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    while !dropped.load(Ordering::SeqCst) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the body of a client that reads nothing was kept"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(server.stats().write_stalls.get(), 1);
}

#[tokio::test]
async fn connections_over_the_cap_get_a_503_in_openai_format() {
    let (addr, server, _) = start(Limits {
        max_connections: 2,
        header_read: Duration::from_secs(10),
        ..limits()
    })
    .await;
    let _a = TcpStream::connect(&addr).await.unwrap();
    let _b = TcpStream::connect(&addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut c = TcpStream::connect(&addr).await.unwrap();
    let (_, got) = until_closed(&mut c, Duration::from_secs(3)).await;
    let text = String::from_utf8(got).unwrap();
    assert!(text.starts_with("HTTP/1.1 503"), "{text}");
    let body: serde_json::Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap())
        .unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(body["error"]["code"], "too_many_connections");
    assert_eq!(server.stats().refused.get(), 1);
    assert_eq!(server.stats().open.get(), 2);
}

#[tokio::test]
async fn shutdown_lets_a_response_in_progress_finish_then_closes() {
    let (addr, server, _) = start(Limits {
        idle: Duration::from_secs(30),
        ..limits()
    })
    .await;
    let mut busy = TcpStream::connect(&addr).await.unwrap();
    busy.write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let closed = tokio::spawn({
        let server = server.clone();
        async move { server.shutdown(Duration::from_secs(5)).await }
    });
    let (_, got) = until_closed(&mut busy, Duration::from_secs(3)).await;
    assert!(String::from_utf8_lossy(&got).ends_with("slow done"));
    let (took, _) = until_closed(&mut idle, Duration::from_secs(3)).await;
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert!(closed.await.unwrap(), "every connection closed");
    assert_eq!(server.stats().open.get(), 0);
}

#[tokio::test]
async fn malformed_http_gets_an_openai_format_error() {
    let (addr, _, _) = start(limits()).await;
    for (request, status, code) in [
        (
            format!(
                "GET / HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
                "h".repeat(100_000)
            )
            .into_bytes(),
            "431",
            "headers_too_large",
        ),
        (
            b"\x16\x03\x01 not http at all\r\n\r\n".to_vec(),
            "400",
            "bad_http_request",
        ),
        (
            b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: abc\r\n\r\n".to_vec(),
            "400",
            "bad_http_request",
        ),
    ] {
        let mut tcp = TcpStream::connect(&addr).await.unwrap();
        let _ = tcp.write_all(&request).await;
        let (_, got) = until_closed(&mut tcp, Duration::from_secs(3)).await;
        let text = String::from_utf8_lossy(&got);
        assert!(text.starts_with(&format!("HTTP/1.1 {status}")), "{text}");
        let body: serde_json::Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap())
            .unwrap_or_else(|e| panic!("{e}: {text}"));
        assert_eq!(body["error"]["code"], code, "{text}");
    }
    // A request that parses is untouched, even with an empty error body of its own.
    let mut ok = TcpStream::connect(&addr).await.unwrap();
    ok.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let (_, got) = until_closed(&mut ok, Duration::from_secs(3)).await;
    assert!(String::from_utf8_lossy(&got).ends_with("ok"));
}
