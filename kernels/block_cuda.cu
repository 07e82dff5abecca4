/*
 * CUDA side of full/block CGD (paper eq 4.9). Per step, all on the caller's stream and without a host
 * synchronisation:
 *   gather     the tensors' gradients into one zero-padded vector g (multi-tensor launches)
 *   moments    M1 <- beta1 M1 + (1 - beta1) g, F = M1 / bc1;  M2 <- beta2 M2 + (1 - beta2) g g^T
 *   refresh    per chunk of blocks: C = M2 / bc2 - F F^T into a workspace, eigendecomposition (cuSOLVER
 *              syevjBatched for blocks of <= 32, syevd per block above), then a check-and-scale kernel and a
 *              batched GEMM form P = V diag((eps + max(lambda, 0))^-a) V^T; a commit kernel writes P only for
 *              blocks whose solve succeeded (else keeps the previous P, or the diagonal metric)
 *   apply      u = P F (one thread per coordinate, coalesced thanks to P's symmetry), then the parameter update
 *              scattered back to the tensors
 * The float64 retry rung of the CPU ladder is left out here: choosing it would need the solver's status on the
 * host. Workspace comes from cudaMallocAsync, so it is stream-ordered and graph-capturable.
 */
#include <math.h>

#include "cuda_solver.cuh"
#include "kernels.h"
#include "multi_tensor.cuh"

#define BLOCK_THREADS CGD_SOLVER_THREADS
/* Largest workspace of one refresh chunk (three B x B matrices per block): bounds memory whatever nblocks is. */
#define REFRESH_CHUNK_BYTES ((size_t)256 << 20)

typedef struct vector_args {
    cgd_mt_layout layout;
    void *param[CGD_MT_MAX_TENSORS];
    const void *grad[CGD_MT_MAX_TENSORS];
    int64_t offset[CGD_MT_MAX_TENSORS];
} vector_args;

/* ---- kernels ---- */

template <int DT>
__global__ void gather_kernel(const vector_args a, float *g, const float *grad_scale, const float *skip,
                              int maximize) {
    if (cgd_skipped(skip)) return;
    cgd_mt_work w = cgd_mt_locate(&a.layout, blockIdx.x);
    float scale = grad_scale ? *grad_scale : 1.0f;
    for (int64_t i = w.begin + threadIdx.x; i < w.end; i += blockDim.x) {
        float v = load1<DT>(a.grad[w.tensor], i) / scale;
        g[a.offset[w.tensor] + i] = maximize ? -v : v;
    }
}

/* F is written even on a skipped step (from the unchanged M1), so the refresh that follows reads a valid C. */
__global__ void first_moment_kernel(float *m1, float *F, const float *g, int64_t length, float beta1, float w1,
                                    const float *step, double beta1_d, int bias_correction, const float *skip) {
    bool skip_step = cgd_skipped(skip);
    float inv_bc1 = bias_correction ? (float)(1.0 / (1.0 - pow(beta1_d, (double)*step + 1.0))) : 1.0f;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < length; i += (int64_t)gridDim.x * blockDim.x) {
        float m = skip_step ? m1[i] : beta1 * m1[i] + w1 * g[i];
        if (!skip_step) m1[i] = m;
        F[i] = m * inv_bc1;
    }
}

__global__ void second_moment_kernel(float *m2, const float *g, int64_t B, int64_t total, float beta2, float w2,
                                     const float *skip) {
    if (cgd_skipped(skip)) return;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        int64_t b = e / (B * B), r = e - b * B * B, i = r / B, j = r - i * B;
        m2[e] = beta2 * m2[e] + w2 * g[b * B + i] * g[b * B + j];
    }
}

/* C of blocks [first, first + n) into A (their own copy: the solver overwrites it with eigenvectors). */
__global__ void build_c_kernel(float *A, const float *m2, const float *F, int64_t B, int64_t first, int64_t n,
                               const float *step, double beta2_d, int bias_correction, int centered) {
    float inv_bc2 = bias_correction ? (float)(1.0 / (1.0 - pow(beta2_d, (double)*step + 1.0))) : 1.0f;
    int64_t total = n * B * B;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < total; e += (int64_t)gridDim.x * blockDim.x) {
        int64_t b = first + e / (B * B), r = e % (B * B), i = r / B, j = r % B;
        float c = m2[first * B * B + e] * inv_bc2;
        A[e] = centered ? c - F[b * B + i] * F[b * B + j] : c;
    }
}

