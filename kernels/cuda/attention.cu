// Attention over the paged KV cache (NHD layout, see KV_LAYOUT.md), f32 accumulation with an
// online (running max and sum) softmax, so no score row is ever materialised.
//
// Decode: one query token per sequence. A CTA owns one KV head of one sequence and up to
// MAX_GROUP of the query heads sharing it (GQA: each K/V row is read once for the group; a
// larger group takes several CTAs, whose second reads of a row mostly hit L2), over one
// partition of the context. Rows are read in 16-byte chunks, a few rows per lane in flight at
// once (DecodeShape), and each lane keeps an online softmax over its rows, merged across the
// warp's lanes and then across its four warps. With one partition the CTA writes the
// normalised output; with several (split-KV, for long contexts and small batches) it writes an
// unnormalised partial result and its (max, sum), and the last CTA of the (sequence, head
// group) to finish merges them (merge_partitions) in the same launch.
//
// Prefill: causal attention for packed variable-length sequences whose new tokens' K/V are
// already in the cache, so cached prefix blocks (prefix-cache hits) are read, never
// recomputed. A CTA takes 16 query rows of one head (4 per warp) and walks the keys in tiles
// of 32 (16 for f32 at head_dim 256) staged in shared memory, flash-attention style. This is
// the plain-FMA version, kept for f32; bf16 and f16 take `prefill_mma`, which does the two
// products on the tensor cores, a CTA taking 64 (token, query head) rows of one KV head.

#define MAX_GROUP 4
#define WARPS 4

struct Ctx {
    const int* block_tables;
    int max_blocks;
    int block_size;
    int num_kv_heads;
};

// The cache block holding token `t` of sequence `seq`.
__device__ __forceinline__ int block_of(const Ctx& c, int seq, int t) {
    return c.block_tables[(i64)seq * c.max_blocks + t / c.block_size];
}

// Element offset of token `t`'s row for `kv_head`, given the block that holds it.
template <int D>
__device__ __forceinline__ i64 row_in_block(const Ctx& c, int block, int t, int kv_head) {
    const i64 slot = (i64)block * c.block_size + t % c.block_size;
    return (slot * c.num_kv_heads + kv_head) * D;
}

// Element offset of token `t`'s row for `kv_head` in sequence `seq`'s cache.
template <int D>
__device__ __forceinline__ i64 row_offset(const Ctx& c, int seq, int t, int kv_head) {
    return row_in_block<D>(c, block_of(c, seq, t), t, kv_head);
}

// One key for one query row held across a warp (each lane `PER` elements): the score, then
// the online-softmax update of the running max `m`, sum `l` and unnormalised output `acc`.
template <int PER>
__device__ __forceinline__ void attend(const float (&q)[PER], const float (&k)[PER],
                                       const float (&v)[PER], float& m, float& l,
                                       float (&acc)[PER]) {
    float s = 0.f;
#pragma unroll
    for (int p = 0; p < PER; ++p) s += q[p] * k[p];
    s = warp_sum(s);
    const float m_new = fmaxf(m, s);
    const float corr = __expf(m - m_new);
    const float w = __expf(s - m_new);
    l = l * corr + w;
#pragma unroll
    for (int p = 0; p < PER; ++p) acc[p] = acc[p] * corr + w * v[p];
    m = m_new;
}

// How a decode warp reads K/V rows: in 16-byte chunks (VEC elements), LPK lanes per row (the
// power of two at or above the row's chunk count, at most 32; lanes past the row idle, as at
// head sizes 80 and 96), CPL chunks per lane, so a warp reads KEYS rows at once and each lane
// UNROLL rows per iteration (their loads all in flight before any is used).
template <typename T, int D>
struct DecodeShape {
    static constexpr int VEC = 16 / sizeof(T);
    static constexpr int CHUNKS = D / VEC;
    static constexpr int LPK = CHUNKS > 16 ? 32 : CHUNKS > 8 ? 16 : CHUNKS > 4 ? 8 : CHUNKS > 2 ? 4 : CHUNKS > 1 ? 2 : 1;
    static constexpr int CPL = (CHUNKS + LPK - 1) / LPK;
    static constexpr int KEYS = 32 / LPK;
    static constexpr int UNROLL = CPL > 1 ? 2 : 4;
    static_assert(D % VEC == 0, "rows are whole 16-byte chunks");
};

