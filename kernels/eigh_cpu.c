/*
 * LAPACK's symmetric eigensolvers behind one call that climbs the first rungs of the failure ladder, and the
 * batched Jacobi solver of small blocks.
 */
#include "eigh_cpu.h"

#include <float.h>
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

/* Sweeps before a lane counts as not converged: cyclic Jacobi converges quadratically, in 6 to 10 sweeps for
   these sizes from any start. */
#define CGD_JACOBI_SWEEPS 30

/* Per lane, the sum of (a_ij / scale)^2 over the strict upper triangle (upper = 1) or over the whole matrix, with
   1 / scale in inv_scale: scaled by the matrix's largest entry, so no square overflows (entries of 1e20 square
   past float's range) or vanishes. Inlined into the solver's clones, so it runs at their vector width. */
static inline __attribute__((always_inline)) void jacobi_squares(const cgd_real *a, int B, int upper,
                                                                 const cgd_real *inv_scale, cgd_real *sum) {
    enum { L = CGD_JACOBI_LANES };
    for (int l = 0; l < L; ++l) sum[l] = 0;
    for (int i = 0; i < B; ++i)
        for (int j = upper ? i + 1 : 0; j < B; ++j) {
            const cgd_real *x = a + ((size_t)i * B + j) * L;
            for (int l = 0; l < L; ++l) {
                const cgd_real y = x[l] * inv_scale[l];
                sum[l] += y * y;
            }
        }
}

CGD_CPU_CLONES
void cgd_eigh_jacobi_batch(const cgd_real *const *C, int B, int count, cgd_real *work, cgd_real *w, cgd_real *vecs,
                           int *converged) {
    enum { L = CGD_JACOBI_LANES };
    const size_t nn = (size_t)B * (size_t)B;
    cgd_real *a = work, *v = work + nn * L; /* element (i, j) of lane l at ((i B + j) L + l) */
    for (size_t e = 0; e < nn; ++e)
        for (int l = 0; l < L; ++l) {
            const int diagonal = e % (size_t)(B + 1) == 0;
            /* idle and skipped lanes hold I: nothing to rotate */
            a[e * L + l] = l < count && C[l] ? C[l][e] : (cgd_real)diagonal;
            v[e * L + l] = (cgd_real)diagonal;
        }
    /* Converged when the off-diagonal norm is within the rounding of the matrix's: (eps ||A||_F)^2. */
    const cgd_real tol = (cgd_real)(CGD_F64 ? 2.220446049250313e-16 : 1.1920928955078125e-07);
    /* Rotations keep the Frobenius norm: ||A||_F^2 once, the off-diagonal part's each sweep. */
    cgd_real off[L], all[L], inv_scale[L];
    for (int l = 0; l < L; ++l) inv_scale[l] = 0;
    for (size_t e = 0; e < nn; ++e)
        for (int l = 0; l < L; ++l) {
            const cgd_real x = a[e * L + l] < 0 ? -a[e * L + l] : a[e * L + l];
            inv_scale[l] = x > inv_scale[l] ? x : inv_scale[l];
        }
    /* 1 / the largest entry, held at the type's largest value where that entry is subnormal */
    const cgd_real largest = (cgd_real)(CGD_F64 ? DBL_MAX : FLT_MAX);
    for (int l = 0; l < L; ++l) {
        const cgd_real r = 1 / inv_scale[l];
        inv_scale[l] = inv_scale[l] > 0 ? (r < largest ? r : largest) : 1;
    }
    jacobi_squares(a, B, 0, inv_scale, all);
    for (int sweep = 0; sweep < CGD_JACOBI_SWEEPS; ++sweep) {
        jacobi_squares(a, B, 1, inv_scale, off);
        int pending = 0;
        for (int l = 0; l < L; ++l) pending |= off[l] > tol * tol * all[l];
        if (!pending) break;
        for (int p = 0; p < B - 1; ++p)
            for (int q = p + 1; q < B; ++q) {
                cgd_real *app = a + ((size_t)p * B + p) * L, *aqq = a + ((size_t)q * B + q) * L;
                cgd_real *apq = a + ((size_t)p * B + q) * L, *aqp = a + ((size_t)q * B + p) * L;
                cgd_real c[L], s[L];
                for (int l = 0; l < L; ++l) {
                    /* The rotation that zeroes a_pq: t = tan(phi), the smaller root of t^2 + 2 theta t - 1 = 0
                       (Rutishauser's stable form); a_pq = 0 (or negligible, theta = Inf) rotates by 0. */
                    const cgd_real x = apq[l], theta = (aqq[l] - app[l]) / (2 * x);
                    const cgd_real mag = theta < 0 ? -theta : theta;
                    cgd_real t = (theta < 0 ? -1 : 1) / (mag + cgd_rsqrt(theta * theta + 1));
                    t = x != 0 && mag == mag ? t : 0;
                    c[l] = 1 / cgd_rsqrt(t * t + 1);
                    s[l] = t * c[l];
                    app[l] -= t * x;
                    aqq[l] += t * x;
                    apq[l] = aqp[l] = 0;
                }
                for (int k = 0; k < B; ++k) {
                    if (k == p || k == q) continue;
                    cgd_real *akp = a + ((size_t)k * B + p) * L, *akq = a + ((size_t)k * B + q) * L;
                    cgd_real *apk = a + ((size_t)p * B + k) * L, *aqk = a + ((size_t)q * B + k) * L;
                    for (int l = 0; l < L; ++l) {
                        const cgd_real x = akp[l], y = akq[l];
                        akp[l] = apk[l] = c[l] * x - s[l] * y;
                        akq[l] = aqk[l] = s[l] * x + c[l] * y;
                    }
                }
                for (int k = 0; k < B; ++k) {
                    cgd_real *vkp = v + ((size_t)k * B + p) * L, *vkq = v + ((size_t)k * B + q) * L;
                    for (int l = 0; l < L; ++l) {
                        const cgd_real x = vkp[l], y = vkq[l];
                        vkp[l] = c[l] * x - s[l] * y;
                        vkq[l] = s[l] * x + c[l] * y;
                    }
                }
            }
    }
    jacobi_squares(a, B, 1, inv_scale, off);
    for (int l = 0; l < count; ++l) {
        converged[l] = C[l] && off[l] <= tol * tol * all[l];
        if (!C[l]) continue;
        /* Ascending order, as LAPACK returns them: an insertion sort of the B indices by eigenvalue. */
        int order[CGD_JACOBI_MAX_BLOCK];
        for (int k = 0; k < B; ++k) {
            int at = k;
            const cgd_real lambda = a[((size_t)k * B + k) * L + l];
            while (at > 0 && a[((size_t)order[at - 1] * B + order[at - 1]) * L + l] > lambda) {
                order[at] = order[at - 1];
                --at;
            }
            order[at] = k;
        }
        for (int k = 0; k < B; ++k) {
            const int src = order[k];
            w[(size_t)l * B + k] = a[((size_t)src * B + src) * L + l];
            for (int i = 0; i < B; ++i) vecs[(size_t)l * nn + (size_t)k * B + i] = v[((size_t)i * B + src) * L + l];
        }
    }
}
