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
