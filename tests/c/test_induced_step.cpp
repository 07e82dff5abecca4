// The C API's induced-metric calls (cgd_induced_norm, cgd_induced_rate, cgd_induced_step) against a float64
// scalar reference of the paper's Algorithm 1 with the RMS metric, on the CPU and, when a GPU is present, on
// CUDA; the norm's run-to-run reproducibility; skip; and argument errors.
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

// Two tensors; the second is longer than one CUDA chunk so the norm crosses blocks.
const int64_t kNumel[2] = {37, 70000};

// Parameters, gradients and state of one real type (float: float32 parameters; double: float64 ones).
template <typename T> struct StateT {
    std::vector<T> p[2], g[2], m1[2], m2[2];
    double step[2] = {0, 0}, norm_step = 0;
    double sum = 0, ema = 0, rate = 0;
};
using State = StateT<float>;

template <typename T = float> StateT<T> make_state() {
    StateT<T> s;
    std::mt19937 rng(3);
    std::normal_distribution<float> normal;
    for (int k = 0; k < 2; ++k) {
        for (int64_t i = 0; i < kNumel[k]; ++i) s.p[k].push_back(normal(rng));
        s.g[k].assign(kNumel[k], T(0));
        s.m1[k].assign(kNumel[k], T(0));
        s.m2[k].assign(kNumel[k], T(0));
    }
    return s;
}

template <typename T> void new_gradient(StateT<T> &s, int step) {
    std::mt19937 rng(50 + step);
    std::normal_distribution<float> normal;
    for (int k = 0; k < 2; ++k)
        for (T &x : s.g[k]) x = T(0.1) * normal(rng);
}

template <typename T> cgd_dtype dtype_of() { return sizeof(T) == 8 ? CGD_FLOAT64 : CGD_FLOAT32; }

cgd_induced_hparams rms_hparams() {
    cgd_induced_hparams h{};
    h.lr = 0.01;
    h.momentum = 0.9;
    h.beta_rms = 0.99;
    h.eps = 1e-8;
    h.weight_decay = 0.01;
    h.gamma = CGD_GAMMA_RMS;
    return h;
}

const cgd_induced_metric kMetric = {1e-4, 0.8, CGD_EMBED_LOSS};

