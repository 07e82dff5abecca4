/*
 * CUDA side of Kronecker-factored CGD and of CGD in the Kronecker eigenbasis (cgd.h, cgd_kron_step and
 * cgd_eigenbasis_step; the latter's sequence is described where it starts below). Tensor by tensor, on the
 * caller's stream and without a host synchronisation:
 *   prepare   g = grad / scale (negated to maximize), M1 <- beta1 M1 + (1 - beta1) g, F = M1 / bc1
 *   factors   a full side: Gram matrix by cuBLAS GEMM into a workspace, then an EMA kernel (so a skipped step
 *             changes nothing); a diagonal side: row or column sums of squares in one kernel
 *   refresh   C = Pf / bc2 - Gram(F); a C holding NaN or Inf is replaced by the identity before cuSOLVER syevd
 *             (the solver never sees it) and marked failed; then a check and a commit kernel that write the basis
 *             and eigenvalues, or keep the previous ones, or fall back to the factor's diagonal
 *   apply     four GEMMs (into and out of the eigenbasis) around an elementwise scaling, then the update
 * The buffers are row-major; cuBLAS is column-major, so each GEMM below is written for the transposes (a
 * row-major rows x cols X is the column-major cols x rows X^T with leading dimension cols). GEMMs use cuBLAS's
 * 64-bit API: a diagonal side may exceed 2^31 elements. Buffers are carved from the caller's workspace, sized
 * for the largest tensor and reused by each in turn; the step allocates nothing.
 * Each tensor costs about a dozen launches; the float64 retry rung of the CPU ladder is left out (it would
 * need the solver's status on the host).
 */
#include <math.h>

#include "cuda_solver.cuh"
#include "kernels.h"
#include "multi_tensor.cuh"

namespace {

/* The cgd.h structs hold state as void *: here it is the build's real type. */
inline cgd_real *real_ptr(void *p) { return static_cast<cgd_real *>(p); }

__device__ cgd_real inv_bias(double beta, const double *step, int bias_correction) {
    return bias_correction ? (cgd_real)(1.0 / (1.0 - pow(beta, *step + 1.0))) : CGD_R(1.0);
}

/* F is written even on a skipped step (from the unchanged M1): the refresh and apply read it regardless. */
template <int DT>
__global__ void prepare_kernel(const void *grad, cgd_real *g, cgd_real *m1, cgd_real *F, int64_t numel, cgd_real beta1,
                               cgd_real w1, double beta1_d, int bias_correction, int maximize, const double *step,
                               const float *grad_scale, const float *skip) {
    bool skip_step = cgd_skipped(skip);
    cgd_real scale = grad_scale ? (cgd_real)*grad_scale : CGD_R(1.0),
             inv_bc1 = inv_bias(beta1_d, step, bias_correction);
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < numel; e += (int64_t)gridDim.x * blockDim.x) {
        cgd_real v = load1<DT>(grad, e) / scale;
        v = maximize ? -v : v;
        g[e] = v;
        cgd_real m = skip_step ? m1[e] : beta1 * m1[e] + w1 * v;
        if (!skip_step) m1[e] = m;
        F[e] = m * inv_bc1;
    }
}

/* Diagonal of X X^T (left: one CUDA block per row) or X^T X (right: one thread per column) of the row-major
   rows x cols X: out = scale_old * out + w * sum (an EMA of the state, skipped with the step), or with
   scale_old = 0 just w * sum (a workspace, written even on a skipped step). The sums run in double, as the CPU
   kernel's: a side may be 2^31 long, where a float sum stops growing. */
__global__ void diag_gram_kernel(cgd_real *out, const cgd_real *X, int64_t rows, int64_t cols, int left,
                                 cgd_real scale_old, cgd_real w, int ema, const float *skip) {
    if (ema && cgd_skipped(skip)) return;
    if (left) {
        __shared__ double partial[CGD_SOLVER_THREADS];
        for (int64_t i = blockIdx.x; i < rows; i += gridDim.x) {
            double sum = 0.0;
            for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) sum += (double)X[i * cols + j] * X[i * cols + j];
            partial[threadIdx.x] = sum;
            __syncthreads();
            for (int s = blockDim.x / 2; s > 0; s >>= 1) {
                if ((int)threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
                __syncthreads();
            }
            if (threadIdx.x == 0) out[i] = (ema ? scale_old * out[i] : CGD_R(0.0)) + w * (cgd_real)partial[0];
            __syncthreads();
        }
        return;
    }
    for (int64_t j = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; j < cols; j += (int64_t)gridDim.x * blockDim.x) {
        double sum = 0.0;
        for (int64_t i = 0; i < rows; ++i) sum += (double)X[i * cols + j] * X[i * cols + j];
        out[j] = (ema ? scale_old * out[j] : CGD_R(0.0)) + w * (cgd_real)sum;
    }
}

__global__ void ema_kernel(cgd_real *state, const cgd_real *fresh, int64_t n, cgd_real beta2, cgd_real w2,
                           const float *skip) {
    if (cgd_skipped(skip)) return;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x)
        state[e] = beta2 * state[e] + w2 * fresh[e];
}

/* A <- Pf / bc2 + A (A holds -Gram(F) when centered, is ignored otherwise); the diagonal is copied to cdiag
   for the fallback, since the solver overwrites A. A diagonal side has n values and no matrix. */
__global__ void build_factor_kernel(cgd_real *A, cgd_real *cdiag, const cgd_real *sq, int64_t n, int full, int centered,
                                    double beta2_d, int bias_correction, const double *step) {
    cgd_real inv_bc2 = inv_bias(beta2_d, step, bias_correction);
    centered = centered && cgd_variance_has_data(bias_correction, *step);
    int64_t total = full ? n * n : n;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        cgd_real c = sq[e] * inv_bc2 + (centered ? A[e] : CGD_R(0.0));
        A[e] = c;
        if (!full) cdiag[e] = c;
        else if (e / n == e % n) cdiag[e / n] = c;
    }
}

