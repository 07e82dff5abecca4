// The C API's Kronecker-factored step (cgd_kron_step) on the CPU and, when a GPU is present, on CUDA: it must
// equal the full-covariance step (cgd_block_step with one block, itself checked against a float64 reference in
// test_block_step.cpp) whenever the covariance is a Kronecker product, equal block size 1 for a vector with a
// diagonal factor, honour skip, climb the failure ladder, and name bad arguments.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "cgd.h"
#include "test_support.h"

#ifdef CGD_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace {

struct Kron {
    int64_t rows, cols;
    int left_full, right_full;
    std::vector<float> param, m1, lsq, rsq, lbasis, rbasis, leig, reig;
    double step = 0.0;
    float counters[3] = {0, 0, 0};
    int32_t outcome[2] = {CGD_BLOCK_NEVER, CGD_BLOCK_NEVER};
};

// M2(0) = m2_init I has the partial traces m2_init * cols * I (left) and m2_init * rows * I (right).
Kron make_kron(int64_t rows, int64_t cols, int left_full, int right_full, float m2_init,
               const std::vector<float> &start) {
    Kron k{rows, cols, left_full, right_full};
    k.param = start;
    k.m1.assign(rows * cols, 0.0f);
    k.lsq.assign(left_full ? rows * rows : rows, 0.0f);
    k.rsq.assign(right_full ? cols * cols : cols, 0.0f);
    for (int64_t i = 0; i < rows; ++i) k.lsq[left_full ? i * rows + i : i] = m2_init * cols;
    for (int64_t j = 0; j < cols; ++j) k.rsq[right_full ? j * cols + j : j] = m2_init * rows;
    k.lbasis.assign(left_full ? rows * rows : 0, 0.0f);
    k.rbasis.assign(right_full ? cols * cols : 0, 0.0f);
    k.leig.assign(rows, 0.0f);
    k.reig.assign(cols, 0.0f);
    return k;
}

// Copies host vectors to the device and back around one call (a no-op on the CPU).
struct Mirror {
    cgd_device device;
    std::vector<std::pair<void *, std::pair<void *, size_t>>> pairs; // device pointer, (host pointer, bytes)
    void *put(void *host, size_t bytes) {
        if (device == CGD_CPU || bytes == 0) return bytes ? host : nullptr;
#ifdef CGD_WITH_CUDA
        void *d = nullptr;
        EXPECT_EQ(cudaMalloc(&d, bytes), cudaSuccess);
        EXPECT_EQ(cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice), cudaSuccess);
        pairs.push_back({d, {host, bytes}});
        return d;
#else
        return host;
#endif
    }
    ~Mirror() {
#ifdef CGD_WITH_CUDA
        if (device == CGD_CPU) return;
        EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        for (auto &p : pairs) {
            EXPECT_EQ(cudaMemcpy(p.second.first, p.first, p.second.second, cudaMemcpyDeviceToHost), cudaSuccess);
            cudaFree(p.first);
        }
#endif
    }
};

template <typename T> size_t bytes(const std::vector<T> &v) { return v.size() * sizeof(T); }

cgd_status run_kron(cgd_device device, const cgd_block_hparams &h, Kron &k, std::vector<float> grad,
                    float skip_value = 0.0f) {
    Mirror m{device};
    cgd_kron_tensor t{};
    t.param = m.put(k.param.data(), bytes(k.param));
    t.grad = m.put(grad.data(), bytes(grad));
    t.rows = k.rows;
    t.cols = k.cols;
    t.left_full = k.left_full;
    t.right_full = k.right_full;
    t.exp_avg = (float *)m.put(k.m1.data(), bytes(k.m1));
    t.left_sq = (float *)m.put(k.lsq.data(), bytes(k.lsq));
    t.right_sq = (float *)m.put(k.rsq.data(), bytes(k.rsq));
    t.left_basis = (float *)m.put(k.lbasis.data(), bytes(k.lbasis));
    t.right_basis = (float *)m.put(k.rbasis.data(), bytes(k.rbasis));
    t.left_eig = (float *)m.put(k.leig.data(), bytes(k.leig));
    t.right_eig = (float *)m.put(k.reig.data(), bytes(k.reig));
    t.step = (double *)m.put(&k.step, sizeof k.step);
    t.outcome = (int32_t *)m.put(k.outcome, sizeof k.outcome);
    t.counters = (float *)m.put(k.counters, sizeof k.counters);
    const float *skip = skip_value != 0.0f ? (const float *)m.put(&skip_value, sizeof skip_value) : nullptr;
    size_t need = 0;
    cgd_kron_workspace_size(&h, &t, 1, device, &need); // on bad arguments the step below names them
    Workspace ws(device, need);
    return cgd_kron_step(&h, CGD_FLOAT32, &t, 1, nullptr, skip, ws.data, ws.bytes, device, nullptr);
}

