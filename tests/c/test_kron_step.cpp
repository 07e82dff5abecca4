// The C API's Kronecker-factored step (cgd_kron_step) on the CPU and, when a GPU is present, on CUDA: it must
// equal the full-covariance step (cgd_block_step with one block, itself checked against a float64 reference in
// test_block_step.cpp) whenever the covariance is a Kronecker product, equal block size 1 for a vector with a
// diagonal factor, honour skip, climb the failure ladder, and name bad arguments; and the eigenbasis step's first
// step against the polar factor it must equal, and its argument checks.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "cgd.h"
#include "kernels.h" // cgd_hooks: fault injection and the solver-call probe
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

// One cgd_kron_step over all of `ks` on `device`, with a workspace `shortfall` bytes short of the queried one.
cgd_status run_krons(cgd_device device, const cgd_block_hparams &h, const std::vector<Kron *> &ks,
                     std::vector<std::vector<float>> grads, float skip_value = 0.0f, size_t shortfall = 0) {
    Mirror m{device};
    std::vector<cgd_kron_tensor> ts(ks.size());
    for (size_t i = 0; i < ks.size(); ++i) {
        Kron &k = *ks[i];
        cgd_kron_tensor &t = ts[i];
        t = cgd_kron_tensor{};
        t.param = m.put(k.param.data(), bytes(k.param));
        t.grad = m.put(grads[i].data(), bytes(grads[i]));
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
    }
    const float *skip = skip_value != 0.0f ? (const float *)m.put(&skip_value, sizeof skip_value) : nullptr;
    const int64_t n = (int64_t)ts.size();
    size_t need = 0;
    cgd_kron_workspace_size(&h, CGD_FLOAT32, ts.data(), n, device, nullptr, &need); // on bad arguments the step names them
    Workspace ws(device, need);
    return cgd_kron_step(&h, CGD_FLOAT32, ts.data(), n, nullptr, skip, ws.data, ws.bytes - shortfall, device,
                         nullptr);
}

