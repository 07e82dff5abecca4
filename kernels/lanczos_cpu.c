/*
 * The full/block metric's direction (eps I + C)^-a f without an eigendecomposition of C: Lanczos on the Krylov
 * space of C and f, in double whatever the state's type. With the orthonormal basis Q_k of
 * span{f, C f, ..., C^(k-1) f} and the tridiagonal T_k = Q_k^T C Q_k, the direction is approximated by
 * |f| Q_k h(T_k) e_1 with h(x) = (eps + max(x, 0))^-a, exact once the space is invariant under C (k <= n). Each
 * iteration costs one product with C (one read of the matrix: O(n^2) rather than the eigendecomposition's
 * O(n^3)), and it converges in as many iterations as the spectrum seen from f has clusters. The basis is
 * re-orthogonalised in full (classical Gram-Schmidt, twice), so rounding does not bring back converged
 * directions as duplicate Ritz values.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "eigh_cpu.h"
#include "kernels.h"


void cgd_lanczos_scratch_free(cgd_lanczos_scratch *s) {
    free(s->q);
    free(s->w);
    free(s->alpha);
    memset(s, 0, sizeof *s);
}

int cgd_lanczos_scratch_init(cgd_lanczos_scratch *s, int n) {
    memset(s, 0, sizeof *s);
    s->n = n;
    s->kmax = n < CGD_LANCZOS_MAX_ITER ? n : CGD_LANCZOS_MAX_ITER;
    if (cgd_hooks.lanczos_iterations > 0 && cgd_hooks.lanczos_iterations < s->kmax)
        s->kmax = cgd_hooks.lanczos_iterations;
    const size_t k = (size_t)s->kmax;
    s->q = cgd_host_alloc((k + 1) * (size_t)n * sizeof(double));
    s->w = cgd_host_alloc(2 * (size_t)n * sizeof(double));
    /* alpha, beta, their copies for the small solver, the coefficients now and before, and T's vectors */
    s->alpha = cgd_host_alloc((6 * k + k * k) * sizeof(double));
    if (!s->q || !s->w || !s->alpha) {
        cgd_lanczos_scratch_free(s);
        return 1;
    }
    return 0;
}

/* The dot product of row `row` (float) with v (double) into P partial sums, explicit fused multiply-adds, then
   added pairwise in a fixed order: the same bits on every CPU clone. Two rows at once share v's loads. */
enum { CGD_ROW_SUMS = 32 };

static inline __attribute__((always_inline)) double fold(double *part) {
    for (int width = CGD_ROW_SUMS / 2; width > 0; width /= 2)
        for (int l = 0; l < width; ++l) part[l] += part[l + width];
    return part[0];
}

static inline __attribute__((always_inline)) void row_dots(const cgd_real *r0, const cgd_real *r1, const double *v,
                                                           int n, double *d0, double *d1) {
    enum { P = CGD_ROW_SUMS };
    double a[P] = {0}, b[P] = {0};
    int j = 0;
    for (; j + P <= n; j += P)
        for (int l = 0; l < P; ++l) {
            a[l] = fma((double)r0[j + l], v[j + l], a[l]);
            if (r1) b[l] = fma((double)r1[j + l], v[j + l], b[l]);
        }
    for (int l = 0; j < n; ++j, ++l) {
        a[l] = fma((double)r0[j], v[j], a[l]);
        if (r1) b[l] = fma((double)r1[j], v[j], b[l]);
    }
    *d0 = fold(a);
    if (r1) *d1 = fold(b);
}

/* Rows i and i + 1 (when i + 1 < n) of y = scale M v - (centered ? f fv : 0). */
static inline __attribute__((always_inline)) void apply_pair(const cgd_real *M, double scale, const cgd_real *f,
                                                             int centered, double fv, int n, const double *v, int i,
                                                             double *y) {
    const cgd_real *r0 = M + (size_t)i * (size_t)n;
    double d0 = 0.0, d1 = 0.0;
    if (i + 1 < n)
        row_dots(r0, r0 + n, v, n, &d0, &d1);
    else
        row_dots(r0, NULL, v, n, &d0, &d1);
    y[i] = scale * d0 - (centered ? (double)f[i] * fv : 0.0);
    if (i + 1 < n) y[i + 1] = scale * d1 - (centered ? (double)f[i + 1] * fv : 0.0);
}

/* y = scale M v - (centered ? f (f . v) : 0) for the row-major n x n M in double: each row summed alike whichever
   thread takes its pair of rows, so the result does not depend on the thread count. Pairs are spread over the
   threads when `parallel` (a single large block has the machine to itself); otherwise no OpenMP region is
   entered (its set-up would cost as much as a small block's product). */
CGD_CPU_CLONES
static void apply_c(const cgd_real *M, double scale, const cgd_real *f, int centered, int n, const double *v,
                    int parallel, double *y) {
    double fv = 0.0;
    if (centered)
        for (int j = 0; j < n; ++j) fv += (double)f[j] * v[j];
    const int pairs = (n + 1) / 2;
    if (parallel) {
#pragma omp parallel for schedule(static)
        for (int k = 0; k < pairs; ++k) apply_pair(M, scale, f, centered, fv, n, v, 2 * k, y);
    } else {
        for (int k = 0; k < pairs; ++k) apply_pair(M, scale, f, centered, fv, n, v, 2 * k, y);
    }
}

