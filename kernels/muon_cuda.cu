/*
 * CUDA side of Muon as a CGD step (cgd.h, cgd_muon_step), matrix by matrix on the caller's stream and without a
 * host synchronisation:
 *   prepare    B <- lerp(B, g, 1 - mu) and the force F (Nesterov: lerp(g, B, mu)) into X, transposed for a tall
 *              matrix so that the Gram matrix is the smaller side's; X in bfloat16 with ns_bf16
 *   normalise  ||X||^2 summed in double in a fixed order (a fixed grid of partial sums, then one block), and
 *              X <- X / max(||X||, eps), rounded as the CPU kernel rounds it
 *   solve      Newton-Schulz: ns_steps x three GEMMs, in bfloat16 with float32 accumulation when ns_bf16 (as
 *              torch.optim.Muon runs it on a GPU), else in the state's type; or the metric route (CGD_MUON_EIGH):
 *              X X^T by GEMM, cuSOLVER syevd, E diag(d) E^T X by two GEMMs, a failed solve (no float64 retry
 *              here: its outcome is on the device) keeping X, counted
 *   update     p <- p (1 - lr wd) - lr s X
 * Buffers are row-major and cuBLAS column-major: a row-major m x n X is the column-major n x m X^T with leading
 * dimension n, so each GEMM below is written for the transposes. They are carved from the caller's workspace,
 * sized for the largest matrix and reused by each in turn; the step allocates nothing. On a skipped step
 * (found_inf) the momentum and the parameters are left as they are.
 */
#include <cuda_bf16.h>
#include <math.h>

#include "cuda_solver.cuh"
#include "kernels.h"
#include "multi_tensor.cuh"

namespace {

/* The partial sums of the norm: a fixed grid, so the sum's order does not depend on the matrix. */
constexpr int NORM_BLOCKS = 256;

/* torch's lerp, a + w (b - a), in the form torch evaluates for each half of w (exact at w = 1). */
__device__ __forceinline__ cgd_real lerp(cgd_real a, cgd_real b, cgd_real w) {
    return w < CGD_R(0.5) ? a + w * (b - a) : b - (b - a) * (1 - w);
}

__device__ __forceinline__ cgd_real to_real(__nv_bfloat16 x) { return (cgd_real)__bfloat162float(x); }
__device__ __forceinline__ cgd_real to_real(cgd_real x) { return x; }
template <typename T> __device__ __forceinline__ T from_real(cgd_real x);
template <> __device__ __forceinline__ __nv_bfloat16 from_real<__nv_bfloat16>(cgd_real x) {
    return __float2bfloat16_rn((float)x);
}
template <> __device__ __forceinline__ cgd_real from_real<cgd_real>(cgd_real x) { return x; }
/* x rounded to bfloat16 when T is, else x */
template <typename T> __device__ __forceinline__ cgd_real rounded(cgd_real x) { return to_real(from_real<T>(x)); }

/* Position of element e of the rows x cols force in X: transposed (X = F^T) for a tall matrix. */
__device__ __forceinline__ int64_t x_index(int64_t e, int64_t rows, int64_t cols, int tall) {
    return tall ? (e % cols) * rows + e / cols : e;
}

template <int DT, typename T>
__global__ void prepare_kernel(const void *grad, cgd_real *buf, T *X, int64_t rows, int64_t cols, cgd_real mu,
                               cgd_real w, int nesterov, int tall, const float *grad_scale, const float *skip) {
    const bool skipped = cgd_skipped(skip);
    const cgd_real scale = grad_scale ? (cgd_real)*grad_scale : CGD_R(1.0);
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < rows * cols;
         e += (int64_t)gridDim.x * blockDim.x) {
        const cgd_real g = load1<DT>(grad, e) / scale;
        const cgd_real b = skipped ? buf[e] : lerp(buf[e], g, w);
        if (!skipped) buf[e] = b;
        X[x_index(e, rows, cols, tall)] = from_real<T>(nesterov ? lerp(g, b, mu) : b);
    }
}

