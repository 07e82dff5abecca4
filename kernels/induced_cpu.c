/*
 * CPU kernels of the induced-metric optimizers (cgd.h, cgd_induced_*). The norm is summed in double per chunk of
 * CGD_CPU_INDUCED_CHUNK elements and the chunks are added in order, so the sum does not depend on the number of
 * OpenMP threads.
 */
#include <stdlib.h>

#include "half_convert.h"
#include "induced_math.h"
#include "kernels.h"

#define CGD_CPU_INDUCED_CHUNK ((int64_t)CGD_MT_CHUNK)

static int64_t chunks_of(int64_t numel) { return (numel + CGD_CPU_INDUCED_CHUNK - 1) / CGD_CPU_INDUCED_CHUNK; }

int64_t cgd_induced_norm_chunks(const cgd_diag_tensor *tensors, int64_t count) {
    int64_t total = 0;
    for (int64_t i = 0; i < count; ++i) total += chunks_of(tensors[i].numel);
    return total;
}

int cgd_cpu_induced_norm(const cgd_induced_hparams *h, cgd_dtype dtype, const cgd_diag_tensor *tensors,
                         int64_t count, float *sum, const float *grad_scale, const float *skip) {
    if (skip && *skip != 0.0f) return 0;
    const cgd_induced_consts k = cgd_induced_make_consts(h);
    const float scale = grad_scale ? *grad_scale : 1.0f;
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
        const cgd_induced_step_consts s = cgd_induced_make_step_consts(&k, *t->step, k.lr);
        const int64_t chunks = chunks_of(t->numel);
#pragma omp parallel for schedule(static) if (chunks > 1)
        for (int64_t c = 0; c < chunks; ++c) {
            int64_t begin = c * CGD_CPU_INDUCED_CHUNK;
            int64_t end = begin + CGD_CPU_INDUCED_CHUNK < t->numel ? begin + CGD_CPU_INDUCED_CHUNK : t->numel;
            double acc = 0.0;
            float unused = 0.0f;
            for (int64_t i = begin; i < end; ++i) {
                float g = cgd_load_f32(dtype, t->grad, i) / scale;
                acc += cgd_induced_norm_term(&k, &s, g, k.rms ? &t->exp_avg_sq[i] : &unused);
            }
            partial[c] = acc;
        }
        for (int64_t c = 0; c < chunks; ++c) total += partial[c];
    }
    free(partial);
    *sum += (float)total;
    return 0;
}

void cgd_cpu_induced_rate(const cgd_induced_metric *m, const float *sum, const float *loss, float *norm_ema,
                          double *norm_step, float *rate, const float *skip) {
    if (skip && *skip != 0.0f) return;
    *rate = cgd_induced_rate_of(m, *sum, loss ? *loss : 0.0f, norm_ema, *norm_step);
    *norm_step += 1.0;
}

void cgd_cpu_induced_step(const cgd_induced_hparams *h, cgd_dtype dtype, const cgd_diag_tensor *tensors,
                          int64_t count, const float *rate, const float *grad_scale, const float *skip) {
    if (skip && *skip != 0.0f) return;
    const cgd_induced_consts k = cgd_induced_make_consts(h);
    const float scale = grad_scale ? *grad_scale : 1.0f, r = *rate;
    for (int64_t ti = 0; ti < count; ++ti) {
        const cgd_diag_tensor *t = &tensors[ti];
        const cgd_induced_step_consts s =
            cgd_induced_make_step_consts(&k, *t->step, k.lr_device ? *k.lr_device : k.lr);
        const int64_t chunks = chunks_of(t->numel);
#pragma omp parallel for schedule(static) if (chunks > 1)
        for (int64_t c = 0; c < chunks; ++c) {
            int64_t begin = c * CGD_CPU_INDUCED_CHUNK;
            int64_t end = begin + CGD_CPU_INDUCED_CHUNK < t->numel ? begin + CGD_CPU_INDUCED_CHUNK : t->numel;
            for (int64_t i = begin; i < end; ++i) {
                float g = cgd_load_f32(dtype, t->grad, i) / scale;
                float p = cgd_load_f32(dtype, t->param, i);
                cgd_store_f32(dtype, t->param, i,
                              cgd_induced_update(&k, &s, p, g, &t->exp_avg[i], k.rms ? t->exp_avg_sq[i] : 0.0f, r));
            }
        }
        *t->step += 1.0;
    }
}
