// Runs a kernel's grid on the CPU: blocks one after another in a scattered order, each block's
// threads as fibers switched at barriers, ascending or descending by block (see device.h for the
// model and what it catches). Used by the driver double (driver.cpp); knows nothing of the
// driver API.
#include "runtime.h"

#include <signal.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <numeric>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#error "the CUDA emulator's fiber switch is written for x86-64"
#endif

// Saves the callee-saved registers and stack pointer of the running fiber in *save and resumes
// the one whose stack pointer is `load`.
extern "C" void emu_switch(void** save, void* load);
asm(R"(
    .text
    .globl emu_switch
    .hidden emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch
)");

namespace emu {

Lane* current;
uint3 block_idx, block_dim, grid_dim;

namespace {

enum State { READY, AT_BLOCK_BARRIER, AT_WARP_BARRIER, EXITED };

constexpr size_t STACK_BYTES = 256 * 1024;
constexpr unsigned MAX_THREADS = 1024;

struct Block {
    std::vector<Lane> lanes;
    std::vector<char*> stacks;  // one per lane, a guard page below each
    unsigned threads = 0, live = 0, at_block_barrier = 0;
    std::vector<unsigned> warp_threads, warp_live, at_warp_barrier;
    std::string divergence;  // why the block's barriers cannot complete, once they cannot
    std::vector<unsigned char> exchange;  // [warp][parity][32][SLOT_BYTES]
    std::vector<const void*> fresh;       // the `__shared__` variables this block has declared
    void* scheduler_sp = nullptr;
    Entry entry = nullptr;
    void** params = nullptr;
    bool deadlocked = false;
};

Block block;
const char* running_kernel = "";
struct sigaction previous_segv, previous_bus, previous_ill;

std::map<std::string, Kernel>& registry() {
    static std::map<std::string, Kernel> kernels;
    return kernels;
}

void release(State waiting, int warp) {
    for (Lane& l : block.lanes) {
        if (l.state == waiting && (warp < 0 || (int)(l.linear >> 5) == warp)) l.state = READY;
    }
    if (waiting == AT_BLOCK_BARRIER) {
        block.at_block_barrier = 0;
    } else {
        block.at_warp_barrier[warp] = 0;
    }
}

void to_scheduler() { emu_switch(&current->sp, block.scheduler_sp); }

extern "C" [[noreturn]] void emu_fiber_start() {
    block.entry(block.params);
    Lane* me = current;
    const unsigned warp = me->linear >> 5;
    me->state = EXITED;
    --block.live;
    --block.warp_live[warp];
    // Others wait at a barrier this thread never reached: undefined on a GPU (it may hang, or
    // count the exited thread as arrived), an error here.
    if (block.at_block_barrier > 0 || block.at_warp_barrier[warp] > 0)
        block.divergence = "a thread exited while others of its block or warp wait at a barrier";
    to_scheduler();
    __builtin_unreachable();
}

char* new_stack() {
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    void* p = mmap(nullptr, STACK_BYTES + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    mprotect(p, page, PROT_NONE);  // overflow faults instead of running into the next stack
    return static_cast<char*>(p) + page;
}

void on_fault(int sig, siginfo_t* info, void*) {
    // SIGILL is the trap of the compiler's alignment check (a typed access through a misaligned
    // pointer), or of misaligned() below: a GPU reports both as a misaligned address.
    const char* what = sig == SIGILL ? "misaligned address (trap at %p)" : "invalid memory access at %p";
    char where[128];
    const int w = snprintf(where, sizeof where, what, info->si_addr);
    char msg[512];
    const int n = snprintf(msg, sizeof msg, "llmctl CUDA emulator: %s in kernel %s, block (%u, %u, %u), thread (%u, %u, %u)\n",
                           w > 0 ? where : "", running_kernel, block_idx.x, block_idx.y, block_idx.z,
                           current ? current->tid.x : 0, current ? current->tid.y : 0, current ? current->tid.z : 0);
    if (n > 0) (void)!write(2, msg, (size_t)n);
    // Fall back to the default action: the faulting access runs again and ends the process.
    signal(sig, SIG_DFL);
}

// Runs every thread of the current block to completion, each turn over the threads in
// ascending or, if `descending`, descending order; false (with `block.divergence`) if a barrier
// is not reached by every thread of its scope.
bool run_block(unsigned threads, bool descending) {
    const unsigned warps = (threads + 31) / 32;
    block.threads = block.live = threads;
    block.at_block_barrier = 0;
    block.warp_threads.assign(warps, 0);
    block.warp_live.assign(warps, 0);
    block.at_warp_barrier.assign(warps, 0);
    block.divergence.clear();
    block.fresh.clear();
    for (unsigned i = 0; i < threads; ++i) {
        Lane& l = block.lanes[i];
        l.linear = i;
        l.tid = {i % block_dim.x, (i / block_dim.x) % block_dim.y, i / (block_dim.x * block_dim.y)};
        l.state = READY;
        l.shuffles = 0;
        l.commits = 0;
        l.in_flight.clear();
        ++block.warp_live[i >> 5];
        ++block.warp_threads[i >> 5];
        // Initial frame: six zeroed callee-saved registers, then emu_fiber_start as the return
        // address, placed so that it is entered with the stack aligned as a call would leave it.
        void** top = reinterpret_cast<void**>(block.stacks[i] + STACK_BYTES - 16);
        top[0] = reinterpret_cast<void*>(&emu_fiber_start);
        for (int r = 1; r <= 6; ++r) top[-r] = nullptr;
        l.sp = top - 6;
    }
    while (block.live > 0) {
        bool ran = false;
        for (unsigned k = 0; k < threads; ++k) {
            const unsigned i = descending ? threads - 1 - k : k;
            if (block.lanes[i].state != READY) continue;
            current = &block.lanes[i];
            emu_switch(&block.scheduler_sp, current->sp);
            ran = true;
            if (!block.divergence.empty()) return false;
        }
        if (!ran) {
            block.divergence = "every live thread waits at a barrier that cannot complete";
            return false;
        }
    }
    return true;
}

// Blocks are visited in the order (blocks / 2 + visit * stride) % blocks: starting mid-grid
// and with neighbours far apart (a stride near 0.618 blocks, coprime with it so every block is
// visited once), since a GPU gives no order and code that needs one is wrong.
unsigned long long scatter_stride(unsigned long long blocks) {
    unsigned long long stride = std::max(1ull, (unsigned long long)((double)blocks * 0.6180339887));
    while (std::gcd(stride, blocks) > 1) ++stride;
    return stride;
}

}  // namespace

void fresh_shared(void* p, std::size_t bytes) {
    if (std::find(block.fresh.begin(), block.fresh.end(), p) != block.fresh.end()) return;
    block.fresh.push_back(p);
    memset(p, 0xff, bytes);
}

void misaligned(const void* p, unsigned bytes, const char* access) {
    fprintf(stderr, "llmctl CUDA emulator: %s of %u bytes at %p, which is not %u-byte aligned\n", access, bytes, p,
            bytes);
    __builtin_trap();
}

void sync_block() {
    Lane* me = current;
    me->state = AT_BLOCK_BARRIER;
    if (block.live < block.threads)
        block.divergence = "__syncthreads after some threads of the block exited";
    else if (++block.at_block_barrier == block.live) {
        release(AT_BLOCK_BARRIER, -1);
        return;
    }
    to_scheduler();
}

void sync_warp() {
    Lane* me = current;
    const unsigned warp = me->linear >> 5;
    me->state = AT_WARP_BARRIER;
    if (block.warp_live[warp] < block.warp_threads[warp])
        block.divergence = "a warp collective after some lanes of the warp exited";
    else if (++block.at_warp_barrier[warp] == block.warp_live[warp]) {
        release(AT_WARP_BARRIER, (int)warp);
        return;
    }
    to_scheduler();
}

unsigned char* exchange_slots() {
    Lane* me = current;
    const unsigned parity = me->shuffles++ & 1;
    return &block.exchange[((me->linear >> 5) * 2 + parity) * 32 * SLOT_BYTES];
}

bool register_kernel(const char* name, Kernel kernel) {
    registry()[name] = std::move(kernel);
    return true;
}

const Kernel* find_kernel(const char* name) {
    auto it = registry().find(name);
    return it == registry().end() ? nullptr : &it->second;
}

// Two exchange buffers per warp: collective k writes buffer k % 2, and no lane can reach
// collective k + 2 (the same buffer) before every lane has passed collective k + 1's barrier,
// that is, has read collective k's values.
std::string launch(const char* name, Entry entry, uint3 grid, uint3 threads, void** params) {
    const unsigned n = threads.x * threads.y * threads.z;
    if (n == 0 || n > MAX_THREADS) return "block of " + std::to_string(n) + " threads";
    while (block.stacks.size() < n) {
        char* s = new_stack();
        if (!s) return "out of memory for thread stacks";
        block.stacks.push_back(s);
    }
    block.lanes.resize(MAX_THREADS);
    block.exchange.assign((size_t)(MAX_THREADS / 32) * 2 * 32 * SLOT_BYTES, 0);
    block.entry = entry;
    block.params = params;
    block_dim = threads;
    grid_dim = grid;
    running_kernel = name;

    struct sigaction fault = {};
    fault.sa_sigaction = on_fault;
    fault.sa_flags = SA_SIGINFO;
    sigaction(SIGSEGV, &fault, &previous_segv);
    sigaction(SIGBUS, &fault, &previous_bus);
    sigaction(SIGILL, &fault, &previous_ill);
    std::string error;
    const unsigned long long blocks = (unsigned long long)grid.x * grid.y * grid.z;
    const unsigned long long stride = scatter_stride(blocks);
    for (unsigned long long visit = 0; visit < blocks && error.empty(); ++visit) {
        // Linear block index, x fastest.
        const unsigned long long b = (blocks / 2 + visit * stride) % blocks;
        const unsigned x = (unsigned)(b % grid.x), y = (unsigned)(b / grid.x % grid.y),
                       z = (unsigned)(b / grid.x / grid.y);
        block_idx = {x, y, z};
        if (!run_block(n, visit % 2 == 1)) {
            unsigned at_block = 0, at_warp = 0, exited = 0;
            for (unsigned i = 0; i < n; ++i) {
                at_block += block.lanes[i].state == AT_BLOCK_BARRIER;
                at_warp += block.lanes[i].state == AT_WARP_BARRIER;
                exited += block.lanes[i].state == EXITED;
            }
            error = "barrier divergence in block (" + std::to_string(x) + ", " + std::to_string(y) + ", " +
                    std::to_string(z) + "): " + block.divergence + " (of " + std::to_string(n) + " threads, " +
                    std::to_string(at_block) + " wait at __syncthreads, " + std::to_string(at_warp) +
                    " at a warp collective, " + std::to_string(exited) + " exited)";
        }
    }
    sigaction(SIGSEGV, &previous_segv, nullptr);
    sigaction(SIGBUS, &previous_bus, nullptr);
    sigaction(SIGILL, &previous_ill, nullptr);
    current = nullptr;
    running_kernel = "";
    return error;
}

float half_to_float(unsigned short bits) {
    _Float16 h;
    memcpy(&h, &bits, 2);
    return (float)h;
}

unsigned short float_to_half(float x) {
    const _Float16 h = (_Float16)x;  // round to nearest even, as cvt.rn.f16.f32
    unsigned short bits;
    memcpy(&bits, &h, 2);
    return bits;
}

}  // namespace emu
