// Sampling over logits rows: argmax, top-k (values and token ids, best first), and a draw
// from each row's softmax. Order: higher value first, ties to the lower token id; NaN counts
// as -infinity.

struct Best {
    float v;
    int i;
};

// Is `a` ranked before `b`?
__device__ __forceinline__ bool ahead(Best a, Best b) {
    return a.v > b.v || (a.v == b.v && a.i < b.i);
}

__device__ __forceinline__ Best warp_best(Best b) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        Best other;
        other.v = __shfl_xor_sync(0xffffffffu, b.v, o);
        other.i = __shfl_xor_sync(0xffffffffu, b.i, o);
        if (ahead(other, b)) b = other;
    }
    return b;
}

// Inclusive prefix sum of `v` over the warp's lanes, in double.
__device__ __forceinline__ double prefix_sum(float v, int lane) {
    double s = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const double other = __shfl_up_sync(0xffffffffu, s, o);
        if (lane >= o) s += other;
    }
    return s;
}

__device__ __forceinline__ int warp_min_int(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = min(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ int warp_max_int(int v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// The best element of the row ranked after `after` (pass i = -1 for "no bound").
// Every thread of the block gets the result.
template <typename T>
__device__ Best block_best(const T* __restrict__ row, int vocab, Best after) {
    __shared__ float sv[32];
    __shared__ int si[32];
    Best b;
    b.v = NEG_INF;
    b.i = 0x7fffffff;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        float v = to_float(row[j]);
        if (v != v) v = NEG_INF;
        Best c;
        c.v = v;
        c.i = j;
        if ((after.i < 0 || ahead(after, c)) && ahead(c, b)) b = c;
    }
    b = warp_best(b);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) {
        sv[warp] = b.v;
        si[warp] = b.i;
    }
    __syncthreads();
    Best r;
    r.v = NEG_INF;
    r.i = 0x7fffffff;
    for (int w = 0; w < (int)((blockDim.x + 31) >> 5); ++w) {
        Best c;
        c.v = sv[w];
        c.i = si[w];
        if (ahead(c, r)) r = c;
    }
    return r;
}

// grid: (rows), block: 1024.
template <typename T>
__device__ void argmax(const T* __restrict__ logits, int vocab, int* __restrict__ out) {
    Best none;
    none.v = 0.f;
    none.i = -1;
    const Best b = block_best(logits + (i64)blockIdx.x * vocab, vocab, none);
    if (threadIdx.x == 0) out[blockIdx.x] = b.i < vocab ? b.i : 0;
}

// top_k's fallback: k passes over the row, each finding the next best (O(k * vocab) reads).
template <typename T>
__device__ void top_k_by_passes(const T* __restrict__ row, int vocab, int k,
                                float* __restrict__ values, int* __restrict__ ids) {
    Best prev;
    prev.v = 0.f;
    prev.i = -1;
    for (int n = 0; n < k; ++n) {
        const Best b = block_best(row, vocab, prev);
        if (threadIdx.x == 0) {
            const bool found = b.i < vocab;
            values[n] = found ? b.v : NEG_INF;
            ids[n] = found ? b.i : -1;
        }
        prev = b;
        if (b.i >= vocab) prev.i = 0x7fffffff;
    }
}

__device__ __forceinline__ float finite_or_neg_inf(float v) { return v != v ? NEG_INF : v; }

// The row's largest logit (NaN as -inf); every thread gets it. `scratch`: a float per warp.
template <typename T>
__device__ float block_row_max(const T* __restrict__ row, int vocab, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float mx = NEG_INF;
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) mx = fmaxf(mx, finite_or_neg_inf(to_float(row[j])));
    mx = warp_max(mx);
    __syncthreads();
    if (lane == 0) scratch[warp] = mx;
    __syncthreads();
    mx = NEG_INF;
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) mx = fmaxf(mx, scratch[w]);
    return mx;
}

// Candidates top_k ranks in shared memory; margins below the row's best it tries for the band
// holding the k best: 0.25 * 2^m logits for m < TOPK_MARGINS (0.25 to 128).
#define TOPK_CANDIDATES 2048
#define TOPK_MARGINS 10
__device__ __forceinline__ float top_k_margin(int m) { return 0.25f * (float)(1 << m); }

