/*
 * CPU kernels of Kronecker-factored CGD and of CGD in the Kronecker eigenbasis (cgd.h, cgd_kron_step and
 * cgd_eigenbasis_step), in the build's real type (real.h). Tensors are independent, so OpenMP threads take whole
 * tensors. The matrix products (the factors' Gram updates, the rotations into and out of their eigenbases, the
 * power iteration of a refresh) are BLAS-3 calls (blas_cpu.h), the refresh's QR LAPACK's; a diagonal factor's sums
 * of squares accumulate in double. How the BLAS and LAPACK round may depend on their own threading: with torch's
 * MKL the parameters after a few steps on one and on two threads differ in the last bits (7e-9 on weights of size
 * 0.02, measured), where the diagonal and block kernels give the same bits. Every thread allocates scratch for the
 * largest tensor before any tensor steps, so running out of memory changes nothing.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "blas_cpu.h"
#include "diag_math.h"
#include "eigh_cpu.h"
#include "kernels.h"
#include "real.h"

/* The diagonal of X X^T (left: rows values) or of X^T X (right: cols values) for the row-major rows x cols X,
   each a sum rounded once from double. */
static void gram_diagonal(const cgd_real *X, int64_t rows, int64_t cols, int left, double *out) {
    memset(out, 0, (size_t)(left ? rows : cols) * sizeof(double));
    for (int64_t i = 0; i < rows; ++i) {
        const cgd_real *x = X + i * cols;
        for (int64_t j = 0; j < cols; ++j) out[left ? i : j] += (double)x[j] * x[j];
    }
}

typedef struct side {
    int left, full;
    int64_t n;
    cgd_real *sq, *basis, *eig;
    int32_t *outcome;
} side;

/* Pf <- beta2 Pf + (1 - beta2) Gram(G) for one side. */
static void update_factor(const side *sd, const cgd_real *g, int64_t rows, int64_t cols, cgd_real beta2, cgd_real w2,
                          double *acc) {
    if (sd->full) {
        cgd_gram_update(sd->left, g, rows, cols, w2, beta2, sd->sq);
        return;
    }
    gram_diagonal(g, rows, cols, sd->left, acc);
    for (int64_t e = 0; e < sd->n; ++e) sd->sq[e] = beta2 * sd->sq[e] + w2 * (cgd_real)acc[e];
}

/* C = Pf / bc2, minus Gram(s M) when centered (s M = F), for a full side; 1 when every entry is finite. */
static int full_factor(const side *sd, const cgd_real *M, cgd_real s, int64_t rows, int64_t cols, int centered,
                       cgd_real inv_bc2, cgd_real *C) {
    const int64_t n = sd->n;
    int finite = 1;
    for (int64_t e = 0; e < n * n; ++e) C[e] = sd->sq[e] * inv_bc2;
    if (centered) cgd_gram_update(sd->left, M, rows, cols, -s * s, 1, C);
    for (int64_t e = 0; e < n * n; ++e) finite &= isfinite(C[e]) != 0;
    return finite;
}

/* Eigendecomposes one side's factor (Pf / bc2, minus Gram(F) when centered) down the failure ladder. For the kron
   metric (trace_normalise) the right side's eigenvalues are then divided by their clamped sum, the tr(R) of
   C ~ (L (x) R) / tr(R). */
