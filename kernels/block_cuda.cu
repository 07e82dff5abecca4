/*
 * CUDA side of full/block CGD (paper eq 4.9). Per step, all on the caller's stream and without a host
 * synchronisation:
 *   gather     the tensors' gradients into one zero-padded vector g (multi-tensor launches)
 *   moments    M1 <- beta1 M1 + (1 - beta1) g, F = M1 / bc1;  M2 <- beta2 M2 + (1 - beta2) g g^T
 *   refresh    per chunk of blocks: C = M2 / bc2 - F F^T into the workspace; a block whose C holds NaN or Inf
 *              is replaced by the identity (the solver never sees it) and marked failed; eigendecomposition
 *              (cuSOLVER syevjBatched for blocks of <= 32, XsyevBatched above: one call per chunk), then a
 *              check-and-scale kernel and a batched GEMM form P = V diag((eps + max(lambda, 0))^-a) V^T; a
 *              commit kernel writes P only for blocks whose solve succeeded (else keeps the previous P, or the
 *              diagonal metric)
 *   apply      u = P F (one thread per coordinate, coalesced thanks to P's symmetry), then the parameter update
 *              scattered back to the tensors
 * The float64 retry rung of the CPU ladder is left out here: choosing it would need the solver's status on the
 * host. Every buffer is carved from the caller's workspace (cgd_block_workspace_size) and every size is checked
 * by the queries before the first launch: the step allocates nothing, so it is graph-capturable (a step without
 * refresh; the solvers' capture is not relied on) and cannot fail half-way for want of memory or a bad size. A
 * CUDA runtime failure inside a launched kernel (a device fault) can still leave the moments advanced; such an
 * error is sticky for the whole context anyway.
 */
#include <math.h>

#include "cuda_solver.cuh"
#include "kernels.h"
#include "multi_tensor.cuh"

#define BLOCK_THREADS CGD_SOLVER_THREADS
/* Largest workspace of one refresh chunk (three B x B matrices per block and the solver's work): bounds memory
   whatever nblocks is; and at most this many matrices per solver call (the batched solvers' work grows per matrix
   and is counted in int for syevjBatched). */
#define REFRESH_CHUNK_BYTES ((size_t)256 << 20)
#define REFRESH_CHUNK_MATRICES 16384
/* syevjBatched is limited to n <= 32; above, the 64-bit batched QR-based solver. */
#define JACOBI_MAX_BLOCK 32

/* Internal linkage for everything but the entry points: the float32 and float64 builds of this file define the
   same names over different types. */
namespace {

typedef struct vector_args {
    cgd_mt_layout layout;
    void *param[CGD_MT_MAX_TENSORS];
    const void *grad[CGD_MT_MAX_TENSORS];
    int64_t offset[CGD_MT_MAX_TENSORS];
} vector_args;

/* ---- kernels ---- */

template <int DT>
__global__ void gather_kernel(const vector_args a, cgd_real *g, const float *grad_scale, const float *skip,
                              int maximize) {
    if (cgd_skipped(skip)) return;
    cgd_mt_work w = cgd_mt_locate(&a.layout, blockIdx.x);
    cgd_real scale = grad_scale ? (cgd_real)*grad_scale : CGD_R(1.0);
    for (int64_t i = w.begin + threadIdx.x; i < w.end; i += blockDim.x) {
        cgd_real v = load1<DT>(a.grad[w.tensor], i) / scale;
        g[a.offset[w.tensor] + i] = maximize ? -v : v;
    }
}

/* F is written even on a skipped step (from the unchanged M1), so the refresh that follows reads a valid C. */
__global__ void first_moment_kernel(cgd_real *m1, cgd_real *F, const cgd_real *g, int64_t length, cgd_real beta1,
                                    cgd_real w1, const double *step, double beta1_d, int bias_correction,
                                    const float *skip) {
    bool skip_step = cgd_skipped(skip);
    cgd_real inv_bc1 = bias_correction ? (cgd_real)(1.0 / (1.0 - pow(beta1_d, *step + 1.0))) : CGD_R(1.0);
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < length; i += (int64_t)gridDim.x * blockDim.x) {
        cgd_real m = skip_step ? m1[i] : beta1 * m1[i] + w1 * g[i];
        if (!skip_step) m1[i] = m;
        F[i] = m * inv_bc1;
    }
}

