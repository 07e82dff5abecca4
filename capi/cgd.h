/*
 * torch-cgd public C API.
 *
 * Covariant Gradient Descent (Guskov & Vanchurin, arXiv 2504.05279): dq = -lr * g^{-1} F with the force
 * F = M1 (EMA of gradients) and the metric g = (eps + C)^a, C the EMA second moment M2 or the variance
 * M2 - M1^2. This header is plain C, needs neither Torch nor Python, and is the only header a C or C++ program
 * includes to use the library.
 *
 * Conventions
 * - Every function returns a cgd_status and never aborts. cgd_last_error() then holds a message naming the
 *   argument and its value (per thread, valid until the next call on that thread).
 * - One call steps many tensors: all of one dtype, all on one device. CUDA calls run on the current device,
 *   enqueue work on the caller's stream (a cudaStream_t passed as void*, NULL = the legacy default stream) and
 *   never synchronize the host, so a step can be captured in a CUDA graph.
 * - Nothing allocates device memory: a call that needs scratch space (block, kron, induced norm) takes a
 *   workspace from the caller, sized by its *_workspace_size function, so a framework's caching allocator
 *   provides it and a failed allocation happens before anything changed. cuSOLVER/cuBLAS handles are created
 *   by cgd_prepare (or the first workspace query) on the calling thread, never inside a CUDA-graph capture.
 * - Parameters and gradients are float32, float16 or bfloat16 with float32 optimizer state and float32 maths,
 *   or float64 with float64 state and float64 maths (as torch.optim keeps state in the parameter's precision).
 *   A state pointer (void * below) points at float for the first kind and at double for float64. Step counters
 *   are float64 (exact up to 2^53 steps), failure counters float32, and the induced metric's optimizer-wide
 *   scalars float64. No implicit fused multiply-add on either back end: both evaluate each expression as
 *   written (fma only where the source says so).
 * - Sizes are int64: tensors past 2^31 elements are fine.
 */
#ifndef CGD_H
#define CGD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define CGD_VERSION_MAJOR 0
#define CGD_VERSION_MINOR 1
#define CGD_VERSION_PATCH 0

typedef enum cgd_status {
    CGD_OK = 0,
    CGD_ERR_INVALID_ARGUMENT = 1, /* a hyperparameter, pointer, size or enum value is out of its domain */
    CGD_ERR_UNSUPPORTED = 2,      /* valid request this build cannot serve (e.g. CUDA in a CPU-only build) */
    CGD_ERR_CUDA = 3              /* the CUDA runtime reported an error; the message carries its text */
} cgd_status;

typedef enum cgd_dtype { CGD_FLOAT32 = 0, CGD_FLOAT16 = 1, CGD_BFLOAT16 = 2, CGD_FLOAT64 = 3 } cgd_dtype;

typedef enum cgd_device { CGD_CPU = 0, CGD_CUDA = 1 } cgd_device;

/* Which matrix C the metric is built from (paper eqs 4.1, 4.8). */
typedef enum cgd_moment {
    /* C = M2, the EMA of g^2 (RMSProp, Adam; paper eq 4.1). */
    CGD_MOMENT_RAW = 0,
    /* C = M2 - M1^2 with M2 the EMA of g^2: the variance of paper eq 4.8, clamped at 0. With bias correction
       the first step's variance is exactly 0 (M2 / bc2 = g^2 = (M1 / bc1)^2): that step takes C = M2 / bc2. */
    CGD_MOMENT_CENTERED = 1,
    /* C = S, S <- beta2 S + (1 - beta2)(g - M1)^2 + eps: AdaBelief's own variance estimator (Zhuang et al.
       2020, Algorithm 2), kept in the exp_avg_sq slot. */
    CGD_MOMENT_BELIEF = 2
} cgd_moment;

/*
 * Hyperparameters of the diagonal step, per element (maths in the state's precision):
 *   g  <- grad / grad_scale            (grad_scale optional, see cgd_diag_step)
 *   g  <- -g                           if maximize
 *   g  <- g + weight_decay * p         if weight_decay and !decoupled_weight_decay   (L2, torch Adam)
 *   p  <- p * (1 - lr * weight_decay)  if weight_decay and decoupled_weight_decay    (torch AdamW)
 *   M1 <- beta1 M1 + grad_weight g     (beta1 = 0: M1 = g and no M1 state is needed)
 *   F  <- M1, or beta1 M1 + grad_weight g with nesterov; divided by 1 - beta1^t with bias_correction
 *   C  <- see cgd_moment, with M2 <- beta2 M2 + (1 - beta2) g^2; divided by 1 - beta2^t with bias_correction
 *   G  <- (eps + C)^power if eps_inside (the paper), C^power + eps otherwise (torch Adam)
 *   p  <- p - lr F / G                 (power = 0: G = 1, no second moment is read or written)
 * t is the tensor's step counter plus one. grad_weight is 1 - beta1 for the paper's EMA (eq 3.5) and 1 for
 * torch.optim.SGD's heavy-ball buffer.
 */
