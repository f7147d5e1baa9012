// A double of the CUDA driver library (libcuda.so) for machines with no GPU: the subset of the
// driver API that cudarc calls for our kernels, with device memory in host memory and kernels
// run by the emulator's runtime (runtime.cpp) on the CPU. Loaded in place of the driver by
// `llmctl_kernels::emulator::install`; never on a machine's loader path.
//
// It reports one device, "llmctl CUDA emulator (CPU)", compute capability 9.0 with 132 SMs (an
// H100/H200's shape, so heuristics that read the SM count take the same branches), without
// memory pools (cudarc then uses the synchronous allocator). Work runs at once on the calling
// thread; streams and events exist so that callers work unchanged. Device memory is poisoned
// with 0xff bytes (NaN in every float type) when allocated, and each allocation ends against an
// inaccessible page, so reading unwritten memory shows up as NaN and running past the end of a
// buffer faults with the kernel's name. A launch whose barriers diverge fails with
// CUDA_ERROR_LAUNCH_FAILED and a message on stderr.
//
// Stream capture and CUDA graphs: while a stream created by cuStreamCreate captures, its
// launches, copies, memsets and cuBLAS calls (cublas.cpp hands them over through
// `llmctl_emulator_submit`) are recorded, kernel arguments copied, instead of run; cuGraphLaunch
// runs the recording. As on a GPU, the legacy (null) stream cannot capture, a synchronisation or
// a synchronisation on a capturing stream is refused and invalidates the capture, and a recorded
// launch reads its pointers' memory when replayed, not when recorded. Memory pools are supported
// (as on every GPU the worker targets), so cudarc allocates stream-ordered, and a stream-ordered
// allocation on a capturing stream becomes the graph's allocation node, as on a GPU: a graph
// whose allocation is still live (not freed in the graph nor since its last launch) cannot be
// launched again (CUDA_ERROR_INVALID_VALUE).
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

#include "runtime.h"
#include "submit.h"

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUcontext;
typedef void* CUstream;
typedef void* CUevent;