// Output rows of the `heads` (at most WARPS) query heads from `h0` of sequence `seq`, merged
// from their split-KV partitions, by one CTA: warp g weighs head g's partitions (exp(max_p -
// max), into shared memory) and sums their weighted row sums; then each thread merges 4
// columns of a head, MERGE_BATCH partitions' 16-byte loads in flight. Partials come through L2
// (load_cg*): other SMs wrote them during this launch. At most MERGE_MAX_PARTS partitions
// (the launcher's plan keeps to it).
#define MERGE_BATCH 8
#define MERGE_MAX_PARTS 512
static_assert(MAX_GROUP <= WARPS, "a warp weighs each head's partitions");
template <typename T, int D>
__device__ void merge_partitions(T* __restrict__ out, const float* __restrict__ part_out,
                                 const float* __restrict__ part_ml, int seq, int h0, int heads,
                                 int num_q_heads, int parts) {
    static_assert(D % 4 == 0, "columns merge four at a time");
    __shared__ float s_w[MAX_GROUP][MERGE_MAX_PARTS];
    __shared__ float s_sum[MAX_GROUP];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (warp < heads) {
        const float* ml = part_ml + ((i64)seq * num_q_heads + h0 + warp) * parts * 2;
        float mx = NEG_INF;
        for (int p = lane; p < parts; p += 32) mx = fmaxf(mx, load_cg(ml + 2 * p));
        mx = warp_max(mx);
        float sum = 0.f;
        for (int p = lane; p < parts; p += 32) {
            const float w = mx == NEG_INF ? 0.f : __expf(load_cg(ml + 2 * p) - mx);
            s_w[warp][p] = w;
            sum += load_cg(ml + 2 * p + 1) * w;
        }
        sum = warp_sum(sum);
        if (lane == 0) s_sum[warp] = sum;
    }
    __syncthreads();
    constexpr int QUADS = D / 4;
    for (int i = threadIdx.x; i < heads * QUADS; i += blockDim.x) {
        const int g = i / QUADS, d = (i % QUADS) * 4;
        const i64 row = (i64)seq * num_q_heads + h0 + g;
        const float* po = part_out + row * parts * D + d;
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
        for (int p0 = 0; p0 < parts; p0 += MERGE_BATCH) {
            float4v v[MERGE_BATCH];
#pragma unroll
            for (int u = 0; u < MERGE_BATCH; ++u)
                if (p0 + u < parts) v[u] = load_cg4(po + (i64)(p0 + u) * D);
#pragma unroll
            for (int u = 0; u < MERGE_BATCH; ++u) {
                if (p0 + u >= parts) break;
                const float w = s_w[g][p0 + u];
                acc[0] += v[u].x * w;
                acc[1] += v[u].y * w;
                acc[2] += v[u].z * w;
                acc[3] += v[u].w * w;
            }
        }
        const float sum = s_sum[g];
        T* o = out + row * D + d;
#pragma unroll
        for (int c = 0; c < 4; ++c) o[c] = from_float<T>(sum > 0.f ? acc[c] / sum : 0.f);
    }
}