typedef struct cgd_diag_hparams {
    double lr;           /* >= 0 */
    double beta1;        /* [0, 1]; 1 (torch.optim.SGD's momentum=1) only without bias_correction */
    double beta2;        /* [0, 1]; 1 (torch.optim.RMSprop's alpha=1) only without bias_correction */
    double grad_weight;  /* > 0 (usually 1 - beta1, or 1) */
    /* 0, or the grad_weight of a tensor's first step (its step counter is 0; > 0): torch.optim.SGD starts its
       dampened buffer as the raw gradient. Read from the device-side counter, so a skipped first step leaves
       the next one first. */
    double first_grad_weight;
    double power;        /* a in [0, 1] */
    double eps;          /* >= 0 */
    double weight_decay; /* >= 0 */
    int32_t moment;      /* cgd_moment */
    int32_t eps_inside;
    int32_t bias_correction;
    int32_t decoupled_weight_decay;
    int32_t nesterov;
    int32_t maximize;
    /* NULL, or one float on the call's device that replaces lr (>= 0, not checked): read by the kernel, so a
       captured CUDA graph follows a scheduler that changes it in place. lr is used in the state's precision. */
    const float *lr_device;
    /* The fused non-finite guard. NULL for none: every entry steps as computed, as torch.optim does. Else `count`
       int32 on the call's device, one per tensor, that the call writes (the caller need not clear them): an
       entry whose gradient (after grad_scale) is NaN, +-Inf or, with guard_limit > 0, of magnitude >= guard_limit
       keeps its parameter and state values, and its tensor's flag becomes 1; every other entry steps, and the
       step counters advance. Checked in the same pass as the update: no extra read, no host synchronization. */
    int32_t *guard_flags;
    double guard_limit; /* >= 0; 0 holds back NaN and Inf only (rounded down to the state's precision) */
} cgd_diag_hparams;

/* One tensor of a multi-tensor step. All pointers live on the call's device. */
typedef struct cgd_diag_tensor {
    void *param;        /* numel elements of the call's dtype, updated in place */
    const void *grad;   /* numel elements of the call's dtype */
    void *exp_avg;      /* M1, numel state values; may be NULL when beta1 == 0 and moment == CGD_MOMENT_RAW */
    void *exp_avg_sq;   /* M2 (or S for CGD_MOMENT_BELIEF), numel state values; may be NULL when power == 0 */
    double *step;       /* one double: steps taken so far; incremented by each step that is not skipped */
    int64_t numel;      /* >= 0; empty tensors are skipped, but their step still advances */
} cgd_diag_tensor;

/* Version string "MAJOR.MINOR.PATCH+cuda" or "+cpu". */
const char *cgd_version(void);

/* 1 when this build holds the CUDA kernels. */
int cgd_has_cuda(void);

/* Short name of a status ("CGD_ERR_INVALID_ARGUMENT"). */
const char *cgd_status_name(cgd_status status);

/* Message of the last failed call on this thread ("" after a success). */
const char *cgd_last_error(void);

/*
 * Threads the CPU kernels of the calling thread use, n >= 1 (others are ignored): OpenMP's, and OpenBLAS's when
 * the library is linked against it. The torch operators set it to torch.get_num_threads() before every CPU call,
 * so torch and torch-cgd never oversubscribe the cores.
 */
void cgd_set_cpu_threads(int n);

/*
 * Creates what later calls on `device` need from the calling thread (on CUDA: the current device's cuSOLVER and
 * cuBLAS handles, which allocate). Call it once before capturing a block or kron step in a CUDA graph; a step
 * captured without it fails with a message saying so. A no-op on the CPU.
 */
cgd_status cgd_prepare(cgd_device device);

/*
 * One diagonal CGD step over `count` tensors.
 *   grad_scale: NULL, or one float on the device: gradients are divided by it (AMP's GradScaler).
 *   skip:       NULL, or one float on the device: when it is nonzero the call changes nothing, not even the
 *               step counters (AMP's found_inf, or the flag cgd_nonfinite_check writes).
 * Both are read on the device, so no host synchronization is needed.
 */
cgd_status cgd_diag_step(const cgd_diag_hparams *hparams, cgd_dtype dtype, const cgd_diag_tensor *tensors,
                         int64_t count, const float *grad_scale, const float *skip, cgd_device device,
                         void *stream);

