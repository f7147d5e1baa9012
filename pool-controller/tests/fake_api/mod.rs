//! A test double for the Kubernetes API server (no API server can run here), behind kube's
//! `tower_test` mock service: the real `kube::Client` talks to it, and it answers the way an API
//! server does for the calls the controller makes — list and watch (streamed, resumable from a
//! resourceVersion, label selectors), create (409 when the name is taken), get, replace
//! (409 on a stale resourceVersion), delete, and patch (server-side apply of `/status`, merge
//! for events) — with `Status` bodies for errors. Every request is recorded, so a test states
//! the calls it expects and fails when one does not come within its timeout. Tests play the
//! scheduler and the kubelet by editing objects (`update`), which watchers then see.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

pub type FakeBody = UnsyncBoxBody<Bytes, Infallible>;

pub const NS: &str = "llmctl";
pub const PODS: &str = "/api/v1/namespaces/llmctl/pods";
pub const POOLS: &str = "/apis/llmctl.io/v1alpha1/namespaces/llmctl/inferencepools";
pub const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/llmctl/leases";
pub const EVENTS: &str = "/apis/events.k8s.io/v1/namespaces/llmctl/events";

/// One request as the fake received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
}

impl Recorded {
    pub fn query_has(&self, pair: &str) -> bool {
        self.query.split('&').any(|kv| decode(kv) == pair)
    }
}

struct WatchStream {
    collection: String,
    selector: Vec<(String, String)>,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct State {
    /// Collection path → name → object.
    objects: BTreeMap<String, BTreeMap<String, Value>>,
    version: u64,
    /// Every change, for watches resumed from a version: (version, collection, type, object).
    history: Vec<(u64, String, &'static str, Value)>,
    watches: Vec<WatchStream>,
    log: Vec<Recorded>,
}

#[derive(Clone)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
    logged: watch::Sender<usize>,
    /// Requests whose path starts with this get no answer while it is set (an API server
    /// that hangs, for everything with `/`).
    stalled: watch::Sender<Option<String>>,
}

impl FakeApi {
    /// A client wired to a new fake API server.
    pub fn start() -> (Self, kube::Client) {
        let (service, mut handle) =
            tower_test::mock::pair::<Request<kube::client::Body>, Response<FakeBody>>();
        let fake = Self {
            state: Arc::default(),
            logged: watch::channel(0).0,
            stalled: watch::channel(None).0,
        };
        let server = fake.clone();
        tokio::spawn(async move {
            while let Some((request, respond)) = handle.next_request().await {
                let response = server.handle(request).await;
                respond.send_response(response);
            }
        });
        (fake, kube::Client::new(service, NS))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake API state lock")
    }

    /// Makes requests under `prefix` hang, unanswered, until called with `None`.
    pub fn stall(&self, prefix: Option<&str>) {
        self.stalled.send_replace(prefix.map(str::to_owned));
    }

