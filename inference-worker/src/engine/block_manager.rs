//! The paged KV cache's bookkeeping: which blocks are free, who holds each block (reference
//! counts), and the prefix cache (full blocks keyed by a hash chain of their tokens). It never
//! touches K/V data; the backend owns that. A block whose count drops to zero goes to the tail
//! of an LRU free list but keeps its hash, so a later request with the same prefix can take it
//! back; it is evicted (hash forgotten) only when a fresh block is needed and it is at the head.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// Hash of a full block given its predecessor's hash: equal hashes mean equal token prefixes.
pub fn block_hash(parent: Option<u64>, tokens: &[u32]) -> u64 {
    // SipHash with fixed keys: stable across runs, so hashes could be shared between processes.
    let mut h = std::hash::DefaultHasher::new();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

const NIL: u32 = u32::MAX;

/// Doubly linked list of block ids, threaded through two arrays: O(1) push, pop and removal
/// from the middle (a cached block that gets reused leaves the free list wherever it is).
struct FreeList {
    prev: Vec<u32>,
    next: Vec<u32>,
    head: u32,
    tail: u32,
    len: usize,
    linked: Vec<bool>,
}

impl FreeList {
    fn new(n: usize) -> Self {
        let mut list = Self {
            prev: vec![NIL; n],
            next: vec![NIL; n],
            head: NIL,
            tail: NIL,
            len: 0,
            linked: vec![false; n],
        };
        for b in 0..n as u32 {
            list.push_back(b);
        }
        list
    }

    fn push_back(&mut self, b: u32) {
        debug_assert!(!self.linked[b as usize], "block {b} is already free");
        self.prev[b as usize] = self.tail;
        self.next[b as usize] = NIL;
        if self.tail == NIL {
            self.head = b;
        } else {
            self.next[self.tail as usize] = b;
        }
        self.tail = b;
        self.linked[b as usize] = true;
        self.len += 1;
    }

    fn push_front(&mut self, b: u32) {
        debug_assert!(!self.linked[b as usize], "block {b} is already free");
        self.prev[b as usize] = NIL;
        self.next[b as usize] = self.head;
        if self.head == NIL {
            self.tail = b;
        } else {
            self.prev[self.head as usize] = b;
        }
        self.head = b;
        self.linked[b as usize] = true;
        self.len += 1;
    }

    fn remove(&mut self, b: u32) {
        let (p, n) = (self.prev[b as usize], self.next[b as usize]);
        if p == NIL {
            self.head = n;
        } else {
            self.next[p as usize] = n;
        }
        if n == NIL {
            self.tail = p;
        } else {
            self.prev[n as usize] = p;
        }
        self.linked[b as usize] = false;
        self.len -= 1;
    }

    fn pop_front(&mut self) -> Option<u32> {
        let b = self.head;
        (b != NIL).then(|| {
            self.remove(b);
            b
        })
    }
}

/// Counters the metrics read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheCounters {
    /// Prompt tokens looked up in the prefix cache.
    pub queried_tokens: u64,
    /// Of those, tokens found cached.
    pub hit_tokens: u64,
    /// Cached blocks evicted to make room.
    pub evictions: u64,
}

pub struct BlockManager {
    block_size: usize,
    ref_counts: Vec<u32>,
    hashes: Vec<Option<u64>>,
    cached: HashMap<u64, u32>,
    free: FreeList,
    caching: bool,
    pub counters: CacheCounters,
}

