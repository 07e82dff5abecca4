/*
 * CPU kernel of full/block CGD (paper eq 4.9): rank-1 EMA updates of each block's M1 and M2, the symmetric
 * eigendecomposition of C through LAPACK (ssyevd, dsyevd on failure), and the preconditioned step. Blocks are
 * independent, so OpenMP threads take whole blocks and the result does not depend on the thread count.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "half_convert.h"
#include "kernels.h"

/* LAPACK's Fortran symbols, with gfortran's trailing hidden lengths of the character arguments. */
void ssyevd_(const char *jobz, const char *uplo, const int *n, float *a, const int *lda, float *w, float *work,
             const int *lwork, int *iwork, const int *liwork, int *info, size_t jobz_len, size_t uplo_len);
void dsyevd_(const char *jobz, const char *uplo, const int *n, double *a, const int *lda, double *w, double *work,
             const int *lwork, int *iwork, const int *liwork, int *info, size_t jobz_len, size_t uplo_len);

/* Per-thread scratch of one block's eigendecomposition. */
typedef struct eig_scratch {
    int n, lwork, liwork, dlwork, dliwork;
    float *a, *w, *work;
    double *da, *dw, *dwork, *acc;
    int *iwork;
} eig_scratch;

static void scratch_free(eig_scratch *s) {
    free(s->a);
    free(s->w);
    free(s->work);
    free(s->da);
    free(s->dw);
    free(s->dwork);
    free(s->acc);
    free(s->iwork);
}

static int scratch_init(eig_scratch *s, int n) {
    memset(s, 0, sizeof *s);
    s->n = n;
    int query = -1, info = 0, iq = 0;
    float fq = 0.0f;
    double dq = 0.0;
    ssyevd_("V", "U", &n, NULL, &n, NULL, &fq, &query, &iq, &query, &info, 1, 1);
    s->lwork = (int)fq + 1;
    s->liwork = iq;
    dsyevd_("V", "U", &n, NULL, &n, NULL, &dq, &query, &iq, &query, &info, 1, 1);
    s->dlwork = (int)dq + 1;
    s->dliwork = iq > s->liwork ? iq : s->liwork;
    size_t nn = (size_t)n * (size_t)n;
    s->a = malloc(nn * sizeof(float));
    s->w = malloc((size_t)n * sizeof(float));
    s->work = malloc((size_t)s->lwork * sizeof(float));
    s->da = malloc(nn * sizeof(double));
    s->dw = malloc((size_t)n * sizeof(double));
    s->dwork = malloc((size_t)s->dlwork * sizeof(double));
    s->acc = malloc(nn * sizeof(double));
    s->iwork = malloc((size_t)s->dliwork * sizeof(int));
    if (!s->a || !s->w || !s->work || !s->da || !s->dw || !s->dwork || !s->acc || !s->iwork) {
        scratch_free(s);
        return 1;
    }
    return 0;
}

static int all_finite_f(const float *x, size_t n) {
    for (size_t i = 0; i < n; ++i)
        if (!isfinite(x[i])) return 0;
    return 1;
}

static int all_finite_d(const double *x, size_t n) {
    for (size_t i = 0; i < n; ++i)
        if (!isfinite(x[i])) return 0;
    return 1;
}

/* (eps + max(lambda, 0))^-a: eigenvalues of a covariance are >= 0, and rounding may push the smallest below. */
static double inverse_power(double lambda, double eps, double power) {
    return power == 0.0 ? 1.0 : pow(eps + (lambda > 0.0 ? lambda : 0.0), -power);
}

/* P = sum_k d_k v_k v_k^T, v_k = row k of the column-major eigenvector output, accumulated in double as
   rank-1 updates of the upper triangle (row-contiguous, so the inner loop vectorises), then mirrored. */
static void assemble_precond(float *P, double *acc, const double *vecs_d, const float *vecs_f,
                             const double *lambda_d, const float *lambda_f, int B, double eps, double power) {
    memset(acc, 0, (size_t)B * (size_t)B * sizeof(double));
    for (int k = 0; k < B; ++k) {
        double d = inverse_power(lambda_d ? lambda_d[k] : (double)lambda_f[k], eps, power);
        for (int i = 0; i < B; ++i) {
            double vi = vecs_d ? vecs_d[(size_t)k * B + i] : (double)vecs_f[(size_t)k * B + i];
            double s = d * vi;
            double *row = acc + (size_t)i * B;
            if (vecs_d) {
                const double *v = vecs_d + (size_t)k * B;
                for (int j = i; j < B; ++j) row[j] += s * v[j];
            } else {
                const float *v = vecs_f + (size_t)k * B;
                for (int j = i; j < B; ++j) row[j] += s * (double)v[j];
            }
        }
    }
    for (int i = 0; i < B; ++i)
        for (int j = i; j < B; ++j) P[(size_t)i * B + j] = P[(size_t)j * B + i] = (float)acc[(size_t)i * B + j];
}

