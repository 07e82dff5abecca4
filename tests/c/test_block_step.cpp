// The C API's full/block step (cgd_block_step, paper eq 4.9) against a float64 reference with its own Jacobi
// eigensolver, on the CPU and, when a GPU is present, on CUDA. Also: the failure ladder, skip, argument errors.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <thread>
#include <string>
#include <vector>

#include "cgd.h"
#include "kernels.h" // cgd_hooks: fault injection and the solver-call probe
#include "test_support.h"

#ifdef CGD_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace {

using Matrix = std::vector<double>; // row-major n x n

// Cyclic Jacobi: A = V diag(w) V^T for a symmetric A; columns of V are eigenvectors.
void jacobi(Matrix a, int n, std::vector<double> &w, Matrix &v) {
    v.assign((size_t)n * n, 0.0);
    for (int i = 0; i < n; ++i) v[(size_t)i * n + i] = 1.0;
    for (int sweep = 0; sweep < 100; ++sweep) {
        double off = 0.0;
        for (int p = 0; p < n; ++p)
            for (int q = p + 1; q < n; ++q) off += a[(size_t)p * n + q] * a[(size_t)p * n + q];
        if (off < 1e-30) break;
        for (int p = 0; p < n; ++p)
            for (int q = p + 1; q < n; ++q) {
                double apq = a[(size_t)p * n + q];
                if (std::fabs(apq) < 1e-300) continue;
                double theta = (a[(size_t)q * n + q] - a[(size_t)p * n + p]) / (2.0 * apq);
                double t = (theta >= 0 ? 1.0 : -1.0) / (std::fabs(theta) + std::sqrt(theta * theta + 1.0));
                double c = 1.0 / std::sqrt(t * t + 1.0), s = t * c;
                for (int k = 0; k < n; ++k) { // A <- J^T A J
                    double akp = a[(size_t)k * n + p], akq = a[(size_t)k * n + q];
                    a[(size_t)k * n + p] = c * akp - s * akq;
                    a[(size_t)k * n + q] = s * akp + c * akq;
                }
                for (int k = 0; k < n; ++k) {
                    double apk = a[(size_t)p * n + k], aqk = a[(size_t)q * n + k];
                    a[(size_t)p * n + k] = c * apk - s * aqk;
                    a[(size_t)q * n + k] = s * apk + c * aqk;
                }
                for (int k = 0; k < n; ++k) {
                    double vkp = v[(size_t)k * n + p], vkq = v[(size_t)k * n + q];
                    v[(size_t)k * n + p] = c * vkp - s * vkq;
                    v[(size_t)k * n + q] = s * vkp + c * vkq;
                }
            }
    }
    w.resize(n);
    for (int i = 0; i < n; ++i) w[i] = a[(size_t)i * n + i];
}

// Two tensors (5 and 3 elements) in blocks of 4: tensor 0 fills blocks 0-1 (3 padding coordinates), tensor 1
// block 2 (1 padding coordinate).
constexpr int B = 4, NB = 3, L = B * NB;
const int64_t kNumel[2] = {5, 3}, kOffset[2] = {0, 8};

struct Problem {
    std::vector<float> param[2], m1 = std::vector<float>(L, 0.0f), m2 = std::vector<float>(NB * B * B, 0.0f),
                                 precond = std::vector<float>(NB * B * B, 0.0f), eig = std::vector<float>(L, 0.0f);
    double step = 0.0;
    float counters[4] = {0, 0, 0, 0};
    int32_t outcome[NB] = {-1, -1, -1};
};

Problem make_problem(double m2_init) {
    Problem pr;
    std::mt19937 rng(7);
    std::normal_distribution<float> normal;
    for (int t = 0; t < 2; ++t)
        for (int64_t i = 0; i < kNumel[t]; ++i) pr.param[t].push_back(normal(rng));
    for (int b = 0; b < NB; ++b)
        for (int i = 0; i < B; ++i) pr.m2[(size_t)b * B * B + i * B + i] = (float)m2_init;
    return pr;
}

std::vector<float> gradient(int step, int t) {
    std::mt19937 rng(100 + step * 2 + t);
    std::normal_distribution<float> normal;
    std::vector<float> g;
    for (int64_t i = 0; i < kNumel[t]; ++i) g.push_back(normal(rng) * (1.0f + (float)i));
    return g;
}

