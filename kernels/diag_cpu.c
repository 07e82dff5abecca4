/*
 * CPU kernels: the diagonal CGD step (one pass over memory per tensor, the non-finite guard fused into it; each
 * call's tensors are split into chunks that the threads of one OpenMP region share, cgd_cpu_share) and, in the
 * float32 build only, the non-finite scan. Elementwise, so results do not depend on the thread count and a resumed
 * run is bit-identical to an uninterrupted one.
 */
#include <stddef.h>

#include "diag_math.h"
#include "kernels.h"
#include "real.h"

/* Elements per parallel work item, and the size under which a tensor is not worth a parallel region. */
#define CGD_CPU_CHUNK ((int64_t)1 << 15)

#if defined(__GNUC__)
#define CGD_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define CGD_ALWAYS_INLINE inline
#endif

/*
 * One element range of one tensor; returns 1 when the guard held an entry back. Called with constant dtype,
 * metric, eps_inside, has_m1, scaled and plain from diag_chunk's switch (and always inlined), so each copy is one
 * straight loop (eps outside scales by 1 / (1 - beta2^t)^power, a product the other copies would compute and drop):
 * the remaining options are loop-invariant selects, the constants are locals (no float store can alias them)
 * and the arrays restrict, and the compiler vectorises it. An unscaled copy divides by nothing: the division
 * by a grad_scale of 1 would be exact but costs as much as the rest of the update. A plain copy (diag_plain: the
 * raw moment, no maximize, no Nesterov, no L2 decay; Adam's, AdamW's and the default's options) drops the
 * selects of the others, whose discarded sides would double the loop's arithmetic.
 */
static CGD_ALWAYS_INLINE int diag_range(cgd_dtype dtype, int metric, int inside, int has_m1, int scaled, int plain,
                                        const cgd_diag_consts *kp, const cgd_diag_step_consts *sp,
                                        const cgd_diag_tensor *t, cgd_real scale, int64_t begin, int64_t end) {
    cgd_diag_consts k = *kp;
    k.metric = metric;
    k.eps_inside = inside;
    k.has_m1 = has_m1;
    k.has_m2 = metric != CGD_METRIC_NONE;
    if (plain) {
        k.moment = CGD_MOMENT_RAW;
        k.maximize = 0;
        k.nesterov = 0;
        k.decoupled_weight_decay = 1; /* no decay at all, or decoupled: the same selects */
    }
    const cgd_diag_step_consts s = *sp;
    void *restrict param = t->param;
    const void *restrict grad = t->grad;
    cgd_real *restrict m1 = (cgd_real *)t->exp_avg;
    cgd_real *restrict m2 = (cgd_real *)t->exp_avg_sq;
    int held = 0;
    for (int64_t i = begin; i < end; ++i) {
        cgd_real g = cgd_load_real(dtype, grad, i);
        if (scaled) g = g / scale;
        cgd_real p = cgd_load_real(dtype, param, i);
        cgd_real a = has_m1 ? m1[i] : 0, b = k.has_m2 ? m2[i] : 0;
        held |= cgd_diag_update_guarded(&k, &s, &p, g, &a, &b);
        cgd_store_real(dtype, param, i, p);
        if (has_m1) m1[i] = a;
        if (k.has_m2) m2[i] = b;
    }
    return held;
}

/* The options diag_range's plain copies fix. */
static int diag_plain(const cgd_diag_consts *k) {
    return k->moment == CGD_MOMENT_RAW && !k->maximize && !k->nesterov &&
           (k->decoupled_weight_decay || k->weight_decay == CGD_R(0.0));
}

#define CGD_RANGE(DT, METRIC, IN, M1, SCALED, PLAIN) \
    diag_range(DT, METRIC, IN, M1, SCALED, PLAIN, k, s, t, grad_scale, begin, end)
#define CGD_BY_SCALE(DT, METRIC, IN, M1, PLAIN) \
    (scaled ? CGD_RANGE(DT, METRIC, IN, M1, 1, PLAIN) : CGD_RANGE(DT, METRIC, IN, M1, 0, PLAIN))
#define CGD_BY_M1(DT, METRIC, IN, PLAIN) \
    (k->has_m1 ? CGD_BY_SCALE(DT, METRIC, IN, 1, PLAIN) : CGD_BY_SCALE(DT, METRIC, IN, 0, PLAIN))
#define CGD_BY_PLAIN(DT, METRIC, IN) (plain ? CGD_BY_M1(DT, METRIC, IN, 1) : CGD_BY_M1(DT, METRIC, IN, 0))
#define CGD_BY_MOMENTS(DT, METRIC)                                                                             \
    do {                                                                                                       \
        if (METRIC == CGD_METRIC_NONE || METRIC == CGD_METRIC_POW_NORMAL || k->eps_inside)                     \
            held = CGD_BY_PLAIN(DT, METRIC, 1);                                                                \
        else                                                                                                   \
            held = CGD_BY_PLAIN(DT, METRIC, 0);                                                                \
    } while (0)
#define CGD_BY_METRIC(DT) CGD_DISPATCH_METRIC(k->metric, CGD_BY_MOMENTS, DT)

