/*
 * CPU kernels: the diagonal CGD step and the non-finite scan. One pass over memory per tensor; large tensors
 * are split into chunks that OpenMP threads take in parallel. Elementwise, so results do not depend on the
 * thread count and a resumed run is bit-identical to an uninterrupted one.
 */
#include <stddef.h>

#include "half_convert.h"
#include "kernels.h"

/* Elements per parallel work item, and the size under which a tensor is not worth a parallel region. */
#define CGD_CPU_CHUNK ((int64_t)1 << 15)

#if defined(__GNUC__)
#define CGD_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define CGD_ALWAYS_INLINE inline
#endif

/* Called with a constant dtype from each case of the switch below, so every copy is specialised. */
static CGD_ALWAYS_INLINE void diag_range(cgd_dtype dtype, const cgd_diag_consts *k, const cgd_diag_step_consts *s,
                                         const cgd_diag_tensor *t, float grad_scale, int64_t begin, int64_t end) {
    float unused1 = 0.0f, unused2 = 0.0f;
    for (int64_t i = begin; i < end; ++i) {
        float g = cgd_load_f32(dtype, t->grad, i) / grad_scale; /* exact when the scale is 1 */
        float p = cgd_load_f32(dtype, t->param, i);
        float *m1 = k->has_m1 ? &t->exp_avg[i] : &unused1;
        float *m2 = k->has_m2 ? &t->exp_avg_sq[i] : &unused2;
        cgd_diag_update(k, s, &p, g, m1, m2);
        cgd_store_f32(dtype, t->param, i, p);
    }
}

static void diag_chunk(cgd_dtype dtype, const cgd_diag_consts *k, const cgd_diag_step_consts *s,
                       const cgd_diag_tensor *t, float grad_scale, int64_t begin, int64_t end) {
    switch (dtype) {
    case CGD_FLOAT16: diag_range(CGD_FLOAT16, k, s, t, grad_scale, begin, end); break;
    case CGD_BFLOAT16: diag_range(CGD_BFLOAT16, k, s, t, grad_scale, begin, end); break;
    default: diag_range(CGD_FLOAT32, k, s, t, grad_scale, begin, end); break;
    }
}

void cgd_cpu_diag_step(const cgd_diag_consts *k, cgd_dtype dtype, const cgd_diag_tensor *tensors, int64_t count,
                       const float *grad_scale, const float *skip) {
    if (skip && *skip != 0.0f) return;
    float scale = grad_scale ? *grad_scale : 1.0f;
    for (int64_t ti = 0; ti < count; ++ti) {
        const cgd_diag_tensor *t = &tensors[ti];
        cgd_diag_step_consts s = cgd_diag_make_step_consts(k, *t->step, k->lr_device ? *k->lr_device : k->lr);
        int64_t chunks = (t->numel + CGD_CPU_CHUNK - 1) / CGD_CPU_CHUNK;
#pragma omp parallel for schedule(static) if (chunks > 1)
        for (int64_t c = 0; c < chunks; ++c) {
            int64_t begin = c * CGD_CPU_CHUNK;
            int64_t end = begin + CGD_CPU_CHUNK < t->numel ? begin + CGD_CPU_CHUNK : t->numel;
            diag_chunk(dtype, k, &s, t, scale, begin, end);
        }
        *t->step += 1.0;
    }
}

/* Exponent all ones means Inf or NaN; testing bits keeps the scan branch-free and vectorisable. */
static int has_nonfinite(cgd_dtype dtype, const void *data, int64_t n) {
    int any = 0;
    if (dtype == CGD_FLOAT32) {
        const uint32_t *u = (const uint32_t *)data;
#pragma omp parallel for reduction(| : any) if (n > CGD_CPU_CHUNK)
        for (int64_t i = 0; i < n; ++i) any |= (u[i] & 0x7f800000u) == 0x7f800000u;
    } else {
        const uint16_t *h = (const uint16_t *)data;
        uint16_t mask = dtype == CGD_FLOAT16 ? 0x7c00u : 0x7f80u;
#pragma omp parallel for reduction(| : any) if (n > CGD_CPU_CHUNK)
        for (int64_t i = 0; i < n; ++i) any |= (h[i] & mask) == mask;
    }
    return any;
}

void cgd_cpu_nonfinite_check(cgd_dtype dtype, const void *const *data, const int64_t *numels, int64_t count,
                             int32_t *flags, float *found) {
    int any = 0;
    for (int64_t i = 0; i < count; ++i) {
        flags[i] = has_nonfinite(dtype, data[i], numels[i]);
        any |= flags[i];
    }
    *found = any ? 1.0f : 0.0f;
}