// grid: (num_kv_heads * ceil(group / MAX_GROUP), num_seqs, num_partitions); block: 32 * WARPS.
template <typename T, int D>
__device__ void decode(T* __restrict__ out, float* __restrict__ part_out,
                       float* __restrict__ part_ml, unsigned* __restrict__ done,
                       const T* __restrict__ q, i64 q_stride,
                       const T* __restrict__ k_cache, const T* __restrict__ v_cache, Ctx c,
                       const int* __restrict__ context_lens, int num_q_heads,
                       int partition_size, float scale) {
    using S = DecodeShape<T, D>;
    constexpr int VEC = S::VEC, LPK = S::LPK, CPL = S::CPL, KEYS = S::KEYS, U = S::UNROLL;
    __shared__ float s_m[WARPS][MAX_GROUP];
    __shared__ float s_l[WARPS][MAX_GROUP];
    __shared__ float s_acc[WARPS][MAX_GROUP][D];

    const int group = num_q_heads / c.num_kv_heads;
    const int chunks = (group + MAX_GROUP - 1) / MAX_GROUP;
    const int kv_head = blockIdx.x / chunks;
    const int g0 = (blockIdx.x % chunks) * MAX_GROUP;
    const int gn = min(MAX_GROUP, group - g0);  // uniform over the CTA
    const int seq = blockIdx.y, part = blockIdx.z, parts = gridDim.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int kg = lane / LPK, kl = lane % LPK;  // the row this lane reads, its place in it
    const int ctx = context_lens[seq];
    const int start = part * partition_size;
    const int end = min(ctx, start + partition_size);

    // Chunk j of this lane is chunk kl + j * LPK of a row: elements d0(j) .. d0(j) + VEC.
    float qv[MAX_GROUP][CPL][VEC], acc[MAX_GROUP][CPL][VEC], m[MAX_GROUP], l[MAX_GROUP];
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) {
        const int h = kv_head * group + g0 + g;
#pragma unroll
        for (int j = 0; j < CPL; ++j) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const int d = (kl + j * LPK) * VEC + i;
                qv[g][j][i] = (g < gn && d < D) ? to_float(q[seq * q_stride + (i64)h * D + d]) * scale : 0.f;
                acc[g][j][i] = 0.f;
            }
        }
        m[g] = NEG_INF;
        l[g] = 0.f;
    }

    // Each iteration the warp takes KEYS * U consecutive tokens; lane group kg reads tokens
    // base + u * KEYS + kg.
    // Block ids are read one iteration ahead, so an iteration's K/V loads wait on registers,
    // not on a block-table load: the walk is a chain of one memory round trip per iteration.
    constexpr int STEP = WARPS * KEYS * U;
    int blk[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int t = start + warp * KEYS * U + u * KEYS + kg;
        blk[u] = t < end ? block_of(c, seq, t) : 0;
    }
    for (int base = start + warp * KEYS * U; base < end; base += STEP) {
        Vec16 kr[U][CPL], vr[U][CPL];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int t = base + u * KEYS + kg;
            const i64 off = row_in_block<D>(c, blk[u], t, kv_head);
#pragma unroll
            for (int j = 0; j < CPL; ++j) {
                const bool ok = t < end && kl + j * LPK < S::CHUNKS;
                kr[u][j] = ok ? reinterpret_cast<const Vec16*>(k_cache + off)[kl + j * LPK] : Vec16{{0u, 0u, 0u, 0u}};
                vr[u][j] = ok ? reinterpret_cast<const Vec16*>(v_cache + off)[kl + j * LPK] : Vec16{{0u, 0u, 0u, 0u}};
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int t = base + STEP + u * KEYS + kg;
            blk[u] = t < end ? block_of(c, seq, t) : 0;
        }
        float s[U][MAX_GROUP];
#pragma unroll
        for (int u = 0; u < U; ++u) {
#pragma unroll
            for (int g = 0; g < MAX_GROUP; ++g) s[u][g] = 0.f;
#pragma unroll
            for (int j = 0; j < CPL; ++j) {
                float kf[VEC];
                chunk_to_float<T>(kr[u][j], kf);
#pragma unroll
                for (int g = 0; g < MAX_GROUP; ++g) {
#pragma unroll
                    for (int i = 0; i < VEC; ++i) s[u][g] += qv[g][j][i] * kf[i];
                }
            }
        }
        // Sum each row's score over its LPK lanes (one shuffle serves every row of the warp).
#pragma unroll
        for (int g = 0; g < MAX_GROUP; ++g) {
            if (g >= gn) break;  // uniform over the CTA
#pragma unroll
            for (int u = 0; u < U; ++u) {
#pragma unroll
                for (int o = LPK / 2; o > 0; o >>= 1) s[u][g] += __shfl_xor_sync(0xffffffffu, s[u][g], o);
            }
        }
#pragma unroll
        for (int g = 0; g < MAX_GROUP; ++g) {
            if (g >= gn) break;
            float mx = NEG_INF;
#pragma unroll
            for (int u = 0; u < U; ++u) {
                if (base + u * KEYS + kg < end) mx = fmaxf(mx, s[u][g]);
            }
            const float m_new = fmaxf(m[g], mx);
            if (m_new == NEG_INF) continue;  // this lane group has no token yet
            const float corr = __expf(m[g] - m_new);
            float p[U];
#pragma unroll
            for (int u = 0; u < U; ++u) p[u] = base + u * KEYS + kg < end ? __expf(s[u][g] - m_new) : 0.f;
            l[g] *= corr;
#pragma unroll
            for (int u = 0; u < U; ++u) l[g] += p[u];
#pragma unroll
            for (int j = 0; j < CPL; ++j) {
#pragma unroll
                for (int i = 0; i < VEC; ++i) acc[g][j][i] *= corr;
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    float vf[VEC];
                    chunk_to_float<T>(vr[u][j], vf);
#pragma unroll
                    for (int i = 0; i < VEC; ++i) acc[g][j][i] += p[u] * vf[i];
                }
            }
            m[g] = m_new;
        }
    }

    // Merge the warp's KEYS partial softmaxes (lane groups) into lanes 0 .. LPK - 1.
