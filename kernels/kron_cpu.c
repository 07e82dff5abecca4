/*
 * CPU kernel of Kronecker-factored CGD (cgd.h, cgd_kron_step), in the build's real type (real.h). Tensors are
 * independent, so OpenMP threads take whole tensors. The matrix products (the factors' Gram updates, the rotations
 * into and out of their eigenbases) are BLAS-3 calls (blas_cpu.h); a diagonal factor's sums of squares accumulate
 * in double. How the BLAS and LAPACK round may depend on their own threading: with torch's MKL the parameters after
 * a few steps on one and on two threads differ in the last bits (7e-9 on weights of size 0.02, measured), where
 * the diagonal and block kernels give the same bits. Every thread allocates scratch for the largest tensor before any tensor steps, so running out
 * of memory changes nothing.
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

/* Eigendecomposes one side's factor (Pf / bc2, minus Gram(F) when centered) down the failure ladder. The right
   side's eigenvalues are then divided by their clamped sum, the tr(R) of C ~ (L (x) R) / tr(R). */
static void refresh_factor(const side *sd, const cgd_real *F, int64_t rows, int64_t cols, const cgd_block_hparams *h,
                           cgd_real inv_bc2, double *acc, cgd_real *C, cgd_eigh_scratch *s, float *counters) {
    const int64_t n = sd->n;
    int finite = 1;
    if (sd->full) {
        for (int64_t e = 0; e < n * n; ++e) C[e] = sd->sq[e] * inv_bc2;
        if (h->centered) cgd_gram_update(sd->left, F, rows, cols, -1, 1, C);
        for (int64_t e = 0; e < n * n; ++e) finite &= isfinite(C[e]) != 0;
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
    if (!sd->left) {
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

/* D = U [(U^T F V) ./ (eps + mu_i nu_j)^a] V^T, with U^T and V^T stored row by row (row k = eigenvector k): four
   BLAS products, each skipped for a diagonal side (its basis is the identity). */
static void precondition(const side *l, const side *r, const cgd_real *F, int64_t rows, int64_t cols,
                         const cgd_block_hparams *h, cgd_real *D, cgd_real *Y) {
    if (h->power == 0.0) {
        memcpy(D, F, (size_t)(rows * cols) * sizeof(cgd_real));
        return;
    }
    const int64_t numel = rows * cols;
    if (l->full) /* Y = U^T F */
        cgd_gemm(0, 0, rows, cols, rows, 1, l->basis, rows, F, cols, 0, Y, cols);
    else
        memcpy(Y, F, (size_t)numel * sizeof(cgd_real));
    if (r->full) /* D = Y V */
        cgd_gemm(0, 1, rows, cols, cols, 1, Y, cols, r->basis, cols, 0, D, cols);
    else
        memcpy(D, Y, (size_t)numel * sizeof(cgd_real));
    scale_in_eigenbasis(D, l->eig, r->eig, rows, cols, (cgd_real)h->eps, (cgd_real)h->power);
    if (l->full) /* Y = U D */
        cgd_gemm(1, 0, rows, cols, rows, 1, l->basis, rows, D, cols, 0, Y, cols);
    else
        memcpy(Y, D, (size_t)numel * sizeof(cgd_real));
    if (r->full) /* D = Y V^T */
        cgd_gemm(0, 0, rows, cols, cols, 1, Y, cols, r->basis, cols, 0, D, cols);
    else
        memcpy(D, Y, (size_t)numel * sizeof(cgd_real));
}

/* One thread's scratch, sized for the largest tensor of the call. */
typedef struct scratch {
    cgd_real *g, *F, *D, *Y, *C;
    double *acc;
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
    free(w->acc);
    if (w->have_eigh) cgd_eigh_scratch_free(&w->eigh);
    memset(w, 0, sizeof *w);
}

/* 0 on success; 1 when out of memory (nothing left allocated). */
static int scratch_init(scratch *w, int64_t numel, int64_t factor_ws, int64_t longest_side, int64_t full_side,
                        int refresh) {
    memset(w, 0, sizeof *w);
    w->g = cgd_host_alloc((size_t)numel * sizeof(cgd_real));
    w->F = cgd_host_alloc((size_t)numel * sizeof(cgd_real));
    w->D = cgd_host_alloc((size_t)numel * sizeof(cgd_real));
    w->Y = cgd_host_alloc((size_t)numel * sizeof(cgd_real));
    w->C = cgd_host_alloc((size_t)factor_ws * sizeof(cgd_real));
    w->acc = cgd_host_alloc((size_t)longest_side * sizeof(double)); /* a diagonal side's sums */
    int ok = w->g && w->F && w->D && w->Y && w->C && w->acc;
    if (ok && refresh && full_side > 0) ok = w->have_eigh = cgd_eigh_scratch_init(&w->eigh, (int)full_side) == 0;
    if (!ok) scratch_free(w);
    return !ok;
}

/* One tensor's whole step, in the thread's scratch. */
static void kron_tensor_step(const cgd_block_hparams *hp, cgd_dtype dtype, const cgd_kron_tensor *tn, cgd_real scale,
                             scratch *w, float *counters) {
    cgd_block_hparams centered_now = *hp;
    centered_now.centered = hp->centered && cgd_variance_has_data(hp->bias_correction, *tn->step);
    const cgd_block_hparams *h = &centered_now;
    const int64_t rows = tn->rows, cols = tn->cols, numel = rows * cols;
    const double t = *tn->step + 1.0;
    const cgd_real inv_bc1 = h->bias_correction ? (cgd_real)(1.0 / (1.0 - pow(h->beta1, t))) : 1;
    const cgd_real inv_bc2 = h->bias_correction ? (cgd_real)(1.0 / (1.0 - pow(h->beta2, t))) : 1;
    cgd_real *g = w->g, *F = w->F, *D = w->D, *Y = w->Y;
    side l = {1, tn->left_full, rows, (cgd_real *)tn->left_sq, (cgd_real *)tn->left_basis,
              (cgd_real *)tn->left_eig, &tn->outcome[0]};
    side r = {0, tn->right_full, cols, (cgd_real *)tn->right_sq, (cgd_real *)tn->right_basis,
              (cgd_real *)tn->right_eig, &tn->outcome[1]};
    cgd_real *m1 = (cgd_real *)tn->exp_avg;
    const cgd_real beta1 = (cgd_real)h->beta1, w1 = (cgd_real)(1.0 - h->beta1);
    for (int64_t e = 0; e < numel; ++e) {
        cgd_real v = cgd_load_real(dtype, tn->grad, e) / scale;
        g[e] = h->maximize ? -v : v;
        m1[e] = beta1 * m1[e] + w1 * g[e];
        F[e] = m1[e] * inv_bc1;
    }
    update_factor(&l, g, rows, cols, (cgd_real)h->beta2, (cgd_real)(1.0 - h->beta2), w->acc);
    update_factor(&r, g, rows, cols, (cgd_real)h->beta2, (cgd_real)(1.0 - h->beta2), w->acc);
    if (h->refresh) {
        refresh_factor(&l, F, rows, cols, h, inv_bc2, w->acc, w->C, &w->eigh, counters);
        refresh_factor(&r, F, rows, cols, h, inv_bc2, w->acc, w->C, &w->eigh, counters);
    }
    precondition(&l, &r, F, rows, cols, h, D, Y);
    const cgd_real lr = (cgd_real)h->lr, decay = (cgd_real)(1.0 - h->lr * h->weight_decay);
    for (int64_t e = 0; e < numel; ++e)
        cgd_store_real(dtype, tn->param, e, cgd_load_real(dtype, tn->param, e) * decay - lr * D[e]);
    *tn->step += 1.0;
}

int CGD_NAME(cgd_cpu_kron_step)(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_kron_tensor *tensors,
                                int64_t count, const float *grad_scale, const float *skip) {
    if (skip && *skip != 0) return 0;
    const cgd_real scale = grad_scale ? (cgd_real)*grad_scale : 1;
    int64_t numel = 1, factor_ws = 1, full_side = 0, longest_side = 1;
    for (int64_t i = 0; i < count; ++i) {
        int64_t a, b, c;
        tensor_needs(&tensors[i], &a, &b, &c);
        numel = a > numel ? a : numel;
        factor_ws = b > factor_ws ? b : factor_ws;
        full_side = c > full_side ? c : full_side;
        const int64_t side = tensors[i].rows > tensors[i].cols ? tensors[i].rows : tensors[i].cols;
        longest_side = side > longest_side ? side : longest_side;
    }
    int failed = 0;
#pragma omp parallel
    {
        scratch w;
        int mine = scratch_init(&w, numel, factor_ws, longest_side, full_side, h->refresh);
        if (mine) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < count; ++i) {
                float local[3] = {0.0f, 0.0f, 0.0f};
                kron_tensor_step(h, dtype, &tensors[i], scale, &w, local);
                for (int k = 0; k < 3; ++k) tensors[i].counters[k] += local[k];
            }
        }
        if (!mine) scratch_free(&w);
    }
    return failed;
}
