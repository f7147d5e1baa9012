//! The worker's OpenAI-compatible HTTP server (hyper 1, HTTP/1.1 and HTTP/2): routes,
//! body limits, readiness and the SIGTERM drain. The listener is bound before the model loads,
//! and its address is printed as one JSON line on stdout (`{"event":"listening","addr":...}`),
//! so a supervisor that started us on port 0 never guesses; `/health` answers 503 until the
//! model is ready. Handlers live in `openai` (completions) and here (models, health, metrics).

pub mod body;
pub mod engine_loop;
pub mod error;
pub mod lifecycle;
pub mod metrics;
pub mod openai;
pub mod validate;

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use llmctl_http_server::{BodyError, Limits, Refusal, Server};
use llmctl_protocol::{ChatCompletionRequest, CompletionRequest, Model, ModelList};
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tracing::Instrument;

use crate::backend::cpu::CpuBackend;
use crate::engine::{Engine, EngineConfig};
use body::Body;
use engine_loop::EngineHandle;
use error::ServerError;
use lifecycle::Lifecycle;
use metrics::Metrics;
use openai::Endpoint;

/// `llmctl worker` / `llmctl-worker` options.
#[derive(Clone, Debug, clap::Args)]
pub struct WorkerArgs {
    /// Hugging Face model folder.
    #[arg(long, env = "LLMCTL_MODEL")]
    pub model: PathBuf,
    #[arg(long, env = "LLMCTL_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on; 0 picks a free one (the bound address is printed on stdout).
    #[arg(long, env = "LLMCTL_PORT", default_value_t = 8000)]
    pub port: u16,
    /// Model name served in `/v1/models` and required in requests; default: the folder's name.
    #[arg(long, env = "LLMCTL_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Seconds running requests get to finish after SIGTERM.
    #[arg(long, default_value_t = 30)]
    pub drain_grace_secs: u64,
    /// Largest request body accepted, in bytes.
    #[arg(long, default_value_t = 8 << 20)]
    pub max_body_bytes: usize,
    /// Seconds a connection gets for its first request head (or HTTP/2 preface).
    #[arg(long, default_value_t = 10)]
    pub header_read_timeout_secs: u64,
    /// Seconds a request body gets to arrive whole (a trickled body is refused with 408).
    #[arg(long, default_value_t = 30)]
    pub body_read_timeout_secs: u64,
    /// Seconds a connection with no request in flight stays open.
    #[arg(long, default_value_t = 75)]
    pub idle_timeout_secs: u64,
    /// Seconds a client may accept no bytes of its response before it is cut off.
    #[arg(long, default_value_t = 30)]
    pub write_stall_timeout_secs: u64,
    /// Connections open at once; more are refused with 503.
    #[arg(long, default_value_t = 4096)]
    pub max_connections: usize,
    /// KV cache size in MiB.
    #[arg(long, default_value_t = 512)]
    pub kv_cache_mib: usize,
    #[arg(long, default_value_t = 256)]
    pub max_num_seqs: usize,
    #[arg(long, default_value_t = 2048)]
    pub max_num_batched_tokens: usize,
    /// Longest prompt plus completion; default: the model's.
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Where the forward pass runs: `auto` (the first CUDA GPU if one can be used, else the
    /// CPU), `cpu`, or `cuda[:N]`.
    #[arg(long, env = "LLMCTL_DEVICE", default_value = "auto")]
    pub device: Device,
    /// On CUDA: the share of the GPU's memory the worker may fill (weights, activations and the
    /// KV cache, which gets what the weights leave); `--kv-cache-mib` is then ignored.
    #[arg(long, default_value_t = 0.9)]
    pub gpu_memory_utilization: f64,
    /// On CUDA: replay decode steps of up to 256 sequences from CUDA graphs recorded per
    /// batch-size bucket (`--cuda-graphs false` runs every step op by op).
    #[arg(long, env = "LLMCTL_CUDA_GRAPHS", default_value_t = true, action = clap::ArgAction::Set)]
    pub cuda_graphs: bool,
    /// On CUDA: single-token steps (batch-1 decode) build each sublayer's input as
    /// two fused GEMV kernels instead of cuBLAS and separate residual, norm, rotary/KV-write
    /// and SiLU kernels (`--fused-gemv false` keeps the separate ones).
    #[arg(long, env = "LLMCTL_FUSED_GEMV", default_value_t = true, action = clap::ArgAction::Set)]
    pub fused_gemv: bool,
    /// Draw each token where the logits are (on CUDA: the argmax, softmax, top-k and logprobs
    /// on the GPU, a few values per sequence copied back); `--device-sampling false` copies every
    /// step's logits to the host sampler.
    #[arg(long, env = "LLMCTL_DEVICE_SAMPLING", default_value_t = true, action = clap::ArgAction::Set)]
    pub device_sampling: bool,
}

/// Where the forward pass runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Auto,
    Cpu,
    Cuda(usize),
}

