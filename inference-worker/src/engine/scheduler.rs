//! Continuous batching: at every step, decides which sequences run and how many of their
//! tokens, within `max_num_seqs` and a token budget (`max_num_batched_tokens`). Running
//! sequences go first (a decode is one token; an unfinished prefill continues in chunks), then
//! waiting ones are admitted in arrival order, taking what they can from the prefix cache. When
//! a running sequence needs a block and none is free, the latest-arrived running sequence is
//! preempted: its blocks are released and it returns to the front of the queue to be
//! recomputed later. Owns the queues; the engine owns the sequences themselves.

use std::collections::{HashMap, VecDeque};

use super::block_manager::BlockManager;
use super::sequence::{SeqId, Sequence};

#[derive(Clone, Debug)]
pub struct SchedulerConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
}

/// One step's plan: sequences and how many new tokens each computes, in batch order.
#[derive(Debug, Default)]
pub struct Schedule {
    pub scheduled: Vec<(SeqId, usize)>,
    pub preempted: Vec<SeqId>,
}

pub struct Scheduler {
    config: SchedulerConfig,
    waiting: VecDeque<SeqId>,
    running: Vec<SeqId>,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig) -> Self {
        Self {
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
        }
    }

    pub fn add(&mut self, id: SeqId) {
        self.waiting.push_back(id);
    }

    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Forgets a sequence (finished or aborted); the caller releases its blocks.
    pub fn remove(&mut self, id: SeqId) {
        self.running.retain(|&s| s != id);
        self.waiting.retain(|&s| s != id);
    }

    pub fn schedule(
        &mut self,
        seqs: &mut HashMap<SeqId, Sequence>,
        blocks: &mut BlockManager,
    ) -> Schedule {
        let mut plan = Schedule::default();
        let mut budget = self.config.max_num_batched_tokens;

        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let id = self.running[i];
            let seq = seqs.get_mut(&id).expect("running sequences exist");
            let n = (seq.tokens.len() - seq.num_computed).min(budget);
            if grow(seq, seq.num_computed + n, blocks) {
                plan.scheduled.push((id, n));
                budget -= n;
                i += 1;
                continue;
            }
            // Out of blocks: preempt from the back (latest arrival) until this one fits.
            let victim = self.running.pop().expect("the current sequence is running");
            preempt(
                seqs.get_mut(&victim).expect("running sequences exist"),
                blocks,
            );
            self.waiting.push_front(victim);
            plan.preempted.push(victim);
        }

        // Admit waiting sequences, unless this step had to preempt (memory is short).
        if plan.preempted.is_empty() {
            let mut w = 0;
            while w < self.waiting.len()
                && budget > 0
                && self.running.len() < self.config.max_num_seqs
            {
                let id = self.waiting[w];
                if !leader_ready(seqs, id) {
                    w += 1;
                    continue;
                }
                let seq = seqs.get_mut(&id).expect("waiting sequences exist");
                if seq.block_table.is_empty() {
                    // At least the last token is always computed: it yields the next logits.
                    let reusable = (seq.tokens.len() - 1) / blocks.block_size();
                    let hits = blocks.acquire_prefix(
                        &seq.block_hashes[..reusable.min(seq.block_hashes.len())],
                        seq.prompt_len,
                    );
                    seq.num_computed = hits.len() * blocks.block_size();
                    seq.registered = hits.len();
                    seq.block_table = hits;
                    seq.cached_tokens.get_or_insert(seq.num_computed);
                }
                let n = (seq.tokens.len() - seq.num_computed).min(budget);
                if !grow(seq, seq.num_computed + n, blocks) {
                    // Not enough memory: give back the prefix hits and wait for a later step.
                    let table = seq.reset_computed();
                    blocks.release(&table);
                    break;
                }
                self.waiting.remove(w);
                self.running.push(id);
                plan.scheduled.push((id, n));
                budget -= n;
            }
        }
        plan
    }
}

/// Sibling completions wait until their leader's prompt is in the cache, then share it.
fn leader_ready(seqs: &HashMap<SeqId, Sequence>, id: SeqId) -> bool {
    match seqs[&id].leader.and_then(|l| seqs.get(&l)) {
        Some(leader) => leader.num_computed >= leader.prompt_len,
        None => true,
    }
}

/// Allocates blocks so `seq` can hold `tokens` tokens; false (allocating nothing) if short.
fn grow(seq: &mut Sequence, tokens: usize, blocks: &mut BlockManager) -> bool {
    let need = blocks
        .blocks_for(tokens)
        .saturating_sub(seq.block_table.len());
    if need > blocks.num_free() {
        return false;
    }
    for _ in 0..need {
        seq.block_table
            .push(blocks.allocate().expect("free blocks were counted"));
    }
    true
}

fn preempt(seq: &mut Sequence, blocks: &mut BlockManager) {
    let table = seq.reset_computed();
    blocks.release(&table);
    tracing::debug!(
        seq = seq.id,
        tokens = seq.tokens.len(),
        "preempted for recompute"
    );
}
