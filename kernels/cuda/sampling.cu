// Sampling helpers over logits rows: argmax, and top-k (values and token ids, best first).
// Order: higher value first, ties to the lower token id; NaN counts as -infinity.

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

// k passes over the row, each finding the next best: O(k * vocab) reads, meant for the small k
// of top-k sampling (up to a few hundred). grid: (rows), block: 1024.
template <typename T>
__device__ void top_k(const T* __restrict__ logits, int vocab, int k, float* __restrict__ values,
                      int* __restrict__ ids) {
    const T* row = logits + (i64)blockIdx.x * vocab;
    Best prev;
    prev.v = 0.f;
    prev.i = -1;
    for (int n = 0; n < k; ++n) {
        const Best b = block_best(row, vocab, prev);
        if (threadIdx.x == 0) {
            const bool found = b.i < vocab;
            values[(i64)blockIdx.x * k + n] = found ? b.v : NEG_INF;
            ids[(i64)blockIdx.x * k + n] = found ? b.i : -1;
        }
        prev = b;
        if (b.i >= vocab) prev.i = 0x7fffffff;
    }
}

#define INSTANTIATE(S, T)                                                                     \
    extern "C" __global__ void argmax_##S(const T* logits, int vocab, int* out) {             \
        argmax<T>(logits, vocab, out);                                                        \
    }                                                                                         \
    extern "C" __global__ void top_k_##S(const T* logits, int vocab, int k, float* values,    \
                                         int* ids) {                                          \
        top_k<T>(logits, vocab, k, values, ids);                                              \
    }