#pragma unroll
    for (int o = LPK; o < 32; o <<= 1) {
#pragma unroll
        for (int g = 0; g < MAX_GROUP; ++g) {
            const float m_o = __shfl_xor_sync(0xffffffffu, m[g], o);
            const float l_o = __shfl_xor_sync(0xffffffffu, l[g], o);
            const float m_new = fmaxf(m[g], m_o);
            const float f = m_new == NEG_INF ? 0.f : __expf(m[g] - m_new);
            const float f_o = m_new == NEG_INF ? 0.f : __expf(m_o - m_new);
            l[g] = l[g] * f + l_o * f_o;
#pragma unroll
            for (int j = 0; j < CPL; ++j) {
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    const float a_o = __shfl_xor_sync(0xffffffffu, acc[g][j][i], o);
                    acc[g][j][i] = acc[g][j][i] * f + a_o * f_o;
                }
            }
            m[g] = m_new;
        }
    }

    // Merge the warps' partial softmaxes.
#pragma unroll
    for (int g = 0; g < MAX_GROUP; ++g) {
        if (kg == 0) {
#pragma unroll
            for (int j = 0; j < CPL; ++j) {
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    const int d = (kl + j * LPK) * VEC + i;
                    if (d < D) s_acc[warp][g][d] = acc[g][j][i];
                }
            }
        }
        if (lane == 0) {
            s_m[warp][g] = m[g];
            s_l[warp][g] = l[g];
        }
    }
    __syncthreads();
    for (int i = threadIdx.x; i < gn * D; i += blockDim.x) {
        const int g = i / D, d = i % D;
        float mx = NEG_INF;
        for (int w = 0; w < WARPS; ++w) mx = fmaxf(mx, s_m[w][g]);
        float sum = 0.f, o = 0.f;
        if (mx != NEG_INF) {
            for (int w = 0; w < WARPS; ++w) {
                const float f = __expf(s_m[w][g] - mx);
                sum += s_l[w][g] * f;
                o += s_acc[w][g][d] * f;
            }
        }
        const int h = kv_head * group + g0 + g;
        if (parts == 1) {
            out[((i64)seq * num_q_heads + h) * D + d] = from_float<T>(sum > 0.f ? o / sum : 0.f);
        } else {
            const i64 slot = ((i64)seq * num_q_heads + h) * parts + part;
            part_out[slot * D + d] = o;
            if (d == 0) {
                part_ml[slot * 2] = mx;
                part_ml[slot * 2 + 1] = sum;
            }
        }
    }
    if (parts == 1) return;

    // The last of the partitions of this (sequence, head group) to finish merges them all, so
    // a split costs no second launch. Each CTA makes its partials visible device-wide before
    // counting itself done; the merger resets the count for the next launch (a CUDA graph
    // replays the same counters).
    __shared__ bool s_last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) {
        unsigned* count = done + (i64)seq * gridDim.x + blockIdx.x;
        s_last = atomicAdd(count, 1u) == (unsigned)parts - 1;
        if (s_last) *count = 0;
    }
    __syncthreads();
    if (!s_last) return;
    __threadfence();
    merge_partitions<T, D>(out, part_out, part_ml, seq, kv_head * group + g0, gn, num_q_heads, parts);
}

#define ROWS_PER_WARP 4
#define KEY_TILE 32

