/*
 * The per-element maths of the induced-metric optimizers (cgd.h, cgd_induced_*), compiled both as C11 for the
 * CPU kernels and as CUDA device code, in float32 and in float64 (real.h), so the back ends cannot drift apart.
 * The bias corrections are formed in double, as torch's AdamW does on the host, so xi = 0 with the RMS metric is
 * AdamW to the rounding of the same operations. The optimizer-wide rate is computed in double.
 */
#ifndef CGD_INDUCED_MATH_H
#define CGD_INDUCED_MATH_H

#include <math.h>
#include <stdint.h>

#include "cgd.h"
#include "real.h"

#ifdef __CUDACC__
#define CGD_IHD static __host__ __device__ __forceinline__
#elif defined(__GNUC__)
/* Always inlined: the CPU kernels' loops vectorise only with the maths inside them. */
#define CGD_IHD static inline __attribute__((always_inline))
#else
#define CGD_IHD static inline
#endif

typedef struct cgd_induced_consts {
    cgd_real lr, momentum, one_minus_momentum, beta_rms, one_minus_beta_rms, eps;
    double momentum_d, beta_rms_d, weight_decay_d;
    const float *lr_device; /* replaces lr when set */
    int32_t rms, maximize;
} cgd_induced_consts;

/* Depend on the tensor's step count t (its step + 1). */
typedef struct cgd_induced_step_consts {
    cgd_real step_size; /* lr / (1 - mu^t) */
    cgd_real decay;     /* 1 - lr * weight_decay */
    cgd_real sqrt_bc2;  /* sqrt(1 - beta_rms^t) */
} cgd_induced_step_consts;

CGD_IHD cgd_induced_consts cgd_induced_make_consts(const cgd_induced_hparams *h) {
    cgd_induced_consts k;
    k.lr = (cgd_real)h->lr;
    k.momentum = (cgd_real)h->momentum;
    k.one_minus_momentum = (cgd_real)(1.0 - h->momentum);
    k.beta_rms = (cgd_real)h->beta_rms;
    k.one_minus_beta_rms = (cgd_real)(1.0 - h->beta_rms);
    k.eps = (cgd_real)h->eps;
    k.weight_decay_d = h->weight_decay;
    k.lr_device = h->lr_device;
    k.momentum_d = h->momentum;
    k.beta_rms_d = h->beta_rms;
    k.rms = h->gamma == CGD_GAMMA_RMS;
    k.maximize = h->maximize;
    return k;
}

/* lr: k->lr, or *k->lr_device read by the caller on its own side. */
CGD_IHD cgd_induced_step_consts cgd_induced_make_step_consts(const cgd_induced_consts *k, double step, cgd_real lr) {
    cgd_induced_step_consts s;
    double t = step + 1.0;
    s.step_size = (cgd_real)((double)lr / (1.0 - pow(k->momentum_d, t)));
    s.decay = (cgd_real)(1.0 - (double)lr * k->weight_decay_d);
    s.sqrt_bc2 = (cgd_real)sqrt(1.0 - pow(k->beta_rms_d, t));
    return s;
}

/* gamma^-1 of one element: RMSProp's 1 / (sqrt(M2 hat) + eps), or 1. */
CGD_IHD cgd_real cgd_induced_gamma_inv(const cgd_induced_consts *k, const cgd_induced_step_consts *s, cgd_real m2) {
    return k->rms ? CGD_R(1.0) / (cgd_rsqrt(m2) / s->sqrt_bc2 + k->eps) : CGD_R(1.0);
}

/* The norm pass for one element: advances M2 (RMS metric) and returns g gamma^-1 g. */
CGD_IHD cgd_real cgd_induced_norm_term(const cgd_induced_consts *k, const cgd_induced_step_consts *s, cgd_real g,
                                       cgd_real *m2) {
    if (!k->rms) return g * g;
    *m2 = k->beta_rms * *m2 + k->one_minus_beta_rms * g * g;
    return g * g * cgd_induced_gamma_inv(k, s, *m2);
}

/* The step for one element, given the rate r = cgd_induced_rate's output. */
CGD_IHD cgd_real cgd_induced_update(const cgd_induced_consts *k, const cgd_induced_step_consts *s, cgd_real p,
                                    cgd_real g, cgd_real *m1, cgd_real m2, cgd_real rate) {
    if (k->maximize) g = -g;
    *m1 = k->momentum * *m1 + k->one_minus_momentum * g;
    cgd_real denom = k->rms ? cgd_rsqrt(m2) / s->sqrt_bc2 + k->eps : CGD_R(1.0);
    return p * s->decay - s->step_size * rate * (*m1 / denom);
}

/* v <- beta v + (1 - beta) xi sum; r from the bias-corrected v (Algorithms 1 and 2), all in double. */
CGD_IHD double cgd_induced_rate_of(const cgd_induced_metric *m, double sum, double loss, double *norm_ema,
                                   double norm_step) {
    double v = m->beta * *norm_ema + (1.0 - m->beta) * (m->xi * sum);
    *norm_ema = v;
    double v_hat = fabs(v / (1.0 - pow(m->beta, norm_step + 1.0)));
    if (m->embedding != CGD_EMBED_LOG_LOSS) return 1.0 / (1.0 + v_hat);
    /* log L needs L > 0: a rate of NaN (cgd.h) rather than the ascent step a negative loss would give. */
    return loss > 0.0 ? loss / (loss * loss + v_hat) : NAN;
}

#endif /* CGD_INDUCED_MATH_H */
