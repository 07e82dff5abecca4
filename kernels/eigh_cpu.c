/*
 * LAPACK's symmetric eigensolvers behind one call that climbs the first rungs of the failure ladder.
 */
#include "eigh_cpu.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cgd.h"
#include "kernels.h"

/* LAPACK's Fortran symbols, with gfortran's trailing hidden lengths of the character arguments. */
void ssyevd_(const char *jobz, const char *uplo, const int *n, float *a, const int *lda, float *w, float *work,
             const int *lwork, int *iwork, const int *liwork, int *info, size_t jobz_len, size_t uplo_len);
void dsyevd_(const char *jobz, const char *uplo, const int *n, double *a, const int *lda, double *w, double *work,
             const int *lwork, int *iwork, const int *liwork, int *info, size_t jobz_len, size_t uplo_len);

#if CGD_F64
#define syevd_ dsyevd_
#else
#define syevd_ ssyevd_
#endif

void cgd_eigh_scratch_free(cgd_eigh_scratch *s) {
    free(s->a);
    free(s->w);
    free(s->work);
    free(s->da);
    free(s->dw);
    free(s->dwork);
    free(s->iwork);
    memset(s, 0, sizeof *s);
}

int cgd_eigh_scratch_init(cgd_eigh_scratch *s, int n) {
    memset(s, 0, sizeof *s);
    s->n = n;
    int query = -1, info = 0, iq = 0;
    cgd_real rq = 0;
    syevd_("V", "U", &n, NULL, &n, NULL, &rq, &query, &iq, &query, &info, 1, 1);
    s->lwork = (int)rq + 1;
    s->liwork = iq;
    size_t nn = (size_t)n * (size_t)n;
    s->a = cgd_host_alloc(nn * sizeof(cgd_real));
    s->w = cgd_host_alloc((size_t)n * sizeof(cgd_real));
    s->work = cgd_host_alloc((size_t)s->lwork * sizeof(cgd_real));
    int ok = s->a && s->w && s->work;
#if !CGD_F64
    double dq = 0.0;
    dsyevd_("V", "U", &n, NULL, &n, NULL, &dq, &query, &iq, &query, &info, 1, 1);
    s->dlwork = (int)dq + 1;
    s->liwork = iq > s->liwork ? iq : s->liwork;
    s->da = cgd_host_alloc(nn * sizeof(double));
    s->dw = cgd_host_alloc((size_t)n * sizeof(double));
    s->dwork = cgd_host_alloc((size_t)s->dlwork * sizeof(double));
    ok = ok && s->da && s->dw && s->dwork;
#endif
    s->iwork = cgd_host_alloc((size_t)s->liwork * sizeof(int));
    if (!ok || !s->iwork) {
        cgd_eigh_scratch_free(s);
        return 1;
    }
    return 0;
}

static int all_finite_r(const cgd_real *x, size_t n) {
    for (size_t i = 0; i < n; ++i)
        if (!isfinite(x[i])) return 0;
    return 1;
}

#if !CGD_F64
static int all_finite_d(const double *x, size_t n) {
    for (size_t i = 0; i < n; ++i)
        if (!isfinite(x[i])) return 0;
    return 1;
}
#endif

int cgd_eigh_solve(const cgd_real *C, int n, cgd_eigh_scratch *s) {
    int info = 0;
#pragma omp atomic
    ++cgd_hooks.eigh_calls;
    size_t nn = (size_t)n * (size_t)n;
    memcpy(s->a, C, nn * sizeof(cgd_real));
    syevd_("V", "U", &n, s->a, &n, s->w, s->work, &s->lwork, s->iwork, &s->liwork, &info, 1, 1);
    if (info == 0 && all_finite_r(s->w, (size_t)n) && all_finite_r(s->a, nn)) return CGD_BLOCK_FP32;
#if !CGD_F64
    for (size_t i = 0; i < nn; ++i) s->da[i] = C[i];
    info = 0;
    dsyevd_("V", "U", &n, s->da, &n, s->dw, s->dwork, &s->dlwork, s->iwork, &s->liwork, &info, 1, 1);
    if (info == 0 && all_finite_d(s->dw, (size_t)n) && all_finite_d(s->da, nn)) return CGD_BLOCK_FP64;
#endif
    return -1;
}