/*
 * Scans `count` arrays for values a step cannot take: NaN, Inf, and (limits non-NULL) any value of magnitude
 * >= limits[i] (> 0; INFINITY for none), to the rounding of the dtype: a gradient whose square would overflow
 * the state's second moments is as unusable as an Inf. flags[i] (int32, on the device) becomes 1 when data[i]
 * holds one and 0 otherwise; *found (one float on the device) becomes 1 when any does and 0 otherwise. Both are
 * written by this call; the caller need not clear them. Meant to feed `skip` of the next step without a host
 * round trip.
 */
cgd_status cgd_nonfinite_check(cgd_dtype dtype, const void *const *data, const int64_t *numels,
                               const double *limits, int64_t count, int32_t *flags, float *found, cgd_device device,
                               void *stream);

/* ---------------------------------------------------------------------------------------------------------
 * Full and block-diagonal CGD (paper eq 4.9): the metric is the whole matrix g = (eps I + C)^a with
 * C = M2 - F F^T (centered) or M2, M2 the EMA of g g^T. The parameters of a step form one vector, cut into
 * `nblocks` consecutive blocks of `block` coordinates; each block has its own matrices, so the metric is
 * block-diagonal (one block = the exact, full method). Per block, with t the step count plus one:
 *   g  <- grad / grad_scale, negated if maximize; 0 at padding coordinates (see cgd_block_tensor)
 *   M1 <- beta1 M1 + (1 - beta1) g                F = M1 / (1 - beta1^t)   (bias_correction, else M1)
 *   M2 <- beta2 M2 + (1 - beta2) g g^T            S = M2 / (1 - beta2^t)   (bias_correction, else M2)
 *   C  <- S - F F^T (centered) or S; with bias_correction the first step's S - F F^T is exactly 0 (S = g g^T,
 *         F = g), so that step takes C = S (the centered estimate needs a second gradient)
 *   on a refresh step: C = V diag(lambda) V^T,  P <- V diag((eps + max(lambda, 0))^-a) V^T
 *   p  <- p (1 - lr weight_decay) - lr P F       (decoupled weight decay)
 * Between refreshes the cached P is applied to the new F (the paper's method refreshes every step).
 *
 * With solver = CGD_SOLVER_LANCZOS (CPU) every step computes the direction (eps I + C)^-a F itself, by Lanczos on
 * the Krylov space of C and F (iterations of one O(block^2) product with M2 each, in double), instead of an
 * O(block^3) eigendecomposition: the paper's method at every step without P, and within the eigendecomposition's
 * accuracy (float32 state: the direction converged to 1e-7 relative, while rounding M2 to float32 already moves
 * it by more). P and eigvals are then not used (may be NULL), `refresh` is ignored, and a block whose Lanczos run
 * does not converge within CGD_LANCZOS_MAX_ITER = 256 iterations takes this step's eigendecomposition
 * (counted in counters[3]), whose failure falls to the diagonal metric.
 *
 * A refresh that fails (solver error or non-finite output) goes down a ladder and never corrupts the state:
 * the solver in the state's precision -> float64 solver (float32 state on the CPU only: on CUDA it would need a
 * host synchronisation) -> keep the block's previous P -> the diagonal metric diag((eps + max(C_ii, 0))^-a).
 * Each rung is counted.
 * --------------------------------------------------------------------------------------------------------- */

/* How a block step gets its direction (eps I + C)^-a F. */
typedef enum cgd_block_solver {
    CGD_SOLVER_EIGH = 0,   /* eigendecompose C on refresh steps, cache P = (eps I + C)^-a */
    CGD_SOLVER_LANCZOS = 1 /* every step, from C and F directly (CPU only) */
} cgd_block_solver;

typedef struct cgd_block_hparams {
    double lr;           /* >= 0 */
    double beta1;        /* [0, 1) */
    double beta2;        /* [0, 1) */
    double power;        /* a in [0, 1] */
    double eps;          /* >= 0; eps = 0 with a > 0 needs a positive definite C */
    double weight_decay; /* >= 0, decoupled */
    int32_t centered;
    int32_t bias_correction;
    int32_t maximize;
    int32_t refresh;     /* 1: eigendecompose C this step; 0: apply the cached P (CGD_SOLVER_EIGH) */
    int32_t solver;      /* cgd_block_solver; kron steps take CGD_SOLVER_EIGH only */
} cgd_block_hparams;

/* A tensor of a block step: its elements occupy [offset, offset + numel) of the blocked vector. Tensors are
   listed in increasing offset and do not overlap; coordinates no tensor covers are padding (gradient 0, so
   they never couple to real coordinates and their update is discarded). */
