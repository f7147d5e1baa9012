//! The control API on a real socket: listing pools, the endpoint snapshot and its watch stream,
//! demand reports, metrics, and every kind of bad input with its status and error body. The
//! pool's executor program does not exist, so a demand report exercises the failed-launch path
//! without starting workers.

use std::time::{Duration, Instant};

use llmctl_pool_controller::controller;
use llmctl_pool_controller::spec::ControllerConfig;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

async fn http(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    let status = out.split(' ').nth(1).unwrap().parse().unwrap();
    (status, out.split_once("\r\n\r\n").unwrap().1.to_owned())
}

fn error_code(body: &str) -> Value {
    let v: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{body}: {e}"));
    assert!(v["error"]["message"].is_string(), "{body}");
    v["error"]["code"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_api_lists_watches_takes_demand_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let config = ControllerConfig::parse(
        &format!(
            "listen = \"127.0.0.1:0\"\nlog_dir = \"{}\"\ntick_ms = 50\n[[pools]]\nname = \"p\"\nmodels = [\"m\"]\n\
             [pools.executor]\nmodel = \"nowhere\"\n[pools.scaling]\nmin_warm = 0\nmax_replicas = 2\n",
            dir.path().display()
        ),
        "test",
    )
    .unwrap();
    let running = controller::start(config, dir.path().join("no-such-program"))
        .await
        .unwrap();
    let addr = running.addr.to_string();

    let (status, body) = http(&addr, "GET", "/v1/pools", "").await;
    assert_eq!(status, 200);
    let pools: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(pools["pools"][0]["name"], "p");
    assert_eq!(pools["pools"][0]["executors"], json!([]));
    let (status, body) = http(&addr, "GET", "/v1/endpoints", "").await;
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["pools"]["p"],
        json!([])
    );

    // The watch stream answers with the snapshot at once.
    let mut watch = tokio::net::TcpStream::connect(&addr).await.unwrap();
    watch
        .write_all(b"GET /v1/endpoints?watch=true HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut lines = tokio::io::BufReader::new(watch).lines();
    let mut saw_snapshot = false;
    while let Some(line) = tokio::time::timeout(Duration::from_secs(5), lines.next_line())
        .await
        .unwrap()
        .unwrap()
    {
        if line.contains("\"revision\"") {
            assert!(line.contains("\"pools\":{\"p\":[]}"), "{line}");
            saw_snapshot = true;
            break;
        }
    }
    assert!(saw_snapshot);

    // Bad input: each gets the right status and an OpenAI-format error body.
    for (method, path, body, status, code) in [
        ("POST", "/v1/demand", "{not json", 400, Value::Null),
        (
            "POST",
            "/v1/demand",
            r#"{"gateway":"g","pools":[{"pool":"p","queued":"x","in_flight":0}]}"#,
            400,
            Value::Null,
        ),
        (
            "POST",
            "/v1/demand",
            r#"{"gateway":"g","pools":[],"extra":1}"#,
            400,
            Value::Null,
        ),
        (
            "POST",
            "/v1/demand",
            r#"{"gateway":"","pools":[]}"#,
            400,
            Value::Null,
        ),
        (
            "POST",
            "/v1/demand",
            r#"{"gateway":"g","pools":[{"pool":"nope","queued":1,"in_flight":0}]}"#,
            404,
            json!("pool_not_found"),
        ),
        ("GET", "/v1/pools/nope", "", 404, json!("pool_not_found")),
        ("DELETE", "/v1/pools", "", 405, Value::Null),
        ("GET", "/v2/anything", "", 404, Value::Null),
    ] {
        let (got, text) = http(&addr, method, path, body).await;
        assert_eq!(got, status, "{method} {path} {body}: {text}");
        assert_eq!(error_code(&text), code, "{method} {path} {body}: {text}");
    }
    let huge = format!(r#"{{"gateway":"{}","pools":[]}}"#, "g".repeat(2 << 20));
    assert_eq!(http(&addr, "POST", "/v1/demand", &huge).await.0, 413);

    // Demand for a pool at zero: the controller tries to launch at once; the program is
    // missing, so the failure is counted and shown, and nothing crashes.
    let report = r#"{"gateway":"g","pools":[{"pool":"p","queued":3,"in_flight":0}]}"#;
    assert_eq!(http(&addr, "POST", "/v1/demand", report).await.0, 204);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, metrics) = http(&addr, "GET", "/metrics", "").await;
        if metrics
            .contains("llmctl_controller_executor_failures_total{pool=\"p\",class=\"ephemeral\"}")
        {
            assert!(
                metrics.contains("llmctl_controller_demand{pool=\"p\",kind=\"queued\"} 3"),
                "{metrics}"
            );
            assert!(
                metrics.contains("llmctl_controller_demand_gateways 1"),
                "{metrics}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no failed launch counted: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, body) = http(&addr, "GET", "/v1/pools/p", "").await;
    let pool: Value = serde_json::from_str(&body).unwrap();
    assert!(pool["failures"].as_u64().unwrap() >= 1, "{pool:#}");
    assert_eq!(pool["last_reason"], "scale_from_zero", "{pool:#}");
    running.shutdown().await;
}
