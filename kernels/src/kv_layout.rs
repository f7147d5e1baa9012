//! The paged KV-cache layout shared by the CPU backend and the CUDA kernels.
//!
//! Per layer there is one K cache and one V cache, each a dense row-major array of shape
//! `[num_blocks, block_size, num_kv_heads, head_dim]` (the "NHD" layout). A token's *slot* is
//! `block_id * block_size + offset_in_block`; its K row for KV head `h` starts at element
//! `(slot * num_kv_heads + h) * head_dim`. See `kernels/KV_LAYOUT.md` for why this layout.

/// Shape of one layer's K (or V) cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvLayout {
    pub num_blocks: usize,
    pub block_size: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
}

impl KvLayout {
    /// Elements in one layer's K (or V) cache.
    pub fn elements(&self) -> usize {
        self.num_blocks * self.block_size * self.num_kv_heads * self.head_dim
    }

    /// Elements one token occupies (all KV heads).
    pub fn token_stride(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }

    /// The slot of the `position`-th token of a sequence with this block table.
    pub fn slot(&self, block_table: &[u32], position: usize) -> usize {
        block_table[position / self.block_size] as usize * self.block_size
            + position % self.block_size
    }

    /// Element offset of the K (or V) row of `kv_head` at `slot`.
    pub fn offset(&self, slot: usize, kv_head: usize) -> usize {
        (slot * self.num_kv_heads + kv_head) * self.head_dim
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_walks_the_block_table() {
        let layout = KvLayout {
            num_blocks: 8,
            block_size: 16,
            num_kv_heads: 2,
            head_dim: 4,
        };
        let table = [5, 2];
        assert_eq!(layout.slot(&table, 0), 80);
        assert_eq!(layout.slot(&table, 15), 95);
        assert_eq!(layout.slot(&table, 16), 32);
        assert_eq!(layout.offset(33, 1), (33 * 2 + 1) * 4);
        assert_eq!(layout.elements(), 8 * 16 * 2 * 4);
    }
}