typedef struct cgd_block_tensor {
    void *param;       /* numel elements of the call's dtype */
    const void *grad;  /* numel elements of the call's dtype */
    int64_t numel;
    int64_t offset;
} cgd_block_tensor;

/* Block outcome codes, per block, of the last refresh. */
enum {
    CGD_BLOCK_NEVER = -1,  /* not refreshed yet: P is not valid */
    CGD_BLOCK_FP32 = 0,    /* the eigensolver of the state's precision (float32, or float64 for float64) */
    CGD_BLOCK_FP64 = 1,    /* float32 state: float32 failed, float64 succeeded */
    CGD_BLOCK_KEPT = 2,    /* the solvers failed: the previous P was kept */
    CGD_BLOCK_DIAGONAL = 3, /* failed with no previous P: P = diag((eps + max(C_ii, 0))^-a) */
    CGD_BLOCK_LANCZOS = 4   /* CGD_SOLVER_LANCZOS converged */
};

/* The state of one block step: arrays of state values (outcome int32, step float64, counters float32) on the
   call's device, owned by the caller. */
typedef struct cgd_block_state {
    int64_t block;       /* coordinates per block, >= 1 */
    int64_t nblocks;     /* >= 1 */
    void *exp_avg;       /* M1: nblocks * block */
    void *exp_avg_sq;    /* M2: nblocks * block * block, symmetric, both triangles kept */
    void *precond;       /* P: nblocks * block * block (CGD_SOLVER_EIGH) */
    void *eigvals;       /* nblocks * block: eigenvalues of C at the last refresh, ascending (diagonal of C
                            after a diagonal fallback, unchanged after a kept P) */
    double *step;        /* one double: steps taken */
    int32_t *outcome;    /* nblocks: CGD_BLOCK_* of the last refresh; initialise to CGD_BLOCK_NEVER */
    float *counters;     /* 4 floats, cumulative: float64 retries, kept P, diagonal fallbacks, Lanczos runs that
                            took the eigendecomposition */
} cgd_block_state;

/*
 * Bytes of workspace a cgd_block_step with these hparams (refresh matters), this dtype (float64 needs double
 * buffers) and this state's block layout needs
 * on `device`: written to *bytes. 0 on the CPU, whose kernels take their scratch from the heap, all of it before
 * they change anything. On CUDA this queries cuSOLVER, creating the handles as cgd_prepare does unless `stream`
 * (the step's) is being captured into a CUDA graph, where that is refused with a message.
 */
cgd_status cgd_block_workspace_size(const cgd_block_hparams *hparams, cgd_dtype dtype, const cgd_block_state *state,
                                    cgd_device device, void *stream, size_t *bytes);

/*
 * One full/block CGD step over `count` tensors forming one blocked vector. The first step must refresh.
 * grad_scale and skip are as in cgd_diag_step. workspace: at least cgd_block_workspace_size bytes on the
 * device, 256-byte aligned, used only for the duration of the step on `stream` (NULL when the size is 0). A
 * workspace that is too small is refused before anything changes. On CUDA the call uses cuSOLVER and cuBLAS
 * handles cached per thread and device; blocks of <= 32 are solved by syevjBatched, larger ones by
 * XsyevBatched, one call per chunk of blocks.
 */
cgd_status cgd_block_step(const cgd_block_hparams *hparams, cgd_dtype dtype, const cgd_block_tensor *tensors,
                          int64_t count, const cgd_block_state *state, const float *grad_scale, const float *skip,
                          void *workspace, size_t workspace_bytes, cgd_device device, void *stream);

/* ---------------------------------------------------------------------------------------------------------
 * Exact full CGD over a window of gradients (CPU): the full metric of a block step with nblocks = 1, for vectors
 * too long for an n x n M2. M2 = iota I + sum over the last `window` steps s of (1 - beta2) beta2^(t - s) g_s g_s^T:
 * the identity's coefficient iota (m2_init at the start, times beta2 per step) is exact, and so are the gradient
 * terms while t <= window; later the older terms, a fraction beta2^window of the EMA's weight, are dropped. C,
 * F, bias correction, centering (raw on a bias-corrected first step), the clamp at 0 and the update
 * p <- p (1 - lr wd) - lr (eps I + C)^-a F are the block step's; the direction is found exactly for that M2
 * through the window's Gram matrix (kernels/window_cpu.c): O(n window + window^3) per step, n (window + 1) state
 * values. hparams.refresh and hparams.solver are not read. An eigendecomposition that fails (only on non-finite
 * values) makes that step take C's diagonal, counted in counters[2].
 * --------------------------------------------------------------------------------------------------------- */