static void refresh_factor(const side *sd, const cgd_real *F, int64_t rows, int64_t cols, const cgd_block_hparams *h,
                           cgd_real inv_bc2, double *acc, cgd_real *C, cgd_eigh_scratch *s, float *counters,
                           int trace_normalise) {
    const int64_t n = sd->n;
    int finite = 1;
    if (sd->full) {
        finite = full_factor(sd, F, 1, rows, cols, h->centered, inv_bc2, C);
    } else {
        if (h->centered) gram_diagonal(F, rows, cols, sd->left, acc);
        for (int64_t i = 0; i < n; ++i) {
            C[i] = sd->sq[i] * inv_bc2 - (h->centered ? (cgd_real)acc[i] : 0);
            finite &= isfinite(C[i]) != 0;
        }
    }
    int solved = -1;
    if (sd->full && finite) {
        solved = cgd_eigh_solve(C, (int)n, s);
        if (solved == CGD_BLOCK_FP32) {
            memcpy(sd->basis, s->a, (size_t)(n * n) * sizeof(cgd_real));
            memcpy(sd->eig, s->w, (size_t)n * sizeof(cgd_real));
        } else if (solved == CGD_BLOCK_FP64) {
            for (int64_t e = 0; e < n * n; ++e) sd->basis[e] = (cgd_real)s->da[e];
            for (int64_t k = 0; k < n; ++k) sd->eig[k] = (cgd_real)s->dw[k];
            counters[0] += 1;
        }
    } else if (!sd->full && finite) {
        memcpy(sd->eig, C, (size_t)n * sizeof(cgd_real));
        solved = CGD_BLOCK_FP32; /* a diagonal factor is its own exact eigendecomposition */
    }
    if (solved < 0 && *sd->outcome != CGD_BLOCK_NEVER) {
        *sd->outcome = CGD_BLOCK_KEPT;
        counters[1] += 1;
        return;
    }
    if (solved < 0) {
        /* The factor's diagonal, with the identity as basis; a non-finite entry (the moments themselves are
           broken) counts as 0. */
        for (int64_t i = 0; i < n; ++i) {
            cgd_real c = sd->full ? C[i * n + i] : C[i];
            sd->eig[i] = isfinite(c) ? c : 0;
        }
        if (sd->full) {
            memset(sd->basis, 0, (size_t)(n * n) * sizeof(cgd_real));
            for (int64_t i = 0; i < n; ++i) sd->basis[i * n + i] = 1;
        }
        solved = CGD_BLOCK_DIAGONAL;
        counters[2] += 1;
    }
    *sd->outcome = solved;
    if (trace_normalise && !sd->left) {
        double total = 0.0;
        for (int64_t j = 0; j < n; ++j) total += sd->eig[j] > 0 ? sd->eig[j] : 0;
        for (int64_t j = 0; j < n; ++j) sd->eig[j] = total > 0.0 ? (cgd_real)(sd->eig[j] / total) : 0;
    }
}

/* D <- D ./ (eps + mu_i nu_j)^a over the rows x cols D, the eigenvalues clamped at 0: one loop per metric power
   (diag_math.h's float x^a polynomial for the general one), vectorised for the CPU it runs on. */
CGD_CPU_CLONES
static void scale_in_eigenbasis(cgd_real *D, const cgd_real *mus, const cgd_real *nus, int64_t rows, int64_t cols,
                                cgd_real eps, cgd_real a) {
    for (int64_t i = 0; i < rows; ++i) {
        const cgd_real mu = mus[i] > 0 ? mus[i] : 0;
        cgd_real *restrict d = D + i * cols;
        const cgd_real *restrict nu = nus;
#if CGD_F64
        for (int64_t m = 0; m < cols; ++m) d[m] = d[m] * pow(eps + mu * (nu[m] > 0 ? nu[m] : 0), -a);
#else
        if (a == 0.5f)
            for (int64_t m = 0; m < cols; ++m) d[m] = d[m] / sqrtf(eps + mu * (nu[m] > 0 ? nu[m] : 0));
        else if (a == 1.0f)
            for (int64_t m = 0; m < cols; ++m) d[m] = d[m] / (eps + mu * (nu[m] > 0 ? nu[m] : 0));
        else
            for (int64_t m = 0; m < cols; ++m) d[m] = cgd_powf_times(eps + mu * (nu[m] > 0 ? nu[m] : 0), -a, d[m]);
#endif
    }
}

/* D = U^T X V (in = 1) or U X V^T (in = 0), with U^T and V^T stored row by row (row k = eigenvector k): two BLAS
   products through Y, each a copy for a diagonal side (its basis is the identity). */
static void rotate(const side *l, const side *r, const cgd_real *X, int64_t rows, int64_t cols, int in, cgd_real *D,
                   cgd_real *Y) {
    const size_t bytes = (size_t)(rows * cols) * sizeof(cgd_real);
    if (l->full)
        cgd_gemm(!in, 0, rows, cols, rows, 1, l->basis, rows, X, cols, 0, Y, cols);
    else
        memcpy(Y, X, bytes);
    if (r->full)
        cgd_gemm(0, in, rows, cols, cols, 1, Y, cols, r->basis, cols, 0, D, cols);
    else
        memcpy(D, Y, bytes);
}

