/*
 * Entry points of the kernels, called by capi/cgd.c only after it has validated every argument. Internal: not
 * installed, not part of the public API.
 */
#ifndef CGD_KERNELS_H
#define CGD_KERNELS_H

#include <stddef.h>

#include "cgd.h"

/* Elements per chunk of the CUDA multi-tensor launches (multi_tensor.cuh), and so per partial sum of the
   induced norm's deterministic reduction. */
#define CGD_MT_CHUNK 32768

/* A CPU loop compiled for the baseline ISA, AVX2 with FMA (x86-64-v3) and AVX-512, the copy picked at load time by
   the CPU: the same operations in the same order in each (no contraction; IEEE division, square root and explicit
   fused multiply-adds are correctly rounded at any width), so the results are bit-identical whichever runs. The
   baseline has no FMA instruction: its explicit fused multiply-adds are fmaf calls, correct but scalar. */
#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__) && !defined(__CUDACC__)
#define CGD_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CGD_CPU_CLONES
#endif

#ifdef __cplusplus
extern "C" {
#endif

/*
 * How the elementwise CPU kernels split a call: every tensor into chunks of at most a fixed size, numbered across
 * all of the call's tensors, and one parallel region for the whole call in which thread `id` of `threads` takes
 * the chunks numbered id, id + threads, ... (a region per tensor costs more than a small tensor's update). Each
 * element is computed alike whichever thread takes it, so results do not depend on the thread count.
 */
/* A call with fewer elements than this runs on the calling thread alone: waking the team costs more than the work
   (600 tensors of 64 entries: 80 us on one thread, 117 us on two). */
#define CGD_CPU_PARALLEL_MIN ((int64_t)1 << 16)
typedef struct cgd_cpu_share {
    int64_t id, threads;
} cgd_cpu_share;
/* The calling thread's share: inside a parallel region, its place in the team; outside one, {0, 1}. */
cgd_cpu_share cgd_cpu_my_share(void);
/* This thread's first chunk of a tensor whose chunk 0 is the call's chunk number `first`. */
static inline int64_t cgd_cpu_first_chunk(cgd_cpu_share share, int64_t first) {
    return ((share.id - first) % share.threads + share.threads) % share.threads;
}

#ifdef __CUDACC__
#define CGD_KERNELS_HD static inline __host__ __device__
#else
#define CGD_KERNELS_HD static inline
#endif

/* Whether the centered variance has data yet: a bias-corrected first step's S - F F^T is exactly 0 (S = g g^T,
   F = g), so until a second gradient the centered metrics take S itself (cgd.h). steps_taken: before this step. */
CGD_KERNELS_HD int cgd_variance_has_data(int bias_correction, double steps_taken) {
    return !bias_correction || steps_taken != 0.0;
}

/* M1 must be stored when it is an average (beta1 > 0) or when the metric subtracts it; M2 when there is a metric. */
CGD_KERNELS_HD int cgd_diag_needs_m1(const cgd_diag_hparams *h) {
    return h->beta1 > 0.0 || (h->power != 0.0 && h->moment != CGD_MOMENT_RAW);
}
CGD_KERNELS_HD int cgd_diag_needs_m2(const cgd_diag_hparams *h) { return h->power != 0.0; }

/*
 * The kernels of one real type (real.h), declared for both: suffix _f32 (float32 state; float32, float16 and
 * bfloat16 parameters) and _f64 (float64 parameters and state). The state pointers of the cgd.h structs point at
 * that real type. CPU kernels that allocate scratch return nonzero when it cannot be had (then nothing changed:
 * they allocate everything first). CUDA launchers return a cudaError_t as int (0 = success) so this header needs
 * no CUDA include; the block and kron ones return nonzero on any CUDA, cuBLAS or cuSOLVER error and write its
 * text to why, and carve their buffers from the caller's workspace (sized by the matching *_workspace) without
 * allocating. The induced norm's CUDA workspace holds one double per chunk: cgd_induced_norm_chunks(...).
 */
#define CGD_DECLARE_KERNELS(S)                                                                                         \
    void cgd_cpu_diag_step##S(const cgd_diag_hparams *h, cgd_dtype dtype, const cgd_diag_tensor *tensors,              \
                              int64_t count, const float *grad_scale, const float *skip);                              \
    int cgd_cuda_diag_step##S(const cgd_diag_hparams *h, cgd_dtype dtype, const cgd_diag_tensor *tensors,              \
                              int64_t count, const float *grad_scale, const float *skip, void *stream);                \
    int cgd_cpu_block_step##S(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_block_tensor *tensors,            \
                              int64_t count, const cgd_block_state *state, const float *grad_scale,                    \
                              const float *skip);                                                                      \
    int cgd_cuda_block_workspace##S(const cgd_block_hparams *h, const cgd_block_state *state, void *stream,            \
                                    size_t *bytes, char *why, int why_size);                                           \
    int cgd_cuda_block_step##S(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_block_tensor *tensors,           \
                               int64_t count, const cgd_block_state *state, const float *grad_scale,                   \
                               const float *skip, void *workspace, void *stream, char *why, int why_size);             \
    int cgd_cpu_kron_step##S(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_kron_tensor *tensors,              \
                             int64_t count, const float *grad_scale, const float *skip);                               \
    int cgd_cpu_eigenbasis_step##S(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_kron_tensor *tensors,        \
                                   int64_t count, const float *grad_scale, const float *skip);                         \
    int cgd_cuda_kron_workspace##S(const cgd_block_hparams *h, const cgd_kron_tensor *tensors, int64_t count,          \
                                   void *stream, size_t *bytes, char *why, int why_size);                              \
    int cgd_cuda_kron_step##S(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_kron_tensor *tensors,             \
                              int64_t count, const float *grad_scale, const float *skip, void *workspace,              \
                              void *stream, char *why, int why_size);                                                  \
    int cgd_cuda_eigenbasis_workspace##S(const cgd_block_hparams *h, const cgd_kron_tensor *tensors, int64_t count,    \
                                         void *stream, size_t *bytes, char *why, int why_size);                        \
    int cgd_cuda_eigenbasis_step##S(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_kron_tensor *tensors,       \
                                    int64_t count, const float *grad_scale, const float *skip, void *workspace,        \
                                    void *stream, char *why, int why_size);                                            \
    int cgd_cpu_window_step##S(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_block_tensor *tensors,          \
                               int64_t count, const cgd_window_state *state, const float *grad_scale,                 \
                               const float *skip);                                                                    \
    int cgd_cpu_muon_step##S(const cgd_muon_hparams *h, cgd_dtype dtype, const cgd_muon_tensor *tensors,              \
                             int64_t count, const float *grad_scale, const float *skip);                               \
    int cgd_cuda_muon_workspace##S(const cgd_muon_hparams *h, const cgd_muon_tensor *tensors, int64_t count,          \
                                   void *stream, size_t *bytes, char *why, int why_size);                              \
    int cgd_cuda_muon_step##S(const cgd_muon_hparams *h, cgd_dtype dtype, const cgd_muon_tensor *tensors,             \
                              int64_t count, const float *grad_scale, const float *skip, void *workspace,              \
                              void *stream, char *why, int why_size);                                                  \
    int cgd_cpu_induced_norm##S(const cgd_induced_hparams *h, cgd_dtype dtype, const cgd_diag_tensor *tensors,         \
                                int64_t count, double *sum, const float *grad_scale, const float *skip);               \
    void cgd_cpu_induced_step##S(const cgd_induced_hparams *h, cgd_dtype dtype, const cgd_diag_tensor *tensors,        \
                                 int64_t count, const double *rate, const float *grad_scale, const float *skip);       \
    int cgd_cuda_induced_norm##S(const cgd_induced_hparams *h, cgd_dtype dtype, const cgd_diag_tensor *tensors,        \
                                 int64_t count, double *sum, const float *grad_scale, const float *skip,               \
                                 double *partial, void *stream);                                                       \
    int cgd_cuda_induced_step##S(const cgd_induced_hparams *h, cgd_dtype dtype, const cgd_diag_tensor *tensors,        \
                                 int64_t count, const double *rate, const float *grad_scale, const float *skip,        \
                                 void *stream);

