// Cache write: scatters the new tokens' K and V rows into their paged-cache slots (NHD layout,
// see KV_LAYOUT.md). `k` and `v` are row-strided views (e.g. the k and v columns of a fused qkv
// activation). A negative slot means "do not write" (padding).
//
// grid: (num_tokens), block: up to 256 threads.
template <typename T>
__device__ void write_kv(const T* __restrict__ k, const T* __restrict__ v, i64 row_stride,
                         T* __restrict__ k_cache, T* __restrict__ v_cache,
                         const i64* __restrict__ slots, int token_width) {
    const int t = blockIdx.x;
    const i64 slot = slots[t];
    if (slot < 0) return;
    const T* kr = k + (i64)t * row_stride;
    const T* vr = v + (i64)t * row_stride;
    T* kc = k_cache + slot * token_width;
    T* vc = v_cache + slot * token_width;
    for (int i = threadIdx.x; i < token_width; i += blockDim.x) {
        kc[i] = kr[i];
        vc[i] = vr[i];
    }
}

// A layer's rotary (rotary_table on the q and k heads of each token's fused qkv row, in place)
// and then its cache write (the rotated k and the v columns to the token's slot), in one launch
// instead of two. The barrier between them: a k element may be cached by another thread than
// the one that rotated it. grid: (num_tokens), block: 128.
template <typename T>
__device__ void rotary_write_kv(T* __restrict__ qkv, i64 row_stride, const float* __restrict__ cos_t,
                                const float* __restrict__ sin_t, int num_q_heads, int num_kv_heads,
                                int head_dim, T* __restrict__ k_cache, T* __restrict__ v_cache,
                                const i64* __restrict__ slots) {
    rotary_table<T>(qkv, row_stride, cos_t, sin_t, num_q_heads + num_kv_heads, head_dim);
    __syncthreads();
    const i64 k_col = (i64)num_q_heads * head_dim;
    const int width = num_kv_heads * head_dim;
    write_kv<T>(qkv + k_col, qkv + k_col + width, row_stride, k_cache, v_cache, slots, width);
}

#define INSTANTIATE(S, T)                                                                    \
    extern "C" __global__ void write_kv_##S(const T* k, const T* v, i64 row_stride,          \
                                            T* k_cache, T* v_cache, const i64* slots,        \
                                            int token_width) {                               \
        write_kv<T>(k, v, row_stride, k_cache, v_cache, slots, token_width);                 \
    }                                                                                        \
    extern "C" __global__ void rotary_write_kv_##S(                                          \
        T* qkv, i64 row_stride, const float* cos_t, const float* sin_t, int num_q_heads,     \
        int num_kv_heads, int head_dim, T* k_cache, T* v_cache, const i64* slots) {          \
        rotary_write_kv<T>(qkv, row_stride, cos_t, sin_t, num_q_heads, num_kv_heads,         \
                           head_dim, k_cache, v_cache, slots);                               \
    }