/* Refreshes one block's P from C (row-major B x B, symmetric) down the failure ladder of cgd.h. */
static void refresh_block(const cgd_block_hparams *h, const float *C, float *P, float *eigvals, int32_t *outcome,
                          float *counters_local, eig_scratch *s) {
    int B = s->n, info = 0;
    size_t nn = (size_t)B * (size_t)B;
    memcpy(s->a, C, nn * sizeof(float));
    ssyevd_("V", "U", &B, s->a, &B, s->w, s->work, &s->lwork, s->iwork, &s->liwork, &info, 1, 1);
    if (info == 0 && all_finite_f(s->w, (size_t)B) && all_finite_f(s->a, nn)) {
        assemble_precond(P, s->acc, NULL, s->a, NULL, s->w, B, h->eps, h->power);
        memcpy(eigvals, s->w, (size_t)B * sizeof(float));
        *outcome = CGD_BLOCK_FP32;
        return;
    }
    for (size_t i = 0; i < nn; ++i) s->da[i] = C[i];
    info = 0;
    dsyevd_("V", "U", &B, s->da, &B, s->dw, s->dwork, &s->dlwork, s->iwork, &s->dliwork, &info, 1, 1);
    if (info == 0 && all_finite_d(s->dw, (size_t)B) && all_finite_d(s->da, nn)) {
        assemble_precond(P, s->acc, s->da, NULL, s->dw, NULL, B, h->eps, h->power);
        for (int k = 0; k < B; ++k) eigvals[k] = (float)s->dw[k];
        *outcome = CGD_BLOCK_FP64;
        counters_local[0] += 1.0f;
        return;
    }
    if (*outcome != CGD_BLOCK_NEVER) {
        *outcome = CGD_BLOCK_KEPT;
        counters_local[1] += 1.0f;
        return;
    }
    memset(P, 0, nn * sizeof(float));
    for (int i = 0; i < B; ++i) {
        double cii = C[(size_t)i * B + i];
        /* A non-finite C (the moments themselves are broken) still yields a finite P: the identity. */
        P[(size_t)i * B + i] = isfinite(cii) ? (float)inverse_power(cii, h->eps, h->power) : 1.0f;
        eigvals[i] = (float)cii;
    }
    *outcome = CGD_BLOCK_DIAGONAL;
    counters_local[2] += 1.0f;
}

int cgd_cpu_block_step(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_block_tensor *tensors, int64_t count,
                       const cgd_block_state *st, const float *grad_scale, const float *skip) {
    if (skip && *skip != 0.0f) return 0;
    const int64_t B = st->block, nb = st->nblocks, length = B * nb;
    const float scale = grad_scale ? *grad_scale : 1.0f;
    const double t = (double)*st->step + 1.0;
    const double bc1 = h->bias_correction ? 1.0 - pow(h->beta1, t) : 1.0;
    const double bc2 = h->bias_correction ? 1.0 - pow(h->beta2, t) : 1.0;
    const float beta1 = (float)h->beta1, beta2 = (float)h->beta2;
    const float w1 = (float)(1.0 - h->beta1), w2 = (float)(1.0 - h->beta2);
    const float inv_bc1 = (float)(1.0 / bc1), inv_bc2 = (float)(1.0 / bc2);

    /* g: the padded gradient; u: the preconditioned force, both over the whole blocked vector. */
    float *g = calloc((size_t)length, sizeof(float));
    float *u = malloc((size_t)length * sizeof(float));
    if (!g || !u) {
        free(g);
        free(u);
        return 1;
    }
    for (int64_t i = 0; i < count; ++i) {
        const cgd_block_tensor *tn = &tensors[i];
        for (int64_t j = 0; j < tn->numel; ++j) {
            float v = cgd_load_f32(dtype, tn->grad, j) / scale;
            g[tn->offset + j] = h->maximize ? -v : v;
        }
    }

    int failed = 0;
    float counters[3] = {0.0f, 0.0f, 0.0f};
#pragma omp parallel
    {
        eig_scratch s;
        float *C = NULL, *F = NULL;
        float local[3] = {0.0f, 0.0f, 0.0f};
        int have_scratch = h->refresh && scratch_init(&s, (int)B) == 0;
        int ready = !h->refresh || have_scratch;
        if (h->refresh) {
            C = malloc((size_t)B * (size_t)B * sizeof(float));
            ready = ready && C != NULL;
        }
        F = malloc((size_t)B * sizeof(float));
        ready = ready && F != NULL;
        if (!ready) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t b = 0; b < nb; ++b) {
                const float *gb = g + b * B;
                float *m1 = st->exp_avg + b * B;
                float *m2 = st->exp_avg_sq + b * B * B;
                float *P = st->precond + b * B * B;
                for (int64_t i = 0; i < B; ++i) {
                    m1[i] = beta1 * m1[i] + w1 * gb[i];
                    F[i] = m1[i] * inv_bc1;
                }
                for (int64_t i = 0; i < B; ++i)
                    for (int64_t j = 0; j < B; ++j)
                        m2[i * B + j] = beta2 * m2[i * B + j] + w2 * gb[i] * gb[j];
                if (h->refresh) {
                    for (int64_t i = 0; i < B; ++i)
                        for (int64_t j = 0; j < B; ++j)
                            C[i * B + j] = m2[i * B + j] * inv_bc2 - (h->centered ? F[i] * F[j] : 0.0f);
                    refresh_block(h, C, P, st->eigvals + b * B, &st->outcome[b], local, &s);
                }
                for (int64_t i = 0; i < B; ++i) {
                    double sum = 0.0;
                    for (int64_t j = 0; j < B; ++j) sum += (double)P[i * B + j] * F[j];
                    u[b * B + i] = (float)sum;
                }
            }
        }
#pragma omp critical
        for (int k = 0; k < 3; ++k) counters[k] += local[k];
        if (have_scratch) scratch_free(&s);
        free(C);
        free(F);
    }
    if (!failed) {
        const float lr = (float)h->lr, decay = (float)(1.0 - h->lr * h->weight_decay);
        for (int64_t i = 0; i < count; ++i) {
            const cgd_block_tensor *tn = &tensors[i];
            for (int64_t j = 0; j < tn->numel; ++j) {
                float p = cgd_load_f32(dtype, tn->param, j);
                cgd_store_f32(dtype, tn->param, j, p * decay - lr * u[tn->offset + j]);
            }
        }
        for (int k = 0; k < 3; ++k) st->counters[k] += counters[k];
        *st->step += 1.0f;
    }
    free(g);
    free(u);
    return failed;
}