/* partial[block] = the sum of x^2 over the block's grid-stride share, in double. */
template <typename T> __global__ void square_sum_kernel(const T *X, int64_t n, double *partial) {
    __shared__ double part[CGD_SOLVER_THREADS];
    double sum = 0.0;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x) {
        const double x = (double)to_real(X[e]);
        sum += x * x;
    }
    part[threadIdx.x] = sum;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = part[0];
}

/* *norm = max(||X||, eps) from the partial sums, in one block: for Newton-Schulz rounded to the real type (and
   to bfloat16 with T, as the CPU kernel's), for the metric route in double. */
template <typename T> __global__ void norm_kernel(const double *partial, double eps, int in_double, double *norm) {
    __shared__ double part[CGD_SOLVER_THREADS];
    double sum = 0.0;
    for (int k = threadIdx.x; k < NORM_BLOCKS; k += blockDim.x) sum += partial[k];
    part[threadIdx.x] = sum;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) part[threadIdx.x] += part[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x != 0) return;
    const double root = sqrt(part[0]);
    if (in_double) {
        *norm = root > eps ? root : eps;
        return;
    }
    const cgd_real r = rounded<T>((cgd_real)root), e = rounded<T>((cgd_real)eps);
    *norm = (double)(r > e ? r : e);
}

template <typename T> __global__ void normalise_kernel(T *X, int64_t n, const double *norm, int in_double) {
    const double nd = *norm;
    const cgd_real nr = (cgd_real)nd;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < n; e += (int64_t)gridDim.x * blockDim.x)
        X[e] = from_real<T>(in_double ? (cgd_real)((double)to_real(X[e]) / nd) : to_real(X[e]) / nr);
}

/* bad = the eigendecomposition failed or left a non-finite value (bad is cleared on the stream before). */
__global__ void check_kernel(int *bad, const int *info, const cgd_real *vecs, const cgd_real *values, int64_t m) {
    int local = 0;
    if (blockIdx.x == 0 && threadIdx.x == 0) local |= *info != 0;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < m * m + m;
         e += (int64_t)gridDim.x * blockDim.x)
        local |= e < m * m ? !isfinite(vecs[e]) : !isfinite(values[e - m * m]);
    if (local) atomicOr(bad, 1);
}

/* W = E diag(d), d_k = (eps + max(l_k, 0))^-a, for the column-major eigenvectors E (column k eigenvector k). */
__global__ void scale_columns_kernel(cgd_real *W, const cgd_real *E, const cgd_real *values, int64_t m, double eps,
                                     double power) {
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < m * m; e += (int64_t)gridDim.x * blockDim.x) {
        const double lambda = (double)values[e / m];
        const double d = power == 0.0 ? 1.0 : pow(eps + (lambda > 0.0 ? lambda : 0.0), -power);
        W[e] = (cgd_real)(d * (double)E[e]);
    }
}

__global__ void count_kernel(float *failures, const int *bad, const float *skip) {
    if (!cgd_skipped(skip) && *bad) *failures += 1.0f;
}

/* p <- p decay - step X for the final X: `solved`, or `kept` where the metric route's solve failed. */
template <int DT, typename T>
__global__ void update_kernel(void *param, const T *solved, const T *kept, const int *bad, int64_t rows, int64_t cols,
                              int tall, cgd_real step, cgd_real decay, const float *skip) {
    if (cgd_skipped(skip)) return;
    const T *X = bad && *bad ? kept : solved;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < rows * cols;
         e += (int64_t)gridDim.x * blockDim.x)
        store1<DT>(param, e, load1<DT>(param, e) * decay - step * to_real(X[x_index(e, rows, cols, tall)]));
}