// The float64 reference of one step over a blocked vector of nb blocks of `block` coordinates, tensor k at
// offsets[k] (padding coordinates get gradient 0).
struct Reference {
    int64_t block, nb;
    std::vector<int64_t> numels, offsets;
    std::vector<std::vector<double>> q;
    std::vector<double> m1;
    std::vector<Matrix> m2, P;
    int t = 0;
    Reference(int64_t block_, int64_t nb_, std::vector<int64_t> numels_, std::vector<int64_t> offsets_,
              const std::vector<std::vector<float>> &start, double m2_init)
        : block(block_), nb(nb_), numels(numels_), offsets(offsets_), m1(block_ * nb_, 0.0), P(nb_) {
        for (const auto &x : start) q.emplace_back(x.begin(), x.end());
        for (int64_t b = 0; b < nb; ++b) {
            m2.emplace_back(block * block, 0.0);
            for (int64_t i = 0; i < block; ++i) m2[b][i * block + i] = m2_init;
        }
    }
    void step(const cgd_block_hparams &h, const std::vector<float> *g) {
        ++t;
        const int64_t B = block, L = block * nb;
        std::vector<double> gv(L, 0.0);
        for (size_t k = 0; k < numels.size(); ++k)
            for (int64_t i = 0; i < numels[k]; ++i) gv[offsets[k] + i] = g[k][i];
        double bc1 = h.bias_correction ? 1 - std::pow(h.beta1, t) : 1, bc2 = h.bias_correction ? 1 - std::pow(h.beta2, t) : 1;
        std::vector<double> F(L), u(L);
        for (int64_t i = 0; i < L; ++i) {
            m1[i] = h.beta1 * m1[i] + (1 - h.beta1) * gv[i];
            F[i] = m1[i] / bc1;
        }
        for (int64_t b = 0; b < nb; ++b) {
            Matrix &m = m2[b];
            for (int64_t i = 0; i < B; ++i)
                for (int64_t j = 0; j < B; ++j)
                    m[i * B + j] = h.beta2 * m[i * B + j] + (1 - h.beta2) * gv[b * B + i] * gv[b * B + j];
            if (h.refresh) {
                // A bias-corrected first step has no variance yet (S - F F^T = 0): it takes the raw moment.
                const bool centered = h.centered && !(h.bias_correction && t == 1);
                Matrix c(B * B), v;
                std::vector<double> w;
                for (int64_t i = 0; i < B; ++i)
                    for (int64_t j = 0; j < B; ++j)
                        c[i * B + j] = m[i * B + j] / bc2 - (centered ? F[b * B + i] * F[b * B + j] : 0.0);
                jacobi(c, (int)B, w, v);
                P[b].assign(B * B, 0.0);
                for (int64_t i = 0; i < B; ++i)
                    for (int64_t j = 0; j < B; ++j)
                        for (int64_t k = 0; k < B; ++k)
                            P[b][i * B + j] += v[i * B + k] * std::pow(h.eps + std::max(w[k], 0.0), -h.power) * v[j * B + k];
            }
            for (int64_t i = 0; i < B; ++i) {
                u[b * B + i] = 0;
                for (int64_t j = 0; j < B; ++j) u[b * B + i] += P[b][i * B + j] * F[b * B + j];
            }
        }
        for (size_t k = 0; k < numels.size(); ++k)
            for (int64_t i = 0; i < numels[k]; ++i)
                q[k][i] = q[k][i] * (1 - h.lr * h.weight_decay) - h.lr * u[offsets[k] + i];
    }
};

