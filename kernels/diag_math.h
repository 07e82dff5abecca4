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

/* How G = (...)^power is evaluated: the common powers get exact fast paths, and any other power with eps inside
   (eps >= FLT_MIN, power <= CGD_POW_NORMAL_MAX) the cheaper of the two polynomial ones (cgd_powf_times_normal). */
/* The largest a for cgd_powf_times_normal: x^-a of a normal x then lies in [2^-125.5, 2^125.5], itself normal. */
#define CGD_POW_NORMAL_MAX 0.98
enum { CGD_METRIC_NONE = 0, CGD_METRIC_SQRT = 1, CGD_METRIC_POW = 2, CGD_METRIC_ONE = 3, CGD_METRIC_POW_NORMAL = 4 };

/* Expands CALL(X, M) with M the constant CGD_METRIC_* that `metric` holds: the kernels keep one copy per metric,
   so no element tests it (and the compilers see one straight path to vectorise or unroll). */
#define CGD_DISPATCH_METRIC(metric, CALL, X)                                                                   \
    do {                                                                                                       \
        switch (metric) {                                                                                      \
        case CGD_METRIC_NONE: CALL(X, CGD_METRIC_NONE); break;                                                \
        case CGD_METRIC_SQRT: CALL(X, CGD_METRIC_SQRT); break;                                                \
        case CGD_METRIC_ONE: CALL(X, CGD_METRIC_ONE); break;                                                  \
        case CGD_METRIC_POW_NORMAL: CALL(X, CGD_METRIC_POW_NORMAL); break;                                    \
        default: CALL(X, CGD_METRIC_POW); break;                                                              \
        }                                                                                                      \
    } while (0)

#if CGD_F64
typedef uint64_t cgd_real_bits;
#else
typedef uint32_t cgd_real_bits;
#endif
/* The sign bit: above every magnitude's bits (cgd_magnitude_bits), so a guard threshold of it holds nothing back. */
#define CGD_SIGN_BIT ((cgd_real_bits)1 << (8 * sizeof(cgd_real_bits) - 1))

/* The bit pattern of a real of the build's type, and back. */
CGD_HD cgd_real_bits cgd_bits(cgd_real x) {
#ifdef __CUDA_ARCH__
#if CGD_F64
    return (cgd_real_bits)__double_as_longlong(x);
#else
    return __float_as_uint(x);
#endif
#else
    cgd_real_bits u;
    memcpy(&u, &x, sizeof u);
    return u;
#endif
}

CGD_HD cgd_real cgd_from_bits(cgd_real_bits u) {
#ifdef __CUDA_ARCH__
#if CGD_F64
    return __longlong_as_double((long long)u);
#else
    return __uint_as_float(u);
#endif
#else
    cgd_real x;
    memcpy(&x, &u, sizeof x);
    return x;
#endif
}

/* cond ? a : b on the bit patterns: the same value as the conditional, but a loop-invariant cond becomes a mask
   the vectoriser can use (GCC does not vectorise a select on a scalar condition), and both sides are computed. */
CGD_HD cgd_real cgd_pick(int cond, cgd_real a, cgd_real b) {
#ifdef __CUDA_ARCH__
    return cond ? a : b; /* a GPU thread selects in one instruction; masks would only cost more */
#else
    const cgd_real_bits mask = (cgd_real_bits)0 - (cgd_real_bits)(cond != 0);
    return cgd_from_bits((cgd_bits(a) & mask) | (cgd_bits(b) & ~mask));
#endif
}

/* The magnitude bits of x (sign cleared): non-negative IEEE values order as these integers, NaN above Inf. */
CGD_HD cgd_real_bits cgd_magnitude_bits(cgd_real x) {
    return cgd_bits(x) & (CGD_SIGN_BIT - 1);
}

#if !CGD_F64
/* 2^k for an integer k in [-126, 127]: its bit pattern. */
CGD_HD float cgd_exp2i(int32_t k) { return cgd_from_bits((uint32_t)(k + 127) << 23); }