    async fn handle(&self, request: Request<kube::client::Body>) -> Response<FakeBody> {
        let path = request.uri().path().to_owned();
        let _ = self
            .stalled
            .subscribe()
            .wait_for(|s| s.as_deref().is_none_or(|p| !path.starts_with(p)))
            .await;
        let (parts, body) = request.into_parts();
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let recorded = Recorded {
            method: parts.method.to_string(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().unwrap_or("").to_owned(),
            content_type: parts
                .headers
                .get(http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned(),
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        };
        let response = self.respond(&recorded);
        let n = {
            let mut state = self.lock();
            state.log.push(recorded);
            state.log.len()
        };
        self.logged.send_replace(n);
        response
    }

    fn respond(&self, r: &Recorded) -> Response<FakeBody> {
        let segments: Vec<&str> = r.path.trim_start_matches('/').split('/').collect();
        let Some(ns_at) = segments.iter().position(|s| *s == "namespaces") else {
            return status(
                StatusCode::NOT_FOUND,
                "NotFound",
                "cluster-scoped paths are not served",
            );
        };
        let collection = format!("/{}", segments[..(ns_at + 3).min(segments.len())].join("/"));
        let name = segments.get(ns_at + 3).copied();
        let sub = segments.get(ns_at + 4).copied();
        match (r.method.as_str(), name) {
            ("GET", None) if r.query_has("watch=true") => self.watch(&collection, r),
            ("GET", None) => self.list(&collection, r),
            ("POST", None) => self.create_object(&collection, r.body.clone()),
            ("GET", Some(name)) => match self.get(&collection, name) {
                Some(v) => ok(StatusCode::OK, &v),
                None => not_found(name),
            },
            ("PUT", Some(name)) => self.replace(&collection, name, r.body.clone()),
            ("DELETE", Some(name)) => match self.delete(&collection, name) {
                Some(v) => ok(StatusCode::OK, &v),
                None => not_found(name),
            },
            ("PATCH", Some(name)) => {
                let patch = r.body.clone();
                let found = self.update(&collection, name, |obj| match sub {
                    Some("status") => obj["status"] = patch["status"].clone(),
                    _ => merge(obj, &patch),
                });
                match found {
                    Some(v) => ok(StatusCode::OK, &v),
                    None => not_found(name),
                }
            }
            _ => status(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                &r.method,
            ),
        }
    }

    fn list(&self, collection: &str, r: &Recorded) -> Response<FakeBody> {
        let selector = selector(&r.query);
        let state = self.lock();
        let items: Vec<Value> = state
            .objects
            .get(collection)
            .into_iter()
            .flat_map(|m| m.values())
            .filter(|o| matches(o, &selector))
            .cloned()
            .collect();
        ok(
            StatusCode::OK,
            &json!({"apiVersion": "v1", "kind": "List",
                    "metadata": {"resourceVersion": state.version.to_string()}, "items": items}),
        )
    }

    /// A watch: the changes after the requested version, then every new one, as JSON lines.
    fn watch(&self, collection: &str, r: &Recorded) -> Response<FakeBody> {
        let from: u64 = r
            .query
            .split('&')
            .find_map(|kv| kv.strip_prefix("resourceVersion="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let selector = selector(&r.query);
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = self.lock();
        for (version, c, kind, object) in &state.history {
            if *version > from && c == collection && matches(object, &selector) {
                let _ = tx.send(event_line(kind, object));
            }
        }
        state.watches.push(WatchStream {
            collection: collection.to_owned(),
            selector,
            tx,
        });
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv()
                .await
                .map(|line| (Ok::<_, Infallible>(Frame::data(line)), rx))
        });
        Response::builder()
            .status(StatusCode::OK)
            .header("content-type", "application/json")
            .body(StreamBody::new(stream.boxed()).boxed_unsync())
            .expect("a valid response")
    }

    fn changed(state: &mut State, collection: &str, kind: &'static str, object: &Value) {
        state.watches.retain(|w| {
            if w.collection != collection || !matches(object, &w.selector) {
                return !w.tx.is_closed();
            }
            w.tx.send(event_line(kind, object)).is_ok()
        });
        let version = state.version;
        state
            .history
            .push((version, collection.to_owned(), kind, object.clone()));
    }

    /// Creates an object as the API server would (uid, version, timestamp, generation).
    pub fn create_object(&self, collection: &str, mut object: Value) -> Response<FakeBody> {
        let Some(name) = object["metadata"]["name"].as_str().map(str::to_owned) else {
            return status(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid",
                "metadata.name is required",
            );
        };
        let mut state = self.lock();
        if state
            .objects
            .get(collection)
            .is_some_and(|m| m.contains_key(&name))
        {
            return status(
                StatusCode::CONFLICT,
                "AlreadyExists",
                &format!("{name} already exists"),
            );
        }
        state.version += 1;
        let meta = &mut object["metadata"];
        meta["namespace"] = json!(NS);
        meta["uid"] = json!(format!("uid-{name}-{}", state.version));
        meta["resourceVersion"] = json!(state.version.to_string());
        meta["creationTimestamp"] = json!("2026-11-24T00:00:00Z");
        meta["generation"] = json!(1);
        state
            .objects
            .entry(collection.to_owned())
            .or_default()
            .insert(name, object.clone());
        Self::changed(&mut state, collection, "ADDED", &object);
        ok(StatusCode::CREATED, &object)
    }

    fn replace(&self, collection: &str, name: &str, mut object: Value) -> Response<FakeBody> {
        let mut state = self.lock();
        let Some(current) = state.objects.get(collection).and_then(|m| m.get(name)) else {
            return not_found(name);
        };
        if object["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
            return status(
                StatusCode::CONFLICT,
                "Conflict",
                "the object has been modified",
            );
        }
        state.version += 1;
        object["metadata"]["resourceVersion"] = json!(state.version.to_string());
        state
            .objects
            .get_mut(collection)
            .expect("checked above")
            .insert(name.to_owned(), object.clone());
        Self::changed(&mut state, collection, "MODIFIED", &object);
        ok(StatusCode::OK, &object)
    }

    pub fn get(&self, collection: &str, name: &str) -> Option<Value> {
        self.lock().objects.get(collection)?.get(name).cloned()
    }

    pub fn names(&self, collection: &str) -> Vec<String> {
        self.lock()
            .objects
            .get(collection)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Edits an object (a new version, seen by watchers); `None` when it does not exist.
    pub fn update(
        &self,
        collection: &str,
        name: &str,
        edit: impl FnOnce(&mut Value),
    ) -> Option<Value> {
        let mut state = self.lock();
        state.version += 1;
        let version = state.version;
        let object = state.objects.get_mut(collection)?.get_mut(name)?;
        edit(object);
        object["metadata"]["resourceVersion"] = json!(version.to_string());
        let object = object.clone();
        Self::changed(&mut state, collection, "MODIFIED", &object);
        Some(object)
    }

    pub fn delete(&self, collection: &str, name: &str) -> Option<Value> {
        let mut state = self.lock();
        let object = state.objects.get_mut(collection)?.remove(name)?;
        state.version += 1;
        Self::changed(&mut state, collection, "DELETED", &object);
        Some(object)
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().log.clone()
    }

    /// How many requests have been received (to expect calls after this point).
    pub fn mark(&self) -> usize {
        self.lock().log.len()
    }

    /// The first request from `from` on that satisfies `what`; panics naming `expected` when
    /// none comes within `within`.
    pub async fn expect(
        &self,
        from: usize,
        within: Duration,
        expected: &str,
        what: impl Fn(&Recorded) -> bool,
    ) -> Recorded {
        let mut logged = self.logged.subscribe();
        let found = tokio::time::timeout(within, async {
            loop {
                if let Some(r) = self.lock().log.iter().skip(from).find(|r| what(r)) {
                    return r.clone();
                }
                let _ = logged.changed().await;
            }
        })
        .await;
        match found {
            Ok(r) => r,
            Err(_) => {
                let log: Vec<String> = self
                    .requests()
                    .iter()
                    .skip(from)
                    .map(|r| format!("{} {}?{}", r.method, r.path, r.query))
                    .collect();
                panic!(
                    "expected {expected} within {within:?}; got:\n{}",
                    log.join("\n")
                )
            }
        }
    }
}

/// The scheduler placed the pod and the kubelet reports it ready at `ip`.
pub fn make_ready(fake: &FakeApi, pod: &str, ip: &str) {
    fake.update(PODS, pod, |p| {
        p["status"] = json!({
            "phase": "Running",
            "podIP": ip,
            "conditions": [
                {"type": "PodScheduled", "status": "True"},
                {"type": "Ready", "status": "True"},
            ],
        });
    })
    .expect("the pod exists");
}

/// The executor container exited with `reason` and `code`.
pub fn make_failed(fake: &FakeApi, pod: &str, reason: &str, code: i32) {
    fake.update(PODS, pod, |p| {
        p["status"] = json!({
            "phase": "Failed",
            "containerStatuses": [{
                "name": "executor", "image": "img", "imageID": "", "ready": false,
                "restartCount": 0,
                "state": {"terminated": {"exitCode": code, "reason": reason}},
            }],
        });
    })
    .expect("the pod exists");
}

/// No node fits the pod (e.g. no GPU node yet).
pub fn make_unschedulable(fake: &FakeApi, pod: &str) {
    fake.update(PODS, pod, |p| {
        p["status"] = json!({
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}],
        });
    })
    .expect("the pod exists");
}

/// Placed on a node, container not ready yet.
pub fn make_scheduled(fake: &FakeApi, pod: &str) {
    fake.update(PODS, pod, |p| {
        p["status"] = json!({
            "phase": "Pending",
            "conditions": [{"type": "PodScheduled", "status": "True"}],
        });
    })
    .expect("the pod exists");
}

fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).expect("JSON");
    line.push(b'\n');
    Bytes::from(line)
}

fn ok(code: StatusCode, value: &Value) -> Response<FakeBody> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(value.to_string())).boxed_unsync())
        .expect("a valid response")
}

fn status(code: StatusCode, reason: &str, message: &str) -> Response<FakeBody> {
    ok(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "reason": reason, "message": message, "code": code.as_u16()}),
    )
}

fn not_found(name: &str) -> Response<FakeBody> {
    status(
        StatusCode::NOT_FOUND,
        "NotFound",
        &format!("{name} not found"),
    )
}

fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                merge(t.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (t, p) => *t = p.clone(),
    }
}

/// `labelSelector=a%3Db,c%3Dd` as equality pairs.
fn selector(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|kv| kv.strip_prefix("labelSelector="))
        .flat_map(|s| {
            decode(s)
                .split(',')
                .filter_map(|pair| {
                    let (k, v) = pair.split_once('=')?;
                    Some((k.to_owned(), v.to_owned()))
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn matches(object: &Value, selector: &[(String, String)]) -> bool {
    selector
        .iter()
        .all(|(k, v)| object["metadata"]["labels"][k].as_str() == Some(v))
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                    }
                    Err(_) => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