__global__ void second_moment_kernel(cgd_real *m2, const cgd_real *g, int64_t B, int64_t total, cgd_real beta2,
                                     cgd_real w2, const float *skip) {
    if (cgd_skipped(skip)) return;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        int64_t b = e / (B * B), r = e - b * B * B, i = r / B, j = r - i * B;
        m2[e] = beta2 * m2[e] + w2 * g[b * B + i] * g[b * B + j];
    }
}

/* C of blocks [first, first + n) into A (their own copy: the solver overwrites it with eigenvectors). */
__global__ void build_c_kernel(cgd_real *A, const cgd_real *m2, const cgd_real *F, int64_t B, int64_t first, int64_t n,
                               const double *step, double beta2_d, int bias_correction, int centered) {
    cgd_real inv_bc2 = bias_correction ? (cgd_real)(1.0 / (1.0 - pow(beta2_d, *step + 1.0))) : CGD_R(1.0);
    centered = centered && cgd_variance_has_data(bias_correction, *step);
    int64_t total = n * B * B;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        int64_t b = first + e / (B * B), r = e % (B * B), i = r / B, j = r % B;
        cgd_real c = m2[first * B * B + e] * inv_bc2;
        A[e] = centered ? c - F[b * B + i] * F[b * B + j] : c;
    }
}

/* One CUDA block per matrix block: ok[b] = C is finite; a non-finite C becomes the identity, so the solver only
   ever sees finite input and the block takes the failure ladder. */
__global__ void screen_kernel(cgd_real *A, int *ok, int64_t B) {
    cgd_real *Ab = A + (int64_t)blockIdx.x * B * B;
    int bad = 0;
    for (int64_t e = threadIdx.x; e < B * B; e += blockDim.x) bad |= !isfinite(Ab[e]);
    bad = __syncthreads_or(bad);
    if (threadIdx.x == 0) ok[blockIdx.x] = !bad;
    if (!bad) return;
    for (int64_t e = threadIdx.x; e < B * B; e += blockDim.x) Ab[e] = e / B == e % B ? CGD_R(1.0) : CGD_R(0.0);
}

/* One CUDA block per matrix block: did the solve succeed (finite input, info 0, everything finite)? If so,
   scale the eigenvector columns by d_k into S (V is column-major: column k = eigenvector k). */
__global__ void check_scale_kernel(const cgd_real *V, const cgd_real *lambda, const int *info, cgd_real *S, int *ok,
                                   int64_t B, cgd_real eps, cgd_real power) {
    int64_t b = blockIdx.x;
    const cgd_real *Vb = V + b * B * B;
    int bad = info[b] != 0 || !ok[b];
    for (int64_t e = threadIdx.x; e < B * B; e += blockDim.x) bad |= !isfinite(Vb[e]);
    for (int64_t k = threadIdx.x; k < B; k += blockDim.x) bad |= !isfinite(lambda[b * B + k]);
    bad = __syncthreads_or(bad);
    if (threadIdx.x == 0) ok[b] = !bad;
    if (bad) return;
    for (int64_t e = threadIdx.x; e < B * B; e += blockDim.x) {
        int64_t k = e / B;
        cgd_real l = lambda[b * B + k];
        cgd_real d = power == CGD_R(0.0) ? CGD_R(1.0) : cgd_rpow(eps + cgd_rfmax(l, CGD_R(0.0)), -power);
        S[b * B * B + e] = Vb[e] * d;
    }
}

