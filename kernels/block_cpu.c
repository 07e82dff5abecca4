/*
 * CPU kernel of full/block CGD (paper eq 4.9), in the build's real type (real.h): rank-1 EMA updates of each
 * block's M1 and M2, the symmetric eigendecomposition of C (eigh_cpu.h: blocks up to CGD_JACOBI_MAX_BLOCK by the
 * batched Jacobi solver, a group of them at once; larger ones, and any it leaves unconverged, by LAPACK), and the
 * preconditioned step. Blocks are independent, so OpenMP threads take whole groups of blocks and the result does
 * not depend on the thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "blas_cpu.h"
#include "diag_math.h"
#include "eigh_cpu.h"
#include "kernels.h"
#include "real.h"

/* P = sum_k d_k v_k v_k^T, v_k = row k of the column-major eigenvector output, d_k the metric's inverse power of
   eigenvalue k, accumulated in double as rank-1 updates of the upper triangle (row-contiguous, so the inner loop
   vectorises), then mirrored. */
CGD_CPU_CLONES
static void assemble_precond(cgd_real *P, double *acc, const double *vecs_d, const cgd_real *vecs_f, const double *d,
                             int B) {
    memset(acc, 0, (size_t)B * (size_t)B * sizeof(double));
    for (int k = 0; k < B; ++k) {
        for (int i = 0; i < B; ++i) {
            double vi = vecs_d ? vecs_d[(size_t)k * B + i] : (double)vecs_f[(size_t)k * B + i];
            double s = d[k] * vi;
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

/* The same P for a block larger than the Jacobi solver's: W = diag(sqrt d) E with E's row k eigenvector k, then
   P = W^T W as one double gemm (d > 0 for every power, so sqrt d is real), B^3 multiply-adds at BLAS speed
   rather than in loops. w_buf holds B^2 doubles, acc B^2. */
static void assemble_precond_blas(cgd_real *P, double *acc, double *w_buf, const double *vecs_d,
                                  const cgd_real *vecs_f, const double *d, int B) {
    for (int k = 0; k < B; ++k) {
        const double root = sqrt(d[k]);
        for (int i = 0; i < B; ++i)
            w_buf[(size_t)k * B + i] = root * (vecs_d ? vecs_d[(size_t)k * B + i] : (double)vecs_f[(size_t)k * B + i]);
    }
    cgd_gemm_f64(1, 0, B, B, B, 1.0, w_buf, B, w_buf, B, 0.0, acc, B);
    for (size_t e = 0; e < (size_t)B * (size_t)B; ++e) P[e] = (cgd_real)acc[e];
}

/* d = (eps + max(lambda, 0))^-a for n eigenvalues of the build's real type: in the float32 build the vectorised
   float power (diag_math.h, within 4e-7 of float64 pow), as the diagonal metric takes it; exact at a = 1/2 and 1. */
CGD_CPU_CLONES
static void inverse_powers(const cgd_real *lambda, int64_t n, double eps, double power, double *d) {
#if CGD_F64
    for (int64_t k = 0; k < n; ++k) d[k] = cgd_inverse_power(lambda[k], eps, power);
#else
    const float e = (float)eps, a = (float)power;
    if (power == 0.0)
        for (int64_t k = 0; k < n; ++k) d[k] = 1.0;
    else if (power == 0.5)
        for (int64_t k = 0; k < n; ++k) d[k] = 1.0f / sqrtf(e + (lambda[k] > 0 ? lambda[k] : 0));
    else if (power == 1.0)
        for (int64_t k = 0; k < n; ++k) d[k] = 1.0f / (e + (lambda[k] > 0 ? lambda[k] : 0));
    else
        for (int64_t k = 0; k < n; ++k) d[k] = cgd_powf_times(e + (lambda[k] > 0 ? lambda[k] : 0), -a, 1.0f);
#endif
}

/* P = V diag(d) V^T of every lane of a Jacobi group (v and d lane-interleaved as cgd_eigh_jacobi_lanes leaves
   them: v_ik at (i B + k) L + l, d_k at k L + l), its B <= 32 terms per entry summed in the real type (the LAPACK
   path's larger blocks sum in double), written to P[l] for each lane l with P[l] != NULL. w holds B^2 L reals. */
CGD_CPU_CLONES
static void group_precond(const cgd_real *v, const cgd_real *d, int B, cgd_real *w, cgd_real *const *P) {
    enum { L = CGD_JACOBI_LANES };
    for (int i = 0; i < B; ++i)
        for (int k = 0; k < B; ++k)
            *(cgd_lanes *)(w + ((size_t)i * B + k) * L) =
                *(const cgd_lanes *)(d + (size_t)k * L) * *(const cgd_lanes *)(v + ((size_t)i * B + k) * L);
    for (int i = 0; i < B; ++i)
        for (int j = i; j < B; ++j) {
            cgd_lanes sum = *(const cgd_lanes *)(w + (size_t)i * B * L) * *(const cgd_lanes *)(v + (size_t)j * B * L);
            for (int k = 1; k < B; ++k)
                sum += *(const cgd_lanes *)(w + ((size_t)i * B + k) * L) *
                       *(const cgd_lanes *)(v + ((size_t)j * B + k) * L);
            for (int l = 0; l < L; ++l)
                if (P[l]) P[l][(size_t)i * B + j] = P[l][(size_t)j * B + i] = sum[l];
        }
}

/* Each lane's B eigenvalues (the diagonal of a Jacobi group's a) in ascending order, as LAPACK returns them, into
   sorted (k L + l): an odd-even transposition sort, its compare-exchanges across all lanes at once. */
CGD_CPU_CLONES
static void group_eigenvalues(const cgd_real *a, int B, cgd_real *sorted) {
    enum { L = CGD_JACOBI_LANES };
    for (int k = 0; k < B; ++k)
        for (int l = 0; l < L; ++l) sorted[(size_t)k * L + l] = a[((size_t)k * B + k) * L + l];
    for (int round = 0; round < B; ++round)
        for (int k = round & 1; k + 1 < B; k += 2) {
            cgd_real *x = sorted + (size_t)k * L, *y = x + L;
            for (int l = 0; l < L; ++l) {
                const cgd_real lo = x[l] < y[l] ? x[l] : y[l], hi = x[l] < y[l] ? y[l] : x[l];
                x[l] = lo;
                y[l] = hi;
            }
        }
}

/* Refreshes one block's P from C (row-major B x B, symmetric) down the failure ladder of cgd.h. A C holding
   NaN or Inf (the moments themselves overflowed) never reaches LAPACK: it takes the ladder's later rungs. */
static void refresh_block(const cgd_block_hparams *h, const cgd_real *C, int finite, cgd_real *P, cgd_real *eigvals,
                          int32_t *outcome, float *counters_local, cgd_eigh_scratch *s, double *acc) {
    int B = s->n;
    size_t nn = (size_t)B * (size_t)B;
    const cgd_real *w = s->w;
    int solved = !finite ? -1 : cgd_eigh_solve(C, B, s);
    if (solved >= 0 && h->power == 0.0) { /* SGD's metric: the identity exactly, not V V^T's rounding of it */
        memset(P, 0, nn * sizeof(cgd_real));
        for (int i = 0; i < B; ++i) P[(size_t)i * B + i] = 1;
    }
    /* acc: B^2 doubles of sums, B^2 of the BLAS assembly's scaled eigenvectors, then B inverse powers. */
    if (solved == CGD_BLOCK_FP32) {
        if (h->power != 0.0) {
            inverse_powers(w, B, h->eps, h->power, acc + 2 * nn);
            if (B > CGD_JACOBI_MAX_BLOCK)
                assemble_precond_blas(P, acc, acc + nn, NULL, s->a, acc + 2 * nn, B);
            else
                assemble_precond(P, acc, NULL, s->a, acc + 2 * nn, B);
        }
        memcpy(eigvals, w, (size_t)B * sizeof(cgd_real));
        *outcome = CGD_BLOCK_FP32;
        return;
    }
    if (solved == CGD_BLOCK_FP64) {
        double *d = acc + 2 * nn;
        for (int k = 0; k < B; ++k) d[k] = cgd_inverse_power(s->dw[k], h->eps, h->power);
        if (h->power != 0.0 && B > CGD_JACOBI_MAX_BLOCK)
            assemble_precond_blas(P, acc, acc + nn, s->da, NULL, d, B);
        else if (h->power != 0.0)
            assemble_precond(P, acc, s->da, NULL, d, B);
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

/* C = M2 / bc2 - (centered ? F F^T : 0) of one block, entry (i, j) at C[(i B + j) stride]; 1 when every entry is
   finite. */
static inline int covariance(const cgd_block_hparams *h, int64_t B, const cgd_real *m2, const cgd_real *F,
                             cgd_real inv_bc2, cgd_real *C, size_t stride) {
    int finite = 1;
    for (int64_t i = 0; i < B; ++i)
        for (int64_t j = 0; j < B; ++j) {
            const cgd_real x = m2[i * B + j] * inv_bc2 - (h->centered ? F[i] * F[j] : 0);
            C[(size_t)(i * B + j) * stride] = x;
            finite &= isfinite(x) != 0;
        }
    return finite;
}

/* The direction of a block whose Lanczos run did not converge (or met a non-finite value): this step's
   eigendecomposition of C, then the diagonal metric, as the eigendecomposition path's ladder without a cached P.
   Its scratch is taken here, on the rare step that needs it; without it the diagonal rung serves. */
static void lanczos_fallback(const cgd_block_hparams *h, const cgd_real *m2, const cgd_real *F, cgd_real inv_bc2,
                             int B, cgd_real *u, int32_t *outcome, float *counters) {
    const size_t nn = (size_t)B * (size_t)B;
    cgd_real *C = cgd_host_alloc(nn * sizeof(cgd_real));
    double *d = cgd_host_alloc((size_t)B * sizeof(double)), *t = cgd_host_alloc((size_t)B * sizeof(double));
    cgd_eigh_scratch s;
    int solved = -1, have_scratch = C && d && t && cgd_eigh_scratch_init(&s, B) == 0;
    if (have_scratch) {
        solved = covariance(h, B, m2, F, inv_bc2, C, 1) ? cgd_eigh_solve(C, B, &s) : -1;
    }
    if (solved >= 0) {
        /* u = V diag(d) V^T F in double, V's column k eigenvector k */
        for (int k = 0; k < B; ++k) {
            double dot = 0.0;
            for (int i = 0; i < B; ++i)
                dot += (solved == CGD_BLOCK_FP64 ? s.da[(size_t)k * B + i] : (double)s.a[(size_t)k * B + i]) * F[i];
            d[k] = cgd_inverse_power(solved == CGD_BLOCK_FP64 ? s.dw[k] : (double)s.w[k], h->eps, h->power) * dot;
        }
        for (int i = 0; i < B; ++i) t[i] = 0.0;
        for (int k = 0; k < B; ++k)
            for (int i = 0; i < B; ++i)
                t[i] += d[k] * (solved == CGD_BLOCK_FP64 ? s.da[(size_t)k * B + i] : (double)s.a[(size_t)k * B + i]);
        for (int i = 0; i < B; ++i) u[i] = (cgd_real)t[i];
        *outcome = solved;
        counters[0] += solved == CGD_BLOCK_FP64 ? 1.0f : 0.0f;
    } else {
        for (int i = 0; i < B; ++i) {
            const double cii = (double)m2[(size_t)i * B + i] * inv_bc2 - (h->centered ? (double)F[i] * F[i] : 0.0);
            u[i] = isfinite(cii) ? (cgd_real)(cgd_inverse_power(cii, h->eps, h->power) * F[i]) : F[i];
        }
        *outcome = CGD_BLOCK_DIAGONAL;
        counters[2] += 1.0f;
    }
    counters[3] += 1.0f;
    if (have_scratch) cgd_eigh_scratch_free(&s);
    free(C);
    free(d);
    free(t);
}

/* The moments' update and the direction u of every block by Lanczos (CGD_SOLVER_LANCZOS). With fewer blocks than
   threads (the full metric: one) a block's products with M2 take all the threads; otherwise each thread takes
   whole blocks. Either way each entry is computed by the same operations, whatever the thread count. */
static int lanczos_blocks(const cgd_block_hparams *h, const cgd_block_state *st, const cgd_real *g, cgd_real *u,
                          cgd_real inv_bc1, cgd_real inv_bc2, float *counters) {
    const int64_t B = st->block, nb = st->nblocks;
    const cgd_real beta1 = (cgd_real)h->beta1, beta2 = (cgd_real)h->beta2;
    const cgd_real w1 = (cgd_real)(1.0 - h->beta1), w2 = (cgd_real)(1.0 - h->beta2);
#ifdef _OPENMP
    const int inner = nb < omp_get_max_threads();
#else
    const int inner = 0;
#endif
    int failed = 0;
#pragma omp parallel if (!inner)
    {
        cgd_lanczos_scratch s;
        float local[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        cgd_real *F = cgd_host_alloc((size_t)B * sizeof(cgd_real));
        const int have_scratch = cgd_lanczos_scratch_init(&s, (int)B) == 0;
        if (!have_scratch || !F) {
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
                for (int64_t i = 0; i < B; ++i) {
                    m1[i] = beta1 * m1[i] + w1 * gb[i];
                    F[i] = m1[i] * inv_bc1;
                }
#pragma omp parallel for schedule(static) if (inner)
                for (int64_t i = 0; i < B; ++i)
                    for (int64_t j = 0; j < B; ++j) m2[i * B + j] = beta2 * m2[i * B + j] + w2 * gb[i] * gb[j];
                const int iters = cgd_lanczos_direction(m2, (double)inv_bc2, F, h->centered, (int)B, h->eps, h->power,
                                                        inner, &s, u + b * B);
                if (iters > 0)
                    st->outcome[b] = CGD_BLOCK_LANCZOS;
                else
                    lanczos_fallback(h, m2, F, inv_bc2, (int)B, u + b * B, &st->outcome[b], local);
            }
        }
#pragma omp critical
        for (int k = 0; k < 4; ++k) counters[k] += local[k];
        if (have_scratch) cgd_lanczos_scratch_free(&s);
        free(F);
    }
    return failed;
}

/* One block's moments advanced by its gradient gb, and F = bias-corrected M1 (B entries). */
static inline void advance_moments(const cgd_block_hparams *h, int64_t B, const cgd_real *gb, cgd_real *m1,
                                   cgd_real *m2, cgd_real inv_bc1, cgd_real *F) {
    const cgd_real beta1 = (cgd_real)h->beta1, beta2 = (cgd_real)h->beta2;
    const cgd_real w1 = (cgd_real)(1.0 - h->beta1), w2 = (cgd_real)(1.0 - h->beta2);
    for (int64_t i = 0; i < B; ++i) {
        m1[i] = beta1 * m1[i] + w1 * gb[i];
        F[i] = m1[i] * inv_bc1;
    }
    for (int64_t i = 0; i < B; ++i)
        for (int64_t j = 0; j < B; ++j) m2[i * B + j] = beta2 * m2[i * B + j] + w2 * gb[i] * gb[j];
}

/* u = P F of one block, each entry's B terms summed in double in column order. The rows' sums advance together
   (the column loop outside), so they are independent chains rather than one long chain of dependent additions;
   each sum still adds its terms in the same order. acc holds B doubles. */
static inline void block_direction(const cgd_real *P, const cgd_real *F, int64_t B, cgd_real *u) {
    double acc[CGD_JACOBI_MAX_BLOCK];
    if (B > CGD_JACOBI_MAX_BLOCK) { /* a large block's row sums are long enough to run side by side anyway */
        for (int64_t i = 0; i < B; ++i) {
            double sum = 0.0;
            for (int64_t j = 0; j < B; ++j) sum += (double)P[i * B + j] * F[j];
            u[i] = (cgd_real)sum;
        }
        return;
    }
    for (int64_t i = 0; i < B; ++i) acc[i] = 0.0;
    for (int64_t j = 0; j < B; ++j) {
        const double f = F[j];
        for (int64_t i = 0; i < B; ++i) acc[i] += (double)P[i * B + j] * f;
    }
    for (int64_t i = 0; i < B; ++i) u[i] = (cgd_real)acc[i];
}

/* The moments' update and the direction u of every block through the eigendecomposition of C on refresh steps
   and the cached P (CGD_SOLVER_EIGH). On a refresh, blocks up to CGD_JACOBI_MAX_BLOCK go CGD_JACOBI_LANES at a
   time through the batched Jacobi solver, their C built, decomposed, inverted and assembled into P lane-
   interleaved; a block it leaves unconverged (or whose C is not finite) takes refresh_block's ladder. */
static int eigh_blocks(const cgd_block_hparams *h, const cgd_block_state *st, const cgd_real *g, cgd_real *u,
                       cgd_real inv_bc1, cgd_real inv_bc2, float *counters) {
    const int64_t B = st->block, nb = st->nblocks;
    const size_t nn = (size_t)B * (size_t)B;
    int failed = 0;
    enum { L = CGD_JACOBI_LANES };
    const int jacobi = h->refresh && B <= CGD_JACOBI_MAX_BLOCK;
    /* small blocks go in groups of L on every step, so the loop's scheduling is paid per group, not per block */
    const int64_t group = B <= CGD_JACOBI_MAX_BLOCK ? L : 1, groups = (nb + group - 1) / group;
#pragma omp parallel
    {
        cgd_eigh_scratch s;
        cgd_real *C = NULL, *F = NULL, *ja = NULL;
        void *ja_block = NULL;
        double *acc = NULL, *jd = NULL;
        float local[3] = {0.0f, 0.0f, 0.0f};
        int have_scratch = h->refresh && cgd_eigh_scratch_init(&s, (int)B) == 0;
        int ready = !h->refresh || have_scratch;
        if (h->refresh) {
            C = cgd_host_alloc(nn * sizeof(cgd_real));
            acc = cgd_host_alloc((2 * nn + (size_t)B) * sizeof(double));
            ready = ready && C != NULL && acc != NULL;
        }
        if (jacobi) {
            /* the group's C (becoming its eigenvalues), eigenvectors and scaled eigenvectors (B^2 L each), its
               eigenvalues sorted and their inverse powers in the real type (B L each), and in double (B L) */
            ja_block = cgd_host_alloc((size_t)L * (3 * nn + 2 * (size_t)B) * sizeof(cgd_real) + 64);
            /* on a 64-byte boundary, so each lane vector is one cache line: a vector split over two lines
               costs two accesses, and a store split so cannot be forwarded to the load that follows */
            ja = ja_block ? (cgd_real *)(((uintptr_t)ja_block + 63) & ~(uintptr_t)63) : NULL;
            jd = cgd_host_alloc((size_t)L * (size_t)B * sizeof(double));
            ready = ready && ja != NULL && jd != NULL;
        }
        F = cgd_host_alloc((size_t)group * (size_t)B * sizeof(cgd_real));
        ready = ready && F != NULL;
        if (!ready) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t gi = 0; gi < groups; ++gi) {
                const int64_t first = gi * group;
                const int count = (int)(nb - first < group ? nb - first : group);
                int finite[L], converged[L];
                for (int l = 0; l < count; ++l) {
                    const int64_t b = first + l;
                    cgd_real *m2 = (cgd_real *)st->exp_avg_sq + b * B * B, *Fb = F + (int64_t)l * B;
                    advance_moments(h, B, g + b * B, (cgd_real *)st->exp_avg + b * B, m2, inv_bc1, Fb);
                    if (jacobi) finite[l] = covariance(h, B, m2, Fb, inv_bc2, ja + l, L);
                }
                if (jacobi) {
                    cgd_real *a = ja, *v = a + nn * L, *w = v + nn * L, *sorted = w + nn * L;
                    cgd_real *d = sorted + (size_t)B * L;
                    /* idle lanes, and a C that is not finite (the moments themselves overflowed: it takes the
                       ladder's later rungs), hold I, with nothing to rotate */
                    for (int l = 0; l < L; ++l)
                        if (l >= count || !finite[l])
                            for (size_t e = 0; e < nn; ++e) a[e * L + l] = (cgd_real)(e % (size_t)(B + 1) == 0);
                    cgd_eigh_jacobi_lanes((int)B, a, v, converged);
                    group_eigenvalues(a, (int)B, sorted);
                    for (int k = 0; k < B; ++k) /* the metric's powers of the eigenvalues, in v's column order */
                        for (int l = 0; l < L; ++l) d[(size_t)k * L + l] = a[((size_t)k * B + k) * L + l];
                    inverse_powers(d, (int64_t)B * L, h->eps, h->power, jd);
                    for (size_t e = 0; e < (size_t)B * L; ++e) d[e] = (cgd_real)jd[e];
                    cgd_real *P[L];
                    for (int l = 0; l < L; ++l) {
                        const int ok = l < count && finite[l] && converged[l];
                        P[l] = ok && h->power != 0.0 ? (cgd_real *)st->precond + (first + l) * B * B : NULL;
                        if (!ok) continue;
                        const int64_t b = first + l;
                        if (h->power == 0.0) { /* SGD's metric: the identity exactly, not V V^T's rounding of it */
                            cgd_real *Pb = (cgd_real *)st->precond + b * B * B;
                            for (size_t e = 0; e < nn; ++e) Pb[e] = (cgd_real)(e % (size_t)(B + 1) == 0);
                        }
                        for (int k = 0; k < B; ++k) ((cgd_real *)st->eigvals)[b * B + k] = sorted[(size_t)k * L + l];
                        st->outcome[b] = CGD_BLOCK_FP32;
                    }
                    if (h->power != 0.0) group_precond(v, d, (int)B, w, P);
                }
                for (int l = 0; h->refresh && l < count; ++l) {
                    if (jacobi && finite[l] && converged[l]) continue;
                    const int64_t b = first + l;
                    const cgd_real *m2 = (cgd_real *)st->exp_avg_sq + b * B * B;
                    const int ok = covariance(h, B, m2, F + (int64_t)l * B, inv_bc2, C, 1);
                    refresh_block(h, C, ok, (cgd_real *)st->precond + b * B * B, (cgd_real *)st->eigvals + b * B,
                                  &st->outcome[b], local, &s, acc);
                }
                for (int l = 0; l < count; ++l) {
                    const int64_t b = first + l;
                    const cgd_real *P = (cgd_real *)st->precond + b * B * B, *Fb = F + (int64_t)l * B;
                    block_direction(P, Fb, B, u + b * B);
                }
            }
        }
#pragma omp critical
        for (int k = 0; k < 3; ++k) counters[k] += local[k];
        if (have_scratch) cgd_eigh_scratch_free(&s);
        free(C);
        free(acc);
        free(F);
        free(ja_block);
        free(jd);
    }
    return failed;
}

int CGD_NAME(cgd_cpu_block_step)(const cgd_block_hparams *hp, cgd_dtype dtype, const cgd_block_tensor *tensors,
                                 int64_t count, const cgd_block_state *st, const float *grad_scale, const float *skip) {
    if (skip && *skip != 0.0f) return 0;
    cgd_block_hparams centered_now = *hp;
    centered_now.centered = hp->centered && cgd_variance_has_data(hp->bias_correction, *st->step);
    const cgd_block_hparams *h = &centered_now;
    const int64_t B = st->block, nb = st->nblocks, length = B * nb;
    const cgd_real scale = grad_scale ? (cgd_real)*grad_scale : 1;
    const double t = (double)*st->step + 1.0;
    const double bc1 = h->bias_correction ? 1.0 - pow(h->beta1, t) : 1.0;
    const double bc2 = h->bias_correction ? 1.0 - pow(h->beta2, t) : 1.0;
    const cgd_real inv_bc1 = (cgd_real)(1.0 / bc1), inv_bc2 = (cgd_real)(1.0 / bc2);

    /* g: the padded gradient; u: the preconditioned force, both over the whole blocked vector. */
    cgd_real *g = cgd_host_zalloc((size_t)length * sizeof(cgd_real));
    cgd_real *u = cgd_host_alloc((size_t)length * sizeof(cgd_real));
    if (!g || !u) {
        free(g);
        free(u);
        return 1;
    }
    /* elementwise, so spread over the threads for a large tensor without changing a bit */
    for (int64_t i = 0; i < count; ++i) {
        const cgd_block_tensor *tn = &tensors[i];
#pragma omp parallel for schedule(static) if (tn->numel >= CGD_CPU_PARALLEL_MIN)
        for (int64_t j = 0; j < tn->numel; ++j) {
            cgd_real v = cgd_load_real(dtype, tn->grad, j) / scale;
            g[tn->offset + j] = h->maximize ? -v : v;
        }
    }

    float counters[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    const int failed = h->solver == CGD_SOLVER_LANCZOS ? lanczos_blocks(h, st, g, u, inv_bc1, inv_bc2, counters)
                                                       : eigh_blocks(h, st, g, u, inv_bc1, inv_bc2, counters);
    if (!failed) {
        const cgd_real lr = (cgd_real)h->lr, decay = (cgd_real)(1.0 - h->lr * h->weight_decay);
        for (int64_t i = 0; i < count; ++i) {
            const cgd_block_tensor *tn = &tensors[i];
#pragma omp parallel for schedule(static) if (tn->numel >= CGD_CPU_PARALLEL_MIN)
            for (int64_t j = 0; j < tn->numel; ++j) {
                cgd_real p = cgd_load_real(dtype, tn->param, j);
                cgd_store_real(dtype, tn->param, j, p * decay - lr * u[tn->offset + j]);
            }
        }
        for (int k = 0; k < 4; ++k) st->counters[k] += counters[k];
        *st->step += 1.0;
    }
    free(g);
    free(u);
    return failed;
}