/*
 * x^a = q 2^n for the bits of a positive normal float x (exponent field 1..254) and a in [-1, 1]: the core of the
 * two functions below, which differ only in what inputs they admit and in how they apply 2^n. e_adjust is
 * subtracted from x's exponent (a caller that scaled a subnormal into the normal range passes the scaling's
 * power). q lies within [2^-1/2, 2^1/2] to the polynomials' error; n is the integer nearest a log2 x. Bits of
 * other values give finite garbage, never a trap: the callers replace it.
 *
 * x = 2^k m with m in [sqrt(1/2), sqrt(2)): adding 1.0f's bits less sqrt(1/2)'s carries into the exponent exactly
 * when the mantissa is at least sqrt(2)'s, so k and m come from integer operations alone. log2 m = u P(u),
 * u = m - 1 (exact) in [sqrt(1/2) - 1, sqrt(2) - 1]: P of degree 7, a least-squares fit on Chebyshev nodes of
 * that interval, within 1.1e-7 of log2 m with its coefficients in float, evaluated in Estrin's pairs (no
 * division: the divider is the slowest unit the loop uses). y = a e + a log2 m = n + f: a e = yh + yl exactly (the
 * fused multiply-add returns the product's rounding error), so n, the integer nearest yh + w, w = a log2 m + yl,
 * and f = (yh - n) + w rounds once (yh - n is exact), |f| <= 1/2 plus that rounding. 2^f = 1 + f Q(f), Q of
 * degree 5 fitted alike on [-1/2, 1/2] (within 8.7e-9 relative; exactly 1 at f = 0, so 1^a = 1), in Estrin's
 * pairs.
 */
CGD_HD float cgd_pow2_split(uint32_t bits, int32_t e_adjust, float a, int32_t *n_out) {
    const int32_t k = (int32_t)((bits + (0x3f800000u - 0x3f3504f3u)) >> 23) - 127;
    const float m = cgd_from_bits(bits - ((uint32_t)k << 23));
    const int32_t e = k - e_adjust;
    const float u = m - 1.0f, u2 = u * u, u4 = u2 * u2;
    const float l01 = cgd_rfma(-0.721352756f, u, 1.442694902f), l23 = cgd_rfma(-0.360241979f, u, 0.48092404f);
    const float l45 = cgd_rfma(-0.24882181f, u, 0.287075609f), l67 = cgd_rfma(-0.146203533f, u, 0.23420985f);
    const float log2m = u * cgd_rfma(cgd_rfma(l67, u2, l45), u4, cgd_rfma(l23, u2, l01));
    const float fe = (float)e;
    const float yh = a * fe, yl = cgd_rfma(a, fe, -yh);
    const float w = cgd_rfma(a, log2m, yl);
    const float nf = rintf(yh + w); /* to nearest, ties to even: one instruction on every back end */
    const float f = (yh - nf) + w;
    *n_out = (int32_t)nf;
    const float f2 = f * f;
    const float p01 = cgd_rfma(0.240226507f, f, 0.693147182f), p23 = cgd_rfma(0.00961805694f, f, 0.0555035695f);
    const float p45 = cgd_rfma(0.000154614478f, f, 0.00133908668f);
    return cgd_rfma(f, cgd_rfma(cgd_rfma(p45, f2, p23), f2, p01), 1.0f);
}

