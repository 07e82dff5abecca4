/*
 * CUDA kernels: the diagonal CGD step and (float32 build only) the non-finite scan, each over many tensors per
 * launch (see multi_tensor.cuh). The step is one pass over memory: read param, grad, M1, M2; write param, M1,
 * M2, the non-finite guard checked on the way (diag_math.h). Loads and stores are 4 elements wide when a
 * tensor's arrays are aligned for it. Nothing here synchronizes the host; all work goes to the caller's stream.
 */
#include <cuda_runtime.h>

#include "diag_math.h"
#include "kernels.h"
#include "multi_tensor.cuh"

/* Internal linkage for everything but the entry points: the float32 and float64 builds of this file define the
   same names over different types. */
namespace {

typedef struct diag_args {
    cgd_mt_layout layout;
    void *param[CGD_MT_MAX_TENSORS];
    const void *grad[CGD_MT_MAX_TENSORS];
    cgd_real *m1[CGD_MT_MAX_TENSORS];
    cgd_real *m2[CGD_MT_MAX_TENSORS];
    double *step[CGD_MT_MAX_TENSORS];
    uint8_t vector_ok[CGD_MT_MAX_TENSORS];
} diag_args;

typedef struct step_args {
    int32_t count;
    double *step[CGD_MT_MAX_TENSORS];
} step_args;

/* ---- vector element access (load1/store1 live in multi_tensor.cuh) ---- */

/* Four consecutive elements; i is a multiple of 4 and the base is aligned (16 bytes; 8 for 16-bit types). */
template <int DT> __device__ __forceinline__ void load4(const void *base, int64_t i, cgd_real v[4]) {
    if (DT == CGD_FLOAT64) {
        const double2 *d = reinterpret_cast<const double2 *>(static_cast<const double *>(base) + i);
        double2 x = d[0], y = d[1];
        v[0] = (cgd_real)x.x, v[1] = (cgd_real)x.y, v[2] = (cgd_real)y.x, v[3] = (cgd_real)y.y;
    } else if (DT == CGD_FLOAT32) {
        float4 x = *reinterpret_cast<const float4 *>(static_cast<const float *>(base) + i);
        v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
    } else {
        uint2 raw = *reinterpret_cast<const uint2 *>(static_cast<const uint16_t *>(base) + i);
        const uint16_t *h = reinterpret_cast<const uint16_t *>(&raw);
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = load1<DT>(h, j);
    }
}

template <int DT> __device__ __forceinline__ void store4(void *base, int64_t i, const cgd_real v[4]) {
    if (DT == CGD_FLOAT64) {
        double2 *d = reinterpret_cast<double2 *>(static_cast<double *>(base) + i);
        d[0] = make_double2((double)v[0], (double)v[1]);
        d[1] = make_double2((double)v[2], (double)v[3]);
    } else if (DT == CGD_FLOAT32) {
        *reinterpret_cast<float4 *>(static_cast<float *>(base) + i) =
            make_float4((float)v[0], (float)v[1], (float)v[2], (float)v[3]);
    } else {
        uint2 raw;
        uint16_t *h = reinterpret_cast<uint16_t *>(&raw);
#pragma unroll
        for (int j = 0; j < 4; ++j) store1<DT>(h, j, v[j]);
        *reinterpret_cast<uint2 *>(static_cast<uint16_t *>(base) + i) = raw;
    }
}

/* ---- the step ---- */

/* METRIC is k.metric made a compile-time constant: with it left to run time, the four unrolled updates of a
   vector each carry every metric's path, and NVVM spends minutes threading the combinations. */
template <int DT, int METRIC>
__global__ void __launch_bounds__(CGD_MT_THREADS)
    diag_step_kernel(const diag_args args, cgd_diag_consts k, const float *grad_scale, const float *skip,
                     int32_t *guard_flags) {
    if (skip && *skip != 0.0f) return;
    k.metric = METRIC;
    const cgd_mt_work w = cgd_mt_locate(&args.layout, (int32_t)blockIdx.x);
    const int t = w.tensor;
    const cgd_diag_step_consts s =
        cgd_diag_make_step_consts(&k, *args.step[t], k.lr_device ? (cgd_real)*k.lr_device : k.lr);
    const cgd_real scale = grad_scale ? (cgd_real)*grad_scale : CGD_R(1.0);
    void *param = args.param[t];
    const void *grad = args.grad[t];
    cgd_real *m1 = args.m1[t];
    cgd_real *m2 = args.m2[t];

    int held = 0;
    int64_t scalar_from = w.begin;
    if (args.vector_ok[t]) {
        scalar_from = w.begin + ((w.end - w.begin) & ~(int64_t)3);
        for (int64_t i = w.begin + 4 * (int64_t)threadIdx.x; i < scalar_from; i += 4 * (int64_t)blockDim.x) {
            cgd_real p[4], g[4], a[4] = {0, 0, 0, 0}, b[4] = {0, 0, 0, 0};
            load4<DT>(param, i, p);
            load4<DT>(grad, i, g);
            if (k.has_m1) load4<CGD_STATE_DTYPE>(m1, i, a);
            if (k.has_m2) load4<CGD_STATE_DTYPE>(m2, i, b);
#pragma unroll
            for (int j = 0; j < 4; ++j) held |= cgd_diag_update_guarded(&k, &s, &p[j], g[j] / scale, &a[j], &b[j]);
            store4<DT>(param, i, p);
            if (k.has_m1) store4<CGD_STATE_DTYPE>(m1, i, a);
            if (k.has_m2) store4<CGD_STATE_DTYPE>(m2, i, b);
        }
    }
    for (int64_t i = scalar_from + threadIdx.x; i < w.end; i += blockDim.x) {
        cgd_real p = load1<DT>(param, i), a = k.has_m1 ? m1[i] : 0, b = k.has_m2 ? m2[i] : 0;
        held |= cgd_diag_update_guarded(&k, &s, &p, load1<DT>(grad, i) / scale, &a, &b);
        store1<DT>(param, i, p);
        if (k.has_m1) m1[i] = a;
        if (k.has_m2) m2[i] = b;
    }
    /* Every block that held an entry back stores the same 1 (the flags were cleared before the launch). */
    if (guard_flags && __syncthreads_or(held) && threadIdx.x == 0) guard_flags[t] = 1;
}

/* Runs after the step kernel on the same stream, so no block of the step can still be reading a counter. */
__global__ void increment_steps_kernel(const step_args args, const float *skip) {
    if (skip && *skip != 0.0f) return;
    int i = (int)threadIdx.x;
    if (i < args.count) *args.step[i] += 1.0;
}

static int aligned(const void *p, int bytes) { return ((uintptr_t)p % (uintptr_t)bytes) == 0; }

static int launch_diag(const diag_args *args, const step_args *steps, const cgd_diag_consts *k, cgd_dtype dtype,
                       const float *grad_scale, const float *skip, int32_t *guard_flags, cudaStream_t stream) {
    int32_t blocks = cgd_mt_chunks(&args->layout);
    if (blocks > 0) {
#define CGD_LAUNCH_METRIC(DT, M)                                                                               \
    diag_step_kernel<DT, M><<<blocks, CGD_MT_THREADS, 0, stream>>>(*args, *k, grad_scale, skip, guard_flags)
#define CGD_LAUNCH(DT) CGD_DISPATCH_METRIC(k->metric, CGD_LAUNCH_METRIC, DT)
        CGD_DISPATCH_DTYPE(dtype, CGD_LAUNCH);
#undef CGD_LAUNCH
#undef CGD_LAUNCH_METRIC
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) return (int)e;
    }
    increment_steps_kernel<<<1, CGD_MT_MAX_TENSORS, 0, stream>>>(*steps, skip);
    return (int)cudaGetLastError();
}

}  // namespace

