//! The engine as an actor: one OS thread owns the [`Engine`] (its steps are blocking compute),
//! and async handlers talk to it through a cloneable [`EngineHandle`]. A request's outputs come
//! back on its own channel; when that channel's receiver is dropped (the client went away) the
//! request is aborted at the next step and its KV blocks are freed at once. The loop also
//! records per-request latencies and copies engine stats into the metrics.
//!
//! An engine that cannot continue (a panic in a step: a CUDA error, a broken invariant) does
//! not leave a live server with a dead engine behind it: each request in flight gets an explicit
//! error (its channel closes), and [`EngineHandle::stopped`] says why, so the server can report
//! unhealthy at once and exit for the controller to replace it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};

use super::metrics::Metrics;
use crate::backend::Backend;
use crate::engine::{Engine, EngineError, RequestId, SamplingParams, SeqOutput};
use crate::tokenizer::Tokenizer;

enum Command {
    Generate {
        prompt: Vec<u32>,
        params: SamplingParams,
        events: mpsc::UnboundedSender<SeqOutput>,
        reply: oneshot::Sender<Result<RequestId, EngineError>>,
        arrived: Instant,
    },
}

/// What handlers need of the engine: submit work, and facts about the model.
#[derive(Clone)]
pub struct EngineHandle {
    commands: mpsc::UnboundedSender<Command>,
    pub tokenizer: Arc<Tokenizer>,
    pub max_model_len: usize,
    pub vocab_size: usize,
    pub eos_token_ids: Vec<u32>,
    /// Why the engine thread stopped (`None` while it runs).
    stopped: watch::Receiver<Option<String>>,
}

/// The engine thread stopped (it panicked); nothing more can be served.
#[derive(Debug, thiserror::Error)]
#[error("the engine has stopped")]
pub struct EngineGone;

impl EngineHandle {
    /// Starts the engine thread.
    pub fn spawn<B: Backend>(engine: Engine<B>, metrics: Arc<Metrics>) -> Self {
        let (commands, rx) = mpsc::unbounded_channel();
        let (stopped_tx, stopped) = watch::channel(None);
        let handle = Self {
            commands,
            stopped,
            tokenizer: engine.tokenizer().clone(),
            max_model_len: engine.max_model_len(),
            vocab_size: engine.model().config.vocab_size,
            eos_token_ids: engine.model().config.eos_token_ids.clone(),
        };
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || {
                let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    run(engine, rx, &metrics)
                }));
                // Unwinding dropped every request's channel: their handlers have answered with
                // an error. What is left is to say why.
                if let Err(panic) = ran {
                    let why = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                        .unwrap_or_else(|| "a panic with no message".to_owned());
                    tracing::error!(error = %why, "the engine failed; every request in flight ended with an error");
                    let _ = stopped_tx.send(Some(why));
                }
            })
            .expect("spawning the engine thread");
        handle
    }

    /// Why the engine stopped, if it has.
    pub fn failure(&self) -> Option<String> {
        self.stopped.borrow().clone()
    }

    /// Waits until the engine stops with a failure, and says why (pending forever while it
    /// runs, or once it ended normally).
    pub async fn stopped(&self) -> String {
        let mut rx = self.stopped.clone();
        let why = match rx.wait_for(Option::is_some).await {
            Ok(why) => why.clone(),
            Err(_) => None,
        };
        match why {
            Some(why) => why,
            None => std::future::pending().await,
        }
    }

    /// Queues a request; its outputs arrive on the returned channel. Dropping the receiver
    /// aborts the request.
    pub async fn generate(
        &self,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<Result<mpsc::UnboundedReceiver<SeqOutput>, EngineError>, EngineGone> {
        let (events, rx) = mpsc::unbounded_channel();
        let (reply, answer) = oneshot::channel();
        let arrived = Instant::now();
        self.commands
            .send(Command::Generate {
                prompt,
                params,
                events,
                reply,
                arrived,
            })
            .map_err(|_| EngineGone)?;
        Ok(answer.await.map_err(|_| EngineGone)?.map(|_| rx))
    }
}

struct Tracked {
    events: mpsc::UnboundedSender<SeqOutput>,
    arrived: Instant,
    last_token: Option<Instant>,
    remaining: usize,
}

