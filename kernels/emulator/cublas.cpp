// A double of cuBLAS (libcublas.so) for the CUDA emulator: the handle calls and the GEMMs that
// cudarc's `Gemm` makes (cublasSgemm_v2 for f32, cublasGemmEx for f16 and bf16 with f32
// compute), on the CPU over the emulator's device memory, which is host memory. Column-major
// as cuBLAS; f64 accumulation, rounded once to the output type. Loaded beside the driver double
// by `llmctl_kernels::emulator::install`. Its one link to the driver double is `submit.h`: a GEMM
// on a capturing stream is recorded into the CUDA graph instead of run, as cuBLAS's kernels are.
#include <cstddef>
#include <cstring>

#include "submit.h"

typedef int cublasStatus_t;

namespace {

enum : cublasStatus_t { SUCCESS = 0, INVALID_VALUE = 7, NOT_SUPPORTED = 15 };
enum { R_32F = 0, R_16F = 2, R_16BF = 14 };
enum { COMPUTE_32F = 68, COMPUTE_32F_FAST_TF32 = 77 };

struct Handle {
    int pointer_mode = 0;
    void* stream = nullptr;
};

double load(const void* p, long i, int type) {
    switch (type) {
        case R_32F: return static_cast<const float*>(p)[i];
        case R_16F: {
            _Float16 h;
            memcpy(&h, static_cast<const unsigned short*>(p) + i, 2);
            return (double)h;
        }
        default: {
            const unsigned bits = (unsigned)static_cast<const unsigned short*>(p)[i] << 16;
            float f;
            memcpy(&f, &bits, 4);
            return f;
        }
    }
}

void store(void* p, long i, int type, double v) {
    const float f = (float)v;
    switch (type) {
        case R_32F: static_cast<float*>(p)[i] = f; break;
        case R_16F: {
            const _Float16 h = (_Float16)f;  // round to nearest even
            memcpy(static_cast<unsigned short*>(p) + i, &h, 2);
            break;
        }
        default: {
            unsigned u;
            memcpy(&u, &f, 4);
            if ((u & 0x7fffffffu) > 0x7f800000u) {
                static_cast<unsigned short*>(p)[i] = (unsigned short)((u >> 16) | 0x40u);
            } else {
                u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
                static_cast<unsigned short*>(p)[i] = (unsigned short)(u >> 16);
            }
        }
    }
}

bool known(int type) { return type == R_32F || type == R_16F || type == R_16BF; }

void multiply(int transa, int transb, int m, int n, int k, float alpha, const void* a, int atype, int lda,
              const void* b, int btype, int ldb, float beta, void* c, int ctype, int ldc) {
    for (int j = 0; j < n; ++j) {
        for (int i = 0; i < m; ++i) {
            double sum = 0;
            for (int l = 0; l < k; ++l) {
                const long ai = transa ? l + (long)i * lda : i + (long)l * lda;
                const long bi = transb ? j + (long)l * ldb : l + (long)j * ldb;
                sum += load(a, ai, atype) * load(b, bi, btype);
            }
            const long ci = i + (long)j * ldc;
            double v = alpha * sum;
            if (beta != 0.0f) v += beta * load(c, ci, ctype);
            store(c, ci, ctype, v);
        }
    }
}

// C (m x n) = alpha * op(A) (m x k) * op(B) (k x n) + beta * C, column-major, on the handle's
// stream. Arguments are checked when called; the product runs when the stream runs it.
cublasStatus_t gemm(void* handle, int transa, int transb, int m, int n, int k, float alpha, const void* a,
                    int atype, int lda, const void* b, int btype, int ldb, float beta, void* c, int ctype,
                    int ldc) {
    if (m < 0 || n < 0 || k < 0 || transa < 0 || transa > 2 || transb < 0 || transb > 2) return INVALID_VALUE;
    if (!known(atype) || !known(btype) || !known(ctype)) return NOT_SUPPORTED;
    if (lda < (transa ? k : m) || ldb < (transb ? n : k) || ldc < m) return INVALID_VALUE;
    return llmctl_emulator_submit(static_cast<Handle*>(handle)->stream, [=] {
        multiply(transa, transb, m, n, k, alpha, a, atype, lda, b, btype, ldb, beta, c, ctype, ldc);
        return 0;
    });
}

}  // namespace

#define API extern "C" __attribute__((visibility("default"))) cublasStatus_t

API cublasCreate_v2(void** handle) {
    *handle = new Handle;
    return SUCCESS;
}
API cublasDestroy_v2(void* handle) {
    delete static_cast<Handle*>(handle);
    return SUCCESS;
}
API cublasSetStream_v2(void* handle, void* stream) {
    static_cast<Handle*>(handle)->stream = stream;
    return SUCCESS;
}
API cublasSetMathMode(void*, int) { return SUCCESS; }
API cublasSetWorkspace_v2(void*, void*, size_t) { return SUCCESS; }
API cublasGetPointerMode_v2(void* handle, int* mode) {
    *mode = static_cast<Handle*>(handle)->pointer_mode;
    return SUCCESS;
}
// Only host pointers for alpha and beta (mode 0), as cudarc passes them.
API cublasSetPointerMode_v2(void* handle, int mode) {
    if (mode != 0) return NOT_SUPPORTED;
    static_cast<Handle*>(handle)->pointer_mode = mode;
    return SUCCESS;
}

API cublasSgemm_v2(void* handle, int transa, int transb, int m, int n, int k, const float* alpha, const float* a, int lda,
                   const float* b, int ldb, const float* beta, float* c, int ldc) {
    return gemm(handle, transa, transb, m, n, k, *alpha, a, R_32F, lda, b, R_32F, ldb, *beta, c, R_32F, ldc);
}

API cublasGemmEx(void* handle, int transa, int transb, int m, int n, int k, const void* alpha, const void* a, int atype,
                 int lda, const void* b, int btype, int ldb, const void* beta, void* c, int ctype, int ldc,
                 int compute, int) {
    if (compute != COMPUTE_32F && compute != COMPUTE_32F_FAST_TF32) return NOT_SUPPORTED;
    return gemm(handle, transa, transb, m, n, k, *static_cast<const float*>(alpha), a, atype, lda, b, btype, ldb,
                *static_cast<const float*>(beta), c, ctype, ldc);
}