extern "C" int CGD_NAME(cgd_cuda_diag_step)(const cgd_diag_hparams *h, cgd_dtype dtype, const cgd_diag_tensor *tensors,
                                            int64_t count, const float *grad_scale, const float *skip, void *stream) {
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    cgd_diag_consts kc = cgd_diag_make_consts(h);
    kc.guard_bits = cgd_diag_guard_bits(h);
    const cgd_diag_consts *k = &kc;
    int32_t *flags = h->guard_flags;
    if (flags && count > 0) {
        cudaError_t e = cudaMemsetAsync(flags, 0, (size_t)count * sizeof(int32_t), s);
        if (e != cudaSuccess) return (int)e;
    }
    const int param_align = dtype == CGD_FLOAT16 || dtype == CGD_BFLOAT16 ? 8 : 16;
    /* Static: ~12 KB is too much for some callers' stacks, and the launch copies it by value anyway. */
    static thread_local diag_args args;
    static thread_local step_args steps;
    cgd_mt_reset(&args.layout);
    steps.count = 0;
    int64_t first = 0; /* index of args' tensor 0 in the caller's list */
    for (int64_t i = 0; i < count; ++i) {
        const cgd_diag_tensor *t = &tensors[i];
        if (!cgd_mt_add(&args.layout, t->numel)) {
            int e = launch_diag(&args, &steps, k, dtype, grad_scale, skip, flags ? flags + first : NULL, s);
            if (e) return e;
            first = i;
            cgd_mt_reset(&args.layout);
            steps.count = 0;
            cgd_mt_add(&args.layout, t->numel);
        }
        int32_t j = args.layout.count - 1;
        args.param[j] = t->param;
        args.grad[j] = t->grad;
        args.m1[j] = static_cast<cgd_real *>(t->exp_avg);
        args.m2[j] = static_cast<cgd_real *>(t->exp_avg_sq);
        args.step[j] = t->step;
        steps.step[j] = t->step;
        steps.count = j + 1;
        args.vector_ok[j] = (uint8_t)(aligned(t->param, param_align) && aligned(t->grad, param_align) &&
                                      (!k->has_m1 || aligned(t->exp_avg, 16)) &&
                                      (!k->has_m2 || aligned(t->exp_avg_sq, 16)));
    }
    if (args.layout.count == 0) return 0;
    return launch_diag(&args, &steps, k, dtype, grad_scale, skip, flags ? flags + first : NULL, s);
}

