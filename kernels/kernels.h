/*
 * Entry points of the kernels, called by capi/cgd.c only after it has validated every argument. Internal: not
 * installed, not part of the public API.
 */
#ifndef CGD_KERNELS_H
#define CGD_KERNELS_H

#include <stddef.h>

#include "cgd.h"
#include "diag_math.h"

/* Elements per chunk of the CUDA multi-tensor launches (multi_tensor.cuh), and so per partial sum of the
   induced norm's deterministic reduction. */
#define CGD_MT_CHUNK 32768

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

/* The calling thread's cuSOLVER/cuBLAS handles for the current device, created when missing (cgd_prepare).
   Nonzero on failure, with the reason in why. */
int cgd_cuda_prepare(char *why, int why_size);

/* Fault injection and probes for the C tests (tests/c), never set by the library itself: allocations of the CPU
   kernels' scratch go through cgd_host_alloc, which fails once `host_allocs_before_failure` successes have
   been used up (negative: never fails); eigh_calls counts calls into the CPU eigensolver. */
typedef struct cgd_test_hooks {
    long long host_allocs_before_failure;
    long long eigh_calls;
} cgd_test_hooks;
extern cgd_test_hooks cgd_hooks;

/* malloc / calloc for the CPU kernels' scratch, honouring cgd_hooks. */
void *cgd_host_alloc(size_t bytes);
void *cgd_host_zalloc(size_t bytes);

/* Full/block CGD (block_cpu.c, block_cuda.cu). The CPU one returns nonzero when its scratch cannot be
   allocated (then nothing changed: it allocates everything first). The CUDA ones return nonzero on any CUDA,
   cuBLAS or cuSOLVER error and write its text to why; the step carves its buffers from the caller's workspace
   of at least cgd_cuda_block_workspace's bytes and allocates nothing. */
int cgd_cpu_block_step(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_block_tensor *tensors, int64_t count,
                       const cgd_block_state *state, const float *grad_scale, const float *skip);

int cgd_cuda_block_workspace(const cgd_block_hparams *h, const cgd_block_state *state, void *stream, size_t *bytes,
                             char *why, int why_size);
int cgd_cuda_block_step(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_block_tensor *tensors, int64_t count,
                        const cgd_block_state *state, const float *grad_scale, const float *skip, void *workspace,
                        void *stream, char *why, int why_size);

/* Kronecker-factored CGD (kron_cpu.c, kron_cuda.cu), with the same conventions as the block step. */
int cgd_cpu_kron_step(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_kron_tensor *tensors, int64_t count,
                      const float *grad_scale, const float *skip);

int cgd_cuda_kron_workspace(const cgd_block_hparams *h, const cgd_kron_tensor *tensors, int64_t count, void *stream,
                            size_t *bytes, char *why, int why_size);
int cgd_cuda_kron_step(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_kron_tensor *tensors, int64_t count,
                       const float *grad_scale, const float *skip, void *workspace, void *stream, char *why,
                       int why_size);

/* Induced-metric optimizers (induced_cpu.c, induced_cuda.cu). The CPU norm returns nonzero when out of memory
   (nothing changed then); the CUDA launchers return a cudaError_t as int. The CUDA norm's workspace holds one
   double per chunk: cgd_induced_norm_chunks(...) of them. */
int64_t cgd_induced_norm_chunks(const cgd_diag_tensor *tensors, int64_t count);
int cgd_cpu_induced_norm(const cgd_induced_hparams *h, cgd_dtype dtype, const cgd_diag_tensor *tensors, int64_t count,
                         float *sum, const float *grad_scale, const float *skip);
void cgd_cpu_induced_rate(const cgd_induced_metric *m, const float *sum, const float *loss, float *norm_ema,
                          double *norm_step, float *rate, const float *skip);
void cgd_cpu_induced_step(const cgd_induced_hparams *h, cgd_dtype dtype, const cgd_diag_tensor *tensors,
                          int64_t count, const float *rate, const float *grad_scale, const float *skip);

int cgd_cuda_induced_norm(const cgd_induced_hparams *h, cgd_dtype dtype, const cgd_diag_tensor *tensors,
                          int64_t count, float *sum, const float *grad_scale, const float *skip, double *partial,
                          void *stream);
int cgd_cuda_induced_rate(const cgd_induced_metric *m, const float *sum, const float *loss, float *norm_ema,
                          double *norm_step, float *rate, const float *skip, void *stream);
int cgd_cuda_induced_step(const cgd_induced_hparams *h, cgd_dtype dtype, const cgd_diag_tensor *tensors,
                          int64_t count, const float *rate, const float *grad_scale, const float *skip, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* CGD_KERNELS_H */