/* Writes block first + b's new P (or keeps / falls back), its eigenvalues and outcome, and counts failures. */
__global__ void commit_kernel(cgd_real *P, const cgd_real *Pn, const cgd_real *lambda, const int *ok, cgd_real *eigvals,
                              int32_t *outcome, float *counters, const cgd_real *m2, const cgd_real *F, int64_t B,
                              int64_t first, const double *step, double beta2_d, int bias_correction, int centered,
                              cgd_real eps, cgd_real power, const float *skip) {
    if (cgd_skipped(skip)) return;
    int64_t b = first + blockIdx.x, local = blockIdx.x;
    cgd_real *Pb = P + b * B * B;
    /* Every thread reads the previous outcome before thread 0 overwrites it below: a warp that read it late
       would take the "keep" branch and leave its share of a diagonal fallback unwritten. */
    const int32_t previous = outcome[b];
    __syncthreads();
    if (ok[local]) {
        for (int64_t e = threadIdx.x; e < B * B; e += blockDim.x) {
            int64_t i = e / B, j = e % B;
            /* power 0 is SGD's metric: the identity exactly, not V V^T's rounding of it. The GEMM rounds (i, j)
               and (j, i) differently; one triangle, mirrored, keeps P exactly symmetric, as apply_kernel and the
               CPU kernel take it. */
            Pb[e] =
                power == CGD_R(0.0) ? (i == j ? CGD_R(1.0) : CGD_R(0.0)) : Pn[local * B * B + (i <= j ? e : j * B + i)];
        }
        for (int64_t k = threadIdx.x; k < B; k += blockDim.x) eigvals[b * B + k] = lambda[local * B + k];
        if (threadIdx.x == 0) outcome[b] = CGD_BLOCK_FP32;
        return;
    }
    if (previous != CGD_BLOCK_NEVER) {
        if (threadIdx.x == 0) {
            outcome[b] = CGD_BLOCK_KEPT;
            atomicAdd(&counters[1], 1.0f);
        }
        return;
    }
    cgd_real inv_bc2 = bias_correction ? (cgd_real)(1.0 / (1.0 - pow(beta2_d, *step + 1.0))) : CGD_R(1.0);
    centered = centered && cgd_variance_has_data(bias_correction, *step);
    for (int64_t e = threadIdx.x; e < B * B; e += blockDim.x) {
        int64_t i = e / B, j = e % B;
        cgd_real value = CGD_R(0.0);
        if (i == j) {
            cgd_real f = F[b * B + i];
            cgd_real c = m2[b * B * B + e] * inv_bc2 - (centered ? f * f : CGD_R(0.0));
            value = isfinite(c) ? (power == CGD_R(0.0) ? CGD_R(1.0) : cgd_rpow(eps + cgd_rfmax(c, CGD_R(0.0)), -power))
                                : CGD_R(1.0);
            eigvals[b * B + i] = c;
        }
        Pb[e] = value;
    }
    if (threadIdx.x == 0) {
        outcome[b] = CGD_BLOCK_DIAGONAL;
        atomicAdd(&counters[2], 1.0f);
    }
}

/* u = P F per block; P is symmetric, so thread i reads column i (row j, element i): coalesced over i. */
__global__ void apply_kernel(cgd_real *u, const cgd_real *P, const cgd_real *F, int64_t B, int64_t length,
                             const float *skip) {
    if (cgd_skipped(skip)) return;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < length; e += (int64_t)gridDim.x * blockDim.x) {
        int64_t b = e / B, i = e % B;
        const cgd_real *Pb = P + b * B * B;
        const cgd_real *Fb = F + b * B;
        cgd_real sum = CGD_R(0.0);
        for (int64_t j = 0; j < B; ++j) sum = cgd_rfma(Pb[j * B + i], Fb[j], sum);
        u[e] = sum;
    }
}

template <int DT>
__global__ void update_kernel(const vector_args a, const cgd_real *u, cgd_real lr, cgd_real decay, const float *skip) {
    if (cgd_skipped(skip)) return;
    cgd_mt_work w = cgd_mt_locate(&a.layout, blockIdx.x);
    for (int64_t i = w.begin + threadIdx.x; i < w.end; i += blockDim.x) {
        cgd_real p = load1<DT>(a.param[w.tensor], i);
        store1<DT>(a.param[w.tensor], i, p * decay - lr * u[a.offset[w.tensor] + i]);
    }
}

