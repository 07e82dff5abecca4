/*
 * The diagonal CGD update for one element, written once and compiled both as C11 (CPU kernels) and as CUDA
 * device code, in float32 and in float64 (real.h), so the back ends cannot drift apart. See cgd_diag_hparams in
 * capi/cgd.h for the equations. Both back ends are built without floating-point contraction (CMakeLists.txt:
 * -ffp-contract=off, nvcc --fmad=false), so each product and sum below is rounded as written on the CPU and the
 * GPU alike. That is
 * the specification: e.g. the centered variance c / bc2 - mean^2 of a constant gradient is exactly 0 on both,
 * where a fused multiply-add would leave a rounding residual of order ulp(g^2) that can exceed eps.
 */
#ifndef CGD_DIAG_MATH_H
#define CGD_DIAG_MATH_H

#include <math.h>
#include <stdint.h>

#include "cgd.h"
#include "kernels.h"
#include "real.h"

#ifdef __CUDACC__
#define CGD_HD static __host__ __device__ __forceinline__
#else
#define CGD_HD static inline
#endif

/* How G = (...)^power is evaluated: the common powers get exact fast paths. */
enum { CGD_METRIC_NONE = 0, CGD_METRIC_SQRT = 1, CGD_METRIC_POW = 2 };

/* Per-call constants in the real type the kernels compute in (real.h). */
typedef struct cgd_diag_consts {
    cgd_real lr, beta1, beta2, one_minus_beta2, grad_weight, first_grad_weight, power, eps, weight_decay;
    double beta1_d, beta2_d, weight_decay_d; /* bias corrections are formed in double, as torch does on the host */
    const float *lr_device; /* replaces lr when set (cgd_diag_hparams.lr_device) */
    int32_t metric, moment, eps_inside, bias_correction, decoupled_weight_decay, nesterov, maximize;
    int32_t has_m1, has_m2;
} cgd_diag_consts;

/* Per-tensor constants that depend on the tensor's step count t and on lr (host or device). */
typedef struct cgd_diag_step_consts {
    cgd_real step_size;    /* lr / (1 - beta1^t) */
    cgd_real grad_weight;  /* the first step's (t = 1) or every later one's */
    cgd_real decay_factor; /* 1 - lr * weight_decay */
    cgd_real inv_bc1;      /* 1 / (1 - beta1^t), for the centered variance */
    cgd_real inv_bc2;      /* 1 / (1 - beta2^t) */
    cgd_real bc2_pow;      /* (1 - beta2^t)^power: divides C^power when eps sits outside, as torch's Adam does */
} cgd_diag_step_consts;

CGD_HD cgd_diag_consts cgd_diag_make_consts(const cgd_diag_hparams *h) {
    cgd_diag_consts k;
    k.lr = (cgd_real)h->lr;
    k.beta1 = (cgd_real)h->beta1;
    k.beta2 = (cgd_real)h->beta2;
    k.one_minus_beta2 = (cgd_real)(1.0 - h->beta2);
    k.grad_weight = (cgd_real)h->grad_weight;
    k.first_grad_weight = (cgd_real)(h->first_grad_weight > 0.0 ? h->first_grad_weight : h->grad_weight);
    k.power = (cgd_real)h->power;
    k.eps = (cgd_real)h->eps;
    k.weight_decay = (cgd_real)h->weight_decay;
    k.beta1_d = h->beta1;
    k.beta2_d = h->beta2;
    k.weight_decay_d = h->weight_decay;
    k.lr_device = h->lr_device;
    k.metric = h->power == 0.0 ? CGD_METRIC_NONE : (h->power == 0.5 ? CGD_METRIC_SQRT : CGD_METRIC_POW);
    k.moment = h->moment;
    k.eps_inside = h->eps_inside != 0;
    k.bias_correction = h->bias_correction != 0;
    k.decoupled_weight_decay = h->decoupled_weight_decay != 0;
    k.nesterov = h->nesterov != 0;
    k.maximize = h->maximize != 0;
    k.has_m1 = cgd_diag_needs_m1(h);
    k.has_m2 = cgd_diag_needs_m2(h);
    return k;
}

/* lr: k->lr, or *k->lr_device read by the caller on its own side (host or device). */
CGD_HD cgd_diag_step_consts cgd_diag_make_step_consts(const cgd_diag_consts *k, double steps_taken, cgd_real lr) {
    cgd_diag_step_consts s;
    double t = steps_taken + 1.0;
    double bc1 = 1.0, bc2 = 1.0;
    if (k->bias_correction) {
        bc1 = 1.0 - pow(k->beta1_d, t);
        bc2 = 1.0 - pow(k->beta2_d, t);
    }
    s.step_size = (cgd_real)((double)lr / bc1);
    s.grad_weight = steps_taken == 0.0 ? k->first_grad_weight : k->grad_weight;
    s.decay_factor = (cgd_real)(1.0 - (double)lr * k->weight_decay_d);
    s.inv_bc1 = (cgd_real)(1.0 / bc1);
    s.inv_bc2 = (cgd_real)(1.0 / bc2);
    s.bc2_pow = (cgd_real)pow(bc2, (double)k->power);
    return s;
}

CGD_HD cgd_real cgd_metric_power(int metric, cgd_real x, cgd_real power) {
    if (metric == CGD_METRIC_SQRT) return cgd_rsqrt(x);
    return cgd_rpow(x, power);
}

/*
 * One element. p, m1, m2 are read and written through pointers to registers, so CPU and CUDA callers keep
 * their own loads and stores (scalar or vectorised). m1/m2 are untouched when the step needs no such state.
 */
CGD_HD void cgd_diag_update(const cgd_diag_consts *k, const cgd_diag_step_consts *s, cgd_real *p, cgd_real g,
                            cgd_real *m1, cgd_real *m2) {
    if (k->maximize) g = -g;
    cgd_real param = *p;
    if (k->weight_decay != CGD_R(0.0)) {
        if (k->decoupled_weight_decay)
            param *= s->decay_factor;
        else
            g += k->weight_decay * param;
    }

    cgd_real avg = g; /* M1 when beta1 == 0 */
    if (k->has_m1) {
        avg = k->beta1 * *m1 + s->grad_weight * g;
        *m1 = avg;
    }
    cgd_real force = k->nesterov ? k->beta1 * avg + s->grad_weight * g : avg;

    if (k->metric == CGD_METRIC_NONE) {
        *p = param - s->step_size * force;
        return;
    }

    cgd_real c, denom;
    if (k->moment == CGD_MOMENT_BELIEF) {
        cgd_real r = g - avg;
        c = k->beta2 * *m2 + k->one_minus_beta2 * r * r + k->eps;
        *m2 = c;
    } else {
        c = k->beta2 * *m2 + k->one_minus_beta2 * g * g;
        *m2 = c;
    }
    if (k->moment == CGD_MOMENT_CENTERED) {
        cgd_real mean = avg * s->inv_bc1;
        cgd_real var = cgd_rfmax(c * s->inv_bc2 - mean * mean, CGD_R(0.0));
        denom = k->eps_inside ? cgd_metric_power(k->metric, k->eps + var, k->power)
                              : cgd_metric_power(k->metric, var, k->power) + k->eps;
    } else {
        denom = k->eps_inside ? cgd_metric_power(k->metric, k->eps + c * s->inv_bc2, k->power)
                              : cgd_metric_power(k->metric, c, k->power) / s->bc2_pow + k->eps;
    }
    *p = param - s->step_size * (force / denom);
}

#endif /* CGD_DIAG_MATH_H */