namespace {

enum : CUresult {
    SUCCESS = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    INVALID_DEVICE = 101,
    INVALID_HANDLE = 400,
    NOT_FOUND = 500,
    LAUNCH_FAILED = 719,
    CAPTURE_UNSUPPORTED = 900,
    CAPTURE_INVALIDATED = 901,
};

// Work on a stream: run at once, or recorded while the stream captures.
using Op = std::function<CUresult()>;

struct Graph {
    std::vector<Op> ops;
    std::set<CUdeviceptr> allocs;  // allocation nodes the graph does not free itself
};
struct Stream {
    std::unique_ptr<Graph> capture;  // set while capturing
    bool invalidated = false;        // an operation the capture cannot hold was attempted
};

// A loaded module: PTX text, or a CUDA binary (CUBIN, an ELF image) whose symbol names are
// what it defines.
struct Module {
    std::string image;
    bool elf;
};
struct Function {
    std::string name;
    const emu::Kernel* kernel;
};
struct Event {
    double ms = 0;
};

struct Allocation {
    void* mapping;
    size_t mapping_bytes;
    size_t bytes;
};

std::mutex lock;
int context_tag, stream_tag;  // their addresses are the context and stream handles
std::map<CUdeviceptr, Allocation> allocations;
std::set<Function*> functions;
size_t allocated;
// Memory of graph allocation nodes (kept mapped for the graphs' later launches), and which of it
// is live: launched and not freed since.
std::set<CUdeviceptr> graph_memory, graph_live;

size_t total_memory() {
    static const size_t total = [] {
        const char* mib = getenv("LLMCTL_EMULATOR_MEMORY_MIB");
        const size_t m = mib ? strtoull(mib, nullptr, 10) : 0;
        return (m > 0 ? m : 2048) << 20;
    }();
    return total;
}

double now_ms() {
    timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

// Whether [p, p + n) lies inside one allocation (host pointers are the caller's to keep
// valid, as with the real driver).
bool inside(CUdeviceptr p, size_t n) {
    auto it = allocations.upper_bound(p);
    if (it == allocations.begin()) return false;
    --it;
    return p + n <= it->first + it->second.bytes;
}

CUresult alloc(CUdeviceptr* out, size_t bytes) {
    if (!out) return INVALID_VALUE;
    if (allocated + bytes > total_memory()) return OUT_OF_MEMORY;
    const size_t page = (size_t)sysconf(_SC_PAGESIZE);
    const size_t body = (bytes + 15) / 16 * 16 + (bytes == 0 ? 16 : 0);
    const size_t pages = (body + page - 1) / page * page;
    const size_t mapping_bytes = pages + 2 * page;
    void* m = mmap(nullptr, mapping_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) return OUT_OF_MEMORY;
    char* base = static_cast<char*>(m);
    mprotect(base, page, PROT_NONE);
    mprotect(base + page + pages, page, PROT_NONE);
    char* p = base + page + (pages - body);  // ends against the guard page
    memset(p, 0xff, body);
    *out = (CUdeviceptr)p;
    allocations[*out] = {m, mapping_bytes, body};
    allocated += body;
    return SUCCESS;
}

CUresult release(CUdeviceptr p) {
    auto it = allocations.find(p);
    if (it == allocations.end()) return INVALID_VALUE;
    munmap(it->second.mapping, it->second.mapping_bytes);
    allocated -= it->second.bytes;
    allocations.erase(it);
    return SUCCESS;
}

CUresult copy(void* dst, const void* src, size_t n, bool dst_device, bool src_device) {
    if (dst_device && !inside((CUdeviceptr)dst, n)) return INVALID_VALUE;
    if (src_device && !inside((CUdeviceptr)src, n)) return INVALID_VALUE;
    memmove(dst, src, n);
    return SUCCESS;
}

CUresult memset8(CUdeviceptr p, unsigned char value, size_t n) {
    if (!inside(p, n)) return INVALID_VALUE;
    memset((void*)p, value, n);
    return SUCCESS;
}

Stream* capturing(CUstream s) {
    Stream* stream = static_cast<Stream*>(s);
    return stream && stream->capture ? stream : nullptr;
}

// Runs `op` now, or records it when `s` captures.
CUresult submit(CUstream s, Op op) {
    if (Stream* stream = capturing(s)) {
        stream->capture->ops.push_back(std::move(op));
        return SUCCESS;
    }
    return op();
}

// What a capturing stream cannot hold (a synchronisation, a stream-ordered allocation):
// refused, and the capture is invalidated, as on a GPU.
CUresult refuse_if_capturing(CUstream s, const char* what) {
    Stream* stream = capturing(s);
    if (!stream) return SUCCESS;
    fprintf(stderr, "llmctl CUDA emulator: %s on a capturing stream\n", what);
    stream->invalidated = true;
    return CAPTURE_UNSUPPORTED;
}

}  // namespace

int llmctl_emulator_submit(void* stream, std::function<int()> op) {
    std::lock_guard<std::mutex> guard(lock);
    return submit(stream, std::move(op));
}

#define API extern "C" __attribute__((visibility("default"))) CUresult
#define GUARD std::lock_guard<std::mutex> guard(lock)

API cuInit(unsigned) { return SUCCESS; }
API cuDriverGetVersion(int* v) {
    *v = 13000;
    return SUCCESS;
}
API cuDeviceGetCount(int* n) {
    *n = 1;
    return SUCCESS;
}
API cuDeviceGet(CUdevice* d, int ordinal) {
    if (ordinal != 0) return INVALID_DEVICE;
    *d = 0;
    return SUCCESS;
}
API cuDeviceGetName(char* name, int len, CUdevice) {
    snprintf(name, (size_t)len, "%s", "llmctl CUDA emulator (CPU)");
    return SUCCESS;
}
API cuDeviceTotalMem_v2(size_t* bytes, CUdevice) {
    *bytes = total_memory();
    return SUCCESS;
}
API cuDeviceGetAttribute(int* value, int attribute, CUdevice) {
    switch (attribute) {
        case 1: *value = 1024; break;     // max threads per block
        case 8: *value = 49152; break;    // static shared memory per block
        case 10: *value = 32; break;      // warp size
        case 16: *value = 132; break;     // multiprocessors
        case 41: *value = 1; break;       // unified addressing
        case 75: *value = 9; break;       // compute capability major
        case 76: *value = 0; break;       // minor
        case 97: *value = 232448; break;  // opt-in shared memory per block
        case 115: *value = 1; break;      // memory pools (stream-ordered allocation)
        default: *value = 0;              // the rest: not supported
    }
    return SUCCESS;
}
API cuDevicePrimaryCtxRetain(CUcontext* ctx, CUdevice) {
    *ctx = &context_tag;
    return SUCCESS;
}
API cuDevicePrimaryCtxRelease_v2(CUdevice) { return SUCCESS; }
API cuCtxSetCurrent(CUcontext) { return SUCCESS; }
API cuCtxGetCurrent(CUcontext* ctx) {
    *ctx = &context_tag;
    return SUCCESS;
}
API cuCtxPushCurrent_v2(CUcontext) { return SUCCESS; }
API cuCtxPopCurrent_v2(CUcontext* ctx) {
    if (ctx) *ctx = &context_tag;
    return SUCCESS;
}
API cuCtxSynchronize() {
    GUARD;
    return SUCCESS;
}
API cuCtxGetDevice(CUdevice* d) {
    *d = 0;
    return SUCCESS;
}

API cuStreamCreate(CUstream* s, unsigned) {
    *s = new Stream;
    return SUCCESS;
}
API cuStreamCreateWithPriority(CUstream* s, unsigned, int) {
    *s = new Stream;
    return SUCCESS;
}
API cuStreamDestroy_v2(CUstream s) {
    delete static_cast<Stream*>(s);
    return SUCCESS;
}
API cuStreamSynchronize(CUstream s) {
    GUARD;
    return refuse_if_capturing(s, "cuStreamSynchronize");
}
API cuStreamQuery(CUstream s) {
    GUARD;
    return refuse_if_capturing(s, "cuStreamQuery");
}
API cuStreamWaitEvent(CUstream, CUevent, unsigned) { return SUCCESS; }

API cuStreamBeginCapture_v2(CUstream s, int) {
    GUARD;
    Stream* stream = static_cast<Stream*>(s);
    if (!stream) return CAPTURE_UNSUPPORTED;  // the legacy stream cannot capture
    if (stream->capture) return INVALID_VALUE;
    stream->capture = std::make_unique<Graph>();
    stream->invalidated = false;
    return SUCCESS;
}
API cuStreamEndCapture(CUstream s, void** graph) {
    GUARD;
    Stream* stream = capturing(s);
    if (!stream) return INVALID_VALUE;
    std::unique_ptr<Graph> g = std::move(stream->capture);
    *graph = nullptr;
    if (stream->invalidated) return CAPTURE_INVALIDATED;
    *graph = g.release();
    return SUCCESS;
}
API cuStreamIsCapturing(CUstream s, int* status) {
    GUARD;
    Stream* stream = static_cast<Stream*>(s);
    *status = !stream || !stream->capture ? 0 : stream->invalidated ? 2 : 1;
    return SUCCESS;
}
API cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
    if (!graph) return INVALID_VALUE;
    *exec = new Graph(*static_cast<Graph*>(graph));
    return SUCCESS;
}
API cuGraphUpload(void*, CUstream) { return SUCCESS; }
// Runs the recording in order; the first failure ends the launch, as a device error would.
API cuGraphLaunch(void* exec, CUstream s) {
    GUARD;
    if (!exec) return INVALID_VALUE;
    if (capturing(s)) return refuse_if_capturing(s, "cuGraphLaunch");
    Graph* graph = static_cast<Graph*>(exec);
    for (CUdeviceptr p : graph->allocs) {
        if (graph_live.count(p)) {
            fprintf(stderr, "llmctl CUDA emulator: cuGraphLaunch of a graph whose allocation node's memory is still live\n");
            return INVALID_VALUE;
        }
    }
    graph_live.insert(graph->allocs.begin(), graph->allocs.end());
    for (Op& op : graph->ops) {
        if (const CUresult r = op(); r != SUCCESS) return r;
    }
    return SUCCESS;
}
API cuGraphExecDestroy(void* exec) {
    delete static_cast<Graph*>(exec);
    return SUCCESS;
}
API cuGraphDestroy(void* graph) {
    delete static_cast<Graph*>(graph);
    return SUCCESS;
}