typedef struct cgd_window_state {
    int64_t n;         /* coordinates: the tensors laid end to end (cgd_block_tensor offsets), >= 1 */
    int64_t window;    /* gradients kept, 1 <= window <= 1024 */
    void *exp_avg;     /* M1: n state values */
    void *history;     /* window * n state values: the gradient of step s (1-based) in row (s - 1) mod window */
    double *gram;      /* window * window: entry (i, j) the dot product of history rows i and j (those filled) */
    double *identity;  /* one double: iota, M2's coefficient of I; initialise to m2_init */
    double *step;      /* one double: steps taken */
    float *counters;   /* 4 floats, as a block step's: [2] counts the steps that took C's diagonal */
} cgd_window_state;

/* One window step over `count` tensors with offsets in [0, n) (coordinates none covers take gradient 0);
   grad_scale and skip as in cgd_diag_step. The host scratch of a step is about 8 (5 m^2 + 2 n / 16384 m) bytes,
   m = window + 1 (42 MB at the largest window). CGD_ERR_UNSUPPORTED on CUDA, or when that scratch cannot be had
   (then nothing changed). */
cgd_status cgd_window_step(const cgd_block_hparams *hparams, cgd_dtype dtype, const cgd_block_tensor *tensors,
                           int64_t count, const cgd_window_state *state, const float *grad_scale, const float *skip,
                           cgd_device device);

/* ---------------------------------------------------------------------------------------------------------
 * Kronecker-factored CGD: the metric of block CGD for a whole matrix-shaped tensor, with the covariance of its
 * elements approximated by a Kronecker product. A tensor is read as a row-major rows x cols matrix G (a conv
 * weight as out_channels x the rest). Per tensor, with F = M1 (/ (1 - beta1^t)) as in a block step:
 *   M1 <- beta1 M1 + (1 - beta1) G
 *   Pl <- beta2 Pl + (1 - beta2) G G^T   (rows x rows)      Pr <- beta2 Pr + (1 - beta2) G^T G   (cols x cols)
 *   L  = Pl / bc2 - F F^T,  R = Pr / bc2 - F^T F   (centered, from a bias-corrected run's second step on; Pl / bc2
 *                                                    and Pr / bc2 otherwise)
 * L and R are the two partial traces of the full metric's C = M2 - vec(F) vec(F)^T, and C ~ (L (x) R) / tr(R)
 * is the Kronecker product with exactly those partial traces (equal to C whenever C is a Kronecker product).
 * Its eigenvectors are u_i (x) v_j and its eigenvalues mu_i nu_j / tr(R), so, with L = U diag(mu) U^T and
 * R = V diag(nu) V^T (both clamped at 0), the CGD direction (eps I + C)^-a vec(F) is exactly
 *   D = U [ (U^T F V) ./ (eps + mu_i nu_j / sum(nu))^a ] V^T,        p <- p (1 - lr wd) - lr D.
 * A side larger than the caller's limit keeps only the diagonal of its factor (its basis is the identity):
 * O(rows) state instead of O(rows^2). A factor's refresh goes down the ladder of the block step (the state's
 * precision, float64 on the CPU for float32 state, keep the previous basis, the factor's diagonal), with the
 * outcome per factor.
 * --------------------------------------------------------------------------------------------------------- */

/* One matrix of a Kronecker-factored step; every array holds state values (outcome int32, step float64,
   counters float32) on the call's device. */
typedef struct cgd_kron_tensor {
    void *param;          /* rows * cols elements of the call's dtype, row-major */
    const void *grad;
    int64_t rows, cols;   /* >= 1 each */
    int32_t left_full;    /* 1: the left factor is a full rows x rows matrix; 0: its diagonal only */
    int32_t right_full;   /* the same for the right factor (cols) */
    void *exp_avg;        /* M1: rows * cols (cgd_eigenbasis_step: U^T M1 V) */
    void *left_sq;        /* Pl: rows * rows when left_full, else its diagonal (rows) */
    void *right_sq;       /* Pr: cols * cols when right_full, else cols */
    void *left_basis;     /* U^T: rows * rows, row k = eigenvector k (the column-major U LAPACK and cuSOLVER
                             return); unused (may be NULL) when !left_full */
    void *right_basis;    /* V^T: cols * cols, likewise */
    void *left_eig;       /* rows: mu at the last refresh, ascending when left_full */
    void *right_eig;      /* cols: nu / sum(max(nu, 0)) at the last refresh (0 when the sum is 0) */
    double *step;         /* one double: steps taken */
    int32_t *outcome;     /* 2: CGD_BLOCK_* of the left and right factor's last refresh; start at CGD_BLOCK_NEVER */
    float *counters;      /* 3 floats, cumulative as in cgd_block_state */
    void *rotated_sq;     /* cgd_eigenbasis_step only: V, rows * cols, the second moment's diagonal in the
                             eigenbasis (NULL for cgd_kron_step) */
    int32_t may_be_first; /* cgd_eigenbasis_step on CUDA: nonzero when the caller cannot rule out that this is the
                             tensor's first step (a fresh state, or one whose steps so far may all have been
                             skipped on the device). Only such a call eigendecomposes the factors for a first
                             basis, which is kept only where the outcome is still CGD_BLOCK_NEVER; a tensor whose
                             outcome is NEVER must have it set. The CPU reads the outcome itself. */
} cgd_kron_tensor;