/* bad |= the solve failed or left a non-finite value. */
__global__ void check_kernel(int *bad, const int *info, const cgd_real *vecs, const cgd_real *values, int64_t n,
                             int full) {
    int64_t total = full ? n * n : 0;
    int local = 0;
    if (blockIdx.x == 0 && threadIdx.x == 0 && info) local |= *info != 0;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total + n;
         e += (int64_t)gridDim.x * blockDim.x)
        local |= e < total ? !isfinite(vecs[e]) : !isfinite(values[e - total]);
    if (local) atomicOr(bad, 1);
}

/* Writes the new basis and eigenvalues, or keeps the old ones, or falls back to the factor's diagonal (with the
   identity basis). It only reads the outcome: settle_kernel, after it, writes the new one. */
__global__ void commit_kernel(cgd_real *basis, cgd_real *eig, const int32_t *outcome, const cgd_real *vecs,
                              const cgd_real *values, const cgd_real *cdiag, const int *bad, int64_t n, int full,
                              const float *skip) {
    if (cgd_skipped(skip) || (*bad && *outcome != CGD_BLOCK_NEVER)) return;
    int64_t stride = (int64_t)gridDim.x * blockDim.x, start = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (!*bad) {
        for (int64_t e = start; full && e < n * n; e += stride) basis[e] = vecs[e];
        for (int64_t k = start; k < n; k += stride) eig[k] = values[k];
        return;
    }
    for (int64_t e = start; full && e < n * n; e += stride) basis[e] = e / n == e % n ? CGD_R(1.0) : CGD_R(0.0);
    for (int64_t k = start; k < n; k += stride) eig[k] = isfinite(cdiag[k]) ? cdiag[k] : CGD_R(0.0);
}

__global__ void settle_kernel(int32_t *outcome, float *counters, const int *bad, const float *skip) {
    if (cgd_skipped(skip)) return;
    if (!*bad) {
        *outcome = CGD_BLOCK_FP32;
    } else if (*outcome != CGD_BLOCK_NEVER) {
        *outcome = CGD_BLOCK_KEPT;
        counters[1] += 1.0f;
    } else {
        *outcome = CGD_BLOCK_DIAGONAL;
        counters[2] += 1.0f;
    }
}

/* Right side: nu <- nu / sum(max(nu, 0)) unless the previous values were kept (they are normalised already). */
__global__ void normalise_kernel(cgd_real *eig, int64_t n, const int32_t *outcome, const float *skip) {
    if (cgd_skipped(skip) || *outcome == CGD_BLOCK_KEPT) return;
    __shared__ double partial[CGD_SOLVER_THREADS];
    double sum = 0.0;
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x) sum += eig[k] > CGD_R(0.0) ? eig[k] : CGD_R(0.0);
    partial[threadIdx.x] = sum;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
        __syncthreads();
    }
    double total = partial[0];
    for (int64_t k = threadIdx.x; k < n; k += blockDim.x)
        eig[k] = total > 0.0 ? (cgd_real)(eig[k] / total) : CGD_R(0.0);
}

__global__ void scale_kernel(cgd_real *Z, const cgd_real *mu, const cgd_real *nu, int64_t rows, int64_t cols,
                             cgd_real eps, cgd_real power) {
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < rows * cols;
         e += (int64_t)gridDim.x * blockDim.x) {
        cgd_real m = cgd_rfmax(mu[e / cols], CGD_R(0.0)), v = cgd_rfmax(nu[e % cols], CGD_R(0.0));
        Z[e] *= cgd_rpow(eps + m * v, -power);
    }
}

template <int DT>
__global__ void update_kernel(void *param, const cgd_real *D, int64_t numel, cgd_real lr, cgd_real decay, double *step,
                              const float *skip) {
    if (cgd_skipped(skip)) return;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < numel; e += (int64_t)gridDim.x * blockDim.x)
        store1<DT>(param, e, load1<DT>(param, e) * decay - lr * D[e]);
    if (blockIdx.x == 0 && threadIdx.x == 0) *step += 1.0;
}

template <int DT>
void launch_prepare(const cgd_kron_tensor &t, cgd_real *g, cgd_real *F, const cgd_block_hparams *h,
                    const float *grad_scale, const float *skip, cudaStream_t stream) {
    int64_t numel = t.rows * t.cols;
    prepare_kernel<DT><<<cgd_grid_for(numel), CGD_SOLVER_THREADS, 0, stream>>>(
        t.grad, g, real_ptr(t.exp_avg), F, numel, (cgd_real)h->beta1, (cgd_real)(1.0 - h->beta1), h->beta1,
        h->bias_correction, h->maximize, t.step, grad_scale, skip);
}

template <int DT>
void launch_update(const cgd_kron_tensor &t, const cgd_real *D, const cgd_block_hparams *h, const float *skip,
                   cudaStream_t stream) {
    int64_t numel = t.rows * t.cols;
    update_kernel<DT><<<cgd_grid_for(numel), CGD_SOLVER_THREADS, 0, stream>>>(
        t.param, D, numel, (cgd_real)h->lr, (cgd_real)(1.0 - h->lr * h->weight_decay), t.step, skip);
}

/* Gram matrix of one side into out (full: n x n, symmetric so its layout is moot): left X X^T, right X^T X. */
cublasStatus_t gram(cublasHandle_t blas, const cgd_real *X, int64_t rows, int64_t cols, int left, cgd_real alpha,
                    cgd_real *out) {
    const cgd_real zero = CGD_R(0.0);
    const int64_t m = rows, n = cols;
    /* Column-major, X is X^T (n x m, ld n): X X^T = (X^T)^T X^T, X^T X = X^T (X^T)^T. */
    if (left) return cgd_gemm_64(blas, CUBLAS_OP_T, CUBLAS_OP_N, m, m, n, &alpha, X, n, X, n, &zero, out, m);
    return cgd_gemm_64(blas, CUBLAS_OP_N, CUBLAS_OP_T, n, n, m, &alpha, X, n, X, n, &zero, out, n);
}

