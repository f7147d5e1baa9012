// Projections of a few rows (GEMV): y = x · Wᵀ for at most GEMV_MAX_ROWS rows of x, with W
// [n, k] row-major as Hugging Face stores it, read once in 16-byte chunks. At small batch a
// decode step is the read of its weights, and what sits between two projections (the residual
// add, the next input norm, SiLU-and-mul) costs a launch each for almost no bytes; these fold
// it into the projections:
//   gemv_add:        residual += x · Wᵀ                (o and down, with their residual add)
//   gemv_norm:       out = rms_norm(residual) · Wᵀ     (a projection after the input norm)
//   gemv_norm_gated: the same through silu(gate) * up  ([gate; up], with the post-attention norm)
//   gemv_norm_rope:  the same for [q; k; v], rotated, its k and v written to the cache (the
//                    attention input: input norm, q/k/v, rotary and cache write in one launch)
// The projection is rounded to T where the separate ops store it (before the add, the SiLU,
// the rotation); the normed input is not: the product sums w·(x·norm) in f32 and scales by
// 1 / rms once at the end, which costs a third of the arithmetic per weight byte of rounding
// each normed element (and is closer to exact than the separate ops, which store it in T).
//
// A warp computes a pair of W rows (plain: 2p and 2p + 1; gated: gate row p and up row
// p + n / 2, so SiLU-and-mul needs nothing from other warps; rope: the rows j and
// j + head_dim / 2 of a head, the pair rotary turns together), its lanes splitting k by 16-byte
// chunks with GEMV_UNROLL chunks of each row in flight per lane (a 2048-wide row is one round
// trip). Every read is a 16-byte load; W's bypass L1, so x (a few KB, read by every warp) stays
// there.
// grid: (ceil(pairs / GEMV_WARPS)), block: 32 * GEMV_WARPS.

#define GEMV_MAX_ROWS 4
#define GEMV_WARPS 4
#define GEMV_UNROLL 8
static_assert(GEMV_WARPS >= GEMV_MAX_ROWS, "a warp per row finds the rows' norms");

// What a GEMV does with its results.
#define OUT_STORE 0  // out = y
#define OUT_ADD 1    // out += y (the residual)
#define OUT_GATED 2  // out = silu(gate) * up
#define OUT_ROPE 3   // out = y, q and k heads rotated; k and v also to the cache

// The rotary tables and cache of OUT_ROPE: cos and sin are [rows, head_dim / 2], the caches
// slot-major (KV_LAYOUT.md), `slots` one per row (negative: do not write).
template <typename T>
struct RopeKv {
    const float* cos;
    const float* sin;
    int num_q_heads, num_kv_heads, head_dim;
    T* k_cache;
    T* v_cache;
    const i64* slots;
};

template <typename T, bool NORM, int OUT>
__device__ void gemv(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ norm_w,
                     float eps, const T* __restrict__ w, int rows, int n, int k, RopeKv<T> rope) {
    constexpr bool GATED = OUT == OUT_GATED;
    constexpr int VEC = 16 / sizeof(T);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int chunks = k / VEC;
    const Vec16* xv = reinterpret_cast<const Vec16*>(x);

    const int pairs = OUT == OUT_STORE || OUT == OUT_ADD ? (n + 1) / 2 : n / 2;
    const int pair = blockIdx.x * GEMV_WARPS + warp;
    const bool active = pair < pairs;
    const int half = rope.head_dim / 2;  // OUT_ROPE only
    const int head = OUT == OUT_ROPE ? pair / half : 0, j = OUT == OUT_ROPE ? pair % half : 0;
    const int r0 = GATED ? pair : OUT == OUT_ROPE ? head * rope.head_dim + j : 2 * pair;
    const int r1 = GATED ? pair + n / 2 : OUT == OUT_ROPE ? r0 + half : 2 * pair + 1;
    const bool has_r1 = r1 < n;  // false only for the last row of an odd n
    const Vec16* w0 = reinterpret_cast<const Vec16*>(w + (i64)r0 * k);
    const Vec16* w1 = reinterpret_cast<const Vec16*>(w + (i64)(has_r1 ? r1 : r0) * k);

    // This lane's chunks of both rows, GEMV_UNROLL at a time: the first batch is asked for
    // before the norms below, so its latency overlaps theirs.
    Vec16 a[GEMV_UNROLL], b[GEMV_UNROLL];
    auto load = [&](int base) {
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            const int c = base + 32 * u;
            if (c < chunks) {
                a[u] = load16<true>(w0 + c);
                b[u] = load16<true>(w1 + c);
            }
        }
    };
    if (active) load(lane);

    // Each of the first `rows` warps finds its row's 1 / rms.
    __shared__ float inv_rms[GEMV_MAX_ROWS];
    if (NORM) {
        if (warp < rows) {
            float ss = 0.f;
            for (int c = lane; c < chunks; c += 32) {
                float v[VEC];
                chunk_to_float<T>(load16(xv + (i64)warp * chunks + c), v);
#pragma unroll
                for (int i = 0; i < VEC; ++i) ss += v[i] * v[i];
            }
            ss = warp_sum(ss);
            if (lane == 0) inv_rms[warp] = rsqrtf(ss / k + eps);
        }
        __syncthreads();
    }
    if (!active) return;

    float acc0[GEMV_MAX_ROWS], acc1[GEMV_MAX_ROWS];
