//! The fault campaign: the plane tried as a hostile or unlucky user would, against real
//! processes. A pool controller runs in this process; the gateway and two workers are child
//! processes (this binary re-run as `gateway` / `worker`, i.e. the real servers). Scenarios:
//!
//! - **fuzz** (gateway, then one worker directly): `--fuzz N` seeded structured mutations of
//!   valid chat and completion requests: values of the wrong type, numbers at the edges, deep
//!   nesting, long and odd unicode, truncated and invalid JSON, lying `Content-Length`, huge,
//!   missing or malformed headers;
//! - **stalled readers**: streams whose clients never read, then ordinary requests;
//! - **idle flood and slowloris**: hundreds of silent connections and headers trickled a byte at
//!   a time, with ordinary requests meanwhile; all must be closed by the server;
//! - **fd exhaustion**: the gateway's descriptor limit lowered to what it has open, a flood of
//!   connections, the gateway's CPU measured while exhausted, then service must resume;
//! - **kill -9** and **SIGSTOP** of an executor under load.
//!
//! Every request must end in a response, an OpenAI-format error, or an SSE error event
//! followed by `[DONE]`: the table counts answered, explicit errors, lost (no answer, a cut
//! stream, a 2xx that does not parse), hung (no end within the client's timeout), 5xx, and
//! bare HTTP errors (an error status without an OpenAI body).
//! The run fails (exit 1) on any lost or hung request, a crash, a 5xx or bare error in the
//! fuzz, or CPU above 5% while descriptors are exhausted.
//!
//! `cargo run -p llmctl-perf --bin faults -- [--fuzz 1000] [--seed 1] [--record]` (`.ci/run` runs
//! it; the figures are counts, not speeds, so the debug build serves).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use llmctl_inference_worker::model::init::Preset;
use llmctl_inference_worker::server::WorkerArgs;
use llmctl_pool_controller::controller::{self, Running};
use llmctl_pool_controller::spec::ControllerConfig;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Parser)]
struct Args {
    /// Fuzz cases per target (the gateway, then one worker).
    #[arg(long, default_value_t = 1000)]
    fuzz: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Write the table to perf/results/<date>-faults-cpu.md.
    #[arg(long)]
    record: bool,
}

/// How the controller and the campaign run this binary as a server.
#[derive(Parser)]
struct ServerCli {
    #[command(subcommand)]
    command: ServerCommand,
}

#[derive(clap::Subcommand)]
enum ServerCommand {
    Worker(WorkerArgs),
    Gateway(llmctl_gateway::GatewayArgs),
}

fn main() -> Result<()> {
    if matches!(
        std::env::args().nth(1).as_deref(),
        Some("worker" | "gateway")
    ) {
        return match ServerCli::parse().command {
            ServerCommand::Worker(args) => {
                llmctl_inference_worker::init_logging();
                llmctl_inference_worker::server::run(args)
            }
            ServerCommand::Gateway(args) => {
                llmctl_gateway::init_logging();
                llmctl_gateway::run(args)
            }
        };
    }
    let args = Args::parse();
    raise_fd_limit();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let failed = runtime.block_on(campaign(args))?;
    if failed {
        std::process::exit(1);
    }
    Ok(())
}

/// Up to the hard limit: the floods below hold hundreds of sockets (children inherit it).
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on this process with a valid struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

// ---------- what a request came to ----------

#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    /// A 2xx whose body is whole (JSON that parses, or a stream ending in `[DONE]`).
    Answered,
    /// An OpenAI-format error (status and body, or an SSE error event then `[DONE]`).
    Explicit {
        status: u16,
    },
    /// An HTTP error without an OpenAI body.
    Bare {
        status: u16,
    },
    Lost(String),
    Hung,
}

#[derive(Default)]
struct Row {
    scenario: String,
    tried: usize,
    answered: usize,
    explicit: usize,
    bare: usize,
    lost: usize,
    hung: usize,
    status_5xx: usize,
    crashes: usize,
    note: String,
    examples: Vec<String>,
}