API cuEventCreate(CUevent* e, unsigned) {
    *e = new Event;
    return SUCCESS;
}
API cuEventDestroy_v2(CUevent e) {
    delete static_cast<Event*>(e);
    return SUCCESS;
}
API cuEventRecord(CUevent e, CUstream) {
    static_cast<Event*>(e)->ms = now_ms();
    return SUCCESS;
}
API cuEventSynchronize(CUevent) {
    GUARD;
    return SUCCESS;
}
API cuEventQuery(CUevent) { return SUCCESS; }
API cuEventElapsedTime(float* ms, CUevent start, CUevent end) {
    *ms = (float)(static_cast<Event*>(end)->ms - static_cast<Event*>(start)->ms);
    return SUCCESS;
}
API cuEventElapsedTime_v2(float* ms, CUevent start, CUevent end) { return cuEventElapsedTime(ms, start, end); }

API cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    GUARD;
    *free_bytes = total_memory() - allocated;
    *total = total_memory();
    return SUCCESS;
}
API cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) {
    GUARD;
    return alloc(p, bytes);
}
API cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream s) {
    GUARD;
    const CUresult r = alloc(p, bytes);
    if (Stream* stream = capturing(s); stream && r == SUCCESS) {
        stream->capture->allocs.insert(*p);
        graph_memory.insert(*p);
    }
    return r;
}
// Graph memory freed outside its graph stays mapped for the graph's next launch.
static CUresult free_now(CUdeviceptr p) {
    if (graph_memory.count(p)) return graph_live.erase(p) ? SUCCESS : INVALID_VALUE;
    return release(p);
}
API cuMemFree_v2(CUdeviceptr p) {
    GUARD;
    return free_now(p);
}
API cuMemFreeAsync(CUdeviceptr p, CUstream s) {
    GUARD;
    if (Stream* stream = capturing(s)) {
        // A free node: only of memory this graph allocated.
        if (stream->capture->allocs.erase(p)) return SUCCESS;
        return refuse_if_capturing(s, "cuMemFreeAsync of memory the graph did not allocate");
    }
    return free_now(p);
}
API cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    GUARD;
    return copy((void*)dst, src, n, true, false);
}
API cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream s) {
    GUARD;
    return submit(s, [=] { return copy((void*)dst, src, n, true, false); });
}
API cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    GUARD;
    return copy(dst, (const void*)src, n, false, true);
}
API cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream s) {
    GUARD;
    return submit(s, [=] { return copy(dst, (const void*)src, n, false, true); });
}
API cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    GUARD;
    return copy((void*)dst, (const void*)src, n, true, true);
}
API cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    GUARD;
    return submit(s, [=] { return copy((void*)dst, (const void*)src, n, true, true); });
}
API cuMemsetD8_v2(CUdeviceptr p, unsigned char value, size_t n) {
    GUARD;
    return memset8(p, value, n);
}
API cuMemsetD8Async(CUdeviceptr p, unsigned char value, size_t n, CUstream s) {
    GUARD;
    return submit(s, [=] { return memset8(p, value, n); });
}

