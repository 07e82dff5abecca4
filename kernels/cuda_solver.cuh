/*
 * What the CUDA kernels of block, Kronecker-factored and eigenbasis CGD and of Muon share: cuSOLVER/cuBLAS
 * handles cached per host thread and device, the carving of the caller's workspace into buffers, the error
 * plumbing that turns a failed call into a message, and the screen that keeps NaN and Inf from a solver. Internal.
 */
#ifndef CGD_CUDA_SOLVER_CUH
#define CGD_CUDA_SOLVER_CUH

#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <cusolverDn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "real.h"

#define CGD_SOLVER_THREADS 256

/* cuSOLVER and cuBLAS in the build's real type (real.h). */
#if CGD_F64
#define CGD_CUDA_REAL CUDA_R_64F
#define cgd_syevjBatched_bufferSize cusolverDnDsyevjBatched_bufferSize
#define cgd_syevjBatched cusolverDnDsyevjBatched
#define cgd_syevd_bufferSize cusolverDnDsyevd_bufferSize
#define cgd_syevd cusolverDnDsyevd
#define cgd_gemm_64 cublasDgemm_64
#define cgd_gemmStridedBatched cublasDgemmStridedBatched
#define cgd_geqrf_bufferSize cusolverDnDgeqrf_bufferSize
#define cgd_geqrf cusolverDnDgeqrf
#define cgd_orgqr_bufferSize cusolverDnDorgqr_bufferSize
#define cgd_orgqr cusolverDnDorgqr
#else
#define CGD_CUDA_REAL CUDA_R_32F
#define cgd_syevjBatched_bufferSize cusolverDnSsyevjBatched_bufferSize
#define cgd_syevjBatched cusolverDnSsyevjBatched
#define cgd_syevd_bufferSize cusolverDnSsyevd_bufferSize
#define cgd_syevd cusolverDnSsyevd
#define cgd_gemm_64 cublasSgemm_64
#define cgd_gemmStridedBatched cublasSgemmStridedBatched
#define cgd_geqrf_bufferSize cusolverDnSgeqrf_bufferSize
#define cgd_geqrf cusolverDnSgeqrf
#define cgd_orgqr_bufferSize cusolverDnSorgqr_bufferSize
#define cgd_orgqr cusolverDnSorgqr
#endif

struct CgdHandles {
    int device = -1;
    cusolverDnHandle_t solver = nullptr;
    cublasHandle_t blas = nullptr;
    syevjInfo_t syevj = nullptr;
    cusolverDnParams_t params = nullptr;
    /* XsyevBatched's host workspace: grown by the workspace queries, which run before every step, and reused. */
    void *host_work = nullptr;
    size_t host_bytes = 0;
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

/* Both macros jump to the caller's `done:` label; the caller names its CgdFailure `fail`. */
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

/* The current device's handles, created on first use (cgd_prepare or a workspace query). With `bind` they are
   bound to `stream`, and creating them is refused while that stream is being captured into a CUDA graph (it
   allocates): the message says to prepare first. cgd_prepare passes bind = false. nullptr (and fail filled in)
   on failure. */
inline CgdHandles *cgd_solver_handles(cudaStream_t stream, bool bind, CgdFailure &fail) {
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
        cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
        if (bind) CUDA_TRY(cudaStreamIsCapturing(stream, &capture));
        if (capture != cudaStreamCaptureStatusNone) {
            snprintf(fail.why, (size_t)fail.size, "the cuSOLVER/cuBLAS handles of device %d do not exist yet and "
                     "cannot be created during CUDA-graph capture: call cgd_prepare (torch: run one step, or build "
                     "the optimizer on CUDA parameters) before capturing", device);
            fail.code = 1;
            return nullptr;
        }
        CgdHandles fresh;
        int e = (int)cusolverDnCreate(&fresh.solver);
        if (!e) e = (int)cublasCreate(&fresh.blas);
        if (!e) e = (int)cusolverDnCreateSyevjInfo(&fresh.syevj);
        if (!e) e = (int)cusolverDnCreateParams(&fresh.params);
        if (e) { /* nothing half-made is kept: the next call starts over */
            if (fresh.params) cusolverDnDestroyParams(fresh.params);
            if (fresh.syevj) cusolverDnDestroySyevjInfo(fresh.syevj);
            if (fresh.blas) cublasDestroy(fresh.blas);
            if (fresh.solver) cusolverDnDestroy(fresh.solver);
            cgd_report(&fail, "creating the cuSOLVER/cuBLAS handles", e);
            return nullptr;
        }
        fresh.device = device;
        *hd = fresh;
    }
    if (bind) {
        SOLVER_TRY(cusolverDnSetStream(hd->solver, stream));
        SOLVER_TRY(cublasSetStream(hd->blas, stream));
    }
    return hd;
done:
    return nullptr;
}

/* Grows the handles' host workspace to `bytes`; false when out of host memory. */
inline bool cgd_reserve_host_work(CgdHandles *hd, size_t bytes) {
    if (bytes <= hd->host_bytes) return true;
    void *p = realloc(hd->host_work, bytes);
    if (!p) return false;
    hd->host_work = p;
    hd->host_bytes = bytes;
    return true;
}

/*
 * Lays buffers out in the caller's workspace, 256-byte aligned. The same code sizes the workspace (base =
 * nullptr: only `used` advances) and carves it (base = the workspace), so the two cannot disagree.
 */
struct CgdCarver {
    char *base;
    size_t used = 0;
    explicit CgdCarver(void *workspace) : base(static_cast<char *>(workspace)) {}
    template <typename T> T *take(size_t count) {
        size_t offset = (used + 255) & ~(size_t)255;
        used = offset + count * sizeof(T);
        return base ? reinterpret_cast<T *>(base + offset) : nullptr;
    }
};

inline int cgd_grid_for(int64_t n) {
    int64_t blocks = (n + CGD_SOLVER_THREADS - 1) / CGD_SOLVER_THREADS;
    return (int)(blocks < 65535 ? (blocks > 0 ? blocks : 1) : 65535);
}

__device__ __forceinline__ bool cgd_skipped(const float *skip) { return skip != nullptr && *skip != 0.0f; }

/* bad |= the symmetric matrix about to be solved holds NaN or Inf (bad is cleared on the stream before). */
static __global__ void cgd_screen_kernel(int *bad, const cgd_real *A, int64_t total) {
    int local = 0;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x)
        local |= !isfinite(A[e]);
    if (local) atomicOr(bad, 1);
}

/* A failed screen hands the solver the identity instead, so it never sees NaN or Inf. */
static __global__ void cgd_replace_kernel(cgd_real *A, int64_t n, const int *bad) {
    if (!*bad) return;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n * n; e += (int64_t)gridDim.x * blockDim.x)
        A[e] = e / n == e % n ? CGD_R(1.0) : CGD_R(0.0);
}

#endif /* CGD_CUDA_SOLVER_CUH */