// The k best of each row (value, id), best first; missing entries (k > vocab) are (-inf, -1).
// Three passes over the row: its best value M; how many values lie within each of a few
// margins of M (0.25 to 128); the values within the smallest margin that holds at least k,
// appended to shared memory, where each candidate's rank is counted against the others (ties
// to the lower id). The band holds every one of the k best, so the result is exact; when no
// band holds k within TOPK_CANDIDATES values (a flat top, fewer than k finite values), it
// falls back to k passes. grid: (rows), block: 1024.
template <typename T>
__device__ void top_k(const T* __restrict__ logits, int vocab, int k, float* __restrict__ values,
                      int* __restrict__ ids) {
    __shared__ float scratch[32];
    __shared__ float cand_v[TOPK_CANDIDATES];
    __shared__ int cand_i[TOPK_CANDIDATES];
    __shared__ unsigned count;
    const T* row = logits + (i64)blockIdx.x * vocab;
    values += (i64)blockIdx.x * k;
    ids += (i64)blockIdx.x * k;
    const float mx = block_row_max(row, vocab, scratch);
    float floor = NEG_INF;
    if (mx != NEG_INF) {
        int within[TOPK_MARGINS];
#pragma unroll
        for (int m = 0; m < TOPK_MARGINS; ++m) within[m] = 0;
        for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
            const float v = finite_or_neg_inf(to_float(row[j]));
#pragma unroll
            for (int m = 0; m < TOPK_MARGINS; ++m) within[m] += v >= mx - top_k_margin(m);
        }
#pragma unroll
        for (int m = 0; m < TOPK_MARGINS; ++m) {
            const float n = block_sum((float)within[m], scratch);
            if (floor == NEG_INF && n >= (float)k && n <= (float)TOPK_CANDIDATES)
                floor = mx - top_k_margin(m);
        }
    }
    if (floor == NEG_INF) {
        top_k_by_passes(row, vocab, k, values, ids);
        return;
    }
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    for (int j = threadIdx.x; j < vocab; j += blockDim.x) {
        const float v = finite_or_neg_inf(to_float(row[j]));
        if (v >= floor) {
            const unsigned at = atomicAdd(&count, 1u);
            cand_v[at] = v;
            cand_i[at] = j;
        }
    }
    __syncthreads();
    const int n = (int)count;
    for (int c = threadIdx.x; c < n; c += blockDim.x) {
        Best me;
        me.v = cand_v[c];
        me.i = cand_i[c];
        int rank = 0;
        for (int o = 0; o < n; ++o) {
            Best other;
            other.v = cand_v[o];
            other.i = cand_i[o];
            rank += ahead(other, me);
        }
        if (rank < k) {
            values[rank] = me.v;
            ids[rank] = me.i;
        }
    }
}

// One change to one logit before a draw (the host sampler's LogitEdit, same layout): the logit
// times scale_pos if positive, else times scale_neg, then plus add; add of -inf forbids it.
struct LogitEdit {
    unsigned row;
    unsigned token;
    float scale_pos;
    float scale_neg;
    float add;
};

// Applies n edits to `rows` rows of logits (vocab wide), a thread per edit (each (row, token)
// at most once); edits outside the rows are skipped. grid: (ceil(n / 256)), block: 256.
template <typename T>
__device__ void edit_logits(T* __restrict__ logits, int vocab, int rows,
                            const LogitEdit* __restrict__ edits, int n) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e >= n) return;
    const LogitEdit ed = edits[e];
    if (ed.token >= (unsigned)vocab || ed.row >= (unsigned)rows) return;
    T* at = logits + (i64)ed.row * vocab + ed.token;
    float l = to_float(*at);
    if (ed.add == NEG_INF) {
        l = NEG_INF;
    } else {
        l = (l > 0.f ? l * ed.scale_pos : l * ed.scale_neg) + ed.add;
    }
    *at = from_float<T>(l);
}

// Row r's softmax mass at temperature[r] (> 0) relative to its largest logit: the sum of
// exp((l - max) / t), NaN and -inf weighing nothing (0 for a row without a finite logit). A
// top-p or min-p cut drawn on the host from the row's best candidates needs it to be a cut
// over the whole vocabulary. grid: (rows), block: 1024.
template <typename T>
__device__ void softmax_mass(const T* __restrict__ logits, int vocab,
                             const float* __restrict__ temperature, float* __restrict__ mass) {
    __shared__ float scratch[32];
    const T* row = logits + (i64)blockIdx.x * vocab;
    const float mx = block_row_max(row, vocab, scratch);
    const float inv_t = 1.f / temperature[blockIdx.x];
    float m = 0.f;
    if (mx != NEG_INF) {
        for (int j = threadIdx.x; j < vocab; j += blockDim.x)
            m += __expf((finite_or_neg_inf(to_float(row[j])) - mx) * inv_t);
    }
    m = block_sum(m, scratch);
    if (threadIdx.x == 0) mass[blockIdx.x] = m;
}

// Tokens per tile of softmax_draw; a row has at most DRAW_MAX_TILES tiles (vocab <= 1M).
#define DRAW_TILE 1024
#define DRAW_MAX_TILES 1024