// The bytes of an ELF64 image: up to the end of its furthest section, section header table or
// program header table.
static size_t elf_size(const unsigned char* elf) {
    auto u16 = [elf](size_t at) { uint16_t v; memcpy(&v, elf + at, 2); return (size_t)v; };
    auto u32 = [elf](size_t at) { uint32_t v; memcpy(&v, elf + at, 4); return (size_t)v; };
    auto u64 = [elf](size_t at) { uint64_t v; memcpy(&v, elf + at, 8); return (size_t)v; };
    const size_t phoff = u64(0x20), shoff = u64(0x28);
    size_t end = std::max(phoff + u16(0x36) * u16(0x38), shoff + u16(0x3A) * u16(0x3C));
    for (size_t i = 0; i < u16(0x3C); ++i) {
        const size_t sh = shoff + i * u16(0x3A);
        const bool nobits = u32(sh + 4) == 8;  // SHT_NOBITS: no bytes in the file
        if (!nobits) end = std::max(end, u64(sh + 24) + u64(sh + 32));
    }
    return end;
}

API cuModuleLoadData(void** module, const void* image) {
    if (!image) return INVALID_VALUE;
    const unsigned char* bytes = static_cast<const unsigned char*>(image);
    if (memcmp(bytes, "\x7f" "ELF", 4) == 0) {
        if (bytes[4] != 2) return INVALID_VALUE;  // ELFCLASS64, as every CUBIN
        *module = new Module{std::string(reinterpret_cast<const char*>(bytes), elf_size(bytes)), true};
    } else {
        *module = new Module{static_cast<const char*>(image), false};
    }
    return SUCCESS;
}
API cuModuleUnload(void* module) {
    delete static_cast<Module*>(module);
    return SUCCESS;
}
// A function must be both in the module NVRTC produced (an entry of the PTX, a symbol of the
// CUBIN) and in the emulator's build.
API cuModuleGetFunction(void** function, void* module, const char* name) {
    GUARD;
    const Module* m = static_cast<Module*>(module);
    const std::string defined = m->elf ? std::string(1, '\0') + name + std::string(1, '\0')
                                       : std::string(".entry ") + name + "(";
    if (m->image.find(defined) == std::string::npos) return NOT_FOUND;
    const emu::Kernel* kernel = emu::find_kernel(name);
    if (!kernel) return NOT_FOUND;
    Function* f = new Function{name, kernel};
    functions.insert(f);
    *function = f;
    return SUCCESS;
}
API cuFuncGetAttribute(int* value, int, void*) {
    *value = 0;
    return SUCCESS;
}
API cuFuncSetAttribute(void*, int, int) { return SUCCESS; }
API cuFuncSetCacheConfig(void*, int) { return SUCCESS; }