__global__ void increment_kernel(double *step, const float *skip) {
    if (!cgd_skipped(skip)) *step += 1.0;
}

/* ---- host side ---- */

template <int DT>
void launch_vector(bool update, const vector_args &a, cgd_real *vec, const float *grad_scale, const float *skip,
                   int maximize, cgd_real lr, cgd_real decay, cudaStream_t stream) {
    int chunks = cgd_mt_chunks(&a.layout);
    if (chunks == 0) return;
    if (update)
        update_kernel<DT><<<chunks, BLOCK_THREADS, 0, stream>>>(a, vec, lr, decay, skip);
    else
        gather_kernel<DT><<<chunks, BLOCK_THREADS, 0, stream>>>(a, vec, grad_scale, skip, maximize);
}

/* Gathers gradients into vec (update = false) or applies the update from vec (update = true), tensors batched
   CGD_MT_MAX_TENSORS per launch. */
void for_tensors(bool update, cgd_dtype dtype, const cgd_block_tensor *tensors, int64_t count, cgd_real *vec,
                 const float *grad_scale, const float *skip, int maximize, cgd_real lr, cgd_real decay,
                 cudaStream_t stream) {
    static thread_local vector_args a; /* ~7 KB: off the stack; each launch copies it into its arguments */
    auto flush = [&]() {
#define CGD_LAUNCH(DT) launch_vector<DT>(update, a, vec, grad_scale, skip, maximize, lr, decay, stream)
        CGD_DISPATCH_DTYPE(dtype, CGD_LAUNCH);
#undef CGD_LAUNCH
        cgd_mt_reset(&a.layout);
    };
    cgd_mt_reset(&a.layout);
    for (int64_t i = 0; i < count; ++i) {
        if (tensors[i].numel == 0) continue;
        if (!cgd_mt_add(&a.layout, tensors[i].numel)) {
            flush();
            cgd_mt_add(&a.layout, tensors[i].numel);
        }
        int32_t k = a.layout.count - 1;
        a.param[k] = tensors[i].param;
        a.grad[k] = tensors[i].grad;
        a.offset[k] = tensors[i].offset;
    }
    flush();
}

/* The workspace of one step, carved (or, with a null workspace, only sized) by block_layout. */
struct BlockBuffers {
    cgd_real *g, *F, *u;                  /* the blocked vector: gradient, force, preconditioned force */
    cgd_real *A, *S, *Pn, *lambda, *work; /* one refresh chunk: C then V, V diag(d), P, eigenvalues, solver */
    int *info, *ok;
    int64_t chunk;                       /* blocks per refresh chunk */
    int lwork;                           /* syevjBatched's work, in floats */
    size_t work_bytes;                   /* XsyevBatched's device work */
};