cgd_status run_kron(cgd_device device, const cgd_block_hparams &h, Kron &k, std::vector<float> grad,
                    float skip_value = 0.0f) {
    return run_krons(device, h, {&k}, {grad}, skip_value);
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
    const long long solves = cgd_hooks.eigh_calls;
    ASSERT_EQ(run_kron(GetParam(), hparams(), k, normal_vector(rng, 12)), CGD_OK) << cgd_last_error();
    if (GetParam() == CGD_CPU) EXPECT_EQ(cgd_hooks.eigh_calls - solves, 1) << "NaN never reaches the solver";
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

// Two tensors in one call: when any scratch is missing, neither steps (the CPU kernel once stepped the tensors
// before the one whose allocation failed). On CUDA a too-small workspace is refused up front.
TEST_P(KronStep, NothingChangesWhenTheScratchIsMissing) {
    std::mt19937 rng(16);
    Kron a = make_kron(3, 4, 1, 1, 1.0f, normal_vector(rng, 12)), b = make_kron(6, 2, 1, 0, 1.0f, normal_vector(rng, 12));
    const std::vector<std::vector<float>> grads = {normal_vector(rng, 12), normal_vector(rng, 12)};
    ASSERT_EQ(run_krons(GetParam(), hparams(), {&a, &b}, grads), CGD_OK) << cgd_last_error();
    const Kron a0 = a, b0 = b;
    auto unchanged = [&](const std::string &what) {
        for (auto pair : {std::make_pair(&a, &a0), std::make_pair(&b, &b0)}) {
            const Kron &now = *pair.first, &was = *pair.second;
            EXPECT_EQ(now.param, was.param) << what;
            EXPECT_EQ(now.m1, was.m1) << what;
            EXPECT_EQ(now.lsq, was.lsq) << what;
            EXPECT_EQ(now.rsq, was.rsq) << what;
            EXPECT_EQ(now.lbasis, was.lbasis) << what;
            EXPECT_EQ(now.leig, was.leig) << what;
            EXPECT_EQ(now.step, was.step) << what;
        }
    };
    if (GetParam() == CGD_CUDA) {
        EXPECT_EQ(run_krons(CGD_CUDA, hparams(), {&a, &b}, grads, 0.0f, 4), CGD_ERR_INVALID_ARGUMENT);
        unchanged("short workspace");
        return;
    }
    EXPECT_GT(fail_each_allocation([&] { return run_krons(CGD_CPU, hparams(), {&a, &b}, grads); }, unchanged), 0);
    EXPECT_EQ(a.step, a0.step + 1);
    EXPECT_EQ(b.step, b0.step + 1);
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

// One eigenbasis step of a host Kron on `device` (mirrored there and back), with V' in `rotated`.
cgd_status run_eigenbasis(cgd_device device, const cgd_block_hparams &h, Kron &k, std::vector<float> grad,
                          std::vector<float> &rotated, int may_be_first, float skip_value = 0.0f) {
    Mirror m{device};
    cgd_kron_tensor t{};
    t.param = m.put(k.param.data(), bytes(k.param));
    t.grad = m.put(grad.data(), bytes(grad));
    t.rows = k.rows;
    t.cols = k.cols;
    t.left_full = k.left_full;
    t.right_full = k.right_full;
    t.exp_avg = m.put(k.m1.data(), bytes(k.m1));
    t.left_sq = m.put(k.lsq.data(), bytes(k.lsq));
    t.right_sq = m.put(k.rsq.data(), bytes(k.rsq));
    t.left_basis = m.put(k.lbasis.data(), bytes(k.lbasis));
    t.right_basis = m.put(k.rbasis.data(), bytes(k.rbasis));
    t.left_eig = m.put(k.leig.data(), bytes(k.leig));
    t.right_eig = m.put(k.reig.data(), bytes(k.reig));
    t.step = (double *)m.put(&k.step, sizeof k.step);
    t.outcome = (int32_t *)m.put(k.outcome, sizeof k.outcome);
    t.counters = (float *)m.put(k.counters, sizeof k.counters);
    t.rotated_sq = m.put(rotated.data(), bytes(rotated));
    t.may_be_first = may_be_first;
    const float *skip = skip_value != 0.0f ? (const float *)m.put(&skip_value, sizeof skip_value) : nullptr;
    size_t need = 0;
    cgd_eigenbasis_workspace_size(&h, CGD_FLOAT32, &t, 1, device, nullptr, &need); // the step names bad arguments
    Workspace ws(device, need);
    return cgd_eigenbasis_step(&h, CGD_FLOAT32, &t, 1, nullptr, skip, ws.data, ws.bytes, device, nullptr);
}

class EigenbasisStep : public ::testing::TestWithParam<cgd_device> {
  protected:
    void SetUp() override { CGD_SKIP_UNLESS_RUNNABLE(GetParam()); }
};

// The first step of the eigenbasis metric from Adam's start with a = 1/2 and raw moments rotates G into the
// bases of G G^T and G^T G, its singular vectors, where G' = diag(s): the step is U diag(s / sqrt(eps + s^2)) V^T
// = G (G^T G + eps I)^(-1/2), which tends to the polar factor U V^T of G (Muon's direction) as eps -> 0. eps sits
// well above the rounding of G' off its diagonal (~1e-6 s), which Adam's first step would otherwise turn into
// signs. The reference takes the inverse square root by the coupled Newton iteration Y <- Y T, Z <- T Z,
// T = (3 I - Z Y) / 2 (Z -> (A / c)^(-1/2)) in double, which shares nothing with the kernel's eigensolvers.
TEST_P(EigenbasisStep, FirstStepFromAdamsStartOrthogonalisesTheGradient) {
    std::mt19937 rng(21);
    const int64_t n = 4;
    Kron k = make_kron(n, n, 1, 1, 0.0f, std::vector<float>(n * n, 0.0f));
    std::vector<float> g = normal_vector(rng, n * n);
    for (int64_t e = 0; e < n * n; ++e) g[e] = 0.3f * g[e] + (e % (n + 1) == 0 ? 2.0f : 0.0f); // s in ~[1, 3]
    std::vector<float> rotated(n * n, 0.0f);
    cgd_block_hparams h = hparams();
    h.centered = 0;
    h.bias_correction = 1;
    h.eps = 1e-2;
    h.lr = 1.0;
    h.refresh = 0;
    ASSERT_EQ(run_eigenbasis(GetParam(), h, k, g, rotated, 1), CGD_OK) << cgd_last_error();
    auto product = [n](const std::vector<double> &a, const std::vector<double> &b) {
        std::vector<double> c(n * n, 0.0);
        for (int64_t i = 0; i < n; ++i)
            for (int64_t j = 0; j < n; ++j)
                for (int64_t m = 0; m < n; ++m) c[i * n + j] += a[i * n + m] * b[m * n + j];
        return c;
    };
    std::vector<double> x(g.begin(), g.end()), xt(n * n), y, z(n * n, 0.0);
    for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < n; ++j) xt[j * n + i] = x[i * n + j];
    y = product(xt, x); // A = G^T G + eps I, scaled by c = tr(A) so that the iteration converges
    double c = 0.0;
    for (int64_t i = 0; i < n; ++i) c += (y[i * n + i] += h.eps);
    for (double &v : y) v /= c;
    for (int64_t i = 0; i < n; ++i) z[i * n + i] = 1.0;
    for (int it = 0; it < 100; ++it) {
        std::vector<double> tm = product(z, y);
        for (int64_t e = 0; e < n * n; ++e) tm[e] = ((e % (n + 1) == 0 ? 3.0 : 0.0) - tm[e]) / 2.0;
        y = product(y, tm);
        z = product(tm, z);
    }
    const std::vector<double> d = product(x, z); // G (A / c)^(-1/2) = sqrt(c) G A^(-1/2)
    for (int64_t e = 0; e < n * n; ++e) EXPECT_NEAR(k.param[e], -d[e] / std::sqrt(c), 1e-4) << "entry " << e;
    EXPECT_EQ(k.outcome[0], CGD_BLOCK_FP32);
    EXPECT_EQ(k.outcome[1], CGD_BLOCK_FP32);
    EXPECT_EQ(k.step, 1.0);
}

// Twelve steps on a wide and a tall matrix, one side diagonal on the third, refreshing every third step, centered
// and raw, with a skipped step in the middle and a skipped first step: CUDA's one sequence for first and later
// steps gives the CPU kernel's parameters, moments and bases to float rounding.
TEST(EigenbasisStepCuda, TwelveStepsMatchTheCpuKernel) {
    CGD_SKIP_UNLESS_RUNNABLE(CGD_CUDA);
    for (int centered = 0; centered < 2; ++centered)
        for (auto [rows, cols, right_full] : {std::tuple{5, 9, 1}, std::tuple{9, 5, 1}, std::tuple{6, 4, 0}}) {
            SCOPED_TRACE(std::to_string(rows) + " x " + std::to_string(cols) + (centered ? " centered" : " raw"));
            std::mt19937 rng(rows * 10 + cols);
            const std::vector<float> start = normal_vector(rng, rows * cols);
            Kron cpu = make_kron(rows, cols, 1, right_full, 1.0f, start), gpu = cpu;
            for (int64_t i = 0; i < rows; ++i) cpu.lbasis[i * rows + i] = gpu.lbasis[i * rows + i] = 1.0f;
            for (int64_t j = 0; right_full && j < cols; ++j) cpu.rbasis[j * cols + j] = gpu.rbasis[j * cols + j] = 1.0f;
            std::vector<float> vc(rows * cols, 1.0f), vg = vc;
            cgd_block_hparams h = hparams();
            h.centered = centered;
            for (int s = 0; s < 12; ++s) {
                const std::vector<float> g = normal_vector(rng, rows * cols);
                h.refresh = s % 3 == 2;
                const float skip = s == 0 || s == 6 ? 1.0f : 0.0f;
                ASSERT_EQ(run_eigenbasis(CGD_CPU, h, cpu, g, vc, 1, skip), CGD_OK) << cgd_last_error();
                ASSERT_EQ(run_eigenbasis(CGD_CUDA, h, gpu, g, vg, s <= 1, skip), CGD_OK) << cgd_last_error();
            }
            EXPECT_EQ(gpu.step, cpu.step);
            EXPECT_EQ(gpu.outcome[0], cpu.outcome[0]);
            EXPECT_EQ(gpu.outcome[1], cpu.outcome[1]);
            for (int64_t e = 0; e < rows * cols; ++e) {
                EXPECT_NEAR(gpu.param[e], cpu.param[e], 1e-4) << "param " << e;
                EXPECT_NEAR(vg[e], vc[e], 1e-4 * (1 + std::fabs(vc[e]))) << "rotated_sq " << e;
            }
        }
}

INSTANTIATE_TEST_SUITE_P(Devices, EigenbasisStep, ::testing::Values(CGD_CPU, CGD_CUDA),
                         [](const ::testing::TestParamInfo<cgd_device> &info) {
                             return std::string(info.param == CGD_CPU ? "CPU" : "CUDA");
                         });

TEST(EigenbasisArguments, ArgumentsAreNamedAndRefusedCallsChangeNothing) {
    std::mt19937 rng(22);
    Kron k = make_kron(3, 4, 1, 1, 1.0f, normal_vector(rng, 12));
    const std::vector<float> g = normal_vector(rng, 12);
    std::vector<float> rotated(12, 1.0f);
    const cgd_block_hparams h = hparams();
    cgd_kron_tensor t{};
    t.param = k.param.data();
    t.grad = g.data();
    t.rows = k.rows;
    t.cols = k.cols;
    t.left_full = k.left_full;
    t.right_full = k.right_full;
    t.exp_avg = k.m1.data();
    t.left_sq = k.lsq.data();
    t.right_sq = k.rsq.data();
    t.left_basis = k.lbasis.data();
    t.right_basis = k.rbasis.data();
    t.left_eig = k.leig.data();
    t.right_eig = k.reig.data();
    t.step = &k.step;
    t.outcome = k.outcome;
    t.counters = k.counters;
    EXPECT_EQ(cgd_eigenbasis_step(&h, CGD_FLOAT32, &t, 1, nullptr, nullptr, nullptr, 0, CGD_CPU, nullptr),
              CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("cgd_eigenbasis_step: tensors[0].rotated_sq is NULL"),
              std::string::npos);
    t.rotated_sq = rotated.data();
    EXPECT_NE(cgd_eigenbasis_step(&h, CGD_FLOAT32, &t, 1, nullptr, nullptr, nullptr, 0, CGD_CUDA, nullptr), CGD_OK)
        << "host pointers and no workspace on CUDA";
    EXPECT_EQ(k.step, 0.0); // refused calls change nothing
}

} // namespace

