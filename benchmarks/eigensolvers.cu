/*
 * Which cuSOLVER eigensolver should block/kron CGD use at which matrix size? Times, per size n and batch count,
 * the float32 symmetric eigendecomposition (vectors wanted) of `batch` random covariance-like matrices through
 *   syevd         one call per matrix (what block CGD uses above n = 32 and kron uses for every factor)
 *   syevj         one call per matrix, Jacobi
 *   syevjBatched  one call for the batch (n <= 32 only; block CGD's choice up to 32)
 *   XsyevBatched  the 64-bit batched API (CUDA >= 12.6)
 * Timed with CUDA events around each whole batch, median of 5 after a warm-up. Prints a Markdown table.
 *
 *     build/eigensolvers_bench [max_n]        (CMake builds it when the CUDA kernels are built)
 */
#include <cuda_runtime.h>
#include <cusolverDn.h>

#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#define CHECK(call)                                                                                             \
    do {                                                                                                        \
        long long s_ = (long long)(call);                                                                       \
        if (s_ != 0) {                                                                                          \
            std::fprintf(stderr, "%s failed: %lld (line %d)\n", #call, s_, __LINE__);                           \
            std::exit(1);                                                                                       \
        }                                                                                                       \
    } while (0)

namespace {

// batch matrices X X^T / n + 1e-3 I with X n x n Gaussian: positive definite, spread spectrum, like a covariance.
std::vector<float> covariances(int n, int batch) {
    std::mt19937 rng(0);
    std::normal_distribution<float> normal;
    std::vector<float> out((size_t)batch * n * n), x((size_t)n * n);
    for (int b = 0; b < batch; ++b) {
        for (float &v : x) v = normal(rng);
        float *a = out.data() + (size_t)b * n * n;
        for (int i = 0; i < n; ++i)
            for (int j = 0; j < n; ++j) {
                double s = 0;
                for (int k = 0; k < n; ++k) s += (double)x[(size_t)i * n + k] * x[(size_t)j * n + k];
                a[(size_t)i * n + j] = (float)(s / n) + (i == j ? 1e-3f : 0.0f);
            }
    }
    return out;
}

struct Bench {
    cusolverDnHandle_t handle;
    cudaStream_t stream;
    float *A, *A0, *W;
    int *info;
    int n, batch;

    template <typename F> double time_ms(F run) {
        cudaEvent_t start, end;
        CHECK(cudaEventCreate(&start));
        CHECK(cudaEventCreate(&end));
        std::vector<float> samples;
        for (int r = 0; r < 6; ++r) {
            CHECK(cudaMemcpyAsync(A, A0, (size_t)batch * n * n * sizeof(float), cudaMemcpyDeviceToDevice, stream));
            CHECK(cudaEventRecord(start, stream));
            run();
            CHECK(cudaEventRecord(end, stream));
            CHECK(cudaEventSynchronize(end));
            float ms = 0;
            CHECK(cudaEventElapsedTime(&ms, start, end));
            if (r > 0) samples.push_back(ms); // the first run pays for lazy initialisation
        }
        std::sort(samples.begin(), samples.end());
        cudaEventDestroy(start);
        cudaEventDestroy(end);
        return samples[samples.size() / 2];
    }
};

}  // namespace

int main(int argc, char **argv) {
    const int max_n = argc > 1 ? std::atoi(argv[1]) : 4096;
    cudaDeviceProp prop;
    CHECK(cudaGetDeviceProperties(&prop, 0));
    int version = 0;
    CHECK(cusolverGetProperty(MAJOR_VERSION, &version));
    std::printf("# cuSOLVER float32 eigensolvers, %s, cuSOLVER major %d\n\n", prop.name, version);
    std::printf("Median ms for the whole batch (vectors computed). \"-\": not applicable at this size.\n\n");
    std::printf("| n | batch | syevd | syevj | syevjBatched | XsyevBatched | fastest |\n|---|---|---|---|---|---|---|\n");
    Bench b{};
    CHECK(cusolverDnCreate(&b.handle));
    CHECK(cudaStreamCreate(&b.stream));
    CHECK(cusolverDnSetStream(b.handle, b.stream));
    syevjInfo_t syevj;
    CHECK(cusolverDnCreateSyevjInfo(&syevj));
    cusolverDnParams_t params;
    CHECK(cusolverDnCreateParams(&params));
    const auto mode = CUSOLVER_EIG_MODE_VECTOR;
    const auto fill = CUBLAS_FILL_MODE_UPPER;
    for (int n = 8; n <= max_n; n *= 2) {
        // Enough matrices to matter: GPT-2 small in blocks of n has ~124M / n blocks; kron has a few hundred
        // factors. Capped so one batch stays under ~1 GiB.
        int batch = (int)std::min<long long>(n <= 64 ? 4096 : 256, (1LL << 28) / ((long long)n * n));
        batch = std::max(batch, 1);
        b.n = n;
        b.batch = batch;
        std::vector<float> host = covariances(n, std::min(batch, 64));
        size_t per = (size_t)n * n;
        CHECK(cudaMalloc(&b.A, (size_t)batch * per * sizeof(float)));
        CHECK(cudaMalloc(&b.A0, (size_t)batch * per * sizeof(float)));
        CHECK(cudaMalloc(&b.W, (size_t)batch * n * sizeof(float)));
        CHECK(cudaMalloc(&b.info, (size_t)batch * sizeof(int)));
        for (int k = 0; k < batch; k += 64) // tile the 64 distinct matrices over the batch
            CHECK(cudaMemcpy(b.A0 + (size_t)k * per, host.data(),
                             (size_t)std::min(64, batch - k) * per * sizeof(float), cudaMemcpyHostToDevice));
        int lwork = 0;
        float *work = nullptr;
        double results[4] = {-1, -1, -1, -1};

        CHECK(cusolverDnSsyevd_bufferSize(b.handle, mode, fill, n, b.A, n, b.W, &lwork));
        CHECK(cudaMalloc(&work, (size_t)lwork * sizeof(float)));
        results[0] = b.time_ms([&] {
            for (int k = 0; k < batch; ++k)
                CHECK(cusolverDnSsyevd(b.handle, mode, fill, n, b.A + k * per, n, b.W + (size_t)k * n, work, lwork,
                                       b.info + k));
        });
        cudaFree(work);

        CHECK(cusolverDnSsyevj_bufferSize(b.handle, mode, fill, n, b.A, n, b.W, &lwork, syevj));
        CHECK(cudaMalloc(&work, (size_t)lwork * sizeof(float)));
        results[1] = b.time_ms([&] {
            for (int k = 0; k < batch; ++k)
                CHECK(cusolverDnSsyevj(b.handle, mode, fill, n, b.A + k * per, n, b.W + (size_t)k * n, work, lwork,
                                       b.info + k, syevj));
        });
        cudaFree(work);

        if (n <= 32) {
            CHECK(cusolverDnSsyevjBatched_bufferSize(b.handle, mode, fill, n, b.A, n, b.W, &lwork, syevj, batch));
            CHECK(cudaMalloc(&work, (size_t)lwork * sizeof(float)));
            results[2] = b.time_ms([&] {
                CHECK(cusolverDnSsyevjBatched(b.handle, mode, fill, n, b.A, n, b.W, work, lwork, b.info, syevj,
                                              batch));
            });
            cudaFree(work);
        }

        size_t dev_bytes = 0, host_bytes = 0;
        if (cusolverDnXsyevBatched_bufferSize(b.handle, params, mode, fill, n, CUDA_R_32F, b.A, n, CUDA_R_32F, b.W,
                                              CUDA_R_32F, &dev_bytes, &host_bytes, batch) == CUSOLVER_STATUS_SUCCESS) {
            void *dev_work = nullptr;
            std::vector<char> host_work(host_bytes + 1);
            CHECK(cudaMalloc(&dev_work, dev_bytes + 1));
            results[3] = b.time_ms([&] {
                CHECK(cusolverDnXsyevBatched(b.handle, params, mode, fill, n, CUDA_R_32F, b.A, n, CUDA_R_32F, b.W,
                                             CUDA_R_32F, dev_work, dev_bytes, host_work.data(), host_bytes, b.info,
                                             batch));
            });
            cudaFree(dev_work);
        }
        const char *names[4] = {"syevd", "syevj", "syevjBatched", "XsyevBatched"};
        int best = 0;
        for (int k = 1; k < 4; ++k)
            if (results[k] >= 0 && results[k] < results[best]) best = k;
        std::printf("| %d | %d |", n, batch);
        for (double r : results) r >= 0 ? std::printf(" %.3f |", r) : std::printf(" - |");
        std::printf(" %s |\n", names[best]);
        std::fflush(stdout);
        cudaFree(b.A);
        cudaFree(b.A0);
        cudaFree(b.W);
        cudaFree(b.info);
    }
    return 0;
}
