/*
 * CUDA kernels of the induced-metric optimizers (cgd.h, cgd_induced_*), many tensors per launch (see
 * multi_tensor.cuh), all on the caller's stream with no host synchronisation. The norm is deterministic: each
 * CUDA block sums its chunk in a fixed tree into its own slot, then one block adds the slots in order.
 */
#include <cuda_runtime.h>

#include "induced_math.h"
#include "kernels.h"
#include "multi_tensor.cuh"

namespace {

struct induced_args {
    cgd_mt_layout layout;
    void *param[CGD_MT_MAX_TENSORS];
    const void *grad[CGD_MT_MAX_TENSORS];
    cgd_real *m1[CGD_MT_MAX_TENSORS];
    cgd_real *m2[CGD_MT_MAX_TENSORS];
    double *step[CGD_MT_MAX_TENSORS];
};

struct step_list {
    int32_t count;
    double *step[CGD_MT_MAX_TENSORS];
};

__device__ bool skipped(const float *skip) { return skip != nullptr && *skip != 0.0f; }

/* Tree sum of one value per thread in a fixed order; the result is valid in thread 0. */
__device__ double block_sum(double v) {
    __shared__ double slot[CGD_MT_THREADS];
    slot[threadIdx.x] = v;
    __syncthreads();
    for (int s = CGD_MT_THREADS / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) slot[threadIdx.x] += slot[threadIdx.x + s];
        __syncthreads();
    }
    return slot[0];
}

template <int DT>
__global__ void __launch_bounds__(CGD_MT_THREADS)
    norm_kernel(const induced_args a, const cgd_induced_consts k, double *partial, const float *grad_scale,
                const float *skip) {
    if (skipped(skip)) return;
    const cgd_mt_work w = cgd_mt_locate(&a.layout, (int32_t)blockIdx.x);
    const cgd_induced_step_consts s = cgd_induced_make_step_consts(&k, *a.step[w.tensor], k.lr);
    const cgd_real scale = grad_scale ? (cgd_real)*grad_scale : CGD_R(1.0);
    cgd_real *m2 = a.m2[w.tensor];
    double acc = 0.0;
    cgd_real unused = 0;
    for (int64_t i = w.begin + threadIdx.x; i < w.end; i += blockDim.x)
        acc += cgd_induced_norm_term(&k, &s, load1<DT>(a.grad[w.tensor], i) / scale, k.rms ? &m2[i] : &unused);
    double total = block_sum(acc);
    if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

__global__ void __launch_bounds__(CGD_MT_THREADS)
    add_partials_kernel(const double *partial, int64_t n, double *sum, const float *skip) {
    if (skipped(skip)) return;
    double acc = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += partial[i];
    double total = block_sum(acc);
    if (threadIdx.x == 0) *sum += total;
}

#if !CGD_F64
__global__ void rate_kernel(const cgd_induced_metric m, const double *sum, const double *loss, double *norm_ema,
                            double *norm_step, double *rate, const float *skip) {
    if (skipped(skip)) return;
    *rate = cgd_induced_rate_of(&m, *sum, loss ? *loss : 0.0, norm_ema, *norm_step);
    *norm_step += 1.0;
}
#endif

template <int DT>
__global__ void __launch_bounds__(CGD_MT_THREADS)
    step_kernel(const induced_args a, const cgd_induced_consts k, const double *rate, const float *grad_scale,
                const float *skip) {
    if (skipped(skip)) return;
    const cgd_mt_work w = cgd_mt_locate(&a.layout, (int32_t)blockIdx.x);
    const int t = w.tensor;
    const cgd_induced_step_consts s =
        cgd_induced_make_step_consts(&k, *a.step[t], k.lr_device ? (cgd_real)*k.lr_device : k.lr);
    const cgd_real scale = grad_scale ? (cgd_real)*grad_scale : CGD_R(1.0), r = (cgd_real)*rate;
    for (int64_t i = w.begin + threadIdx.x; i < w.end; i += blockDim.x) {
        cgd_real p = load1<DT>(a.param[t], i);
        cgd_real g = load1<DT>(a.grad[t], i) / scale;
        store1<DT>(a.param[t], i, cgd_induced_update(&k, &s, p, g, &a.m1[t][i], k.rms ? a.m2[t][i] : 0, r));
    }
}

/* After the step kernel on the same stream, so no block can still be reading a counter. */
__global__ void increment_kernel(const step_list steps, const float *skip) {
    if (skipped(skip)) return;
    if ((int)threadIdx.x < steps.count) *steps.step[threadIdx.x] += 1.0;
}

template <typename Launch>
int for_batches(const cgd_diag_tensor *tensors, int64_t count, Launch launch) {
    static thread_local induced_args a;
    static thread_local step_list steps;
    cgd_mt_reset(&a.layout);
    steps.count = 0;
    for (int64_t i = 0; i < count; ++i) {
        if (!cgd_mt_add(&a.layout, tensors[i].numel)) {
            int e = launch(a, steps);
            if (e) return e;
            cgd_mt_reset(&a.layout);
            steps.count = 0;
            cgd_mt_add(&a.layout, tensors[i].numel);
        }
        int32_t j = a.layout.count - 1;
        a.param[j] = tensors[i].param;
        a.grad[j] = tensors[i].grad;
        a.m1[j] = static_cast<cgd_real *>(tensors[i].exp_avg);
        a.m2[j] = static_cast<cgd_real *>(tensors[i].exp_avg_sq);
        a.step[j] = tensors[i].step;
        steps.step[j] = tensors[i].step;
        steps.count = j + 1;
    }
    return a.layout.count ? launch(a, steps) : 0;
}

}  // namespace

