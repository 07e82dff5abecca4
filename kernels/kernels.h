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

/* Full/block CGD (block_cpu.c, block_cuda.cu). The CPU one returns nonzero when the workspace cannot be
   allocated; the CUDA one returns nonzero on any CUDA, cuBLAS or cuSOLVER error and writes its text to why. */
int cgd_cpu_block_step(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_block_tensor *tensors, int64_t count,
                       const cgd_block_state *state, const float *grad_scale, const float *skip);

int cgd_cuda_block_step(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_block_tensor *tensors, int64_t count,
                        const cgd_block_state *state, const float *grad_scale, const float *skip, void *stream,
                        char *why, int why_size);

/* Kronecker-factored CGD (kron_cpu.c, kron_cuda.cu), with the same return conventions as the block step. The
   CPU one steps tensor by tensor: when it runs out of memory, the tensors before the failing one have stepped
   (each tensor's state stays consistent with its own step count). */
int cgd_cpu_kron_step(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_kron_tensor *tensors, int64_t count,
                      const float *grad_scale, const float *skip);

int cgd_cuda_kron_step(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_kron_tensor *tensors, int64_t count,
                       const float *grad_scale, const float *skip, void *stream, char *why, int why_size);

/* Induced-metric optimizers (induced_cpu.c, induced_cuda.cu). The CPU norm returns nonzero when out of memory;
   the CUDA launchers return a cudaError_t as int. */
int cgd_cpu_induced_norm(const cgd_induced_hparams *h, cgd_dtype dtype, const cgd_diag_tensor *tensors, int64_t count,
                         float *sum, const float *grad_scale, const float *skip);
void cgd_cpu_induced_rate(const cgd_induced_metric *m, const float *sum, const float *loss, float *norm_ema,
                          float *norm_step, float *rate, const float *skip);
void cgd_cpu_induced_step(const cgd_induced_hparams *h, cgd_dtype dtype, const cgd_diag_tensor *tensors,
                          int64_t count, const float *rate, const float *grad_scale, const float *skip);

int cgd_cuda_induced_norm(const cgd_induced_hparams *h, cgd_dtype dtype, const cgd_diag_tensor *tensors,
                          int64_t count, float *sum, const float *grad_scale, const float *skip, void *stream);
int cgd_cuda_induced_rate(const cgd_induced_metric *m, const float *sum, const float *loss, float *norm_ema,
                          float *norm_step, float *rate, const float *skip, void *stream);
int cgd_cuda_induced_step(const cgd_induced_hparams *h, cgd_dtype dtype, const cgd_diag_tensor *tensors,
                          int64_t count, const float *rate, const float *grad_scale, const float *skip, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* CGD_KERNELS_H */