/// As `--device` takes it.
impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl std::str::FromStr for Device {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device `{s}` (auto, cpu, cuda, cuda:N)")),
        }
    }
}

/// Whether a CUDA driver with at least one device can be used here.
fn cuda_present() -> bool {
    // SAFETY: only tries to dlopen the driver library by its known names.
    let driver = unsafe { cudarc::driver::sys::is_culib_present() };
    driver && cudarc::driver::CudaContext::device_count().is_ok_and(|n| n > 0)
}

pub struct AppState {
    engine: OnceLock<EngineHandle>,
    pub served_model_name: String,
    pub metrics: Arc<Metrics>,
    pub lifecycle: Arc<Lifecycle>,
    max_body_bytes: usize,
    body_read_timeout: Duration,
    /// How long a stream waits for a client that reads nothing.
    pub write_stall: Duration,
    /// Requests being parsed and tokenized at once (one per core): the rest wait their turn.
    preparing: tokio::sync::Semaphore,
}

impl AppState {
    pub fn engine(&self) -> Option<&EngineHandle> {
        self.engine.get()
    }
}

/// Runs the worker until SIGTERM (drained) or a second signal.
pub fn run(args: WorkerArgs) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(serve(args))
}

async fn serve(args: WorkerArgs) -> Result<()> {
    if let Device::Cuda(n) = args.device
        && !cuda_present()
    {
        anyhow::bail!(
            "--device cuda:{n}: no usable CUDA driver or GPU here (libcuda.so cannot be loaded or reports no device); use --device cpu"
        );
    }
    let listener = TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("binding {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    announce(addr)?;
    let served_model_name = args.served_model_name.clone().unwrap_or_else(|| {
        args.model
            .canonicalize()
            .unwrap_or(args.model.clone())
            .file_name()
            .map_or("model".into(), |n| n.to_string_lossy().into_owned())
    });
    tracing::info!(%addr, model = %served_model_name, "listening; loading the model");
    let server = Arc::new(Server::new(
        Limits {
            header_read: Duration::from_secs(args.header_read_timeout_secs),
            idle: Duration::from_secs(args.idle_timeout_secs),
            write_stall: Duration::from_secs(args.write_stall_timeout_secs),
            max_connections: args.max_connections,
            ..Limits::default()
        },
        Refusal::Http503,
    ));
    let mut metrics = Metrics::new();
    metrics.register_http(server.stats());
    let state = Arc::new(AppState {
        engine: OnceLock::new(),
        served_model_name,
        metrics: Arc::new(metrics),
        lifecycle: Arc::new(Lifecycle::default()),
        max_body_bytes: args.max_body_bytes,
        body_read_timeout: Duration::from_secs(args.body_read_timeout_secs),
        write_stall: Duration::from_secs(args.write_stall_timeout_secs),
        preparing: tokio::sync::Semaphore::new(
            std::thread::available_parallelism().map_or(2, |n| n.get()),
        ),
    });

    let loader_state = state.clone();
    let loader_server = server.clone();
    let load_args = args.clone();
    tokio::task::spawn_blocking(move || match load(&load_args, &loader_state.metrics) {
        Ok(handle) => {
            let watched = handle.clone();
            let _ = loader_state.engine.set(handle);
            tracing::info!("ready");
            tokio::spawn(fail_when_the_engine_stops(
                watched,
                loader_state,
                loader_server,
            ));
        }
        Err(e) => {
            tracing::error!("model load failed: {e:#}");
            std::process::exit(1);
        }
    });

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let grace = Duration::from_secs(args.drain_grace_secs);
    loop {
        tokio::select! {
            (stream, slot) = server.accept(&listener) => {
                let _ = stream.set_nodelay(true);
                let state = state.clone();
                tokio::spawn(server.serve(stream, slot, move |req| route(req, state.clone())));
            }
            _ = term.recv() => drain(&state, &server, grace),
            _ = int.recv() => drain(&state, &server, grace),
        }
    }
}

/// How long a worker whose engine failed waits for its handlers to send their errors.
const ENGINE_FAILURE_GRACE: Duration = Duration::from_secs(5);

/// A failed engine cannot be restarted in place: stop taking work (`/health` says so from the
/// failure on), let the requests in flight finish sending their errors, and exit non-zero so
/// the controller replaces the worker.
async fn fail_when_the_engine_stops(
    engine: EngineHandle,
    state: Arc<AppState>,
    server: Arc<Server>,
) {
    let why = engine.stopped().await;
    state.lifecycle.begin_drain();
    let drained = finish_and_close(&state, &server, ENGINE_FAILURE_GRACE).await;
    tracing::error!(error = %why, drained, "the engine failed: exiting for a replacement");
    std::process::exit(EXIT_ENGINE_FAILED);
}

/// Waits, up to `grace` in all, for the requests in flight to finish and then for every
/// connection to have sent its last bytes and closed, so exiting next cuts no response short;
/// true when both happened in time.
async fn finish_and_close(state: &AppState, server: &Server, grace: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + grace;
    let idle = state.lifecycle.wait_idle(grace).await;
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    server.shutdown(left).await && idle
}

/// Exit status of a worker whose engine failed (sysexits' EX_SOFTWARE).
pub const EXIT_ENGINE_FAILED: i32 = 70;

/// First signal: stop taking work and exit 0 once idle (or after `grace`). Second: exit now.
fn drain(state: &Arc<AppState>, server: &Arc<Server>, grace: Duration) {
    if state.lifecycle.is_draining() {
        tracing::warn!("second signal: exiting now");
        std::process::exit(1);
    }
    state.lifecycle.begin_drain();
    tracing::info!(
        inflight = state.lifecycle.inflight(),
        grace_secs = grace.as_secs(),
        "draining"
    );
    let (state, server) = (state.clone(), server.clone());
    tokio::spawn(async move {
        let drained = finish_and_close(&state, &server, grace).await;
        tracing::info!(drained, left = state.lifecycle.inflight(), "exiting");
        std::process::exit(0);
    });
}

fn announce(addr: SocketAddr) -> Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{}",
        serde_json::json!({ "event": "listening", "addr": addr.to_string() })
    )?;
    out.flush()?;
    Ok(())
}

