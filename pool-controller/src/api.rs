//! The control API (HTTP/1.1 and HTTP/2 over plain TCP; see docs/controller-api.md):
//!
//! - `GET /v1/pools`, `GET /v1/pools/{name}`: pools with their executors;
//! - `GET /v1/endpoints`: the ready endpoints of every pool, with a revision;
//!   `?watch=true` streams that snapshot as NDJSON, once at once and again on every change
//!   (and as a heartbeat every few seconds, so a watcher notices a dead connection);
//! - `POST /v1/demand`: a gateway's demand report;
//! - `GET /metrics`, `GET /healthz` (alive), `GET /readyz` (200 only on the replica that
//!   should take traffic: on Kubernetes, the elected leader).
//!
//! Errors use the OpenAI error body, like every other llmctl HTTP surface.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use llmctl_protocol::ErrorResponse;
use llmctl_protocol::control::{DemandReport, EndpointSnapshot};
use serde::Serialize;

use crate::controller::Controller;

/// A watcher hears the snapshot at least this often.
pub const WATCH_HEARTBEAT: Duration = Duration::from_secs(5);
const MAX_BODY_BYTES: usize = 1 << 20;

type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, Infallible>;

/// Serves the control API for `controller` on `listen`; returns the bound address.
pub async fn listen(
    controller: &Arc<Controller>,
    listen: std::net::SocketAddr,
) -> anyhow::Result<(std::net::SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| anyhow::anyhow!("binding the control API on {listen}: {e}"))?;
    let addr = listener.local_addr()?;
    Ok((addr, tokio::spawn(serve(listener, controller.clone()))))
}

pub async fn serve(listener: tokio::net::TcpListener, controller: Arc<Controller>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let controller = controller.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let controller = controller.clone();
                async move { Ok::<_, Infallible>(handle(&controller, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

fn json(status: StatusCode, value: &impl Serialize) -> Response<Body> {
    let body = serde_json::to_vec(value).expect("API bodies always serialize");
    respond(status, "application/json", body)
}

fn error(status: StatusCode, e: ErrorResponse) -> Response<Body> {
    json(status, &e)
}

async fn handle(controller: &Arc<Controller>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    match (req.method(), path.as_str()) {
        (&Method::GET, "/healthz") => respond(StatusCode::OK, "text/plain", "ok\n"),
        (&Method::GET, "/readyz") if controller.is_ready() => {
            respond(StatusCode::OK, "text/plain", "ready\n")
        }
        (&Method::GET, "/readyz") => respond(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready: not the leader\n",
        ),
        (&Method::GET, "/metrics") => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            controller.metrics.encode(),
        ),
        (&Method::GET, "/v1/pools") => json(
            StatusCode::OK,
            &serde_json::json!({"pools": controller.pools()}),
        ),
        (&Method::GET, p) if p.starts_with("/v1/pools/") => {
            let name = &p["/v1/pools/".len()..];
            match controller.pool(name) {
                Some(status) => json(StatusCode::OK, &status),
                None => error(
                    StatusCode::NOT_FOUND,
                    ErrorResponse::invalid_request(format!("no pool named {name:?}"))
                        .with_code("pool_not_found"),
                ),
            }
        }
        (&Method::GET, "/v1/endpoints") => {
            if query
                .split('&')
                .any(|kv| kv == "watch=true" || kv == "watch=1")
            {
                watch(controller.endpoints())
            } else {
                json(StatusCode::OK, &*controller.endpoints().borrow())
            }
        }
        (&Method::POST, "/v1/demand") => demand(controller, req).await,
        (_, "/healthz" | "/readyz" | "/metrics" | "/v1/pools" | "/v1/endpoints" | "/v1/demand") => {
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorResponse::invalid_request(format!(
                    "{} is not allowed on {path}",
                    req.method()
                )),
            )
        }
        _ => error(
            StatusCode::NOT_FOUND,
            ErrorResponse::invalid_request(format!("no route {path}")),
        ),
    }
}

async fn demand(controller: &Arc<Controller>, req: Request<Incoming>) -> Response<Body> {
    let bytes = match Limited::new(req.into_body(), MAX_BODY_BYTES)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                ErrorResponse::invalid_request(format!(
                    "the body is larger than {MAX_BODY_BYTES} bytes or was cut off"
                )),
            );
        }
    };
    let report: DemandReport = match serde_json::from_slice(&bytes) {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                ErrorResponse::invalid_request(format!("demand report: {e}")),
            );
        }
    };
    if report.gateway.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            ErrorResponse::invalid_parameter("gateway", "the gateway id must not be empty"),
        );
    }
    match controller.report(report) {
        Ok(()) => {
            let mut r = Response::new(Full::new(Bytes::new()).boxed_unsync());
            *r.status_mut() = StatusCode::NO_CONTENT;
            r
        }
        Err(e) => error(
            StatusCode::NOT_FOUND,
            ErrorResponse::invalid_parameter("pools", e.to_string()).with_code("pool_not_found"),
        ),
    }
}

/// NDJSON: the snapshot now, on every change, and at least every heartbeat.
fn watch(rx: tokio::sync::watch::Receiver<EndpointSnapshot>) -> Response<Body> {
    let lines = futures_util::stream::unfold((rx, true), |(mut rx, first)| async move {
        if !first && let Ok(Err(_)) = tokio::time::timeout(WATCH_HEARTBEAT, rx.changed()).await {
            return None; // the controller is shutting down
        }
        let mut line = serde_json::to_vec(&*rx.borrow_and_update()).expect("snapshots serialize");
        line.push(b'\n');
        Some((
            Ok::<_, Infallible>(Frame::data(Bytes::from(line))),
            (rx, false),
        ))
    });
    let mut r = Response::new(StreamBody::new(lines).boxed_unsync());
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/x-ndjson"),
    );
    r.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    r
}
