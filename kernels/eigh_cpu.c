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

/* Sweeps before a lane counts as not converged: Jacobi converges quadratically, in 6 to 10 sweeps for these
   sizes from any start. */
#define CGD_JACOBI_SWEEPS 30

/* Per lane, the sum of (a_ij / scale)^2 over the strict upper triangle (upper = 1) or over the whole matrix, with
   1 / scale in inv_scale: scaled by the matrix's largest entry, so no square overflows (entries of 1e20 square
   past float's range) or vanishes. Inlined into the solver's clones, so it runs at their vector width. */
static inline __attribute__((always_inline)) void jacobi_squares(const cgd_real *a, int B, int upper,
                                                                 const cgd_real *inv_scale, cgd_real *sum) {
    enum { L = CGD_JACOBI_LANES };
    const cgd_lanes k = *(const cgd_lanes *)inv_scale;
    /* four partial sums, so the additions do not wait on each other in one chain */
    cgd_lanes part[4] = {k - k, k - k, k - k, k - k};
    int n = 0;
    for (int i = 0; i < B; ++i)
        for (int j = upper ? i + 1 : 0; j < B; ++j, ++n) {
            const cgd_lanes y = *(const cgd_lanes *)(a + ((size_t)i * B + j) * L) * k;
            part[n & 3] += y * y;
        }
    *(cgd_lanes *)sum = (part[0] + part[1]) + (part[2] + part[3]);
}

/* The rotation that zeroes a_pq, lane by lane, applied to its own 2 x 2 block. With d = a_qq - a_pp and
   e = 2 a_pq, t = tan(phi) = sign(d) e / q, q = |d| + sqrt(d^2 + e^2), is the smaller root of t^2 + 2 (d / e) t
   - 1 = 0 (Rutishauser's stable form with its division by e folded in), and cos, sin = (q, sign(d) e) /
   sqrt(q^2 + e^2): on the chain each round's rotations wait for, two square roots and then three divisions side
   by side, rather than three divisions and two roots in a row. d and e are scaled by the lane's 1 / largest
   entry, so no square overflows; where q^2 + e^2 falls below 16 times the smallest normal (a_pq and a_qq - a_pp
   both under 1e-18 of that entry in float) the square roots would lose bits to subnormals, and the entry is far
   below the convergence test's rounding: it rotates by 0. */
static inline __attribute__((always_inline)) void jacobi_angle(cgd_real *app, cgd_real *aqq, cgd_real *apq,
                                                               cgd_real *aqp, const cgd_real *inv_scale, cgd_real *c,
                                                               cgd_real *s) {
    enum { L = CGD_JACOBI_LANES };
    const cgd_real tiny = (cgd_real)(CGD_F64 ? DBL_MIN : FLT_MIN);
    for (int l = 0; l < L; ++l) {
        const cgd_real x = apq[l], d = (aqq[l] - app[l]) * inv_scale[l], e = 2 * x * inv_scale[l];
        const cgd_real q = (d < 0 ? -d : d) + cgd_rsqrt(d * d + e * e), nn = q * q + e * e, n = cgd_rsqrt(nn);
        const cgd_real se = d < 0 ? -e : e;
        const int rotate = nn >= 16 * tiny;
        const cgd_real t = rotate ? se / q : 0;
        c[l] = rotate ? q / n : 1;
        s[l] = rotate ? se / n : 0;
        app[l] -= t * x;
        aqq[l] += t * x;
        apq[l] = aqp[l] = 0;
    }
}

/* (x, y) <- (c x - s y, s x + c y) on every lane: one rotation of a row or column pair. */
static inline __attribute__((always_inline)) void jacobi_rotate(cgd_real *x, cgd_real *y, const cgd_real *c,
                                                                const cgd_real *s) {
    const cgd_lanes u = *(const cgd_lanes *)x, v = *(const cgd_lanes *)y;
    const cgd_lanes cc = *(const cgd_lanes *)c, ss = *(const cgd_lanes *)s;
    *(cgd_lanes *)x = cc * u - ss * v;
    *(cgd_lanes *)y = ss * u + cc * v;
}

