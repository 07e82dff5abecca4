// The vectorisable x^a of the diagonal metric (kernels/diag_math.h, cgd_powf_poly, and v x^a, cgd_powf_times, for
// the negative exponents of the step's product) against float64 pow: within the stated 4e-7 relative everywhere
// tried, subnormal inputs and results included, exact at the ends.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <initializer_list>
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

TEST(DiagMath, PowerPolynomialIsWithinItsBoundOfFloat64Pow) {
    std::mt19937 rng(11);
    std::uniform_real_distribution<double> exponent(-149.0, 127.9), mantissa(1.0, 2.0);
    double worst = 0.0;
    int64_t worst_ulps = 0;
    for (float a : {0.1f, 0.23f, 0.37f, 0.4f, 0.5f, 0.7f, 0.99f, 0.999999f}) {
        for (int i = 0; i < 200000; ++i) {
            const float x = (float)(mantissa(rng) * std::exp2(std::floor(exponent(rng))));
            if (!(x > 0.0f)) continue;
            const double want = std::pow((double)x, (double)a);
            const float got = cgd_powf_poly(x, a);
            if (want >= 1.17549435e-38) { /* relative error where the result is normal */
                const double rel = std::fabs((double)got - want) / want;
                worst = rel > worst ? rel : worst;
            }
            const int64_t d = ulps_apart(got, (float)want);
            worst_ulps = d > worst_ulps ? d : worst_ulps;
        }
    }
    EXPECT_LE(worst, 4e-7);
    EXPECT_LE(worst_ulps, 4);
}

struct ScaledPowerSweep {
    double worst = 0.0;
    int64_t overflowed = 0, underflowed = 0;
};

// got(x, a, v) against float64 v x^(sign a) for x = m 2^k (m in [1, 2), k from lowest_exponent to 127) and v of
// either sign over 80 binades, 200,000 draws per a: Inf of v's sign beyond float (never a finite garbage value),
// the relative error where the result is normal, and below that the 4e-7 bound plus the half subnormal ulp of the
// one rounding to the subnormal grid.
template <typename Got>
ScaledPowerSweep sweep_scaled_power(unsigned seed, double lowest_exponent, std::initializer_list<float> as, double sign,
                                    Got got) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<double> exponent(lowest_exponent, 127.9), mantissa(1.0, 2.0), scale(-40.0, 40.0);
    ScaledPowerSweep out;
    for (float a : as) {
        for (int i = 0; i < 200000; ++i) {
            const float x = (float)(mantissa(rng) * std::exp2(std::floor(exponent(rng))));
            const float v = (float)((i % 2 ? -1.0 : 1.0) * mantissa(rng) * std::exp2(std::floor(scale(rng))));
            if (!(x > 0.0f)) continue;
            const double want = (double)v * std::pow((double)x, sign * (double)a);
            const float value = got(x, a, v);
            if (std::fabs(want) > 3.4028e38) {
                EXPECT_EQ(value, v > 0 ? INFINITY : -INFINITY) << x << " " << a << " " << v;
                ++out.overflowed;
            } else if (std::fabs(want) >= 1.17549435e-38) {
                const double rel = std::fabs((double)value - want) / std::fabs(want);
                out.worst = rel > out.worst ? rel : out.worst;
            } else {
                EXPECT_LE(std::fabs((double)value - want), 4e-7 * std::fabs(want) + 7.1e-46) << x << " " << a << " "
                                                                                             << v;
                ++out.underflowed;
            }
        }
    }
    return out;
}

TEST(DiagMath, ScaledNegativePowerKeepsItsBoundAndOverflowsOnlyWhereTheProductDoes) {
    const ScaledPowerSweep r =
        sweep_scaled_power(12, -149.0, {-0.1f, -0.23f, -0.4f, -0.5f, -0.7f, -0.99f, -0.999999f}, 1.0,
                           [](float x, float a, float v) { return cgd_powf_times(x, a, v); });
    EXPECT_LE(r.worst, 4e-7);
    EXPECT_GT(r.overflowed, 0); /* both ends were reached */
    EXPECT_GT(r.underflowed, 0);
    EXPECT_EQ(cgd_powf_times(0.0f, -0.4f, 2.0f), INFINITY);
    EXPECT_EQ(cgd_powf_times(INFINITY, -0.4f, 2.0f), 0.0f);
    EXPECT_TRUE(std::isnan(cgd_powf_times(NAN, -0.4f, 2.0f)));
    EXPECT_TRUE(std::isnan(cgd_powf_times(-2.0f, -0.4f, 2.0f)));
}

TEST(DiagMath, NormalInputNegativePowerKeepsTheBoundOverItsWholeDomain) {
    // cgd_powf_times_normal: x from FLT_MIN to FLT_MAX, a up to CGD_POW_NORMAL_MAX, v over 80 binades
    const ScaledPowerSweep r =
        sweep_scaled_power(13, -126.0, {0.1f, 0.23f, 0.4f, 0.7f, 0.9f, (float)CGD_POW_NORMAL_MAX}, -1.0,
                           [](float x, float a, float v) { return cgd_powf_times_normal(x, a, v); });
    EXPECT_LE(r.worst, 4e-7);
    EXPECT_GT(r.overflowed, 0);
    EXPECT_GT(r.underflowed, 0);
    const float largest = (float)CGD_POW_NORMAL_MAX;
    for (float x : {1.17549435e-38f, 1.0f, 3.4028235e38f}) // the domain's ends: x^-a itself stays normal
        EXPECT_NEAR(cgd_powf_times_normal(x, largest, 1.0f) / std::pow((double)x, -(double)largest), 1.0, 4e-7) << x;
    EXPECT_EQ(cgd_powf_times_normal(INFINITY, 0.4f, 2.0f), 0.0f);
    EXPECT_TRUE(std::isnan(cgd_powf_times_normal(NAN, 0.4f, 2.0f)));
    EXPECT_TRUE(std::isnan(cgd_powf_times_normal(-2.0f, 0.4f, 2.0f))); // no finite value from a negative moment
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
