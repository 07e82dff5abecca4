/*
 * CPU kernel of full/block CGD (paper eq 4.9), in the build's real type (real.h): rank-1 EMA updates of each
 * block's M1 and M2, the symmetric eigendecomposition of C through LAPACK (eigh_cpu.h), and the preconditioned
 * step. Blocks are
 * independent, so OpenMP threads take whole blocks and the result does not depend on the thread count.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "eigh_cpu.h"
#include "kernels.h"
#include "real.h"

/* P = sum_k d_k v_k v_k^T, v_k = row k of the column-major eigenvector output, accumulated in double as
   rank-1 updates of the upper triangle (row-contiguous, so the inner loop vectorises), then mirrored. */
static void assemble_precond(cgd_real *P, double *acc, const double *vecs_d, const cgd_real *vecs_f,
                             const double *lambda_d, const cgd_real *lambda_f, int B, double eps, double power) {
    memset(acc, 0, (size_t)B * (size_t)B * sizeof(double));
    for (int k = 0; k < B; ++k) {
        double d = cgd_inverse_power(lambda_d ? lambda_d[k] : (double)lambda_f[k], eps, power);
        for (int i = 0; i < B; ++i) {
            double vi = vecs_d ? vecs_d[(size_t)k * B + i] : (double)vecs_f[(size_t)k * B + i];
            double s = d * vi;
            double *row = acc + (size_t)i * B;
            if (vecs_d) {
                const double *v = vecs_d + (size_t)k * B;
                for (int j = i; j < B; ++j) row[j] += s * v[j];
            } else {
                const cgd_real *v = vecs_f + (size_t)k * B;
                for (int j = i; j < B; ++j) row[j] += s * (double)v[j];
            }
        }
    }
    for (int i = 0; i < B; ++i)
        for (int j = i; j < B; ++j) P[(size_t)i * B + j] = P[(size_t)j * B + i] = (cgd_real)acc[(size_t)i * B + j];
}

/* Refreshes one block's P from C (row-major B x B, symmetric) down the failure ladder of cgd.h. A C holding
   NaN or Inf (the moments themselves overflowed) never reaches LAPACK: it takes the ladder's later rungs. */
static void refresh_block(const cgd_block_hparams *h, const cgd_real *C, cgd_real *P, cgd_real *eigvals,
                          int32_t *outcome, float *counters_local, cgd_eigh_scratch *s, double *acc) {
    int B = s->n;
    size_t nn = (size_t)B * (size_t)B;
    int finite = 1;
    for (size_t e = 0; e < nn; ++e) finite &= isfinite(C[e]) != 0;
    int solved = finite ? cgd_eigh_solve(C, B, s) : -1;
    if (solved >= 0 && h->power == 0.0) { /* SGD's metric: the identity exactly, not V V^T's rounding of it */
        memset(P, 0, nn * sizeof(cgd_real));
        for (int i = 0; i < B; ++i) P[(size_t)i * B + i] = 1;
    }
    if (solved == CGD_BLOCK_FP32) {
        if (h->power != 0.0) assemble_precond(P, acc, NULL, s->a, NULL, s->w, B, h->eps, h->power);
        memcpy(eigvals, s->w, (size_t)B * sizeof(cgd_real));
        *outcome = CGD_BLOCK_FP32;
        return;
    }
    if (solved == CGD_BLOCK_FP64) {
        if (h->power != 0.0) assemble_precond(P, acc, s->da, NULL, s->dw, NULL, B, h->eps, h->power);
        for (int k = 0; k < B; ++k) eigvals[k] = (cgd_real)s->dw[k];
        *outcome = CGD_BLOCK_FP64;
        counters_local[0] += 1.0f;
        return;
    }
    if (*outcome != CGD_BLOCK_NEVER) {
        *outcome = CGD_BLOCK_KEPT;
        counters_local[1] += 1.0f;
        return;
    }
    memset(P, 0, nn * sizeof(cgd_real));
    for (int i = 0; i < B; ++i) {
        double cii = C[(size_t)i * B + i];
        /* A non-finite C (the moments themselves are broken) still yields a finite P: the identity. */
        P[(size_t)i * B + i] = isfinite(cii) ? (cgd_real)cgd_inverse_power(cii, h->eps, h->power) : 1;
        eigvals[i] = (cgd_real)cii;
    }
    *outcome = CGD_BLOCK_DIAGONAL;
    counters_local[2] += 1.0f;
}

