//! The engine: requests in, tokens and text out, one step at a time. A step asks the
//! `scheduler` what to run, packs those sequences into one batch over the paged KV cache
//! (`block_manager` keeps the books, the backend holds the data), runs the model's forward
//! pass, and feeds each finished row's logits to the `sampler`. Requests join and leave the
//! batch at every step. The engine is synchronous and single-owner: the server drives it from
//! one thread and talks to it through a handle.

pub mod block_manager;
pub mod params;
pub mod sampler;
pub mod scheduler;
pub mod sequence;

use std::collections::HashMap;
use std::sync::Arc;

pub use params::{FinishReason, ParamError, SamplingParams};
pub use sampler::TokenLogprob;
pub use sequence::{RequestId, SeqId};

use crate::backend::{Backend, KvLayout, LogitEdit, ReplayCounts, SeqSlice, StepBatch};
use crate::model::{Llama, LoadedModel};
use crate::rng::Rng;
use crate::tokenizer::Tokenizer;
use block_manager::{BlockManager, CacheCounters};
use sampler::{SampleContext, Sampled};
use scheduler::{Scheduler, SchedulerConfig};
use sequence::{OutputText, Sequence};

#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Tokens per KV block.
    pub block_size: usize,
    /// KV blocks to allocate; `None` sizes the cache from `kv_cache_bytes`.
    pub num_blocks: Option<usize>,
    /// Memory for the KV cache when `num_blocks` is not given.
    pub kv_cache_bytes: usize,
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Longest prompt plus output; `None` uses the model's limit.
    pub max_model_len: Option<usize>,
    pub enable_prefix_caching: bool,
    /// Draw tokens where the logits are ([`Draw`]); `false` copies every step's logits to the
    /// host sampler (a switch to compare the two, and a fallback).
    pub device_sampling: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            block_size: 16,
            num_blocks: None,
            kv_cache_bytes: 512 << 20,
            max_num_seqs: 256,
            max_num_batched_tokens: 2048,
            max_model_len: None,
            enable_prefix_caching: true,
            device_sampling: true,
        }
    }
}

/// Why a request was refused before it started.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Param(#[from] ParamError),
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {0} is outside the vocabulary")]
    BadToken(u32),
    #[error(
        "this model's maximum context length is {max} tokens; the request asks for {prompt} prompt tokens plus {max_tokens} completion tokens"
    )]
    TooLong {
        max: usize,
        prompt: usize,
        max_tokens: usize,
    },
    #[error("the request needs {need} KV blocks but the cache only has {have}")]
    TooLargeForCache { need: usize, have: usize },
    #[error("request id {0} is already in use")]
    DuplicateId(RequestId),
}

/// What one sequence produced in one step.
#[derive(Clone, Debug, PartialEq)]
pub struct SeqOutput {
    pub request: RequestId,
    /// Which of the request's `n` completions.
    pub index: usize,
    /// The token sampled this step, if any.
    pub token: Option<u32>,
    /// Its logprob and the top alternatives, when asked for.
    pub logprobs: Option<(f32, Vec<TokenLogprob>)>,
    /// New text that is final (held back while it could start a stop string).
    pub text: String,
    pub finish: Option<FinishReason>,
    pub prompt_tokens: usize,
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
    pub completion_tokens: usize,
}

/// Gauges and counters for `/metrics`.
#[derive(Clone, Copy, Debug, Default)]
pub struct EngineStats {
    pub running: usize,
    pub waiting: usize,
    pub blocks_total: usize,
    pub blocks_used: usize,
    pub cache: CacheCounters,
    pub preemptions: u64,
    pub prompt_tokens: u64,
    pub generation_tokens: u64,
    pub steps: u64,
    /// Steps the backend recorded for replay and replayed (CUDA graphs).
    pub replays: ReplayCounts,
}

struct RequestState {
    seqs: Vec<SeqId>,
}

pub struct Engine<B: Backend> {
    model: Llama<B>,
    tokenizer: Arc<Tokenizer>,
    cache: B::KvCache,
    layout: KvLayout,
    blocks: BlockManager,
    scheduler: Scheduler,
    seqs: HashMap<SeqId, Sequence>,
    requests: HashMap<RequestId, RequestState>,
    max_model_len: usize,
    device_sampling: bool,
    next_seq: SeqId,
    arrivals: u64,
    stats: EngineStats,
    /// Requests whose first sequence was scheduled since the last `take_started`.
    started: Vec<RequestId>,
}

