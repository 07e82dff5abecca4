/*
 * The CPU symmetric eigensolver shared by block and Kronecker-factored CGD: LAPACK ssyevd, then dsyevd when
 * float32 fails or returns a non-finite value (the first two rungs of the failure ladder in cgd.h). Internal.
 */
#ifndef CGD_EIGH_CPU_H
#define CGD_EIGH_CPU_H

/* Workspace of eigendecompositions up to n x n; one per thread, reused for every matrix of that size or smaller
   (LAPACK's workspace needs grow with n). */
typedef struct cgd_eigh_scratch {
    int n, lwork, liwork, dlwork, dliwork;
    float *a, *w, *work;
    double *da, *dw, *dwork;
    int *iwork;
} cgd_eigh_scratch;

/* 0 on success, 1 when out of memory (nothing left allocated). */
int cgd_eigh_scratch_init(cgd_eigh_scratch *s, int n);
void cgd_eigh_scratch_free(cgd_eigh_scratch *s);

/*
 * Eigendecomposes the symmetric n x n matrix C, n <= s->n (either triangle layout: it is symmetric). Returns
 * CGD_BLOCK_FP32 with eigenvalues (ascending) in s->w and eigenvectors in s->a (column-major: column k is
 * eigenvector k), CGD_BLOCK_FP64 with them in s->dw and s->da, or -1 when both solvers failed.
 */
int cgd_eigh_solve(const float *C, int n, cgd_eigh_scratch *s);

/* (eps + max(lambda, 0))^-a: eigenvalues of a covariance are >= 0, and rounding may push the smallest below. */
double cgd_inverse_power(double lambda, double eps, double power);

#endif /* CGD_EIGH_CPU_H */