CGD_DECLARE_KERNELS(_f32)
CGD_DECLARE_KERNELS(_f64)

/* The kernel of the right real type for `dtype`: CGD_BY_REAL(dtype, cgd_cpu_diag_step)(args...). */
#define CGD_BY_REAL(dtype, name) ((dtype) == CGD_FLOAT64 ? name##_f64 : name##_f32)

/* Independent of the real type (built once, in the float32 build). */
void cgd_cpu_nonfinite_check(cgd_dtype dtype, const void *const *data, const int64_t *numels, const double *limits,
                             int64_t count, int32_t *flags, float *found);
int cgd_cuda_nonfinite_check(cgd_dtype dtype, const void *const *data, const int64_t *numels, const double *limits,
                             int64_t count, int32_t *flags, float *found, void *stream);
int64_t cgd_induced_norm_chunks(const cgd_diag_tensor *tensors, int64_t count);
void cgd_cpu_induced_rate(const cgd_induced_metric *m, const double *sum, const double *loss, double *norm_ema,
                          double *norm_step, double *rate, const float *skip);
int cgd_cuda_induced_rate(const cgd_induced_metric *m, const double *sum, const double *loss, double *norm_ema,
                          double *norm_step, double *rate, const float *skip, void *stream);

const char *cgd_cuda_error_string(int error);

/* The calling thread's cuSOLVER/cuBLAS handles for the current device, created when missing (cgd_prepare).
   Nonzero on failure, with the reason in why. */
int cgd_cuda_prepare(char *why, int why_size);

/* Fault injection and probes for the C tests (tests/c), never set by the library itself: allocations of the CPU
   kernels' scratch go through cgd_host_alloc, which fails once `host_allocs_before_failure` successes have
   been used up (negative: never fails); eigh_calls counts calls into the CPU eigensolver; lanczos_iterations, when
   positive, caps the Lanczos solver's iterations below CGD_LANCZOS_MAX_ITER (to reach its fallback). */
typedef struct cgd_test_hooks {
    long long host_allocs_before_failure;
    long long eigh_calls;
    int lanczos_iterations;
} cgd_test_hooks;
extern cgd_test_hooks cgd_hooks;

/* malloc / calloc for the CPU kernels' scratch, honouring cgd_hooks. */
void *cgd_host_alloc(size_t bytes);
void *cgd_host_zalloc(size_t bytes);

#ifdef __cplusplus
}
#endif

#endif /* CGD_KERNELS_H */
