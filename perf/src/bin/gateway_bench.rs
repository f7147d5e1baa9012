//! Gateway benchmark: the same upstream (nginx answering a static OpenAI chat completion)
//! reached three ways in one run — directly, through nginx as a plain reverse proxy, and
//! through the llmctl gateway with auth, rate limits, the queue and metrics all on. Reports
//! requests/s at saturation (closed loop, keep-alive connections) and p50/p99 latency at a fixed
//! request rate (open loop: latency counts from each request's scheduled send time, so a stalled
//! server cannot hide its queueing — no coordinated omission). Then holds 10,000 requests in the
//! gateway's queue and reports its RSS.
//!
//! `cargo run --release -p llmctl-perf --bin gateway_bench -- [--record]`
//! (installs Debian's `nginx-light` with apt-get when no `nginx` is found).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

#[derive(Parser)]
struct Args {
    /// Seconds per saturation measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Closed-loop connections for the saturation measurement.
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Open-loop request rate for the latency measurement.
    #[arg(long, default_value_t = 500)]
    rate: u64,
    /// Requests held in the gateway's queue for the memory measurement (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    queued: usize,
    /// Saturation rounds; targets take turns each round and the median counts (this shared
    /// machine drifts by tens of percent between minutes).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Request body sizes (bytes) for the proxy-cost table: nginx as a reverse proxy and the
    /// gateway at saturation with each (long agent contexts); `--sizes 0` skips it.
    #[arg(long, value_delimiter = ',', default_value = "100,100000,400000")]
    sizes: Vec<usize>,
    #[arg(long)]
    record: bool,
}

/// A chat request of about `size` bytes: a system message of filler, then a short question.
fn request_of_size(size: usize) -> Bytes {
    let (head, tail) = (
        r#"{"model":"m","messages":[{"role":"system","content":""#,
        r#""},{"role":"user","content":"Hello there, how are you?"}],"max_tokens":16}"#,
    );
    let filler: String = "lorem ipsum dolor sit amet, "
        .chars()
        .cycle()
        .take(size.saturating_sub(head.len() + tail.len()))
        .collect();
    Bytes::from(format!("{head}{filler}{tail}"))
}