/* The workspace of one step, sized for the largest tensor (carved, or only sized with a null workspace). */
struct KronBuffers {
    cgd_real *g, *F, *Y, *Z; /* one tensor's elements: gradient, force, two scratch matrices */
    cgd_real *A, *cdiag;     /* one factor (n^2, or n when diagonal) and its diagonal */
    cgd_real *work;          /* syevd's work for the largest full factor */
    int *info, *bad;
    int lwork;
};

int kron_layout(CgdHandles *hd, const cgd_block_hparams *h, const cgd_kron_tensor *tensors, int64_t count,
                void *workspace, KronBuffers *b, size_t *bytes, CgdFailure &fail) {
    int64_t numel = 1, factor = 1, side = 1, full_side = 0;
    for (int64_t i = 0; i < count; ++i) {
        const cgd_kron_tensor &t = tensors[i];
        const int64_t left = t.left_full ? t.rows * t.rows : t.rows, right = t.right_full ? t.cols * t.cols : t.cols;
        numel = t.rows * t.cols > numel ? t.rows * t.cols : numel;
        factor = left > factor ? left : factor;
        factor = right > factor ? right : factor;
        side = t.rows > side ? t.rows : side;
        side = t.cols > side ? t.cols : side;
        if (t.left_full && t.rows > full_side) full_side = t.rows;
        if (t.right_full && t.cols > full_side) full_side = t.cols;
    }
    CgdCarver carve(workspace);
    *b = KronBuffers{};
    b->g = carve.take<cgd_real>((size_t)numel);
    b->F = carve.take<cgd_real>((size_t)numel);
    b->Y = carve.take<cgd_real>((size_t)numel);
    b->Z = carve.take<cgd_real>((size_t)numel);
    b->A = carve.take<cgd_real>((size_t)factor);
    b->cdiag = carve.take<cgd_real>((size_t)side);
    b->info = carve.take<int>(1);
    b->bad = carve.take<int>(1);
    if (h->refresh && full_side > 0) {
        /* syevd's workspace grows with n, so the largest factor's serves every smaller one. */
        SOLVER_TRY(cgd_syevd_bufferSize(hd->solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, (int)full_side,
                                        b->A, (int)full_side, b->Y, &b->lwork));
        b->work = carve.take<cgd_real>((size_t)(b->lwork > 0 ? b->lwork : 1));
    }
    *bytes = carve.used;
done:
    return fail.code;
}

/* ---- CGD in the Kronecker eigenbasis (cgd_eigenbasis_step) ----
 * One sequence serves a tensor's first step and the later ones, because which it is lies on the device (its
 * outcome): the full factors take G first (on a later step their update does not touch this step's basis, so
 * the order is free); where the caller says the step may be the first, the factors are eigendecomposed and the
 * basis committed only if the outcome is still NEVER; then G' = U^T G V with the basis as it now is, and the
 * moments M1' <- beta1 M1' + (1 - beta1) G' (a first step's M1' is 0, so this is the rotated (1 - beta1) G the
 * CPU kernel forms); a refresh commits only on a later step. Every state write is also held back by `skip`.
 */

/* g = grad / scale (negated to maximize), and the force F = (1 - beta1) g / bc1 of a first step (its M1 starts
   at 0); nothing here is state, so a skipped step writes them too. */
template <int DT>
__global__ void eigen_prepare_kernel(const void *grad, cgd_real *g, cgd_real *F, int64_t numel, cgd_real beta1,
                                     cgd_real w1, double beta1_d, int bias_correction, int maximize,
                                     const double *step, const float *grad_scale) {
    const cgd_real scale = grad_scale ? (cgd_real)*grad_scale : CGD_R(1.0);
    const cgd_real inv_bc1 = inv_bias(beta1_d, step, bias_correction);
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < numel; e += (int64_t)gridDim.x * blockDim.x) {
        cgd_real v = load1<DT>(grad, e) / scale;
        v = maximize ? -v : v;
        g[e] = v;
        F[e] = (beta1 * CGD_R(0.0) + w1 * v) * inv_bc1;
    }
}

/* *first = neither side has an outcome yet, read before anything of this step commits. */
__global__ void first_kernel(int *first, const int32_t *outcome) {
    *first = outcome[0] == CGD_BLOCK_NEVER && outcome[1] == CGD_BLOCK_NEVER;
}

/* A first step's basis of a full side: the eigenvectors in descending order of their eigenvalues (the order the
   refreshes keep), or where the solve failed the identity and the factor's diagonal, reversed alike (as the CPU
   kernel reverses whatever the ladder gave, so a later refresh breaks ties between quotients the same way). */
__global__ void first_commit_kernel(cgd_real *basis, cgd_real *eig, const cgd_real *vecs, const cgd_real *values,
                                    const cgd_real *cdiag, const int *bad, const int *first, int64_t n,
                                    const float *skip) {
    if (cgd_skipped(skip) || !*first) return;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x, start = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    for (int64_t e = start; e < n * n; e += stride) {
        const int64_t k = e / n, i = e % n;
        basis[e] = *bad ? (i == n - 1 - k ? CGD_R(1.0) : CGD_R(0.0)) : vecs[(n - 1 - k) * n + i];
    }
    for (int64_t k = start; k < n; k += stride) {
        const cgd_real c = cdiag[n - 1 - k];
        eig[k] = *bad ? (isfinite(c) ? c : CGD_R(0.0)) : values[n - 1 - k];
    }
}

/* A first step's outcome of one side: solved, the diagonal fallback (counted), or for a side that is not full
   (bad = NULL) its identity basis. */
__global__ void first_settle_kernel(int32_t *outcome, float *counters, const int *bad, const int *first,
                                    const float *skip) {
    if (cgd_skipped(skip) || !*first) return;
    const bool failed = bad && *bad;
    *outcome = failed ? CGD_BLOCK_DIAGONAL : CGD_BLOCK_FP32;
    if (failed) counters[2] += 1.0f;
}