fn run<B: Backend>(
    mut engine: Engine<B>,
    mut rx: mpsc::UnboundedReceiver<Command>,
    metrics: &Metrics,
) {
    let mut tracked: HashMap<RequestId, Tracked> = HashMap::new();
    let mut next_id: RequestId = 0;
    metrics.observe_engine(&engine.stats());
    loop {
        // Idle: sleep until a command comes. Busy: take whatever has arrived, then step.
        if !engine.has_unfinished() {
            match rx.blocking_recv() {
                Some(cmd) => accept(&mut engine, cmd, &mut tracked, &mut next_id),
                None => return,
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            accept(&mut engine, cmd, &mut tracked, &mut next_id);
        }
        tracked.retain(|&id, t| {
            if t.events.is_closed() {
                engine.abort(id);
                metrics.finished("abort");
                tracing::debug!(request = id, "client went away; aborted");
                false
            } else {
                true
            }
        });
        if !engine.has_unfinished() {
            metrics.observe_engine(&engine.stats());
            continue;
        }

        #[cfg(debug_assertions)]
        fault::before_step();
        let outputs = engine.step();
        // Before any output goes out: a client that reads /metrics after its last token sees
        // the step that produced it (its blocks freed, its tokens counted).
        metrics.observe_engine(&engine.stats());
        let now = Instant::now();
        for id in engine.take_started() {
            if let Some(t) = tracked.get(&id) {
                metrics.queue_time.observe((now - t.arrived).as_secs_f64());
            }
        }
        let mut aborted = false;
        for out in outputs {
            let id = out.request;
            let Some(t) = tracked.get_mut(&id) else {
                continue;
            };
            if out.token.is_some() {
                match t.last_token {
                    None => metrics
                        .time_to_first_token
                        .observe((now - t.arrived).as_secs_f64()),
                    Some(prev) => metrics
                        .time_per_output_token
                        .observe((now - prev).as_secs_f64()),
                }
                t.last_token = Some(now);
            }
            let finish = out.finish;
            if t.events.send(out).is_err() {
                engine.abort(id);
                metrics.finished("abort");
                tracked.remove(&id);
                aborted = true;
                continue;
            }
            if let Some(reason) = finish {
                t.remaining -= 1;
                if t.remaining == 0 {
                    metrics.e2e_latency.observe((now - t.arrived).as_secs_f64());
                    metrics.finished(reason.as_str());
                    tracked.remove(&id);
                }
            }
        }
        // Clients that went away while their outputs were sent freed their blocks.
        if aborted {
            metrics.observe_engine(&engine.stats());
        }
    }
}

fn accept<B: Backend>(
    engine: &mut Engine<B>,
    cmd: Command,
    tracked: &mut HashMap<RequestId, Tracked>,
    next_id: &mut RequestId,
) {
    match cmd {
        Command::Generate {
            prompt,
            params,
            events,
            reply,
            arrived,
        } => {
            let id = *next_id;
            *next_id += 1;
            let n = params.n;
            let result = engine.add_request(id, prompt, params).map(|()| id);
            if result.is_ok() {
                tracked.insert(
                    id,
                    Tracked {
                        events,
                        arrived,
                        last_token: None,
                        remaining: n,
                    },
                );
            }
            // A client gone before the answer is handled by the closed-channel check.
            let _ = reply.send(result);
        }
    }
}

/// Fault injection for tests, compiled into debug builds only (the test builds): with
/// `LLMCTL_TEST_ENGINE_PANIC_AFTER_STEPS=N` the engine panics before its step N+1, as a CUDA
/// error or a broken invariant would.
#[cfg(debug_assertions)]
mod fault {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    static STEPS: AtomicU64 = AtomicU64::new(0);
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();

    pub fn before_step() {
        let limit = LIMIT.get_or_init(|| {
            std::env::var("LLMCTL_TEST_ENGINE_PANIC_AFTER_STEPS")
                .ok()
                .and_then(|v| v.parse().ok())
        });
        let Some(limit) = *limit else {
            return;
        };
        if STEPS.fetch_add(1, Ordering::Relaxed) >= limit {
            panic!("injected engine failure (LLMCTL_TEST_ENGINE_PANIC_AFTER_STEPS={limit})");
        }
    }
}
