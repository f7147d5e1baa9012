// Projections of a few rows (GEMV): y = x · Wᵀ for at most GEMV_MAX_ROWS rows of x, with W
// [n, k] row-major as Hugging Face stores it, read once in 16-byte chunks. At small batch a
// decode step is the read of its weights, and what sits between two projections (the residual
// add, the next input norm, SiLU-and-mul) costs a launch each for almost no bytes; these fold
// it into the projections:
//   gemv_add:        residual += x · Wᵀ                (o and down, with their residual add)
//   gemv_norm:       out = rms_norm(residual) · Wᵀ     (q/k/v, with the input norm)
//   gemv_norm_gated: the same through silu(gate) * up  ([gate; up], with the post-attention norm)
// Every intermediate the separate ops store is rounded to T here too (the normed input, the
// projection before the add or the SiLU), so the fused path differs from them only in the
// order of the f32 sums.
//
// A warp computes a pair of W rows (plain: 2p and 2p + 1; gated: gate row p and up row
// p + n / 2, so SiLU-and-mul needs nothing from other warps), its lanes splitting k by 16-byte
// chunks with GEMV_UNROLL chunks of each row in flight per lane (a 2048-wide row is one round
// trip); x (a few KB) comes from L1.
// grid: (ceil(pairs / GEMV_WARPS)), block: 32 * GEMV_WARPS.

#define GEMV_MAX_ROWS 4
#define GEMV_WARPS 4
#define GEMV_UNROLL 8
static_assert(GEMV_WARPS >= GEMV_MAX_ROWS, "a warp per row finds the rows' norms");

template <typename T, bool NORM, bool GATED, bool ADD>
__device__ void gemv(T* __restrict__ out, const T* __restrict__ x, const T* __restrict__ norm_w,
                     float eps, const T* __restrict__ w, int rows, int n, int k) {
    constexpr int VEC = 16 / sizeof(T);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int chunks = k / VEC;
    const Vec16* xv = reinterpret_cast<const Vec16*>(x);

    const int pairs = GATED ? n / 2 : (n + 1) / 2;
    const int pair = blockIdx.x * GEMV_WARPS + warp;
    const bool active = pair < pairs;
    const int r0 = GATED ? pair : 2 * pair;
    const int r1 = GATED ? pair + n / 2 : 2 * pair + 1;
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
                a[u] = w0[c];
                b[u] = w1[c];
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
                chunk_to_float<T>(xv[(i64)warp * chunks + c], v);
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
            if (NORM) chunk_to_float<T>(reinterpret_cast<const Vec16*>(norm_w)[c], scale);
#pragma unroll
            for (int m = 0; m < GEMV_MAX_ROWS; ++m) {
                if (m >= rows) break;
                float xf[VEC];
                chunk_to_float<T>(xv[(i64)m * chunks + c], xf);
                float s0 = 0.f, s1 = 0.f;
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    const float v = NORM ? to_float(from_float<T>(xf[i] * inv_rms[m] * scale[i])) : xf[i];
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
        const float y0 = to_float(from_float<T>(warp_sum(acc0[m])));
        const float y1 = to_float(from_float<T>(warp_sum(acc1[m])));
        if (lane != m) continue;
        if (GATED) {
            out[(i64)m * (n / 2) + pair] = from_float<T>(y0 / (1.f + __expf(-y0)) * y1);
        } else if (ADD) {
            T* row = out + (i64)m * n;
            row[r0] = from_float<T>(to_float(row[r0]) + y0);
            if (has_r1) row[r1] = from_float<T>(to_float(row[r1]) + y1);
        } else {
            out[(i64)m * n + r0] = from_float<T>(y0);
            if (has_r1) out[(i64)m * n + r1] = from_float<T>(y1);
        }
    }
}

#define INSTANTIATE(S, T)                                                                       \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                               \
        gemv_add_##S(T* residual, const T* x, const T* w, int rows, int n, int k) {             \
        gemv<T, false, false, true>(residual, x, nullptr, 0.f, w, rows, n, k);                  \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                               \
        gemv_norm_##S(T* out, const T* residual, const T* norm_w, float eps, const T* w,        \
                      int rows, int n, int k) {                                                 \
        gemv<T, true, false, false>(out, residual, norm_w, eps, w, rows, n, k);                 \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(32 * GEMV_WARPS)                               \
        gemv_norm_gated_##S(T* out, const T* residual, const T* norm_w, float eps, const T* w,  \
                            int rows, int n, int k) {                                           \
        gemv<T, true, true, false>(out, residual, norm_w, eps, w, rows, n, k);                  \
    }