impl BlockManager {
    pub fn new(num_blocks: usize, block_size: usize, enable_prefix_caching: bool) -> Self {
        assert!(
            num_blocks < NIL as usize,
            "block ids must fit below u32::MAX"
        );
        Self {
            block_size,
            ref_counts: vec![0; num_blocks],
            hashes: vec![None; num_blocks],
            cached: HashMap::new(),
            free: FreeList::new(num_blocks),
            caching: enable_prefix_caching,
            counters: CacheCounters::default(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.ref_counts.len()
    }

    /// Blocks that can be handed out now (free, or cached with no holder).
    pub fn num_free(&self) -> usize {
        self.free.len
    }

    pub fn num_used(&self) -> usize {
        self.num_blocks() - self.num_free()
    }

    pub fn ref_count(&self, block: u32) -> u32 {
        self.ref_counts[block as usize]
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Takes the longest run of cached blocks matching `hashes` from the start, raising their
    /// reference counts. `prompt_tokens` is what the lookup counts as queried.
    pub fn acquire_prefix(&mut self, hashes: &[u64], prompt_tokens: usize) -> Vec<u32> {
        self.counters.queried_tokens += prompt_tokens as u64;
        if !self.caching {
            return Vec::new();
        }
        let mut blocks = Vec::new();
        for h in hashes {
            let Some(&b) = self.cached.get(h) else { break };
            self.take(b);
            blocks.push(b);
        }
        self.counters.hit_tokens += (blocks.len() * self.block_size) as u64;
        blocks
    }

    fn take(&mut self, b: u32) {
        if self.ref_counts[b as usize] == 0 {
            self.free.remove(b);
        }
        self.ref_counts[b as usize] += 1;
    }

    /// A block for new tokens, evicting the least recently freed cached block if needed.
    pub fn allocate(&mut self) -> Option<u32> {
        let b = self.free.pop_front()?;
        if let Some(h) = self.hashes[b as usize].take() {
            if self.cached.get(&h) == Some(&b) {
                self.cached.remove(&h);
            }
            self.counters.evictions += 1;
        }
        self.ref_counts[b as usize] = 1;
        Some(b)
    }

    /// Drops one reference to each block. Blocks are freed last-first, so the tail of a
    /// sequence (the least shareable part) is evicted before its prefix.
    pub fn release(&mut self, blocks: &[u32]) {
        for &b in blocks.iter().rev() {
            let rc = &mut self.ref_counts[b as usize];
            assert!(*rc > 0, "release of block {b} that has no holder");
            *rc -= 1;
            if *rc == 0 {
                if self.hashes[b as usize].is_some() {
                    self.free.push_back(b);
                } else {
                    // An uncached block holds nothing reusable: hand it out first.
                    self.free.push_front(b);
                }
            }
        }
    }

    /// Records that `block` now holds a full block of tokens with hash `hash`.
    pub fn register_full(&mut self, block: u32, hash: u64) {
        if !self.caching || self.hashes[block as usize].is_some() {
            return;
        }
        // Another sequence may have computed the same prefix concurrently: keep the first.
        if let std::collections::hash_map::Entry::Vacant(e) = self.cached.entry(hash) {
            e.insert(block);
            self.hashes[block as usize] = Some(hash);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_release_and_counts() {
        let mut m = BlockManager::new(4, 16, true);
        let a: Vec<u32> = (0..4).map(|_| m.allocate().unwrap()).collect();
        assert_eq!(m.num_free(), 0);
        assert!(m.allocate().is_none(), "no blocks left");
        m.release(&a[..2]);
        assert_eq!(m.num_free(), 2);
        assert_eq!(m.ref_count(a[2]), 1);
    }

    #[test]
    fn prefix_hits_share_blocks_and_survive_release_until_evicted() {
        let mut m = BlockManager::new(3, 2, true);
        let h0 = block_hash(None, &[1, 2]);
        let h1 = block_hash(Some(h0), &[3, 4]);
        let (b0, b1) = (m.allocate().unwrap(), m.allocate().unwrap());
        m.register_full(b0, h0);
        m.register_full(b1, h1);
        // A second holder shares them.
        assert_eq!(m.acquire_prefix(&[h0, h1], 4), vec![b0, b1]);
        assert_eq!(m.ref_count(b0), 2);
        m.release(&[b0, b1]);
        m.release(&[b0, b1]);
        assert_eq!(m.num_free(), 3);
        // Still cached after release.
        assert_eq!(m.acquire_prefix(&[h0, h1], 4), vec![b0, b1]);
        m.release(&[b0, b1]);
        // A chain with a different first block does not hit even with an equal second block.
        let other = block_hash(None, &[9, 9]);
        assert!(m.acquire_prefix(&[other, h1], 4).is_empty());
        // Fresh allocations use the never-cached block first, then evict LRU: the tail (b1)
        // was released first in reverse order... b1 then b0, so b1 is evicted before b0.
        let fresh = m.allocate().unwrap();
        assert!(fresh != b0 && fresh != b1);
        assert_eq!(m.allocate(), Some(b1));
        assert_eq!(m.counters.evictions, 1);
        assert_eq!(
            m.acquire_prefix(&[h0], 2),
            vec![b0],
            "prefix block survives longer"
        );
        assert!(
            m.acquire_prefix(&[h0, h1], 4).len() == 1,
            "evicted block no longer hits"
        );
        assert_eq!(m.counters.hit_tokens, 4 + 4 + 2 + 2);
    }

    #[test]
    fn disabled_caching_never_hits() {
        let mut m = BlockManager::new(2, 2, false);
        let b = m.allocate().unwrap();
        let h = block_hash(None, &[1, 2]);
        m.register_full(b, h);
        m.release(&[b]);
        assert!(m.acquire_prefix(&[h], 2).is_empty());
    }
}
