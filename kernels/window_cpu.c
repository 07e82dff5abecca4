/*
 * Exact full CGD over a window of gradients (cgd.h, cgd_window_step), in the build's real type (real.h). The EMA
 * second moment is a scaled identity plus a weighted sum of gradient outer products,
 *     M2_t = iota_t I + sum_s (1 - beta2) beta2^(t - s) g_s g_s^T,   iota_t = beta2^t m2_init,
 * and the window keeps the identity's coefficient exactly and the last r gradients' terms (all of them while
 * t <= r; afterwards the older ones, a fraction beta2^r of the EMA's weight, are dropped). With the kept vectors
 * as the columns of U (the window, and for the centered metric the force F with weight -1),
 *     C = c I + U D U^T,   c = iota_t / bc2,   D = diag(w_s / bc2, ..., -1),
 * so C is c on the complement of span(U), and there an m x m problem (m <= r + 1) gives the metric exactly:
 * with the Gram matrix K = U^T U = W S W^T, Q = U W S^-1/2 is an orthonormal basis of the span, Q^T C Q =
 * c I + S^1/2 W^T D W S^1/2 = V (c + L) V^T, and
 *     (eps I + C)^-a F = h(c) F + U z,   z = W S^-1/2 V [h(c + L) - h(c)] V^T S^-1/2 W^T (U^T F)
 * (computed with the columns scaled to unit length first: window_coefficients),
 * h(x) = (eps + max(x, 0))^-a. Per step: the new gradient's dot products with the window (its row of K, kept in
 * the state), those of F, two m x m eigendecompositions in double, and one pass to apply U z: O(n r + r^3), and
 * n r state values instead of n^2. Directions where the unit columns' Gram matrix has an eigenvalue below 1e-12
 * of its largest (a repeated gradient) carry nothing of their own and are dropped. Every n-length sum runs over
 * fixed chunks with fixed partial sums, added in order, so the result does not depend on the thread count.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "eigh_cpu.h"
#include "kernels.h"
#include "real.h"

/* LAPACK's symmetric eigensolver, with gfortran's trailing hidden lengths of the character arguments. */
void dsyev_(const char *jobz, const char *uplo, const int *n, double *a, const int *lda, double *w, double *work,
            const int *lwork, int *info, size_t jobz_len, size_t uplo_len);

#define CGD_WINDOW_CHUNK ((int64_t)1 << 14)
#define CGD_WINDOW_LANES 8
#define CGD_WINDOW_PIECE 256
/* Where an eigenvalue of the unit columns' Gram matrix (diagonal 1) counts as zero, relative to its largest: far
   above the rounding of its entries (double sums of exact products of state values), far below any direction a
   gradient of its own contributes. */
#define CGD_WINDOW_RANK_TOL 1e-12

/* x . y over [begin, end) in CGD_WINDOW_LANES fixed partial sums, added in order. */
static double dot_range(const cgd_real *x, const cgd_real *y, int64_t begin, int64_t end) {
    double part[CGD_WINDOW_LANES] = {0};
    int64_t i = begin;
    for (; i + CGD_WINDOW_LANES <= end; i += CGD_WINDOW_LANES)
        for (int l = 0; l < CGD_WINDOW_LANES; ++l) part[l] += (double)x[i + l] * (double)y[i + l];
    for (int l = 0; i < end; ++i, ++l) part[l] += (double)x[i] * (double)y[i];
    double sum = 0.0;
    for (int l = 0; l < CGD_WINDOW_LANES; ++l) sum += part[l];
    return sum;
}

/* out[a * ny + b] = xs[a] . ys[b] for nx x ny vectors of length n: per chunk into partial (chunks * nx * ny
   doubles), then the chunks added in order. */
static void dots(const cgd_real *const *xs, int nx, const cgd_real *const *ys, int ny, int64_t n, double *partial,
                 double *out) {
    const int64_t chunks = (n + CGD_WINDOW_CHUNK - 1) / CGD_WINDOW_CHUNK, pairs = (int64_t)nx * ny;
#pragma omp parallel if (n * pairs >= CGD_CPU_PARALLEL_MIN)
    {
        const cgd_cpu_share share = cgd_cpu_my_share();
        for (int64_t c = share.id; c < chunks; c += share.threads) {
            const int64_t begin = c * CGD_WINDOW_CHUNK;
            const int64_t end = begin + CGD_WINDOW_CHUNK < n ? begin + CGD_WINDOW_CHUNK : n;
            for (int a = 0; a < nx; ++a)
                for (int b = 0; b < ny; ++b) partial[c * pairs + a * ny + b] = dot_range(xs[a], ys[b], begin, end);
        }
    }
    for (int64_t p = 0; p < pairs; ++p) out[p] = 0.0;
    for (int64_t c = 0; c < chunks; ++c)
        for (int64_t p = 0; p < pairs; ++p) out[p] += partial[c * pairs + p];
}

