// The batched Jacobi eigensolver of small blocks (kernels/eigh_cpu.h, cgd_eigh_jacobi_lanes) against matrices of
// known spectrum built in float64: repeated, tiny, zero and negative eigenvalues, every block side it serves (odd
// ones through the round-robin order's idle index) and a partly filled group whose idle lanes hold I. Eigenvalues
// within float rounding of the matrix's norm; eigenvectors orthonormal and reconstructing the matrix.
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
            // Lane-interleaved as the solver takes them; the lanes past count hold I, as the block kernel's idle ones.
            const size_t nn = (size_t)B * B;
            std::vector<float> a(nn * L), v(nn * L);
            for (size_t e = 0; e < nn; ++e)
                for (int l = 0; l < L; ++l) a[e * L + l] = l < count ? mats[l][e] : (float)(e % (B + 1) == 0);
            std::vector<int> converged(L, -1);
            cgd_eigh_jacobi_lanes(B, a.data(), v.data(), converged.data());
            for (int l = count; l < L; ++l) {
                EXPECT_EQ(converged[l], 1);
                for (size_t e = 0; e < nn; ++e) EXPECT_EQ(a[e * L + l], (float)(e % (B + 1) == 0)) << "idle lane";
            }
            for (int l = 0; l < count; ++l) {
                SCOPED_TRACE("B " + std::to_string(B) + " lane " + std::to_string(l) + " of " + std::to_string(count));
                // eigenvalue k on the diagonal, its eigenvector column k of v: put them in ascending order
                std::vector<int> order(B);
                for (int k = 0; k < B; ++k) order[k] = k;
                std::sort(order.begin(), order.end(), [&](int x, int y) {
                    return a[((size_t)x * B + x) * L + l] < a[((size_t)y * B + y) * L + l];
                });
                std::vector<float> got_w(B), got_v(nn);
                for (int k = 0; k < B; ++k) {
                    got_w[k] = a[((size_t)order[k] * B + order[k]) * L + l];
                    for (int i = 0; i < B; ++i) got_v[(size_t)k * B + i] = v[((size_t)i * B + order[k]) * L + l];
                }
                ASSERT_EQ(converged[l], 1);
                std::vector<double> want = lambdas[l];
                std::sort(want.begin(), want.end());
                double norm = 0;
                for (double x : want) norm = std::max(norm, std::fabs(x));
                const float *got = got_w.data(), *vec = got_v.data();
                for (int k = 0; k < B; ++k) EXPECT_NEAR(got[k], want[k], 8 * B * 1.2e-7 * norm) << "eigenvalue " << k;
                for (int r = 0; r < B; ++r)
                    for (int c = 0; c < B; ++c) {
                        double dot = 0, rebuilt = 0;
                        for (int i = 0; i < B; ++i) dot += (double)vec[(size_t)r * B + i] * vec[(size_t)c * B + i];
                        for (int k = 0; k < B; ++k)
                            rebuilt += (double)vec[(size_t)k * B + r] * got[k] * vec[(size_t)k * B + c];
                        EXPECT_NEAR(dot, r == c ? 1.0 : 0.0, 8 * B * 1.2e-7) << r << ", " << c;
                        EXPECT_NEAR(rebuilt, mats[l][(size_t)r * B + c], 8 * B * 1.2e-7 * norm) << r << ", " << c;
                    }
            }
        }
    }
}

// The tridiagonal solver of Lanczos's small problem: T v = lambda v and V orthonormal to double rounding, on the
// second-difference matrix (eigenvalues 2 - 2 cos(k pi / (n + 1)), known in closed form), a random one, one that
// splits into two equal blocks (every eigenvalue repeated), a diagonal one, and entries at 1e150 and 1e-150.
TEST(TridiagonalEigh, SatisfiesTheEigenEquationsOnKnownAndStressingMatrices) {
    std::mt19937 rng(5);
    std::normal_distribution<double> normal;
    for (int n : {1, 2, 3, 7, 16, 40}) {
        for (int kind = 0; kind < 6; ++kind) {
            SCOPED_TRACE("n " + std::to_string(n) + " kind " + std::to_string(kind));
            std::vector<double> d(n), e(n, 0.0);
            for (int i = 0; i < n; ++i) {
                d[i] = kind == 0 ? 2.0 : normal(rng);
                if (i + 1 < n) e[i] = kind == 0 ? -1.0 : kind == 3 ? 0.0 : normal(rng);
            }
            if (kind == 2) /* two copies of one block, uncoupled */
                for (int i = 0; i < n / 2; ++i) {
                    d[n / 2 + i] = d[i];
                    if (i + 1 < n / 2) e[n / 2 + i] = e[i];
                    if (n / 2 >= 1 && n / 2 < n) e[n / 2 - 1] = 0.0;
                }
            const double scale = kind == 4 ? 1e150 : kind == 5 ? 1e-150 : 1.0;
            for (int i = 0; i < n; ++i) {
                d[i] *= scale;
                e[i] *= scale;
            }
            const std::vector<double> d0 = d, e0 = e;
            std::vector<double> z((size_t)n * n);
            ASSERT_EQ(cgd_tridiagonal_eigh(n, d.data(), e.data(), z.data()), 0);
            double norm = 0.0;
            for (int i = 0; i < n; ++i) norm = std::max(norm, std::fabs(d0[i]) + 2 * std::fabs(e0[i]));
            for (int j = 0; j < n; ++j) {
                const double *v = &z[(size_t)j * n]; /* eigenvector j, contiguous */
                for (int i = 0; i < n; ++i) { /* (T v_j)_i - lambda_j v_ji */
                    double tv = d0[i] * v[i];
                    if (i > 0) tv += e0[i - 1] * v[i - 1];
                    if (i + 1 < n) tv += e0[i] * v[i + 1];
                    EXPECT_NEAR(tv, d[j] * v[i], 64 * n * 2.2e-16 * norm) << i << ", " << j;
                }
                for (int k = 0; k < n; ++k) {
                    double dot = 0.0;
                    for (int i = 0; i < n; ++i) dot += v[i] * z[(size_t)k * n + i];
                    EXPECT_NEAR(dot, j == k ? 1.0 : 0.0, 64 * n * 2.2e-16) << j << ", " << k;
                }
            }
            if (kind == 0) {
                std::vector<double> got = d, want(n);
                std::sort(got.begin(), got.end());
                for (int k = 0; k < n; ++k) want[k] = 2.0 - 2.0 * std::cos((k + 1) * M_PI / (n + 1));
                std::sort(want.begin(), want.end());
                for (int k = 0; k < n; ++k) EXPECT_NEAR(got[k], want[k], 32 * n * 2.2e-16) << k;
            }
        }
    }
    std::vector<double> d = {1.0, NAN}, e = {0.5, 0.0}, z(4);
    EXPECT_EQ(cgd_tridiagonal_eigh(2, d.data(), e.data(), z.data()), 1) << "a NaN is refused";
}

} // namespace