/* D = U [(U^T F V) ./ (eps + mu_i nu_j)^a] V^T. */
static void precondition(const side *l, const side *r, const cgd_real *F, int64_t rows, int64_t cols,
                         const cgd_block_hparams *h, cgd_real *D, cgd_real *Y) {
    if (h->power == 0.0) {
        memcpy(D, F, (size_t)(rows * cols) * sizeof(cgd_real));
        return;
    }
    rotate(l, r, F, rows, cols, 1, D, Y);
    scale_in_eigenbasis(D, l->eig, r->eig, rows, cols, (cgd_real)h->eps, (cgd_real)h->power);
    rotate(l, r, D, rows, cols, 0, D, Y);
}

/* LAPACK's Householder QR (gfortran symbols), for the eigenbasis metric's refresh. */
void sgeqrf_(const int *m, const int *n, float *a, const int *lda, float *tau, float *work, const int *lwork,
             int *info);
void dgeqrf_(const int *m, const int *n, double *a, const int *lda, double *tau, double *work, const int *lwork,
             int *info);
void sorgqr_(const int *m, const int *n, const int *k, float *a, const int *lda, const float *tau, float *work,
             const int *lwork, int *info);
void dorgqr_(const int *m, const int *n, const int *k, double *a, const int *lda, const double *tau, double *work,
             const int *lwork, int *info);
#if CGD_F64
#define cgd_geqrf dgeqrf_
#define cgd_orgqr dorgqr_
#else
#define cgd_geqrf sgeqrf_
#define cgd_orgqr sorgqr_
#endif

typedef struct ranked {
    double value;
    int64_t index;
} ranked;

/* Descending value; ties keep their index order, so the ordering never depends on the sort's internals. */
static int by_value_descending(const void *a, const void *b) {
    const ranked *x = a, *y = b;
    if (x->value != y->value) return x->value > y->value ? -1 : 1;
    return (x->index > y->index) - (x->index < y->index);
}

/* One thread's scratch, sized for the largest tensor of the call; Q, tau, order and the QR's work array only for
   the eigenbasis metric's refresh. */
typedef struct scratch {
    cgd_real *g, *F, *D, *Y, *C, *Q, *tau, *qr_work;
    double *acc;
    ranked *order;
    int qr_lwork;
    cgd_eigh_scratch eigh;
    int have_eigh;
} scratch;

/* Element and factor workspace of one tensor: a full side needs n^2, a diagonal one n (it may be far too big to
   square); and the side of its largest full factor (0 without one). */
static void tensor_needs(const cgd_kron_tensor *tn, int64_t *numel, int64_t *factor_ws, int64_t *full_side) {
    const int64_t left = tn->left_full ? tn->rows * tn->rows : tn->rows;
    const int64_t right = tn->right_full ? tn->cols * tn->cols : tn->cols;
    *numel = tn->rows * tn->cols;
    *factor_ws = left > right ? left : right;
    *full_side = tn->left_full ? tn->rows : 0;
    if (tn->right_full && tn->cols > *full_side) *full_side = tn->cols;
}

static void scratch_free(scratch *w) {
    free(w->g);
    free(w->F);
    free(w->D);
    free(w->Y);
    free(w->C);
    free(w->Q);
    free(w->tau);
    free(w->qr_work);
    free(w->acc);
    free(w->order);
    if (w->have_eigh) cgd_eigh_scratch_free(&w->eigh);
    memset(w, 0, sizeof *w);
}