/* C = alpha op(A) op(B) + beta C, column-major: bfloat16 in and out with float32 accumulation, or the real type. */
cublasStatus_t gemm(cublasHandle_t blas, cublasOperation_t ta, cublasOperation_t tb, int64_t m, int64_t n, int64_t k,
                    double alpha, const __nv_bfloat16 *A, int64_t lda, const __nv_bfloat16 *B, int64_t ldb,
                    double beta, __nv_bfloat16 *C, int64_t ldc) {
    const float a = (float)alpha, b = (float)beta;
    return cublasGemmEx(blas, ta, tb, (int)m, (int)n, (int)k, &a, A, CUDA_R_16BF, (int)lda, B, CUDA_R_16BF, (int)ldb,
                        &b, C, CUDA_R_16BF, (int)ldc, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

cublasStatus_t gemm(cublasHandle_t blas, cublasOperation_t ta, cublasOperation_t tb, int64_t m, int64_t n, int64_t k,
                    double alpha, const cgd_real *A, int64_t lda, const cgd_real *B, int64_t ldb, double beta,
                    cgd_real *C, int64_t ldc) {
    const cgd_real a = (cgd_real)alpha, b = (cgd_real)beta;
    return cgd_gemm_64(blas, ta, tb, m, n, k, &a, A, lda, B, ldb, &b, C, ldc);
}

/* The workspace of one step, sized for the largest matrix: X and Y (its elements), A, G and H (the smaller
   side squared), in bfloat16 or the real type; the norm's partial sums; the metric route's eigenvalues and
   syevd's work. */
struct MuonBuffers {
    void *X, *Y, *A, *G, *H;
    double *partial, *norm;
    cgd_real *values, *work;
    int *info, *bad;
    int lwork;
};

int muon_layout(CgdHandles *hd, const cgd_muon_hparams *h, const cgd_muon_tensor *tensors, int64_t count,
                void *workspace, MuonBuffers *b, size_t *bytes, CgdFailure &fail) {
    int64_t numel = 1, side = 1;
    for (int64_t i = 0; i < count; ++i) {
        const int64_t r = tensors[i].rows, c = tensors[i].cols, small = r < c ? r : c;
        numel = r * c > numel ? r * c : numel;
        side = small > side ? small : side;
    }
    const bool eigen = h->solver == CGD_MUON_EIGH, bf = h->ns_bf16 && !eigen;
    const size_t elem = bf ? sizeof(__nv_bfloat16) : sizeof(cgd_real);
    CgdCarver carve(workspace);
    *b = MuonBuffers{};
    b->X = carve.take<char>((size_t)numel * elem);
    b->Y = carve.take<char>((size_t)numel * elem);
    b->A = carve.take<char>((size_t)(side * side) * elem);
    b->G = carve.take<char>((size_t)(side * side) * elem);
    b->partial = carve.take<double>(NORM_BLOCKS);
    b->norm = carve.take<double>(1);
    if (eigen) {
        b->H = carve.take<char>((size_t)(side * side) * elem);
        b->values = carve.take<cgd_real>((size_t)side);
        b->info = carve.take<int>(1);
        b->bad = carve.take<int>(1);
        /* syevd's workspace grows with n, so the largest side's serves every smaller one */
        SOLVER_TRY(cgd_syevd_bufferSize(hd->solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, (int)side,
                                        static_cast<cgd_real *>(b->A), (int)side, b->values, &b->lwork));
        b->work = carve.take<cgd_real>((size_t)(b->lwork > 0 ? b->lwork : 1));
    }
    *bytes = carve.used;
done:
    return fail.code;
}

/* One matrix's step, its elements of type T (bfloat16 for Newton-Schulz with ns_bf16, else the real type). */
template <int DT, typename T>
int muon_matrix(CgdHandles *hd, const cgd_muon_hparams *h, const cgd_muon_tensor &t, const MuonBuffers &b,
                const float *grad_scale, const float *skip, cudaStream_t stream, CgdFailure &fail) {
    const int64_t R = t.rows, Cc = t.cols, numel = R * Cc;
    const int tall = R > Cc; /* work on F^T, so the Gram matrix is the smaller side's */
    const int64_t m = tall ? Cc : R, n = tall ? R : Cc;
    const bool eigen = h->solver == CGD_MUON_EIGH;
    T *X = static_cast<T *>(b.X), *Y = static_cast<T *>(b.Y), *A = static_cast<T *>(b.A), *G = static_cast<T *>(b.G);
    const int grid = cgd_grid_for(numel);
    prepare_kernel<DT, T><<<grid, CGD_SOLVER_THREADS, 0, stream>>>(
        t.grad, static_cast<cgd_real *>(t.momentum), X, R, Cc, (cgd_real)h->momentum, (cgd_real)(1.0 - h->momentum),
        h->nesterov, tall, grad_scale, skip);
    square_sum_kernel<T><<<NORM_BLOCKS, CGD_SOLVER_THREADS, 0, stream>>>(X, numel, b.partial);
    norm_kernel<T><<<1, CGD_SOLVER_THREADS, 0, stream>>>(b.partial, h->eps, eigen, b.norm);
    normalise_kernel<T><<<grid, CGD_SOLVER_THREADS, 0, stream>>>(X, numel, b.norm, eigen);
    CUDA_TRY(cudaGetLastError());
    /* A = X X^T: column-major, X is X^T (n x m, ld n), and X X^T = (X^T)^T X^T */
    if (eigen) {
        cgd_real *Ar = reinterpret_cast<cgd_real *>(A), *Gr = reinterpret_cast<cgd_real *>(G);
        cgd_real *Hr = static_cast<cgd_real *>(b.H);
        SOLVER_TRY(gemm(hd->blas, CUBLAS_OP_T, CUBLAS_OP_N, m, m, n, 1.0, reinterpret_cast<cgd_real *>(X), n,
                        reinterpret_cast<cgd_real *>(X), n, 0.0, Ar, m));
        CUDA_TRY(cudaMemsetAsync(b.bad, 0, sizeof(int), stream));
        /* a force holding NaN or Inf (an overflowed step that the skip flag drops) never reaches the solver */
        cgd_screen_kernel<<<cgd_grid_for(m * m), CGD_SOLVER_THREADS, 0, stream>>>(b.bad, Ar, m * m);
        cgd_replace_kernel<<<cgd_grid_for(m * m), CGD_SOLVER_THREADS, 0, stream>>>(Ar, m, b.bad);
        CUDA_TRY(cudaGetLastError());
        SOLVER_TRY(cgd_syevd(hd->solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, (int)m, Ar, (int)m,
                             b.values, b.work, b.lwork, b.info));
        check_kernel<<<cgd_grid_for(m * m + m), CGD_SOLVER_THREADS, 0, stream>>>(b.bad, b.info, Ar, b.values, m);
        scale_columns_kernel<<<cgd_grid_for(m * m), CGD_SOLVER_THREADS, 0, stream>>>(Gr, Ar, b.values, m, h->eps,
                                                                                      h->power);
        CUDA_TRY(cudaGetLastError());
        /* H = (E diag(d)) E^T, symmetric, then Y = H X: column-major Y^T = X^T H */
        SOLVER_TRY(gemm(hd->blas, CUBLAS_OP_N, CUBLAS_OP_T, m, m, m, 1.0, Gr, m, Ar, m, 0.0, Hr, m));
        SOLVER_TRY(gemm(hd->blas, CUBLAS_OP_N, CUBLAS_OP_N, n, m, m, 1.0, reinterpret_cast<cgd_real *>(X), n, Hr, m,
                        0.0, reinterpret_cast<cgd_real *>(Y), n));
        count_kernel<<<1, 1, 0, stream>>>(t.failures, b.bad, skip);
    } else {
        for (int s = 0; s < h->ns_steps; ++s) {
            SOLVER_TRY(gemm(hd->blas, CUBLAS_OP_T, CUBLAS_OP_N, m, m, n, 1.0, X, n, X, n, 0.0, A, m));
            /* G = b A + c A A */
            CUDA_TRY(cudaMemcpyAsync(G, A, (size_t)(m * m) * sizeof(T), cudaMemcpyDeviceToDevice, stream));
            SOLVER_TRY(gemm(hd->blas, CUBLAS_OP_N, CUBLAS_OP_N, m, m, m, h->ns_c, A, m, A, m, h->ns_b, G, m));
            /* X <- a X + G X: column-major Y^T = X^T G^T + a X^T, G^T being the row-major G's column-major view */
            CUDA_TRY(cudaMemcpyAsync(Y, X, (size_t)numel * sizeof(T), cudaMemcpyDeviceToDevice, stream));
            SOLVER_TRY(gemm(hd->blas, CUBLAS_OP_N, CUBLAS_OP_N, n, m, m, 1.0, X, n, G, m, h->ns_a, Y, n));
            T *swap = X;
            X = Y;
            Y = swap;
        }
    }
    {
        const double ratio = h->scale == CGD_MUON_MATCH_RMS_ADAMW ? 0.2 * sqrt((double)(R > Cc ? R : Cc))
                                                                   : sqrt(fmax(1.0, (double)R / (double)Cc));
        /* the metric route's result is in Y, with X kept for a failed solve; Newton-Schulz's is in X */
        update_kernel<DT, T><<<grid, CGD_SOLVER_THREADS, 0, stream>>>(
            t.param, eigen ? Y : X, X, eigen ? b.bad : nullptr, R, Cc, tall, (cgd_real)(h->lr * ratio),
            (cgd_real)(1.0 - h->lr * h->weight_decay), skip);
        CUDA_TRY(cudaGetLastError());
    }
done:
    return fail.code;
}

}  // namespace

extern "C" int CGD_NAME(cgd_cuda_muon_workspace)(const cgd_muon_hparams *h, const cgd_muon_tensor *tensors,
                                                 int64_t count, void *stream, size_t *bytes, char *why, int why_size) {
    CgdFailure fail = {why, why_size, 0};
    MuonBuffers b;
    CgdHandles *hd = cgd_solver_handles((cudaStream_t)stream, true, fail);
    return hd ? muon_layout(hd, h, tensors, count, nullptr, &b, bytes, fail) : fail.code;
}

extern "C" int CGD_NAME(cgd_cuda_muon_step)(const cgd_muon_hparams *h, cgd_dtype dtype, const cgd_muon_tensor *tensors,
                                            int64_t count, const float *grad_scale, const float *skip, void *workspace,
                                            void *stream_ptr, char *why, int why_size) {
    CgdFailure fail = {why, why_size, 0};
    cudaStream_t stream = (cudaStream_t)stream_ptr;
    MuonBuffers b;
    size_t bytes = 0;
    CgdHandles *hd = cgd_solver_handles(stream, true, fail);
    if (!hd) return fail.code;
    if (muon_layout(hd, h, tensors, count, workspace, &b, &bytes, fail)) return fail.code;
    const bool bf = h->ns_bf16 && h->solver != CGD_MUON_EIGH;
    for (int64_t i = 0; i < count && !fail.code; ++i) {
#define CGD_LAUNCH(DT)                                                                                   \
    (bf ? muon_matrix<DT, __nv_bfloat16>(hd, h, tensors[i], b, grad_scale, skip, stream, fail)            \
        : muon_matrix<DT, cgd_real>(hd, h, tensors[i], b, grad_scale, skip, stream, fail))
        CGD_DISPATCH_DTYPE(dtype, CGD_LAUNCH);
#undef CGD_LAUNCH
    }
    return fail.code;
}
