/*
 * The real type a kernel computes and keeps its state in. Every kernel source is compiled twice
 * (CMakeLists.txt): with CGD_F64 = 0 for float32 state behind float32, float16 and bfloat16 parameters, and with
 * CGD_F64 = 1 for float64 parameters with float64 state, so one text serves both precisions and they cannot
 * drift apart. Entry points are named through CGD_NAME (suffix _f32 or _f64; capi/cgd.c picks one by dtype).
 * The math functions are spelt out per type rather than left to C++ overloading, so the C and the CUDA build
 * round the same operations.
 */
#ifndef CGD_REAL_H
#define CGD_REAL_H

#include <math.h>

#include "half_convert.h"

#ifndef CGD_F64
#define CGD_F64 0
#endif

#if CGD_F64
typedef double cgd_real;
#define CGD_NAME(name) name##_f64
#define CGD_STATE_DTYPE CGD_FLOAT64
#define CGD_R(x) x
#define cgd_rsqrt sqrt
#define cgd_rpow pow
#define cgd_rfmax fmax
#define cgd_rfabs fabs
#define cgd_rfma fma
#else
typedef float cgd_real;
#define CGD_NAME(name) name##_f32
#define CGD_STATE_DTYPE CGD_FLOAT32
#define CGD_R(x) x##f
#define cgd_rsqrt sqrtf
#define cgd_rpow powf
#define cgd_rfmax fmaxf
#define cgd_rfabs fabsf
#define cgd_rfma fmaf
#endif

/* Expands CALL(DT) with DT the constant cgd_dtype that `dtype` names among the parameter dtypes this build serves
   (float32, float16 and bfloat16; float64 in the float64 build), so each CPU loop and each CUDA kernel is
   instantiated once per dtype. */
#if CGD_F64
#define CGD_DISPATCH_DTYPE(dtype, CALL) \
    do {                                \
        (void)(dtype);                  \
        CALL(CGD_FLOAT64);              \
    } while (0)
#else
#define CGD_DISPATCH_DTYPE(dtype, CALL)   \
    do {                                  \
        if ((dtype) == CGD_FLOAT16)       \
            CALL(CGD_FLOAT16);            \
        else if ((dtype) == CGD_BFLOAT16) \
            CALL(CGD_BFLOAT16);           \
        else                              \
            CALL(CGD_FLOAT32);            \
    } while (0)
#endif

#ifndef __CUDACC__
/* Element i of a parameter or gradient as the kernel's real type, and back: float64 arrays in the float64
   build, float32/float16/bfloat16 (converted as half_convert.h does) in the other. */
static inline cgd_real cgd_load_real(cgd_dtype dtype, const void *base, int64_t i) {
#if CGD_F64
    (void)dtype;
    return ((const double *)base)[i];
#else
    return cgd_load_f32(dtype, base, i);
#endif
}

static inline void cgd_store_real(cgd_dtype dtype, void *base, int64_t i, cgd_real v) {
#if CGD_F64
    (void)dtype;
    ((double *)base)[i] = v;
#else
    cgd_store_f32(dtype, base, i, v);
#endif
}
#endif

#endif /* CGD_REAL_H */