#if !CGD_F64
/* ---- the non-finite scan ---- */

namespace {

typedef struct scan_args {
    cgd_mt_layout layout;
    const void *data[CGD_MT_MAX_TENSORS];
    uint32_t threshold[CGD_MT_MAX_TENSORS]; /* cgd_threshold_bits; for float64 its high word */
} scan_args;

/* A 32-bit word of the array against the tensor's threshold: one float32, two 16-bit values, or the high word of
   a float64 (little-endian: the odd words; the float64 threshold's low word is 0, so the high word decides). */
template <int DT> __device__ __forceinline__ bool word_nonfinite(uint32_t u, uint32_t t) {
    if (DT == CGD_FLOAT32 || DT == CGD_FLOAT64) return (u & 0x7fffffffu) >= t;
    return (u & 0x7fffu) >= t || ((u >> 16) & 0x7fffu) >= t;
}

template <int DT>
__global__ void __launch_bounds__(CGD_MT_THREADS)
    nonfinite_kernel(const scan_args args, int32_t *flags, float *found) {
    const cgd_mt_work w = cgd_mt_locate(&args.layout, (int32_t)blockIdx.x);
    const int elem_bytes = DT == CGD_FLOAT64 ? 8 : (DT == CGD_FLOAT32 ? 4 : 2);
    const int per_vec = 16 / elem_bytes;
    const char *base = static_cast<const char *>(args.data[w.tensor]);
    const uint32_t t = args.threshold[w.tensor];
    bool bad = false;
    int64_t scalar_from = w.begin;
    if (((uintptr_t)base & 15u) == 0) {
        scalar_from = w.begin + ((w.end - w.begin) / per_vec) * per_vec;
        for (int64_t i = w.begin + per_vec * (int64_t)threadIdx.x; i < scalar_from; i += per_vec * (int64_t)blockDim.x) {
            uint4 v = *reinterpret_cast<const uint4 *>(base + i * elem_bytes);
            if (DT == CGD_FLOAT64)
                bad |= word_nonfinite<DT>(v.y, t) | word_nonfinite<DT>(v.w, t);
            else
                bad |= word_nonfinite<DT>(v.x, t) | word_nonfinite<DT>(v.y, t) | word_nonfinite<DT>(v.z, t) |
                       word_nonfinite<DT>(v.w, t);
        }
    }
    for (int64_t i = scalar_from + threadIdx.x; i < w.end; i += blockDim.x) {
        uint32_t u = DT == CGD_FLOAT64   ? reinterpret_cast<const uint32_t *>(base)[2 * i + 1]
                     : DT == CGD_FLOAT32 ? reinterpret_cast<const uint32_t *>(base)[i]
                                         : (uint32_t) reinterpret_cast<const uint16_t *>(base)[i];
        /* A lone 16-bit value sits in the low half; the high half is 0, below every threshold. */
        bad |= word_nonfinite<DT>(u, t);
    }
    /* Every block that sees a bad value stores the same 1s: the result is the same whatever the order. */
    if (__syncthreads_or(bad) && threadIdx.x == 0) {
        flags[w.tensor] = 1;
        *found = 1.0f;
    }
}

static int launch_scan(const scan_args *args, cgd_dtype dtype, int32_t *flags, float *found, cudaStream_t stream) {
    int32_t blocks = cgd_mt_chunks(&args->layout);
    if (blocks == 0) return 0;
    switch (dtype) {
    case CGD_FLOAT64: nonfinite_kernel<CGD_FLOAT64><<<blocks, CGD_MT_THREADS, 0, stream>>>(*args, flags, found); break;
    case CGD_FLOAT16: nonfinite_kernel<CGD_FLOAT16><<<blocks, CGD_MT_THREADS, 0, stream>>>(*args, flags, found); break;
    case CGD_BFLOAT16: nonfinite_kernel<CGD_BFLOAT16><<<blocks, CGD_MT_THREADS, 0, stream>>>(*args, flags, found); break;
    default: nonfinite_kernel<CGD_FLOAT32><<<blocks, CGD_MT_THREADS, 0, stream>>>(*args, flags, found); break;
    }
    return (int)cudaGetLastError();
}

}  // namespace

