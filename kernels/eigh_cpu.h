/*
 * The CPU symmetric eigensolvers shared by block and Kronecker-factored CGD, and the Lanczos solver of the
 * full/block direction, in the build's real type (real.h):
 * LAPACK ssyevd, then dsyevd when float32 fails or returns a non-finite value (the first two rungs of the failure
 * ladder in cgd.h; dsyevd alone for float64 state), and for small blocks a batched Jacobi solver that
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
   64-byte register of the real type across that many matrices); larger ones by LAPACK. */
#define CGD_JACOBI_MAX_BLOCK 32
#define CGD_JACOBI_BYTES 64
#define CGD_JACOBI_LANES ((int)(CGD_JACOBI_BYTES / sizeof(cgd_real)))
#define cgd_eigh_jacobi_lanes CGD_NAME(cgd_eigh_jacobi_lanes)

/* One such register as a GNU vector, for code that works on all lanes at once: whole-register operations at every
   clone's width (lowered to 2 or 4 narrower registers where 64 bytes is too wide) whatever the compiler makes of
   the loops around them. Aligned as the real type (lane arrays need not be 64-byte aligned) and free to alias it. */
typedef cgd_real cgd_lanes __attribute__((vector_size(CGD_JACOBI_BYTES), aligned(sizeof(cgd_real)), may_alias));

/*
 * Jacobi eigendecompositions of CGD_JACOBI_LANES symmetric B x B matrices (B <= CGD_JACOBI_MAX_BLOCK) at once,
 * lane-interleaved: entry (i, j) of matrix l at a[(i B + j) CGD_JACOBI_LANES + l], lane l of every vector
 * operation working on matrix l. Every lane must be finite (fill an unused one with I). On return the diagonal of
 * a holds each matrix's eigenvalues (in no particular order) and v, in the same layout, its eigenvectors as
 * columns: (v[(i B + k) L + l])_i belongs to eigenvalue a[(k B + k) L + l]. converged[l]: 1 when the off-diagonal
 * part fell to the real type's rounding of the matrix's norm within the sweep limit, else 0 (the caller then
 * takes LAPACK's rung).
 */
void cgd_eigh_jacobi_lanes(int B, cgd_real *a, cgd_real *v, int *converged);

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

/*
 * Eigenvalues and eigenvectors of the symmetric tridiagonal n x n T with diagonal d and off-diagonal e (e[i] =
 * T[i][i + 1], i < n - 1; e[n - 1] is scratch), in double, by implicit QL iterations with Wilkinson's shift
 * (Lanczos's small problem, whose n is the Krylov dimension: a loop in place, where LAPACK's dstev spent most of
 * a check in argument checks and helper calls). On return d holds the eigenvalues (in no particular order) and z
 * (n x n) the eigenvectors, each contiguous as LAPACK's column-major output: z[j n + i] is component i of
 * eigenvector j, so a rotation of two of them is two contiguous passes. 0 on success; 1
 * when an eigenvalue did not converge in 30 n iterations or a value is not finite.
 */
#define cgd_tridiagonal_eigh CGD_NAME(cgd_tridiagonal_eigh)
int cgd_tridiagonal_eigh(int n, double *d, double *e, double *z);

/* (eps + max(lambda, 0))^-a: eigenvalues of a covariance are >= 0, and rounding may push the smallest below. */
static inline double cgd_inverse_power(double lambda, double eps, double power) {
    return power == 0.0 ? 1.0 : pow(eps + (lambda > 0.0 ? lambda : 0.0), -power);
}

#endif /* CGD_EIGH_CPU_H */