/* One CUDA block per matrix block: did the solve succeed (info 0, everything finite)? If so, scale the
   eigenvector columns by d_k into S (V is column-major: column k = eigenvector k) and record the eigenvalues. */
__global__ void check_scale_kernel(const float *V, const float *lambda, const int *info, float *S, int *ok,
                                   int64_t B, float eps, float power) {
    int64_t b = blockIdx.x;
    const float *Vb = V + b * B * B;
    int bad = info[b] != 0;
    for (int64_t e = threadIdx.x; e < B * B; e += blockDim.x) bad |= !isfinite(Vb[e]);
    for (int64_t k = threadIdx.x; k < B; k += blockDim.x) bad |= !isfinite(lambda[b * B + k]);
    bad = __syncthreads_or(bad);
    if (threadIdx.x == 0) ok[b] = !bad;
    if (bad) return;
    for (int64_t e = threadIdx.x; e < B * B; e += blockDim.x) {
        int64_t k = e / B;
        float l = lambda[b * B + k];
        float d = power == 0.0f ? 1.0f : powf(eps + fmaxf(l, 0.0f), -power);
        S[b * B * B + e] = Vb[e] * d;
    }
}

/* Writes block first + b's new P (or keeps / falls back), its eigenvalues and outcome, and counts failures. */
__global__ void commit_kernel(float *P, const float *Pn, const float *lambda, const int *ok, float *eigvals,
                              int32_t *outcome, float *counters, const float *m2, const float *F, int64_t B,
                              int64_t first, const float *step, double beta2_d, int bias_correction, int centered,
                              float eps, float power, const float *skip) {
    if (cgd_skipped(skip)) return;
    int64_t b = first + blockIdx.x, local = blockIdx.x;
    float *Pb = P + b * B * B;
    if (ok[local]) {
        for (int64_t e = threadIdx.x; e < B * B; e += blockDim.x) {
            int64_t i = e / B, j = e % B;
            /* power 0 is SGD's metric: the identity exactly, not V V^T's rounding of it. */
            Pb[e] = power == 0.0f ? (i == j ? 1.0f : 0.0f) : Pn[local * B * B + e];
        }
        for (int64_t k = threadIdx.x; k < B; k += blockDim.x) eigvals[b * B + k] = lambda[local * B + k];
        if (threadIdx.x == 0) outcome[b] = CGD_BLOCK_FP32;
        return;
    }
    if (outcome[b] != CGD_BLOCK_NEVER) {
        if (threadIdx.x == 0) {
            outcome[b] = CGD_BLOCK_KEPT;
            atomicAdd(&counters[1], 1.0f);
        }
        return;
    }
    float inv_bc2 = bias_correction ? (float)(1.0 / (1.0 - pow(beta2_d, (double)*step + 1.0))) : 1.0f;
    for (int64_t e = threadIdx.x; e < B * B; e += blockDim.x) {
        int64_t i = e / B, j = e % B;
        float value = 0.0f;
        if (i == j) {
            float f = F[b * B + i];
            float c = m2[b * B * B + e] * inv_bc2 - (centered ? f * f : 0.0f);
            value = isfinite(c) ? (power == 0.0f ? 1.0f : powf(eps + fmaxf(c, 0.0f), -power)) : 1.0f;
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
__global__ void apply_kernel(float *u, const float *P, const float *F, int64_t B, int64_t length, const float *skip) {
    if (cgd_skipped(skip)) return;
    for (int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; e < length; e += (int64_t)gridDim.x * blockDim.x) {
        int64_t b = e / B, i = e % B;
        const float *Pb = P + b * B * B;
        const float *Fb = F + b * B;
        float sum = 0.0f;
        for (int64_t j = 0; j < B; ++j) sum = fmaf(Pb[j * B + i], Fb[j], sum);
        u[e] = sum;
    }
}

template <int DT>
__global__ void update_kernel(const vector_args a, const float *u, float lr, float decay, const float *skip) {
    if (cgd_skipped(skip)) return;
    cgd_mt_work w = cgd_mt_locate(&a.layout, blockIdx.x);
    for (int64_t i = w.begin + threadIdx.x; i < w.end; i += blockDim.x) {
        float p = load1<DT>(a.param[w.tensor], i);
        store1<DT>(a.param[w.tensor], i, p * decay - lr * u[a.offset[w.tensor] + i]);
    }
}

__global__ void increment_kernel(float *step, const float *skip) {
    if (!cgd_skipped(skip)) *step += 1.0f;
}

/* ---- host side ---- */

namespace {

template <int DT> void launch_vector(bool update, const vector_args &a, float *vec, const float *grad_scale,
                                     const float *skip, int maximize, float lr, float decay, cudaStream_t stream) {
    int chunks = cgd_mt_chunks(&a.layout);
    if (chunks == 0) return;
    if (update)
        update_kernel<DT><<<chunks, BLOCK_THREADS, 0, stream>>>(a, vec, lr, decay, skip);
    else
        gather_kernel<DT><<<chunks, BLOCK_THREADS, 0, stream>>>(a, vec, grad_scale, skip, maximize);
}

/* Gathers gradients into vec (update = false) or applies the update from vec (update = true), tensors batched
   CGD_MT_MAX_TENSORS per launch. */
void for_tensors(bool update, cgd_dtype dtype, const cgd_block_tensor *tensors, int64_t count, float *vec,
                 const float *grad_scale, const float *skip, int maximize, float lr, float decay,
                 cudaStream_t stream) {
    static thread_local vector_args a; /* ~7 KB: off the stack; each launch copies it into its arguments */
    auto flush = [&]() {
        if (dtype == CGD_FLOAT16)
            launch_vector<CGD_FLOAT16>(update, a, vec, grad_scale, skip, maximize, lr, decay, stream);
        else if (dtype == CGD_BFLOAT16)
            launch_vector<CGD_BFLOAT16>(update, a, vec, grad_scale, skip, maximize, lr, decay, stream);
        else
            launch_vector<CGD_FLOAT32>(update, a, vec, grad_scale, skip, maximize, lr, decay, stream);
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

}  // namespace

extern "C" int cgd_cuda_block_step(const cgd_block_hparams *h, cgd_dtype dtype, const cgd_block_tensor *tensors,
                                   int64_t count, const cgd_block_state *st, const float *grad_scale,
                                   const float *skip, void *stream_ptr, char *why, int why_size) {
    CgdFailure fail = {why, why_size, 0};
    cudaStream_t stream = (cudaStream_t)stream_ptr;
    const int64_t B = st->block, nb = st->nblocks, length = B * nb;
    const size_t matrix_bytes = (size_t)B * (size_t)B * sizeof(float);
    float *g = nullptr, *F = nullptr, *u = nullptr, *A = nullptr, *S = nullptr, *Pn = nullptr, *lambda = nullptr;
    float *work = nullptr;
    int *info = nullptr, *ok = nullptr;
    CgdHandles *hd = cgd_solver_handles(stream, fail);
    if (!hd) return fail.code;

    CUDA_TRY(cudaMallocAsync((void **)&g, (size_t)length * sizeof(float), stream));
    CUDA_TRY(cudaMallocAsync((void **)&F, (size_t)length * sizeof(float), stream));
    CUDA_TRY(cudaMallocAsync((void **)&u, (size_t)length * sizeof(float), stream));
    CUDA_TRY(cudaMemsetAsync(g, 0, (size_t)length * sizeof(float), stream));
    for_tensors(false, dtype, tensors, count, g, grad_scale, skip, h->maximize, 0.0f, 1.0f, stream);
    first_moment_kernel<<<cgd_grid_for(length), BLOCK_THREADS, 0, stream>>>(
        st->exp_avg, F, g, length, (float)h->beta1, (float)(1.0 - h->beta1), st->step, h->beta1,
        h->bias_correction, skip);
    second_moment_kernel<<<cgd_grid_for(length * B), BLOCK_THREADS, 0, stream>>>(
        st->exp_avg_sq, g, B, length * B, (float)h->beta2, (float)(1.0 - h->beta2), skip);
    CUDA_TRY(cudaGetLastError());

    if (h->refresh) {
        int64_t chunk = (int64_t)(REFRESH_CHUNK_BYTES / (3 * matrix_bytes));
        chunk = chunk < 1 ? 1 : (chunk > nb ? nb : chunk);
        const int n = (int)B;
        int lwork = 0;
        if (B <= 32)
            SOLVER_TRY(cusolverDnSsyevjBatched_bufferSize(hd->solver, CUSOLVER_EIG_MODE_VECTOR,
                                                          CUBLAS_FILL_MODE_UPPER, n, nullptr, n, nullptr, &lwork,
                                                          hd->syevj, (int)chunk));
        else
            SOLVER_TRY(cusolverDnSsyevd_bufferSize(hd->solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, n,
                                                   nullptr, n, nullptr, &lwork));
        CUDA_TRY(cudaMallocAsync((void **)&A, chunk * matrix_bytes, stream));
        CUDA_TRY(cudaMallocAsync((void **)&S, chunk * matrix_bytes, stream));
        CUDA_TRY(cudaMallocAsync((void **)&Pn, chunk * matrix_bytes, stream));
        CUDA_TRY(cudaMallocAsync((void **)&lambda, (size_t)(chunk * B) * sizeof(float), stream));
        CUDA_TRY(cudaMallocAsync((void **)&info, (size_t)chunk * sizeof(int), stream));
        CUDA_TRY(cudaMallocAsync((void **)&ok, (size_t)chunk * sizeof(int), stream));
        CUDA_TRY(cudaMallocAsync((void **)&work, (size_t)(lwork > 0 ? lwork : 1) * sizeof(float), stream));
        for (int64_t first = 0; first < nb; first += chunk) {
            int64_t m = nb - first < chunk ? nb - first : chunk;
            build_c_kernel<<<cgd_grid_for(m * B * B), BLOCK_THREADS, 0, stream>>>(
                A, st->exp_avg_sq, F, B, first, m, st->step, h->beta2, h->bias_correction, h->centered);
            CUDA_TRY(cudaGetLastError());
            if (B <= 32) {
                SOLVER_TRY(cusolverDnSsyevjBatched(hd->solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, n,
                                                   A, n, lambda, work, lwork, info, hd->syevj, (int)m));
            } else {
                for (int64_t b = 0; b < m; ++b)
                    SOLVER_TRY(cusolverDnSsyevd(hd->solver, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, n,
                                                A + b * B * B, n, lambda + b * B, work, lwork, info + b));
            }
            check_scale_kernel<<<(unsigned)m, BLOCK_THREADS, 0, stream>>>(A, lambda, info, S, ok, B,
                                                                          (float)h->eps, (float)h->power);
            CUDA_TRY(cudaGetLastError());
            /* Column-major: Pn = S V^T = V diag(d) V^T. Blocks whose solve failed produce garbage, never read. */
            const float one = 1.0f, zero = 0.0f;
            SOLVER_TRY(cublasSgemmStridedBatched(hd->blas, CUBLAS_OP_N, CUBLAS_OP_T, n, n, n, &one, S, n, B * B, A,
                                                 n, B * B, &zero, Pn, n, B * B, (int)m));
            commit_kernel<<<(unsigned)m, BLOCK_THREADS, 0, stream>>>(
                st->precond, Pn, lambda, ok, st->eigvals, st->outcome, st->counters, st->exp_avg_sq, F, B, first,
                st->step, h->beta2, h->bias_correction, h->centered, (float)h->eps, (float)h->power, skip);
            CUDA_TRY(cudaGetLastError());
        }
    }
    apply_kernel<<<cgd_grid_for(length), BLOCK_THREADS, 0, stream>>>(u, st->precond, F, B, length, skip);
    for_tensors(true, dtype, tensors, count, u, nullptr, skip, 0, (float)h->lr,
                (float)(1.0 - h->lr * h->weight_decay), stream);
    increment_kernel<<<1, 1, 0, stream>>>(st->step, skip);
    CUDA_TRY(cudaGetLastError());

done:
    cudaFreeAsync(g, stream);
    cudaFreeAsync(F, stream);
    cudaFreeAsync(u, stream);
    cudaFreeAsync(A, stream);
    cudaFreeAsync(S, stream);
    cudaFreeAsync(Pn, stream);
    cudaFreeAsync(lambda, stream);
    cudaFreeAsync(info, stream);
    cudaFreeAsync(ok, stream);
    cudaFreeAsync(work, stream);
    return fail.code;
}