/* The entries (p_i, p_j), (p_i, q_j), (q_i, p_j), (q_i, q_j) of A and their mirror images after the rotations
   of pairs i (from the left, J_i^T) and j (from the right, J_j): two disjoint pairs' 2 x 2 block. */
static inline __attribute__((always_inline)) void jacobi_pair_block(cgd_real *a, int B, int pi, int qi, int pj,
                                                                    int qj, const cgd_real *ci, const cgd_real *si,
                                                                    const cgd_real *cj, const cgd_real *sj) {
    enum { L = CGD_JACOBI_LANES };
#define CGD_AT(i, j) ((cgd_lanes *)(a + ((size_t)(i) * B + (j)) * L))
    cgd_lanes *x00 = CGD_AT(pi, pj), *x01 = CGD_AT(pi, qj), *x10 = CGD_AT(qi, pj), *x11 = CGD_AT(qi, qj);
#define CGD_MIRROR(i, j, value) (*CGD_AT(i, j) = *CGD_AT(j, i) = (value))
    const cgd_lanes c1 = *(const cgd_lanes *)ci, s1 = *(const cgd_lanes *)si;
    const cgd_lanes c2 = *(const cgd_lanes *)cj, s2 = *(const cgd_lanes *)sj;
    const cgd_lanes y00 = c1 * *x00 - s1 * *x10, y01 = c1 * *x01 - s1 * *x11;
    const cgd_lanes y10 = s1 * *x00 + c1 * *x10, y11 = s1 * *x01 + c1 * *x11;
    CGD_MIRROR(pi, pj, c2 * y00 - s2 * y01);
    CGD_MIRROR(pi, qj, s2 * y00 + c2 * y01);
    CGD_MIRROR(qi, pj, c2 * y10 - s2 * y11);
    CGD_MIRROR(qi, qj, s2 * y10 + c2 * y11);
#undef CGD_MIRROR
#undef CGD_AT
}