/* V' <- beta2 V' + (1 - beta2) G'^2, M1' <- beta1 M1' + (1 - beta1) G', and F' = M1' / bc1 into D. */
__global__ void eigen_moments_kernel(cgd_real *V, cgd_real *m1, const cgd_real *Gr, cgd_real *D, int64_t numel,
                                     cgd_real beta1, cgd_real w1, cgd_real beta2, cgd_real w2, double beta1_d,
                                     int bias_correction, const double *step, const float *skip) {
    const bool skipped = cgd_skipped(skip);
    const cgd_real inv_bc1 = inv_bias(beta1_d, step, bias_correction);
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < numel; e += (int64_t)gridDim.x * blockDim.x) {
        const cgd_real gp = Gr[e];
        if (!skipped) {
            V[e] = beta2 * V[e] + w2 * (gp * gp);
            m1[e] = beta1 * m1[e] + w1 * gp;
        }
        D[e] = m1[e] * inv_bc1;
    }
}

/* D <- D ./ (eps + C')^a, C' = V' / bc2 (- D.^2 when centered) clamped at 0. */
__global__ void eigen_scale_kernel(cgd_real *D, const cgd_real *V, int64_t numel, cgd_real eps, cgd_real power,
                                   int centered, double beta2_d, int bias_correction, const double *step) {
    const cgd_real inv_bc2 = inv_bias(beta2_d, step, bias_correction);
    centered = centered && cgd_variance_has_data(bias_correction, *step);
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < numel; e += (int64_t)gridDim.x * blockDim.x) {
        const cgd_real c = V[e] * inv_bc2 - (centered ? D[e] * D[e] : CGD_R(0.0));
        D[e] *= cgd_rpow(eps + cgd_rfmax(c, CGD_R(0.0)), -power);
    }
}

/* out = x / bc1 (the refresh's F in the original space, from M1 there). */
__global__ void bias_kernel(cgd_real *out, const cgd_real *x, int64_t numel, double beta1_d, int bias_correction,
                            const double *step) {
    const cgd_real inv_bc1 = inv_bias(beta1_d, step, bias_correction);
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < numel; e += (int64_t)gridDim.x * blockDim.x)
        out[e] = x[e] * inv_bc1;
}

/* q_k = u_k^T L u_k in double, from Y whose row k is (L u_k)^T (row k of the basis is u_k). */
__global__ void rayleigh_kernel(double *q, const cgd_real *basis, const cgd_real *Y, int64_t n) {
    for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n; k += (int64_t)gridDim.x * blockDim.x) {
        double sum = 0.0;
        for (int64_t i = 0; i < n; ++i) sum += (double)basis[k * n + i] * Y[k * n + i];
        q[k] = sum;
    }
}

/* order[r] = the index of the r-th largest quotient; ties keep their index order (the CPU kernel's sort). A NaN
   (an overflowed product, which the QR check then refuses) ranks as -Inf, so order stays a permutation. */
__global__ void rank_kernel(int *order, const double *q, int64_t n) {
    for (int64_t k = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; k < n; k += (int64_t)gridDim.x * blockDim.x) {
        const double qk = isnan(q[k]) ? -INFINITY : q[k];
        int64_t r = 0;
        for (int64_t j = 0; j < n; ++j) {
            const double qj = isnan(q[j]) ? -INFINITY : q[j];
            r += qj > qk || (qj == qk && j < k);
        }
        order[r] = (int)k;
    }
}

/* Q's row r = Y's row order[r]: the rows of the row-major Q are the columns LAPACK's QR orthonormalises. */
__global__ void permute_rows_kernel(cgd_real *Q, const cgd_real *Y, const int *order, int64_t n) {
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n * n; e += (int64_t)gridDim.x * blockDim.x)
        Q[e] = Y[(int64_t)order[e / n] * n + e % n];
}

/* bad |= a failed QR (geqrf or orgqr info) or a non-finite Q. */
__global__ void qr_check_kernel(int *bad, const int *info, const cgd_real *Q, int64_t n) {
    int local = 0;
    if (blockIdx.x == 0 && threadIdx.x == 0) local |= info[0] != 0 || info[1] != 0;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n * n; e += (int64_t)gridDim.x * blockDim.x)
        local |= !isfinite(Q[e]);
    if (local) atomicOr(bad, 1);
}

/* Whether a refresh of this side commits: a later step, not skipped, with a finite factor and QR. */
__device__ __forceinline__ bool refresh_commits(const int *bad, const int *first, const float *skip) {
    return !cgd_skipped(skip) && !*first && !*bad;
}

/* The refreshed basis, its quotients (descending), and T = V' permuted with them (rows for the left side,
   columns for the right), which refresh_copy_kernel then makes V'. */
__global__ void refresh_commit_kernel(cgd_real *basis, cgd_real *eig, const cgd_real *Q, const double *q,
                                      const int *order, const cgd_real *V, cgd_real *T, int64_t rows, int64_t cols,
                                      int left, int64_t n, const int *bad, const int *first, const float *skip) {
    if (!refresh_commits(bad, first, skip)) return;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x, start = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    for (int64_t e = start; e < n * n; e += stride) basis[e] = Q[e];
    for (int64_t k = start; k < n; k += stride) eig[k] = (cgd_real)q[order[k]];
    for (int64_t e = start; e < rows * cols; e += stride) {
        const int64_t i = e / cols, j = e % cols;
        T[e] = left ? V[(int64_t)order[i] * cols + j] : V[i * cols + order[j]];
    }
}

__global__ void refresh_copy_kernel(cgd_real *V, const cgd_real *T, int64_t numel, const int *bad, const int *first,
                                    const float *skip) {
    if (!refresh_commits(bad, first, skip)) return;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < numel; e += (int64_t)gridDim.x * blockDim.x)
        V[e] = T[e];
}

/* A later step's refresh outcome: refreshed, or the old basis kept (counted). */
__global__ void refresh_settle_kernel(int32_t *outcome, float *counters, const int *bad, const int *first,
                                      const float *skip) {
    if (cgd_skipped(skip) || *first) return;
    *outcome = *bad ? CGD_BLOCK_KEPT : CGD_BLOCK_FP32;
    if (*bad) counters[1] += 1.0f;
}

