/*
 * CPU kernels of the induced-metric optimizers (cgd.h, cgd_induced_*). The norm is summed in double per chunk of
 * CGD_CPU_INDUCED_CHUNK elements and the chunks are added in order, so the sum does not depend on the number of
 * OpenMP threads.
 */
#include <stdlib.h>

#include "induced_math.h"
#include "kernels.h"
#include "real.h"

#define CGD_CPU_INDUCED_CHUNK ((int64_t)CGD_MT_CHUNK)

static int64_t chunks_of(int64_t numel) { return (numel + CGD_CPU_INDUCED_CHUNK - 1) / CGD_CPU_INDUCED_CHUNK; }

int CGD_NAME(cgd_cpu_induced_norm)(const cgd_induced_hparams *h, cgd_dtype dtype, const cgd_diag_tensor *tensors,
                                   int64_t count, double *sum, const float *grad_scale, const float *skip) {
    if (skip && *skip != 0.0f) return 0;
    const cgd_induced_consts k = cgd_induced_make_consts(h);
    const cgd_real scale = grad_scale ? (cgd_real)*grad_scale : CGD_R(1.0);
    /* Sized for the largest tensor before any M2 advances, so running out of memory changes nothing. */
    int64_t most = 1;
    for (int64_t ti = 0; ti < count; ++ti) {
        int64_t chunks = chunks_of(tensors[ti].numel);
        most = chunks > most ? chunks : most;
    }
    double *partial = cgd_host_alloc((size_t)most * sizeof(double));
    if (!partial) return 1;
    double total = 0.0;
    for (int64_t ti = 0; ti < count; ++ti) {
        const cgd_diag_tensor *t = &tensors[ti];
        cgd_real *m2 = (cgd_real *)t->exp_avg_sq;
        const cgd_induced_step_consts s = cgd_induced_make_step_consts(&k, *t->step, k.lr);
        const int64_t chunks = chunks_of(t->numel);
#pragma omp parallel for schedule(static) if (chunks > 1)
        for (int64_t c = 0; c < chunks; ++c) {
            int64_t begin = c * CGD_CPU_INDUCED_CHUNK;
            int64_t end = begin + CGD_CPU_INDUCED_CHUNK < t->numel ? begin + CGD_CPU_INDUCED_CHUNK : t->numel;
            double acc = 0.0;
            cgd_real unused = 0;
            for (int64_t i = begin; i < end; ++i) {
                cgd_real g = cgd_load_real(dtype, t->grad, i) / scale;
                acc += cgd_induced_norm_term(&k, &s, g, k.rms ? &m2[i] : &unused);
            }
            partial[c] = acc;
        }
        for (int64_t c = 0; c < chunks; ++c) total += partial[c];
    }
    free(partial);
    *sum += total;
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

void CGD_NAME(cgd_cpu_induced_step)(const cgd_induced_hparams *h, cgd_dtype dtype, const cgd_diag_tensor *tensors,
                                    int64_t count, const double *rate, const float *grad_scale, const float *skip) {
    if (skip && *skip != 0.0f) return;
    const cgd_induced_consts k = cgd_induced_make_consts(h);
    const cgd_real scale = grad_scale ? (cgd_real)*grad_scale : CGD_R(1.0), r = (cgd_real)*rate;
    for (int64_t ti = 0; ti < count; ++ti) {
        const cgd_diag_tensor *t = &tensors[ti];
        cgd_real *m1 = (cgd_real *)t->exp_avg, *m2 = (cgd_real *)t->exp_avg_sq;
        const cgd_induced_step_consts s =
            cgd_induced_make_step_consts(&k, *t->step, k.lr_device ? (cgd_real)*k.lr_device : k.lr);
        const int64_t chunks = chunks_of(t->numel);
#pragma omp parallel for schedule(static) if (chunks > 1)
        for (int64_t c = 0; c < chunks; ++c) {
            int64_t begin = c * CGD_CPU_INDUCED_CHUNK;
            int64_t end = begin + CGD_CPU_INDUCED_CHUNK < t->numel ? begin + CGD_CPU_INDUCED_CHUNK : t->numel;
            for (int64_t i = begin; i < end; ++i) {
                cgd_real g = cgd_load_real(dtype, t->grad, i) / scale;
                cgd_real p = cgd_load_real(dtype, t->param, i);
                cgd_store_real(dtype, t->param, i, cgd_induced_update(&k, &s, p, g, &m1[i], k.rms ? m2[i] : 0, r));
            }
        }
        *t->step += 1.0;
    }
}
