//! The engine as an actor: one OS thread owns the [`Engine`] (its steps are blocking compute),
//! and async handlers talk to it through a cloneable [`EngineHandle`]. A request's outputs come
//! back on its own channel; when that channel's receiver is dropped (the client went away) the
//! request is aborted at the next step and its KV blocks are freed at once. The loop also
//! records per-request latencies and copies engine stats into the metrics.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

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
}

/// The engine thread stopped (it panicked); nothing more can be served.
#[derive(Debug, thiserror::Error)]
#[error("the engine has stopped")]
pub struct EngineGone;

impl EngineHandle {
    /// Starts the engine thread.
    pub fn spawn<B: Backend>(engine: Engine<B>, metrics: Arc<Metrics>) -> Self {
        let (commands, rx) = mpsc::unbounded_channel();
        let handle = Self {
            commands,
            tokenizer: engine.tokenizer().clone(),
            max_model_len: engine.max_model_len(),
            vocab_size: engine.model().config.vocab_size,
            eos_token_ids: engine.model().config.eos_token_ids.clone(),
        };
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || run(engine, rx, &metrics))
            .expect("spawning the engine thread");
        handle
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