/* 0 on success; 1 when out of memory (nothing left allocated). */
static int scratch_init(scratch *w, int64_t numel, int64_t factor_ws, int64_t longest_side, int64_t full_side,
                        int eigh, int qr) {
    memset(w, 0, sizeof *w);
    w->g = cgd_host_alloc((size_t)numel * sizeof(cgd_real));
    w->F = cgd_host_alloc((size_t)numel * sizeof(cgd_real));
    w->D = cgd_host_alloc((size_t)numel * sizeof(cgd_real));
    w->Y = cgd_host_alloc((size_t)numel * sizeof(cgd_real));
    w->C = cgd_host_alloc((size_t)factor_ws * sizeof(cgd_real));
    w->acc = cgd_host_alloc((size_t)longest_side * sizeof(double)); /* a diagonal side's sums */
    int ok = w->g && w->F && w->D && w->Y && w->C && w->acc;
    if (ok && qr && full_side > 0) {
        int n = (int)full_side, query = -1, info = 0;
        cgd_real a = 0, b = 0;
        cgd_geqrf(&n, &n, NULL, &n, NULL, &a, &query, &info);
        cgd_orgqr(&n, &n, &n, NULL, &n, NULL, &b, &query, &info);
        w->qr_lwork = (int)(a > b ? a : b) + 1;
        w->Q = cgd_host_alloc((size_t)(full_side * full_side) * sizeof(cgd_real));
        w->tau = cgd_host_alloc((size_t)full_side * sizeof(cgd_real));
        w->qr_work = cgd_host_alloc((size_t)w->qr_lwork * sizeof(cgd_real));
        w->order = cgd_host_alloc((size_t)full_side * sizeof(ranked));
        ok = w->Q && w->tau && w->qr_work && w->order;
    }
    if (ok && eigh && full_side > 0) ok = w->have_eigh = cgd_eigh_scratch_init(&w->eigh, (int)full_side) == 0;
    if (!ok) scratch_free(w);
    return !ok;
}

/* What every step of both metrics starts with: the centered rule, bias corrections, the two sides, and g in
   scratch; with `force`, M1's update and F = M1 (/ bc1) in scratch too. */
typedef struct tensor_start {
    cgd_block_hparams h;
    side l, r;
    cgd_real inv_bc1, inv_bc2;
} tensor_start;

static void start_tensor(const cgd_block_hparams *hp, cgd_dtype dtype, const cgd_kron_tensor *tn, cgd_real scale,
                         int force, scratch *w, tensor_start *ts) {
    ts->h = *hp;
    ts->h.centered = hp->centered && cgd_variance_has_data(hp->bias_correction, *tn->step);
    const cgd_block_hparams *h = &ts->h;
    const int64_t rows = tn->rows, cols = tn->cols, numel = rows * cols;
    const double t = *tn->step + 1.0;
    const cgd_real inv_bc1 = h->bias_correction ? (cgd_real)(1.0 / (1.0 - pow(h->beta1, t))) : 1;
    ts->inv_bc1 = inv_bc1;
    ts->inv_bc2 = h->bias_correction ? (cgd_real)(1.0 / (1.0 - pow(h->beta2, t))) : 1;
    ts->l = (side){1, tn->left_full, rows, (cgd_real *)tn->left_sq, (cgd_real *)tn->left_basis,
                   (cgd_real *)tn->left_eig, &tn->outcome[0]};
    ts->r = (side){0, tn->right_full, cols, (cgd_real *)tn->right_sq, (cgd_real *)tn->right_basis,
                   (cgd_real *)tn->right_eig, &tn->outcome[1]};
    cgd_real *g = w->g, *F = w->F, *m1 = (cgd_real *)tn->exp_avg;
    const cgd_real beta1 = (cgd_real)h->beta1, w1 = (cgd_real)(1.0 - h->beta1);
    for (int64_t e = 0; e < numel; ++e) {
        cgd_real v = cgd_load_real(dtype, tn->grad, e) / scale;
        g[e] = h->maximize ? -v : v;
        if (!force) continue;
        m1[e] = beta1 * m1[e] + w1 * g[e];
        F[e] = m1[e] * inv_bc1;
    }
}

/* p <- p (1 - lr wd) - lr D, and the step count. */
static void finish_tensor(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_kron_tensor *tn, const cgd_real *D) {
    const cgd_real lr = (cgd_real)h->lr, decay = (cgd_real)(1.0 - h->lr * h->weight_decay);
    for (int64_t e = 0; e < tn->rows * tn->cols; ++e)
        cgd_store_real(dtype, tn->param, e, cgd_load_real(dtype, tn->param, e) * decay - lr * D[e]);
    *tn->step += 1.0;
}