API cuLaunchKernel(void* function, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned shared_bytes, CUstream s, void** params, void** extra) {
    GUARD;
    Function* f = static_cast<Function*>(function);
    if (!functions.count(f)) return INVALID_HANDLE;
    if (extra || shared_bytes > 0 || gx == 0 || gy == 0 || gz == 0 || gy > 65535 || gz > 65535) {
        fprintf(stderr, "llmctl CUDA emulator: %s: unsupported launch (grid %u x %u x %u, %u dynamic shared bytes)\n",
                f->name.c_str(), gx, gy, gz, shared_bytes);
        return INVALID_VALUE;
    }
    if ((unsigned long long)bx * by * bz > 1024) return INVALID_VALUE;
    // The arguments are copied: the caller's may be gone by the time a recording runs.
    std::vector<std::vector<char>> args;
    for (size_t i = 0; i < f->kernel->arg_sizes.size(); ++i) {
        const char* a = static_cast<const char*>(params[i]);
        args.emplace_back(a, a + f->kernel->arg_sizes[i]);
    }
    return submit(s, [f, gx, gy, gz, bx, by, bz, args = std::move(args)]() mutable {
        std::vector<void*> ptrs;
        for (auto& a : args) ptrs.push_back(a.data());
        const std::string error = emu::launch(f->name.c_str(), f->kernel->entry, {gx, gy, gz}, {bx, by, bz}, ptrs.data());
        if (error.empty()) return (CUresult)SUCCESS;
        fprintf(stderr, "llmctl CUDA emulator: %s: %s\n", f->name.c_str(), error.c_str());
        return (CUresult)LAUNCH_FAILED;
    });
}

API cuGetErrorName(CUresult e, const char** name) {
    switch (e) {
        case SUCCESS: *name = "CUDA_SUCCESS"; break;
        case INVALID_VALUE: *name = "CUDA_ERROR_INVALID_VALUE"; break;
        case OUT_OF_MEMORY: *name = "CUDA_ERROR_OUT_OF_MEMORY"; break;
        case INVALID_DEVICE: *name = "CUDA_ERROR_INVALID_DEVICE"; break;
        case INVALID_HANDLE: *name = "CUDA_ERROR_INVALID_HANDLE"; break;
        case NOT_FOUND: *name = "CUDA_ERROR_NOT_FOUND"; break;
        case LAUNCH_FAILED: *name = "CUDA_ERROR_LAUNCH_FAILED"; break;
        case CAPTURE_UNSUPPORTED: *name = "CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED"; break;
        case CAPTURE_INVALIDATED: *name = "CUDA_ERROR_STREAM_CAPTURE_INVALIDATED"; break;
        default: *name = "CUDA_ERROR_UNKNOWN"; return INVALID_VALUE;
    }
    return SUCCESS;
}
API cuGetErrorString(CUresult e, const char** text) {
    const CUresult r = cuGetErrorName(e, text);
    if (e == LAUNCH_FAILED) *text = "a kernel failed in the llmctl CUDA emulator (see its message on stderr)";
    return r;
}
