// Kernels that are wrong on purpose, to show that the CPU emulator catches what it claims to
// (kernels/tests/emulator.rs): a missing barrier, a divergent barrier, a write past the end of a
// buffer; and their correct twin. Compiled by NVRTC and the emulator like any program, never
// launched by llmctl itself. Each runs as one block of 64 threads.

// out[t] = in[63 - t] through shared memory, with the barrier it needs.
extern "C" __global__ void selftest_reverse(float* out, const float* in) {
    __shared__ float s[64];
    s[threadIdx.x] = in[threadIdx.x];
    __syncthreads();
    out[threadIdx.x] = s[63 - threadIdx.x];
}

// The same without the barrier: a thread may read s[63 - t] before its writer has run.
extern "C" __global__ void selftest_reverse_racy(float* out, const float* in) {
    __shared__ float s[64];
    s[threadIdx.x] = in[threadIdx.x];
    out[threadIdx.x] = s[63 - threadIdx.x];
}

// Block b writes out[64 b + t] = in[t - 1] (thread 0: in[0]), read from shared memory with no
// barrier after the writes: correct only if each thread's lower neighbour has run first.
extern "C" __global__ void selftest_shift_racy(float* out, const float* in) {
    __shared__ float s[64];
    const unsigned t = threadIdx.x;
    s[t] = in[t];
    out[64 * blockIdx.x + t] = s[t > 0 ? t - 1 : 0];
}

// Block b writes out[64 b + t] = in[t] + out[64 (b - 1) + t] (block 0: in[t]): a running sum
// over the blocks, correct only if they run in order, which CUDA never promises.
extern "C" __global__ void selftest_blocks_in_order(float* out, const float* in) {
    const unsigned b = blockIdx.x, t = threadIdx.x;
    out[64 * b + t] = in[t] + (b > 0 ? out[64 * (b - 1) + t] : 0.f);
}

// Half the block waits at a barrier the other half never reaches.
extern "C" __global__ void selftest_divergent_barrier(float* out) {
    if (threadIdx.x < 32) __syncthreads();
    out[threadIdx.x] = 1.f;
}

// A warp sum over each warp's 32 values (lane 0 writes it), through shuffles.
extern "C" __global__ void selftest_warp_sum(float* out, const float* in) {
    const float v = warp_sum(in[threadIdx.x]);
    if ((threadIdx.x & 31) == 0) out[threadIdx.x >> 5] = v;
}

// Writes one element past the `n` the buffer holds.
extern "C" __global__ void selftest_write_past_end(float* out, int n) {
    if (threadIdx.x == 0) out[n] = 1.f;
}

// One tensor-core product per warp: A (16x16, row major, in[0..256]) times B (16x8, row major,
// in[256..384]), both rounded to bf16 and loaded by the fragment layout `mma_16x8x16`
// documents; warp 0 writes C (16x8, row major) to out[0..128].
extern "C" __global__ void selftest_mma(float* out, const float* in) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    auto a = [in](int r, int c) { return from_float<bf16>(in[r * 16 + c]); };
    auto b = [in](int k, int n) { return from_float<bf16>(in[256 + k * 8 + n]); };
    const unsigned af[4] = {pack2(a(g, 2 * t), a(g, 2 * t + 1)), pack2(a(g + 8, 2 * t), a(g + 8, 2 * t + 1)),
                            pack2(a(g, 2 * t + 8), a(g, 2 * t + 9)),
                            pack2(a(g + 8, 2 * t + 8), a(g + 8, 2 * t + 9))};
    float c[4] = {0.f, 0.f, 0.f, 0.f};
    mma_16x8x16<bf16>(c, af, pack2(b(2 * t, g), b(2 * t + 1, g)), pack2(b(2 * t + 8, g), b(2 * t + 9, g)));
    if (threadIdx.x < 32) {
        out[g * 8 + 2 * t] = c[0];
        out[g * 8 + 2 * t + 1] = c[1];
        out[(g + 8) * 8 + 2 * t] = c[2];
        out[(g + 8) * 8 + 2 * t + 1] = c[3];
    }
}