// One cgd_block_step of pr on `device` (CUDA: copied to the device and back).
cgd_status run(cgd_device device, const cgd_block_hparams &h, Problem &pr, const std::vector<float> g[2],
               const float *skip = nullptr) {
    if (device == CGD_CPU) {
        cgd_block_tensor ts[2] = {{pr.param[0].data(), g[0].data(), kNumel[0], kOffset[0]},
                                  {pr.param[1].data(), g[1].data(), kNumel[1], kOffset[1]}};
        cgd_block_state st = {B, NB, pr.m1.data(), pr.m2.data(), pr.precond.data(), pr.eig.data(), &pr.step,
                              pr.outcome, pr.counters};
        return cgd_block_step(&h, CGD_FLOAT32, ts, 2, &st, nullptr, skip, nullptr, 0, CGD_CPU, nullptr);
    }
#ifdef CGD_WITH_CUDA
    std::vector<void *> allocs;
    auto up = [&](const void *host, size_t bytes) {
        void *d = nullptr;
        EXPECT_EQ(cudaMalloc(&d, bytes), cudaSuccess);
        EXPECT_EQ(cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice), cudaSuccess);
        allocs.push_back(d);
        return d;
    };
    auto down = [&](void *host, const void *dev, size_t bytes) {
        EXPECT_EQ(cudaMemcpy(host, dev, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
    };
    cgd_block_tensor ts[2];
    for (int k = 0; k < 2; ++k)
        ts[k] = {up(pr.param[k].data(), kNumel[k] * 4), up(g[k].data(), kNumel[k] * 4), kNumel[k], kOffset[k]};
    cgd_block_state st = {B, NB, (float *)up(pr.m1.data(), L * 4), (float *)up(pr.m2.data(), pr.m2.size() * 4),
                          (float *)up(pr.precond.data(), pr.precond.size() * 4), (float *)up(pr.eig.data(), L * 4),
                          (double *)up(&pr.step, 8), (int32_t *)up(pr.outcome, sizeof pr.outcome),
                          (float *)up(pr.counters, sizeof pr.counters)};
    float *d_skip = skip ? (float *)up(skip, 4) : nullptr;
    size_t need = 0;
    EXPECT_EQ(cgd_block_workspace_size(&h, CGD_FLOAT32, &st, CGD_CUDA, nullptr, &need), CGD_OK) << cgd_last_error();
    Workspace ws(CGD_CUDA, need);
    cgd_status status = cgd_block_step(&h, CGD_FLOAT32, ts, 2, &st, nullptr, d_skip, ws.data, ws.bytes, CGD_CUDA,
                                       nullptr);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    for (int k = 0; k < 2; ++k) down(pr.param[k].data(), ts[k].param, kNumel[k] * 4);
    down(pr.m1.data(), st.exp_avg, L * 4);
    down(pr.m2.data(), st.exp_avg_sq, pr.m2.size() * 4);
    down(pr.precond.data(), st.precond, pr.precond.size() * 4);
    down(pr.eig.data(), st.eigvals, L * 4);
    down(&pr.step, st.step, 8);
    down(pr.outcome, st.outcome, sizeof pr.outcome);
    down(pr.counters, st.counters, sizeof pr.counters);
    for (void *p : allocs) cudaFree(p);
    return status;
#else
    return CGD_ERR_UNSUPPORTED;
#endif
}

cgd_block_hparams paper_hparams() {
    cgd_block_hparams h{};
    h.lr = 0.05;
    h.beta1 = 17.1 / 18.1;
    h.beta2 = 15.3 / 16.3;
    h.power = 0.4;
    h.eps = 1e-8;
    h.centered = 1;
    h.refresh = 1;
    return h;
}

class BlockStep : public ::testing::TestWithParam<cgd_device> {
  protected:
    void SetUp() override {
        CGD_SKIP_UNLESS_RUNNABLE(GetParam());
    }
};

struct Config {
    const char *name;
    double power, weight_decay, m2_init;
    int centered, bias_correction, refresh_every;
};

// h with config c's options, stepped 12 times (refreshed every c.refresh_every) from c's start in pr, each step's
// parameters asserted against the float64 reference. Callers return on HasFatalFailure().
void step_against_reference(cgd_device device, cgd_block_hparams h, const Config &c, Problem &pr) {
    h.power = c.power;
    h.weight_decay = c.weight_decay;
    h.centered = c.centered;
    h.bias_correction = c.bias_correction;
    pr = make_problem(c.m2_init);
    Reference ref(B, NB, {kNumel[0], kNumel[1]}, {kOffset[0], kOffset[1]}, {pr.param[0], pr.param[1]}, c.m2_init);
    for (int s = 0; s < 12; ++s) {
        std::vector<float> g[2] = {gradient(s, 0), gradient(s, 1)};
        h.refresh = s % c.refresh_every == 0;
        ASSERT_EQ(run(device, h, pr, g), CGD_OK) << cgd_last_error();
        ref.step(h, g);
        for (int k = 0; k < 2; ++k)
            for (int64_t i = 0; i < kNumel[k]; ++i)
                ASSERT_NEAR(pr.param[k][i], ref.q[k][i], 2e-4 * (1 + std::fabs(ref.q[k][i])))
                    << "step " << s << " tensor " << k << " element " << i;
    }
}

TEST_P(BlockStep, MatchesFloat64Reference) {
    const Config configs[] = {{"paper", 0.4, 0.0, 1.0, 1, 0, 1},   {"raw a=0.5", 0.5, 0.0, 1.0, 0, 0, 1},
                              {"adam start", 0.3, 0.0, 0.0, 0, 1, 1}, {"decay", 0.4, 0.1, 1.0, 1, 0, 1},
                              {"refresh 3", 0.4, 0.0, 1.0, 1, 0, 3},  {"sgd", 0.0, 0.0, 1.0, 1, 0, 1}};
    for (const Config &c : configs) {
        SCOPED_TRACE(c.name);
        Problem pr;
        step_against_reference(GetParam(), paper_hparams(), c, pr);
        if (HasFatalFailure()) return;
        EXPECT_EQ(pr.step, 12.0f);
        for (int b = 0; b < NB; ++b) EXPECT_EQ(pr.outcome[b], CGD_BLOCK_FP32);
        // Padding never moves: its M1 stays 0.
        for (int i : {5, 6, 7, 11}) EXPECT_EQ(pr.m1[i], 0.0f);
    }
}

// The Lanczos solver (every step, no P) against the same reference; with its iterations capped at 1 every
// block takes that step's eigendecomposition instead, counted, to the same result.
TEST_P(BlockStep, LanczosMatchesFloat64ReferenceAndFallsBackWhenCapped) {
    if (GetParam() != CGD_CPU) {
        cgd_block_hparams h = paper_hparams();
        h.solver = CGD_SOLVER_LANCZOS;
        size_t need = 0;
        cgd_block_state st = {B, NB, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr};
        EXPECT_EQ(cgd_block_workspace_size(&h, CGD_FLOAT32, &st, GetParam(), nullptr, &need), CGD_ERR_UNSUPPORTED);
        EXPECT_NE(std::string(cgd_last_error()).find("CPU only"), std::string::npos) << cgd_last_error();
        return;
    }
    const Config configs[] = {{"paper", 0.4, 0.0, 1.0, 1, 0, 1}, {"raw a=0.5", 0.5, 0.0, 1.0, 0, 0, 1},
                              {"adam start", 0.3, 0.0, 0.0, 0, 1, 1}, {"decay", 0.4, 0.1, 1.0, 1, 0, 1},
                              {"sgd", 0.0, 0.0, 1.0, 1, 0, 1}};
    for (int capped = 0; capped < 2; ++capped)
        for (const Config &c : configs) {
            SCOPED_TRACE(std::string(c.name) + (capped ? ", capped" : ""));
            cgd_block_hparams h = paper_hparams();
            h.solver = CGD_SOLVER_LANCZOS;
            Problem pr;
            cgd_hooks.lanczos_iterations = capped;
            step_against_reference(GetParam(), h, c, pr);
            cgd_hooks.lanczos_iterations = 0;
            if (HasFatalFailure()) return;
            // SGD's metric needs no solve; otherwise the capped runs fell back, except block 1's: one real
            // coordinate, so F spans an invariant space of C and one iteration is exact.
            const bool solved = c.power == 0.0 || !capped;
            for (int b = 0; b < NB; ++b)
                EXPECT_EQ(pr.outcome[b], solved || b == 1 ? CGD_BLOCK_LANCZOS : CGD_BLOCK_FP32) << "block " << b;
            EXPECT_EQ(pr.counters[3], solved ? 0.0f : 12.0f * (NB - 1));
            EXPECT_EQ(pr.precond, std::vector<float>(NB * B * B, 0.0f)) << "no P is kept";
        }
}

TEST_P(BlockStep, NonzeroSkipChangesNothing) {
    cgd_block_hparams h = paper_hparams();
    Problem pr = make_problem(1.0);
    std::vector<float> g[2] = {gradient(0, 0), gradient(0, 1)};
    ASSERT_EQ(run(GetParam(), h, pr, g), CGD_OK);
    Problem before = pr;
    const float skip = 1.0f;
    ASSERT_EQ(run(GetParam(), h, pr, g, &skip), CGD_OK) << cgd_last_error();
    for (int k = 0; k < 2; ++k) EXPECT_EQ(pr.param[k], before.param[k]);
    EXPECT_EQ(pr.m1, before.m1);
    EXPECT_EQ(pr.m2, before.m2);
    EXPECT_EQ(pr.precond, before.precond);
    EXPECT_EQ(pr.step, before.step);
}

TEST_P(BlockStep, FailedFirstRefreshFallsBackToTheDiagonalThenKeepsThePrevious) {
    cgd_block_hparams h = paper_hparams();
    Problem pr = make_problem(1.0);
    pr.m2[1 * B * B + 0 * B + 1] = pr.m2[1 * B * B + 1 * B + 0] = NAN; // block 1 cannot be decomposed
    std::vector<float> g[2] = {gradient(0, 0), gradient(0, 1)};
    ASSERT_EQ(run(GetParam(), h, pr, g), CGD_OK) << cgd_last_error();
    EXPECT_EQ(pr.outcome[0], CGD_BLOCK_FP32);
    EXPECT_EQ(pr.outcome[1], CGD_BLOCK_DIAGONAL);
    EXPECT_EQ(pr.counters[2], 1.0f);
    for (int i = 0; i < B; ++i)
        for (int j = 0; j < B; ++j) {
            float pij = pr.precond[1 * B * B + i * B + j];
            EXPECT_TRUE(std::isfinite(pij));
            if (i != j) EXPECT_EQ(pij, 0.0f);
        }
    for (int k = 0; k < 2; ++k)
        for (float p : pr.param[k]) EXPECT_TRUE(std::isfinite(p));
    std::vector<float> kept(pr.precond.begin() + B * B, pr.precond.begin() + 2 * B * B);
    ASSERT_EQ(run(GetParam(), h, pr, g), CGD_OK);
    EXPECT_EQ(pr.outcome[1], CGD_BLOCK_KEPT);
    EXPECT_EQ(pr.counters[1], 1.0f);
    EXPECT_EQ(std::vector<float>(pr.precond.begin() + B * B, pr.precond.begin() + 2 * B * B), kept);
}

// Blocks above 32 go to a different solver on CUDA (XsyevBatched, one call per chunk of blocks).
TEST_P(BlockStep, LargeBlocksMatchFloat64Reference) {
    const int64_t block = 40, nb = 3;
    std::mt19937 rng(21);
    cgd_block_hparams h = paper_hparams();
    Blocked b = make_blocked(block, nb, 1.0f, normal_vector(rng, block * nb));
    Reference ref(block, nb, {block * nb}, {0}, {b.param}, 1.0);
    for (int s = 0; s < 4; ++s) {
        std::vector<float> g = normal_vector(rng, block * nb);
        h.refresh = s != 2;
        ASSERT_EQ(run_blocked(GetParam(), h, b, g), CGD_OK) << cgd_last_error();
        ref.step(h, &g);
        for (int64_t i = 0; i < block * nb; ++i)
            ASSERT_NEAR(b.param[i], ref.q[0][i], 5e-4 * (1 + std::fabs(ref.q[0][i]))) << "step " << s << " i " << i;
    }
    for (int32_t o : b.outcome) EXPECT_EQ(o, CGD_BLOCK_FP32);
}

// The diagonal fallback of a failed first refresh writes every coordinate of the block, also those that other
// warps of the CUDA block handle (a race on the outcome once left some of them zero, so they stopped learning);
// a non-finite C never reaches the solver.
TEST_P(BlockStep, FailedLargeBlockFallsBackOnEveryCoordinate) {
    const int64_t block = 64, nb = 2;
    std::mt19937 rng(22);
    cgd_block_hparams h = paper_hparams();
    Blocked b = make_blocked(block, nb, 1.0f, normal_vector(rng, block * nb));
    b.m2[3 * block + 5] = b.m2[5 * block + 3] = INFINITY; // block 0's C cannot be decomposed
    std::vector<float> g = normal_vector(rng, block * nb);
    const long long solves = cgd_hooks.eigh_calls;
    ASSERT_EQ(run_blocked(GetParam(), h, b, g), CGD_OK) << cgd_last_error();
    if (GetParam() == CGD_CPU) EXPECT_EQ(cgd_hooks.eigh_calls - solves, 1) << "only the finite block is solved";
    EXPECT_EQ(b.outcome[0], CGD_BLOCK_DIAGONAL);
    EXPECT_EQ(b.outcome[1], CGD_BLOCK_FP32);
    EXPECT_EQ(b.counters[2], 1.0f);
    for (int64_t i = 0; i < block; ++i)
        for (int64_t j = 0; j < block; ++j) {
            const float pij = b.precond[i * block + j];
            if (i != j) {
                ASSERT_EQ(pij, 0.0f) << i << ", " << j;
                continue;
            }
            // C_ii = M2_ii - F_i^2 with M2_ii = beta2 + (1 - beta2) g_i^2 and F_i = (1 - beta1) g_i (paper start).
            const double f = (1 - h.beta1) * g[i], c = h.beta2 + (1 - h.beta2) * (double)g[i] * g[i] - f * f;
            ASSERT_NEAR(pij, std::pow(h.eps + c, -h.power), 1e-4) << "coordinate " << i;
        }
    for (float p : b.param) ASSERT_TRUE(std::isfinite(p));
}

TEST_P(BlockStep, StepCounterCountsPast2To24) {
    std::mt19937 rng(23);
    Blocked b = make_blocked(4, 1, 1.0f, normal_vector(rng, 4));
    b.step = 16777216.0; // 2^24: a float32 counter would stay here
    ASSERT_EQ(run_blocked(GetParam(), paper_hparams(), b, normal_vector(rng, 4)), CGD_OK) << cgd_last_error();
    EXPECT_EQ(b.step, 16777217.0);
}

// A step that cannot get its scratch changes nothing (the CPU kernels allocate it all before they start; CUDA
// steps take the caller's workspace, and one too small is refused up front).
TEST_P(BlockStep, NothingChangesWhenTheScratchIsMissing) {
    std::mt19937 rng(24);
    cgd_block_hparams h = paper_hparams();
    Blocked b = make_blocked(8, 3, 1.0f, normal_vector(rng, 24));
    ASSERT_EQ(run_blocked(GetParam(), h, b, normal_vector(rng, 24)), CGD_OK);
    std::vector<float> g = normal_vector(rng, 24);
    const Blocked before = b;
    auto unchanged = [&](const std::string &what) {
        EXPECT_EQ(b.param, before.param) << what;
        EXPECT_EQ(b.m1, before.m1) << what;
        EXPECT_EQ(b.m2, before.m2) << what;
        EXPECT_EQ(b.precond, before.precond) << what;
        EXPECT_EQ(b.eig, before.eig) << what;
        EXPECT_EQ(b.outcome, before.outcome) << what;
        EXPECT_EQ(b.step, before.step) << what;
    };
    if (GetParam() == CGD_CUDA) {
        EXPECT_EQ(run_blocked(CGD_CUDA, h, b, g, 4), CGD_ERR_INVALID_ARGUMENT);
        EXPECT_NE(std::string(cgd_last_error()).find("workspace of"), std::string::npos) << cgd_last_error();
        unchanged("short workspace");
        return;
    }
    EXPECT_GT(fail_each_allocation([&] { return run_blocked(CGD_CPU, h, b, g); }, unchanged), 0);
    EXPECT_EQ(b.step, before.step + 1);
}

INSTANTIATE_TEST_SUITE_P(Devices, BlockStep, ::testing::Values(CGD_CPU, CGD_CUDA),
                         [](const ::testing::TestParamInfo<cgd_device> &info) {
                             return std::string(info.param == CGD_CPU ? "CPU" : "CUDA");
                         });

TEST(BlockStepErrors, ArgumentsAreNamedWithTheirValue) {
    Problem pr = make_problem(1.0);
    std::vector<float> g[2] = {gradient(0, 0), gradient(0, 1)};
    cgd_block_hparams h = paper_hparams();
    h.eps = 0.0;
    EXPECT_EQ(run(CGD_CPU, h, pr, g), CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("hparams.eps = 0 with power = 0.4"), std::string::npos);
    // eps = 1e-300 is positive but its metric inverse eps^-power overflows float32: P would hold Inf.
    h.eps = 1e-300;
    EXPECT_EQ(run(CGD_CPU, h, pr, g), CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("hparams.eps = 1e-300 with power = 0.4: eps^-power = 1e+120 "
                                                 "overflows the float32 state"),
              std::string::npos)
        << cgd_last_error();
    h = paper_hparams();
    h.beta2 = 1.0;
    EXPECT_EQ(run(CGD_CPU, h, pr, g), CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("cgd_block_step: hparams.beta2 = 1"), std::string::npos);

    h = paper_hparams();
    cgd_block_tensor overlap[2] = {{pr.param[0].data(), g[0].data(), 5, 0}, {pr.param[1].data(), g[1].data(), 3, 4}};
    cgd_block_state st = {B, NB, pr.m1.data(), pr.m2.data(), pr.precond.data(), pr.eig.data(), &pr.step,
                          pr.outcome, pr.counters};
    EXPECT_EQ(cgd_block_step(&h, CGD_FLOAT32, overlap, 2, &st, nullptr, nullptr, nullptr, 0, CGD_CPU, nullptr),
              CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("tensors[1] covers [4, 7), which overlaps"), std::string::npos);
    st.block = 0;
    EXPECT_EQ(cgd_block_step(&h, CGD_FLOAT32, overlap, 2, &st, nullptr, nullptr, nullptr, 0, CGD_CPU, nullptr),
              CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("state.block = 0"), std::string::npos);
    st.block = B;
    st.precond = nullptr;
    EXPECT_EQ(cgd_block_step(&h, CGD_FLOAT32, overlap, 2, &st, nullptr, nullptr, nullptr, 0, CGD_CPU, nullptr),
              CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("state.precond is NULL"), std::string::npos);
}

// The window step (cgd_window_step) over the same two tensors laid end to end (8 coordinates, one full metric):
// while the window holds every gradient its M2 is eq 4.9's, so it follows the float64 full reference.
struct WindowProblem {
    std::vector<float> param[2], m1 = std::vector<float>(8, 0.0f), history;
    std::vector<double> gram;
    double identity, step = 0.0;
    float counters[4] = {0, 0, 0, 0};
    int64_t window;
    WindowProblem(int64_t window_, double m2_init)
        : history(window_ * 8, 0.0f), gram(window_ * window_, 0.0), identity(m2_init), window(window_) {
        Problem pr = make_problem(m2_init);
        param[0] = pr.param[0];
        param[1] = pr.param[1];
    }
    cgd_status run(const cgd_block_hparams &h, const std::vector<float> g[2], const float *skip = nullptr) {
        cgd_block_tensor ts[2] = {{param[0].data(), g[0].data(), kNumel[0], 0},
                                  {param[1].data(), g[1].data(), kNumel[1], kNumel[0]}};
        cgd_window_state st = {8, window, m1.data(), history.data(), gram.data(), &identity, &step, counters};
        return cgd_window_step(&h, CGD_FLOAT32, ts, 2, &st, nullptr, skip, CGD_CPU);
    }
};

TEST(WindowStep, FollowsTheFloat64FullStepWhileTheWindowHoldsEveryGradient) {
    for (const Config &c : {Config{"paper", 0.4, 0.0, 1.0, 1, 0, 1}, Config{"adam start", 0.5, 0.1, 0.0, 1, 1, 1},
                            Config{"raw", 0.25, 0.0, 1.0, 0, 0, 1}}) {
        cgd_block_hparams h = paper_hparams();
        h.power = c.power;
        h.weight_decay = c.weight_decay;
        h.centered = c.centered;
        h.bias_correction = c.bias_correction;
        WindowProblem w(16, c.m2_init);
        Reference ref(8, 1, {kNumel[0], kNumel[1]}, {0, kNumel[0]}, {w.param[0], w.param[1]}, c.m2_init);
        for (int s = 0; s < 12; ++s) {
            std::vector<float> g[2] = {gradient(s, 0), gradient(s, 1)};
            ASSERT_EQ(w.run(h, g), CGD_OK) << cgd_last_error();
            ref.step(h, g);
            for (int k = 0; k < 2; ++k)
                for (int64_t i = 0; i < kNumel[k]; ++i)
                    ASSERT_NEAR(w.param[k][i], ref.q[k][i], 2e-4 * (1 + std::fabs(ref.q[k][i])))
                        << c.name << " step " << s << " tensor " << k << " element " << i;
        }
        EXPECT_EQ(w.step, 12.0);
        EXPECT_EQ(w.counters[2], 0.0f);
    }
}

TEST(WindowStep, SkipAndMissingScratchChangeNothing) {
    cgd_block_hparams h = paper_hparams();
    WindowProblem w(3, 1.0);
    for (int s = 0; s < 4; ++s) { // past the window: slots are being reused
        std::vector<float> g[2] = {gradient(s, 0), gradient(s, 1)};
        ASSERT_EQ(w.run(h, g), CGD_OK) << cgd_last_error();
    }
    std::vector<float> g[2] = {gradient(9, 0), gradient(9, 1)};
    const WindowProblem before = w;
    auto unchanged = [&](const std::string &what) {
        EXPECT_EQ(w.param[0], before.param[0]) << what;
        EXPECT_EQ(w.param[1], before.param[1]) << what;
        EXPECT_EQ(w.m1, before.m1) << what;
        EXPECT_EQ(w.history, before.history) << what;
        EXPECT_EQ(w.gram, before.gram) << what;
        EXPECT_EQ(w.identity, before.identity) << what;
        EXPECT_EQ(w.step, before.step) << what;
    };
    const float one = 1.0f;
    ASSERT_EQ(w.run(h, g, &one), CGD_OK);
    unchanged("skip");
    EXPECT_GT(fail_each_allocation([&] { return w.run(h, g); }, unchanged), 0);
    EXPECT_EQ(w.step, before.step + 1);
}

TEST(WindowStep, UncoveredCoordinatesHaveGradientZero) {
    // Tensors on [0, 5) and [6, 9) of 9 coordinates, the window reused from the second step on: coordinate 5
    // holds 0 in every slot, so it never couples to the others' (a stale value there would).
    cgd_block_hparams h = paper_hparams();
    std::vector<float> p0(5, 1.0f), p1(3, 1.0f), m1(9, 0.0f), hist(9, 7.0f); // a stale value in the slot
    m1[5] = 2.0f; // and an M1 there, which a zero gradient only decays
    std::vector<double> gram(1, 0.0);
    double identity = 1.0, step = 0.0;
    float counters[4] = {0, 0, 0, 0};
    for (int s = 0; s < 3; ++s) {
        std::vector<float> g0 = gradient(s, 0), g1 = gradient(s, 1);
        cgd_block_tensor ts[2] = {{p0.data(), g0.data(), 5, 0}, {p1.data(), g1.data(), 3, 6}};
        cgd_window_state st = {9, 1, m1.data(), hist.data(), gram.data(), &identity, &step, counters};
        ASSERT_EQ(cgd_window_step(&h, CGD_FLOAT32, ts, 2, &st, nullptr, nullptr, CGD_CPU), CGD_OK) << cgd_last_error();
        EXPECT_EQ(hist[5], 0.0f);
        EXPECT_FLOAT_EQ(m1[5], 2.0f * (float)std::pow(h.beta1, s + 1));
        double norm = 0.0;
        for (float v : hist) norm += (double)v * v;
        EXPECT_NEAR(gram[0], norm, 1e-9 * norm); // the Gram entry is that of the slot as stored
    }
}

TEST(WindowStep, ArgumentsAreNamedWithTheirValue) {
    cgd_block_hparams h = paper_hparams();
    WindowProblem w(4, 1.0);
    std::vector<float> g[2] = {gradient(0, 0), gradient(0, 1)};
    cgd_block_tensor ts[2] = {{w.param[0].data(), g[0].data(), 5, 0}, {w.param[1].data(), g[1].data(), 3, 4}};
    cgd_window_state st = {8, 4, w.m1.data(), w.history.data(), w.gram.data(), &w.identity, &w.step, w.counters};
    EXPECT_EQ(cgd_window_step(&h, CGD_FLOAT32, ts, 2, &st, nullptr, nullptr, CGD_CPU), CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("tensors[1] covers [4, 7), which overlaps"), std::string::npos);
    ts[1].offset = 5;
    st.window = 0;
    EXPECT_EQ(cgd_window_step(&h, CGD_FLOAT32, ts, 2, &st, nullptr, nullptr, CGD_CPU), CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("state.window = 0 is outside [1, 1024]"), std::string::npos);
    st.window = 4;
    st.gram = nullptr;
    EXPECT_EQ(cgd_window_step(&h, CGD_FLOAT32, ts, 2, &st, nullptr, nullptr, CGD_CPU), CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("state.gram is NULL"), std::string::npos);
    st.gram = w.gram.data();
    w.identity = -1.0;
    EXPECT_EQ(cgd_window_step(&h, CGD_FLOAT32, ts, 2, &st, nullptr, nullptr, CGD_CPU), CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("*state.identity = -1 must be finite and >= 0"), std::string::npos);
    w.identity = 1.0;
    EXPECT_EQ(cgd_window_step(&h, CGD_FLOAT32, ts, 2, &st, nullptr, nullptr, CGD_CUDA), CGD_ERR_UNSUPPORTED);
    EXPECT_EQ(w.step, 0.0); // nothing stepped
}

} // namespace

