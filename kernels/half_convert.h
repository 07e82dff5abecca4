/*
 * float <-> IEEE binary16 and bfloat16 on the CPU, bit-exact with round-to-nearest-even, so CPU results match
 * what CUDA's __float2half_rn / __float2bfloat16_rn and torch produce. Plain C11: no compiler _Float16
 * support is assumed.
 */
#ifndef CGD_HALF_CONVERT_H
#define CGD_HALF_CONVERT_H

#include <stdint.h>
#include <string.h>

#include "cgd.h"

static inline uint32_t cgd_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float cgd_f32_from_bits(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float cgd_bf16_to_f32(uint16_t h) { return cgd_f32_from_bits((uint32_t)h << 16); }

static inline uint16_t cgd_f32_to_bf16(float f) {
    uint32_t u = cgd_f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x0040u); /* NaN stays a quiet NaN */
    /* Adding 0x7fff plus the lowest kept bit rounds half-way cases to the even neighbour. */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float cgd_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1fu) return cgd_f32_from_bits(sign | 0x7f800000u | (man << 13)); /* Inf, NaN */
    if (exp != 0) return cgd_f32_from_bits(sign | ((exp + 112u) << 23) | (man << 13));
    /* Zero and subnormals: man * 2^-24 is exact in float. */
    float v = (float)man * 5.9604644775390625e-8f;
    return sign ? -v : v;
}

static inline uint16_t cgd_f32_to_f16(float f) {
    uint32_t u = cgd_f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t abs = u & 0x7fffffffu;
    if (abs > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((abs >> 13) & 0x3ffu)); /* quiet NaN */
    if (abs >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds past 65504: Inf */
    if (abs < 0x38800000u) {
        /* Result is subnormal (or zero): the value in units of 2^-24, rounded to nearest even. */
        if (abs < 0x33000000u) return sign; /* below half the smallest subnormal */
        uint32_t exp = abs >> 23;
        uint32_t man = (abs & 0x7fffffu) | 0x800000u;
        uint32_t shift = 126u - exp; /* 14..24: brings 2^(exp-127) * man/2^23 to units of 2^-24 */
        uint32_t kept = man >> shift;
        uint32_t rest = man & ((1u << shift) - 1u);
        uint32_t half = 1u << (shift - 1u);
        if (rest > half || (rest == half && (kept & 1u))) kept += 1u;
        return (uint16_t)(sign | kept);
    }
    /* Normal: rebias the exponent, round the 13 dropped mantissa bits to nearest even; a carry into the
       exponent is the correct result (including the step up to Inf, excluded above). */
    uint32_t r = abs - 0x38000000u;
    r += 0x0fffu + ((r >> 13) & 1u);
    return (uint16_t)(sign | (r >> 13));
}

/* Element i of a parameter or gradient array of the given dtype, as float, and back (rounded to nearest even).
   Callers pass a constant dtype inside specialised loops, so the switch folds away. */
static inline float cgd_load_f32(cgd_dtype dtype, const void *base, int64_t i) {
    switch (dtype) {
    case CGD_FLOAT16: return cgd_f16_to_f32(((const uint16_t *)base)[i]);
    case CGD_BFLOAT16: return cgd_bf16_to_f32(((const uint16_t *)base)[i]);
    default: return ((const float *)base)[i];
    }
}

static inline void cgd_store_f32(cgd_dtype dtype, void *base, int64_t i, float v) {
    switch (dtype) {
    case CGD_FLOAT16: ((uint16_t *)base)[i] = cgd_f32_to_f16(v); break;
    case CGD_BFLOAT16: ((uint16_t *)base)[i] = cgd_f32_to_bf16(v); break;
    default: ((float *)base)[i] = v; break;
    }
}

/*
 * The non-finite scans' threshold: the magnitude bits t (sign cleared) such that, for an element x of `dtype`,
 * |x| >= limit (to the dtype's rounding) exactly when abs_bits(x) >= t; NaN and Inf have bits above every finite
 * t. Non-negative IEEE values order as their bit patterns. float64's t has its low 32 bits clear (rounding the
 * limit down by at most 2^-20 of itself), so comparing the high words alone decides it.
 */
static inline uint64_t cgd_threshold_bits(cgd_dtype dtype, double limit) {
    if (dtype == CGD_FLOAT64) {
        if (!(limit < 1.0 / 0.0)) return 0x7ff0000000000000ull;
        uint64_t u;
        memcpy(&u, &limit, sizeof u);
        return u & 0x7fffffff00000000ull;
    }
    if (!(limit < 3.4028234663852886e38))
        return dtype == CGD_FLOAT32 ? 0x7f800000u : (dtype == CGD_BFLOAT16 ? 0x7f80u : 0x7c00u);
    uint32_t f = cgd_f32_bits((float)limit) & 0x7fffffffu;
    if (dtype == CGD_FLOAT32) return f;
    if (dtype == CGD_BFLOAT16) return f >> 16; /* truncated: a limit between two bfloat16 values rounds down */
    return limit > 65504.0 ? 0x7c00u : (uint64_t)(cgd_f32_to_f16((float)limit) & 0x7fffu);
}

#endif /* CGD_HALF_CONVERT_H */