int block_layout(CgdHandles *hd, const cgd_block_hparams *h, const cgd_block_state *st, void *workspace,
                 BlockBuffers *b, size_t *bytes, CgdFailure &fail) {
    const int64_t B = st->block, nb = st->nblocks, length = B * nb;
    CgdCarver carve(workspace);
    size_t host_bytes = 0;
    *b = BlockBuffers{};
    b->g = carve.take<cgd_real>((size_t)length);
    b->F = carve.take<cgd_real>((size_t)length);
    b->u = carve.take<cgd_real>((size_t)length);
    if (h->refresh) {
        const size_t matrix = (size_t)B * (size_t)B;
        int64_t chunk = (int64_t)(REFRESH_CHUNK_BYTES / (3 * matrix * sizeof(cgd_real)));
        chunk = chunk < 1 ? 1 : (chunk > nb ? nb : chunk);
        chunk = chunk > REFRESH_CHUNK_MATRICES ? REFRESH_CHUNK_MATRICES : chunk;
        /* Halve the chunk until the solver's work fits the budget too. */
        for (;;) {
            size_t work = 0;
            if (B <= JACOBI_MAX_BLOCK) {
                int lwork = 0;
                SOLVER_TRY(cgd_syevjBatched_bufferSize(hd->solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER,
                                                       (int)B, nullptr, (int)B, nullptr, &lwork, hd->syevj,
                                                       (int)chunk));
                work = (size_t)(lwork > 0 ? lwork : 0) * sizeof(cgd_real);
            } else {
                size_t host = 0;
                SOLVER_TRY(cusolverDnXsyevBatched_bufferSize(
                    hd->solver, hd->params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, B, CGD_CUDA_REAL, nullptr,
                    B, CGD_CUDA_REAL, nullptr, CGD_CUDA_REAL, &work, &host, chunk));
            }
            if (chunk == 1 || 3 * matrix * sizeof(cgd_real) * (size_t)chunk + work <= REFRESH_CHUNK_BYTES) break;
            chunk = (chunk + 1) / 2;
        }
        b->chunk = chunk;
        b->A = carve.take<cgd_real>((size_t)chunk * matrix);
        b->S = carve.take<cgd_real>((size_t)chunk * matrix);
        b->Pn = carve.take<cgd_real>((size_t)chunk * matrix);
        b->lambda = carve.take<cgd_real>((size_t)(chunk * B));
        b->info = carve.take<int>((size_t)chunk);
        b->ok = carve.take<int>((size_t)chunk);
        if (B <= JACOBI_MAX_BLOCK) {
            SOLVER_TRY(cgd_syevjBatched_bufferSize(hd->solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, (int)B,
                                                   b->A, (int)B, b->lambda, &b->lwork, hd->syevj, (int)chunk));
            b->work = carve.take<cgd_real>((size_t)(b->lwork > 0 ? b->lwork : 1));
        } else {
            SOLVER_TRY(cusolverDnXsyevBatched_bufferSize(
                hd->solver, hd->params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, B, CGD_CUDA_REAL, b->A, B,
                CGD_CUDA_REAL, b->lambda, CGD_CUDA_REAL, &b->work_bytes, &host_bytes, chunk));
            b->work = reinterpret_cast<cgd_real *>(carve.take<char>(b->work_bytes > 0 ? b->work_bytes : 1));
            if (!cgd_reserve_host_work(hd, host_bytes)) {
                snprintf(fail.why, (size_t)fail.size, "out of host memory for XsyevBatched's %zu-byte workspace",
                         host_bytes);
                fail.code = 1;
                return fail.code;
            }
        }
    }
    *bytes = carve.used;
done:
    return fail.code;
}

}  // namespace

extern "C" int CGD_NAME(cgd_cuda_block_workspace)(const cgd_block_hparams *h, const cgd_block_state *st, void *stream,
                                                  size_t *bytes, char *why, int why_size) {
    CgdFailure fail = {why, why_size, 0};
    BlockBuffers b;
    CgdHandles *hd = cgd_solver_handles((cudaStream_t)stream, true, fail);
    return hd ? block_layout(hd, h, st, nullptr, &b, bytes, fail) : fail.code;
}

