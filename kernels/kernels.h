/*
 * Entry points of the kernels, called by capi/cgd.c only after it has validated every argument. Internal: not
 * installed, not part of the public API.
 */
#ifndef CGD_KERNELS_H
#define CGD_KERNELS_H

#include "cgd.h"
#include "diag_math.h"

#ifdef __cplusplus
extern "C" {
#endif

void cgd_cpu_diag_step(const cgd_diag_consts *k, cgd_dtype dtype, const cgd_diag_tensor *tensors, int64_t count,
                       const float *grad_scale, const float *skip);

void cgd_cpu_nonfinite_check(cgd_dtype dtype, const void *const *data, const int64_t *numels, int64_t count,
                             int32_t *flags, float *found);

/* CUDA launchers return a cudaError_t as int (0 = success) so this header needs no CUDA include. */
int cgd_cuda_diag_step(const cgd_diag_consts *k, cgd_dtype dtype, const cgd_diag_tensor *tensors, int64_t count,
                       const float *grad_scale, const float *skip, void *stream);

int cgd_cuda_nonfinite_check(cgd_dtype dtype, const void *const *data, const int64_t *numels, int64_t count,
                             int32_t *flags, float *found, void *stream);

const char *cgd_cuda_error_string(int error);

#ifdef __cplusplus
}
#endif

#endif /* CGD_KERNELS_H */