impl Row {
    fn new(scenario: &str) -> Self {
        Self {
            scenario: scenario.to_owned(),
            ..Self::default()
        }
    }

    fn add(&mut self, outcome: &Outcome, what: &str) {
        self.tried += 1;
        match outcome {
            Outcome::Answered => self.answered += 1,
            Outcome::Explicit { status } => {
                self.explicit += 1;
                if *status >= 500 {
                    self.status_5xx += 1;
                }
            }
            Outcome::Bare { status } => {
                self.bare += 1;
                if *status >= 500 {
                    self.status_5xx += 1;
                }
            }
            Outcome::Lost(why) => {
                self.lost += 1;
                self.example(format!("lost ({why}): {what}"));
            }
            Outcome::Hung => {
                self.hung += 1;
                self.example(format!("hung: {what}"));
            }
        }
    }

    fn example(&mut self, e: String) {
        if self.examples.len() < 12 {
            self.examples.push(e.chars().take(300).collect());
        }
    }
}

/// Sends raw bytes on a fresh connection and reads the answer to its end.
async fn exchange(addr: &str, request: &[u8], timeout: Duration) -> Outcome {
    let run = async {
        let mut tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        // The server may answer (and close) before the whole request is written.
        let _ = tcp.write_all(request).await;
        let mut out = Vec::new();
        let _ = tcp.read_to_end(&mut out).await;
        Ok::<_, String>(out)
    };
    match tokio::time::timeout(timeout, run).await {
        Err(_) => Outcome::Hung,
        Ok(Err(e)) => Outcome::Lost(e),
        Ok(Ok(raw)) => classify(&raw),
    }
}

fn classify(raw: &[u8]) -> Outcome {
    let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Outcome::Lost(format!("no response head ({} bytes)", raw.len()));
    };
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let Some(status) = head.split(' ').nth(1).and_then(|s| s.parse::<u16>().ok()) else {
        return Outcome::Lost("no status".into());
    };
    let mut body = raw[split + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        match dechunk(&body) {
            Some(b) => body = b,
            None => return Outcome::Lost(format!("{status}: a chunked body cut short")),
        }
    }
    let openai_error = |b: &[u8]| {
        serde_json::from_slice::<Value>(b)
            .ok()
            .is_some_and(|v| v["error"]["message"].is_string())
    };
    if !(200..300).contains(&status) {
        return if openai_error(&body) {
            Outcome::Explicit { status }
        } else {
            Outcome::Bare { status }
        };
    }
    if head.contains("text/event-stream") {
        let text = String::from_utf8_lossy(&body);
        let events: Vec<&str> = text
            .split("\n\n")
            .filter(|e| !e.trim().is_empty())
            .collect();
        if events.last().map(|e| e.trim()) != Some("data: [DONE]") {
            return Outcome::Lost("a stream without [DONE]".into());
        }
        let errored = events.iter().any(|e| {
            e.strip_prefix("data: ")
                .is_some_and(|d| openai_error(d.as_bytes()))
        });
        return if errored {
            Outcome::Explicit { status: 200 }
        } else {
            Outcome::Answered
        };
    }
    if serde_json::from_slice::<Value>(&body).is_ok() {
        Outcome::Answered
    } else {
        Outcome::Lost(format!("{status} with a body that does not parse"))
    }
}

fn dechunk(mut wire: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = wire.windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&wire[..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        wire = &wire[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if wire.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&wire[..size]);
        wire = &wire[size + 2..];
    }
}

fn post(path: &str, body: &[u8], extra_headers: &str) -> Vec<u8> {
    let mut out = format!(
        "POST {path} HTTP/1.1\r\nhost: faults\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n{extra_headers}\r\n",
        body.len()
    )
    .into_bytes();
    out.extend_from_slice(body);
    out
}

fn chat_body(max_tokens: u32, stream: bool) -> Vec<u8> {
    serde_json::to_vec(
        &json!({"model": "tiny", "stream": stream, "max_tokens": max_tokens,
        "ignore_eos": true, "messages": [{"role": "user", "content": "Tell me about faults."}]}),
    )
    .expect("JSON")
}