/* M1' <- the refreshed M1 in the new basis, on a later step that was not skipped. */
__global__ void select_kernel(cgd_real *m1, const cgd_real *fresh, int64_t numel, const int *first,
                              const float *skip) {
    if (cgd_skipped(skip) || *first) return;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < numel; e += (int64_t)gridDim.x * blockDim.x)
        m1[e] = fresh[e];
}

/* out = U^T X V (in) or U X V^T (!in) for the row-major rows x cols X, through tmp (tmp != out, tmp != X; X may
   be out); a side that is not full has the identity basis. */
int rotate(CgdHandles *hd, const cgd_kron_tensor &t, const cgd_real *X, bool in, cgd_real *tmp, cgd_real *out,
           cudaStream_t stream, CgdFailure &fail) {
    const cgd_real one = CGD_R(1.0), zero = CGD_R(0.0);
    const int64_t m = t.rows, n = t.cols;
    const cgd_real *U = real_ptr(t.left_basis), *V = real_ptr(t.right_basis), *cur = X;
    if (t.left_full) { /* in: Y^T = X^T U, Y = U^T X; out: Y^T = X^T U^T, Y = U X */
        SOLVER_TRY(cgd_gemm_64(hd->blas, CUBLAS_OP_N, in ? CUBLAS_OP_N : CUBLAS_OP_T, n, m, m, &one, cur, n, U, m,
                               &zero, tmp, n));
        cur = tmp;
    }
    if (t.right_full) { /* in: Z^T = V^T Y^T, Z = Y V; out: Z^T = V Y^T, Z = Y V^T */
        cgd_real *dst = cur == out ? tmp : out;
        SOLVER_TRY(cgd_gemm_64(hd->blas, in ? CUBLAS_OP_T : CUBLAS_OP_N, CUBLAS_OP_N, n, m, n, &one, V, n, cur, n,
                               &zero, dst, n));
        cur = dst;
    }
    if (cur != out)
        CUDA_TRY(cudaMemcpyAsync(out, cur, (size_t)(m * n) * sizeof(cgd_real), cudaMemcpyDeviceToDevice, stream));
done:
    return fail.code;
}

/* The workspace of one eigenbasis step, sized for the largest tensor. */
struct EigenBuffers {
    cgd_real *g, *F, *E, *Y, *Z, *D; /* one tensor's elements */
    cgd_real *A, *C2, *Q;            /* one full factor each (n^2) */
    cgd_real *cdiag, *values, *tau;  /* a full side's n */
    double *q;
    int *order, *info, *bad, *first;
    cgd_real *work;
    int lwork;
};

int eigen_layout(CgdHandles *hd, const cgd_block_hparams *h, const cgd_kron_tensor *tensors, int64_t count,
                 void *workspace, EigenBuffers *b, size_t *bytes, CgdFailure &fail) {
    int64_t numel = 1, full_side = 1;
    bool first = false;
    for (int64_t i = 0; i < count; ++i) {
        const cgd_kron_tensor &t = tensors[i];
        numel = t.rows * t.cols > numel ? t.rows * t.cols : numel;
        if (t.left_full && t.rows > full_side) full_side = t.rows;
        if (t.right_full && t.cols > full_side) full_side = t.cols;
        first = first || t.may_be_first;
    }
    CgdCarver carve(workspace);
    *b = EigenBuffers{};
    cgd_real **elements[] = {&b->g, &b->F, &b->E, &b->Y, &b->Z, &b->D};
    for (cgd_real **e : elements) *e = carve.take<cgd_real>((size_t)numel);
    b->A = carve.take<cgd_real>((size_t)(full_side * full_side));
    b->C2 = carve.take<cgd_real>((size_t)(full_side * full_side));
    b->Q = carve.take<cgd_real>((size_t)(full_side * full_side));
    b->cdiag = carve.take<cgd_real>((size_t)full_side);
    b->values = carve.take<cgd_real>((size_t)full_side);
    b->tau = carve.take<cgd_real>((size_t)full_side);
    b->q = carve.take<double>((size_t)full_side);
    b->order = carve.take<int>((size_t)full_side);
    b->info = carve.take<int>(3);
    b->bad = carve.take<int>(1);
    b->first = carve.take<int>(1);
    {
        /* the solvers' workspace grows with n, so the largest full side's serves every smaller one */
        const int N = (int)full_side;
        int need = 0, lw = 0;
        if (first) SOLVER_TRY(cgd_syevd_bufferSize(hd->solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, N,
                                                   b->A, N, b->values, &need));
        if (h->refresh) {
            SOLVER_TRY(cgd_geqrf_bufferSize(hd->solver, N, N, b->Q, N, &lw));
            need = lw > need ? lw : need;
            SOLVER_TRY(cgd_orgqr_bufferSize(hd->solver, N, N, N, b->Q, N, b->tau, &lw));
            need = lw > need ? lw : need;
        }
        b->lwork = need;
        b->work = carve.take<cgd_real>((size_t)(need > 0 ? need : 1));
    }
    *bytes = carve.used;
done:
    return fail.code;
}

/* b.A = C = Pf / bc2 - (centered ? Gram(F) : 0) of one full side (F the force in the original space), its
   diagonal in b.cdiag, b.bad = C holds NaN or Inf, and in that case b.A the identity, so a solver never sees it:
   what both the first basis and a refresh decompose. */