// grid: (ceil(max_query_len / (WARPS * ROWS_PER_WARP)), num_q_heads, num_seqs); block: 128.
// `cu_q` holds each sequence's first query row (num_seqs + 1 entries); a sequence's queries are
// the last q_len of its context_len tokens.
template <typename T, int D>
__device__ void prefill(T* __restrict__ out, const T* __restrict__ q, i64 q_stride,
                        const T* __restrict__ k_cache, const T* __restrict__ v_cache, Ctx c,
                        const int* __restrict__ cu_q, const int* __restrict__ context_lens,
                        int num_q_heads, float scale) {
    constexpr int PER = (D + 31) / 32;
    constexpr int ROWS = WARPS * ROWS_PER_WARP;
    // K and V tiles within 32 KiB of static shared memory (f32 at head_dim 256: 16 keys).
    constexpr int TILE = sizeof(T) * D * 2 * KEY_TILE <= 32768 ? KEY_TILE : KEY_TILE / 2;
    __shared__ T s_k[TILE * D];
    __shared__ T s_v[TILE * D];

    const int seq = blockIdx.z, h = blockIdx.y;
    const int kv_head = h / (num_q_heads / c.num_kv_heads);
    const int q0 = cu_q[seq], q_len = cu_q[seq + 1] - q0;
    const int row0 = blockIdx.x * ROWS;
    if (row0 >= q_len) return;  // uniform over the CTA
    const int ctx = context_lens[seq];
    const int first_pos = ctx - q_len;
    const int last_key = first_pos + min(row0 + ROWS, q_len) - 1;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

    float qv[ROWS_PER_WARP][PER], acc[ROWS_PER_WARP][PER], m[ROWS_PER_WARP], l[ROWS_PER_WARP];
    int pos[ROWS_PER_WARP];
#pragma unroll
    for (int i = 0; i < ROWS_PER_WARP; ++i) {
        const int r = row0 + warp * ROWS_PER_WARP + i;
        pos[i] = r < q_len ? first_pos + r : -1;
#pragma unroll
        for (int p = 0; p < PER; ++p) {
            const int d = lane + 32 * p;
            qv[i][p] = (r < q_len && d < D) ? to_float(q[(q0 + r) * q_stride + (i64)h * D + d]) * scale : 0.f;
            acc[i][p] = 0.f;
        }
        m[i] = NEG_INF;
        l[i] = 0.f;
    }

    for (int k0 = 0; k0 <= last_key; k0 += TILE) {
        __syncthreads();
        for (int i = threadIdx.x; i < TILE * D; i += blockDim.x) {
            const int key = k0 + i / D, d = i % D;
            if (key <= last_key) {
                const i64 off = row_offset<D>(c, seq, key, kv_head);
                s_k[i] = k_cache[off + d];
                s_v[i] = v_cache[off + d];
            }
        }
        __syncthreads();
        const int tile_end = min(TILE, last_key - k0 + 1);
        for (int j = 0; j < tile_end; ++j) {
            const int key = k0 + j;
            float kv[PER], vv[PER];
#pragma unroll
            for (int p = 0; p < PER; ++p) {
                const int d = lane + 32 * p;
                kv[p] = d < D ? to_float(s_k[j * D + d]) : 0.f;
                vv[p] = d < D ? to_float(s_v[j * D + d]) : 0.f;
            }
#pragma unroll
            for (int i = 0; i < ROWS_PER_WARP; ++i) {
                if (key > pos[i]) continue;  // causal (and padding rows: pos = -1); warp-uniform
                attend<PER>(qv[i], kv, vv, m[i], l[i], acc[i]);
            }
        }
    }

#pragma unroll
    for (int i = 0; i < ROWS_PER_WARP; ++i) {
        if (pos[i] < 0) continue;
        const int r = row0 + warp * ROWS_PER_WARP + i;
#pragma unroll
        for (int p = 0; p < PER; ++p) {
            const int d = lane + 32 * p;
            if (d < D)
                out[((i64)(q0 + r) * num_q_heads + h) * D + d] =
                    from_float<T>(l[i] > 0.f ? acc[i][p] / l[i] : 0.f);
        }
    }
}

#define MMA_ROWS 64  // (token, query head) rows per CTA of the tensor-core prefill: 16 per warp
#define KV_PAD 8     // elements of padding per shared K/V row, so a fragment's rows spread over banks