// ---------- seeded fuzz ----------

/// The worker's seeded generator, with the draws the fuzz needs.
struct Rng(llmctl_inference_worker::rng::Rng);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        (self.0.next_u64() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }
}

const FIELDS: &[&str] = &[
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "logprobs",
    "top_logprobs",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "echo",
    "best_of",
    "user",
    "tools",
    "response_format",
    "ignore_eos",
];

fn odd_string(rng: &mut Rng, max_len: usize) -> String {
    const PIECES: &[&str] = &[
        "a",
        "é",
        "漢",
        "🎉",
        "\u{200b}",
        "\u{202e}",
        "\u{feff}",
        "\0",
        "\n",
        "\"",
        "\\",
        "{",
        "</s>",
        "<|im_start|>",
        "<|begin_of_text|>",
        "{{ raise_exception('x') }}",
        "{% for %}",
        "\u{fffd}",
        "𝕏",
        " ",
    ];
    let len = rng.below(max_len + 1);
    let mut s = String::new();
    while s.len() < len {
        let piece: &&str = rng.pick(PIECES);
        s.push_str(piece);
    }
    s
}

fn odd_value(rng: &mut Rng) -> Value {
    match rng.below(14) {
        0 => Value::Null,
        1 => json!(rng.chance(50)),
        2 => json!(*rng.pick(&[
            0i64,
            -1,
            1,
            2,
            255,
            256,
            65_536,
            i32::MAX as i64,
            i64::MAX,
            i64::MIN
        ])),
        3 => json!(*rng.pick(&[0.0f64, -0.0, 1e-320, 1e308, -1e308, 0.5, 2.000_001, 1.0e10])),
        4 => json!(*rng.pick(&[u64::MAX, 1 << 53, (1 << 53) + 1])),
        5 => json!(odd_string(rng, 64)),
        6 => json!(odd_string(rng, 300_000)),
        7 => json!([]),
        8 => json!({}),
        9 => {
            // Deep nesting.
            let depth = 1 + rng.below(3000);
            let mut v = json!(1);
            for _ in 0..depth {
                v = json!([v]);
            }
            v
        }
        10 => json!([odd_string(rng, 20), 1, null, {"a": []}]),
        11 => json!({"type": odd_string(rng, 10), "text": 5}),
        12 => {
            json!([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
        }
        _ => json!([{"role": odd_string(rng, 8), "content": odd_string(rng, 40)}]),
    }
}

/// One fuzz case: the raw request and a short description.
fn fuzz_case(rng: &mut Rng, chat: bool) -> (Vec<u8>, String) {
    let mut body = if chat {
        json!({"model": "tiny", "max_tokens": 1 + rng.below(8), "stream": rng.chance(40),
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": odd_string(rng, 40)}]})
    } else {
        json!({"model": "tiny", "max_tokens": 1 + rng.below(8), "stream": rng.chance(40),
            "prompt": odd_string(rng, 40)})
    };
    let path = if chat {
        "/v1/chat/completions"
    } else {
        "/v1/completions"
    };
    let mut what = Vec::new();
    for _ in 0..1 + rng.below(3) {
        match rng.below(6) {
            0 | 1 => {
                let field = *rng.pick(FIELDS);
                body[field] = odd_value(rng);
                what.push(format!("{field}=odd"));
            }
            2 => {
                let field = *rng.pick(FIELDS);
                if let Some(o) = body.as_object_mut() {
                    o.remove(field);
                }
                what.push(format!("-{field}"));
            }
            3 => {
                body[odd_string(rng, 12)] = odd_value(rng);
                what.push("unknown field".into());
            }
            4 => {
                body["n"] = json!(*rng.pick(&[0, 1, 2, 8, 128, 129, 1_000_000]));
                body["logprobs"] = json!(rng.chance(50));
                body["top_logprobs"] = json!(*rng.pick(&[0, 5, 20, 21, -1]));
                what.push("n/logprobs edges".into());
            }
            _ => {
                body["temperature"] = json!(*rng.pick(&[-1.0, 0.0, 2.0, 2.5, 1e300]));
                body["top_p"] = json!(*rng.pick(&[-0.1, 0.0, 1.0, 1.5]));
                body["stop"] = odd_value(rng);
                what.push("sampling edges".into());
            }
        }
    }
    let mut bytes = serde_json::to_vec(&body).expect("JSON");
    // Raw-level damage, on a share of the cases.
    let mut headers = String::new();
    let mut framed = None;
    // A quarter of the cases are damaged below the API (the HTTP framing itself).
    match rng.below(40) {
        0 => {
            let cut = rng.below(bytes.len());
            bytes.truncate(cut);
            what.push("truncated JSON".into());
        }
        1 => {
            let at = rng.below(bytes.len());
            bytes.insert(at, 0xff);
            what.push("invalid UTF-8".into());
        }
        2 => {
            // Claims more than it sends: the body timeout answers.
            let mut out = format!(
                "POST {path} HTTP/1.1\r\nhost: f\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
                bytes.len() + 10
            )
            .into_bytes();
            out.extend_from_slice(&bytes);
            framed = Some(out);
            what.push("content-length too large".into());
        }
        3 => {
            headers = format!("x-big: {}\r\n", "h".repeat(100_000));
            what.push("100 kB header".into());
        }
        4 => {
            headers = "content-type: text/plain\r\nx-llmctl-priority: \u{7f}\r\n".into();
            what.push("odd headers".into());
        }
        5 => {
            let long = "a".repeat(70_000);
            framed = Some(
                format!("GET /v1/{long} HTTP/1.1\r\nhost: f\r\nconnection: close\r\n\r\n")
                    .into_bytes(),
            );
            what.push("70 kB URL".into());
        }
        6 => {
            framed = Some(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: f\r\ncontent-length: abc\r\nconnection: close\r\n\r\n{}".to_vec(),
            );
            what.push("bad content-length".into());
        }
        7 => {
            let mut out = format!(
                "POST {path} HTTP/1.1\r\nhost: f\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n",
                bytes.len()
            )
            .into_bytes();
            out.extend_from_slice(&bytes);
            out.extend_from_slice(if rng.chance(50) {
                b"\r\n0\r\n\r\n"
            } else {
                b"\r\nzz\r\n"
            });
            framed = Some(out);
            what.push("chunked body".into());
        }
        8 => {
            framed = Some(
                format!(
                    "{} {path} HTTP/1.1\r\nhost: f\r\nconnection: close\r\ncontent-length: 0\r\n\r\n",
                    rng.pick(&["GET", "PUT", "DELETE", "PATCH", "OPTIONS", "BREW"])
                )
                .into_bytes(),
            );
            what.push("other method".into());
        }
        9 => {
            framed = Some(b"\x16\x03\x01\x02\x00garbage that is not HTTP\r\n\r\n".to_vec());
            what.push("not HTTP".into());
        }
        _ => {}
    }
    let request = framed.unwrap_or_else(|| post(path, &bytes, &headers));
    (request, what.join(", "))
}

async fn fuzz(target: &str, addr: &str, cases: usize, seed: u64) -> Row {
    let mut row = Row::new(&format!("fuzz {target} ({cases} cases)"));
    let mut rng = Rng(llmctl_inference_worker::rng::Rng::new(seed));
    let requests: Vec<(Vec<u8>, String)> = (0..cases)
        .map(|i| fuzz_case(&mut rng, i % 3 != 0))
        .collect();
    let results = run_all(requests, 8, {
        let addr = addr.to_owned();
        move |(request, what)| {
            let addr = addr.clone();
            async move {
                let outcome = exchange(&addr, &request, Duration::from_secs(60)).await;
                (outcome, what)
            }
        }
    })
    .await;
    for (outcome, what) in &results {
        row.add(outcome, what);
        if matches!(outcome, Outcome::Explicit { status } | Outcome::Bare { status } if *status >= 500)
            || (std::env::var_os("FAULTS_SHOW_BARE").is_some()
                && matches!(outcome, Outcome::Bare { .. }))
        {
            row.example(format!("{outcome:?}: {what}"));
        }
    }
    row
}

/// Runs `f` over `items` with at most `concurrency` at once; results in order.
async fn run_all<T, R, F, Fut>(items: Vec<T>, concurrency: usize, f: F) -> Vec<R>
where
    T: Send + 'static,
    R: Send + 'static,
    F: Fn(T) -> Fut,
    Fut: std::future::Future<Output = R> + Send + 'static,
{
    let gate = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let mut handles = Vec::new();
    for item in items {
        let permit = gate.clone().acquire_owned().await.expect("open");
        let fut = f(item);
        handles.push(tokio::spawn(async move {
            let r = fut.await;
            drop(permit);
            r
        }));
    }
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("no task panics"));
    }
    out
}

// ---------- the plane under test ----------

struct Plane {
    running: Running,
    gateway: tokio::process::Child,
    gateway_addr: String,
    _dir: tempfile::TempDir,
}

async fn start() -> Result<Plane> {
    let dir = tempfile::tempdir()?;
    let model = llmctl_perf::preset_model(Preset::Tiny, 1)?;
    let exe = std::env::current_exe()?;
    let config = ControllerConfig::parse(
        &format!(
            "listen = \"127.0.0.1:0\"\nlog_dir = \"{}\"\ntick_ms = 100\n\
             [[pools]]\nname = \"tiny\"\nmodels = [\"tiny\"]\n[pools.executor]\nmodel = \"{}\"\n\
             args = [\"--kv-cache-mib\", \"32\", \"--body-read-timeout-secs\", \"2\", \"--header-read-timeout-secs\", \"2\"]\n\
             max_concurrency = 8\ndrain_grace_secs = 2\n\
             [pools.scaling]\nmin_warm = 2\nmax_replicas = 2\n",
            dir.path().join("logs").display(),
            model.display()
        ),
        "faults",
    )?;
    let running = controller::start(config, exe.clone()).await?;
    let gateway_config = dir.path().join("gateway.toml");
    std::fs::write(
        &gateway_config,
        format!(
            "listen = \"127.0.0.1:0\"\nopen = true\nheader_read_timeout_ms = 2000\nbody_read_timeout_ms = 2000\n\
             write_stall_timeout_ms = 3000\n[queue]\ndeadline_ms = 30000\n\
             [controller]\nurl = \"http://{}\"\nreport_interval_ms = 100\n\
             [[pools]]\nname = \"tiny\"\nmodels = [\"tiny\"]\n",
            running.addr
        ),
    )?;
    let mut gateway = tokio::process::Command::new(&exe)
        .args([
            "gateway",
            "--config",
            gateway_config.to_str().context("path")?,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(dir.path().join("gateway.log"))?)
        .kill_on_drop(true)
        .spawn()?;
    let mut line = String::new();
    use tokio::io::AsyncBufReadExt;
    tokio::io::BufReader::new(gateway.stdout.take().context("stdout")?)
        .read_line(&mut line)
        .await?;
    let v: Value = serde_json::from_str(&line).with_context(|| format!("gateway said {line:?}"))?;
    let gateway_addr = v["addr"].as_str().context("addr")?.to_owned();
    let plane = Plane {
        running,
        gateway,
        gateway_addr,
        _dir: dir,
    };
    plane.wait_ready(2).await?;
    Ok(plane)
}

impl Plane {
    fn pool(&self) -> Result<llmctl_pool_controller::reconciler::PoolStatus> {
        self.running.controller.pool("tiny").context("pool")
    }

    async fn wait_ready(&self, n: u32) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let s = self.pool()?;
            if s.ready == n && s.starting == 0 && s.endpoints.len() == n as usize {
                // The gateway follows within a report interval.
                tokio::time::sleep(Duration::from_millis(500)).await;
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the pool never had {n} ready executors: {s:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn executor(&self, i: usize) -> Result<(String, i32)> {
        let s = self.pool()?;
        let e = s
            .executors
            .iter()
            .filter(|e| e.phase == "ready")
            .nth(i)
            .context("a ready executor")?;
        Ok((
            e.endpoint.clone().context("endpoint")?,
            e.pid.context("pid")? as i32,
        ))
    }

    /// 1 when the gateway process is gone or does not answer `/healthz`, else 0.
    async fn crashes(&mut self) -> usize {
        let alive = matches!(self.gateway.try_wait(), Ok(None));
        usize::from(!alive || !healthy(&self.gateway_addr, "/healthz").await)
    }
}

/// `GET path` answers 200 within 5 s.
async fn healthy(addr: &str, path: &str) -> bool {
    let run = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.ok()?;
        let request = format!("GET {path} HTTP/1.1\r\nhost: f\r\nconnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.ok()?;
        let mut out = Vec::new();
        tcp.read_to_end(&mut out).await.ok()?;
        Some(out.starts_with(b"HTTP/1.1 200"))
    };
    tokio::time::timeout(Duration::from_secs(5), run)
        .await
        .ok()
        .flatten()
        .unwrap_or(false)
}

/// Ordinary requests, sent `concurrency` at a time through the gateway.
async fn ordinary(
    addr: &str,
    n: usize,
    concurrency: usize,
    max_tokens: u32,
    timeout: Duration,
) -> Vec<Outcome> {
    let addr = addr.to_owned();
    run_all((0..n).collect(), concurrency, move |i: usize| {
        let addr = addr.clone();
        async move {
            let request = post(
                "/v1/chat/completions",
                &chat_body(max_tokens, i.is_multiple_of(2)),
                "",
            );
            exchange(&addr, &request, timeout).await
        }
    })
    .await
}

fn tally(row: &mut Row, outcomes: &[Outcome], what: &str) {
    for o in outcomes {
        row.add(o, what);
    }
}

async fn stalled_readers(plane: &Plane) -> Result<Row> {
    let mut row = Row::new("stalled readers (16) then 20 requests");
    let mut held = Vec::new();
    for _ in 0..16 {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.set_recv_buffer_size(4096)?;
        let mut tcp = socket.connect(plane.gateway_addr.parse()?).await?;
        tcp.write_all(&post("/v1/chat/completions", &chat_body(200, true), ""))
            .await?;
        held.push(tcp);
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let outcomes = ordinary(&plane.gateway_addr, 20, 4, 16, Duration::from_secs(30)).await;
    tally(&mut row, &outcomes, "a request behind stalled readers");
    row.note = format!(
        "20 requests took {:.1} s with 16 stalled readers holding their streams",
        started.elapsed().as_secs_f64()
    );
    drop(held);
    Ok(row)
}

async fn idle_flood(plane: &Plane) -> Result<Row> {
    let mut row = Row::new("idle flood (500) and slowloris (20)");
    let gateway_pid = plane.gateway.id().context("gateway pid")? as i32;
    let rss_before = rss_kib(gateway_pid);
    let mut idle = Vec::new();
    for _ in 0..500 {
        idle.push(tokio::net::TcpStream::connect(&plane.gateway_addr).await?);
    }
    let mut slow = Vec::new();
    for _ in 0..20 {
        let addr = plane.gateway_addr.clone();
        slow.push(tokio::spawn(async move {
            let Ok(mut tcp) = tokio::net::TcpStream::connect(&addr).await else {
                return false;
            };
            let started = Instant::now();
            for b in b"POST /v1/chat/completions HTTP/1.1\r\nhost: slow\r\n"
                .iter()
                .cycle()
            {
                if tcp.write_all(&[*b]).await.is_err()
                    || started.elapsed() > Duration::from_secs(20)
                {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            started.elapsed() < Duration::from_secs(20)
        }));
    }
    let outcomes = ordinary(&plane.gateway_addr, 20, 4, 16, Duration::from_secs(30)).await;
    tally(&mut row, &outcomes, "a request during the flood");
    let rss_during = rss_kib(gateway_pid);
    // Every idle connection must be closed by the gateway (header timeout 2 s).
    let mut closed = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    for mut tcp in idle {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut buf = [0u8; 64];
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(left, tcp.read(&mut buf)).await {
            closed += 1;
        }
    }
    let mut slow_cut = 0;
    for s in slow {
        if s.await.unwrap_or(false) {
            slow_cut += 1;
        }
    }
    if closed < 500 || slow_cut < 20 {
        row.lost += (500 - closed) + (20 - slow_cut);
        row.example(format!(
            "connections the gateway kept: idle {}, slowloris {}",
            500 - closed,
            20 - slow_cut
        ));
    }
    row.note = format!(
        "closed by the gateway: {closed}/500 idle, {slow_cut}/20 slowloris; gateway RSS {} -> {} MiB",
        rss_before / 1024,
        rss_during / 1024
    );
    Ok(row)
}

/// One value from the gateway's `/metrics`.
async fn gateway_metric(addr: &str, name: &str) -> f64 {
    let Ok(r) = llmctl_perf::http_request(addr, "GET", "/metrics", Vec::new()).await else {
        return 0.0;
    };
    use http_body_util::BodyExt;
    let Ok(body) = r.into_body().collect().await else {
        return 0.0;
    };
    String::from_utf8_lossy(&body.to_bytes())
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// CPU seconds a process has used (user + system).
fn cpu_secs(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11..13).map_or(0.0, |f| {
        f.iter().filter_map(|v| v.parse::<f64>().ok()).sum()
    });
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks / hz.max(1.0)
}

async fn fd_exhaustion(plane: &Plane) -> Result<(Row, f64)> {
    let mut row = Row::new("fd exhaustion (gateway)");
    let pid = plane.gateway.id().context("gateway pid")? as i32;
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count() as u64;
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    let tight = libc::rlimit {
        rlim_cur: open + 4,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit on our own child with valid structs.
    let set = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, std::ptr::null(), &mut old) };
    anyhow::ensure!(set == 0, "reading the gateway's descriptor limit failed");
    let tight = libc::rlimit {
        rlim_max: old.rlim_max,
        ..tight
    };
    // SAFETY: as above.
    let set = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &tight, std::ptr::null_mut()) };
    anyhow::ensure!(set == 0, "lowering the gateway's descriptor limit failed");
    let mut flood = Vec::new();
    for _ in 0..64 {
        if let Ok(tcp) = tokio::net::TcpStream::connect(&plane.gateway_addr).await {
            flood.push(tcp);
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let cpu0 = cpu_secs(pid);
    let t0 = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let cpu_share = (cpu_secs(pid) - cpu0) / t0.elapsed().as_secs_f64();
    drop(flood);
    // SAFETY: as above.
    unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &old, std::ptr::null_mut()) };
    // The connections held while exhausted close on the client side; the gateway drops them
    // at its header timeout. Service must resume at once.
    let started = Instant::now();
    let outcomes = ordinary(&plane.gateway_addr, 8, 4, 16, Duration::from_secs(30)).await;
    tally(&mut row, &outcomes, "a request after exhaustion");
    let accept_errors = gateway_metric(
        &plane.gateway_addr,
        "llmctl_gateway_http_accept_errors_total",
    )
    .await;
    if accept_errors < 1.0 {
        row.lost += 1;
        row.example("the gateway never ran out of descriptors: the scenario tested nothing".into());
    }
    row.note = format!(
        "gateway CPU while exhausted {:.1}% of a core ({accept_errors} accept errors, backed off); 8 requests after it took {:.2} s",
        cpu_share * 100.0,
        started.elapsed().as_secs_f64()
    );
    Ok((row, cpu_share))
}

/// Load through the gateway while `fault` hits executor 0 once requests run on it.
async fn under_load(plane: &Plane, scenario: &str, signal: i32) -> Result<Row> {
    let mut row = Row::new(scenario);
    let (_, pid) = plane.executor(0)?;
    let restarts = plane.pool()?.restarts;
    let addr = plane.gateway_addr.clone();
    let load =
        tokio::spawn(async move { ordinary(&addr, 60, 12, 128, Duration::from_secs(120)).await });
    let deadline = Instant::now() + Duration::from_secs(30);
    while plane.pool()?.in_flight < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // SAFETY: kill(2) on a worker pid the controller reported.
    unsafe { libc::kill(pid, signal) };
    let started = Instant::now();
    let outcomes = load.await?;
    tally(&mut row, &outcomes, scenario);
    if signal == libc::SIGSTOP {
        // SAFETY: as above; the controller has killed it by now, or it resumes.
        unsafe { libc::kill(pid, libc::SIGCONT) };
    }
    let load_ended = started.elapsed();
    let deadline = Instant::now() + Duration::from_secs(120);
    while plane.pool()?.restarts == restarts {
        anyhow::ensure!(Instant::now() < deadline, "{scenario}: never replaced");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let replaced = started.elapsed();
    plane.wait_ready(2).await?;
    row.note = format!(
        "load ended {:.1} s after the fault; the executor was replaced after {:.1} s",
        load_ended.as_secs_f64(),
        replaced.as_secs_f64()
    );
    Ok(row)
}

async fn campaign(args: Args) -> Result<bool> {
    let mut plane = start().await?;
    let mut rows = Vec::new();

    let mut row = fuzz("gateway", &plane.gateway_addr, args.fuzz, args.seed).await;
    row.crashes = plane.crashes().await;
    rows.push(row);
    let (worker, _) = plane.executor(0)?;
    let failures_before = plane.pool()?.failures;
    let mut row = fuzz("worker", &worker, args.fuzz, args.seed + 1).await;
    row.crashes = (plane.pool()?.failures - failures_before) as usize;
    if !healthy(&worker, "/health").await {
        row.crashes += 1;
    }
    rows.push(row);

    for scenario in [stalled_readers(&plane).await?, idle_flood(&plane).await?] {
        let mut row = scenario;
        row.crashes = plane.crashes().await;
        rows.push(row);
    }
    let (mut row, cpu_share) = fd_exhaustion(&plane).await?;
    row.crashes = plane.crashes().await;
    rows.push(row);
    for (name, signal) in [
        ("kill -9 of an executor under load (60)", libc::SIGKILL),
        ("SIGSTOP of an executor under load (60)", libc::SIGSTOP),
    ] {
        let mut row = under_load(&plane, name, signal).await?;
        row.crashes = plane.crashes().await;
        rows.push(row);
    }

    let mut table = String::from(
        "| scenario | tried | answered | explicit errors | bare HTTP errors | lost | hung | 5xx | crashes | note |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let mut failed = cpu_share > 0.05;
    for r in &rows {
        table += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.scenario,
            r.tried,
            r.answered,
            r.explicit,
            r.bare,
            r.lost,
            r.hung,
            r.status_5xx,
            r.crashes,
            r.note
        );
        failed |= r.lost > 0 || r.hung > 0 || r.crashes > 0;
        failed |= r.scenario.starts_with("fuzz") && (r.status_5xx > 0 || r.bare > 0);
    }
    println!("{table}");
    for r in &rows {
        for e in &r.examples {
            println!("{}: {e}", r.scenario);
        }
    }
    if args.record {
        let text = format!(
            "# Fault campaign, {}\n\nMachine: {}\n\nCommand: `cargo run -p llmctl-perf --bin faults -- --fuzz {} --seed {} --record`\n\n{table}\n\
             Bare HTTP errors would be errors without an OpenAI body (hyper answers malformed HTTP itself; `http-server` gives those answers an OpenAI body).\n",
            llmctl_perf::today(),
            llmctl_perf::machine(),
            args.fuzz,
            args.seed
        );
        let path = llmctl_perf::record("faults-cpu", &text)?;
        println!("recorded in {}", path.display());
    }
    let Plane {
        running,
        mut gateway,
        ..
    } = plane;
    let _ = gateway.kill().await;
    running.shutdown().await;
    Ok(failed)
}
