// The CUDA device built-ins our kernels use, on the CPU. The emulator compiles every kernel
// program (common.cuh + one .cu file, as NVRTC sees it) as C++ after this header, so the same
// source runs on a GPU and, through the CUDA driver double (driver.cpp), on a machine without
// one. A test double, not a GPU: it checks what a kernel computes, never how fast.
//
// Execution model (runtime.cpp): one block at a time; each thread of the block is a fiber that
// runs until it reaches a barrier (__syncthreads, a warp shuffle, __syncwarp) or exits. Running
// every thread as far as it can go before the next one starts is the most hostile schedule for
// a missing barrier (a thread reads shared memory no other thread has written yet), so such
// races show up as wrong results instead of hiding. The threads take their turns in ascending
// order in every other block and in descending order in the rest, so a thread reading what a
// lower thread wrote without a barrier between is caught as surely as one reading a higher
// thread's. Blocks run in a scattered order (starting mid-grid, neighbours far apart), since a
// GPU promises none. A barrier that not every thread of its scope reaches (a divergent
// __syncthreads, a shuffle inside a lane-dependent branch, threads that returned before a
// barrier the others reach: undefined behaviour in CUDA) fails the launch with a message, where
// a GPU would hang or return garbage.
//
// `__shared__` variables are function statics: shared by the block's threads, and, since
// blocks run one after another, private to the running block. Each block's first thread to
// reach a declaration fills the variable with all-ones bytes (NaN in every float type;
// `emu::fresh_shared`, which the emulator's build appends to each declaration), so reading
// shared memory the block has not written shows, as it would on a GPU, instead of finding the
// previous block's values.
//
// Alignment is checked as a GPU checks it: a vector access (a 16-byte load, cp.async, an
// ldmatrix row) at an address that is not a multiple of its size, or a typed access through a
// misaligned pointer (the compiler's alignment sanitizer, which traps), ends the process with
// the kernel, block and thread named, where a GPU fails with a misaligned address.
//
// An asynchronous copy (cp.async) lands only when its thread waits for its group, as late as a
// GPU may land it; until then its destination holds all-ones bytes (a NaN in every float type),
// so reading it before the wait that covers it, or writing over a tile another thread still
// reads, shows up as NaNs in the result.
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#include <cstddef>
#include <utility>
#include <vector>

#define LLMCTL_EMULATOR 1