// Prefill on the tensor cores (bf16 and f16), flash-attention 2 style: each warp owns 16 query
// rows, keeps their Q fragments and output accumulators in registers, and for every key tile
// staged in shared memory computes S = Q K^T with mma, the online softmax on S's fragment (a
// row's four lanes reduce its max with two shuffles; its sum stays per lane until the end),
// and O += P V with mma, feeding P from S's registers (an accumulator pair of 8-key tiles is
// exactly an A fragment of 16 keys). Scores are scaled in f32 (not folded into Q, which would
// round it again) and exponentiated base 2. P is rounded to T for the second product, as
// flash-attention does; the row sums use the unrounded values. A CTA's rows are the (token,
// query head) pairs of one KV head's GQA group, so K/V tiles are loaded once for the group.
// grid: (ceil(max_query_len * group / MMA_ROWS), num_kv_heads, num_seqs); block: 128.
template <typename T, int D>
__device__ void prefill_mma(T* __restrict__ out, const T* __restrict__ q, i64 q_stride,
                            const T* __restrict__ k_cache, const T* __restrict__ v_cache, Ctx c,
                            const int* __restrict__ cu_q, const int* __restrict__ context_lens,
                            int num_q_heads, float scale) {
    static_assert(D % 16 == 0, "the tensor-core prefill needs head_dim % 16 == 0");
    static_assert(sizeof(T) == 2, "the tensor-core prefill takes bf16 or f16");
    // Keys per tile: K and V tiles fit 48 KiB; at head size 256 also the registers (Q and O
    // fragments take 192 a lane, and 32 keys spilled on sm_80).
    constexpr int BC = D <= 128 ? 64 : 16;
    constexpr int STRIDE = D + KV_PAD;      // elements per shared row
    constexpr int CHUNKS = D / 8;           // 16-byte chunks per cached row
    __shared__ Vec16 s_kv[2 * BC * STRIDE / 8];
    T* s_k = reinterpret_cast<T*>(s_kv);
    T* s_v = s_k + BC * STRIDE;

    // A CTA serves one KV head: its rows are (token, query head of the group) pairs, token
    // major, so the group's heads share every K/V tile it loads (and a decode-like sequence of
    // one new token still fills `group` rows).
    const int seq = blockIdx.z, kv_head = blockIdx.y;
    const int group = num_q_heads / c.num_kv_heads;
    const int q0 = cu_q[seq], q_len = cu_q[seq + 1] - q0;
    const int rows = q_len * group;
    // Row tiles in reverse, so the CTAs with the most keys (the diagonal's far end) start first.
    const int row0 = (gridDim.x - 1 - blockIdx.x) * MMA_ROWS;
    if (row0 >= rows) return;  // uniform over the CTA
    const int ctx = context_lens[seq], first_pos = ctx - q_len;
    const int last_key = first_pos + (min(row0 + MMA_ROWS, rows) - 1) / group;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int warp_row0 = row0 + warp * 16;
    // The last key any of the warp's rows attends to (-1: the warp has no rows).
    const int warp_last = warp_row0 < rows ? first_pos + min(warp_row0 + 15, rows - 1) / group : -1;
    // This lane's two rows, g and g + 8 of the warp's, and their positions (-1 past the
    // sequence). Row r is token r / group, query head kv_head * group + r % group: recomputed
    // where needed (Q load, output), which keeps the d256 kernel within registers.
    const int r_lo = warp_row0 + g, r_hi = r_lo + 8;
    const int pos_lo = r_lo < rows ? first_pos + r_lo / group : -1;
    const int pos_hi = r_hi < rows ? first_pos + r_hi / group : -1;
    // Element offset of row r's query head in q or out (token rows `token_stride` apart).
    auto row_at = [&](int r, i64 token_stride) {
        return (i64)(q0 + r / group) * token_stride + (i64)(kv_head * group + r % group) * D;
    };

    unsigned qa[D / 16][4];
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
#pragma unroll
        for (int reg = 0; reg < 4; ++reg) {
            const int r = reg & 1 ? r_hi : r_lo;
            const T* p = q + row_at(r, q_stride) + ks * 16 + (reg >> 1) * 8 + 2 * t;
            qa[ks][reg] = r < rows ? pack2(p[0], p[1]) : 0u;
        }
    }

    float o[D / 8][4];
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) o[dt][0] = o[dt][1] = o[dt][2] = o[dt][3] = 0.f;
    float m_lo = NEG_INF, m_hi = NEG_INF, l_lo = 0.f, l_hi = 0.f;
    const float scale_log2 = scale * 1.4426950408889634f;

    // ldmatrix: lane 8i + r addresses row r of 8x8 matrix i. For S, matrix i is keys
    // (nt + i / 2) * 8.., dims ks * 16 + (i % 2) * 8..: the B fragments of two key tiles. For
    // P V (transposed), keys kk * 16 + (i % 2) * 8.., dims (dt + i / 2) * 8...
    const int mi = lane >> 3, mr = lane & 7;

    // The online softmax of one tile's scores and O += P V, for a warp with rows in the tile.
    auto softmax_and_pv = [&](float (&s)[BC / 8][4], int k0) {
        float mx_lo = NEG_INF, mx_hi = NEG_INF;
#pragma unroll
        for (int nt = 0; nt < BC / 8; ++nt) {
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int key = k0 + nt * 8 + 2 * t + e;
                s[nt][e] = key <= pos_lo ? s[nt][e] * scale_log2 : NEG_INF;
                s[nt][2 + e] = key <= pos_hi ? s[nt][2 + e] * scale_log2 : NEG_INF;
                mx_lo = fmaxf(mx_lo, s[nt][e]);
                mx_hi = fmaxf(mx_hi, s[nt][2 + e]);
            }
        }
        // A row's 8 keys of each tile sit in the 4 lanes of its quad.
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
        mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
        mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
        const float new_lo = fmaxf(m_lo, mx_lo), new_hi = fmaxf(m_hi, mx_hi);
        // A row that has seen no key yet keeps max -inf; subtract 0 instead (-inf - -inf is NaN).
        const float base_lo = new_lo == NEG_INF ? 0.f : new_lo;
        const float base_hi = new_hi == NEG_INF ? 0.f : new_hi;
        const float corr_lo = exp2f(m_lo - base_lo), corr_hi = exp2f(m_hi - base_hi);
        m_lo = new_lo;
        m_hi = new_hi;
        l_lo *= corr_lo;
        l_hi *= corr_hi;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
            o[dt][0] *= corr_lo;
            o[dt][1] *= corr_lo;
            o[dt][2] *= corr_hi;
            o[dt][3] *= corr_hi;
        }