impl<B: Backend> Engine<B> {
    pub fn new(loaded: LoadedModel<B>, config: EngineConfig) -> Self {
        let LoadedModel { model, tokenizer } = loaded;
        let c = &model.config;
        let bytes_per_block =
            2 * c.num_layers * config.block_size * c.kv_size() * std::mem::size_of::<f32>();
        let num_blocks = config
            .num_blocks
            .unwrap_or(config.kv_cache_bytes / bytes_per_block)
            .max(1);
        let layout = KvLayout {
            num_blocks,
            block_size: config.block_size,
            num_kv_heads: c.num_kv_heads,
            head_dim: c.head_dim,
        };
        let max_model_len = config
            .max_model_len
            .map_or(c.max_model_len, |m| m.min(c.max_model_len));
        let cache = model.backend.alloc_kv_cache(c.num_layers, layout);
        tracing::info!(
            num_blocks,
            block_size = config.block_size,
            max_model_len,
            "allocated KV cache"
        );
        Self {
            cache,
            layout,
            blocks: BlockManager::new(num_blocks, config.block_size, config.enable_prefix_caching),
            scheduler: Scheduler::new(SchedulerConfig {
                max_num_seqs: config.max_num_seqs,
                max_num_batched_tokens: config.max_num_batched_tokens,
            }),
            model,
            tokenizer: Arc::new(tokenizer),
            seqs: HashMap::new(),
            requests: HashMap::new(),
            max_model_len,
            device_sampling: config.device_sampling,
            next_seq: 0,
            arrivals: 0,
            stats: EngineStats::default(),
            started: Vec::new(),
        }
    }

    pub fn tokenizer(&self) -> &Arc<Tokenizer> {
        &self.tokenizer
    }

    pub fn model(&self) -> &Llama<B> {
        &self.model
    }