/* The dot product of two n-vectors in 16 fixed partial sums: vectorised, and the same bits on every CPU clone. */
static inline __attribute__((always_inline)) double dot16(const double *a, const double *b, int n) {
    double part[16] = {0};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; ++l) part[l] += a[i + l] * b[i + l];
    for (int l = 0; i < n; ++i, ++l) part[l] += a[i] * b[i];
    double sum = 0.0;
    for (int l = 0; l < 16; ++l) sum += part[l];
    return sum;
}

/* One classical Gram-Schmidt pass, w <- w - Q^T (Q w) over the basis rows 0..k (h: k + 1 doubles), returning
   the coefficient of row k (the diagonal entry of T the pass found). */
CGD_CPU_CLONES
static double orthogonalise(const double *q, int k, int n, double *h, double *w) {
    for (int r = 0; r <= k; ++r) h[r] = dot16(q + (size_t)r * n, w, n);
    for (int r = 0; r <= k; ++r) {
        const double *qr = q + (size_t)r * n;
        const double hr = h[r];
        for (int i = 0; i < n; ++i) w[i] -= hr * qr[i];
    }
    return h[k];
}

CGD_CPU_CLONES
static double norm2(const double *w, int n) { return sqrt(dot16(w, w, n)); }

/* coef = |f| Z h(theta) Z^T e_1 for T_m (alpha, beta) = Z diag(theta) Z^T; 0 on success. */
static int small_function(cgd_lanczos_scratch *s, int m, double norm_f, double eps, double power, double *coef) {
    const int k = s->kmax;
    double *d = s->alpha + 2 * (size_t)k, *e = d + k, *z = s->alpha + 6 * (size_t)k;
    memcpy(d, s->alpha, (size_t)m * sizeof(double));
    memcpy(e, s->alpha + k, (size_t)m * sizeof(double));
    if (cgd_tridiagonal_eigh(m, d, e, z)) return 1;
    for (int i = 0; i < m; ++i) coef[i] = 0.0;
    for (int j = 0; j < m; ++j) { /* eigenvector j at z + j m */
        const double *zj = z + (size_t)j * m;
        const double weight = norm_f * cgd_inverse_power(d[j], eps, power) * zj[0];
        for (int i = 0; i < m; ++i) coef[i] += weight * zj[i];
    }
    for (int i = 0; i < m; ++i)
        if (!isfinite(coef[i])) return 1;
    return 0;
}

int cgd_lanczos_direction(const cgd_real *M, double scale, const cgd_real *f, int centered, int n, double eps,
                          double power, int parallel, cgd_lanczos_scratch *s, cgd_real *out) {
    const int k_max = s->kmax;
    double *q = s->q, *w = s->w, *alpha = s->alpha, *beta = alpha + k_max;
    double *coef = alpha + 4 * (size_t)k_max, *prev = coef + k_max, *h = w + n;
    double norm_f = 0.0;
    for (int i = 0; i < n; ++i) norm_f += (double)f[i] * f[i];
    norm_f = sqrt(norm_f);
    if (!isfinite(norm_f)) return -1;
    if (norm_f == 0.0 || power == 0.0) { /* no force, or SGD's metric: the identity */
        for (int i = 0; i < n; ++i) out[i] = f[i];
        return 1;
    }
    for (int i = 0; i < n; ++i) q[i] = f[i] / norm_f;
    /* Converged when the coefficients moved by less than the tolerance on two consecutive checks (one small
       move can be a pause before a new cluster of the spectrum is found), or when the space is invariant. */
    const double tol = CGD_F64 ? 1e-10 : 1e-7;
    int settled = 0, m = 0, prev_m = 0, done = 0;
    double norm_t = 0.0;
    for (int k = 0; k < k_max && !done; ++k) {
        double *qk = q + (size_t)k * n;
        apply_c(M, scale, f, centered, n, qk, parallel, w);
        alpha[k] = orthogonalise(q, k, n, h, w);
        alpha[k] += orthogonalise(q, k, n, h, w);
        const double b = norm2(w, n);
        if (!isfinite(alpha[k]) || !isfinite(b)) return -1;
        beta[k] = b;
        norm_t = fmax(norm_t, fabs(alpha[k]) + b + (k ? beta[k - 1] : 0.0));
        m = k + 1;
        const int invariant = b <= 1e-14 * norm_t || m == n;
        /* a check (the small eigenproblem, O(m^3)) costs about a small block's product: every iteration to 4,
           every 2nd to 64, then every 8th */
        if (invariant || m <= 4 || (m <= 64 && m % 2 == 0) || m % 8 == 0 || m == k_max) {
            if (small_function(s, m, norm_f, eps, power, coef)) return -1;
            double diff = 0.0, size = 0.0;
            for (int i = 0; i < m; ++i) {
                const double before = i < prev_m ? prev[i] : 0.0;
                diff += (coef[i] - before) * (coef[i] - before);
                size += coef[i] * coef[i];
            }
            settled = prev_m > 0 && diff <= tol * tol * size ? settled + 1 : 0;
            done = invariant || settled >= 2;
            memcpy(prev, coef, (size_t)m * sizeof(double));
            prev_m = m;
        }
        if (!done && k + 1 < k_max)
            for (int i = 0; i < n; ++i) q[(size_t)(k + 1) * n + i] = w[i] / b;
    }
    if (!done) return 0;
    for (int i = 0; i < n; ++i) w[i] = 0.0;
    for (int r = 0; r < m; ++r) {
        const double *qr = q + (size_t)r * n;
        for (int i = 0; i < n; ++i) w[i] += coef[r] * qr[i];
    }
    for (int i = 0; i < n; ++i) {
        if (!isfinite(w[i])) return -1;
        out[i] = (cgd_real)w[i];
    }
    return m;
}