const RESPONSE: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?","refusal":null},"logprobs":null,"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":9,"total_tokens":18}}"#;
const REQUEST: &str = r#"{"model":"m","messages":[{"role":"user","content":"Hello there, how are you?"}],"max_tokens":16}"#;
const KEY: &str = "bench-key";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nginx() -> Result<PathBuf> {
    for p in ["/usr/sbin/nginx", "/usr/bin/nginx"] {
        if Path::new(p).exists() {
            return Ok(p.into());
        }
    }
    eprintln!("nginx not found: installing nginx-light with apt-get");
    let ok = Command::new("sh")
        .args(["-c", "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light"])
        .status()?
        .success();
    if !ok || !Path::new("/usr/sbin/nginx").exists() {
        bail!("could not install nginx-light; install it and run again");
    }
    Ok("/usr/sbin/nginx".into())
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn start_nginx(bin: &Path, dir: &Path, name: &str, body: &str) -> Result<Proc> {
    let prefix = dir.join(name);
    std::fs::create_dir_all(prefix.join("logs"))?;
    let conf = format!(
        "worker_processes 1;\ndaemon off;\nmaster_process off;\nuser root;\npid {p}/nginx.pid;\nerror_log stderr error;\n\
         events {{ worker_connections 16384; }}\n\
         http {{\n access_log off;\n client_body_temp_path {p}/body;\n proxy_temp_path {p}/proxy;\n keepalive_requests 1000000;\n{body}\n}}\n",
        p = prefix.display()
    );
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let child = Command::new(bin)
        .args(["-p"])
        .arg(&prefix)
        .arg("-c")
        .arg(&conf_path)
        .stderr(Stdio::null())
        .spawn()?;
    Ok(Proc(child))
}

async fn wait_port(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        if Instant::now() > deadline {
            bail!("nothing listens on {port}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

async fn connect(port: u16) -> Result<Sender> {
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn one(sender: &mut Sender, body: &Bytes) -> Result<()> {
    sender.ready().await?;
    let req = hyper::Request::builder()
        .method("POST")
        .uri("/v1/chat/completions")
        .header("host", "bench")
        .header("content-type", "application/json")
        .header("authorization", format!("Bearer {KEY}"))
        .body(Full::new(body.clone()))?;
    let r = sender.send_request(req).await?;
    let status = r.status();
    r.into_body().collect().await?;
    if status != 200 {
        bail!("status {status}");
    }
    Ok(())
}

/// Closed loop: `connections` clients each sending `body` back to back for `seconds`.
async fn saturate(port: u16, connections: usize, seconds: u64, body: &Bytes) -> Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let mut s = connect(port).await?;
        let (stop, done, body) = (stop.clone(), done.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if one(&mut s, &body).await.is_err() {
                    return;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await; // warm up
    let (start_count, start) = (done.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let rate = (done.load(Ordering::Relaxed) - start_count) as f64 / start.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    Ok(rate)
}

/// Open loop at `rate` requests/s for `seconds`; latencies from the scheduled send time.
async fn fixed_rate(port: u16, rate: u64, seconds: u64) -> Result<(f64, f64, usize)> {
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let rx: Schedule = Arc::new(tokio::sync::Mutex::new(rx));
    let total = (rate * seconds) as usize;
    let latencies = Arc::new(std::sync::Mutex::new(Vec::with_capacity(total)));
    let mut workers = Vec::new();
    for _ in 0..256 {
        let rx = rx.clone();
        let latencies = latencies.clone();
        let mut sender = connect(port).await?;
        let request = Bytes::from_static(REQUEST.as_bytes());
        workers.push(tokio::spawn(async move {
            while let Ok(scheduled) = recv(&rx).await {
                if one(&mut sender, &request).await.is_ok() {
                    let l = scheduled.elapsed().as_secs_f64();
                    latencies.lock().expect("latency lock").push(l);
                }
            }
        }));
    }
    // The schedule runs on its own OS thread: nanosleep is precise to tens of microseconds,
    // tokio's timer only to a millisecond, which would swamp sub-millisecond latencies.
    let scheduler = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let gap = Duration::from_secs_f64(1.0 / rate as f64);
        for i in 0..total {
            let at = start + gap * i as u32;
            if let Some(wait) = at.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            if tx.blocking_send(at).is_err() {
                return;
            }
        }
    });
    scheduler.await?;
    for w in workers {
        let _ = w.await;
    }
    let mut l = latencies.lock().expect("latency lock").clone();
    l.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        l.get(((l.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or(f64::NAN)
            * 1e3
    };
    Ok((pct(0.5), pct(0.99), total - l.len()))
}

type Schedule = Arc<tokio::sync::Mutex<tokio::sync::mpsc::Receiver<Instant>>>;

/// The next scheduled send time, shared by all workers (tokio has no multi-consumer channel).
async fn recv(rx: &Schedule) -> Result<Instant, ()> {
    rx.lock().await.recv().await.ok_or(())
}

/// The gateway binary next to this one, built (or found up to date) by cargo first so a stale
/// binary is never measured.
/// The gateway binary: `LLMCTL_GATEWAY_BIN` when set (to compare a build of another commit),
/// else this tree's, built first.
fn gateway_bin() -> Result<PathBuf> {
    if let Some(bin) = std::env::var_os("LLMCTL_GATEWAY_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe()?;
    let status = Command::new("cargo")
        .args([
            "build",
            "--release",
            "-p",
            "llmctl-gateway",
            "--bin",
            "llmctl-gateway",
        ])
        .status()?;
    if !status.success() {
        bail!("building llmctl-gateway failed");
    }
    Ok(exe.with_file_name("llmctl-gateway"))
}

/// Starts the gateway with `threads` runtime threads (1: a current-thread runtime).
fn start_gateway(
    dir: &Path,
    upstream_port: u16,
    concurrency: usize,
    max_queue: usize,
    threads: usize,
    tokens_per_minute: Option<u32>,
) -> Result<(Proc, u16)> {
    use sha2::Digest;
    let key_hash = hex::encode(sha2::Sha256::digest(KEY.as_bytes()));
    let tpm = tokens_per_minute.map_or(String::new(), |t| format!("tokens_per_minute = {t}\n"));
    let config = format!(
        "listen = \"127.0.0.1:0\"\n[[tenants]]\nname = \"bench\"\nrequests_per_minute = 100000000\n{tpm}keys = [\"{key_hash}\"]\n\
         [[pools]]\nname = \"p\"\nmodels = [\"m\"]\n[[pools.endpoints]]\naddress = \"127.0.0.1:{upstream_port}\"\nmax_concurrency = {concurrency}\n\
         [queue]\nmax_size = {max_queue}\ntenant_share = 1.0\ndeadline_ms = 600000\n"
    );
    let path = dir.join(format!(
        "gateway-{concurrency}-{threads}-{}.toml",
        tokens_per_minute.is_some()
    ));
    std::fs::write(&path, config)?;
    let mut child = Command::new(gateway_bin()?)
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "warn")
        .env("TOKIO_WORKER_THREADS", threads.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let port: u16 = llmctl_perf::listening_addr(&mut child)?
        .rsplit(':')
        .next()
        .context("port")?
        .parse()?;
    Ok((Proc(child), port))
}

/// Saturation of nginx as a reverse proxy and of the gateway (1 thread) with request bodies of
/// each size in `args.sizes`, rounds interleaved, medians kept: the gateway's proxy cost must
/// not grow with the prompt. The gateway here has no tokens-per-minute limit (a 400 KB body is
/// charged ~100k tokens; any limit would refuse long before saturation); requests-per-minute,
/// auth, the queue and metrics stay on.
async fn proxy_cost(args: &Args, dir: &Path, up_port: u16, proxy_port: u16) -> Result<String> {
    let (_gateway, gw_port) = start_gateway(dir, up_port, 100_000, 100_000, 1, None)?;
    wait_port(gw_port).await?;
    let mut out = format!(
        "\nProxy cost by request body size (req/s at saturation, {} conns, median of {} rounds; nginx buffers bodies up to 512 KiB in memory):\n\n| body bytes | nginx proxy (1 worker) | llmctl gateway (1 thread) | gateway / nginx |\n|---:|---:|---:|---:|\n",
        args.connections, args.rounds
    );
    for &size in args.sizes.iter().filter(|&&s| s > 0) {
        let body = request_of_size(size);
        let (mut nginx, mut gateway) = (Vec::new(), Vec::new());
        for round in 0..args.rounds.max(1) {
            let n = saturate(proxy_port, args.connections, args.seconds, &body).await?;
            let g = saturate(gw_port, args.connections, args.seconds, &body).await?;
            eprintln!(
                "round {round}: {} bytes: nginx {n:.0} req/s, gateway {g:.0} req/s",
                body.len()
            );
            nginx.push(n);
            gateway.push(g);
        }
        let (n, g) = (median(nginx), median(gateway));
        out.push_str(&format!(
            "| {} | {n:.0} | {g:.0} | {:.2} |\n",
            body.len(),
            g / n
        ));
    }
    Ok(out)
}

/// The middle of the rounds' figures (this shared machine drifts between minutes).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("VmRSS")?
        .split_whitespace()
        .nth(1)
        .context("value")?
        .parse()?;
    Ok(kb / 1024.0)
}

/// Holds `n` requests in a gateway whose only executor never answers; returns RSS before and
/// with them queued.
async fn queue_memory(dir: &Path, n: usize) -> Result<(f64, f64, usize)> {
    // An executor that accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let silent_port = silent.local_addr()?.port();
    let hold = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            conns.push(s);
        }
    });
    let (gw, port) = start_gateway(dir, silent_port, 1, n + 10, 2, Some(2_000_000_000))?;
    let pid = gw.0.id();
    wait_port(port).await?;
    let before = rss_mib(pid)?;
    // HTTP/2: many streams per connection, so 10,000 requests need no 10,000 sockets.
    let per_conn = 100;
    let mut tasks = Vec::new();
    for c in 0..n.div_ceil(per_conn) {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        let (sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await?;
        tokio::spawn(conn);
        for _ in 0..per_conn.min(n - c * per_conn) {
            let mut sender = sender.clone();
            tasks.push(tokio::spawn(async move {
                let req = hyper::Request::builder()
                    .method("POST")
                    .uri(format!("http://127.0.0.1:{port}/v1/chat/completions"))
                    .header("content-type", "application/json")
                    .header("authorization", format!("Bearer {KEY}"))
                    .body(Full::new(Bytes::from_static(REQUEST.as_bytes())))
                    .expect("static request");
                let _ = sender.send_request(req).await;
            }));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut depth = 0;
    while Instant::now() < deadline {
        let mut s = connect(port).await?;
        let req = hyper::Request::builder()
            .uri("/metrics")
            .header("host", "b")
            .body(Full::new(Bytes::new()))?;
        let text = String::from_utf8(
            s.send_request(req)
                .await?
                .into_body()
                .collect()
                .await?
                .to_bytes()
                .to_vec(),
        )?;
        depth = text
            .lines()
            .find_map(|l| l.strip_prefix("llmctl_gateway_queue_depth{pool=\"p\"} "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as usize;
        if depth + 1 >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let with = rss_mib(pid)?;
    for t in tasks {
        t.abort();
    }
    hold.abort();
    Ok((before, with, depth))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let nginx = nginx()?;
    let dir = tempfile::tempdir()?;
    let up_port = free_port()?;
    let _upstream = start_nginx(
        &nginx,
        dir.path(),
        "upstream",
        &format!(
            " server {{ listen 127.0.0.1:{up_port}; location / {{ default_type application/json; return 200 '{}'; }} }}",
            RESPONSE.replace('\'', "\\'")
        ),
    )?;
    let proxy_port = free_port()?;
    let _proxy = start_nginx(
        &nginx,
        dir.path(),
        "proxy",
        &format!(
            " upstream up {{ server 127.0.0.1:{up_port}; keepalive 512; }}\n server {{ listen 127.0.0.1:{proxy_port}; client_max_body_size 8m; client_body_buffer_size 512k; location / {{ proxy_pass http://up; proxy_http_version 1.1; proxy_set_header Connection \"\"; }} }}"
        ),
    )?;
    // One gateway thread is the same CPU allowance as nginx's one worker; two for reference.
    let (_gateway1, gw1_port) = start_gateway(
        dir.path(),
        up_port,
        100_000,
        100_000,
        1,
        Some(2_000_000_000),
    )?;
    let (_gateway2, gw2_port) = start_gateway(
        dir.path(),
        up_port,
        100_000,
        100_000,
        2,
        Some(2_000_000_000),
    )?;
    for p in [up_port, proxy_port, gw1_port, gw2_port] {
        wait_port(p).await?;
    }
    let targets = [
        ("upstream direct", up_port),
        ("nginx proxy (1 worker)", proxy_port),
        ("llmctl gateway (1 thread)", gw1_port),
        ("llmctl gateway (2 threads)", gw2_port),
    ];
    let request = Bytes::from_static(REQUEST.as_bytes());
    let mut sats: Vec<Vec<f64>> = vec![Vec::new(); targets.len()];
    for round in 0..args.rounds.max(1) {
        for (i, (name, port)) in targets.iter().enumerate() {
            let sat = saturate(*port, args.connections, args.seconds, &request).await?;
            eprintln!("round {round}: {name}: {sat:.0} req/s");
            sats[i].push(sat);
        }
    }
    // Latency rounds interleave the targets too, so a noisy moment on this shared machine
    // lands on one round of one target, not on a whole target; the medians count.
    let mut lats: Vec<Vec<(f64, f64, usize)>> = vec![Vec::new(); targets.len()];
    for round in 0..args.rounds.max(1) {
        for (i, (name, port)) in targets.iter().enumerate() {
            let (p50, p99, lost) = fixed_rate(*port, args.rate, args.seconds).await?;
            eprintln!(
                "round {round}: {name}: at {} req/s p50 {p50:.3} ms p99 {p99:.3} ms ({lost} failed)",
                args.rate
            );
            lats[i].push((p50, p99, lost));
        }
    }
    let mut rows = Vec::new();
    for (i, (name, _)) in targets.into_iter().enumerate() {
        let sat = median(sats[i].clone());
        let p50 = median(lats[i].iter().map(|l| l.0).collect());
        let p99 = median(lats[i].iter().map(|l| l.1).collect());
        let lost = lats[i].iter().map(|l| l.2).sum::<usize>();
        rows.push((name, sat, p50, p99, lost));
    }
    let nginx_sat = rows[1].1;
    let mut table = format!(
        "| target | req/s at saturation ({} conns, median of rounds) | vs nginx | p50 ms @ {} req/s (median of rounds) | p99 ms @ {} req/s (median of rounds) | failed (all rounds) |\n|---|---:|---:|---:|---:|---:|\n",
        args.connections, args.rate, args.rate
    );
    for (name, sat, p50, p99, lost) in &rows {
        table.push_str(&format!(
            "| {name} | {sat:.0} | {:.2} | {p50:.3} | {p99:.3} | {lost} |\n",
            sat / nginx_sat
        ));
    }
    if args.queued > 0 {
        let (before, with, depth) = queue_memory(dir.path(), args.queued).await?;
        table.push_str(&format!(
            "\nGateway RSS: {before:.1} MiB idle, {with:.1} MiB with {depth} requests waiting in the queue (over HTTP/2, 100 streams per connection).\n"
        ));
    }
    if args.sizes.iter().any(|&s| s > 0) {
        table.push_str(&proxy_cost(&args, dir.path(), up_port, proxy_port).await?);
    }
    println!("{table}");
    if args.record {
        let (date, machine) = (llmctl_perf::today(), llmctl_perf::machine());
        let nginx_version =
            String::from_utf8_lossy(&Command::new(&nginx).arg("-v").output()?.stderr)
                .trim()
                .to_owned();
        let text = format!(
            "# Gateway benchmark, {date}\n\n- machine: {machine}, shared by the load generator, the upstream and the proxy under test\n\
             - command: `cargo run --release -p llmctl-perf --bin gateway_bench -- --seconds {} --connections {} --rate {} --queued {} --rounds {} --record`\n\
             - upstream: {nginx_version} (1 worker) returning a static chat completion; nginx proxy: 1 worker, keepalive upstream; llmctl gateway: auth, rate limits (high), queue and metrics on, with 1 runtime thread (current-thread runtime: the same CPU allowance as nginx's one worker) and with 2; per-request logs off in both (nginx `access_log off`, gateway `RUST_LOG=warn`)\n\n{table}\n",
            args.seconds, args.connections, args.rate, args.queued, args.rounds
        );
        let path = llmctl_perf::record("gateway", &text)?;
        eprintln!("recorded {}", path.display());
    }
    Ok(())
}
