/*
 * Stand-ins for the CUDA launchers in a build without CUDA kernels, so the C API dispatches the same way in
 * every build; compiled for both real types, as the kernels are (real.h). capi/cgd.c refuses device = CGD_CUDA
 * before any of them could be called; should one be reached anyway, it reports an error instead of doing nothing.
 */
#include <stdio.h>

#include "kernels.h"
#include "real.h"

#define CGD_NO_CUDA 1

static int absent(char *why, int why_size) {
    snprintf(why, (size_t)why_size, "%s", cgd_cuda_error_string(CGD_NO_CUDA));
    return CGD_NO_CUDA;
}

#if !CGD_F64
const char *cgd_cuda_error_string(int error) {
    (void)error;
    return "this build of torch-cgd has no CUDA kernels";
}

int cgd_cuda_prepare(char *why, int why_size) { return absent(why, why_size); }

int cgd_cuda_nonfinite_check(cgd_dtype dtype, const void *const *data, const int64_t *numels, const double *limits,
                             int64_t count, int32_t *flags, float *found, void *stream) {
    return CGD_NO_CUDA;
}

int cgd_cuda_induced_rate(const cgd_induced_metric *m, const double *sum, const double *loss, double *norm_ema,
                          double *norm_step, double *rate, const float *skip, void *stream) {
    return CGD_NO_CUDA;
}
#endif

int CGD_NAME(cgd_cuda_diag_step)(const cgd_diag_hparams *h, cgd_dtype dtype, const cgd_diag_tensor *tensors,
                                 int64_t count, const float *grad_scale, const float *skip, void *stream) {
    return CGD_NO_CUDA;
}

int CGD_NAME(cgd_cuda_block_workspace)(const cgd_block_hparams *h, const cgd_block_state *state, void *stream,
                                       size_t *bytes, char *why, int why_size) {
    return absent(why, why_size);
}

int CGD_NAME(cgd_cuda_block_step)(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_block_tensor *tensors,
                                  int64_t count, const cgd_block_state *state, const float *grad_scale,
                                  const float *skip, void *workspace, void *stream, char *why, int why_size) {
    return absent(why, why_size);
}

int CGD_NAME(cgd_cuda_kron_workspace)(const cgd_block_hparams *h, const cgd_kron_tensor *tensors, int64_t count,
                                      void *stream, size_t *bytes, char *why, int why_size) {
    return absent(why, why_size);
}

int CGD_NAME(cgd_cuda_kron_step)(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_kron_tensor *tensors,
                                 int64_t count, const float *grad_scale, const float *skip, void *workspace,
                                 void *stream, char *why, int why_size) {
    return absent(why, why_size);
}

int CGD_NAME(cgd_cuda_eigenbasis_workspace)(const cgd_block_hparams *h, const cgd_kron_tensor *tensors, int64_t count,
                                            void *stream, size_t *bytes, char *why, int why_size) {
    return absent(why, why_size);
}

int CGD_NAME(cgd_cuda_eigenbasis_step)(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_kron_tensor *tensors,
                                       int64_t count, const float *grad_scale, const float *skip, void *workspace,
                                       void *stream, char *why, int why_size) {
    return absent(why, why_size);
}

int CGD_NAME(cgd_cuda_muon_workspace)(const cgd_muon_hparams *h, const cgd_muon_tensor *tensors, int64_t count,
                                      void *stream, size_t *bytes, char *why, int why_size) {
    return absent(why, why_size);
}

int CGD_NAME(cgd_cuda_muon_step)(const cgd_muon_hparams *h, cgd_dtype dtype, const cgd_muon_tensor *tensors,
                                 int64_t count, const float *grad_scale, const float *skip, void *workspace,
                                 void *stream, char *why, int why_size) {
    return absent(why, why_size);
}

int CGD_NAME(cgd_cuda_induced_norm)(const cgd_induced_hparams *h, cgd_dtype dtype, const cgd_diag_tensor *tensors,
                                    int64_t count, double *sum, const float *grad_scale, const float *skip,
                                    double *partial, void *stream) {
    return CGD_NO_CUDA;
}

int CGD_NAME(cgd_cuda_induced_step)(const cgd_induced_hparams *h, cgd_dtype dtype, const cgd_diag_tensor *tensors,
                                    int64_t count, const double *rate, const float *grad_scale, const float *skip,
                                    void *stream) {
    return CGD_NO_CUDA;
}