int screened_factor(CgdHandles *hd, const cgd_block_hparams *h, const cgd_kron_tensor &t, int left,
                    const cgd_real *F, const EigenBuffers &b, cudaStream_t stream, CgdFailure &fail) {
    const int64_t n = left ? t.rows : t.cols;
    if (h->centered) SOLVER_TRY(gram(hd->blas, F, t.rows, t.cols, left, -CGD_R(1.0), b.A));
    build_factor_kernel<<<cgd_grid_for(n * n), CGD_SOLVER_THREADS, 0, stream>>>(
        b.A, b.cdiag, real_ptr(left ? t.left_sq : t.right_sq), n, 1, h->centered, h->beta2, h->bias_correction,
        t.step);
    CUDA_TRY(cudaMemsetAsync(b.bad, 0, sizeof(int), stream));
    cgd_screen_kernel<<<cgd_grid_for(n * n), CGD_SOLVER_THREADS, 0, stream>>>(b.bad, b.A, n * n);
    cgd_replace_kernel<<<cgd_grid_for(n * n), CGD_SOLVER_THREADS, 0, stream>>>(b.A, n, b.bad);
    CUDA_TRY(cudaGetLastError());
done:
    return fail.code;
}

/* One tensor's eigenbasis step. */
template <int DT>
int eigen_tensor(CgdHandles *hd, const cgd_block_hparams *h, const cgd_kron_tensor &t, const EigenBuffers &b,
                 const float *grad_scale, const float *skip, cudaStream_t stream, CgdFailure &fail) {
    const int64_t rows = t.rows, cols = t.cols, numel = rows * cols;
    const int grid = cgd_grid_for(numel);
    const cgd_real beta1 = (cgd_real)h->beta1, w1 = (cgd_real)(1.0 - h->beta1);
    const cgd_real beta2 = (cgd_real)h->beta2, w2 = (cgd_real)(1.0 - h->beta2);
    cgd_real *V = real_ptr(t.rotated_sq), *m1 = real_ptr(t.exp_avg);
    eigen_prepare_kernel<DT><<<grid, CGD_SOLVER_THREADS, 0, stream>>>(t.grad, b.g, b.F, numel, beta1, w1, h->beta1,
                                                                      h->bias_correction, h->maximize, t.step,
                                                                      grad_scale);
    first_kernel<<<1, 1, 0, stream>>>(b.first, t.outcome);
    CUDA_TRY(cudaGetLastError());
    for (int s = 0; s < 2; ++s) { /* the full factors take G */
        const int left = s == 0;
        if (!(left ? t.left_full : t.right_full)) continue;
        const int64_t n = left ? rows : cols;
        SOLVER_TRY(gram(hd->blas, b.g, rows, cols, left, CGD_R(1.0), b.A));
        ema_kernel<<<cgd_grid_for(n * n), CGD_SOLVER_THREADS, 0, stream>>>(real_ptr(left ? t.left_sq : t.right_sq),
                                                                           b.A, n * n, beta2, w2, skip);
        CUDA_TRY(cudaGetLastError());
    }
    for (int s = 0; s < 2 && t.may_be_first; ++s) { /* a first step's basis, kept only where it is the first */
        const int left = s == 0, full = left ? t.left_full : t.right_full;
        int32_t *outcome = t.outcome + s;
        if (!full) {
            first_settle_kernel<<<1, 1, 0, stream>>>(outcome, t.counters, nullptr, b.first, skip);
            continue;
        }
        const int64_t n = left ? rows : cols;
        if (screened_factor(hd, h, t, left, b.F, b, stream, fail)) goto done;
        SOLVER_TRY(cgd_syevd(hd->solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, (int)n, b.A, (int)n,
                             b.values, b.work, b.lwork, b.info));
        check_kernel<<<cgd_grid_for(n * n + n), CGD_SOLVER_THREADS, 0, stream>>>(b.bad, b.info, b.A, b.values, n, 1);
        first_commit_kernel<<<cgd_grid_for(n * n), CGD_SOLVER_THREADS, 0, stream>>>(
            real_ptr(left ? t.left_basis : t.right_basis), real_ptr(left ? t.left_eig : t.right_eig), b.A, b.values,
            b.cdiag, b.bad, b.first, n, skip);
        first_settle_kernel<<<1, 1, 0, stream>>>(outcome, t.counters, b.bad, b.first, skip);
        CUDA_TRY(cudaGetLastError());
    }
    /* G' in the basis as it now is, the moments, the direction F' ./ (eps + C')^a, and back */
    if (rotate(hd, t, b.g, true, b.Y, b.Z, stream, fail)) goto done;
    eigen_moments_kernel<<<grid, CGD_SOLVER_THREADS, 0, stream>>>(V, m1, b.Z, b.D, numel, beta1, w1, beta2, w2,
                                                                  h->beta1, h->bias_correction, t.step, skip);
    if (h->power != 0.0)
        eigen_scale_kernel<<<grid, CGD_SOLVER_THREADS, 0, stream>>>(b.D, V, numel, (cgd_real)h->eps,
                                                                    (cgd_real)h->power, h->centered, h->beta2,
                                                                    h->bias_correction, t.step);
    CUDA_TRY(cudaGetLastError());
    if (rotate(hd, t, b.D, false, b.Y, b.D, stream, fail)) goto done;
    if (h->refresh && (t.left_full || t.right_full)) {
        /* SOAP's refresh on a later step: M1 into the original space, one power iteration and a QR per full
           side (V' permuted with the basis), M1 into the new basis */
        if (rotate(hd, t, m1, false, b.Y, b.F, stream, fail)) goto done;
        bias_kernel<<<grid, CGD_SOLVER_THREADS, 0, stream>>>(b.E, b.F, numel, h->beta1, h->bias_correction, t.step);
        CUDA_TRY(cudaGetLastError());
        for (int s = 0; s < 2; ++s) {
            const int left = s == 0;
            if (!(left ? t.left_full : t.right_full)) continue;
            const int64_t n = left ? rows : cols;
            cgd_real *basis = real_ptr(left ? t.left_basis : t.right_basis);
            const cgd_real one = CGD_R(1.0), zero = CGD_R(0.0);
            if (screened_factor(hd, h, t, left, b.E, b, stream, fail)) goto done;
            /* C2 = basis L: column-major C2^T = L^T basis^T, L symmetric */
            SOLVER_TRY(cgd_gemm_64(hd->blas, CUBLAS_OP_N, CUBLAS_OP_N, n, n, n, &one, b.A, n, basis, n, &zero, b.C2,
                                   n));
            rayleigh_kernel<<<cgd_grid_for(n), CGD_SOLVER_THREADS, 0, stream>>>(b.q, basis, b.C2, n);
            rank_kernel<<<cgd_grid_for(n), CGD_SOLVER_THREADS, 0, stream>>>(b.order, b.q, n);
            permute_rows_kernel<<<cgd_grid_for(n * n), CGD_SOLVER_THREADS, 0, stream>>>(b.Q, b.C2, b.order, n);
            CUDA_TRY(cudaGetLastError());
            SOLVER_TRY(cgd_geqrf(hd->solver, (int)n, (int)n, b.Q, (int)n, b.tau, b.work, b.lwork, b.info + 1));
            SOLVER_TRY(cgd_orgqr(hd->solver, (int)n, (int)n, (int)n, b.Q, (int)n, b.tau, b.work, b.lwork,
                                 b.info + 2));
            qr_check_kernel<<<cgd_grid_for(n * n), CGD_SOLVER_THREADS, 0, stream>>>(b.bad, b.info + 1, b.Q, n);
            refresh_commit_kernel<<<cgd_grid_for(numel > n * n ? numel : n * n), CGD_SOLVER_THREADS, 0, stream>>>(
                basis, real_ptr(left ? t.left_eig : t.right_eig), b.Q, b.q, b.order, V, b.Y, rows, cols, left, n,
                b.bad, b.first, skip);
            refresh_copy_kernel<<<grid, CGD_SOLVER_THREADS, 0, stream>>>(V, b.Y, numel, b.bad, b.first, skip);
            refresh_settle_kernel<<<1, 1, 0, stream>>>(t.outcome + s, t.counters, b.bad, b.first, skip);
            CUDA_TRY(cudaGetLastError());
        }
        if (rotate(hd, t, b.F, true, b.Y, b.Z, stream, fail)) goto done;
        select_kernel<<<grid, CGD_SOLVER_THREADS, 0, stream>>>(m1, b.Z, numel, b.first, skip);
        CUDA_TRY(cudaGetLastError());
    }
    /* last: the update counts the step, which the kernels above read for the bias corrections */
    launch_update<DT>(t, b.D, h, skip, stream);
    CUDA_TRY(cudaGetLastError());
done:
    return fail.code;
}

}  // namespace