    pub fn max_model_len(&self) -> usize {
        self.max_model_len
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            running: self.scheduler.num_running(),
            waiting: self.scheduler.num_waiting(),
            blocks_total: self.blocks.num_blocks(),
            blocks_used: self.blocks.num_used(),
            cache: self.blocks.counters,
            replays: self.model.backend.replay_counts(),
            ..self.stats
        }
    }

    /// Requests that started running since the last call (for queue-time metrics).
    pub fn take_started(&mut self) -> Vec<RequestId> {
        std::mem::take(&mut self.started)
    }

    pub fn has_unfinished(&self) -> bool {
        !self.requests.is_empty()
    }

    /// Queues a request; it starts at the next step with room for it.
    pub fn add_request(
        &mut self,
        id: RequestId,
        prompt: Vec<u32>,
        params: SamplingParams,
    ) -> Result<(), EngineError> {
        let vocab = self.model.config.vocab_size;
        params.validate(vocab)?;
        if self.requests.contains_key(&id) {
            return Err(EngineError::DuplicateId(id));
        }
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
            return Err(EngineError::BadToken(bad));
        }
        if prompt.len() + params.max_tokens > self.max_model_len {
            return Err(EngineError::TooLong {
                max: self.max_model_len,
                prompt: prompt.len(),
                max_tokens: params.max_tokens,
            });
        }
        let need = self.blocks.blocks_for(prompt.len() + params.max_tokens);
        if need > self.blocks.num_blocks() {
            return Err(EngineError::TooLargeForCache {
                need,
                have: self.blocks.num_blocks(),
            });
        }

        let params = Arc::new(params);
        let hashes = Sequence::hash_chain(&prompt, self.layout.block_size);
        let mut ids = Vec::with_capacity(params.n);
        for index in 0..params.n {
            let id_seq = self.next_seq;
            self.next_seq += 1;
            let seed = match params.seed {
                Some(s) => s ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                None => fresh_seed(id_seq),
            };
            self.seqs.insert(
                id_seq,
                Sequence {
                    id: id_seq,
                    request: id,
                    index,
                    params: params.clone(),
                    tokens: prompt.clone(),
                    prompt_len: prompt.len(),
                    num_computed: 0,
                    block_table: Vec::new(),
                    block_hashes: hashes.clone(),
                    registered: 0,
                    rng: Rng::new(seed),
                    leader: ids.first().copied(),
                    cached_tokens: None,
                    arrival: self.arrivals,
                    started: false,
                    text: OutputText::new(&prompt, &params),
                },
            );
            self.scheduler.add(id_seq);
            ids.push(id_seq);
        }
        self.arrivals += 1;
        self.requests.insert(id, RequestState { seqs: ids });
        Ok(())
    }

    /// Stops a request at once and frees its KV blocks. Returns false if it was unknown.
    pub fn abort(&mut self, id: RequestId) -> bool {
        let Some(state) = self.requests.remove(&id) else {
            return false;
        };
        for sid in state.seqs {
            self.drop_seq(sid);
        }
        true
    }

    fn drop_seq(&mut self, sid: SeqId) {
        if let Some(seq) = self.seqs.remove(&sid) {
            self.scheduler.remove(sid);
            self.blocks.release(&seq.block_table);
        }
    }

    /// Runs one step of the running batch; returns what each sequence produced.
    pub fn step(&mut self) -> Vec<SeqOutput> {
        let plan = self.scheduler.schedule(&mut self.seqs, &mut self.blocks);
        self.stats.preemptions += plan.preempted.len() as u64;
        if plan.scheduled.is_empty() {
            return Vec::new();
        }

        let mut batch = StepBatch::default();
        let mut to_sample = Vec::new();
        for &(sid, n) in &plan.scheduled {
            let seq = self.seqs.get_mut(&sid).expect("scheduled sequences exist");
            if seq.index == 0 && !seq.started {
                seq.started = true;
                self.started.push(seq.request);
            }
            let seq = &self.seqs[&sid];
            let start = seq.num_computed;
            let query_start = batch.tokens.len();
            for p in start..start + n {
                batch.tokens.push(seq.tokens[p]);
                batch.positions.push(p as u32);
                batch
                    .slot_mapping
                    .push(self.layout.slot(&seq.block_table, p) as i64);
            }
            batch.seqs.push(SeqSlice {
                query_start,
                query_len: n,
                context_len: start + n,
                block_table: seq.block_table.clone(),
            });
            if start + n == seq.tokens.len() {
                batch.logits_rows.push(query_start + n - 1);
                to_sample.push(sid);
            }
            if start < seq.prompt_len {
                self.stats.prompt_tokens += (n.min(seq.prompt_len - start)) as u64;
            }
        }

        // Tokens are found where the logits are, unless a row needs the host sampler, which
        // brings every row's logits to the host.
        let vocab = self.model.config.vocab_size;
        let draws: Vec<Draw> = to_sample
            .iter()
            .map(|sid| match self.device_sampling {
                true => Draw::of(&self.seqs[sid].params, vocab),
                false => Draw::Host,
            })
            .collect();
        let end_tokens: Vec<Vec<u32>> = to_sample
            .iter()
            .map(|sid| self.end_tokens(&self.seqs[sid].params))
            .collect();
        let picked = if draws.iter().any(|d| matches!(d, Draw::Host)) {
            Picked::Logits(self.model.forward(&mut self.cache, &batch))
        } else {
            self.forward_drawn(&batch, &to_sample, &draws, &end_tokens)
        };
        self.stats.steps += 1;

        let bs = self.layout.block_size;
        for &(sid, n) in &plan.scheduled {
            let seq = self.seqs.get_mut(&sid).expect("scheduled sequences exist");
            seq.num_computed += n;
            let full = (seq.num_computed / bs).min(seq.block_hashes.len());
            for b in seq.registered..full {
                self.blocks
                    .register_full(seq.block_table[b], seq.block_hashes[b]);
            }
            seq.registered = seq.registered.max(full);
        }

        let sampled = match picked {
            Picked::Sampled(sampled) => sampled,
            Picked::Logits(mut logits) => self.sample(&to_sample, &mut logits, &end_tokens),
        };
        to_sample
            .into_iter()
            .zip(sampled)
            .zip(&end_tokens)
            .map(|((sid, sampled), end_tokens)| {
                let params = self.seqs[&sid].params.clone();
                self.advance(sid, sampled, &params, end_tokens)
            })
            .collect()
    }

    /// The step's forward pass with each row's token found where the logits are (no row's
    /// draw is [`Draw::Host`]): the rows' penalties, bias and `min_tokens` applied there
    /// ([`sampler::logit_edits`]), then each row drawn, then its logprobs where asked
    /// ([`logprobs_where_the_logits_are`]). Each sampled row's uniform comes from its
    /// sequence's stream before the pass, one per token as the host sampler draws it, so a
    /// seeded sequence gets the same tokens either way.
    fn forward_drawn(
        &mut self,
        batch: &StepBatch,
        sids: &[SeqId],
        draws: &[Draw],
        end_tokens: &[Vec<u32>],
    ) -> Picked {
        let u: Vec<f64> = sids
            .iter()
            .zip(draws)
            .map(|(sid, draw)| {
                let seq = self.seqs.get_mut(sid).expect("sampled sequences exist");
                match draw {
                    Draw::Device { temperature } if *temperature == 0.0 => 0.0,
                    _ => seq.rng.uniform(),
                }
            })
            .collect();
        // Softmax draws (and the argmax, at 0) by the device; the other rows take the argmax
        // there and replace it below.
        let drawn_t: Vec<f32> = draws
            .iter()
            .map(|d| match d {
                Draw::Device { temperature } => *temperature,
                _ => 0.0,
            })
            .collect();
        // The softmax mass of nucleus rows, at their temperature.
        let nucleus = draws.contains(&Draw::Nucleus);
        let nucleus_t: Vec<f32> = draws
            .iter()
            .zip(sids)
            .map(|(d, sid)| match d {
                Draw::Nucleus => self.seqs[sid].params.temperature,
                _ => 0.0,
            })
            .collect();
        let vocab = self.model.config.vocab_size;
        let params: Vec<&SamplingParams> = sids.iter().map(|sid| &*self.seqs[sid].params).collect();
        // The candidates each row needs: a top-k's, a nucleus's first, the best logit and the
        // alternatives of a row with logprobs.
        let widest = draws
            .iter()
            .filter_map(|d| match d {
                Draw::TopK(k) => Some(*k),
                Draw::Nucleus => Some(DEVICE_TOP_K),
                Draw::Device { .. } | Draw::Host => None,
            })
            .chain(params.iter().filter_map(|p| p.logprobs.map(|n| n.max(1))))
            .max()
            .map(|k| k.min(vocab));
        let edits: Vec<LogitEdit> = sids
            .iter()
            .zip(end_tokens)
            .enumerate()
            .flat_map(|(row, (sid, end_tokens))| {
                let seq = &self.seqs[sid];
                let ctx = SampleContext {
                    params: &seq.params,
                    prompt: &seq.tokens[..seq.prompt_len],
                    output: &seq.tokens[seq.prompt_len..],
                    end_tokens,
                };
                sampler::logit_edits(&ctx, row as u32, vocab)
            })
            .collect();
        let backend = &self.model.backend;
        let sampled = self.model.forward_with(&mut self.cache, batch, |logits| {
            backend.edit_logits(logits, &edits);
            let mut tokens = backend.draw_rows(logits, &drawn_t, &u);
            let Some(widest) = widest else {
                return tokens
                    .into_iter()
                    .map(|token| Sampled {
                        token,
                        logprobs: None,
                    })
                    .collect();
            };
            let (values, ids) = backend.top_k_rows(logits, sids.len(), widest);
            let mass = nucleus.then(|| backend.softmax_mass_rows(logits, &nucleus_t));
            // Rows whose top-p or min-p cut lies below their candidates: whole rows, once.
            let mut host: Option<Vec<f32>> = None;
            for (row, draw) in draws.iter().enumerate() {
                let at = row * widest;
                let (k, vocab_mass) = match draw {
                    Draw::TopK(k) => (*k, None),
                    Draw::Nucleus => (widest, mass.as_ref().map(|m| m[row])),
                    Draw::Device { .. } | Draw::Host => continue,
                };
                let complete = vocab_mass.is_none() || widest == vocab;
                tokens[row] = match sampler::draw_ranked(
                    &values[at..at + k],
                    params[row],
                    vocab_mass,
                    complete,
                    u[row],
                ) {
                    Some(pick) => ids[at + pick],
                    None => {
                        let host = host.get_or_insert_with(|| backend.to_host(logits));
                        sampler::draw(&host[row * vocab..(row + 1) * vocab], params[row], u[row])
                    }
                };
            }
            let logprobs = logprobs_where_the_logits_are(
                backend,
                logits,
                &tokens,
                &params,
                Candidates {
                    values: &values,
                    ids: &ids,
                    per_row: widest,
                },
            );
            tokens
                .into_iter()
                .zip(logprobs)
                .map(|(token, logprobs)| Sampled { token, logprobs })
                .collect()
        });
        Picked::Sampled(sampled.unwrap_or_default())
    }

    /// Tokens that end `params`' sequences: its stop ids, and EOS unless ignored.
    fn end_tokens(&self, params: &SamplingParams) -> Vec<u32> {
        let mut end_tokens = params.stop_token_ids.clone();
        if !params.ignore_eos {
            end_tokens.extend(&self.model.config.eos_token_ids);
        }
        end_tokens
    }

    /// Samples the next token of each of `sids` (with its `end_tokens`) from its row of
    /// `logits`, the rows in parallel. Each sequence's random stream is lent to its row and
    /// returned.
    fn sample(
        &mut self,
        sids: &[SeqId],
        logits: &mut [f32],
        end_tokens: &[Vec<u32>],
    ) -> Vec<Sampled> {
        let mut rngs: Vec<Rng> = sids.iter().map(|sid| self.seqs[sid].rng.clone()).collect();
        let contexts: Vec<SampleContext<'_>> = sids
            .iter()
            .zip(end_tokens)
            .map(|(sid, end_tokens)| {
                let seq = &self.seqs[sid];
                SampleContext {
                    params: &seq.params,
                    prompt: &seq.tokens[..seq.prompt_len],
                    output: &seq.tokens[seq.prompt_len..],
                    end_tokens,
                }
            })
            .collect();
        let vocab = self.model.config.vocab_size;
        let sampled = sampler::sample_rows(logits, vocab, &contexts, &mut rngs);
        for (sid, rng) in sids.iter().zip(rngs) {
            self.seqs.get_mut(sid).expect("sampled sequences exist").rng = rng;
        }
        sampled
    }

    /// Appends the sampled token to `sid`, applies stop rules, and retires it when finished.
    fn advance(
        &mut self,
        sid: SeqId,
        sampled: Sampled,
        params: &SamplingParams,
        end_tokens: &[u32],
    ) -> SeqOutput {
        let tokenizer = self.tokenizer.clone();
        let seq = self.seqs.get_mut(&sid).expect("sampled sequences exist");
        let token = sampled.token;
        seq.push_token(token, self.layout.block_size);
        self.stats.generation_tokens += 1;

        let generated = seq.tokens.len() - seq.prompt_len;
        let past_min = generated >= params.min_tokens;
        // An end token is not text; a stop string is found in the text the token adds.
        let stopped = if end_tokens.contains(&token) {
            past_min
        } else {
            seq.text.push(&tokenizer, token, past_min)
        };
        let finish = if stopped {
            Some(FinishReason::Stop)
        } else if generated >= params.max_tokens || seq.tokens.len() >= self.max_model_len {
            Some(FinishReason::Length)
        } else {
            None
        };
        let out = SeqOutput {
            request: seq.request,
            index: seq.index,
            token: Some(token),
            logprobs: sampled.logprobs,
            text: seq.text.take_ready(finish.is_some()),
            finish,
            prompt_tokens: seq.prompt_len,
            cached_tokens: seq.cached_tokens.unwrap_or(0),
            completion_tokens: generated,
        };
        if finish.is_some() {
            let request = seq.request;
            self.drop_seq(sid);
            if let Some(state) = self.requests.get_mut(&request) {
                state.seqs.retain(|&s| s != sid);
                if state.seqs.is_empty() {
                    self.requests.remove(&request);
                }
            }
        }
        out
    }
}