#pragma unroll
    for (int m = 0; m < GEMV_MAX_ROWS; ++m) acc0[m] = acc1[m] = 0.f;
    for (int base = lane; base < chunks; base += 32 * GEMV_UNROLL) {
        if (base != lane) load(base);
#pragma unroll
        for (int u = 0; u < GEMV_UNROLL; ++u) {
            const int c = base + 32 * u;
            if (c >= chunks) break;
            float wa[VEC], wb[VEC], scale[VEC];
            chunk_to_float<T>(a[u], wa);
            chunk_to_float<T>(b[u], wb);
            if (NORM) chunk_to_float<T>(load16(reinterpret_cast<const Vec16*>(norm_w) + c), scale);
#pragma unroll
            for (int m = 0; m < GEMV_MAX_ROWS; ++m) {
                if (m >= rows) break;
                float xf[VEC];
                chunk_to_float<T>(load16(xv + (i64)m * chunks + c), xf);
                float s0 = 0.f, s1 = 0.f;
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    const float v = NORM ? xf[i] * scale[i] : xf[i];
                    s0 = fmaf(wa[i], v, s0);
                    s1 = fmaf(wb[i], v, s1);
                }
                acc0[m] += s0;
                acc1[m] += s1;
            }
        }
    }

    // Lane m writes row m's results.
#pragma unroll
    for (int m = 0; m < GEMV_MAX_ROWS; ++m) {
        if (m >= rows) break;
        const float f = NORM ? inv_rms[m] : 1.f;
        const float y0 = to_float(from_float<T>(warp_sum(acc0[m]) * f));
        const float y1 = to_float(from_float<T>(warp_sum(acc1[m]) * f));
        if (lane != m) continue;
        if (OUT == OUT_GATED) {
            out[(i64)m * (n / 2) + pair] = from_float<T>(y0 / (1.f + __expf(-y0)) * y1);
        } else if (OUT == OUT_ADD) {
            T* row = out + (i64)m * n;
            row[r0] = from_float<T>(to_float(row[r0]) + y0);
            if (has_r1) row[r1] = from_float<T>(to_float(row[r1]) + y1);
        } else if (OUT == OUT_ROPE) {
            // As rotary_table, then write_kv: rotate q and k heads, cache k and v.
            const int nq = rope.num_q_heads, nkv = rope.num_kv_heads;
            float a = y0, b = y1;
            if (head < nq + nkv) {
                const float c = rope.cos[(i64)m * half + j], s = rope.sin[(i64)m * half + j];
                a = y0 * c - y1 * s;
                b = y1 * c + y0 * s;
            }
            const T t0 = from_float<T>(a), t1 = from_float<T>(b);
            out[(i64)m * n + r0] = t0;
            out[(i64)m * n + r1] = t1;
            const i64 slot = rope.slots[m];
            if (head >= nq && slot >= 0) {
                const bool is_k = head < nq + nkv;
                T* cache = (is_k ? rope.k_cache : rope.v_cache) +
                           slot * nkv * rope.head_dim + (i64)(head - nq - (is_k ? 0 : nkv)) * rope.head_dim;
                cache[j] = t0;
                cache[j + half] = t1;
            }
        } else {
            out[(i64)m * n + r0] = from_float<T>(y0);
            if (has_r1) out[(i64)m * n + r1] = from_float<T>(y1);
        }
    }
}

#define INSTANTIATE(S, T)                                                                       \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                               \
        gemv_add_##S(T* residual, const T* x, const T* w, int rows, int n, int k) {             \
        gemv<T, false, OUT_ADD>(residual, x, nullptr, 0.f, w, rows, n, k, RopeKv<T>{});         \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                               \
        gemv_norm_##S(T* out, const T* residual, const T* norm_w, float eps, const T* w,        \
                      int rows, int n, int k) {                                                 \
        gemv<T, true, OUT_STORE>(out, residual, norm_w, eps, w, rows, n, k, RopeKv<T>{});       \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                               \
        gemv_norm_gated_##S(T* out, const T* residual, const T* norm_w, float eps, const T* w,  \
                            int rows, int n, int k) {                                           \
        gemv<T, true, OUT_GATED>(out, residual, norm_w, eps, w, rows, n, k, RopeKv<T>{});       \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                               \
        gemv_norm_rope_##S(T* out, const T* residual, const T* norm_w, float eps, const T* w,   \
                           int rows, int n, int k, const float* cos_t, const float* sin_t,      \
                           int num_q_heads, int num_kv_heads, int head_dim, T* k_cache,         \
                           T* v_cache, const i64* slots) {                                      \
        const RopeKv<T> rope = {cos_t, sin_t, num_q_heads, num_kv_heads, head_dim, k_cache,     \
                                v_cache, slots};                                                \
        gemv<T, true, OUT_ROPE>(out, residual, norm_w, eps, w, rows, n, k, rope);               \
    }