extern "C" int CGD_NAME(cgd_cuda_block_step)(const cgd_block_hparams *h, cgd_dtype dtype,
                                             const cgd_block_tensor *tensors, int64_t count, const cgd_block_state *st,
                                             const float *grad_scale, const float *skip, void *workspace,
                                             void *stream_ptr, char *why, int why_size) {
    CgdFailure fail = {why, why_size, 0};
    cudaStream_t stream = (cudaStream_t)stream_ptr;
    const int64_t B = st->block, nb = st->nblocks, length = B * nb;
    const int n = (int)B;
    const cgd_real one = CGD_R(1.0), zero = CGD_R(0.0);
    BlockBuffers b;
    size_t bytes = 0;
    cgd_real *m1_state = static_cast<cgd_real *>(st->exp_avg), *m2_state = static_cast<cgd_real *>(st->exp_avg_sq);
    cgd_real *precond = static_cast<cgd_real *>(st->precond), *eigvals = static_cast<cgd_real *>(st->eigvals);
    CgdHandles *hd = cgd_solver_handles(stream, true, fail);
    if (!hd) return fail.code;
    if (block_layout(hd, h, st, workspace, &b, &bytes, fail)) return fail.code;

    CUDA_TRY(cudaMemsetAsync(b.g, 0, (size_t)length * sizeof(cgd_real), stream));
    for_tensors(false, dtype, tensors, count, b.g, grad_scale, skip, h->maximize, CGD_R(0.0), CGD_R(1.0), stream);
    first_moment_kernel<<<cgd_grid_for(length), BLOCK_THREADS, 0, stream>>>(
        m1_state, b.F, b.g, length, (cgd_real)h->beta1, (cgd_real)(1.0 - h->beta1), st->step, h->beta1,
        h->bias_correction, skip);
    second_moment_kernel<<<cgd_grid_for(length * B), BLOCK_THREADS, 0, stream>>>(
        m2_state, b.g, B, length * B, (cgd_real)h->beta2, (cgd_real)(1.0 - h->beta2), skip);
    CUDA_TRY(cudaGetLastError());

    for (int64_t first = 0; h->refresh && first < nb; first += b.chunk) {
        int64_t m = nb - first < b.chunk ? nb - first : b.chunk;
        build_c_kernel<<<cgd_grid_for(m * B * B), BLOCK_THREADS, 0, stream>>>(
            b.A, m2_state, b.F, B, first, m, st->step, h->beta2, h->bias_correction, h->centered);
        screen_kernel<<<(unsigned)m, BLOCK_THREADS, 0, stream>>>(b.A, b.ok, B);
        CUDA_TRY(cudaGetLastError());
        if (B <= JACOBI_MAX_BLOCK)
            SOLVER_TRY(cgd_syevjBatched(hd->solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, n, b.A, n,
                                        b.lambda, b.work, b.lwork, b.info, hd->syevj, (int)m));
        else
            SOLVER_TRY(cusolverDnXsyevBatched(hd->solver, hd->params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER,
                                              B, CGD_CUDA_REAL, b.A, B, CGD_CUDA_REAL, b.lambda, CGD_CUDA_REAL, b.work,
                                              b.work_bytes, hd->host_work, hd->host_bytes, b.info, m));
        check_scale_kernel<<<(unsigned)m, BLOCK_THREADS, 0, stream>>>(b.A, b.lambda, b.info, b.S, b.ok, B,
                                                                      (cgd_real)h->eps, (cgd_real)h->power);
        CUDA_TRY(cudaGetLastError());
        /* Column-major: Pn = S V^T = V diag(d) V^T. Blocks whose solve failed produce garbage, never read. */
        SOLVER_TRY(cgd_gemmStridedBatched(hd->blas, CUBLAS_OP_N, CUBLAS_OP_T, n, n, n, &one, b.S, n, B * B, b.A, n,
                                          B * B, &zero, b.Pn, n, B * B, (int)m));
        commit_kernel<<<(unsigned)m, BLOCK_THREADS, 0, stream>>>(
            precond, b.Pn, b.lambda, b.ok, eigvals, st->outcome, st->counters, m2_state, b.F, B, first, st->step,
            h->beta2, h->bias_correction, h->centered, (cgd_real)h->eps, (cgd_real)h->power, skip);
        CUDA_TRY(cudaGetLastError());
    }
    apply_kernel<<<cgd_grid_for(length), BLOCK_THREADS, 0, stream>>>(b.u, precond, b.F, B, length, skip);
    for_tensors(true, dtype, tensors, count, b.u, nullptr, skip, 0, (cgd_real)h->lr,
                (cgd_real)(1.0 - h->lr * h->weight_decay), stream);
    increment_kernel<<<1, 1, 0, stream>>>(st->step, skip);
    CUDA_TRY(cudaGetLastError());
done:
    return fail.code;
}