/* One tensor's whole Kronecker-factored step, in the thread's scratch. */
static void kron_tensor_step(const cgd_block_hparams *hp, cgd_dtype dtype, const cgd_kron_tensor *tn, cgd_real scale,
                             scratch *w, float *counters) {
    tensor_start ts;
    start_tensor(hp, dtype, tn, scale, 1, w, &ts);
    const cgd_block_hparams *h = &ts.h;
    const int64_t rows = tn->rows, cols = tn->cols;
    const cgd_real beta2 = (cgd_real)h->beta2, w2 = (cgd_real)(1.0 - h->beta2);
    update_factor(&ts.l, w->g, rows, cols, beta2, w2, w->acc);
    update_factor(&ts.r, w->g, rows, cols, beta2, w2, w->acc);
    if (h->refresh) {
        refresh_factor(&ts.l, w->F, rows, cols, h, ts.inv_bc2, w->acc, w->C, &w->eigh, counters, 1);
        refresh_factor(&ts.r, w->F, rows, cols, h, ts.inv_bc2, w->acc, w->C, &w->eigh, counters, 1);
    }
    precondition(&ts.l, &ts.r, w->F, rows, cols, h, w->D, w->Y);
    finish_tensor(h, dtype, tn, w->D);
}

/* The eigenbasis metric's first basis of a full side: the eigendecomposition (the kron ladder), reordered to
   descending eigenvalues as the refreshes keep it. A side that is not full keeps the identity. */
static void initial_basis(const side *sd, const cgd_real *F, int64_t rows, int64_t cols, const cgd_block_hparams *h,
                          cgd_real inv_bc2, scratch *w, float *counters) {
    if (!sd->full) {
        *sd->outcome = CGD_BLOCK_FP32;
        return;
    }
    refresh_factor(sd, F, rows, cols, h, inv_bc2, w->acc, w->C, &w->eigh, counters, 0);
    const int64_t n = sd->n;
    for (int64_t k = 0; k < n / 2; ++k) {
        cgd_real *a = sd->basis + k * n, *b = sd->basis + (n - 1 - k) * n;
        for (int64_t i = 0; i < n; ++i) {
            const cgd_real x = a[i];
            a[i] = b[i];
            b[i] = x;
        }
        const cgd_real e = sd->eig[k];
        sd->eig[k] = sd->eig[n - 1 - k];
        sd->eig[n - 1 - k] = e;
    }
}

/* SOAP's refresh of a full side's basis (Vyas et al. 2024, Algorithm 4): one power iteration U <- qr(L U), U's
   columns first put in descending order of their Rayleigh quotients u_k^T L u_k and V' (rows x cols) permuted
   with them, so each entry of V' stays with its basis vector. A non-finite L, or a QR whose result is not
   finite, keeps the old basis (counted). */
static void power_refresh(const side *sd, const cgd_real *m1, cgd_real inv_bc1, int64_t rows, int64_t cols,
                          const cgd_block_hparams *h, cgd_real inv_bc2, cgd_real *V, scratch *w, float *counters) {
    const int64_t n = sd->n;
    cgd_real *C = w->C, *Y = w->Q;
    int finite = full_factor(sd, m1, inv_bc1, rows, cols, h->centered, inv_bc2, C);
    if (finite) {
        cgd_gemm(0, 0, n, n, n, 1, sd->basis, n, C, n, 0, Y, n); /* row k = (L u_k)^T: L is symmetric */
        for (int64_t k = 0; k < n; ++k) {
            double q = 0.0;
            for (int64_t i = 0; i < n; ++i) q += (double)sd->basis[k * n + i] * Y[k * n + i];
            w->order[k] = (ranked){q, k};
        }
        qsort(w->order, (size_t)n, sizeof *w->order, by_value_descending);
        for (int64_t k = 0; k < n; ++k) memcpy(C + k * n, Y + w->order[k].index * n, (size_t)n * sizeof(cgd_real));
        /* The row-major rows are LAPACK's columns: C's columns L u_k become Q's, in place. */
        int N = (int)n, info = 0;
        cgd_geqrf(&N, &N, C, &N, w->tau, w->qr_work, &w->qr_lwork, &info);
        if (info == 0) cgd_orgqr(&N, &N, &N, C, &N, w->tau, w->qr_work, &w->qr_lwork, &info);
        finite = info == 0;
        for (int64_t e = 0; e < n * n && finite; ++e) finite = isfinite(C[e]) != 0;
    }
    if (!finite) {
        *sd->outcome = CGD_BLOCK_KEPT;
        counters[1] += 1;
        return;
    }
    memcpy(sd->basis, C, (size_t)(n * n) * sizeof(cgd_real));
    for (int64_t k = 0; k < n; ++k) sd->eig[k] = (cgd_real)w->order[k].value;
    cgd_real *T = w->D;
    if (sd->left)
        for (int64_t k = 0; k < rows; ++k)
            memcpy(T + k * cols, V + w->order[k].index * cols, (size_t)cols * sizeof(cgd_real));
    else
        for (int64_t i = 0; i < rows; ++i)
            for (int64_t k = 0; k < cols; ++k) T[i * cols + k] = V[i * cols + w->order[k].index];
    memcpy(V, T, (size_t)(rows * cols) * sizeof(cgd_real));
    *sd->outcome = CGD_BLOCK_FP32;
}

