// Row-wise and element-wise kernels of the forward pass: RMSNorm (plain and with the fused
// residual add), rotary embedding (Hugging Face "rotate half"), SiLU-and-mul, embedding gather.
// Accumulation is in f32 whatever the storage type.

// out = x / rms(x) * weight, per row. grid: (rows), block: 256 (any multiple of 32).
template <typename T>
__device__ void rms_norm(T* __restrict__ out, const T* __restrict__ x,
                         const T* __restrict__ weight, int hidden, float eps) {
    __shared__ float scratch[32];
    const T* row = x + (i64)blockIdx.x * hidden;
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        const float v = to_float(row[i]);
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / hidden + eps);
    T* o = out + (i64)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        o[i] = from_float<T>(to_float(row[i]) * inv * to_float(weight[i]));
}

// residual += delta (stored back, rounded to T); out = rms_norm(residual) * weight.
template <typename T>
__device__ void add_rms_norm(T* __restrict__ out, T* __restrict__ residual,
                             const T* __restrict__ delta, const T* __restrict__ weight,
                             int hidden, float eps) {
    __shared__ float scratch[32];
    T* res = residual + (i64)blockIdx.x * hidden;
    const T* d = delta + (i64)blockIdx.x * hidden;
    float ss = 0.f;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
        // The sum is rounded to T first, so the norm sees exactly the stored residual.
        const T sum = from_float<T>(to_float(res[i]) + to_float(d[i]));
        res[i] = sum;
        const float v = to_float(sum);
        ss += v * v;
    }
    const float inv = rsqrtf(block_sum(ss, scratch) / hidden + eps);
    T* o = out + (i64)blockIdx.x * hidden;
    // Each thread reads back only the elements it wrote itself: no barrier needed.
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        o[i] = from_float<T>(to_float(res[i]) * inv * to_float(weight[i]));
}

// Rotates, in place, the q heads (columns [0, num_q_heads * head_dim)) and the k heads (the
// next num_kv_heads * head_dim columns) of each row of a row-strided activation. Dimension i
// pairs with i + head_dim / 2; the angle is position * inv_freq[i] rounded to f32 (as Hugging
// Face computes it; Llama-3 scaling lives in inv_freq).
// grid: (num_tokens), block: 128.
template <typename T>
__device__ void rotary(T* __restrict__ qk, i64 row_stride, const int* __restrict__ positions,
                       const float* __restrict__ inv_freq, int num_q_heads, int num_kv_heads,
                       int head_dim) {
    const int t = blockIdx.x;
    const int half = head_dim / 2;
    const float pos = (float)positions[t];
    T* row = qk + (i64)t * row_stride;
    const int heads = num_q_heads + num_kv_heads;
    for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
        const int h = i / half, j = i % half;
        float s, c;
        sincosf(pos * inv_freq[j], &s, &c);
        T* head = row + (i64)h * head_dim;
        const float a = to_float(head[j]), b = to_float(head[j + half]);
        head[j] = from_float<T>(a * c - b * s);
        head[j + half] = from_float<T>(b * c + a * s);
    }
}

// x[r, c] += bias[c]. grid: (rows, ceil(cols / 256)).
template <typename T>
__device__ void add_bias(T* __restrict__ x, const T* __restrict__ bias, int cols) {
    const int c = blockIdx.y * blockDim.x + threadIdx.x;
    if (c >= cols) return;
    T* v = x + (i64)blockIdx.x * cols + c;
    *v = from_float<T>(to_float(*v) + to_float(bias[c]));
}

// out[r, j] = silu(gate_up[r, j]) * gate_up[r, inter + j]. grid: (rows, ceil(inter / 256)).
template <typename T>
__device__ void silu_mul(T* __restrict__ out, const T* __restrict__ gate_up, int inter) {
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= inter) return;
    const T* row = gate_up + (i64)blockIdx.x * 2 * inter;
    const float g = to_float(row[j]), u = to_float(row[inter + j]);
    out[(i64)blockIdx.x * inter + j] = from_float<T>(g / (1.f + __expf(-g)) * u);
}

// out[t] = table[ids[t]]; ids outside the vocabulary give a zero row. grid: (num_tokens).
template <typename T>
__device__ void embed(T* __restrict__ out, const T* __restrict__ table,
                      const unsigned int* __restrict__ ids, int vocab, int hidden) {
    const unsigned int id = ids[blockIdx.x];
    T* o = out + (i64)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x)
        o[i] = id < (unsigned int)vocab ? table[(i64)id * hidden + i] : from_float<T>(0.f);
}

#define INSTANTIATE(S, T)                                                                     \
    extern "C" __global__ void rms_norm_##S(T* out, const T* x, const T* w, int hidden,       \
                                            float eps) {                                      \
        rms_norm<T>(out, x, w, hidden, eps);                                                  \
    }                                                                                         \
    extern "C" __global__ void add_rms_norm_##S(T* out, T* residual, const T* delta,          \
                                                const T* w, int hidden, float eps) {          \
        add_rms_norm<T>(out, residual, delta, w, hidden, eps);                                \
    }                                                                                         \
    extern "C" __global__ void rotary_##S(T* qk, i64 row_stride, const int* positions,        \
                                          const float* inv_freq, int num_q_heads,             \
                                          int num_kv_heads, int head_dim) {                   \
        rotary<T>(qk, row_stride, positions, inv_freq, num_q_heads, num_kv_heads, head_dim);  \
    }                                                                                         \
    extern "C" __global__ void rotary_table_##S(T* qk, i64 row_stride, const float* cos_t,    \
                                                const float* sin_t, int heads, int head_dim) { \
        rotary_table<T>(qk, row_stride, cos_t, sin_t, heads, head_dim);                       \
    }                                                                                         \
    extern "C" __global__ void add_bias_##S(T* x, const T* bias, int cols) {                  \
        add_bias<T>(x, bias, cols);                                                           \
    }                                                                                         \
    extern "C" __global__ void silu_mul_##S(T* out, const T* gate_up, int inter) {            \
        silu_mul<T>(out, gate_up, inter);                                                     \
    }                                                                                         \
    extern "C" __global__ void embed_##S(T* out, const T* table, const unsigned int* ids,     \
                                         int vocab, int hidden) {                             \
        embed<T>(out, table, ids, vocab, hidden);                                             \
    }