namespace emu {

struct uint3 {
    unsigned x, y, z;
};

// A 16-byte cp.async not yet landed: its source bytes as read at issue, and its group (the
// number of commits its thread had made when it was issued).
struct AsyncCopy {
    void* dst;
    unsigned char bytes[16];
    unsigned group;
};

// One thread of the running block.
struct Lane {
    void* sp;           // saved stack pointer while switched out
    uint3 tid;          // threadIdx
    unsigned linear;    // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
    int state;          // runtime.cpp's State
    unsigned shuffles;  // warp exchanges done (picks the exchange buffer)
    unsigned commits;   // cp.async groups committed
    std::vector<AsyncCopy> in_flight;
};

extern Lane* current;
extern uint3 block_idx, block_dim, grid_dim;

void sync_block();
void sync_warp();
// The running block declares the `__shared__` variable at `p`: the first call of a block fills
// its `bytes` with 0xff, later ones in the block do nothing.
void fresh_shared(void* p, std::size_t bytes);
// Bytes each lane may publish in one warp collective.
constexpr unsigned SLOT_BYTES = 64;
// The running lane's warp's exchange buffer for its next collective (32 slots of SLOT_BYTES).
unsigned char* exchange_slots();

// Every lane of the warp publishes `bytes` of `mine` and gets the warp's 32 slots (slot i holds
// lane i's bytes), valid until the lane's next collective.
inline const unsigned char* gather(const void* mine, unsigned bytes) {
    unsigned char* slots = exchange_slots();
    memcpy(slots + (current->linear & 31) * SLOT_BYTES, mine, bytes);
    sync_warp();
    return slots;
}

// Every lane of the warp publishes `v`; each gets the value of lane `src(lane)`.
template <typename T, typename Src>
inline T exchange(T v, Src src) {
    static_assert(sizeof(T) <= SLOT_BYTES, "shuffle of a wide type");
    const unsigned char* slots = gather(&v, sizeof(T));
    T r;
    memcpy(&r, slots + (src(current->linear & 31) & 31) * SLOT_BYTES, sizeof(T));
    return r;
}

[[noreturn]] void misaligned(const void* p, unsigned bytes, const char* access);

// Ends the launch as a GPU would unless `p` is a multiple of `bytes` (a power of two).
inline void require_aligned(const void* p, unsigned bytes, const char* access) {
    if (reinterpret_cast<uintptr_t>(p) & (bytes - 1)) misaligned(p, bytes, access);
}

// cp.async of 16 bytes (zeros unless `valid`): held until a wait covers its group, the
// destination poisoned meanwhile.
inline void async_copy16(void* dst, const void* src, bool valid) {
    require_aligned(dst, 16, "cp.async destination");
    if (valid) require_aligned(src, 16, "cp.async source");
    AsyncCopy copy;
    copy.dst = dst;
    copy.group = current->commits;
    if (valid) {
        memcpy(copy.bytes, src, 16);
    } else {
        memset(copy.bytes, 0, 16);
    }
    memset(dst, 0xff, 16);
    current->in_flight.push_back(copy);
}

inline void async_commit() { ++current->commits; }

// cp.async.wait_group: lands every copy of this thread's committed groups but the newest
// `pending` (copies issued after the last commit belong to no group and stay in flight).
inline void async_wait(unsigned pending) {
    Lane* me = current;
    const unsigned landed_below = me->commits > pending ? me->commits - pending : 0;
    std::vector<AsyncCopy>& q = me->in_flight;
    size_t kept = 0;
    for (size_t i = 0; i < q.size(); ++i) {
        if (q[i].group < landed_below) {
            memcpy(q[i].dst, q[i].bytes, 16);
        } else {
            q[kept++] = q[i];
        }
    }
    q.resize(kept);
}

using Entry = void (*)(void**);
// A kernel as the driver double sees it: how to call it, and the size of each argument (so a
// launch recorded in a CUDA graph can keep copies of its arguments).
struct Kernel {
    Entry entry;
    std::vector<std::size_t> arg_sizes;
};
bool register_kernel(const char* name, Kernel kernel);

template <typename... A>
std::vector<std::size_t> arg_sizes(void (*)(A...)) {
    return {sizeof(A)...};
}

template <typename... A, std::size_t... I>
inline void call(void (*f)(A...), void** params, std::index_sequence<I...>) {
    f(*static_cast<A*>(params[I])...);
}

template <typename... A>
constexpr std::size_t arity(void (*)(A...)) {
    return sizeof...(A);
}

// cuLaunchKernel's parameter array (one pointer to each argument) unpacked into a call.
template <auto F>
void trampoline(void** params) {
    call(F, params, std::make_index_sequence<arity(F)>{});
}

float half_to_float(unsigned short bits);
unsigned short float_to_half(float x);

}  // namespace emu

// Registers an `extern "C"` kernel under its name (generated after each program's source).
#define EMU_KERNEL(name) \
    static const bool emu_registered_##name =        \
        emu::register_kernel(#name, {&emu::trampoline<&name>, emu::arg_sizes(&name)});

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

#define threadIdx (emu::current->tid)
#define blockIdx (emu::block_idx)
#define blockDim (emu::block_dim)
#define gridDim (emu::grid_dim)

inline void __syncthreads() { emu::sync_block(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::sync_warp(); }

template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int mask, int = 32) {
    return emu::exchange(v, [mask](unsigned lane) { return lane ^ (unsigned)mask; });
}
template <typename T>
inline T __shfl_sync(unsigned, T v, int src, int = 32) {
    return emu::exchange(v, [src](unsigned) { return (unsigned)src; });
}
template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta, int = 32) {
    return emu::exchange(v, [delta](unsigned lane) { return lane + delta < 32 ? lane + delta : lane; });
}
template <typename T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta, int = 32) {
    return emu::exchange(v, [delta](unsigned lane) { return lane >= delta ? lane - delta : lane; });
}

// Blocks run one after another and threads switch only at barriers: memory is always
// coherent and an atomic is a plain read-modify-write.
inline void __threadfence() {}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
    const unsigned old = *p;
    *p = old + v;
    return old;
}

inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, 4);
    return f;
}
inline int __float_as_int(float f) {
    int i;
    memcpy(&i, &f, 4);
    return i;
}
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