/// Each row's best logits and their tokens, best first, `per_row` to a row.
struct Candidates<'a> {
    values: &'a [f32],
    ids: &'a [u32],
    per_row: usize,
}

/// The logprobs of each row whose parameters ask for them (the host sampler's: the
/// log-softmax of the edited logits at temperature 1), found where the logits are: the
/// log-sum-exp from the row's best logit (`candidates`, at least as many to a row as the
/// alternatives asked for) and its softmax mass, the alternatives from the candidates, and
/// the sampled token's logit from them or, when it is not among them, from `logits`.
fn logprobs_where_the_logits_are<B: Backend>(
    backend: &B,
    logits: &B::Activations,
    tokens: &[u32],
    params: &[&SamplingParams],
    candidates: Candidates<'_>,
) -> Vec<Option<(f32, Vec<TokenLogprob>)>> {
    let asked: Vec<Option<usize>> = params.iter().map(|p| p.logprobs).collect();
    let Some(last) = asked.iter().rposition(Option::is_some) else {
        return vec![None; tokens.len()];
    };
    let Candidates {
        values,
        ids,
        per_row,
    } = candidates;
    let unit: Vec<f32> = asked[..=last]
        .iter()
        .map(|a| if a.is_some() { 1.0 } else { 0.0 })
        .collect();
    let mass = backend.softmax_mass_rows(logits, &unit);
    let row_ids = |row: usize| &ids[row * per_row..(row + 1) * per_row];
    let outside: Vec<(usize, u32)> = (0..=last)
        .filter(|&row| asked[row].is_some() && !row_ids(row).contains(&tokens[row]))
        .map(|row| (row, tokens[row]))
        .collect();
    let mut outside_logits = backend.logits_at(logits, &outside).into_iter();
    (0..tokens.len())
        .map(|row| {
            let n = asked.get(row).copied().flatten()?;
            let at = row * per_row;
            let lse = values[at] + mass[row].ln() as f32;
            let logit = match row_ids(row).iter().position(|&t| t == tokens[row]) {
                Some(i) => values[at + i],
                None => outside_logits
                    .next()
                    .expect("a logit for each token outside"),
            };
            let top = (at..at + n.min(per_row))
                .map(|i| TokenLogprob {
                    token: ids[i],
                    logprob: values[i] - lse,
                })
                .collect();
            Some((logit - lse, top))
        })
        .collect()
}