// The same parameter stepped by cgd_block_step with `nblocks` blocks of `block`.
struct Blocked {
    int64_t block, nblocks;
    std::vector<float> param, m1, m2, precond, eig;
    double step = 0.0;
    float counters[3] = {0, 0, 0};
    std::vector<int32_t> outcome;
};

Blocked make_blocked(int64_t block, int64_t nblocks, float m2_init, const std::vector<float> &start) {
    Blocked b{block, nblocks, start};
    b.m1.assign(block * nblocks, 0.0f);
    b.m2.assign(block * block * nblocks, 0.0f);
    for (int64_t n = 0; n < nblocks; ++n)
        for (int64_t i = 0; i < block; ++i) b.m2[n * block * block + i * block + i] = m2_init;
    b.precond.assign(b.m2.size(), 0.0f);
    b.eig.assign(block * nblocks, 0.0f);
    b.outcome.assign(nblocks, CGD_BLOCK_NEVER);
    return b;
}

cgd_status run_blocked(cgd_device device, const cgd_block_hparams &h, Blocked &b, std::vector<float> grad) {
    Mirror m{device};
    cgd_block_tensor t{m.put(b.param.data(), bytes(b.param)), m.put(grad.data(), bytes(grad)),
                       (int64_t)b.param.size(), 0};
    cgd_block_state st{b.block, b.nblocks, (float *)m.put(b.m1.data(), bytes(b.m1)),
                       (float *)m.put(b.m2.data(), bytes(b.m2)), (float *)m.put(b.precond.data(), bytes(b.precond)),
                       (float *)m.put(b.eig.data(), bytes(b.eig)), (double *)m.put(&b.step, sizeof b.step),
                       (int32_t *)m.put(b.outcome.data(), bytes(b.outcome)),
                       (float *)m.put(b.counters, sizeof b.counters)};
    size_t need = 0;
    cgd_block_workspace_size(&h, &st, device, &need);
    Workspace ws(device, need);
    return cgd_block_step(&h, CGD_FLOAT32, &t, 1, &st, nullptr, nullptr, ws.data, ws.bytes, device, nullptr);
}

cgd_block_hparams hparams() {
    cgd_block_hparams h{};
    h.lr = 0.02;
    h.beta1 = 17.1 / 18.1;
    h.beta2 = 15.3 / 16.3;
    h.power = 0.5;
    h.eps = 1e-4;
    h.centered = 1;
    h.refresh = 1;
    return h;
}

std::vector<float> normal_vector(std::mt19937 &rng, int64_t n) {
    std::normal_distribution<float> normal;
    std::vector<float> v(n);
    for (float &x : v) x = normal(rng);
    return v;
}

class KronStep : public ::testing::TestWithParam<cgd_device> {
  protected:
    void SetUp() override { CGD_SKIP_UNLESS_RUNNABLE(GetParam()); }
};

TEST_P(KronStep, EqualsFullCovarianceWhenItIsAKroneckerProduct) {
    // G_t = w_t v^T with v fixed: vec(G) = w_t (x) v, so C = (covariance of w) (x) v v^T at every step when
    // M2(0) = 0. Refreshing every third step exercises the cached basis too.
    const int64_t rows = 4, cols = 3;
    std::mt19937 rng(11);
    const std::vector<float> start = normal_vector(rng, rows * cols), v = normal_vector(rng, cols);
    Kron k = make_kron(rows, cols, 1, 1, 0.0f, start);
    Blocked full = make_blocked(rows * cols, 1, 0.0f, start);
    cgd_block_hparams h = hparams();
    for (int s = 0; s < 20; ++s) {
        std::vector<float> w = normal_vector(rng, rows), g(rows * cols);
        for (int64_t i = 0; i < rows; ++i)
            for (int64_t j = 0; j < cols; ++j) g[i * cols + j] = w[i] * v[j];
        h.refresh = s % 3 == 0;
        ASSERT_EQ(run_kron(GetParam(), h, k, g), CGD_OK) << cgd_last_error();
        ASSERT_EQ(run_blocked(GetParam(), h, full, g), CGD_OK) << cgd_last_error();
        for (int64_t e = 0; e < rows * cols; ++e)
            ASSERT_NEAR(k.param[e], full.param[e], 2e-5 * (1 + std::fabs(full.param[e]))) << "step " << s;
    }
    EXPECT_EQ(k.step, 20.0f);
    EXPECT_EQ(k.outcome[0], CGD_BLOCK_FP32);
    EXPECT_EQ(k.outcome[1], CGD_BLOCK_FP32);
}

