/*
 * The CPU symmetric eigensolvers shared by block and Kronecker-factored CGD, and the Lanczos solver of the
 * full/block direction, in the build's real type (real.h):
 * LAPACK ssyevd, then dsyevd when float32 fails or returns a non-finite value (the first two rungs of the failure
 * ladder in cgd.h; dsyevd alone for float64 state), and for small blocks a batched cyclic Jacobi solver that
 * decomposes a register's worth of them at once, whose unconverged matrices go to LAPACK. Internal.
 */
#ifndef CGD_EIGH_CPU_H
#define CGD_EIGH_CPU_H

#include <math.h>

#include "real.h"

/* Workspace of eigendecompositions up to n x n; one per thread, reused for every matrix of that size or smaller
   (LAPACK's workspace needs grow with n). da, dw, dwork: the float64 retry of the float32 build (NULL in the
   float64 build, whose a, w, work are double already). */
typedef struct cgd_eigh_scratch {
    int n, lwork, liwork, dlwork;
    cgd_real *a, *w, *work;
    double *da, *dw, *dwork;
    int *iwork;
} cgd_eigh_scratch;

#define cgd_eigh_scratch_init CGD_NAME(cgd_eigh_scratch_init)
#define cgd_eigh_scratch_free CGD_NAME(cgd_eigh_scratch_free)
#define cgd_eigh_solve CGD_NAME(cgd_eigh_solve)

/* 0 on success, 1 when out of memory (nothing left allocated). */
int cgd_eigh_scratch_init(cgd_eigh_scratch *s, int n);
void cgd_eigh_scratch_free(cgd_eigh_scratch *s);

/*
 * Eigendecomposes the symmetric n x n matrix C, n <= s->n (either triangle layout: it is symmetric). Returns
 * CGD_BLOCK_FP32 with eigenvalues (ascending) in s->w and eigenvectors in s->a (column-major: column k is
 * eigenvector k) when the solver of the build's precision succeeded, CGD_BLOCK_FP64 with them in s->dw and s->da
 * when the float32 build's retry in float64 did, or -1 when every solver failed.
 */
int cgd_eigh_solve(const cgd_real *C, int n, cgd_eigh_scratch *s);

/* Blocks of at most this side are decomposed by the batched Jacobi solver below, CGD_JACOBI_LANES at a time (one
   SIMD register of the real type across that many matrices); larger ones by LAPACK. */
#define CGD_JACOBI_MAX_BLOCK 32
#define CGD_JACOBI_LANES ((int)(64 / sizeof(cgd_real)))
#define cgd_eigh_jacobi_batch CGD_NAME(cgd_eigh_jacobi_batch)

/*
 * Cyclic Jacobi eigendecompositions of `count` <= CGD_JACOBI_LANES symmetric B x B matrices (C[l], row-major,
 * B <= CGD_JACOBI_MAX_BLOCK) at once, lane l of every vector operation working on matrix l. work holds
 * 2 B^2 CGD_JACOBI_LANES reals. Writes per matrix its eigenvalues ascending (w + l B) and eigenvectors (vecs + l B^2,
 * eigenvector k contiguous at k B, LAPACK's column-major layout), and converged[l]: 1 when the off-diagonal part
 * fell to the real type's rounding of the matrix's norm within the sweep limit, else 0 (the caller then takes
 * LAPACK's rung). Every given matrix must be finite; a NULL C[l] is skipped (its outputs are not written).
 */
void cgd_eigh_jacobi_batch(const cgd_real *const *C, int B, int count, cgd_real *work, cgd_real *w, cgd_real *vecs,
                           int *converged);

/* The Lanczos solver of the full/block metric's direction (lanczos_cpu.c): at most this many iterations (basis
   vectors of n doubles each) before the caller falls back to the eigendecomposition. */
#define CGD_LANCZOS_MAX_ITER 256
#define cgd_lanczos_scratch_init CGD_NAME(cgd_lanczos_scratch_init)
#define cgd_lanczos_scratch_free CGD_NAME(cgd_lanczos_scratch_free)
#define cgd_lanczos_direction CGD_NAME(cgd_lanczos_direction)

typedef struct cgd_lanczos_scratch {
    int n, kmax;
    double *q, *w, *alpha; /* the basis ((kmax + 1) n), two n-vectors, and the small problem's arrays */
} cgd_lanczos_scratch;

/* For directions of length up to n; 0 on success, 1 when out of memory (nothing left allocated). */
int cgd_lanczos_scratch_init(cgd_lanczos_scratch *s, int n);
void cgd_lanczos_scratch_free(cgd_lanczos_scratch *s);

/*
 * out = (eps I + max(C, 0))^-a f for C = scale M - (centered ? f f^T : 0), M row-major n x n symmetric, n <=
 * s->n: the eigenvalues of C clamped at 0 as the eigendecomposition path clamps them. Returns the iterations
 * taken (> 0) once the direction moved by under 1e-7 (float32 state; 1e-10 for float64) relative on two
 * consecutive checks or the Krylov space became invariant; 0 when s->kmax iterations did not get there (out
 * not written); -1 on a non-finite value or a failed small solve (out not written). `parallel`: spread the
 * products with M over the OpenMP threads.
 */
int cgd_lanczos_direction(const cgd_real *M, double scale, const cgd_real *f, int centered, int n, double eps,
                          double power, int parallel, cgd_lanczos_scratch *s, cgd_real *out);

/* (eps + max(lambda, 0))^-a: eigenvalues of a covariance are >= 0, and rounding may push the smallest below. */
static inline double cgd_inverse_power(double lambda, double eps, double power) {
    return power == 0.0 ? 1.0 : pow(eps + (lambda > 0.0 ? lambda : 0.0), -power);
}

#endif /* CGD_EIGH_CPU_H */