/* Bytes of workspace a cgd_kron_step of these tensors needs on `device` (as cgd_block_workspace_size; the
   tensors are stepped one after another, so it is the largest tensor's need, not the sum). */
cgd_status cgd_kron_workspace_size(const cgd_block_hparams *hparams, cgd_dtype dtype, const cgd_kron_tensor *tensors,
                                   int64_t count, cgd_device device, void *stream, size_t *bytes);

/*
 * One Kronecker-factored CGD step over `count` tensors, each with its own factors (hparams as for
 * cgd_block_step; `refresh` eigendecomposes every factor of the call). The first step must refresh. workspace
 * as for cgd_block_step, sized by cgd_kron_workspace_size.
 */
cgd_status cgd_kron_step(const cgd_block_hparams *hparams, cgd_dtype dtype, const cgd_kron_tensor *tensors,
                         int64_t count, const float *grad_scale, const float *skip, void *workspace,
                         size_t workspace_bytes, cgd_device device, void *stream);

/* ---------------------------------------------------------------------------------------------------------
 * CGD in the Kronecker eigenbasis: the kron step's factors give only the basis, U (x) V, and the metric is
 * diagonal in that basis with its own moments, as SOAP keeps Adam's (Vyas et al. 2024, arXiv 2409.11321). Per
 * rows x cols tensor, with Pl, Pr, F, bias corrections and the centered rule as in cgd_kron_step, and L, R the
 * factors a kron step eigendecomposes:
 *   G' = U^T G V,  F' = U^T F V,      V' <- beta2 V' + (1 - beta2) G'.^2   (rotated_sq)
 *   (exp_avg holds M1 in the eigenbasis, U^T M1 V, updated from G'; a refresh carries it into the new basis)
 *   C' = V' / bc2 - F'.^2 (centered) or V' / bc2, clamped at 0
 *   D  = U [ F' ./ (eps + C')^a ] V^T,      p <- p (1 - lr wd) - lr D
 * The basis is the one the factors had before this step's gradient (SOAP's order): a tensor's first step adds
 * G to Pl, Pr and eigendecomposes them (the kron ladder: float64 retry, then the identity); every later step
 * adds G after the update, and `refresh` then moves each full side's basis one power iteration, U <- qr(L U)
 * with U's columns first ordered by their Rayleigh quotients u^T L u, descending, and V' permuted with them
 * (SOAP's refresh); a non-finite L keeps the old basis (counted as kept). A side that is not full has the
 * identity basis and no factor (Pl, Pr and the eigenvalue arrays of that side are not touched), so a tensor
 * with neither is diagonal CGD. After a refresh the eigenvalue arrays hold the quotients, descending. With
 * a = 1/2, raw moments, Adam's start and eps -> 0 this is SOAP.
 * --------------------------------------------------------------------------------------------------------- */

/* Bytes of workspace a cgd_eigenbasis_step of these tensors needs on `device` (0 on the CPU; as
   cgd_kron_workspace_size). */
cgd_status cgd_eigenbasis_workspace_size(const cgd_block_hparams *hparams, cgd_dtype dtype,
                                         const cgd_kron_tensor *tensors, int64_t count, cgd_device device,
                                         void *stream, size_t *bytes);

/* One eigenbasis step over `count` tensors (every cgd_kron_tensor field used, rotated_sq included). grad_scale,
   skip, workspace and stream as in cgd_kron_step. On CUDA the step runs on the stream without a host
   synchronisation: cuBLAS products, cuSOLVER syevd for a first basis (no float64 retry: a failed solve takes the
   ladder's last rung, the factor's diagonal with the identity basis, counted) and geqrf/orgqr for a refresh. */
cgd_status cgd_eigenbasis_step(const cgd_block_hparams *hparams, cgd_dtype dtype, const cgd_kron_tensor *tensors,
                               int64_t count, const float *grad_scale, const float *skip, void *workspace,
                               size_t workspace_bytes, cgd_device device, void *stream);