#ifdef CGD_WITH_CUDA
namespace {

// A side past 2^31 elements: every GEMM and launch takes 64-bit sizes (an int once truncated them). Needs
// ~86 GB of GPU memory; the sanitizer runs leave it out (its name holds "Huge").
TEST(HugeTensorsCuda, KronSidePastInt32) {
    CGD_SKIP_UNLESS_RUNNABLE(CGD_CUDA);
    const int64_t rows = 1, cols = ((int64_t)1 << 31) + 64, n = rows * cols;
    size_t free_bytes = 0, total = 0;
    ASSERT_EQ(cudaMemGetInfo(&free_bytes, &total), cudaSuccess);
    cgd_block_hparams h = hparams();
    h.centered = 0;
    h.bias_correction = 1;
    h.eps = 1e-8;
    h.lr = 0.01;
    cgd_kron_tensor t{};
    t.rows = rows;
    t.cols = cols;
    t.left_full = 1;
    t.right_full = 0;
    size_t need = 0;
    ASSERT_EQ(cgd_kron_workspace_size(&h, CGD_FLOAT32, &t, 1, CGD_CUDA, nullptr, &need), CGD_OK) << cgd_last_error();
    const size_t state = (size_t)n * (2 + 2 + 4 + 4 + 4) + 64;
    if (free_bytes < state + need + ((size_t)1 << 30)) GTEST_SKIP() << "needs " << (state + need) / 1e9 << " GB";
    std::vector<void *> allocs;
    auto alloc = [&](size_t bytes, int fill) {
        void *d = nullptr;
        EXPECT_EQ(cudaMalloc(&d, bytes), cudaSuccess);
        EXPECT_EQ(cudaMemset(d, fill, bytes), cudaSuccess);
        allocs.push_back(d);
        return d;
    };
    t.param = alloc((size_t)n * 2, 0);
    t.grad = alloc((size_t)n * 2, 0x3f); // bf16 0x3f3f = 0.74609375 everywhere
    t.exp_avg = (float *)alloc((size_t)n * 4, 0);
    t.left_sq = (float *)alloc(4, 0);
    t.left_basis = (float *)alloc(4, 0);
    t.left_eig = (float *)alloc(4, 0);
    t.right_sq = (float *)alloc((size_t)cols * 4, 0);
    t.right_eig = (float *)alloc((size_t)cols * 4, 0);
    t.step = (double *)alloc(8, 0);
    t.outcome = (int32_t *)alloc(8, 0xff); // CGD_BLOCK_NEVER
    t.counters = (float *)alloc(12, 0);
    Workspace ws(CGD_CUDA, need);
    ASSERT_EQ(cgd_kron_step(&h, CGD_BFLOAT16, &t, 1, nullptr, nullptr, ws.data, ws.bytes, CGD_CUDA, nullptr), CGD_OK)
        << cgd_last_error();
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    // One Adam-start step of a constant gradient g: mu = cols g^2, nu_j = 1 / cols, so D = g / sqrt(eps + g^2).
    const double g = 0.74609375, expected = -h.lr * g / std::sqrt(h.eps + g * g);
    for (int64_t i : {(int64_t)0, ((int64_t)1 << 31) - 1, ((int64_t)1 << 31) + 10, cols - 1}) {
        uint16_t raw = 0;
        ASSERT_EQ(cudaMemcpy(&raw, (const uint16_t *)t.param + i, 2, cudaMemcpyDeviceToHost), cudaSuccess);
        uint32_t bits = (uint32_t)raw << 16;
        float p;
        std::memcpy(&p, &bits, 4);
        // Loose: the point is that every element past 2^31 was stepped; float GEMM sums over 2^31 terms round.
        EXPECT_NEAR(p, expected, 0.1 * std::fabs(expected)) << "element " << i;
    }
    for (void *d : allocs) cudaFree(d);
}

} // namespace
#endif