// One step of all three calls on `device` (CUDA: state copied there and back); lr_device, when given, travels to
// the device and replaces hparams.lr (which is then set to an ignored value).
template <typename T>
cgd_status run(cgd_device device, StateT<T> &s, float skip_value = 0.0f, float *lr_device = nullptr) {
    cgd_induced_hparams h = rms_hparams();
    std::vector<void *> allocs;
    auto put = [&](void *host, size_t bytes) -> void * {
        if (device == CGD_CPU) return host;
#ifdef CGD_WITH_CUDA
        void *d = nullptr;
        EXPECT_EQ(cudaMalloc(&d, bytes), cudaSuccess);
        EXPECT_EQ(cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice), cudaSuccess);
        allocs.push_back(d);
        return d;
#else
        return host;
#endif
    };
    auto get = [&](void *host, const void *dev, size_t bytes) {
#ifdef CGD_WITH_CUDA
        if (device == CGD_CUDA) EXPECT_EQ(cudaMemcpy(host, dev, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
#endif
        (void)host, (void)dev, (void)bytes;
    };
    cgd_diag_tensor ts[2];
    for (int k = 0; k < 2; ++k) {
        size_t b = (size_t)kNumel[k] * sizeof(T);
        ts[k] = {put(s.p[k].data(), b), put(s.g[k].data(), b), put(s.m1[k].data(), b), put(s.m2[k].data(), b),
                 (double *)put(&s.step[k], 8), kNumel[k]};
    }
    s.sum = 0.0;
    double *sum = (double *)put(&s.sum, 8), *ema = (double *)put(&s.ema, 8);
    double *ns = (double *)put(&s.norm_step, 8);
    double *rate = (double *)put(&s.rate, 8);
    const float *skip = skip_value != 0.0f ? (const float *)put(&skip_value, 4) : nullptr;
    if (lr_device) {
        h.lr = 5.0;
        h.lr_device = (const float *)put(lr_device, 4);
    }
    size_t need = 0;
    EXPECT_EQ(cgd_induced_norm_workspace_size(ts, 2, device, &need), CGD_OK);
    Workspace ws(device, need);
    const cgd_dtype dtype = dtype_of<T>();
    cgd_status st = cgd_induced_norm(&h, dtype, ts, 2, sum, nullptr, skip, ws.data, ws.bytes, device, nullptr);
    if (st == CGD_OK) st = cgd_induced_rate(&kMetric, sum, nullptr, ema, ns, rate, skip, device, nullptr);
    if (st == CGD_OK) st = cgd_induced_step(&h, dtype, ts, 2, rate, nullptr, skip, device, nullptr);
    for (int k = 0; k < 2; ++k) {
        size_t b = (size_t)kNumel[k] * sizeof(T);
        get(s.p[k].data(), ts[k].param, b);
        get(s.m1[k].data(), ts[k].exp_avg, b);
        get(s.m2[k].data(), ts[k].exp_avg_sq, b);
        get(&s.step[k], ts[k].step, 8);
    }
    get(&s.sum, sum, 8);
    get(&s.ema, ema, 8);
    get(&s.norm_step, ns, 8);
    get(&s.rate, rate, 8);
#ifdef CGD_WITH_CUDA
    for (void *d : allocs) cudaFree(d);
#endif
    return st;
}

class InducedStep : public ::testing::TestWithParam<cgd_device> {
  protected:
    void SetUp() override { CGD_SKIP_UNLESS_RUNNABLE(GetParam()); }
};

// Ten steps against the float64 reference: within float32 rounding for float32 parameters, within float64
// rounding for float64 ones (tolerances relative to the sum, absolute for the rate and the parameters).
template <typename T> void check_reference(cgd_device device, double sum_tol, double rate_tol, double p_tol) {
    StateT<T> s = make_state<T>();
    const cgd_induced_hparams h = rms_hparams();
    std::vector<double> p[2], m1[2], m2[2];
    for (int k = 0; k < 2; ++k) {
        p[k].assign(s.p[k].begin(), s.p[k].end());
        m1[k].assign(kNumel[k], 0.0);
        m2[k].assign(kNumel[k], 0.0);
    }
    double v = 0.0;
    for (int t = 1; t <= 10; ++t) {
        new_gradient(s, t);
        ASSERT_EQ(run(device, s), CGD_OK) << cgd_last_error();
        double sum = 0.0;
        std::vector<double> gamma_inv[2];
        for (int k = 0; k < 2; ++k)
            for (int64_t i = 0; i < kNumel[k]; ++i) {
                double g = s.g[k][i];
                m2[k][i] = h.beta_rms * m2[k][i] + (1 - h.beta_rms) * g * g;
                gamma_inv[k].push_back(1 / (std::sqrt(m2[k][i] / (1 - std::pow(h.beta_rms, t))) + h.eps));
                sum += g * g * gamma_inv[k].back();
            }
        v = kMetric.beta * v + (1 - kMetric.beta) * kMetric.xi * sum;
        double r = 1 / (1 + std::fabs(v / (1 - std::pow(kMetric.beta, t))));
        EXPECT_NEAR(s.sum, sum, sum_tol * sum);
        EXPECT_NEAR(s.rate, r, rate_tol);
        double worst = 0.0;
        for (int k = 0; k < 2; ++k)
            for (int64_t i = 0; i < kNumel[k]; ++i) {
                m1[k][i] = h.momentum * m1[k][i] + (1 - h.momentum) * s.g[k][i];
                p[k][i] = p[k][i] * (1 - h.lr * h.weight_decay) -
                          h.lr * r * gamma_inv[k][i] * m1[k][i] / (1 - std::pow(h.momentum, t));
                worst = std::max(worst, std::fabs(p[k][i] - s.p[k][i]));
            }
        ASSERT_LT(worst, p_tol) << "step " << t;
    }
    EXPECT_EQ(s.norm_step, 10.0);
    EXPECT_EQ(s.step[0], 10.0);
}

TEST_P(InducedStep, MatchesFloat64Reference) { check_reference<float>(GetParam(), 1e-4, 1e-5, 2e-5); }

TEST_P(InducedStep, Float64ParametersMatchTheReferenceToFloat64Rounding) {
    check_reference<double>(GetParam(), 1e-12, 1e-13, 1e-12);
}

TEST_P(InducedStep, NormIsReproducibleAndSkipChangesNothing) {
    State a = make_state(), b = make_state();
    new_gradient(a, 1);
    new_gradient(b, 1);
    ASSERT_EQ(run(GetParam(), a), CGD_OK);
    ASSERT_EQ(run(GetParam(), b), CGD_OK);
    EXPECT_EQ(a.sum, b.sum); // bitwise: the summation order is fixed
    EXPECT_EQ(a.p[1], b.p[1]);
    State before = a;
    ASSERT_EQ(run(GetParam(), a, 1.0f), CGD_OK) << cgd_last_error();
    EXPECT_EQ(a.p[1], before.p[1]);
    EXPECT_EQ(a.m2[1], before.m2[1]);
    EXPECT_EQ(a.ema, before.ema);
    EXPECT_EQ(a.norm_step, before.norm_step);
    EXPECT_EQ(a.step[1], before.step[1]);
}

TEST_P(InducedStep, DeviceLrReplacesLr) {
    State a = make_state(), b = make_state();
    for (int t = 1; t <= 3; ++t) {
        new_gradient(a, t);
        new_gradient(b, t);
        float lr = (float)rms_hparams().lr; // what the kernels compute with either way
        ASSERT_EQ(run(GetParam(), a), CGD_OK) << cgd_last_error();
        ASSERT_EQ(run(GetParam(), b, 0.0f, &lr), CGD_OK) << cgd_last_error();
        ASSERT_EQ(a.p[0], b.p[0]);
        ASSERT_EQ(a.p[1], b.p[1]);
    }
}

// The CPU norm allocates its partial sums before any M2 advances: out of memory, nothing changed.
TEST(InducedStepFaults, NormWithoutScratchChangesNothing) {
    State s = make_state();
    new_gradient(s, 1);
    const cgd_induced_hparams h = rms_hparams();
    cgd_diag_tensor ts[2];
    for (int k = 0; k < 2; ++k)
        ts[k] = {s.p[k].data(), s.g[k].data(), s.m1[k].data(), s.m2[k].data(), &s.step[k], kNumel[k]};
    const State before = s;
    auto norm = [&] {
        return cgd_induced_norm(&h, CGD_FLOAT32, ts, 2, &s.sum, nullptr, nullptr, nullptr, 0, CGD_CPU, nullptr);
    };
    auto unchanged = [&](const std::string &what) {
        EXPECT_EQ(s.m2[0], before.m2[0]) << what;
        EXPECT_EQ(s.m2[1], before.m2[1]) << what;
        EXPECT_EQ(s.sum, before.sum) << what;
    };
    EXPECT_GT(fail_each_allocation(norm, unchanged), 0);
    EXPECT_NE(s.m2[1], before.m2[1]);
}

INSTANTIATE_TEST_SUITE_P(Devices, InducedStep, ::testing::Values(CGD_CPU, CGD_CUDA),
                         [](const ::testing::TestParamInfo<cgd_device> &info) {
                             return std::string(info.param == CGD_CPU ? "CPU" : "CUDA");
                         });

TEST(InducedStepErrors, ArgumentsAreNamedWithTheirValue) {
    State s = make_state();
    cgd_induced_hparams h = rms_hparams();
    cgd_diag_tensor t = {s.p[0].data(), s.g[0].data(), s.m1[0].data(), nullptr, &s.step[0], kNumel[0]};
    double sum = 0, ema = 0, rate = 0, ns = 0;
    EXPECT_EQ(cgd_induced_norm(&h, CGD_FLOAT32, &t, 1, &sum, nullptr, nullptr, nullptr, 0, CGD_CPU, nullptr),
              CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("tensors[0].exp_avg_sq is NULL"), std::string::npos);
    h.momentum = 1.0;
    EXPECT_EQ(cgd_induced_step(&h, CGD_FLOAT32, &t, 1, &rate, nullptr, nullptr, CGD_CPU, nullptr),
              CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("cgd_induced_step: hparams.momentum = 1"), std::string::npos);
    cgd_induced_metric m = {0.1, 0.8, CGD_EMBED_LOG_LOSS};
    EXPECT_EQ(cgd_induced_rate(&m, &sum, nullptr, &ema, &ns, &rate, nullptr, CGD_CPU, nullptr),
              CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("loss is NULL"), std::string::npos);
    // A non-positive loss has no logarithm: the rate is NaN (cgd.h), not the ascent step loss / (loss^2 + v) < 0.
    const double negative_loss = -1.0;
    EXPECT_EQ(cgd_induced_rate(&m, &sum, &negative_loss, &ema, &ns, &rate, nullptr, CGD_CPU, nullptr), CGD_OK);
    EXPECT_TRUE(std::isnan(rate)) << rate;
    m.xi = -2;
    EXPECT_EQ(cgd_induced_rate(&m, &sum, nullptr, &ema, &ns, &rate, nullptr, CGD_CPU, nullptr),
              CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("hparams.xi = -2"), std::string::npos);
}

} // namespace