fn load(args: &WorkerArgs, metrics: &Arc<Metrics>) -> Result<EngineHandle> {
    let device = match args.device {
        Device::Auto if cuda_present() => Device::Cuda(0),
        Device::Auto => {
            tracing::info!("device: cpu (auto: no usable CUDA driver or GPU)");
            Device::Cpu
        }
        d => d,
    };
    match device {
        Device::Cuda(n) => {
            // f16 models stay f16; everything else runs in bf16.
            let f16 = model_dtype(&args.model).as_deref() == Some("float16");
            let result = if f16 {
                cuda_engine::<half::f16>(args, n, metrics)
            } else {
                cuda_engine::<half::bf16>(args, n, metrics)
            };
            match (result, args.device) {
                (Ok(handle), _) => Ok(handle),
                (Err(e), Device::Auto) => {
                    tracing::warn!("device: cpu (auto: CUDA could not be used: {e:#})");
                    cpu_engine(args, metrics)
                }
                (Err(e), _) => Err(e),
            }
        }
        _ => cpu_engine(args, metrics),
    }
}

fn engine_config(args: &WorkerArgs, kv_cache_bytes: usize) -> EngineConfig {
    EngineConfig {
        kv_cache_bytes,
        max_num_seqs: args.max_num_seqs,
        max_num_batched_tokens: args.max_num_batched_tokens,
        max_model_len: args.max_model_len,
        device_sampling: args.device_sampling,
        ..EngineConfig::default()
    }
}

fn cpu_engine(args: &WorkerArgs, metrics: &Arc<Metrics>) -> Result<EngineHandle> {
    let loaded = crate::model::load(&args.model, CpuBackend::new())?;
    let engine = Engine::new(loaded, engine_config(args, args.kv_cache_mib << 20));
    Ok(EngineHandle::spawn(engine, metrics.clone()))
}

fn cuda_engine<T>(args: &WorkerArgs, ordinal: usize, metrics: &Arc<Metrics>) -> Result<EngineHandle>
where
    T: crate::backend::cuda::GpuDtype,
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<T>,
{
    let util = args.gpu_memory_utilization;
    anyhow::ensure!(
        util > 0.0 && util <= 1.0,
        "--gpu-memory-utilization {util}: must be in (0, 1]"
    );
    let backend = crate::backend::cuda::CudaBackend::<T>::new(ordinal)
        .with_context(|| format!("--device cuda:{ordinal}"))?
        .with_graphs(args.cuda_graphs)
        .with_fused_gemv(args.fused_gemv);
    let loaded = crate::model::load(&args.model, backend)?;
    let (free, total) = crate::backend::cuda::device_memory();
    // Keep (1 - util) of the GPU for others and a margin for activations and cuBLAS workspace.
    let reserve = ((1.0 - util) * total as f64) as usize + (1usize << 30);
    let kv = free.saturating_sub(reserve);
    anyhow::ensure!(
        kv > 0,
        "cuda:{ordinal}: no memory left for the KV cache after the weights ({} MiB free of {} MiB)",
        free >> 20,
        total >> 20
    );
    tracing::info!(
        device = format!("cuda:{ordinal}"),
        kv_cache_mib = kv >> 20,
        free_mib = free >> 20,
        total_mib = total >> 20,
        "KV cache sized from free device memory"
    );
    let engine = Engine::new(loaded, engine_config(args, kv));
    Ok(EngineHandle::spawn(engine, metrics.clone()))
}

