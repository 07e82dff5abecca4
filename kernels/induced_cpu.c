/*
 * CPU kernels of the induced-metric optimizers (cgd.h, cgd_induced_*). The norm is summed in double per chunk of
 * CGD_CPU_INDUCED_CHUNK elements, each chunk in CGD_INDUCED_LANES interleaved partial sums (element i into sum
 * i mod lanes, so the loop vectorises while every sum keeps one fixed order) added in order, and the chunks are
 * added in order, so the sum does not depend on the number of OpenMP threads. Every loop has a copy per metric
 * (identity or RMS) and per gradient scaling, so none tests them per element.
 */
#include <stdlib.h>

#include "induced_math.h"
#include "kernels.h"
#include "real.h"

#define CGD_CPU_INDUCED_CHUNK ((int64_t)CGD_MT_CHUNK)

static int64_t chunks_of(int64_t numel) { return (numel + CGD_CPU_INDUCED_CHUNK - 1) / CGD_CPU_INDUCED_CHUNK; }

/* Whether a call is worth a parallel region (CGD_CPU_PARALLEL_MIN). */
static int parallel_worth(const cgd_diag_tensor *tensors, int64_t count) {
    int64_t elements = 0;
    for (int64_t i = 0; i < count; ++i) elements += tensors[i].numel;
    return elements >= CGD_CPU_PARALLEL_MIN;
}

#define CGD_INDUCED_LANES 16

/* One chunk's sum of g gamma^-1 g, M2 advanced (RMS): the per-element term is cgd_induced_norm_term with the
   metric and the scaling fixed by the caller's constants, so each copy is one straight vectorised loop. */
static inline __attribute__((always_inline)) double norm_range(const cgd_induced_consts *kp,
                                                                const cgd_induced_step_consts *s, cgd_dtype dtype,
                                                                const void *grad, cgd_real *m2, int rms, int scaled,
                                                                cgd_real scale, int64_t begin, int64_t end) {
    cgd_induced_consts k = *kp;
    k.rms = rms;
    double part[CGD_INDUCED_LANES] = {0};
    cgd_real unused[CGD_INDUCED_LANES] = {0};
    int64_t i = begin;
    for (; i + CGD_INDUCED_LANES <= end; i += CGD_INDUCED_LANES)
        for (int l = 0; l < CGD_INDUCED_LANES; ++l) {
            cgd_real g = cgd_load_real(dtype, grad, i + l);
            if (scaled) g = g / scale;
            part[l] += cgd_induced_norm_term(&k, s, g, rms ? &m2[i + l] : &unused[l]);
        }
    for (int l = 0; i < end; ++i, ++l) {
        cgd_real g = cgd_load_real(dtype, grad, i);
        if (scaled) g = g / scale;
        part[l] += cgd_induced_norm_term(&k, s, g, rms ? &m2[i] : &unused[l]);
    }
    double acc = 0.0;
    for (int l = 0; l < CGD_INDUCED_LANES; ++l) acc += part[l];
    return acc;
}

CGD_CPU_CLONES
static double norm_chunk(const cgd_induced_consts *k, const cgd_induced_step_consts *s, cgd_dtype dtype,
                         const void *grad, cgd_real *m2, int scaled, cgd_real scale, int64_t begin, int64_t end) {
#define CGD_NORM(DT, RMS) \
    (scaled ? norm_range(k, s, DT, grad, m2, RMS, 1, scale, begin, end) \
            : norm_range(k, s, DT, grad, m2, RMS, 0, scale, begin, end))
#define CGD_NORM_OF(DT) sum = k->rms ? CGD_NORM(DT, 1) : CGD_NORM(DT, 0)
    double sum = 0.0;
    CGD_DISPATCH_DTYPE(dtype, CGD_NORM_OF);
    return sum;
#undef CGD_NORM_OF
#undef CGD_NORM
}

int CGD_NAME(cgd_cpu_induced_norm)(const cgd_induced_hparams *h, cgd_dtype dtype, const cgd_diag_tensor *tensors,
                                   int64_t count, double *sum, const float *grad_scale, const float *skip) {
    if (skip && *skip != 0.0f) return 0;
    const cgd_induced_consts k = cgd_induced_make_consts(h);
    const cgd_real scale = grad_scale ? (cgd_real)*grad_scale : CGD_R(1.0);
    const int scaled = grad_scale != NULL;
    /* One partial sum per chunk of the call, allocated before any M2 advances, so running out of memory changes
       nothing; added in chunk order after the region. */
    const int64_t total = cgd_induced_norm_chunks(tensors, count);
    double *partial = cgd_host_alloc((size_t)(total > 0 ? total : 1) * sizeof(double));
    if (!partial) return 1;
#pragma omp parallel if (parallel_worth(tensors, count))
    {
        const cgd_cpu_share share = cgd_cpu_my_share();
        int64_t first = 0;
        for (int64_t ti = 0; ti < count; ++ti) {
            const cgd_diag_tensor *t = &tensors[ti];
            const int64_t chunks = chunks_of(t->numel);
            int64_t c = cgd_cpu_first_chunk(share, first);
            if (c < chunks) {
                cgd_real *m2 = (cgd_real *)t->exp_avg_sq;
                const cgd_induced_step_consts s = cgd_induced_make_step_consts(&k, *t->step, k.lr);
                for (; c < chunks; c += share.threads) {
                    const int64_t begin = c * CGD_CPU_INDUCED_CHUNK;
                    const int64_t end =
                        begin + CGD_CPU_INDUCED_CHUNK < t->numel ? begin + CGD_CPU_INDUCED_CHUNK : t->numel;
                    partial[first + c] = norm_chunk(&k, &s, dtype, t->grad, m2, scaled, scale, begin, end);
                }
            }
            first += chunks;
        }
    }
    double sum_of_chunks = 0.0;
    for (int64_t c = 0; c < total; ++c) sum_of_chunks += partial[c];
    free(partial);
    *sum += sum_of_chunks;
    return 0;
}