extern "C" int CGD_NAME(cgd_cuda_kron_workspace)(const cgd_block_hparams *h, const cgd_kron_tensor *tensors,
                                                 int64_t count, void *stream, size_t *bytes, char *why, int why_size) {
    CgdFailure fail = {why, why_size, 0};
    KronBuffers b;
    CgdHandles *hd = cgd_solver_handles((cudaStream_t)stream, true, fail);
    return hd ? kron_layout(hd, h, tensors, count, nullptr, &b, bytes, fail) : fail.code;
}

extern "C" int CGD_NAME(cgd_cuda_kron_step)(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_kron_tensor *tensors,
                                            int64_t count, const float *grad_scale, const float *skip, void *workspace,
                                            void *stream_ptr, char *why, int why_size) {
    CgdFailure fail = {why, why_size, 0};
    cudaStream_t stream = (cudaStream_t)stream_ptr;
    const cgd_real one = CGD_R(1.0), zero = CGD_R(0.0);
    KronBuffers b;
    size_t bytes = 0;
    CgdHandles *hd = cgd_solver_handles(stream, true, fail);
    if (!hd) return fail.code;
    if (kron_layout(hd, h, tensors, count, workspace, &b, &bytes, fail)) return fail.code;
    for (int64_t ti = 0; ti < count; ++ti) {
        const cgd_kron_tensor &t = tensors[ti];
        const int64_t rows = t.rows, cols = t.cols, numel = rows * cols;
#define CGD_LAUNCH(DT) launch_prepare<DT>(t, b.g, b.F, h, grad_scale, skip, stream)
        CGD_DISPATCH_DTYPE(dtype, CGD_LAUNCH);
#undef CGD_LAUNCH
        CUDA_TRY(cudaGetLastError());

        for (int s = 0; s < 2; ++s) {
            const int left = s == 0, full = left ? t.left_full : t.right_full;
            const int64_t n = left ? rows : cols;
            cgd_real *sq = left ? real_ptr(t.left_sq) : real_ptr(t.right_sq),
                     *basis = left ? real_ptr(t.left_basis) : real_ptr(t.right_basis);
            cgd_real *eig = left ? real_ptr(t.left_eig) : real_ptr(t.right_eig);
            int32_t *outcome = t.outcome + s;
            const cgd_real beta2 = (cgd_real)h->beta2, w2 = (cgd_real)(1.0 - h->beta2);
            if (full) {
                SOLVER_TRY(gram(hd->blas, b.g, rows, cols, left, CGD_R(1.0), b.A));
                ema_kernel<<<cgd_grid_for(n * n), CGD_SOLVER_THREADS, 0, stream>>>(sq, b.A, n * n, beta2, w2, skip);
            } else {
                int grid = left ? (int)(rows < 65535 ? rows : 65535) : cgd_grid_for(cols);
                diag_gram_kernel<<<grid, CGD_SOLVER_THREADS, 0, stream>>>(sq, b.g, rows, cols, left, beta2, w2, 1,
                                                                          skip);
            }
            CUDA_TRY(cudaGetLastError());
            if (!h->refresh) continue;
            if (h->centered) {
                if (full) {
                    SOLVER_TRY(gram(hd->blas, b.F, rows, cols, left, -CGD_R(1.0), b.A));
                } else {
                    int grid = left ? (int)(rows < 65535 ? rows : 65535) : cgd_grid_for(cols);
                    diag_gram_kernel<<<grid, CGD_SOLVER_THREADS, 0, stream>>>(b.A, b.F, rows, cols, left, CGD_R(0.0),
                                                                              -CGD_R(1.0), 0, nullptr);
                }
            }
            build_factor_kernel<<<cgd_grid_for(full ? n * n : n), CGD_SOLVER_THREADS, 0, stream>>>(
                b.A, b.cdiag, sq, n, full, h->centered, h->beta2, h->bias_correction, t.step);
            CUDA_TRY(cudaMemsetAsync(b.bad, 0, sizeof(int), stream));
            /* The eigenvalues land in Y (numel >= n), free until the apply below. */
            cgd_real *values = full ? b.Y : b.cdiag;
            if (full) {
                cgd_screen_kernel<<<cgd_grid_for(n * n), CGD_SOLVER_THREADS, 0, stream>>>(b.bad, b.A, n * n);
                cgd_replace_kernel<<<cgd_grid_for(n * n), CGD_SOLVER_THREADS, 0, stream>>>(b.A, n, b.bad);
                CUDA_TRY(cudaGetLastError());
                SOLVER_TRY(cgd_syevd(hd->solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, (int)n, b.A, (int)n,
                                     values, b.work, b.lwork, b.info));
            }
            check_kernel<<<cgd_grid_for(full ? n * n + n : n), CGD_SOLVER_THREADS, 0, stream>>>(
                b.bad, full ? b.info : nullptr, b.A, values, n, full);
            commit_kernel<<<cgd_grid_for(full ? n * n : n), CGD_SOLVER_THREADS, 0, stream>>>(
                basis, eig, outcome, b.A, values, b.cdiag, b.bad, n, full, skip);
            settle_kernel<<<1, 1, 0, stream>>>(outcome, t.counters, b.bad, skip);
            if (!left) normalise_kernel<<<1, CGD_SOLVER_THREADS, 0, stream>>>(eig, n, outcome, skip);
            CUDA_TRY(cudaGetLastError());
        }

        /* D = U [(U^T F V) ./ (eps + mu nu)^a] V^T, built in Z; Y is scratch. */
        const cgd_real *D = b.F;
        if (h->power != 0.0) {
            const int64_t m = rows, n = cols;
            const cgd_real *cur = b.F;
            cgd_real *Y = b.Y, *Z = b.Z;
            if (t.left_full) { /* Y^T = F^T U, i.e. Y = U^T F */
                SOLVER_TRY(cgd_gemm_64(hd->blas, CUBLAS_OP_N, CUBLAS_OP_N, n, m, m, &one, cur, n,
                                       real_ptr(t.left_basis), m, &zero, Y, n));
                cur = Y;
            }
            if (t.right_full) { /* Z^T = V^T Y^T, i.e. Z = Y V */
                SOLVER_TRY(cgd_gemm_64(hd->blas, CUBLAS_OP_T, CUBLAS_OP_N, n, m, n, &one, real_ptr(t.right_basis), n,
                                       cur, n, &zero, Z, n));
            } else {
                CUDA_TRY(cudaMemcpyAsync(Z, cur, (size_t)numel * sizeof(cgd_real), cudaMemcpyDeviceToDevice, stream));
            }
            scale_kernel<<<cgd_grid_for(numel), CGD_SOLVER_THREADS, 0, stream>>>(
                Z, real_ptr(t.left_eig), real_ptr(t.right_eig), rows, cols, (cgd_real)h->eps, (cgd_real)h->power);
            CUDA_TRY(cudaGetLastError());
            cur = Z;
            if (t.left_full) { /* Y^T = Z^T U^T, i.e. Y = U Z */
                SOLVER_TRY(cgd_gemm_64(hd->blas, CUBLAS_OP_N, CUBLAS_OP_T, n, m, m, &one, cur, n,
                                       real_ptr(t.left_basis), m, &zero, Y, n));
                cur = Y;
            }
            if (t.right_full) { /* D^T = V Y^T, i.e. D = Y V^T */
                cgd_real *out = cur == Z ? Y : Z;
                SOLVER_TRY(cgd_gemm_64(hd->blas, CUBLAS_OP_N, CUBLAS_OP_N, n, m, n, &one, real_ptr(t.right_basis), n,
                                       cur, n, &zero, out, n));
                cur = out;
            }
            D = cur;
        }
#define CGD_LAUNCH(DT) launch_update<DT>(t, D, h, skip, stream)
        CGD_DISPATCH_DTYPE(dtype, CGD_LAUNCH);
#undef CGD_LAUNCH
        CUDA_TRY(cudaGetLastError());
    }
done:
    return fail.code;
}

