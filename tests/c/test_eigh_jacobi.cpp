// The batched Jacobi eigensolver of small blocks (kernels/eigh_cpu.h, cgd_eigh_jacobi_batch) against matrices of
// known spectrum built in float64: repeated, tiny, zero and negative eigenvalues, every block side it serves, a
// partly filled group and a skipped lane. Eigenvalues within float rounding of the matrix's norm, ascending;
// eigenvectors orthonormal and reconstructing the matrix.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

extern "C" {
#include "eigh_cpu.h"
}

namespace {

// A random orthogonal B x B matrix (Gram-Schmidt of a Gaussian one, in double), row-major.
std::vector<double> orthogonal(int B, std::mt19937 &rng) {
    std::normal_distribution<double> normal;
    std::vector<double> q((size_t)B * B);
    for (double &x : q) x = normal(rng);
    for (int k = 0; k < B; ++k) {
        for (int j = 0; j < k; ++j) {
            double dot = 0;
            for (int i = 0; i < B; ++i) dot += q[(size_t)i * B + k] * q[(size_t)i * B + j];
            for (int i = 0; i < B; ++i) q[(size_t)i * B + k] -= dot * q[(size_t)i * B + j];
        }
        double norm = 0;
        for (int i = 0; i < B; ++i) norm += q[(size_t)i * B + k] * q[(size_t)i * B + k];
        for (int i = 0; i < B; ++i) q[(size_t)i * B + k] /= std::sqrt(norm);
    }
    return q;
}

// Spectra that stress the solver: distinct, repeated (a covariance of low rank has many equal zeros), tiny next to
// large, negative (a centered moment's rounding), at 1e30 and at 1e-35 (the convergence test must neither
// overflow nor vanish), and a diagonal matrix (nothing to rotate).
std::vector<double> spectrum(int kind, int B, std::mt19937 &rng) {
    std::uniform_real_distribution<double> u(0.5, 2.0);
    std::vector<double> lambda(B);
    for (int k = 0; k < B; ++k) {
        switch (kind) {
        case 0: lambda[k] = u(rng) * (k + 1); break;
        case 1: lambda[k] = k < B / 2 ? 0.0 : 3.0; break;
        case 2: lambda[k] = k == 0 ? 1e3 : 1e-6 * u(rng); break;
        case 3: lambda[k] = (k % 2 ? -1.0 : 1.0) * u(rng); break;
        case 4: lambda[k] = 1e30 * u(rng) * (k + 1); break;  /* squares past float's range */
        default: lambda[k] = 1e-35 * u(rng) * (k + 1); break; /* entries near float's subnormals */
        }
    }
    return lambda;
}

TEST(EighJacobi, KnownSpectraOfEveryServedSideToFloatRounding) {
    std::mt19937 rng(31);
    const int L = CGD_JACOBI_LANES;
    for (int B : {1, 2, 3, 5, 8, 13, 16, 24, 32}) {
        for (int count : {L, L - 3}) {
            std::vector<std::vector<float>> mats(count);
            std::vector<std::vector<double>> lambdas(count);
            std::vector<const float *> ptrs(count);
            for (int l = 0; l < count; ++l) {
                const std::vector<double> q = orthogonal(B, rng);
                const bool diagonal = l % 7 == 6;
                lambdas[l] = spectrum(diagonal ? 0 : l % 6, B, rng);
                mats[l].resize((size_t)B * B);
                for (int i = 0; i < B; ++i)
                    for (int j = 0; j < B; ++j) {
                        double a = 0;
                        for (int k = 0; k < B; ++k)
                            a += diagonal ? (i == j && j == k ? lambdas[l][k] : 0.0)
                                          : q[(size_t)i * B + k] * lambdas[l][k] * q[(size_t)j * B + k];
                        mats[l][(size_t)i * B + j] = (float)a;
                    }
                // Symmetric to the bit, as the block kernel's C is.
                for (int i = 0; i < B; ++i)
                    for (int j = 0; j < i; ++j) mats[l][(size_t)i * B + j] = mats[l][(size_t)j * B + i];
                ptrs[l] = mats[l].data();
            }
            ptrs[1 % count] = nullptr; // a skipped lane: nothing written, not converged
            std::vector<float> work(2 * (size_t)L * B * B), w((size_t)L * B, -7.0f), vecs((size_t)L * B * B);
            std::vector<int> converged(L, -1);
            cgd_eigh_jacobi_batch(ptrs.data(), B, count, work.data(), w.data(), vecs.data(), converged.data());
            for (int l = 0; l < count; ++l) {
                SCOPED_TRACE("B " + std::to_string(B) + " lane " + std::to_string(l));
                if (!ptrs[l]) {
                    EXPECT_EQ(converged[l], 0);
                    EXPECT_EQ(w[(size_t)l * B], -7.0f);
                    continue;
                }
                ASSERT_EQ(converged[l], 1);
                std::vector<double> want = lambdas[l];
                std::sort(want.begin(), want.end());
                double norm = 0;
                for (double x : want) norm = std::max(norm, std::fabs(x));
                const float *got = &w[(size_t)l * B], *v = &vecs[(size_t)l * B * B];
                for (int k = 0; k < B; ++k) {
                    EXPECT_NEAR(got[k], want[k], 8 * B * 1.2e-7 * norm) << "eigenvalue " << k;
                    if (k) EXPECT_LE(got[k - 1], got[k]);
                }
                for (int a = 0; a < B; ++a)
                    for (int b = 0; b < B; ++b) {
                        double dot = 0, rebuilt = 0;
                        for (int i = 0; i < B; ++i) dot += (double)v[(size_t)a * B + i] * v[(size_t)b * B + i];
                        for (int k = 0; k < B; ++k) rebuilt += (double)v[(size_t)k * B + a] * got[k] * v[(size_t)k * B + b];
                        EXPECT_NEAR(dot, a == b ? 1.0 : 0.0, 8 * B * 1.2e-7) << a << ", " << b;
                        EXPECT_NEAR(rebuilt, mats[l][(size_t)a * B + b], 8 * B * 1.2e-7 * norm) << a << ", " << b;
                    }
            }
        }
    }
}

} // namespace