/*
 * v x^a for float x and a in [-1, 1] other than 0, as v 2^(a log2 x) in float arithmetic with fixed polynomials
 * and integer exponent arithmetic (cgd_pow2_split): no table, no call and no data-dependent branch, so the
 * compiler vectorises it at the full float width (libm's powf is a call per element). Every choice is integer
 * masking or a pick, not a conditional: a conditional lets the compiler thread the special inputs into a separate
 * path, which the vectoriser refuses.
 *
 * Error against float64 pow: below 4e-7 relative (about 3 float ulps; tested), from log2 m's polynomial (1.1e-7
 * times |a| ln 2, plus the rounding of its evaluation), the rounding of a log2 m and of one sum in f (about 6e-8
 * absolute: a e, the largest term, |a e| <= 149, is kept exactly as a float pair), 2^f's fit (8.7e-9) and float
 * rounding (about 1.5e-7); the final scaling by 2^n rounds once (v q is scaled in two factors, each a normal float for n
 * in [-149, 128], so v x^a overflows or goes subnormal only where it is so: the metric step multiplies by x^-a,
 * with no division). cgd_powf_poly is v = 1. a = 1 returns v x; x = 0 gives 0 (a > 0) or +Inf (a < 0), +Inf
 * gives +Inf or 0, NaN or x < 0 gives NaN, each times v, as powf. The polynomials use explicit fused
 * multiply-adds (cgd_rfma: one rounding, IEEE on every back end, so the CPU copies and the GPU still agree bit
 * for bit): the loop around this is bound by the latency of its dependency chain, which a separate multiply and
 * add would double.
 */
CGD_HD float cgd_powf_times(float x, float a, float v) {
    const uint32_t regular = (uint32_t)0 - (uint32_t)((x > 0.0f) & (x < (float)INFINITY));
    /* A subnormal x is scaled into the normal range (exactly, by 2^24) and its exponent corrected. */
    const int32_t tiny = x < 1.17549435e-38f;
    const float scaled = cgd_pick(tiny, x * 16777216.0f, x);
    /* Irregular inputs compute on 1 and are replaced at the end. */
    const uint32_t bits = (cgd_bits(scaled) & regular) | (cgd_bits(1.0f) & ~regular);
    int32_t n;
    const float q = cgd_pow2_split(bits, (tiny & (int32_t)(regular & 1u)) * 24, a, &n);
    const int32_t half = n / 2;
    const float r = ((v * q) * cgd_exp2i(half)) * cgd_exp2i(n - half);
    const int32_t rising = a > 0.0f;
    const float special = cgd_pick(x == 0.0f, cgd_pick(rising, 0.0f, INFINITY),
                                   cgd_pick(x > 0.0f, cgd_pick(rising, INFINITY, 0.0f), NAN));
    return cgd_pick(a == 1.0f, v * x, cgd_pick(regular != 0, r, v * special));
}

CGD_HD float cgd_powf_poly(float x, float a) { return cgd_powf_times(x, a, 1.0f); }

/*
 * v x^-a, as cgd_powf_times(x, -a, v) to the same bound, for x a normal float, +Inf or NaN (never 0, negative or
 * subnormal) and a in (0, CGD_POW_NORMAL_MAX]: what the diagonal metric with eps inside evaluates, x = eps + C >=
 * eps >= FLT_MIN (C >= 0). Those limits make x^-a a normal float, so 2^n goes into q's exponent field by one integer
 * addition and v times it rounds once, where the general function needs a subnormal prescale, two scaling factors
 * and a ladder of special cases: about a third fewer operations. +Inf gives 0 times v, NaN gives NaN.
 */
CGD_HD float cgd_powf_times_normal(float x, float a, float v) {
    int32_t n;
    const float q = cgd_pow2_split(cgd_bits(x), 0, -a, &n);
    const float r = v * cgd_from_bits(cgd_bits(q) + ((uint32_t)n << 23));
    /* A negative x (only from a state no step writes) gives NaN, not a finite value. */
    const int32_t normal = (x >= 1.17549435e-38f) & (x < (float)INFINITY);
    return cgd_pick(normal, r, v * cgd_pick(x == (float)INFINITY, 0.0f, NAN));
}
#endif

