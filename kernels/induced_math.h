/*
 * The per-element maths of the induced-metric optimizers (cgd.h, cgd_induced_*), compiled both as C11 for the
 * CPU kernels and as CUDA device code, so the two back ends cannot drift apart. Float32 throughout; the bias
 * corrections are formed in double, as torch's AdamW does on the host, so xi = 0 with the RMS metric is AdamW to
 * the rounding of the same float32 operations.
 */
#ifndef CGD_INDUCED_MATH_H
#define CGD_INDUCED_MATH_H

#include <math.h>
#include <stdint.h>

#include "cgd.h"

#ifdef __CUDACC__
#define CGD_IHD static __host__ __device__ __forceinline__
#else
#define CGD_IHD static inline
#endif

typedef struct cgd_induced_consts {
    float lr, momentum, one_minus_momentum, beta_rms, one_minus_beta_rms, eps;
    double momentum_d, beta_rms_d, weight_decay_d;
    const float *lr_device; /* replaces lr when set */
    int32_t rms, maximize;
} cgd_induced_consts;

/* Depend on the tensor's step count t (its step + 1). */
typedef struct cgd_induced_step_consts {
    float step_size; /* lr / (1 - mu^t) */
    float decay;     /* 1 - lr * weight_decay */
    float sqrt_bc2;  /* sqrt(1 - beta_rms^t) */
} cgd_induced_step_consts;

CGD_IHD cgd_induced_consts cgd_induced_make_consts(const cgd_induced_hparams *h) {
    cgd_induced_consts k;
    k.lr = (float)h->lr;
    k.momentum = (float)h->momentum;
    k.one_minus_momentum = (float)(1.0 - h->momentum);
    k.beta_rms = (float)h->beta_rms;
    k.one_minus_beta_rms = (float)(1.0 - h->beta_rms);
    k.eps = (float)h->eps;
    k.weight_decay_d = h->weight_decay;
    k.lr_device = h->lr_device;
    k.momentum_d = h->momentum;
    k.beta_rms_d = h->beta_rms;
    k.rms = h->gamma == CGD_GAMMA_RMS;
    k.maximize = h->maximize;
    return k;
}

/* lr: k->lr, or *k->lr_device read by the caller on its own side. */
CGD_IHD cgd_induced_step_consts cgd_induced_make_step_consts(const cgd_induced_consts *k, double step, float lr) {
    cgd_induced_step_consts s;
    double t = step + 1.0;
    s.step_size = (float)((double)lr / (1.0 - pow(k->momentum_d, t)));
    s.decay = (float)(1.0 - (double)lr * k->weight_decay_d);
    s.sqrt_bc2 = (float)sqrt(1.0 - pow(k->beta_rms_d, t));
    return s;
}

/* gamma^-1 of one element: RMSProp's 1 / (sqrt(M2 hat) + eps), or 1. */
CGD_IHD float cgd_induced_gamma_inv(const cgd_induced_consts *k, const cgd_induced_step_consts *s, float m2) {
    return k->rms ? 1.0f / (sqrtf(m2) / s->sqrt_bc2 + k->eps) : 1.0f;
}

/* The norm pass for one element: advances M2 (RMS metric) and returns g gamma^-1 g. */
CGD_IHD float cgd_induced_norm_term(const cgd_induced_consts *k, const cgd_induced_step_consts *s, float g,
                                    float *m2) {
    if (!k->rms) return g * g;
    *m2 = k->beta_rms * *m2 + k->one_minus_beta_rms * g * g;
    return g * g * cgd_induced_gamma_inv(k, s, *m2);
}

/* The step for one element, given the rate r = cgd_induced_rate's output. */
CGD_IHD float cgd_induced_update(const cgd_induced_consts *k, const cgd_induced_step_consts *s, float p, float g,
                                 float *m1, float m2, float rate) {
    if (k->maximize) g = -g;
    *m1 = k->momentum * *m1 + k->one_minus_momentum * g;
    float denom = k->rms ? sqrtf(m2) / s->sqrt_bc2 + k->eps : 1.0f;
    return p * s->decay - s->step_size * rate * (*m1 / denom);
}

/* v <- beta v + (1 - beta) xi sum; r from the bias-corrected v (Algorithms 1 and 2). */
CGD_IHD float cgd_induced_rate_of(const cgd_induced_metric *m, float sum, float loss, float *norm_ema,
                                  double norm_step) {
    float v = (float)m->beta * *norm_ema + (float)(1.0 - m->beta) * ((float)m->xi * sum);
    *norm_ema = v;
    float v_hat = fabsf(v / (float)(1.0 - pow(m->beta, norm_step + 1.0)));
    if (m->embedding != CGD_EMBED_LOG_LOSS) return 1.0f / (1.0f + v_hat);
    /* log L needs L > 0: a rate of NaN (cgd.h) rather than the ascent step a negative loss would give. */
    return loss > 0.0f ? loss / (loss * loss + v_hat) : NAN;
}

#endif /* CGD_INDUCED_MATH_H */
