/*
 * What the CUDA kernels of block and Kronecker-factored CGD share on the host side: cuSOLVER/cuBLAS handles
 * cached per host thread and device, and the error plumbing that turns a failed call into a message. Internal.
 */
#ifndef CGD_CUDA_SOLVER_CUH
#define CGD_CUDA_SOLVER_CUH

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>
#include <stdint.h>
#include <stdio.h>

#define CGD_SOLVER_THREADS 256

struct CgdHandles {
    int device = -1;
    cusolverDnHandle_t solver = nullptr;
    cublasHandle_t blas = nullptr;
    syevjInfo_t syevj = nullptr;
};

struct CgdFailure {
    char *why;
    int size;
    int code;
};

inline int cgd_report(CgdFailure *f, const char *what, int code) {
    snprintf(f->why, (size_t)f->size, "%s failed with status %d", what, code);
    f->code = code ? code : 1;
    return f->code;
}

/* Both macros jump to the caller's `done:` label, where the workspace is freed; the caller names its
   CgdFailure `fail`. */
#define CUDA_TRY(call)                                                                                          \
    do {                                                                                                        \
        cudaError_t e_ = (call);                                                                                \
        if (e_ != cudaSuccess) {                                                                                \
            snprintf(fail.why, (size_t)fail.size, "%s: %s", #call, cudaGetErrorString(e_));                     \
            fail.code = (int)e_;                                                                                \
            goto done;                                                                                          \
        }                                                                                                       \
    } while (0)
#define SOLVER_TRY(call)                                                                                        \
    do {                                                                                                        \
        int s_ = (int)(call);                                                                                   \
        if (s_ != 0) {                                                                                          \
            cgd_report(&fail, #call, s_);                                                                       \
            goto done;                                                                                          \
        }                                                                                                       \
    } while (0)

/* The current device's handles, bound to `stream`; nullptr (and fail filled in) on failure. Creating handles
   costs milliseconds, so one set lives per host thread and device. */
inline CgdHandles *cgd_solver_handles(cudaStream_t stream, CgdFailure &fail) {
    static thread_local CgdHandles by_device[16];
    CgdHandles *hd = nullptr;
    int device = 0;
    CUDA_TRY(cudaGetDevice(&device));
    if (device >= 16) {
        snprintf(fail.why, (size_t)fail.size, "device %d: at most 16 devices are supported", device);
        fail.code = 1;
        return nullptr;
    }
    hd = &by_device[device];
    if (hd->device != device) {
        SOLVER_TRY(cusolverDnCreate(&hd->solver));
        SOLVER_TRY(cublasCreate(&hd->blas));
        SOLVER_TRY(cusolverDnCreateSyevjInfo(&hd->syevj));
        hd->device = device;
    }
    SOLVER_TRY(cusolverDnSetStream(hd->solver, stream));
    SOLVER_TRY(cublasSetStream(hd->blas, stream));
    return hd;
done:
    return nullptr;
}

inline int cgd_grid_for(int64_t n) {
    int64_t blocks = (n + CGD_SOLVER_THREADS - 1) / CGD_SOLVER_THREADS;
    return (int)(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

__device__ __forceinline__ bool cgd_skipped(const float *skip) { return skip != nullptr && *skip != 0.0f; }

#endif /* CGD_CUDA_SOLVER_CUH */
