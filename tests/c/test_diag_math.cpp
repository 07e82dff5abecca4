// The vectorisable x^a of the diagonal metric (kernels/diag_math.h, cgd_powf_poly) against float64 pow: within
// 1 ulp of the correctly rounded float everywhere tried (and nearly always equal to it), exact at the ends.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>

#include "diag_math.h"

namespace {

// Distance in representable floats between two positive finite floats.
int64_t ulps_apart(float a, float b) {
    int32_t ia, ib;
    std::memcpy(&ia, &a, 4);
    std::memcpy(&ib, &b, 4);
    return std::llabs((long long)ia - (long long)ib);
}

TEST(DiagMath, PowerPolynomialIsWithinOneUlpOfFloat64Pow) {
    std::mt19937 rng(11);
    std::uniform_real_distribution<double> exponent(-149.0, 127.9), mantissa(1.0, 2.0);
    int64_t worst = 0, off = 0, total = 0;
    for (float a : {0.1f, 0.23f, 0.37f, 0.4f, 0.5f, 0.7f, 0.99f, 1.0f}) {
        for (int i = 0; i < 200000; ++i) {
            const float x = (float)(mantissa(rng) * std::exp2(std::floor(exponent(rng))));
            if (!(x > 0.0f)) continue;
            const float want = (float)std::pow((double)x, (double)a);
            const float got = cgd_powf_poly(x, a);
            const int64_t d = ulps_apart(got, want);
            worst = d > worst ? d : worst;
            off += d != 0;
            ++total;
        }
    }
    EXPECT_LE(worst, 1);
    EXPECT_LT((double)off / (double)total, 1e-3) << off << " of " << total << " not correctly rounded";
}

TEST(DiagMath, PowerPolynomialEndsAndSpecialValues) {
    for (float x : {1e-45f, 1.17549435e-38f, 1.0f, 3.0e38f})
        EXPECT_EQ(cgd_powf_poly(x, 1.0f), x) << x; // a = 1 returns x exactly
    EXPECT_EQ(cgd_powf_poly(0.0f, 0.4f), 0.0f);
    EXPECT_EQ(cgd_powf_poly(INFINITY, 0.4f), INFINITY);
    EXPECT_TRUE(std::isnan(cgd_powf_poly(NAN, 0.4f)));
    EXPECT_TRUE(std::isnan(cgd_powf_poly(-2.0f, 0.4f)));
    EXPECT_EQ(cgd_powf_poly(1.0f, 0.37f), 1.0f);
}

} // namespace