#ifdef CGD_WITH_CUDA
namespace {

// The cuSOLVER/cuBLAS handles are per host thread. A thread whose first block step is being captured into a CUDA
// graph is told to call cgd_prepare (creating them would allocate and break the capture); once prepared, a step
// captures and replays.
TEST(BlockStepCuda, CaptureNeedsPreparedHandles) {
    CGD_SKIP_UNLESS_RUNNABLE(CGD_CUDA);
    std::thread fresh([] {
        const int64_t block = 4;
        std::mt19937 rng(25);
        Blocked b = make_blocked(block, 1, 1.0f, normal_vector(rng, block));
        std::vector<float> g = normal_vector(rng, block);
        Mirror m{CGD_CUDA};
        cgd_block_tensor t{m.put(b.param.data(), bytes(b.param)), m.put(g.data(), bytes(g)), block, 0};
        cgd_block_state st{block, 1, (float *)m.put(b.m1.data(), bytes(b.m1)), (float *)m.put(b.m2.data(), bytes(b.m2)),
                           (float *)m.put(b.precond.data(), bytes(b.precond)), (float *)m.put(b.eig.data(), bytes(b.eig)),
                           (double *)m.put(&b.step, sizeof b.step), (int32_t *)m.put(b.outcome.data(), bytes(b.outcome)),
                           (float *)m.put(b.counters, sizeof b.counters)};
        cgd_block_hparams h = paper_hparams();
        cudaStream_t stream;
        cudaGraph_t graph;
        ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);
        size_t need = 0;
        ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
        EXPECT_EQ(cgd_block_workspace_size(&h, CGD_FLOAT32, &st, CGD_CUDA, stream, &need), CGD_ERR_CUDA);
        EXPECT_NE(std::string(cgd_last_error()).find("call cgd_prepare"), std::string::npos) << cgd_last_error();
        ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
        cudaGraphDestroy(graph);

        ASSERT_EQ(cgd_prepare(CGD_CUDA), CGD_OK) << cgd_last_error();
        ASSERT_EQ(cgd_block_workspace_size(&h, CGD_FLOAT32, &st, CGD_CUDA, stream, &need), CGD_OK) << cgd_last_error();
        Workspace ws(CGD_CUDA, need);
        ASSERT_EQ(cgd_block_step(&h, CGD_FLOAT32, &t, 1, &st, nullptr, nullptr, ws.data, ws.bytes, CGD_CUDA, stream),
                  CGD_OK) << cgd_last_error(); // the first step refreshes, eagerly
        h.refresh = 0;
        ASSERT_EQ(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal), cudaSuccess);
        EXPECT_EQ(cgd_block_step(&h, CGD_FLOAT32, &t, 1, &st, nullptr, nullptr, ws.data, ws.bytes, CGD_CUDA, stream),
                  CGD_OK) << cgd_last_error();
        ASSERT_EQ(cudaStreamEndCapture(stream, &graph), cudaSuccess);
        cudaGraphExec_t exec;
        ASSERT_EQ(cudaGraphInstantiate(&exec, graph, 0), cudaSuccess);
        for (int i = 0; i < 2; ++i) ASSERT_EQ(cudaGraphLaunch(exec, stream), cudaSuccess);
        ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
        double step = 0;
        ASSERT_EQ(cudaMemcpy(&step, st.step, sizeof step, cudaMemcpyDeviceToHost), cudaSuccess);
        EXPECT_EQ(step, 3.0);
        cudaGraphExecDestroy(exec);
        cudaGraphDestroy(graph);
        cudaStreamDestroy(stream);
    });
    fresh.join();
}

} // namespace
#endif