#pragma unroll
        for (int kk = 0; kk < BC / 16; ++kk) {
            float p[2][4];
#pragma unroll
            for (int half = 0; half < 2; ++half) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    p[half][e] = exp2f(s[2 * kk + half][e] - (e < 2 ? base_lo : base_hi));
                }
                l_lo += p[half][0] + p[half][1];
                l_hi += p[half][2] + p[half][3];
            }
            unsigned pa[4];
#pragma unroll
            for (int reg = 0; reg < 4; ++reg) {
                const float* pr = &p[reg >> 1][(reg & 1) * 2];
                pa[reg] = pack2_rounded<T>(pr[0], pr[1]);
            }
            const T* vrow = s_v + (kk * 16 + (mi & 1) * 8 + mr) * STRIDE + (mi >> 1) * 8;
#pragma unroll
            for (int dt = 0; dt < D / 8; dt += 2) {
                unsigned b[4];
                ldmatrix_x4<true>(b, vrow + dt * 8);
                mma_16x8x16<T>(o[dt], pa, b[0], b[1]);
                mma_16x8x16<T>(o[dt + 1], pa, b[2], b[3]);
            }
        }
    };

    // K and V tiles arrive by cp.async, each load overlapping the other tile's use: the next K
    // tile loads during this tile's softmax and P V, the next V tile during the next S. Rows
    // past the last key are zero-filled: P is 0 there, and 0 times garbage may be NaN.
    auto load = [&](T* dst, const T* cache, int k0) {
        for (int i = threadIdx.x; i < BC * CHUNKS; i += blockDim.x) {
            const int key = i / CHUNKS, chunk = i % CHUNKS;
            const bool valid = k0 + key <= last_key;
            const T* src = valid ? cache + row_offset<D>(c, seq, k0 + key, kv_head) + chunk * 8 : cache;
            cp_async16(dst + key * STRIDE + chunk * 8, src, valid);
        }
        cp_async_commit();
    };
    load(s_k, k_cache, 0);
    load(s_v, v_cache, 0);
    for (int k0 = 0; k0 <= last_key; k0 += BC) {
        const bool active = k0 <= warp_last;  // warp-uniform: else the tile is in the warp's future
        const bool more = k0 + BC <= last_key;
        cp_async_wait<1>();  // this K tile (its V tile may still be in flight)
        __syncthreads();

        float s[BC / 8][4];
        if (active) {
#pragma unroll
            for (int nt = 0; nt < BC / 8; nt += 2) {
#pragma unroll
                for (int e = 0; e < 4; ++e) s[nt][e] = s[nt + 1][e] = 0.f;
                const T* krow = s_k + ((nt + (mi >> 1)) * 8 + mr) * STRIDE + (mi & 1) * 8;
#pragma unroll
                for (int ks = 0; ks < D / 16; ++ks) {
                    unsigned b[4];
                    ldmatrix_x4<false>(b, krow + ks * 16);
                    mma_16x8x16<T>(s[nt], qa[ks], b[0], b[1]);
                    mma_16x8x16<T>(s[nt + 1], qa[ks], b[2], b[3]);
                }
            }
        }

        __syncthreads();  // every warp is done with the K tile: load the next
        if (more) {
            load(s_k, k_cache, k0 + BC);
        } else {
            cp_async_commit();  // an empty group keeps the waits' counting
        }
        cp_async_wait<1>();  // this V tile
        __syncthreads();
        if (active) {
            softmax_and_pv(s, k0);
        }
        __syncthreads();  // every warp is done with the V tile: load the next
        if (more) {
            load(s_v, v_cache, k0 + BC);
        } else {
            cp_async_commit();
        }
    }

    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
    l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
    l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int r = half ? r_hi : r_lo;
        const float l = half ? l_hi : l_lo;
        if (r >= rows) continue;
        T* dst = out + row_at(r, (i64)num_q_heads * D) + 2 * t;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt) {
            dst[dt * 8] = from_float<T>(l > 0.f ? o[dt][2 * half] / l : 0.f);
            dst[dt * 8 + 1] = from_float<T>(l > 0.f ? o[dt][2 * half + 1] / l : 0.f);
        }
    }
}

