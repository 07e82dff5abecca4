/*
 * Multi-tensor launches: many tensors are stepped by one kernel launch. The pointers and sizes of up to
 * CGD_MT_MAX_TENSORS tensors travel in the kernel's argument block (no host-to-device copy of metadata, so a
 * launch can be captured in a CUDA graph). Each tensor is cut into chunks of CGD_MT_CHUNK elements; block b of
 * the grid works on global chunk b and finds its tensor by binary search over the chunk prefix sums, so any mix
 * of tensor sizes gives a balanced grid and no per-block table is needed.
 *
 * The argument block is ~13 KB: kernel arguments above 4 KB need CUDA 12.1 and a Volta or newer GPU.
 */
#ifndef CGD_MULTI_TENSOR_CUH
#define CGD_MULTI_TENSOR_CUH

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "kernels.h" /* CGD_MT_CHUNK */
#include "real.h"

#define CGD_MT_MAX_TENSORS 192
#define CGD_MT_THREADS 256

typedef struct cgd_mt_layout {
    int32_t count;
    int32_t first_chunk[CGD_MT_MAX_TENSORS + 1]; /* first_chunk[count] = chunks in this launch */
    int64_t numel[CGD_MT_MAX_TENSORS];
} cgd_mt_layout;

/* Where global chunk `block` lies: its tensor and element range. */
typedef struct cgd_mt_work {
    int32_t tensor;
    int64_t begin, end;
} cgd_mt_work;

static __device__ __forceinline__ cgd_mt_work cgd_mt_locate(const cgd_mt_layout *layout, int32_t block) {
    int32_t lo = 0, hi = layout->count - 1;
    while (lo < hi) { /* last tensor whose first chunk is <= block; empty tensors own no chunk */
        int32_t mid = (lo + hi + 1) >> 1;
        if (layout->first_chunk[mid] <= block)
            lo = mid;
        else
            hi = mid - 1;
    }
    cgd_mt_work w;
    w.tensor = lo;
    w.begin = (int64_t)(block - layout->first_chunk[lo]) * CGD_MT_CHUNK;
    int64_t end = w.begin + CGD_MT_CHUNK;
    w.end = end < layout->numel[lo] ? end : layout->numel[lo];
    return w;
}

/* Appends a tensor to the layout; returns 0 when the layout is full and must be launched first. */
static inline int cgd_mt_add(cgd_mt_layout *layout, int64_t numel) {
    int64_t chunks = (numel + CGD_MT_CHUNK - 1) / CGD_MT_CHUNK;
    if (layout->count == CGD_MT_MAX_TENSORS) return 0;
    /* The grid is one block per chunk: keep the launch's chunk count within a grid dimension. */
    if (layout->count > 0 && chunks > (int64_t)INT32_MAX - layout->first_chunk[layout->count]) return 0;
    int32_t i = layout->count++;
    layout->numel[i] = numel;
    layout->first_chunk[i + 1] = layout->first_chunk[i] + (int32_t)chunks;
    return 1;
}

static inline void cgd_mt_reset(cgd_mt_layout *layout) {
    layout->count = 0;
    layout->first_chunk[0] = 0;
}

static inline int32_t cgd_mt_chunks(const cgd_mt_layout *layout) { return layout->first_chunk[layout->count]; }

/* ---- element access by dtype (DT is a cgd_dtype), in the build's real type (real.h) ---- */

template <int DT> static __device__ __forceinline__ cgd_real load1(const void *base, int64_t i) {
    if (DT == CGD_FLOAT64) return (cgd_real) static_cast<const double *>(base)[i];
    if (DT == CGD_FLOAT16) return __half2float(static_cast<const __half *>(base)[i]);
    if (DT == CGD_BFLOAT16) return __bfloat162float(static_cast<const __nv_bfloat16 *>(base)[i]);
    return static_cast<const float *>(base)[i];
}

template <int DT> static __device__ __forceinline__ void store1(void *base, int64_t i, cgd_real v) {
    if (DT == CGD_FLOAT64)
        static_cast<double *>(base)[i] = v;
    else if (DT == CGD_FLOAT16)
        static_cast<__half *>(base)[i] = __float2half_rn((float)v);
    else if (DT == CGD_BFLOAT16)
        static_cast<__nv_bfloat16 *>(base)[i] = __float2bfloat16_rn((float)v);
    else
        static_cast<float *>(base)[i] = (float)v;
}

#endif /* CGD_MULTI_TENSOR_CUH */