/// A seed for requests that gave none: different per sequence and per process start.
fn fresh_seed(seq: SeqId) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    Rng::new(nanos ^ seq.rotate_left(32) ^ std::process::id() as u64).next_u64()
}

/// What a step's forward pass gave: logits rows for the sampler, or the tokens themselves
/// (with their logprobs where asked).
enum Picked {
    Logits(Vec<f32>),
    Sampled(Vec<Sampled>),
}

/// The most candidates a row's draw takes from the device (a top-k up to this, or the first
/// candidates of a top-p or min-p cut); a larger top-k samples on the host. The device's top-k
/// ranks the values near the row's best; a flat row costs it a pass per candidate.
const DEVICE_TOP_K: usize = 64;

/// Where a row's next token is found.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Draw {
    /// Where the logits are: the argmax (temperature 0, which greedy parameters map to, a top-k
    /// of 1 included) or a draw from the whole softmax at this temperature.
    Device { temperature: f32 },
    /// From the row's best `k` logits, brought to the host (top-p and min-p cut among them).
    TopK(usize),
    /// Top-p or min-p without a top-k: from the row's best [`DEVICE_TOP_K`] logits and its
    /// softmax mass, brought to the host; the whole row follows only when the cut lies below
    /// them.
    Nucleus,
    /// From the whole row on the host: a top-k above [`DEVICE_TOP_K`] (or every row, without
    /// [`EngineConfig::device_sampling`]).
    Host,
}

impl Draw {
    fn of(params: &SamplingParams, vocab: usize) -> Self {
        if params.is_greedy() {
            return Draw::Device { temperature: 0.0 };
        }
        let top_k = if params.top_k >= vocab {
            0
        } else {
            params.top_k
        };
        match top_k {
            0 if params.top_p >= 1.0 && params.min_p <= 0.0 => Draw::Device {
                temperature: params.temperature,
            },
            0 => Draw::Nucleus,
            1..=DEVICE_TOP_K => Draw::TopK(top_k),
            _ => Draw::Host,
        }
    }
}