// Row r's token: the argmax where temperature[r] is 0; otherwise a draw from its softmax at
// that temperature, walking the vocabulary in token order: the first token whose cumulative
// weight exp((l - max) / t) exceeds u[r] times the row's total (u uniform in [0, 1), drawn on
// the host from the sequence's own random stream). The host sampler's untruncated draw, up to
// summation order; if rounding leaves the target past the end, the last token with weight.
// Tile masses first (a warp per tile, coalesced), then warp 0 finds the tile and the token in
// it by prefix sums. grid: (rows), block: 1024.
template <typename T>
__device__ void softmax_draw(const T* __restrict__ logits, int vocab,
                             const float* __restrict__ temperature, const double* __restrict__ u,
                             int* __restrict__ out) {
    __shared__ float tile_mass[DRAW_MAX_TILES];
    __shared__ float scratch[32];
    const T* row = logits + (i64)blockIdx.x * vocab;
    const float t = temperature[blockIdx.x];
    if (t <= 0.f) {
        Best none;
        none.v = 0.f;
        none.i = -1;
        const Best b = block_best(row, vocab, none);
        if (threadIdx.x == 0) out[blockIdx.x] = b.i < vocab ? b.i : 0;
        return;
    }
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const float mx = block_row_max(row, vocab, scratch);
    const float inv_t = 1.f / t;
    const int tiles = (vocab + DRAW_TILE - 1) / DRAW_TILE;
    // Every logit -inf or NaN: nothing has weight.
    const bool empty = mx == NEG_INF;
    for (int tile = warp; tile < tiles && !empty; tile += warps) {
        float m = 0.f;
        for (int i = lane; i < DRAW_TILE; i += 32) {
            const int j = tile * DRAW_TILE + i;
            if (j < vocab) m += __expf((finite_or_neg_inf(to_float(row[j])) - mx) * inv_t);
        }
        m = warp_sum(m);
        if (lane == 0) tile_mass[tile] = m;
    }
    __syncthreads();
    if (warp != 0) return;
    if (empty) {
        if (lane == 0) out[blockIdx.x] = 0;
        return;
    }
    double total = 0.0;
    for (int tile = lane; tile < tiles; tile += 32) total += tile_mass[tile];
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) total += __shfl_xor_sync(0xffffffffu, total, o);
    // The tile holding the target, and the mass before it; past the end (rounding), the last
    // tile with mass, searched for its last token with weight.
    double target = u[blockIdx.x] * total, before = 0.0;
    int found = tiles, last = 0;
    for (int base = 0; base < tiles; base += 32) {
        const int tile = base + lane;
        const float m = tile < tiles ? tile_mass[tile] : 0.f;
        const double incl = before + prefix_sum(m, lane);
        found = warp_min_int(incl > target && tile < tiles ? tile : tiles);
        last = warp_max_int(m > 0.f ? tile : last);
        if (found < tiles) {
            before = __shfl_sync(0xffffffffu, incl - m, found - base);
            break;
        }
        before = __shfl_sync(0xffffffffu, incl, 31);
    }
    if (found == tiles) {
        found = last;
        target = (double)__int_as_float(0x7f800000u);
    }
    int token = -1, last_token = found * DRAW_TILE;
    for (int i = 0; i < DRAW_TILE && token < 0; i += 32) {
        const int j = found * DRAW_TILE + i + lane;
        const float w = j < vocab ? __expf((finite_or_neg_inf(to_float(row[j])) - mx) * inv_t) : 0.f;
        const double incl = before + prefix_sum(w, lane);
        const int first = warp_min_int(incl > target && j < vocab ? j : 0x7fffffff);
        last_token = warp_max_int(w > 0.f ? j : last_token);
        if (first != 0x7fffffff) token = first;
        before = __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) out[blockIdx.x] = token >= 0 ? token : last_token;
}

#define INSTANTIATE(S, T)                                                                     \
    extern "C" __global__ void __launch_bounds__(1024)                                        \
        argmax_##S(const T* logits, int vocab, int* out) {                                    \
        argmax<T>(logits, vocab, out);                                                        \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(1024)                                        \
        top_k_##S(const T* logits, int vocab, int k, float* values, int* ids) {               \
        top_k<T>(logits, vocab, k, values, ids);                                              \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(1024)                                        \
        softmax_draw_##S(const T* logits, int vocab, const float* temperature, const double* u,\
                         int* out) {                                                          \
        softmax_draw<T>(logits, vocab, temperature, u, out);                                  \
    }                                                                                         \
    extern "C" __global__ void edit_logits_##S(T* logits, int vocab, int rows,               \
                                               const LogitEdit* edits, int n) {               \
        edit_logits<T>(logits, vocab, rows, edits, n);                                        \
    }                                                                                         \
    extern "C" __global__ void __launch_bounds__(1024)                                        \
        softmax_mass_##S(const T* logits, int vocab, const float* temperature, float* mass) { \
        softmax_mass<T>(logits, vocab, temperature, mass);                                    \
    }