/// `torch_dtype` (or transformers 5's `dtype`) from the model's config.json.
fn model_dtype(dir: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("torch_dtype")
        .or_else(|| v.get("dtype"))?
        .as_str()
        .map(str::to_owned)
}

async fn route(req: Request<Incoming>, state: Arc<AppState>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let result = match (req.method(), path.as_str()) {
        (&Method::GET, "/health") => Ok(health(&state)),
        (&Method::GET, "/metrics") => Ok(body::text_response(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.encode(),
        )),
        (&Method::GET, "/v1/models") => Ok(models(&state)),
        (&Method::POST, "/v1/chat/completions") => {
            let span = request_span(&req);
            completions(req, state, Endpoint::Chat)
                .instrument(span)
                .await
        }
        (&Method::POST, "/v1/completions") => {
            let span = request_span(&req);
            completions(req, state, Endpoint::Completions)
                .instrument(span)
                .await
        }
        (_, "/health" | "/metrics" | "/v1/models" | "/v1/chat/completions" | "/v1/completions") => {
            Err(ServerError::MethodNotAllowed(req.method().to_string()))
        }
        _ => Err(ServerError::RouteNotFound(path)),
    };
    result.unwrap_or_else(|e| body::error_response(&e))
}

/// The span a request's log lines carry: the gateway's request and dispatch ids (when it sent
/// them), so one id finds the worker's side of a request too.
fn request_span(req: &Request<Incoming>) -> tracing::Span {
    let id = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    tracing::info_span!(
        "request",
        request_id = %id("x-request-id"),
        dispatch_id = %id("x-llmctl-dispatch-id"),
    )
}

fn health(state: &AppState) -> Response<Body> {
    let failure = state.engine().and_then(EngineHandle::failure);
    let (status, text) = if let Some(why) = &failure {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("engine failed: {why}"),
        )
    } else if state.lifecycle.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining".to_owned())
    } else if state.engine().is_none() {
        (StatusCode::SERVICE_UNAVAILABLE, "loading".to_owned())
    } else {
        (StatusCode::OK, "ok".to_owned())
    };
    body::text_response(status, "text/plain", format!("{text}\n"))
}

fn models(state: &AppState) -> Response<Body> {
    let list = ModelList::new(vec![Model::new(
        state.served_model_name.clone(),
        0,
        "llmctl",
    )]);
    body::json_response(
        StatusCode::OK,
        serde_json::to_vec(&list).expect("model lists serialize"),
    )
}

async fn completions(
    req: Request<Incoming>,
    state: Arc<AppState>,
    endpoint: Endpoint,
) -> Result<Response<Body>, ServerError> {
    let guard = state.lifecycle.admit()?;
    let engine = state
        .engine()
        .ok_or(ServerError::Unavailable("the model is still loading"))?
        .clone();
    let bytes = read_body(req, state.max_body_bytes, state.body_read_timeout).await?;
    // Parsing, template rendering and tokenizing take CPU in proportion to the body (seconds
    // for megabytes): on a bounded blocking pool, never on the threads serving connections.
    let turn = state
        .preparing
        .acquire()
        .await
        .map_err(|_| ServerError::Unavailable("the worker is shutting down"))?;
    let served = state.served_model_name.clone();
    let prepare = engine.clone();
    let valid = tokio::task::spawn_blocking(move || match endpoint {
        Endpoint::Chat => {
            validate::chat(parse::<ChatCompletionRequest>(&bytes)?, &prepare, &served)
        }
        Endpoint::Completions => {
            validate::completion(parse::<CompletionRequest>(&bytes)?, &prepare, &served)
        }
    })
    .await
    .map_err(|e| ServerError::Internal(format!("preparing the request failed: {e}")))??;
    drop(turn);
    openai::handle(state, endpoint, valid, guard).await
}

async fn read_body(
    req: Request<Incoming>,
    limit: usize,
    timeout: Duration,
) -> Result<Bytes, ServerError> {
    let (parts, body) = req.into_parts();
    llmctl_http_server::read_body(&parts.headers, body, limit, timeout)
        .await
        .map_err(|e| match e {
            BodyError::TooLarge => ServerError::TooLarge(limit),
            BodyError::TimedOut => ServerError::BodyTimeout(timeout),
            BodyError::Broken(e) => ServerError::BadRequest {
                param: None,
                message: format!("reading the request body: {e}"),
                code: None,
            },
        })
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ServerError> {
    serde_json::from_slice(bytes).map_err(|e| ServerError::BadRequest {
        param: None,
        message: format!("invalid JSON body: {e}"),
        code: Some("invalid_json"),
    })
}
