// Shared by every kernel source (prepended by the loader; NVRTC sees no files). Our own 16-bit
// float types with the few conversions the kernels need, so no CUDA toolkit header is needed
// under NVRTC; warp and block reductions; type-suffixed instantiation helpers. Inline PTX has
// a C++ twin for the CPU emulator (kernels/emulator), which defines LLMCTL_EMULATOR.

typedef unsigned short u16;
typedef long long i64;

struct bf16 { u16 bits; };
struct f16 { u16 bits; };

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(bf16 x) {
    return __uint_as_float(((unsigned int)x.bits) << 16);
}
__device__ __forceinline__ float to_float(f16 x) {
#ifdef LLMCTL_EMULATOR
    return emu::half_to_float(x.bits);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
#endif
}

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
// Round to nearest even; NaN stays a (quiet) NaN.
template <> __device__ __forceinline__ bf16 from_float<bf16>(float x) {
    unsigned int u = __float_as_uint(x);
    bf16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (u16)((u >> 16) | 0x0040u);
        return r;
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    r.bits = (u16)(u >> 16);
    return r;
}
template <> __device__ __forceinline__ f16 from_float<f16>(float x) {
    f16 r;
#ifdef LLMCTL_EMULATOR
    r.bits = emu::float_to_half(x);
#else
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(x));
#endif
    return r;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over the block; every thread gets the result. `scratch` holds one float per warp.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    float total = 0.f;
    for (int w = 0; w < warps; ++w) total += scratch[w];
    return total;
}

// Two 16-bit values in one 32-bit register, `lo` in the low half (the lower column of a tensor
// core fragment).
template <typename T>
__device__ __forceinline__ unsigned pack2(T lo, T hi) {
    return (unsigned)lo.bits | ((unsigned)hi.bits << 16);
}

// A 16-byte chunk, the unit of vectorised copies (16-byte aligned on both sides).
struct alignas(16) Vec16 {
    unsigned w[4];
};

// 16 bytes of global memory that no thread writes during the launch, in one load
// (ld.global.nc.v4; `src` 16-byte aligned). Converting a chunk element by element straight from
// a global pointer lets the compiler split it into eight 2-byte loads. ONCE: data read once
// (weights), not kept in L1, which keeps what is read again.
template <bool ONCE = false>
__device__ __forceinline__ Vec16 load16(const void* src) {
    Vec16 v;
#ifdef LLMCTL_EMULATOR
    emu::require_aligned(src, 16, "16-byte load");
    memcpy(&v, src, 16);
#else
    if constexpr (ONCE) {
        asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
            : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3])
            : "l"(src));
    } else {
        asm("ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];"
            : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3])
            : "l"(src));
    }
#endif
    return v;
}

// The 16 / sizeof(T) elements of a 16-byte chunk as floats, taken from its words by shifts (a
// chunk read through a T pointer would break type-based aliasing rules once it is a local).
template <typename T>
__device__ __forceinline__ void chunk_to_float(const Vec16& raw, float (&out)[16 / sizeof(T)]) {
    if constexpr (sizeof(T) == 4) {
#pragma unroll
        for (int i = 0; i < 4; ++i) out[i] = __uint_as_float(raw.w[i]);
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            T e;
            e.bits = (u16)(raw.w[i / 2] >> (16 * (i % 2)));
            out[i] = to_float(e);
        }
    }
}

// c += A B on the tensor cores (mma.sync m16n8k16, f32 accumulation), one warp together: A is
// 16x16 and B 16x8, both in T (bf16 or f16). With g = lane / 4 and t = lane % 4, each lane holds
//   a[0] = A[g][2t..2t+1]   a[1] = A[g+8][2t..2t+1]   a[2] = A[g][2t+8..2t+9]   a[3] = A[g+8][2t+8..2t+9]
//   b0 = B[2t..2t+1][g]     b1 = B[2t+8..2t+9][g]
//   c = {C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]}
// (pairs packed by pack2, lower index low).
// Four 8x8 matrices of 16-bit elements from shared memory, one warp together (ldmatrix x4):
// lane 8i + r gives the address of row r of matrix i (16 contiguous, 16-byte aligned bytes).
// Lane L gets in reg[i] matrix i's row L / 4, columns 2 (L % 4) and 2 (L % 4) + 1; with
// `trans`, its rows 2 (L % 4) and 2 (L % 4) + 1 of column L / 4 (the transpose's fragment).
template <bool trans>
__device__ __forceinline__ void ldmatrix_x4(unsigned (&reg)[4], const void* row) {
#ifdef LLMCTL_EMULATOR
    emu::require_aligned(row, 16, "ldmatrix row");
    const unsigned char* all = emu::gather(&row, sizeof row);
    auto at = [all](unsigned lane, unsigned col) {
        const u16* p;
        memcpy(&p, all + lane * emu::SLOT_BYTES, sizeof p);
        return (unsigned)p[col];
    };
    const unsigned lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    for (unsigned i = 0; i < 4; ++i) {
        reg[i] = trans ? at(8 * i + 2 * t, g) | at(8 * i + 2 * t + 1, g) << 16
                       : at(8 * i + g, 2 * t) | at(8 * i + g, 2 * t + 1) << 16;
    }
#else
    const unsigned addr = (unsigned)__cvta_generic_to_shared(row);
    if constexpr (trans) {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(reg[0]), "=r"(reg[1]), "=r"(reg[2]), "=r"(reg[3])
                     : "r"(addr));
    } else {
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(reg[0]), "=r"(reg[1]), "=r"(reg[2]), "=r"(reg[3])
                     : "r"(addr));
    }