/* Eigenvalues (ascending, w) and eigenvectors (a, column-major) of the symmetric m x m a; 0 on success. */
static int eig_double(int m, double *a, double *w, double *work, int lwork) {
    int info = 0;
    dsyev_("V", "U", &m, a, &m, w, work, &lwork, &info, 1, 1);
    if (info != 0) return 1;
    for (int i = 0; i < m; ++i)
        if (!isfinite(w[i])) return 1;
    return 0;
}

/* out = X^T x for the column-major rows x cols X: out[j] = column j . x. */
static void columns_dot(const double *X, int rows, int cols, const double *x, double *out) {
    for (int j = 0; j < cols; ++j) {
        double sum = 0.0;
        for (int i = 0; i < rows; ++i) sum += X[(size_t)j * rows + i] * x[i];
        out[j] = sum;
    }
}

/* out = X y for the column-major rows x cols X, each entry summed over the columns in order. */
static void columns_combine(const double *X, int rows, int cols, const double *y, double *out) {
    for (int i = 0; i < rows; ++i) {
        double sum = 0.0;
        for (int j = 0; j < cols; ++j) sum += X[(size_t)j * rows + i] * y[j];
        out[i] = sum;
    }
}

/* z (m) such that the direction is h(c) F + U z, from the Gram matrix K (m x m, row-major), the weights D and
   U^T F; 0 on success, 1 when an eigendecomposition failed. s: scratch of 4 m^2 + 5 m + lwork doubles.
   The span is found from the Gram matrix of the unit columns, K' = N K N with N = diag(K_ii^-1/2): its small
   eigenvalues mean dependent columns, whatever their norms (on K itself a gradient 10^6 times shorter than
   another would look dependent and lose its variance). With K' = W S W^T and its kept part, B = N W_p S_p^-1/2
   spans the columns orthonormally, and Q^T U D U^T Q = S_p^1/2 W_p^T diag(D_i K_ii) W_p S_p^1/2. */
static int window_coefficients(int m, const double *K, const double *D, const double *uf, double c, double eps,
                               double power, double *s, int lwork, double *z) {
    double *W = s, *S = W + (size_t)m * m, *tmp = S + (size_t)m * m, *vals = tmp + (size_t)m * m;
    double *lam = vals + m, *y = lam + m, *v = y + m, *unit = v + m, *proj = unit + m, *work = proj + (size_t)m * m;
    for (int i = 0; i < m; ++i) unit[i] = K[(size_t)i * m + i] > 0.0 ? 1.0 / sqrt(K[(size_t)i * m + i]) : 0.0;
    for (int i = 0; i < m; ++i)
        for (int j = 0; j < m; ++j) W[(size_t)i * m + j] = unit[i] * K[(size_t)i * m + j] * unit[j];
    if (eig_double(m, W, vals, work, lwork)) return 1;
    const double top = vals[m - 1] > 0.0 ? vals[m - 1] : 0.0;
    /* The kept columns of W, scaled: B = N W_p S_p^-1/2 (m x p, column-major, p kept), and W_p S_p^1/2. */
    int p = 0;
    for (int j = 0; j < m; ++j) {
        if (!(vals[j] > CGD_WINDOW_RANK_TOL * top)) continue;
        const double root = sqrt(vals[j]);
        for (int i = 0; i < m; ++i) {
            proj[(size_t)p * m + i] = unit[i] * W[(size_t)j * m + i] / root; /* column p of B */
            tmp[(size_t)p * m + i] = W[(size_t)j * m + i] * root;            /* column p of W_p S_p^1/2 */
        }
        ++p;
    }
    for (int i = 0; i < m; ++i) z[i] = 0.0;
    if (p == 0) return 0; /* no gradient with any size yet: C = c I */
    /* S = (W_p S^1/2)^T diag(D_i K_ii) (W_p S^1/2), p x p, then its eigendecomposition V L V^T. */
    for (int a = 0; a < p; ++a)
        for (int b = a; b < p; ++b) {
            double sum = 0.0;
            for (int i = 0; i < m; ++i)
                sum += tmp[(size_t)a * m + i] * (D[i] * K[(size_t)i * m + i]) * tmp[(size_t)b * m + i];
            S[(size_t)a * p + b] = S[(size_t)b * p + a] = sum;
        }
    if (eig_double(p, S, lam, work, lwork)) return 1;
    /* y = B^T (U^T F) (p), then y <- V [h(c + L) - h(c)] V^T y, then z = B y. */
    const double base = cgd_inverse_power(c, eps, power);
    columns_dot(proj, m, p, uf, y);
    columns_dot(S, p, p, y, v);
    for (int k = 0; k < p; ++k) v[k] *= cgd_inverse_power(c + lam[k], eps, power) - base;
    columns_combine(S, p, p, v, y);
    columns_combine(proj, m, p, y, z);
    for (int i = 0; i < m; ++i)
        if (!isfinite(z[i])) return 1;
    return 0;
}

