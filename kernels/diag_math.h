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

#include <string.h>

#include "cgd.h"
#include "kernels.h"
#include "real.h"

#ifdef __CUDACC__
#define CGD_HD static __host__ __device__ __forceinline__
#elif defined(__GNUC__)
/* Always inlined: the CPU kernel's loops vectorise only with the update inside them. */
#define CGD_HD static inline __attribute__((always_inline))
#else
#define CGD_HD static inline
#endif

/* How G = (...)^power is evaluated: the common powers get exact fast paths. */
enum { CGD_METRIC_NONE = 0, CGD_METRIC_SQRT = 1, CGD_METRIC_POW = 2, CGD_METRIC_ONE = 3 };

/* Expands CALL(X, M) with M the constant CGD_METRIC_* that `metric` holds: the kernels keep one copy per metric,
   so no element tests it (and the compilers see one straight path to vectorise or unroll). */
#define CGD_DISPATCH_METRIC(metric, CALL, X)                                                                   \
    do {                                                                                                       \
        switch (metric) {                                                                                      \
        case CGD_METRIC_NONE: CALL(X, CGD_METRIC_NONE); break;                                                \
        case CGD_METRIC_SQRT: CALL(X, CGD_METRIC_SQRT); break;                                                \
        case CGD_METRIC_ONE: CALL(X, CGD_METRIC_ONE); break;                                                  \
        default: CALL(X, CGD_METRIC_POW); break;                                                              \
        }                                                                                                      \
    } while (0)

#if CGD_F64
typedef uint64_t cgd_real_bits;
#else
typedef uint32_t cgd_real_bits;
#endif

/* cond ? a : b on the bit patterns: the same value as the conditional, but a loop-invariant cond becomes a mask
   the vectoriser can use (GCC does not vectorise a select on a scalar condition), and both sides are computed. */
CGD_HD cgd_real cgd_pick(int cond, cgd_real a, cgd_real b) {
#ifdef __CUDA_ARCH__
    return cond ? a : b; /* a GPU thread selects in one instruction; masks would only cost more */
#else
    const cgd_real_bits mask = (cgd_real_bits)0 - (cgd_real_bits)(cond != 0);
    cgd_real_bits ua, ub;
    memcpy(&ua, &a, sizeof ua);
    memcpy(&ub, &b, sizeof ub);
    const cgd_real_bits r = (ua & mask) | (ub & ~mask);
    cgd_real out;
    memcpy(&out, &r, sizeof out);
    return out;
#endif
}

#if !CGD_F64
CGD_HD uint64_t cgd_bits_of(double x) {
#ifdef __CUDA_ARCH__
    return (uint64_t)__double_as_longlong(x);
#else
    uint64_t u;
    memcpy(&u, &x, sizeof u);
    return u;
#endif
}

CGD_HD double cgd_double_from_bits(uint64_t u) {
#ifdef __CUDA_ARCH__
    return __longlong_as_double((long long)u);
#else
    double x;
    memcpy(&x, &u, sizeof x);
    return x;
#endif
}

/*
 * x^a for float x and a in (0, 1], as 2^(a log2 x) evaluated in double with fixed polynomials and integer
 * exponent arithmetic: no table, no call and no data-dependent branch, so the compiler vectorises it (libm's
 * powf is a call per element). The double result carries a relative error below 1e-10 (series truncation
 * below 3e-11, the rounding of y = a log2 x, |y| <= 150, below 1e-13), far inside the half-ulp (3e-8) that
 * rounding to float then adds, so the returned float is the correctly rounded x^a except when x^a lies within
 * 1e-10 of the midpoint between two floats: at most 1 ulp off (tested against float64 pow). x = 0 gives 0, +Inf
 * gives +Inf, NaN or x < 0 gives NaN, as powf does.
 */
