/*
 * Row-major matrix products of the CPU kernels on the optimised BLAS that LAPACK is linked with (OpenBLAS by
 * default, CMakeLists.txt), in the build's real type (real.h). BLAS is column-major: a row-major matrix is the
 * column-major view of its transpose, so each call below swaps operands rather than copying. Called from inside
 * the kernels' OpenMP regions, where OpenBLAS's OpenMP build runs each call on the calling thread. Internal.
 */
#ifndef CGD_BLAS_CPU_H
#define CGD_BLAS_CPU_H

#include <stddef.h>
#include <stdint.h>

#include "real.h"

/* BLAS's Fortran symbols, with gfortran's trailing hidden lengths of the character arguments. */
void sgemm_(const char *ta, const char *tb, const int *m, const int *n, const int *k, const float *alpha,
            const float *a, const int *lda, const float *b, const int *ldb, const float *beta, float *c,
            const int *ldc, size_t ta_len, size_t tb_len);
void dgemm_(const char *ta, const char *tb, const int *m, const int *n, const int *k, const double *alpha,
            const double *a, const int *lda, const double *b, const int *ldb, const double *beta, double *c,
            const int *ldc, size_t ta_len, size_t tb_len);
#if CGD_F64
#define cgd_blas_gemm dgemm_
#else
#define cgd_blas_gemm sgemm_
#endif

/* The row-major product below in double whatever the build's type (the block kernel's preconditioner sums in
   double). */
static inline void cgd_gemm_f64(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, double alpha,
                                const double *A, int64_t lda, const double *B, int64_t ldb, double beta, double *C,
                                int64_t ldc) {
    const int M = (int)n, N = (int)m, K = (int)k, LA = (int)ldb, LB = (int)lda, LC = (int)ldc;
    dgemm_(trans_b ? "T" : "N", trans_a ? "T" : "N", &M, &N, &K, &alpha, B, &LA, A, &LB, &beta, C, &LC, 1, 1);
}

/* C = alpha op(A) op(B) + beta C, all row-major: C is m x n, op(A) m x k, op(B) k x n; op(X) is X^T when its
   flag is set. Sizes fit int: every side is at most 46340 (cgd.h). */
static inline void cgd_gemm(int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, cgd_real alpha,
                            const cgd_real *A, int64_t lda, const cgd_real *B, int64_t ldb, cgd_real beta, cgd_real *C,
                            int64_t ldc) {
    const int M = (int)n, N = (int)m, K = (int)k, LA = (int)ldb, LB = (int)lda, LC = (int)ldc;
    /* row-major C is column-major C^T = op(B)^T op(A)^T, and a row-major B is column-major B^T */
    cgd_blas_gemm(trans_b ? "T" : "N", trans_a ? "T" : "N", &M, &N, &K, &alpha, B, &LA, A, &LB, &beta, C, &LC, 1, 1);
}

/* S = alpha X X^T + beta S (left, rows x rows) or alpha X^T X + beta S (right, cols x cols) for the row-major
   rows x cols X. A full product rather than a symmetric rank-k update, as on CUDA: the factor is kept whole
   (both triangles) without a mirroring pass, and every BLAS has a tuned gemm. */
static inline void cgd_gram_update(int left, const cgd_real *X, int64_t rows, int64_t cols, cgd_real alpha,
                                   cgd_real beta, cgd_real *S) {
    if (left)
        cgd_gemm(0, 1, rows, rows, cols, alpha, X, cols, X, cols, beta, S, rows);
    else
        cgd_gemm(1, 0, cols, cols, rows, alpha, X, cols, X, cols, beta, S, cols);
}

#endif /* CGD_BLAS_CPU_H */