int CGD_NAME(cgd_cpu_window_step)(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_block_tensor *tensors,
                                  int64_t count, const cgd_window_state *st, const float *grad_scale,
                                  const float *skip) {
    if (skip && *skip != 0.0f) return 0;
    const int64_t n = st->n, r = st->window;
    const double taken = *st->step, t = taken + 1.0;
    const int64_t slot = (int64_t)fmod(taken, (double)r);
    const int64_t kept = taken + 1.0 < (double)r ? (int64_t)taken + 1 : r; /* window slots holding a gradient */
    const int centered = h->centered && cgd_variance_has_data(h->bias_correction, taken);
    const int m = (int)kept + (centered ? 1 : 0);
    const int lwork = 34 * (m > 1 ? m : 1);
    const int64_t chunks = (n + CGD_WINDOW_CHUNK - 1) / CGD_WINDOW_CHUNK;
    /* Everything this step needs, before any state changes: running out of memory changes nothing. small holds
       K (m^2), D, U^T F and z (3 m), window_coefficients' scratch (4 m^2 + 5 m + lwork) and the dot products. */
    const size_t pairs = 2 * (size_t)(kept + 1), mm = (size_t)m * (size_t)m;
    double *partial = cgd_host_alloc((size_t)(chunks > 0 ? chunks : 1) * pairs * sizeof(double));
    double *small = cgd_host_alloc((5 * mm + 8 * (size_t)m + (size_t)lwork + pairs) * sizeof(double));
    const cgd_real **cols = cgd_host_alloc((size_t)(kept + 1) * sizeof(*cols));
    if (!partial || !small || !cols) {
        free(partial);
        free(small);
        free(cols);
        return 1;
    }
    double *K = small, *D = K + mm, *uf = D + m, *z = uf + m, *s = z + m;
    double *products = s + 4 * mm + 5 * (size_t)m + (size_t)lwork;
    cgd_real *hist = (cgd_real *)st->history, *m1 = (cgd_real *)st->exp_avg;
    cgd_real *newest = hist + slot * n;
    const double scale = grad_scale ? (double)*grad_scale : 1.0;
    const cgd_real beta1 = (cgd_real)h->beta1, one_minus_beta1 = (cgd_real)(1.0 - h->beta1);
    /* The gradient (unscaled, ascent or descent) into its window slot, and M1's EMA, in one pass; coordinates
       no tensor covers have gradient 0 (the slot still holds an older gradient there). */
    int64_t covered = 0;
    for (int64_t ti = 0; ti <= count; ++ti) {
        const int64_t from = ti < count ? tensors[ti].offset : n;
        for (int64_t e = covered; e < from; ++e) {
            newest[e] = 0;
            m1[e] = beta1 * m1[e];
        }
        if (ti == count) break;
        const cgd_block_tensor *tt = &tensors[ti];
        covered = tt->offset + tt->numel;
        for (int64_t i = 0; i < tt->numel; ++i) {
            cgd_real g = cgd_load_real(dtype, tt->grad, i);
            if (grad_scale) g = (cgd_real)(g / scale);
            if (h->maximize) g = -g;
            const int64_t e = tt->offset + i;
            newest[e] = g;
            m1[e] = beta1 * m1[e] + one_minus_beta1 * g;
        }
    }
    /* Dot products of the newest gradient and of M1 with every kept gradient and with M1. */
    for (int64_t j = 0; j < kept; ++j) cols[j] = hist + j * n;
    cols[kept] = m1;
    const cgd_real *rows[2] = {newest, m1};
    dots(rows, 2, cols, (int)kept + 1, n, partial, products);
    const int64_t stride = kept + 1;
    for (int64_t j = 0; j < kept; ++j) st->gram[slot * r + j] = st->gram[j * r + slot] = products[j];
    const double bc1 = h->bias_correction ? 1.0 - pow(h->beta1, t) : 1.0;
    const double bc2 = h->bias_correction ? 1.0 - pow(h->beta2, t) : 1.0;
    *st->identity *= h->beta2;
    const double c = *st->identity / bc2;
    /* K, D and U^T F for U = [kept gradients (, F)], F = M1 / bc1. */
    for (int64_t a = 0; a < kept; ++a) {
        for (int64_t b = 0; b < kept; ++b) K[a * m + b] = st->gram[a * r + b];
        const int64_t age = (slot - a + r) % r;
        D[a] = (1.0 - h->beta2) * pow(h->beta2, (double)age) / bc2;
        uf[a] = products[stride + a] / bc1;
    }
    if (centered) {
        const double ff = products[stride + kept] / (bc1 * bc1);
        for (int64_t a = 0; a < kept; ++a) K[a * m + kept] = K[kept * m + a] = uf[a];
        K[kept * m + kept] = ff;
        D[kept] = -1.0;
        uf[kept] = ff;
    }
    const int failed = window_coefficients(m, K, D, uf, c, h->eps, h->power, s, lwork, z);
    free(partial);
    const double base = cgd_inverse_power(c, h->eps, h->power);
    const double lr = h->lr, decay = 1.0 - h->lr * h->weight_decay;
    if (failed) {
        /* An eigendecomposition failed (counted): this step takes the diagonal of C, never a corrupt value. */
        st->counters[2] += 1.0f;
        for (int64_t ti = 0; ti < count; ++ti) {
            const cgd_block_tensor *tt = &tensors[ti];
            for (int64_t i = 0; i < tt->numel; ++i) {
                const int64_t e = tt->offset + i;
                const double f = (double)m1[e] / bc1;
                double diag = c - (centered ? f * f : 0.0);
                for (int64_t a = 0; a < kept; ++a) diag += D[a] * (double)hist[a * n + e] * (double)hist[a * n + e];
                const double p = cgd_load_real(dtype, tt->param, i);
                cgd_store_real(dtype, tt->param, i, (cgd_real)(p * decay - lr * cgd_inverse_power(diag, h->eps,
                                                                                                 h->power) * f));
            }
        }
    } else {
        /* q <- q (1 - lr wd) - lr (h(c) F + U z): each coordinate's sum in one fixed order. */
#pragma omp parallel if (n * m >= CGD_CPU_PARALLEL_MIN)
        {
            const cgd_cpu_share share = cgd_cpu_my_share();
            int64_t first = 0;
            for (int64_t ti = 0; ti < count; ++ti) {
                const cgd_block_tensor *tt = &tensors[ti];
                const int64_t tchunks = (tt->numel + CGD_WINDOW_CHUNK - 1) / CGD_WINDOW_CHUNK;
                for (int64_t q = cgd_cpu_first_chunk(share, first); q < tchunks; q += share.threads) {
                    const int64_t begin = q * CGD_WINDOW_CHUNK;
                    const int64_t end = begin + CGD_WINDOW_CHUNK < tt->numel ? begin + CGD_WINDOW_CHUNK : tt->numel;
                    /* In pieces of CGD_WINDOW_PIECE: each gradient row is read as one contiguous run
                       (a coordinate at a time it would be `kept` strided streams), every coordinate's sum still
                       in the order a = 0, 1, ... */
                    for (int64_t piece = begin; piece < end; piece += CGD_WINDOW_PIECE) {
                        const int64_t len = end - piece < CGD_WINDOW_PIECE ? end - piece : CGD_WINDOW_PIECE;
                        const int64_t e0 = tt->offset + piece;
                        double d[CGD_WINDOW_PIECE];
                        for (int64_t i = 0; i < len; ++i) d[i] = base * ((double)m1[e0 + i] / bc1);
                        for (int64_t a = 0; a < kept; ++a) {
                            const cgd_real *row = hist + a * n + e0;
                            const double za = z[a];
                            for (int64_t i = 0; i < len; ++i) d[i] += za * (double)row[i];
                        }
                        if (centered)
                            for (int64_t i = 0; i < len; ++i) d[i] += z[kept] * ((double)m1[e0 + i] / bc1);
                        for (int64_t i = 0; i < len; ++i) {
                            const double p = cgd_load_real(dtype, tt->param, piece + i);
                            cgd_store_real(dtype, tt->param, piece + i, (cgd_real)(p * decay - lr * d[i]));
                        }
                    }
                }
                first += tchunks;
            }
        }
    }
    free(small);
    free(cols);
    *st->step = t;
    return 0;
}
