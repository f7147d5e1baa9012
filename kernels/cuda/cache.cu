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

#define INSTANTIATE(S, T)                                                                    \
    extern "C" __global__ void write_kv_##S(const T* k, const T* v, i64 row_stride,          \
                                            T* k_cache, T* v_cache, const i64* slots,        \
                                            int token_width) {                               \
        write_kv<T>(k, v, row_stride, k_cache, v_cache, slots, token_width);                 \
    }