CGD_CPU_CLONES
void cgd_eigh_jacobi_lanes(int B, cgd_real *a, cgd_real *v, int *converged) {
    enum { L = CGD_JACOBI_LANES, HALF = CGD_JACOBI_MAX_BLOCK / 2 };
    const size_t nn = (size_t)B * (size_t)B;
    for (size_t e = 0; e < nn; ++e)
        for (int l = 0; l < L; ++l) v[e * L + l] = (cgd_real)(e % (size_t)(B + 1) == 0);
    /* The round-robin order of a sweep: n - 1 rounds of n / 2 disjoint pairs (n = B, or B + 1 for an odd B, whose
       phantom index B leaves one index out of each round), each pair once a sweep. Disjoint rotations commute and
       leave each other's (p, p), (q, q) and (p, q) entries alone, so a round's angles all come from the same
       matrix: their divisions and square roots overlap instead of each waiting on the previous rotation, as in
       the cyclic order, and the round's rotations reach A as 2 x 2 blocks. */
    const int n = B + (B & 1), rounds = n - 1;
    int pair_p[CGD_JACOBI_MAX_BLOCK][HALF], pair_q[CGD_JACOBI_MAX_BLOCK][HALF], pairs[CGD_JACOBI_MAX_BLOCK],
        idle[CGD_JACOBI_MAX_BLOCK];
    for (int r = 0; r < rounds; ++r) {
        pairs[r] = 0;
        idle[r] = -1;
        for (int k = 0; k < n / 2; ++k) {
            /* the circle method: n - 1 fixed, the others turning one place a round */
            const int x = k == 0 ? n - 1 : (r + k) % (n - 1), y = (r - k + n - 1) % (n - 1);
            if (x >= B || y >= B) {
                idle[r] = x >= B ? y : x;
                continue;
            }
            pair_p[r][pairs[r]] = x < y ? x : y;
            pair_q[r][pairs[r]++] = x < y ? y : x;
        }
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
#define CGD_AT(m, i, j) ((m) + ((size_t)(i) * B + (j)) * L)
    for (int sweep = 0; sweep < CGD_JACOBI_SWEEPS; ++sweep) {
        jacobi_squares(a, B, 1, inv_scale, off);
        int pending = 0;
        for (int l = 0; l < L; ++l) pending |= off[l] > tol * tol * all[l];
        if (!pending) break;
        for (int r = 0; r < rounds; ++r) {
            const int m = pairs[r], *P = pair_p[r], *Q = pair_q[r];
            cgd_real c[HALF][L], s[HALF][L];
            for (int i = 0; i < m; ++i)
                jacobi_angle(CGD_AT(a, P[i], P[i]), CGD_AT(a, Q[i], Q[i]), CGD_AT(a, P[i], Q[i]),
                             CGD_AT(a, Q[i], P[i]), inv_scale, c[i], s[i]);
            for (int i = 0; i < m; ++i)
                for (int j = i + 1; j < m; ++j) jacobi_pair_block(a, B, P[i], Q[i], P[j], Q[j], c[i], s[i], c[j], s[j]);
            if (idle[r] >= 0) /* the index left out: only its pairs' rotations from the right, and the mirror */
                for (int i = 0; i < m; ++i) {
                    const int k = idle[r];
                    jacobi_rotate(CGD_AT(a, k, P[i]), CGD_AT(a, k, Q[i]), c[i], s[i]);
                    *(cgd_lanes *)CGD_AT(a, P[i], k) = *(const cgd_lanes *)CGD_AT(a, k, P[i]);
                    *(cgd_lanes *)CGD_AT(a, Q[i], k) = *(const cgd_lanes *)CGD_AT(a, k, Q[i]);
                }
            for (int k = 0; k < B; ++k)
                for (int i = 0; i < m; ++i) jacobi_rotate(CGD_AT(v, k, P[i]), CGD_AT(v, k, Q[i]), c[i], s[i]);
        }
    }
#undef CGD_AT
    jacobi_squares(a, B, 1, inv_scale, off);
    for (int l = 0; l < L; ++l) converged[l] = off[l] <= tol * tol * all[l];
}

int cgd_tridiagonal_eigh(int n, double *d, double *e, double *z) {
    for (int i = 0; i < n; ++i)
        for (int j = 0; j < n; ++j) z[(size_t)i * n + j] = i == j;
    if (n > 0) e[n - 1] = 0.0;
    for (int l = 0; l < n; ++l) {
        for (int iterations = 0;; ++iterations) {
            /* the first negligible off-diagonal entry at or after l splits T there */
            int m = l;
            for (; m < n - 1; ++m)
                if (fabs(e[m]) <= DBL_EPSILON * (fabs(d[m]) + fabs(d[m + 1]))) break;
            if (m == l) break;
            if (iterations == 30 * n) return 1;
            /* Wilkinson's shift from the leading 2 x 2 block, then one implicit QL sweep from m up to l */
            double g = (d[l + 1] - d[l]) / (2.0 * e[l]);
            double r = hypot(g, 1.0);
            g = d[m] - d[l] + e[l] / (g + (g < 0 ? -r : r));
            double s = 1.0, c = 1.0, p = 0.0;
            int i = m - 1;
            for (; i >= l; --i) {
                const double f = s * e[i], b = c * e[i];
                r = hypot(f, g);
                e[i + 1] = r;
                if (r == 0.0) { /* the rotation underflowed: deflate at i + 1 and sweep again */
                    d[i + 1] -= p;
                    e[m] = 0.0;
                    break;
                }
                s = f / r;
                c = g / r;
                g = d[i + 1] - p;
                r = (d[i] - g) * s + 2.0 * c * b;
                p = s * r;
                d[i + 1] = g + p;
                g = c * r - b;
                /* columns i and i + 1 of the accumulated rotations, each contiguous */
                double *zi = z + (size_t)i * n, *zn = zi + n;
                for (int k = 0; k < n; ++k) {
                    const double zik = zi[k], znk = zn[k];
                    zn[k] = s * zik + c * znk;
                    zi[k] = c * zik - s * znk;
                }
            }
            if (r == 0.0 && i >= l) continue;
            d[l] -= p;
            e[l] = g;
            e[m] = 0.0;
        }
    }
    for (int i = 0; i < n; ++i)
        if (!isfinite(d[i])) return 1;
    return 0;
}