#endif
}

// 16 bytes from global to shared memory without passing through registers (cp.async; sm_80+),
// or 16 zero bytes when `valid` is false (`src` is then not read). The copy lands only after
// cp_async_wait covers its group (the emulator lands it exactly then, poisoning `dst` before).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
#ifdef LLMCTL_EMULATOR
    emu::async_copy16(dst, src, valid);
#else
    const unsigned addr = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(addr), "l"(src), "r"(valid ? 16 : 0)
                 : "memory");
#endif
}

// Closes the group of cp.async copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#ifdef LLMCTL_EMULATOR
    emu::async_commit();
#else
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Waits until at most `PENDING` of this thread's committed groups are still in flight.
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
#ifdef LLMCTL_EMULATOR
    emu::async_wait(PENDING);
#else
    asm volatile("cp.async.wait_group %0;" ::"n"(PENDING) : "memory");
#endif
}

// A float from global memory through L2 only (ld.global.cg): for data other CTAs wrote during
// the same launch, which this SM's L1 may not see.
__device__ __forceinline__ float load_cg(const float* p) {
#ifdef LLMCTL_EMULATOR
    return *p;
#else
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p) : "memory");
    return v;
#endif
}

// Four floats through L2 only (ld.global.cg.v4; `p` 16-byte aligned), as load_cg.
struct float4v {
    float x, y, z, w;
};
__device__ __forceinline__ float4v load_cg4(const float* p) {
    float4v v;
#ifdef LLMCTL_EMULATOR
    emu::require_aligned(p, 16, "16-byte load");
    memcpy(&v, p, 16);
#else
    asm volatile("ld.global.cg.v4.f32 {%0,%1,%2,%3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "l"(p)
                 : "memory");
#endif
    return v;
}

template <typename T> struct IsBf16 { static constexpr bool value = false; };
template <> struct IsBf16<bf16> { static constexpr bool value = true; };

// Two floats rounded to T (bf16 or f16) and packed as pack2 packs them.
template <typename T>
__device__ __forceinline__ unsigned pack2_rounded(float lo, float hi) {
#ifdef LLMCTL_EMULATOR
    return pack2(from_float<T>(lo), from_float<T>(hi));
#else
    unsigned r;
    if constexpr (IsBf16<T>::value) {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    } else {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    }
    return r;
#endif
}

template <typename T>
__device__ __forceinline__ void mma_16x8x16(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
#ifdef LLMCTL_EMULATOR
    // Every lane publishes its fragments; each computes its own four outputs from the warp's.
    struct Frags {
        unsigned a[4], b[2];
    } mine = {{a[0], a[1], a[2], a[3]}, {b0, b1}};
    const unsigned char* all = emu::gather(&mine, sizeof mine);
    auto frags = [all](unsigned lane) {
        Frags f;
        memcpy(&f, all + lane * emu::SLOT_BYTES, sizeof f);
        return f;
    };
    auto half = [](unsigned reg, unsigned k) {
        T x;
        x.bits = (u16)(reg >> (16 * (k & 1)));
        return to_float(x);
    };
    const unsigned g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    for (unsigned r = 0; r < 4; ++r) {
        const unsigned row = g + 8 * (r / 2), col = 2 * t + r % 2;
        float acc = c[r];
        for (unsigned k = 0; k < 16; ++k) {
            const Frags fa = frags(4 * (row % 8) + k % 8 / 2), fb = frags(4 * col + k % 8 / 2);
            acc = fmaf(half(fa.a[row / 8 + 2 * (k / 8)], k), half(fb.b[k / 8], k), acc);
        }
        c[r] = acc;
    }
#else
    static_assert(sizeof(T) == 2, "tensor-core inputs are 16-bit");
    if constexpr (IsBf16<T>::value) {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
            "{%8,%9}, {%0,%1,%2,%3};"
            : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    }
#endif
}


#define NEG_INF __int_as_float(0xff800000u)

// Rotates, in place, the first `heads` heads of each row of a row-strided activation
// (Hugging Face rotate-half: dimension i pairs with i + head_dim / 2), with the angles' cos and
// sin given per token ([num_tokens, head_dim / 2], f32), as a step computes them once for every
// layer. Shared by elementwise.cu's rotary_table and cache.cu's rotary_write_kv.
// grid: (num_tokens), block: 128.
template <typename T>
__device__ void rotary_table(T* __restrict__ qk, i64 row_stride, const float* __restrict__ cos_t,
                             const float* __restrict__ sin_t, int heads, int head_dim) {
    const int t = blockIdx.x;
    const int half = head_dim / 2;
    T* row = qk + (i64)t * row_stride;
    for (int i = threadIdx.x; i < heads * half; i += blockDim.x) {
        const int h = i / half, j = i % half;
        const float c = cos_t[(i64)t * half + j], s = sin_t[(i64)t * half + j];
        T* head = row + (i64)h * head_dim;
        const float a = to_float(head[j]), b = to_float(head[j + half]);
        head[j] = from_float<T>(a * c - b * s);
        head[j + half] = from_float<T>(b * c + a * s);
    }
}