/* D <- D ./ (eps + C')^a, C' = V / bc2 (- D.^2 when centered) clamped at 0, over the numel entries of the rotated
   force D: one loop per metric power, as scale_in_eigenbasis. */
CGD_CPU_CLONES
static void scale_by_moments(cgd_real *restrict D, const cgd_real *restrict V, int64_t numel, cgd_real inv_bc2,
                             int centered, cgd_real eps, cgd_real a) {
    const cgd_real sub = centered ? 1 : 0;
#if CGD_F64
    for (int64_t e = 0; e < numel; ++e) {
        const cgd_real c = V[e] * inv_bc2 - sub * D[e] * D[e];
        D[e] = D[e] * pow(eps + (c > 0 ? c : 0), -a);
    }
#else
    if (a == 0.5f)
        for (int64_t e = 0; e < numel; ++e) {
            const cgd_real c = V[e] * inv_bc2 - sub * D[e] * D[e];
            D[e] = D[e] / sqrtf(eps + (c > 0 ? c : 0));
        }
    else if (a == 1.0f)
        for (int64_t e = 0; e < numel; ++e) {
            const cgd_real c = V[e] * inv_bc2 - sub * D[e] * D[e];
            D[e] = D[e] / (eps + (c > 0 ? c : 0));
        }
    else
        for (int64_t e = 0; e < numel; ++e) {
            const cgd_real c = V[e] * inv_bc2 - sub * D[e] * D[e];
            D[e] = cgd_powf_times(eps + (c > 0 ? c : 0), -a, D[e]);
        }
#endif
}

/* One tensor's whole eigenbasis step (cgd.h), in the thread's scratch. M1 is kept in the eigenbasis (exp_avg holds
   U^T M1 V), so F' needs no rotation of its own: a step is three two-sided products (G in, the direction out, and
   the factors' Gram updates), where rotating M1 each step would make it four. A refresh carries M1 into the new
   basis through the original one. */