CGD_HD float cgd_powf_poly(float xf, float af) {
    /* Every choice below is integer masking, not a conditional: a conditional lets the compiler thread the
       special inputs into a separate path, which is control flow the vectoriser refuses. */
    const double x = (double)xf;
    const uint64_t regular = (uint64_t)0 - (uint64_t)((x > 0.0) & (x < (double)INFINITY));
    /* log2 x = e + log2 m with m in [sqrt(1/2), sqrt(2)): a float's double is never subnormal. Irregular
       inputs compute on x = 1 and are replaced at the end. */
    const uint64_t bits = (cgd_bits_of(x) & regular) | (cgd_bits_of(1.0) & ~regular);
    const double m1 = cgd_double_from_bits((bits & 0x000fffffffffffffull) | 0x3ff0000000000000ull);
    const uint64_t high = (uint64_t)0 - (uint64_t)(m1 > 1.4142135623730951);
    const double m = cgd_double_from_bits((cgd_bits_of(0.5 * m1) & high) | (cgd_bits_of(m1) & ~high));
    /* The exponent as a double without an integer conversion (AVX2 has none for 64-bit lanes): the bits of
       2^52 + k read as a double are exactly that integer. */
    const double e = cgd_double_from_bits(0x4330000000000000ull | (bits >> 52)) - 4503599627371519.0 /* 2^52 + 1023 */
                     + cgd_double_from_bits(high & cgd_bits_of(1.0));
    /* ln m = 2 atanh(t) = 2 (t + t^3/3 + ... + t^11/11), t = (m - 1)/(m + 1), |t| <= 0.1716: the first term left
       out, 2 t^13/13, is below 2e-11. */
    const double t = (m - 1.0) / (m + 1.0), t2 = t * t;
    double s = 1.0 / 11.0;
    s = s * t2 + 1.0 / 9.0;
    s = s * t2 + 1.0 / 7.0;
    s = s * t2 + 1.0 / 5.0;
    s = s * t2 + 1.0 / 3.0;
    s = s * t2 + 1.0;
    const double y = (double)af * (e + (2.0 * t * s) * 1.4426950408889634); /* 1 / ln 2 */
    /* 2^y = 2^n e^(f ln 2), n the nearest integer (adding 1.5 * 2^52 rounds it into the low mantissa bits) and
       |f ln 2| <= 0.347: the Taylor series to z^9/9! leaves < 1e-11. */
    const double shifted = y + 6755399441055744.0;
    const double n = shifted - 6755399441055744.0;
    const double z = (y - n) * 0.6931471805599453;
    double q = 1.0 / 362880.0;
    q = q * z + 1.0 / 40320.0;
    q = q * z + 1.0 / 5040.0;
    q = q * z + 1.0 / 720.0;
    q = q * z + 1.0 / 120.0;
    q = q * z + 1.0 / 24.0;
    q = q * z + 1.0 / 6.0;
    q = q * z + 0.5;
    q = q * z + 1.0;
    q = q * z + 1.0;
    const uint64_t n_int = cgd_bits_of(shifted) - cgd_bits_of(6755399441055744.0); /* n, |n| <= 150 */
    const float r = (float)(q * cgd_double_from_bits((n_int + 1023u) << 52));
    /* 0^a = 0, Inf^a = Inf, NaN and negative x give NaN (a in (0, 1]). */
    const float special = cgd_pick(xf == 0.0f, 0.0f, cgd_pick(xf > 0.0f, xf, NAN));
    return cgd_pick(regular != 0, r, special);
}
#endif

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
    k.metric = h->power == 0.0   ? CGD_METRIC_NONE
               : h->power == 0.5 ? CGD_METRIC_SQRT
               : h->power == 1.0 ? CGD_METRIC_ONE
                                 : CGD_METRIC_POW;
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
    if (metric == CGD_METRIC_ONE) return x;
#if CGD_F64
    return cgd_rpow(x, power);
#else
    return cgd_powf_poly(x, power);
#endif
}

/*
 * One element. p, m1, m2 are read and written through pointers to registers, so CPU and CUDA callers keep
 * their own loads and stores (scalar or vectorised). m1/m2 are untouched when the step needs no such state.
 * The options are picks (cgd_pick) rather than branches, so the loop around it vectorises; metric and has_m1
 * are the only branches, and the CPU kernel makes them compile-time constants. Each value is the expression
 * the option selects, rounded as written.
 */
CGD_HD void cgd_diag_update(const cgd_diag_consts *k, const cgd_diag_step_consts *s, cgd_real *p, cgd_real g,
                            cgd_real *m1, cgd_real *m2) {
    /* Flags combine with & rather than &&: a short circuit is control flow, which the vectoriser refuses. */
    const int decay = k->weight_decay != CGD_R(0.0), decoupled = k->decoupled_weight_decay != 0;
    g = cgd_pick(k->maximize, -g, g);
    const cgd_real param = cgd_pick(decay & decoupled, *p * s->decay_factor, *p);
    g = cgd_pick(decay & !decoupled, g + k->weight_decay * param, g);

    cgd_real avg = g; /* M1 when beta1 == 0 */
    if (k->has_m1) {
        avg = k->beta1 * *m1 + s->grad_weight * g;
        *m1 = avg;
    }
    const cgd_real force = cgd_pick(k->nesterov, k->beta1 * avg + s->grad_weight * g, avg);

    if (k->metric == CGD_METRIC_NONE) {
        *p = param - s->step_size * force;
        return;
    }

    const int belief = k->moment == CGD_MOMENT_BELIEF, centered = k->moment == CGD_MOMENT_CENTERED;
    const int inside = k->eps_inside;
    const cgd_real r = g - avg;
    const cgd_real c = cgd_pick(belief, k->beta2 * *m2 + k->one_minus_beta2 * r * r + k->eps,
                                k->beta2 * *m2 + k->one_minus_beta2 * g * g);
    *m2 = c;
    const cgd_real mean = avg * s->inv_bc1;
    const cgd_real spread = c * s->inv_bc2 - mean * mean;
    const cgd_real var = cgd_pick(spread > CGD_R(0.0), spread, CGD_R(0.0)); /* the variance, clamped at 0 */
    /* centered: (eps + var)^a or var^a + eps; raw and belief: (eps + c / bc2)^a or c^a / bc2^a + eps (torch) */
    const cgd_real base = cgd_pick(centered, var, cgd_pick(inside, c * s->inv_bc2, c));
    const cgd_real g_power = cgd_metric_power(k->metric, cgd_pick(inside, k->eps + base, base), k->power);
    const cgd_real denom = cgd_pick(inside, g_power, cgd_pick(centered, g_power, g_power / s->bc2_pow) + k->eps);
    *p = param - s->step_size * (force / denom);
}

#endif /* CGD_DIAG_MATH_H */