CGD_CPU_CLONES
static int diag_chunk(cgd_dtype dtype, const cgd_diag_consts *k, const cgd_diag_step_consts *s,
                      const cgd_diag_tensor *t, int scaled, cgd_real grad_scale, int64_t begin, int64_t end) {
    int held = 0;
    const int plain = diag_plain(k);
    CGD_DISPATCH_DTYPE(dtype, CGD_BY_METRIC);
    return held;
}

void CGD_NAME(cgd_cpu_diag_step)(const cgd_diag_hparams *h, cgd_dtype dtype, const cgd_diag_tensor *tensors,
                                 int64_t count, const float *grad_scale, const float *skip) {
    int32_t *flags = h->guard_flags;
    if (skip && *skip != 0.0f) { /* nothing steps, so nothing is held back */
        if (flags)
            for (int64_t ti = 0; ti < count; ++ti) flags[ti] = 0;
        return;
    }
    cgd_diag_consts kc = cgd_diag_make_consts(h);
    kc.guard_bits = cgd_diag_guard_bits(h);
    const cgd_diag_consts *k = &kc;
    const int scaled = grad_scale != NULL;
    const cgd_real scale = scaled ? *grad_scale : 1;
    int64_t elements = 0;
    for (int64_t ti = 0; ti < count; ++ti) {
        elements += tensors[ti].numel;
        if (flags) flags[ti] = 0;
    }
#pragma omp parallel if (elements >= CGD_CPU_PARALLEL_MIN)
    {
        const cgd_cpu_share share = cgd_cpu_my_share();
        int64_t first = 0; /* the call's number of this tensor's chunk 0 */
        for (int64_t ti = 0; ti < count; ++ti) {
            const cgd_diag_tensor *t = &tensors[ti];
            const int64_t chunks = (t->numel + CGD_CPU_CHUNK - 1) / CGD_CPU_CHUNK;
            int held = 0;
            int64_t c = cgd_cpu_first_chunk(share, first);
            if (c < chunks) {
                const cgd_diag_step_consts s =
                    cgd_diag_make_step_consts(k, *t->step, k->lr_device ? *k->lr_device : k->lr);
                for (; c < chunks; c += share.threads) {
                    const int64_t begin = c * CGD_CPU_CHUNK;
                    const int64_t end = begin + CGD_CPU_CHUNK < t->numel ? begin + CGD_CPU_CHUNK : t->numel;
                    held |= diag_chunk(dtype, k, &s, t, scaled, scale, begin, end);
                }
            }
            if (held && flags) {
#pragma omp atomic write
                flags[ti] = 1;
            }
            first += chunks;
        }
    }
    /* After the region: every chunk read its tensor's count before any advanced. */
    for (int64_t ti = 0; ti < count; ++ti) *tensors[ti].step += 1.0;
}

#if !CGD_F64
/* Whether entries [begin, end) hold a magnitude at or above the threshold (half_convert.h): one integer comparison
   per element covers NaN, Inf and the limit, branch-free and vectorisable. */
static int has_nonfinite(cgd_dtype dtype, const void *data, int64_t begin, int64_t end, uint64_t t) {
    int any = 0;
    if (dtype == CGD_FLOAT64) {
        const uint64_t *u = (const uint64_t *)data;
        for (int64_t i = begin; i < end; ++i) any |= (u[i] & 0x7fffffffffffffffull) >= t;
    } else if (dtype == CGD_FLOAT32) {
        const uint32_t *u = (const uint32_t *)data;
        const uint32_t t32 = (uint32_t)t;
        for (int64_t i = begin; i < end; ++i) any |= (u[i] & 0x7fffffffu) >= t32;
    } else {
        const uint16_t *h = (const uint16_t *)data;
        const uint16_t t16 = (uint16_t)t;
        for (int64_t i = begin; i < end; ++i) any |= (uint16_t)(h[i] & 0x7fffu) >= t16;
    }
    return any;
}

void cgd_cpu_nonfinite_check(cgd_dtype dtype, const void *const *data, const int64_t *numels, const double *limits,
                             int64_t count, int32_t *flags, float *found) {
    int64_t elements = 0;
    for (int64_t i = 0; i < count; ++i) {
        elements += numels[i];
        flags[i] = 0;
    }
#pragma omp parallel if (elements >= CGD_CPU_PARALLEL_MIN)
    {
        const cgd_cpu_share share = cgd_cpu_my_share();
        int64_t first = 0;
        for (int64_t i = 0; i < count; ++i) {
            const int64_t chunks = (numels[i] + CGD_CPU_CHUNK - 1) / CGD_CPU_CHUNK;
            const uint64_t t = cgd_threshold_bits(dtype, limits ? limits[i] : INFINITY);
            int any = 0;
            for (int64_t c = cgd_cpu_first_chunk(share, first); c < chunks && !any; c += share.threads) {
                const int64_t begin = c * CGD_CPU_CHUNK;
                any = has_nonfinite(dtype, data[i], begin, begin + CGD_CPU_CHUNK < numels[i] ? begin + CGD_CPU_CHUNK
                                                                                            : numels[i], t);
            }
            if (any) {
#pragma omp atomic write
                flags[i] = 1;
            }
            first += chunks;
        }
    }
    int any = 0;
    for (int64_t i = 0; i < count; ++i) any |= flags[i];
    *found = any ? 1.0f : 0.0f;
}
#endif
