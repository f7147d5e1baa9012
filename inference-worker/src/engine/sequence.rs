//! One sequence (one of a request's `n` completions): its tokens, how many of them are in the
//! KV cache, its block table, its random stream, and its output text with stop-string
//! handling. Owned by the engine; the scheduler reads and moves it between queues.

use std::sync::Arc;

use super::block_manager::block_hash;
use super::params::SamplingParams;
use crate::rng::Rng;
use crate::tokenizer::{IncrementalDecoder, Tokenizer};

pub type SeqId = u64;
pub type RequestId = u64;

pub struct Sequence {
    pub id: SeqId,
    pub request: RequestId,
    /// Which of the request's `n` completions this is.
    pub index: usize,
    pub params: Arc<SamplingParams>,
    /// Prompt followed by generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Tokens whose K/V are in the cache.
    pub num_computed: usize,
    pub block_table: Vec<u32>,
    /// Hash chain of the full blocks of `tokens` (computed or not).
    pub block_hashes: Vec<u64>,
    /// Blocks already offered to the prefix cache.
    pub registered: usize,
    pub rng: Rng,
    /// For completions 1.. of a request: the sequence whose prompt blocks they wait to share.
    pub leader: Option<SeqId>,
    /// Prompt tokens served from the prefix cache at first admission.
    pub cached_tokens: Option<usize>,
    /// Admission order; later arrivals are preempted first.
    pub arrival: u64,
    /// Has been scheduled at least once (reported by `Engine::take_started`).
    pub started: bool,
    pub text: OutputText,
}

impl Sequence {
    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Appends a generated token and extends the hash chain when a block fills.
    pub fn push_token(&mut self, token: u32, block_size: usize) {
        self.tokens.push(token);
        if self.tokens.len().is_multiple_of(block_size) {
            let start = self.tokens.len() - block_size;
            let parent = self.block_hashes.last().copied();
            self.block_hashes
                .push(block_hash(parent, &self.tokens[start..]));
        }
    }

    /// Hash chain of the full blocks of `tokens`.
    pub fn hash_chain(tokens: &[u32], block_size: usize) -> Vec<u64> {
        let mut parent = None;
        tokens
            .chunks_exact(block_size)
            .map(|chunk| {
                let h = block_hash(parent, chunk);
                parent = Some(h);
                h
            })
            .collect()
    }

    /// Releases cache state so the sequence can be recomputed from scratch (preemption).
    pub fn reset_computed(&mut self) -> Vec<u32> {
        self.num_computed = 0;
        self.registered = 0;
        std::mem::take(&mut self.block_table)
    }
}

/// A sequence's generated text: incremental detokenization plus stop strings. Text that could
/// still turn out to be the start of a stop string is held back until it cannot.
pub struct OutputText {
    decoder: IncrementalDecoder,
    text: String,
    emitted: usize,
    stop: Vec<String>,
    hold_back: usize,
}

impl OutputText {
    pub fn new(prompt: &[u32], params: &SamplingParams) -> Self {
        let longest = params.stop.iter().map(String::len).max().unwrap_or(0);
        Self {
            decoder: IncrementalDecoder::new(prompt, params.skip_special_tokens),
            text: String::new(),
            emitted: 0,
            stop: params.stop.clone(),
            hold_back: longest.saturating_sub(1),
        }
    }

    /// Adds a token's text; returns true when a stop string now appears (the text is cut
    /// before it). `check_stop` is false before `min_tokens`.
    pub fn push(&mut self, tokenizer: &Tokenizer, token: u32, check_stop: bool) -> bool {
        let before = self.text.len();
        self.text.push_str(&self.decoder.push(tokenizer, token));
        if !check_stop || self.stop.is_empty() {
            return false;
        }
        // Only a match that ends in the new text is new; it may start up to hold_back earlier.
        let mut from = before.saturating_sub(self.hold_back);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self
            .stop
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i))
            .min();
        if let Some(at) = hit {
            self.text.truncate(at);
            self.emitted = self.emitted.min(at);
            return true;
        }
        false
    }

    /// Text not yet handed out that can no longer become part of a stop string (all of it
    /// when `finished`).
    pub fn take_ready(&mut self, finished: bool) -> String {
        let mut end = if finished {
            self.text.len()
        } else {
            self.text.len().saturating_sub(self.hold_back)
        };
        while !self.text.is_char_boundary(end) {
            end -= 1;
        }
        if end <= self.emitted {
            return String::new();
        }
        let out = self.text[self.emitted..end].to_owned();
        self.emitted = end;
        out
    }

    pub fn full(&self) -> &str {
        &self.text
    }
}