#define INSTANTIATE(S, T, D)                                                                  \
    extern "C" __global__ void __launch_bounds__(32 * WARPS, 4) paged_attention_decode_##S##_d##D( \
        T* out, float* part_out, float* part_ml, unsigned* done, const T* q, i64 q_stride,   \
        const T* k_cache, const T* v_cache, const int* block_tables, int max_blocks,          \
        int block_size, int num_kv_heads, const int* context_lens, int num_q_heads,           \
        int partition_size, float scale) {                                                    \
        Ctx c = {block_tables, max_blocks, block_size, num_kv_heads};                         \
        decode<T, D>(out, part_out, part_ml, done, q, q_stride, k_cache, v_cache, c,          \
                     context_lens, num_q_heads, partition_size, scale);                       \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(32 * WARPS, 1) attention_prefill_##S##_d##D( \
        T* out, const T* q, i64 q_stride, const T* k_cache, const T* v_cache,                 \
        const int* block_tables, int max_blocks, int block_size, int num_kv_heads,            \
        const int* cu_q, const int* context_lens, int num_q_heads, float scale) {             \
        Ctx c = {block_tables, max_blocks, block_size, num_kv_heads};                         \
        PREFILL_##S<T, D>(out, q, q_stride, k_cache, v_cache, c, cu_q, context_lens,          \
                          num_q_heads, scale);                                                \
    }

// f32 has no tensor-core path (its reference needs f32 products); 16-bit types take mma.
// The prefill's launch bounds say one CTA per SM is enough: with ptxas's own occupancy target
// the tensor-core kernel spilled registers at head size 32 on sm_80.
#define PREFILL_f32 prefill
#define PREFILL_bf16 prefill_mma
#define PREFILL_f16 prefill_mma
