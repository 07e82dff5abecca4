// The CPU float <-> float16/bfloat16 conversions against references built independently: decoding by ldexp
// from the format's definition, and rounding by search for the nearest representable value (ties to even).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "half_convert.h"

namespace {

double f16_by_definition(uint16_t h) {
    int sign = h >> 15, exp = (h >> 10) & 31, man = h & 1023;
    double v;
    if (exp == 31)
        v = man ? NAN : INFINITY;
    else if (exp == 0)
        v = std::ldexp((double)man, -24);
    else
        v = std::ldexp(1.0 + man / 1024.0, exp - 15);
    return sign ? -v : v;
}

double bf16_by_definition(uint16_t h) {
    int sign = h >> 15, exp = (h >> 7) & 255, man = h & 127;
    double v;
    if (exp == 255)
        v = man ? NAN : INFINITY;
    else if (exp == 0)
        v = std::ldexp((double)man, -133);
    else
        v = std::ldexp(1.0 + man / 128.0, exp - 127);
    return sign ? -v : v;
}

TEST(HalfConvert, DecodingMatchesTheFormatDefinitionForAllCodes) {
    for (uint32_t c = 0; c < 65536; ++c) {
        uint16_t h = (uint16_t)c;
        double f16 = f16_by_definition(h), bf16 = bf16_by_definition(h);
        if (std::isnan(f16))
            ASSERT_TRUE(std::isnan(cgd_f16_to_f32(h))) << c;
        else
            ASSERT_EQ((double)cgd_f16_to_f32(h), f16) << c;
        if (std::isnan(bf16))
            ASSERT_TRUE(std::isnan(cgd_bf16_to_f32(h))) << c;
        else
            ASSERT_EQ((double)cgd_bf16_to_f32(h), bf16) << c;
    }
}

// Nearest code to x among the finite codes of a format (sorted by value), ties to the even code; beyond the
// largest finite value by half a step or more, infinity.
uint16_t nearest_code(double x, const std::vector<std::pair<double, uint16_t>> &table, double max_finite,
                      double half_step_at_max, uint16_t inf_code) {
    double a = std::fabs(x);
    uint16_t sign = std::signbit(x) ? 0x8000 : 0;
    if (a >= max_finite + half_step_at_max) return sign | inf_code;
    auto hi = std::lower_bound(table.begin(), table.end(), std::make_pair(a, (uint16_t)0));
    if (hi == table.end()) return sign | table.back().second;
    if (hi->first == a || hi == table.begin()) return sign | hi->second;
    auto lo = hi - 1;
    double dl = a - lo->first, dh = hi->first - a;
    if (dl < dh) return sign | lo->second;
    if (dh < dl) return sign | hi->second;
    return sign | ((lo->second & 1) ? hi->second : lo->second);
}

std::vector<std::pair<double, uint16_t>> positive_table(double (*decode)(uint16_t), uint16_t inf_code) {
    std::vector<std::pair<double, uint16_t>> t;
    for (uint32_t c = 0; c < inf_code; ++c) t.emplace_back(decode((uint16_t)c), (uint16_t)c);
    return t;
}

float from_bits(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// Floats to try: random bit patterns, every half-way point between neighbouring codes and its two float
// neighbours, the overflow and underflow boundaries.
std::vector<float> probe_floats(const std::vector<std::pair<double, uint16_t>> &table) {
    std::vector<float> xs;
    std::mt19937 rng(3);
    for (int i = 0; i < 300000; ++i) xs.push_back(from_bits(rng()));
    for (size_t i = 0; i + 1 < table.size(); ++i) {
        float mid = (float)((table[i].first + table[i + 1].first) / 2);
        xs.push_back(mid);
        xs.push_back(std::nextafter(mid, 0.0f));
        xs.push_back(std::nextafter(mid, INFINITY));
        xs.push_back(-mid);
    }
    for (float f : {0.0f, -0.0f, 65504.0f, 65519.99f, 65520.0f, 1e-8f, 2.98e-8f, 2.9802322e-8f, 6.1e-5f, 3.4e38f})
        xs.push_back(f);
    return xs;
}

TEST(HalfConvert, Float16RoundsToNearestEven) {
    auto table = positive_table(f16_by_definition, 0x7c00);
    for (float x : probe_floats(table)) {
        if (std::isnan(x)) {
            ASSERT_TRUE(std::isnan(cgd_f16_to_f32(cgd_f32_to_f16(x))));
            continue;
        }
        uint16_t want = std::isinf(x) ? (uint16_t)((std::signbit(x) ? 0x8000 : 0) | 0x7c00)
                                      : nearest_code(x, table, 65504.0, 16.0, 0x7c00);
        ASSERT_EQ(cgd_f32_to_f16(x), want) << "x = " << x;
    }
}

TEST(HalfConvert, BFloat16RoundsToNearestEven) {
    auto table = positive_table(bf16_by_definition, 0x7f80);
    const double max_finite = bf16_by_definition(0x7f7f), half_step = std::ldexp(1.0, 127 - 8);
    for (float x : probe_floats(table)) {
        if (std::isnan(x)) {
            ASSERT_TRUE(std::isnan(cgd_bf16_to_f32(cgd_f32_to_bf16(x))));
            continue;
        }
        uint16_t want = std::isinf(x) ? (uint16_t)((std::signbit(x) ? 0x8000 : 0) | 0x7f80)
                                      : nearest_code(x, table, max_finite, half_step, 0x7f80);
        ASSERT_EQ(cgd_f32_to_bf16(x), want) << "x = " << x;
    }
}

} // namespace
