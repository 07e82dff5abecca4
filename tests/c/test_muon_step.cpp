// The C API's Muon step (cgd_muon_step) against a float64 Newton-Schulz reference on a tall and a wide matrix, on
// the CPU and on CUDA, its skip flag, and its argument errors.
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "cgd.h"
#include "test_support.h"

namespace {

using Matrix = std::vector<double>; // row-major

// X (m x n) <- NS(X) in float64, from the published quintic iteration.
Matrix newton_schulz(Matrix x, int m, int n, const cgd_muon_hparams &h) {
    double norm = 0.0;
    for (double v : x) norm += v * v;
    norm = std::max(std::sqrt(norm), h.eps);
    for (double &v : x) v /= norm;
    for (int s = 0; s < h.ns_steps; ++s) {
        Matrix a(m * m, 0.0), g(m * m, 0.0), y(m * n, 0.0);
        for (int i = 0; i < m; ++i)
            for (int j = 0; j < m; ++j)
                for (int k = 0; k < n; ++k) a[i * m + j] += x[i * n + k] * x[j * n + k];
        for (int i = 0; i < m; ++i)
            for (int j = 0; j < m; ++j) {
                double aa = 0.0;
                for (int k = 0; k < m; ++k) aa += a[i * m + k] * a[k * m + j];
                g[i * m + j] = h.ns_b * a[i * m + j] + h.ns_c * aa;
            }
        for (int i = 0; i < m; ++i)
            for (int j = 0; j < n; ++j) {
                double gx = 0.0;
                for (int k = 0; k < m; ++k) gx += g[i * m + k] * x[k * n + j];
                y[i * n + j] = h.ns_a * x[i * n + j] + gx;
            }
        x = y;
    }
    return x;
}

cgd_muon_hparams defaults() {
    cgd_muon_hparams h{};
    h.lr = 0.05;
    h.momentum = 0.95;
    h.weight_decay = 0.1;
    h.ns_a = 3.4445;
    h.ns_b = -4.7750;
    h.ns_c = 2.0315;
    h.eps = 1e-7;
    h.ns_steps = 5;
    h.nesterov = 1;
    h.power = 0.5;
    return h;
}

class MuonStep : public ::testing::TestWithParam<cgd_device> {};

TEST_P(MuonStep, Float64MatchesTheReferenceOnTallAndWideMatrices) {
    const cgd_device device = GetParam();
    CGD_SKIP_UNLESS_RUNNABLE(device);
    for (int scale = 0; scale < 2; ++scale)
        for (auto [rows, cols] : {std::pair{5, 9}, std::pair{9, 5}}) {
            SCOPED_TRACE(std::to_string(rows) + " x " + std::to_string(cols) + (scale ? ", match_rms_adamw" : ""));
            cgd_muon_hparams h = defaults();
            h.scale = scale;
            std::mt19937 rng(rows);
            std::normal_distribution<double> normal;
            const int n = rows * cols;
            std::vector<double> p(n), g(n), buf(n, 0.0);
            for (double &v : p) v = normal(rng);
            for (double &v : g) v = normal(rng);
            const std::vector<double> p0 = p;
            {
                Mirror m{device};
                cgd_muon_tensor t{m.put(p.data(), bytes(p)), m.put(g.data(), bytes(g)), m.put(buf.data(), bytes(buf)),
                                  rows, cols};
                size_t need = 0;
                ASSERT_EQ(cgd_muon_workspace_size(&h, CGD_FLOAT64, &t, 1, device, nullptr, &need), CGD_OK)
                    << cgd_last_error();
                Workspace ws(device, need);
                ASSERT_EQ(cgd_muon_step(&h, CGD_FLOAT64, &t, 1, nullptr, nullptr, ws.data, ws.bytes, device, nullptr),
                          CGD_OK)
                    << cgd_last_error();
            }
            // B = (1 - mu) g; F = g + mu (B - g); NS on the wide orientation.
            const bool tall = rows > cols;
            const int m = tall ? cols : rows, w = tall ? rows : cols;
            Matrix x(n);
            for (int i = 0; i < rows; ++i)
                for (int j = 0; j < cols; ++j) {
                    const double b = (1 - h.momentum) * g[i * cols + j];
                    EXPECT_NEAR(buf[i * cols + j], b, 1e-15);
                    x[tall ? j * rows + i : i * cols + j] = g[i * cols + j] + h.momentum * (b - g[i * cols + j]);
                }
            const Matrix o = newton_schulz(x, m, w, h);
            const double s = scale ? 0.2 * std::sqrt((double)std::max(rows, cols))
                                   : std::sqrt(std::max(1.0, (double)rows / cols));
            for (int i = 0; i < rows; ++i)
                for (int j = 0; j < cols; ++j) {
                    const double expected = p0[i * cols + j] * (1 - h.lr * h.weight_decay) -
                                            h.lr * s * o[tall ? j * rows + i : i * cols + j];
                    ASSERT_NEAR(p[i * cols + j], expected, 1e-12) << i << ", " << j;
                }
        }
}

INSTANTIATE_TEST_SUITE_P(Devices, MuonStep, ::testing::Values(CGD_CPU, CGD_CUDA),
                         [](const ::testing::TestParamInfo<cgd_device> &info) {
                             return std::string(info.param == CGD_CPU ? "CPU" : "CUDA");
                         });

TEST(MuonArguments, NonzeroSkipChangesNothingAndBadArgumentsAreNamed) {
    cgd_muon_hparams h = defaults();
    std::vector<float> p(12, 1.0f), g(12, 0.5f), buf(12, 0.0f);
    cgd_muon_tensor t{p.data(), g.data(), buf.data(), 3, 4};
    const float skip = 1.0f;
    ASSERT_EQ(cgd_muon_step(&h, CGD_FLOAT32, &t, 1, nullptr, &skip, nullptr, 0, CGD_CPU, nullptr), CGD_OK);
    EXPECT_EQ(p, std::vector<float>(12, 1.0f));
    EXPECT_EQ(buf, std::vector<float>(12, 0.0f));
    h.ns_steps = 100;
    EXPECT_EQ(cgd_muon_step(&h, CGD_FLOAT32, &t, 1, nullptr, nullptr, nullptr, 0, CGD_CPU, nullptr),
              CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("ns_steps = 100"), std::string::npos) << cgd_last_error();
    h = defaults();
    h.scale = 7;
    EXPECT_EQ(cgd_muon_step(&h, CGD_FLOAT32, &t, 1, nullptr, nullptr, nullptr, 0, CGD_CPU, nullptr),
              CGD_ERR_INVALID_ARGUMENT);
    h = defaults();
    h.power = 0.4;
    EXPECT_EQ(cgd_muon_step(&h, CGD_FLOAT32, &t, 1, nullptr, nullptr, nullptr, 0, CGD_CPU, nullptr),
              CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("needs solver = CGD_MUON_EIGH"), std::string::npos)
        << cgd_last_error();
    h.solver = CGD_MUON_EIGH;
    EXPECT_EQ(cgd_muon_step(&h, CGD_FLOAT32, &t, 1, nullptr, nullptr, nullptr, 0, CGD_CPU, nullptr),
              CGD_ERR_INVALID_ARGUMENT)
        << "the eigen route needs a failure counter";
    h = defaults();
    t.rows = 0;
    EXPECT_EQ(cgd_muon_step(&h, CGD_FLOAT32, &t, 1, nullptr, nullptr, nullptr, 0, CGD_CPU, nullptr),
              CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("tensors[0] is 0 x 4"), std::string::npos) << cgd_last_error();
    t.rows = 3;
    EXPECT_NE(cgd_muon_step(&h, CGD_FLOAT32, &t, 1, nullptr, nullptr, nullptr, 0, CGD_CUDA, nullptr), CGD_OK)
        << "host pointers and no workspace on CUDA";
    EXPECT_EQ(p, std::vector<float>(12, 1.0f)) << "a refused call changes nothing";
}

} // namespace