extern "C" int cgd_cuda_nonfinite_check(cgd_dtype dtype, const void *const *data, const int64_t *numels,
                                        const double *limits, int64_t count, int32_t *flags, float *found,
                                        void *stream) {
    cudaStream_t s = static_cast<cudaStream_t>(stream);
    cudaError_t e = cudaMemsetAsync(found, 0, sizeof(float), s);
    if (e == cudaSuccess && count > 0) e = cudaMemsetAsync(flags, 0, (size_t)count * sizeof(int32_t), s);
    if (e != cudaSuccess) return (int)e;
    static thread_local scan_args args;
    cgd_mt_reset(&args.layout);
    int64_t first = 0; /* index of args' tensor 0 in the caller's list */
    for (int64_t i = 0; i < count; ++i) {
        if (!cgd_mt_add(&args.layout, numels[i])) {
            int err = launch_scan(&args, dtype, flags + first, found, s);
            if (err) return err;
            first = i;
            cgd_mt_reset(&args.layout);
            cgd_mt_add(&args.layout, numels[i]);
        }
        const uint64_t t = cgd_threshold_bits(dtype, limits ? limits[i] : INFINITY);
        args.data[args.layout.count - 1] = data[i];
        args.threshold[args.layout.count - 1] = (uint32_t)(dtype == CGD_FLOAT64 ? t >> 32 : t);
    }
    return launch_scan(&args, dtype, flags + first, found, s);
}
#endif