int CGD_NAME(cgd_cpu_block_step)(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_block_tensor *tensors,
                                 int64_t count, const cgd_block_state *st, const float *grad_scale, const float *skip) {
    if (skip && *skip != 0.0f) return 0;
    const int64_t B = st->block, nb = st->nblocks, length = B * nb;
    const cgd_real scale = grad_scale ? (cgd_real)*grad_scale : 1;
    const double t = (double)*st->step + 1.0;
    const double bc1 = h->bias_correction ? 1.0 - pow(h->beta1, t) : 1.0;
    const double bc2 = h->bias_correction ? 1.0 - pow(h->beta2, t) : 1.0;
    const cgd_real beta1 = (cgd_real)h->beta1, beta2 = (cgd_real)h->beta2;
    const cgd_real w1 = (cgd_real)(1.0 - h->beta1), w2 = (cgd_real)(1.0 - h->beta2);
    const cgd_real inv_bc1 = (cgd_real)(1.0 / bc1), inv_bc2 = (cgd_real)(1.0 / bc2);

    /* g: the padded gradient; u: the preconditioned force, both over the whole blocked vector. */
    cgd_real *g = cgd_host_zalloc((size_t)length * sizeof(cgd_real));
    cgd_real *u = cgd_host_alloc((size_t)length * sizeof(cgd_real));
    if (!g || !u) {
        free(g);
        free(u);
        return 1;
    }
    for (int64_t i = 0; i < count; ++i) {
        const cgd_block_tensor *tn = &tensors[i];
        for (int64_t j = 0; j < tn->numel; ++j) {
            cgd_real v = cgd_load_real(dtype, tn->grad, j) / scale;
            g[tn->offset + j] = h->maximize ? -v : v;
        }
    }

    int failed = 0;
    float counters[3] = {0.0f, 0.0f, 0.0f};
#pragma omp parallel
    {
        cgd_eigh_scratch s;
        cgd_real *C = NULL, *F = NULL;
        double *acc = NULL;
        float local[3] = {0.0f, 0.0f, 0.0f};
        int have_scratch = h->refresh && cgd_eigh_scratch_init(&s, (int)B) == 0;
        int ready = !h->refresh || have_scratch;
        if (h->refresh) {
            C = cgd_host_alloc((size_t)B * (size_t)B * sizeof(cgd_real));
            acc = cgd_host_alloc((size_t)B * (size_t)B * sizeof(double));
            ready = ready && C != NULL && acc != NULL;
        }
        F = cgd_host_alloc((size_t)B * sizeof(cgd_real));
        ready = ready && F != NULL;
        if (!ready) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t b = 0; b < nb; ++b) {
                const cgd_real *gb = g + b * B;
                cgd_real *m1 = (cgd_real *)st->exp_avg + b * B;
                cgd_real *m2 = (cgd_real *)st->exp_avg_sq + b * B * B;
                cgd_real *P = (cgd_real *)st->precond + b * B * B;
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
                            C[i * B + j] = m2[i * B + j] * inv_bc2 - (h->centered ? F[i] * F[j] : 0);
                    refresh_block(h, C, P, (cgd_real *)st->eigvals + b * B, &st->outcome[b], local, &s, acc);
                }
                for (int64_t i = 0; i < B; ++i) {
                    double sum = 0.0;
                    for (int64_t j = 0; j < B; ++j) sum += (double)P[i * B + j] * F[j];
                    u[b * B + i] = (cgd_real)sum;
                }
            }
        }
#pragma omp critical
        for (int k = 0; k < 3; ++k) counters[k] += local[k];
        if (have_scratch) cgd_eigh_scratch_free(&s);
        free(C);
        free(acc);
        free(F);
    }
    if (!failed) {
        const cgd_real lr = (cgd_real)h->lr, decay = (cgd_real)(1.0 - h->lr * h->weight_decay);
        for (int64_t i = 0; i < count; ++i) {
            const cgd_block_tensor *tn = &tensors[i];
            for (int64_t j = 0; j < tn->numel; ++j) {
                cgd_real p = cgd_load_real(dtype, tn->param, j);
                cgd_store_real(dtype, tn->param, j, p * decay - lr * u[tn->offset + j]);
            }
        }
        for (int k = 0; k < 3; ++k) st->counters[k] += counters[k];
        *st->step += 1.0;
    }
    free(g);
    free(u);
    return failed;
}
