/*
 * CPU kernel of Muon as a CGD step (cgd.h): the momentum EMA, Newton-Schulz orthogonalisation of the force with
 * BLAS gemm calls, the decoupled decay and the scaled update, in the build's real type (real.h). One tensor per
 * OpenMP thread; a single tensor leaves the threads to BLAS.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "blas_cpu.h"
#include "eigh_cpu.h"
#include "kernels.h"
#include "real.h"

/* torch's lerp, a + w (b - a), in the form torch evaluates for each half of w (exact at w = 1). */
static inline cgd_real lerp(cgd_real a, cgd_real b, cgd_real w) {
    return w < (cgd_real)0.5 ? a + w * (b - a) : b - (b - a) * (1 - w);
}

/* x rounded to bfloat16 when `on` (torch.optim.Muon keeps the iteration in bfloat16), else x. */
static inline cgd_real round_bf16(cgd_real x, int on) {
    return on ? (cgd_real)cgd_bf16_to_f32(cgd_f32_to_bf16((float)x)) : x;
}

static void round_all(cgd_real *x, size_t n, int on) {
    if (!on) return;
    for (size_t i = 0; i < n; ++i) x[i] = round_bf16(x[i], on);
}

/* X (m x n, m <= n) <- its Newton-Schulz orthogonalisation; A and G hold m^2 reals, Y m n. */
static void newton_schulz(const cgd_muon_hparams *h, cgd_real *X, cgd_real *Y, cgd_real *A, cgd_real *G, int64_t m,
                          int64_t n) {
    const int bf = h->ns_bf16 != 0;
    const size_t mn = (size_t)m * (size_t)n, mm = (size_t)m * (size_t)m;
    round_all(X, mn, bf);
    double sum = 0.0;
    for (size_t i = 0; i < mn; ++i) sum += (double)X[i] * X[i];
    const cgd_real eps = round_bf16((cgd_real)h->eps, bf);
    cgd_real norm = round_bf16((cgd_real)sqrt(sum), bf);
    norm = norm > eps ? norm : eps;
    for (size_t i = 0; i < mn; ++i) X[i] = round_bf16(X[i] / norm, bf);
    for (int s = 0; s < h->ns_steps; ++s) {
        cgd_gemm(0, 1, m, m, n, 1, X, n, X, n, 0, A, m); /* A = X X^T */
        round_all(A, mm, bf);
        memcpy(G, A, mm * sizeof(cgd_real)); /* G = b A + c A A */
        cgd_gemm(0, 0, m, m, m, (cgd_real)h->ns_c, A, m, A, m, (cgd_real)h->ns_b, G, m);
        round_all(G, mm, bf);
        memcpy(Y, X, mn * sizeof(cgd_real)); /* X <- a X + G X */
        cgd_gemm(0, 0, m, n, m, 1, G, m, X, n, (cgd_real)h->ns_a, Y, n);
        round_all(Y, mn, bf);
        memcpy(X, Y, mn * sizeof(cgd_real));
    }
}

/* X (m x n, m <= n) <- (eps I + X X^T)^-a X through X X^T = E^T diag(l) E (row k of E eigenvector k). A and G
   hold m^2 reals, Y m n, d m doubles. A failed eigendecomposition leaves X, counted in *failures. */
static void eigen_power(const cgd_muon_hparams *h, cgd_real *X, cgd_real *Y, cgd_real *A, cgd_real *G, double *d,
                        int64_t m, int64_t n, cgd_eigh_scratch *s, float *failures) {
    const size_t mn = (size_t)m * (size_t)n;
    double sum = 0.0;
    for (size_t i = 0; i < mn; ++i) sum += (double)X[i] * X[i];
    const double norm = sqrt(sum) > h->eps ? sqrt(sum) : h->eps; /* Muon's normalisation: the lr means the same */
    for (size_t i = 0; i < mn; ++i) X[i] = (cgd_real)(X[i] / norm);
    cgd_gemm(0, 1, m, m, n, 1, X, n, X, n, 0, A, m); /* A = X X^T */
    const int solved = cgd_eigh_solve(A, (int)m, s);
    if (solved < 0) {
        *failures += 1.0f;
        return;
    }
    /* E: LAPACK's column-major eigenvectors are the rows of a row-major matrix; Y <- diag(d) E */
    const cgd_real *E = solved == CGD_BLOCK_FP64 ? A : s->a;
    for (int64_t k = 0; k < m; ++k) {
        const double lambda = solved == CGD_BLOCK_FP64 ? s->dw[k] : (double)s->w[k];
        d[k] = cgd_inverse_power(lambda, h->eps, h->power);
        for (int64_t i = 0; i < m; ++i) {
            const double e = solved == CGD_BLOCK_FP64 ? s->da[k * m + i] : (double)s->a[k * m + i];
            if (solved == CGD_BLOCK_FP64) A[k * m + i] = (cgd_real)e;
            Y[k * m + i] = (cgd_real)(d[k] * e);
        }
    }
    cgd_gemm(1, 0, m, m, m, 1, E, m, Y, m, 0, G, m); /* G = E^T diag(d) E */
    cgd_gemm(0, 0, m, n, m, 1, G, m, X, n, 0, Y, n); /* Y = G X */
    memcpy(X, Y, mn * sizeof(cgd_real));
}