/* partial: the caller's workspace, one double per chunk (cgd_induced_norm_chunks). */
extern "C" int CGD_NAME(cgd_cuda_induced_norm)(const cgd_induced_hparams *h, cgd_dtype dtype,
                                               const cgd_diag_tensor *tensors, int64_t count, double *sum,
                                               const float *grad_scale, const float *skip, double *partial,
                                               void *stream_ptr) {
    cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
    const cgd_induced_consts k = cgd_induced_make_consts(h);
    if (cgd_induced_norm_chunks(tensors, count) == 0) return 0;
    int64_t written = 0;
    int err = for_batches(tensors, count, [&](const induced_args &a, const step_list &) {
        int32_t blocks = cgd_mt_chunks(&a.layout);
        if (blocks == 0) return 0;
#define CGD_LAUNCH(DT) norm_kernel<DT><<<blocks, CGD_MT_THREADS, 0, stream>>>(a, k, partial + written, grad_scale, skip)
        CGD_DISPATCH_DTYPE(dtype, CGD_LAUNCH);
#undef CGD_LAUNCH
        written += blocks;
        return (int)cudaGetLastError();
    });
    if (!err) {
        add_partials_kernel<<<1, CGD_MT_THREADS, 0, stream>>>(partial, written, sum, skip);
        err = (int)cudaGetLastError();
    }
    return err;
}

#if !CGD_F64
extern "C" int cgd_cuda_induced_rate(const cgd_induced_metric *m, const double *sum, const double *loss,
                                     double *norm_ema, double *norm_step, double *rate, const float *skip,
                                     void *stream_ptr) {
    rate_kernel<<<1, 1, 0, static_cast<cudaStream_t>(stream_ptr)>>>(*m, sum, loss, norm_ema, norm_step, rate, skip);
    return (int)cudaGetLastError();
}
#endif

extern "C" int CGD_NAME(cgd_cuda_induced_step)(const cgd_induced_hparams *h, cgd_dtype dtype,
                                               const cgd_diag_tensor *tensors, int64_t count, const double *rate,
                                               const float *grad_scale, const float *skip, void *stream_ptr) {
    cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
    const cgd_induced_consts k = cgd_induced_make_consts(h);
    return for_batches(tensors, count, [&](const induced_args &a, const step_list &steps) {
        int32_t blocks = cgd_mt_chunks(&a.layout);
        if (blocks > 0) {
#define CGD_LAUNCH(DT) step_kernel<DT><<<blocks, CGD_MT_THREADS, 0, stream>>>(a, k, rate, grad_scale, skip)
            CGD_DISPATCH_DTYPE(dtype, CGD_LAUNCH);
#undef CGD_LAUNCH
        }
        increment_kernel<<<1, CGD_MT_MAX_TENSORS, 0, stream>>>(steps, skip);
        return (int)cudaGetLastError();
    });
}