// ldmatrix x4 of the four 8x8 quadrants of a 16x16 bf16 matrix (in[0..256], row major; matrix
// i is quadrant (i % 2, i / 2), rows first), plain and transposed: lane L of warp 0 writes
// reg[i]'s low and high element to out[L * 8 + 2i ..] (plain) and out[256 + L * 8 + 2i ..].
extern "C" __global__ void selftest_ldmatrix(float* out, const float* in) {
    __shared__ Vec16 raw[32];
    bf16* s = reinterpret_cast<bf16*>(raw);
    for (int i = threadIdx.x; i < 256; i += blockDim.x) s[i] = from_float<bf16>(in[i]);
    __syncthreads();
    const int lane = threadIdx.x & 31, i = lane >> 3, r = lane & 7;
    const bf16* row = s + ((i % 2) * 8 + r) * 16 + (i / 2) * 8;
    unsigned plain[4], trans[4];
    ldmatrix_x4<false>(plain, row);
    ldmatrix_x4<true>(trans, row);
    if (threadIdx.x < 32) {
        for (int m = 0; m < 4; ++m) {
            const bf16 p[2] = {{(u16)plain[m]}, {(u16)(plain[m] >> 16)}};
            const bf16 t[2] = {{(u16)trans[m]}, {(u16)(trans[m] >> 16)}};
            for (int h = 0; h < 2; ++h) {
                out[lane * 8 + 2 * m + h] = to_float(p[h]);
                out[256 + lane * 8 + 2 * m + h] = to_float(t[h]);
            }
        }
    }
}

// cp.async of in[0..128] to shared memory in two groups (floats 0..64, then 64..128; the last
// chunk zero-filled), then `cp_async_wait<PENDING>` (none when PENDING is 2), a barrier, and
// out[0..128] read back from shared memory. Waiting for both groups is the correct kernel;
// the others read copies still in flight.
template <int PENDING>
__device__ void selftest_async_copy(float* out, const float* in) {
    __shared__ Vec16 s[32];
    const int t = threadIdx.x;
    for (int group = 0; group < 2; ++group) {
        const int chunk = group * 16 + t;
        if (t < 16) cp_async16(&s[chunk], in + 4 * chunk, chunk != 31);
        cp_async_commit();
    }
    if (PENDING < 2) cp_async_wait<PENDING>();
    __syncthreads();
    const float* f = reinterpret_cast<const float*>(s);
    out[t] = f[t];
    out[64 + t] = f[64 + t];
}
extern "C" __global__ void selftest_async_copy_all(float* out, const float* in) {
    selftest_async_copy<0>(out, in);
}
extern "C" __global__ void selftest_async_copy_first(float* out, const float* in) {
    selftest_async_copy<1>(out, in);
}
extern "C" __global__ void selftest_async_copy_unwaited(float* out, const float* in) {
    selftest_async_copy<2>(out, in);
}

// Each thread copies 4 floats from in + offset as one 16-byte load, through load16
// (ld.global.nc.v4 on a GPU) or, with TYPED, through a Vec16 pointer (a plain typed access).
// An offset that is not a multiple of 4 floats is a misaligned address on a GPU.
template <bool TYPED>
__device__ void selftest_wide_load(float* out, const float* in, int offset) {
    const unsigned t = threadIdx.x;
    if (t >= 16) return;
    const float* src = in + offset + 4 * t;
    const Vec16 v = TYPED ? *reinterpret_cast<const Vec16*>(src) : load16(src);
    for (int i = 0; i < 4; ++i) out[4 * t + i] = __uint_as_float(v.w[i]);
}
extern "C" __global__ void selftest_load16(float* out, const float* in, int offset) {
    selftest_wide_load<false>(out, in, offset);
}
extern "C" __global__ void selftest_typed_load16(float* out, const float* in, int offset) {
    selftest_wide_load<true>(out, in, offset);
}