/* Per-call constants in the real type the kernels compute in (real.h). */
typedef struct cgd_diag_consts {
    cgd_real lr, beta1, beta2, one_minus_beta2, grad_weight, first_grad_weight, power, eps, weight_decay;
    double beta1_d, beta2_d, weight_decay_d; /* bias corrections are formed in double, as torch does on the host */
    const float *lr_device; /* replaces lr when set (cgd_diag_hparams.lr_device) */
    /* An entry is held back when cgd_magnitude_bits(g) >= guard_bits (cgd_diag_guard_bits): NaN, Inf and the
       guard's limit, or nothing (a value above every magnitude) without a guard. */
    cgd_real_bits guard_bits;
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
    cgd_real inv_bc2_pow;  /* 1 / (1 - beta2^t)^power: scales C^power when eps sits outside (torch's Adam divides;
                              the product is within an ulp of that quotient and spares the divider) */
    cgd_real mean_weight;  /* 1, or 0 on a bias-corrected first step, whose centered variance has no data */
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
    k.guard_bits = CGD_SIGN_BIT; /* no guard; the caller sets cgd_diag_guard_bits */
    k.metric = h->power == 0.0   ? CGD_METRIC_NONE
               : h->power == 0.5 ? CGD_METRIC_SQRT
               : h->power == 1.0 ? CGD_METRIC_ONE
               : CGD_F64 == 0 && h->eps_inside && h->eps >= 1.17549435e-38 && h->power <= CGD_POW_NORMAL_MAX
                   ? CGD_METRIC_POW_NORMAL
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

/* cgd_diag_consts.guard_bits for these hyperparameters: host code, as cgd_threshold_bits is. */
static inline cgd_real_bits cgd_diag_guard_bits(const cgd_diag_hparams *h) {
    if (!h->guard_flags) return CGD_SIGN_BIT;
    return (cgd_real_bits)cgd_threshold_bits(CGD_STATE_DTYPE, h->guard_limit > 0.0 ? h->guard_limit : INFINITY);
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
    s.inv_bc2_pow = (cgd_real)(1.0 / pow(bc2, (double)k->power));
    /* Without data the variance would be exactly 0 and the step lr eps^-a g: the second moment itself instead. */
    s.mean_weight = cgd_variance_has_data(k->bias_correction, steps_taken) ? CGD_R(1.0) : CGD_R(0.0);
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
    const cgd_real spread = c * s->inv_bc2 - s->mean_weight * (mean * mean);
    const cgd_real var = cgd_pick(spread > CGD_R(0.0), spread, CGD_R(0.0)); /* the variance, clamped at 0 */
    /* centered: (eps + var)^a or var^a + eps; raw and belief: (eps + c / bc2)^a or c^a / bc2^a + eps (torch) */
    const cgd_real base = cgd_pick(centered, var, cgd_pick(inside, c * s->inv_bc2, c));
#if !CGD_F64
    if (k->metric == CGD_METRIC_POW_NORMAL) { /* force (eps + base)^-a: a product, not a quotient */
        *p = param - s->step_size * cgd_powf_times_normal(k->eps + base, k->power, force);
        return;
    }
    if (k->metric == CGD_METRIC_POW && inside) {
        *p = param - s->step_size * cgd_powf_times(k->eps + base, -k->power, force);
        return;
    }
#endif
    const cgd_real g_power = cgd_metric_power(k->metric, cgd_pick(inside, k->eps + base, base), k->power);
    const cgd_real denom = cgd_pick(inside, g_power, cgd_pick(centered, g_power, g_power * s->inv_bc2_pow) + k->eps);
    *p = param - s->step_size * (force / denom);
}

/*
 * cgd_diag_update behind the fused guard: the update is computed whatever g holds, then an entry whose gradient
 * is unusable (k->guard_bits) keeps its old p, m1 and m2. Returns 1 for such an entry, else 0. Picks, not a
 * branch, so the guard costs a few integer operations per entry and the loop stays vectorised.
 */
CGD_HD int cgd_diag_update_guarded(const cgd_diag_consts *k, const cgd_diag_step_consts *s, cgd_real *p, cgd_real g,
                                   cgd_real *m1, cgd_real *m2) {
    const int held = cgd_magnitude_bits(g) >= k->guard_bits;
    cgd_real np = *p, a = *m1, b = *m2;
    cgd_diag_update(k, s, &np, g, &a, &b);
    *p = cgd_pick(held, *p, np);
    *m1 = cgd_pick(held, *m1, a);
    *m2 = cgd_pick(held, *m2, b);
    return held;
}

#endif /* CGD_DIAG_MATH_H */