#if !CGD_F64
int64_t cgd_induced_norm_chunks(const cgd_diag_tensor *tensors, int64_t count) {
    int64_t total = 0;
    for (int64_t i = 0; i < count; ++i) total += chunks_of(tensors[i].numel);
    return total;
}

void cgd_cpu_induced_rate(const cgd_induced_metric *m, const double *sum, const double *loss, double *norm_ema,
                          double *norm_step, double *rate, const float *skip) {
    if (skip && *skip != 0.0f) return;
    *rate = cgd_induced_rate_of(m, *sum, loss ? *loss : 0.0, norm_ema, *norm_step);
    *norm_step += 1.0;
}
#endif

/* One range of the step, the metric, maximize and the scaling fixed by the caller's constants. */
static inline __attribute__((always_inline)) void step_range(const cgd_induced_consts *kp,
                                                              const cgd_induced_step_consts *s, cgd_dtype dtype,
                                                              const cgd_diag_tensor *t, int rms, int maximize,
                                                              int scaled, cgd_real scale, cgd_real r, int64_t begin,
                                                              int64_t end) {
    cgd_induced_consts k = *kp;
    k.rms = rms;
    k.maximize = maximize;
    void *restrict param = t->param;
    const void *restrict grad = t->grad;
    cgd_real *restrict m1 = (cgd_real *)t->exp_avg;
    const cgd_real *restrict m2 = (const cgd_real *)t->exp_avg_sq;
    for (int64_t i = begin; i < end; ++i) {
        cgd_real g = cgd_load_real(dtype, grad, i);
        if (scaled) g = g / scale;
        cgd_real p = cgd_load_real(dtype, param, i);
        cgd_store_real(dtype, param, i, cgd_induced_update(&k, s, p, g, &m1[i], rms ? m2[i] : 0, r));
    }
}

CGD_CPU_CLONES
static void step_chunk(const cgd_induced_consts *k, const cgd_induced_step_consts *s, cgd_dtype dtype,
                       const cgd_diag_tensor *t, int scaled, cgd_real scale, cgd_real r, int64_t begin, int64_t end) {
#define CGD_STEP_SCALED(DT, RMS, MAX) \
    (scaled ? step_range(k, s, DT, t, RMS, MAX, 1, scale, r, begin, end) \
            : step_range(k, s, DT, t, RMS, MAX, 0, scale, r, begin, end))
#define CGD_STEP(DT)                                                                                     \
    (k->rms ? (k->maximize ? CGD_STEP_SCALED(DT, 1, 1) : CGD_STEP_SCALED(DT, 1, 0))                    \
            : (k->maximize ? CGD_STEP_SCALED(DT, 0, 1) : CGD_STEP_SCALED(DT, 0, 0)))
    CGD_DISPATCH_DTYPE(dtype, CGD_STEP);
#undef CGD_STEP
#undef CGD_STEP_SCALED
}

void CGD_NAME(cgd_cpu_induced_step)(const cgd_induced_hparams *h, cgd_dtype dtype, const cgd_diag_tensor *tensors,
                                    int64_t count, const double *rate, const float *grad_scale, const float *skip) {
    if (skip && *skip != 0.0f) return;
    const cgd_induced_consts k = cgd_induced_make_consts(h);
    const cgd_real scale = grad_scale ? (cgd_real)*grad_scale : CGD_R(1.0), r = (cgd_real)*rate;
    const int scaled = grad_scale != NULL;
#pragma omp parallel if (parallel_worth(tensors, count))
    {
        const cgd_cpu_share share = cgd_cpu_my_share();
        int64_t first = 0;
        for (int64_t ti = 0; ti < count; ++ti) {
            const cgd_diag_tensor *t = &tensors[ti];
            const int64_t chunks = chunks_of(t->numel);
            int64_t c = cgd_cpu_first_chunk(share, first);
            if (c < chunks) {
                const cgd_induced_step_consts s =
                    cgd_induced_make_step_consts(&k, *t->step, k.lr_device ? (cgd_real)*k.lr_device : k.lr);
                for (; c < chunks; c += share.threads) {
                    const int64_t begin = c * CGD_CPU_INDUCED_CHUNK;
                    const int64_t end =
                        begin + CGD_CPU_INDUCED_CHUNK < t->numel ? begin + CGD_CPU_INDUCED_CHUNK : t->numel;
                    step_chunk(&k, &s, dtype, t, scaled, scale, r, begin, end);
                }
            }
            first += chunks;
        }
    }
    for (int64_t ti = 0; ti < count; ++ti) *tensors[ti].step += 1.0;
}