/* ---------------------------------------------------------------------------------------------------------
 * Muon as a CGD step (Jordan et al. 2024; torch.optim.Muon): the force F is the momentum EMA and the metric
 * (F F^T)^(1/2) its own outer product's square root, so the direction (F F^T)^(-1/2) F is F's orthogonalisation
 * U V^T (F = U S V^T), approximated as Muon does by Newton-Schulz iterations. Per rows x cols matrix G (a conv
 * kernel as out_channels x the rest), with mu = momentum:
 *   B <- B + (1 - mu) (G - B)                  (torch's lerp: the EMA of the gradients)
 *   F = G + mu (B - G) (nesterov), else B
 *   X = F / max(||F||_F, eps), transposed when rows > cols so that X X^T is the smaller Gram matrix
 *   ns_steps times:  A = X X^T,  X <- a X + (b A + c A A) X
 *   p <- p (1 - lr weight_decay) - lr s X       s = sqrt(max(1, rows / cols)) (CGD_MUON_ORIGINAL) or
 *                                                   0.2 sqrt(max(rows, cols)) (CGD_MUON_MATCH_RMS_ADAMW)
 * With ns_bf16 every product's inputs and result, the normalisation and X are rounded to bfloat16 as
 * torch.optim.Muon computes them (in float32 arithmetic between roundings); else all in the state's precision.
 * With solver = CGD_MUON_EIGH the iteration is replaced by CGD's metric of the force's outer product at any
 * power a: X <- (eps I + X X^T)^-a X through the eigendecomposition of the smaller Gram matrix X X^T = W diag(l)
 * W^T (a = 1/2: Muon's exact orthogonalisation, which Newton-Schulz approximates); a failed eigendecomposition
 * (float32, then float64) leaves X as it is, the identity metric, counted in the tensor's counter.
 * On the CPU the products are BLAS gemm calls, one tensor per OpenMP thread; on CUDA cuBLAS GEMMs (bfloat16 in
 * and out with float32 accumulation under ns_bf16, as torch.optim.Muon runs them on a GPU) and cuSOLVER syevd,
 * one matrix after another on the stream, with no host synchronisation (CUDA's metric route has no float64
 * retry: a failed float32 solve keeps X, counted).
 * --------------------------------------------------------------------------------------------------------- */

typedef enum cgd_muon_scale {
    CGD_MUON_ORIGINAL = 0,       /* Keller Jordan's sqrt(max(1, rows / cols)) */
    CGD_MUON_MATCH_RMS_ADAMW = 1 /* Moonshot's 0.2 sqrt(max(rows, cols)) */
} cgd_muon_scale;

typedef enum cgd_muon_solver {
    CGD_MUON_NEWTON_SCHULZ = 0, /* ns_steps quintic iterations: a = 1/2 only */
    CGD_MUON_EIGH = 1           /* the eigendecomposition of X X^T: any power in [0, 1] */
} cgd_muon_solver;

typedef struct cgd_muon_hparams {
    double lr;           /* >= 0 */
    double momentum;     /* [0, 1) */
    double weight_decay; /* >= 0, decoupled */
    double ns_a, ns_b, ns_c;
    double eps;          /* > 0 */
    int32_t ns_steps;    /* [0, 100) */
    int32_t nesterov;
    int32_t scale;       /* cgd_muon_scale */
    int32_t ns_bf16;
    int32_t solver;      /* cgd_muon_solver */
    double power;        /* a in [0, 1]: 0.5 unless solver = CGD_MUON_EIGH */
} cgd_muon_hparams;

typedef struct cgd_muon_tensor {
    void *param;         /* rows * cols elements of the call's dtype, row-major */
    const void *grad;
    void *momentum;      /* B: rows * cols state values */
    int64_t rows, cols;  /* >= 1 each, each <= 46340 */
    float *failures;     /* one float, cumulative: failed eigendecompositions (CGD_MUON_EIGH; else may be NULL) */
} cgd_muon_tensor;

/* Bytes of workspace a cgd_muon_step of these matrices needs on `device` (0 on the CPU; on CUDA the largest
   matrix's need, as cgd_kron_workspace_size). */
cgd_status cgd_muon_workspace_size(const cgd_muon_hparams *hparams, cgd_dtype dtype, const cgd_muon_tensor *tensors,
                                   int64_t count, cgd_device device, void *stream, size_t *bytes);

/* One Muon step over `count` matrices. grad_scale and skip as in cgd_diag_step; workspace (device memory of
   workspace_bytes >= the size queried; NULL on the CPU) and stream as for cgd_kron_step. */
cgd_status cgd_muon_step(const cgd_muon_hparams *hparams, cgd_dtype dtype, const cgd_muon_tensor *tensors,
                         int64_t count, const float *grad_scale, const float *skip, void *workspace,
                         size_t workspace_bytes, cgd_device device, void *stream);