TEST_P(KronStep, VectorWithDiagonalFactorIsBlockSizeOne) {
    // A column with a diagonal left factor has C = diag(L): the diagonal metric, for any M2(0).
    const int64_t rows = 6;
    std::mt19937 rng(12);
    const std::vector<float> start = normal_vector(rng, rows);
    Kron k = make_kron(rows, 1, 0, 1, 1.0f, start);
    Blocked diag = make_blocked(1, rows, 1.0f, start);
    cgd_block_hparams h = hparams();
    for (int s = 0; s < 15; ++s) {
        std::vector<float> g = normal_vector(rng, rows);
        ASSERT_EQ(run_kron(GetParam(), h, k, g), CGD_OK) << cgd_last_error();
        ASSERT_EQ(run_blocked(GetParam(), h, diag, g), CGD_OK) << cgd_last_error();
        for (int64_t e = 0; e < rows; ++e) ASSERT_NEAR(k.param[e], diag.param[e], 1e-5) << "step " << s;
    }
}

TEST_P(KronStep, NonzeroSkipChangesNothing) {
    std::mt19937 rng(13);
    Kron k = make_kron(3, 5, 1, 1, 1.0f, normal_vector(rng, 15));
    ASSERT_EQ(run_kron(GetParam(), hparams(), k, normal_vector(rng, 15)), CGD_OK);
    Kron before = k;
    ASSERT_EQ(run_kron(GetParam(), hparams(), k, normal_vector(rng, 15), 1.0f), CGD_OK) << cgd_last_error();
    EXPECT_EQ(k.param, before.param);
    EXPECT_EQ(k.m1, before.m1);
    EXPECT_EQ(k.lsq, before.lsq);
    EXPECT_EQ(k.rbasis, before.rbasis);
    EXPECT_EQ(k.reig, before.reig);
    EXPECT_EQ(k.step, before.step);
}

TEST_P(KronStep, FailedFirstRefreshFallsBackToTheDiagonalThenKeepsThePrevious) {
    std::mt19937 rng(14);
    Kron k = make_kron(3, 4, 1, 1, 1.0f, normal_vector(rng, 12));
    k.lsq[0 * 3 + 1] = k.lsq[1 * 3 + 0] = NAN; // the left factor cannot be decomposed
    ASSERT_EQ(run_kron(GetParam(), hparams(), k, normal_vector(rng, 12)), CGD_OK) << cgd_last_error();
    EXPECT_EQ(k.outcome[0], CGD_BLOCK_DIAGONAL);
    EXPECT_EQ(k.outcome[1], CGD_BLOCK_FP32);
    EXPECT_EQ(k.counters[2], 1.0f);
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) EXPECT_EQ(k.lbasis[i * 3 + j], i == j ? 1.0f : 0.0f);
    for (float p : k.param) EXPECT_TRUE(std::isfinite(p));
    const std::vector<float> kept = k.leig;
    ASSERT_EQ(run_kron(GetParam(), hparams(), k, normal_vector(rng, 12)), CGD_OK);
    EXPECT_EQ(k.outcome[0], CGD_BLOCK_KEPT);
    EXPECT_EQ(k.counters[1], 1.0f);
    EXPECT_EQ(k.leig, kept);
    for (float p : k.param) EXPECT_TRUE(std::isfinite(p));
}

INSTANTIATE_TEST_SUITE_P(Devices, KronStep, ::testing::Values(CGD_CPU, CGD_CUDA),
                         [](const ::testing::TestParamInfo<cgd_device> &info) {
                             return std::string(info.param == CGD_CPU ? "CPU" : "CUDA");
                         });

TEST(KronStepErrors, ArgumentsAreNamedWithTheirValue) {
    std::mt19937 rng(15);
    Kron k = make_kron(3, 4, 1, 1, 1.0f, normal_vector(rng, 12));
    std::vector<float> g = normal_vector(rng, 12);
    cgd_block_hparams h = hparams();
    h.eps = -1.0;
    EXPECT_EQ(run_kron(CGD_CPU, h, k, g), CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("cgd_kron_step: hparams.eps = -1"), std::string::npos);
    k.rows = 0;
    EXPECT_EQ(run_kron(CGD_CPU, hparams(), k, g), CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("tensors[0] is 0 x 4"), std::string::npos);
    k.rows = 50000;
    k.cols = 1;
    EXPECT_EQ(run_kron(CGD_CPU, hparams(), k, g), CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("full left factor of side 50000"), std::string::npos);
    k = make_kron(3, 4, 1, 1, 1.0f, normal_vector(rng, 12));
    k.rbasis.clear(); // right_full but no basis
    EXPECT_EQ(run_kron(CGD_CPU, hparams(), k, g), CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("tensors[0].right_basis is NULL"), std::string::npos);
}

} // namespace