int CGD_NAME(cgd_cpu_muon_step)(const cgd_muon_hparams *h, cgd_dtype dtype, const cgd_muon_tensor *tensors,
                                int64_t count, const float *grad_scale, const float *skip) {
    if (skip && *skip != 0.0f) return 0;
    int64_t largest = 0, side = 0;
    for (int64_t i = 0; i < count; ++i) {
        const int64_t r = tensors[i].rows, c = tensors[i].cols;
        largest = r * c > largest ? r * c : largest;
        side = (r < c ? r : c) > side ? (r < c ? r : c) : side;
    }
    const cgd_real scale = grad_scale ? (cgd_real)*grad_scale : 1;
    const cgd_real mu = (cgd_real)h->momentum, w = (cgd_real)(1.0 - h->momentum);
    const cgd_real decay = (cgd_real)(1.0 - h->lr * h->weight_decay);
    int failed = 0;
#pragma omp parallel if (count > 1)
    {
        /* X, Y: largest reals each; A, G: side^2 each; the eigen route's solver scratch and side doubles */
        cgd_real *X = cgd_host_alloc((2 * (size_t)largest + 2 * (size_t)side * (size_t)side) * sizeof(cgd_real));
        const int eigen = h->solver == CGD_MUON_EIGH && side > 0;
        cgd_eigh_scratch es;
        double *d = eigen ? cgd_host_alloc((size_t)side * sizeof(double)) : NULL;
        const int have_es = eigen && cgd_eigh_scratch_init(&es, (int)side) == 0;
        if (!X || (eigen && (!d || !have_es))) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
            cgd_real *Y = X + largest, *A = Y + largest, *G = A + side * side;
#pragma omp for schedule(dynamic, 1)
            for (int64_t i = 0; i < count; ++i) {
                const cgd_muon_tensor *t = &tensors[i];
                const int64_t R = t->rows, Cc = t->cols, n = R * Cc;
                const int tall = R > Cc; /* work on F^T, so the Gram matrix is the smaller side's */
                cgd_real *buf = (cgd_real *)t->momentum;
                for (int64_t e = 0; e < n; ++e) {
                    const cgd_real g = cgd_load_real(dtype, t->grad, e) / scale;
                    buf[e] = lerp(buf[e], g, w);
                    const cgd_real f = h->nesterov ? lerp(g, buf[e], mu) : buf[e];
                    X[tall ? (e % Cc) * R + e / Cc : e] = f;
                }
                if (eigen)
                    eigen_power(h, X, Y, A, G, d, tall ? Cc : R, tall ? R : Cc, &es, t->failures);
                else
                    newton_schulz(h, X, Y, A, G, tall ? Cc : R, tall ? R : Cc);
                const double ratio = h->scale == CGD_MUON_MATCH_RMS_ADAMW
                                         ? 0.2 * sqrt((double)(R > Cc ? R : Cc))
                                         : sqrt(fmax(1.0, (double)R / (double)Cc));
                const cgd_real step = (cgd_real)(h->lr * ratio);
                for (int64_t e = 0; e < n; ++e) {
                    const cgd_real p = cgd_load_real(dtype, t->param, e) * decay;
                    cgd_store_real(dtype, t->param, e, p - step * X[tall ? (e % Cc) * R + e / Cc : e]);
                }
            }
        }
        free(X);
        free(d);
        if (have_es) cgd_eigh_scratch_free(&es);
    }
    return failed;
}