/* ---------------------------------------------------------------------------------------------------------
 * Induced (pull-back) metric (the induced-metric paper, Algorithms 1 and 2 and its RMS variant): the metric of the loss surface
 * embedded in one more dimension, g = gamma + xi grad grad^T, inverted by Sherman-Morrison. The step of every
 * parameter is scaled by one number r_t that depends on all parameters, so a step is three calls:
 *   cgd_induced_norm  per tensor list (one dtype):  sum += sum_i g_i (gamma^-1 g)_i     (caller zeroes sum first;
 *                     several calls, e.g. one per dtype, or an all-reduce across ranks, may add to it)
 *   cgd_induced_rate  once:  v <- beta v + (1 - beta) xi sum,  v_hat = v / (1 - beta^t),
 *                     r = 1 / (1 + |v_hat|)  (embedding L)   or   r = L / (L^2 + |v_hat|)  (embedding log L)
 *   cgd_induced_step  per tensor list:  M1 <- mu M1 + (1 - mu) g,  p <- p (1 - lr wd) - lr r gamma^-1 M1 / (1 - mu^t)
 * gamma^-1 is the identity (CGD_GAMMA_IDENTITY: the SGD metric) or RMSProp's, 1 / (sqrt(M2 / (1 - beta_rms^t)) +
 * eps) with M2 <- beta_rms M2 + (1 - beta_rms) g^2 updated by cgd_induced_norm (CGD_GAMMA_RMS; xi = 0 is AdamW).
 * Everything stays on the device: no host synchronisation, so the three calls can be captured in a CUDA graph.
 * The norm is summed in a fixed order (fixed-size chunks in tensor order, then the chunks in order), so it is
 * bit-reproducible run to run on one device.
 * --------------------------------------------------------------------------------------------------------- */

typedef enum cgd_induced_gamma { CGD_GAMMA_IDENTITY = 0, CGD_GAMMA_RMS = 1 } cgd_induced_gamma;

typedef enum cgd_induced_embedding { CGD_EMBED_LOSS = 0, CGD_EMBED_LOG_LOSS = 1 } cgd_induced_embedding;

/* Per tensor list (parameter group). */
typedef struct cgd_induced_hparams {
    double lr;           /* >= 0 */
    double momentum;     /* mu in [0, 1) */
    double beta_rms;     /* [0, 1), CGD_GAMMA_RMS only */
    double eps;          /* > 0 with CGD_GAMMA_RMS */
    double weight_decay; /* >= 0, decoupled */
    int32_t gamma;       /* cgd_induced_gamma */
    int32_t maximize;
    const float *lr_device; /* NULL, or one float on the device replacing lr, as in cgd_diag_hparams */
} cgd_induced_hparams;

/* Once per optimizer: the metric's own coefficients. */
typedef struct cgd_induced_metric {
    double xi;           /* >= 0 */
    double beta;         /* [0, 1): EMA of xi * sum */
    int32_t embedding;   /* cgd_induced_embedding */
} cgd_induced_metric;

/*
 * Tensors are cgd_diag_tensor: param (unused by cgd_induced_norm, may be NULL there), grad, exp_avg (M1),
 * exp_avg_sq (M2, CGD_GAMMA_RMS only), step (per tensor, advanced by cgd_induced_step), numel.
 * sum, rate: one double each on the device. grad_scale and skip as in cgd_diag_step. cgd_induced_norm's
 * workspace holds its per-chunk partial sums (the deterministic order): cgd_induced_norm_workspace_size bytes.
 */
cgd_status cgd_induced_norm_workspace_size(const cgd_diag_tensor *tensors, int64_t count, cgd_device device,
                                           size_t *bytes);

cgd_status cgd_induced_norm(const cgd_induced_hparams *hparams, cgd_dtype dtype, const cgd_diag_tensor *tensors,
                            int64_t count, double *sum, const float *grad_scale, const float *skip, void *workspace,
                            size_t workspace_bytes, cgd_device device, void *stream);

/* norm_ema (v) and norm_step, one double each: the optimizer's state; loss: one double, needed (> 0) with
   CGD_EMBED_LOG_LOSS, else NULL; a non-positive loss there makes rate NaN (the Python layer refuses it first). */
cgd_status cgd_induced_rate(const cgd_induced_metric *metric, const double *sum, const double *loss, double *norm_ema,
                            double *norm_step, double *rate, const float *skip, cgd_device device, void *stream);

cgd_status cgd_induced_step(const cgd_induced_hparams *hparams, cgd_dtype dtype, const cgd_diag_tensor *tensors,
                            int64_t count, const double *rate, const float *grad_scale, const float *skip,
                            cgd_device device, void *stream);

#ifdef __cplusplus
}
#endif

#endif /* CGD_H */
