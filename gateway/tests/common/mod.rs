//! What the hosted-upstream tests share: an HTTPS server for the provider stand-ins (hyper
//! over rustls, HTTP/2 and HTTP/1.1 by ALPN, a certificate from rcgen) and the real
//! `llmctl-gateway` binary started with a config, its log kept in a file.

#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

pub fn full(s: String) -> Body {
    Full::new(Bytes::from(s)).boxed()
}

/// Serves HTTPS on a free port with `cert` for `localhost`, each request answered by
/// `handler`; returns the port.
pub async fn https_server<F, Fut>(cert: &rcgen::CertifiedKey<rcgen::KeyPair>, handler: F) -> u16
where
    F: Fn(hyper::Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = hyper::Response<Body>> + Send + 'static,
{
    let key = rustls_pki_types::PrivateKeyDer::try_from(cert.signing_key.serialize_der()).unwrap();
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert.cert.der().clone()], key)
    .unwrap();
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let (acceptor, handler) = (acceptor.clone(), handler.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    port
}

pub struct Gateway {
    child: Child,
    pub addr: String,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

impl Gateway {
    /// Starts the gateway with `config`, `env` set, and its log (at debug) in a file.
    pub fn start(dir: tempfile::TempDir, config: &str, env: &[(&str, &str)]) -> Gateway {
        let path = dir.path().join("gateway.toml");
        std::fs::write(&path, config).unwrap();
        let log = dir.path().join("gateway.log");
        let mut child = Command::new(env!("CARGO_BIN_EXE_llmctl-gateway"))
            .args(["--config", path.to_str().unwrap()])
            .envs(env.iter().copied())
            .env("RUST_LOG", "debug")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
            panic!(
                "listening line {line:?}: {e}; log: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        Gateway {
            child,
            addr: v["addr"].as_str().unwrap().to_owned(),
            log,
            _dir: dir,
        }
    }

    pub async fn request(
        &self,
        method: &str,
        path: &str,
        key: &str,
        body: Value,
    ) -> (u16, hyper::HeaderMap, Vec<u8>) {
        let stream = tokio::net::TcpStream::connect(&self.addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "gw")
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {key}"))
            .body(Full::new(Bytes::from(if body.is_null() {
                Vec::new()
            } else {
                serde_json::to_vec(&body).unwrap()
            })))
            .unwrap();
        let r = sender.send_request(req).await.unwrap();
        let (status, headers) = (r.status().as_u16(), r.headers().clone());
        let bytes = r.into_body().collect().await.unwrap().to_bytes().to_vec();
        (status, headers, bytes)
    }

    pub async fn chat(
        &self,
        key: &str,
        model: &str,
        extra: Value,
    ) -> (u16, hyper::HeaderMap, Value) {
        let mut body = json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, headers, bytes) = self
            .request("POST", "/v1/chat/completions", key, body)
            .await;
        let value = serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        (status, headers, value)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap()
    }
}

pub fn header<'a>(h: &'a hyper::HeaderMap, name: &str) -> &'a str {
    h.get(name).map_or("", |v| v.to_str().unwrap())
}