static void eigenbasis_tensor_step(const cgd_block_hparams *hp, cgd_dtype dtype, const cgd_kron_tensor *tn,
                                   cgd_real scale, scratch *w, float *counters) {
    const int first = tn->outcome[0] == CGD_BLOCK_NEVER && tn->outcome[1] == CGD_BLOCK_NEVER;
    tensor_start ts;
    /* The first step forms M1 and F in the original space: the basis is built from them before anything rotates. */
    start_tensor(hp, dtype, tn, scale, first, w, &ts);
    const cgd_block_hparams *h = &ts.h;
    const int64_t rows = tn->rows, cols = tn->cols, numel = rows * cols;
    const cgd_real beta1 = (cgd_real)h->beta1, w1 = (cgd_real)(1.0 - h->beta1);
    const cgd_real beta2 = (cgd_real)h->beta2, w2 = (cgd_real)(1.0 - h->beta2);
    const side *l = &ts.l, *r = &ts.r;
    cgd_real *V = (cgd_real *)tn->rotated_sq, *m1 = (cgd_real *)tn->exp_avg, *D = w->D;
    if (first) {
        if (l->full) update_factor(l, w->g, rows, cols, beta2, w2, w->acc);
        if (r->full) update_factor(r, w->g, rows, cols, beta2, w2, w->acc);
        initial_basis(l, w->F, rows, cols, h, ts.inv_bc2, w, counters);
        initial_basis(r, w->F, rows, cols, h, ts.inv_bc2, w, counters);
        memcpy(D, m1, (size_t)numel * sizeof(cgd_real));
        rotate(l, r, D, rows, cols, 1, m1, w->Y);
    }
    rotate(l, r, w->g, rows, cols, 1, D, w->Y); /* G' */
    for (int64_t e = 0; e < numel; ++e) {
        V[e] = beta2 * V[e] + w2 * (D[e] * D[e]);
        if (!first) m1[e] = beta1 * m1[e] + w1 * D[e];
        D[e] = m1[e] * ts.inv_bc1; /* F' */
    }
    if (!first) { /* the basis stays this step's: the factors may take G now */
        if (l->full) update_factor(l, w->g, rows, cols, beta2, w2, w->acc);
        if (r->full) update_factor(r, w->g, rows, cols, beta2, w2, w->acc);
    }
    if (h->power != 0.0)
        scale_by_moments(D, V, numel, ts.inv_bc2, h->centered, (cgd_real)h->eps, (cgd_real)h->power);
    rotate(l, r, D, rows, cols, 0, D, w->Y);
    finish_tensor(h, dtype, tn, D);
    if (!first && h->refresh && (l->full || r->full)) {
        cgd_real *orig = w->F;
        rotate(l, r, m1, rows, cols, 0, orig, w->Y); /* M1 in the original space */
        if (l->full) power_refresh(l, orig, ts.inv_bc1, rows, cols, h, ts.inv_bc2, V, w, counters);
        if (r->full) power_refresh(r, orig, ts.inv_bc1, rows, cols, h, ts.inv_bc2, V, w, counters);
        rotate(l, r, orig, rows, cols, 1, m1, w->Y);
    }
}

/* Both metrics' calls: scratch for the largest tensor on every thread before any tensor steps, then whole
   tensors across the threads. */
static int step_tensors(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_kron_tensor *tensors, int64_t count,
                        const float *grad_scale, const float *skip, int eigenbasis) {
    if (skip && *skip != 0) return 0;
    const cgd_real scale = grad_scale ? (cgd_real)*grad_scale : 1;
    int64_t numel = 1, factor_ws = 1, full_side = 0, longest_side = 1;
    int any_first = 0;
    for (int64_t i = 0; i < count; ++i) {
        int64_t a, b, c;
        tensor_needs(&tensors[i], &a, &b, &c);
        numel = a > numel ? a : numel;
        factor_ws = b > factor_ws ? b : factor_ws;
        full_side = c > full_side ? c : full_side;
        const int64_t side = tensors[i].rows > tensors[i].cols ? tensors[i].rows : tensors[i].cols;
        longest_side = side > longest_side ? side : longest_side;
        any_first |= tensors[i].outcome[0] == CGD_BLOCK_NEVER && tensors[i].outcome[1] == CGD_BLOCK_NEVER;
    }
    /* kron eigendecomposes on refresh steps; the eigenbasis metric on a tensor's first step only */
    const int eigh = eigenbasis ? any_first : h->refresh != 0;
    const int qr = eigenbasis && h->refresh;
    int failed = 0;
#pragma omp parallel
    {
        scratch w;
        int mine = scratch_init(&w, numel, factor_ws, longest_side, full_side, eigh, qr);
        if (mine) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < count; ++i) {
                float local[3] = {0.0f, 0.0f, 0.0f};
                if (eigenbasis)
                    eigenbasis_tensor_step(h, dtype, &tensors[i], scale, &w, local);
                else
                    kron_tensor_step(h, dtype, &tensors[i], scale, &w, local);
                for (int k = 0; k < 3; ++k) tensors[i].counters[k] += local[k];
            }
        }
        if (!mine) scratch_free(&w);
    }
    return failed;
}

int CGD_NAME(cgd_cpu_kron_step)(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_kron_tensor *tensors,
                                int64_t count, const float *grad_scale, const float *skip) {
    return step_tensors(h, dtype, tensors, count, grad_scale, skip, 0);
}

int CGD_NAME(cgd_cpu_eigenbasis_step)(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_kron_tensor *tensors,
                                      int64_t count, const float *grad_scale, const float *skip) {
    return step_tensors(h, dtype, tensors, count, grad_scale, skip, 1);
}