extern "C" int CGD_NAME(cgd_cuda_eigenbasis_workspace)(const cgd_block_hparams *h, const cgd_kron_tensor *tensors,
                                                       int64_t count, void *stream, size_t *bytes, char *why,
                                                       int why_size) {
    CgdFailure fail = {why, why_size, 0};
    EigenBuffers b;
    CgdHandles *hd = cgd_solver_handles((cudaStream_t)stream, true, fail);
    return hd ? eigen_layout(hd, h, tensors, count, nullptr, &b, bytes, fail) : fail.code;
}

extern "C" int CGD_NAME(cgd_cuda_eigenbasis_step)(const cgd_block_hparams *h, cgd_dtype dtype,
                                                  const cgd_kron_tensor *tensors, int64_t count,
                                                  const float *grad_scale, const float *skip, void *workspace,
                                                  void *stream_ptr, char *why, int why_size) {
    CgdFailure fail = {why, why_size, 0};
    cudaStream_t stream = (cudaStream_t)stream_ptr;
    EigenBuffers b;
    size_t bytes = 0;
    CgdHandles *hd = cgd_solver_handles(stream, true, fail);
    if (!hd) return fail.code;
    if (eigen_layout(hd, h, tensors, count, workspace, &b, &bytes, fail)) return fail.code;
    for (int64_t i = 0; i < count && !fail.code; ++i) {
#define CGD_LAUNCH(DT) eigen_tensor<DT>(hd, h, tensors[i], b, grad_scale, skip, stream, fail)
        CGD_DISPATCH_DTYPE(dtype, CGD_LAUNCH);
#undef CGD_LAUNCH
    }
    return fail.code;
}
