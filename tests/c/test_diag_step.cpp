// The C API's diagonal step against a scalar float64 reference written from the equations (paper eqs 3.5, 4.2,
// 4.8, 5.1; torch's Adam/AdamW/SGD/RMSprop forms; AdaBelief's Algorithm 2), on the CPU and, when a GPU is
// present, on CUDA. Also: argument errors, skip and grad_scale semantics, the non-finite scan.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cgd.h"
#include "test_support.h"
#include "half_convert.h"

#ifdef CGD_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace {

// ---------- storage of one dtype ----------

size_t elem_size(cgd_dtype dt) { return dt == CGD_FLOAT64 ? 8 : (dt == CGD_FLOAT32 ? 4 : 2); }

double decode(cgd_dtype dt, const std::vector<uint8_t> &bytes, size_t i) {
    if (dt == CGD_FLOAT64) {
        double d;
        std::memcpy(&d, bytes.data() + 8 * i, 8);
        return d;
    }
    if (dt == CGD_FLOAT32) {
        float f;
        std::memcpy(&f, bytes.data() + 4 * i, 4);
        return f;
    }
    uint16_t h;
    std::memcpy(&h, bytes.data() + 2 * i, 2);
    return dt == CGD_FLOAT16 ? cgd_f16_to_f32(h) : cgd_bf16_to_f32(h);
}

void encode(cgd_dtype dt, std::vector<uint8_t> &bytes, size_t i, double v) {
    if (dt == CGD_FLOAT64) {
        std::memcpy(bytes.data() + 8 * i, &v, 8);
        return;
    }
    if (dt == CGD_FLOAT32) {
        float f = (float)v;
        std::memcpy(bytes.data() + 4 * i, &f, 4);
        return;
    }
    uint16_t h = dt == CGD_FLOAT16 ? cgd_f32_to_f16((float)v) : cgd_f32_to_bf16((float)v);
    std::memcpy(bytes.data() + 2 * i, &h, 2);
}

// The value v takes once stored in dtype dt.
double round_to(cgd_dtype dt, double v) {
    std::vector<uint8_t> b(8);
    encode(dt, b, 0, v);
    return decode(dt, b, 0);
}

const char *dtype_name(cgd_dtype dt) {
    return dt == CGD_FLOAT64 ? "f64" : dt == CGD_FLOAT32 ? "f32" : (dt == CGD_FLOAT16 ? "f16" : "bf16");
}

// ---------- the reference ----------

struct RefTensor {
    std::vector<double> p, m1, m2;
    double step = 0;
};

bool needs_m1(const cgd_diag_hparams &h) { return h.beta1 > 0 || (h.power != 0 && h.moment != CGD_MOMENT_RAW); }

void reference_step(const cgd_diag_hparams &h, cgd_dtype dt, RefTensor &r, const std::vector<double> &grad,
                    double grad_scale) {
    const double t = r.step + 1;
    const double bc1 = h.bias_correction ? 1 - std::pow(h.beta1, t) : 1;
    const double bc2 = h.bias_correction ? 1 - std::pow(h.beta2, t) : 1;
    for (size_t i = 0; i < r.p.size(); ++i) {
        double g = grad[i] / grad_scale;
        if (h.maximize) g = -g;
        double p = r.p[i];
        if (h.weight_decay != 0) {
            if (h.decoupled_weight_decay)
                p *= 1 - h.lr * h.weight_decay;
            else
                g += h.weight_decay * p;
        }
        double m1 = g;
        if (needs_m1(h)) m1 = r.m1[i] = h.beta1 * r.m1[i] + h.grad_weight * g;
        double force = (h.nesterov ? h.beta1 * m1 + h.grad_weight * g : m1) / bc1;
        if (h.power != 0) {
            double c;
            if (h.moment == CGD_MOMENT_BELIEF) {
                r.m2[i] = h.beta2 * r.m2[i] + (1 - h.beta2) * (g - m1) * (g - m1) + h.eps;
                c = r.m2[i] / bc2;
            } else {
                r.m2[i] = h.beta2 * r.m2[i] + (1 - h.beta2) * g * g;
                c = r.m2[i] / bc2;
                if (h.moment == CGD_MOMENT_CENTERED) c = std::max(c - (m1 / bc1) * (m1 / bc1), 0.0);
            }
            double metric = h.eps_inside ? std::pow(h.eps + c, h.power) : std::pow(c, h.power) + h.eps;
            force /= metric;
        }
        r.p[i] = round_to(dt, p - h.lr * force);
    }
    r.step = t;
}

// ---------- a problem: several tensors with host copies of everything ----------

struct Tensor {
    std::vector<uint8_t> param, grad;
    std::vector<float> m1, m2;
    double step = 0;
    size_t n = 0;
};

struct Problem {
    cgd_dtype dtype;
    std::vector<Tensor> tensors;
    std::vector<RefTensor> ref;
};

Problem make_problem(cgd_dtype dt, const std::vector<size_t> &sizes, float m2_init, unsigned seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    Problem pr{dt, {}, {}};
    for (size_t n : sizes) {
        Tensor t;
        RefTensor r;
        t.n = n;
        t.param.resize(n * elem_size(dt));
        t.grad.resize(n * elem_size(dt));
        t.m1.assign(n, 0.0f);
        t.m2.assign(n, m2_init);
        r.p.resize(n);
        r.m1.assign(n, 0.0);
        r.m2.assign(n, m2_init);
        for (size_t i = 0; i < n; ++i) {
            encode(dt, t.param, i, normal(rng));
            r.p[i] = decode(dt, t.param, i);
        }
        pr.tensors.push_back(std::move(t));
        pr.ref.push_back(std::move(r));
    }
    return pr;
}

// Fresh gradients (scaled by `scale`, as GradScaler would leave them) in both the problem and a reference copy.
std::vector<std::vector<double>> new_grads(Problem &pr, std::mt19937 &rng, double scale) {
    std::normal_distribution<double> normal(0.0, 1.0);
    std::vector<std::vector<double>> out;
    for (Tensor &t : pr.tensors) {
        std::vector<double> g(t.n);
        for (size_t i = 0; i < t.n; ++i) {
            encode(pr.dtype, t.grad, i, (0.5 + 0.1 * normal(rng)) * normal(rng) * scale);
            g[i] = decode(pr.dtype, t.grad, i);
        }
        out.push_back(std::move(g));
    }
    return out;
}

// ---------- running the C API on a device ----------


#ifdef CGD_WITH_CUDA
#define CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << #expr
template <typename T> T *to_device(const void *host, size_t bytes) {
    void *d = nullptr;
    EXPECT_EQ(cudaMalloc(&d, bytes ? bytes : 1), cudaSuccess);
    if (bytes) EXPECT_EQ(cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice), cudaSuccess);
    return static_cast<T *>(d);
}
void to_host(void *host, const void *dev, size_t bytes) {
    if (bytes) EXPECT_EQ(cudaMemcpy(host, dev, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
}
#endif

// One call of cgd_diag_step over all tensors of `pr`, on `device`. `offset` shifts every array by that many
// elements, so the kernels see pointers that are not 16-byte aligned.
// `flags`, when given, receives the guard's flags (hparams.guard_flags is pointed at a buffer on the device).
cgd_status run_step(cgd_device device, const cgd_diag_hparams &hp, Problem &pr, const float *grad_scale,
                    const float *skip, size_t offset = 0, std::vector<int32_t> *flags = nullptr) {
    cgd_diag_hparams h = hp;
    const bool m1 = needs_m1(h), m2 = h.power != 0;
    if (flags) flags->assign(pr.tensors.size(), -1); /* every entry must be written by the call */
    const size_t es = elem_size(pr.dtype);
    std::vector<cgd_diag_tensor> ts(pr.tensors.size());
    if (device == CGD_CPU) {
        std::vector<std::vector<uint8_t>> pbuf, gbuf;
        std::vector<std::vector<float>> m1buf, m2buf;
        for (size_t i = 0; i < ts.size(); ++i) {
            Tensor &t = pr.tensors[i];
            pbuf.emplace_back(offset * es, 0);
            pbuf.back().insert(pbuf.back().end(), t.param.begin(), t.param.end());
            gbuf.emplace_back(offset * es, 0);
            gbuf.back().insert(gbuf.back().end(), t.grad.begin(), t.grad.end());
            m1buf.emplace_back(offset, 0.0f);
            m1buf.back().insert(m1buf.back().end(), t.m1.begin(), t.m1.end());
            m2buf.emplace_back(offset, 0.0f);
            m2buf.back().insert(m2buf.back().end(), t.m2.begin(), t.m2.end());
        }
        for (size_t i = 0; i < ts.size(); ++i) {
            ts[i] = {pbuf[i].data() + offset * es, gbuf[i].data() + offset * es, m1 ? m1buf[i].data() + offset : nullptr,
                     m2 ? m2buf[i].data() + offset : nullptr, &pr.tensors[i].step, (int64_t)pr.tensors[i].n};
        }
        if (flags) h.guard_flags = flags->data();
        cgd_status st = cgd_diag_step(&h, pr.dtype, ts.data(), (int64_t)ts.size(), grad_scale, skip, CGD_CPU, nullptr);
        for (size_t i = 0; i < ts.size(); ++i) {
            Tensor &t = pr.tensors[i];
            std::memcpy(t.param.data(), pbuf[i].data() + offset * es, t.param.size());
            std::memcpy(t.m1.data(), m1buf[i].data() + offset, t.n * 4);
            std::memcpy(t.m2.data(), m2buf[i].data() + offset, t.n * 4);
        }
        return st;
    }
#ifdef CGD_WITH_CUDA
    std::vector<void *> allocs;
    auto up = [&](const void *host, size_t bytes) {
        std::vector<uint8_t> padded(offset * 4 + bytes, 0);
        if (bytes) std::memcpy(padded.data() + offset * 4, host, bytes);
        uint8_t *d = to_device<uint8_t>(padded.data(), padded.size());
        allocs.push_back(d);
        return d + offset * 4;
    };
    for (size_t i = 0; i < ts.size(); ++i) {
        Tensor &t = pr.tensors[i];
        ts[i].param = up(t.param.data(), t.param.size());
        ts[i].grad = up(t.grad.data(), t.grad.size());
        ts[i].exp_avg = m1 ? (float *)up(t.m1.data(), t.n * 4) : nullptr;
        ts[i].exp_avg_sq = m2 ? (float *)up(t.m2.data(), t.n * 4) : nullptr;
        ts[i].step = to_device<double>(&t.step, 8); /* its own allocation: a double must stay 8-byte aligned */
        allocs.push_back(ts[i].step);
        ts[i].numel = (int64_t)t.n;
    }
    float *d_scale = grad_scale ? (float *)up(grad_scale, 4) : nullptr;
    float *d_skip = skip ? (float *)up(skip, 4) : nullptr;
    if (flags) h.guard_flags = (int32_t *)up(flags->data(), flags->size() * 4);
    cgd_status st = cgd_diag_step(&h, pr.dtype, ts.data(), (int64_t)ts.size(), d_scale, d_skip, CGD_CUDA, nullptr);
    EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    if (flags) to_host(flags->data(), h.guard_flags, flags->size() * 4);
    for (size_t i = 0; i < ts.size(); ++i) {
        Tensor &t = pr.tensors[i];
        to_host(t.param.data(), ts[i].param, t.param.size());
        if (m1) to_host(t.m1.data(), ts[i].exp_avg, t.n * 4);
        if (m2) to_host(t.m2.data(), ts[i].exp_avg_sq, t.n * 4);
        to_host(&t.step, ts[i].step, 8);
    }
    for (void *p : allocs) cudaFree(p);
    return st;
#else
    return CGD_ERR_UNSUPPORTED;
#endif
}

// |got - want| within float32 rounding, or for half types about one step of the dtype's spacing at `want`.
void expect_close(cgd_dtype dt, double got, double want, const std::string &where) {
    double tol = dt == CGD_FLOAT32 ? 2e-5 * std::fabs(want) + 1e-6 : std::fabs(want) * (dt == CGD_FLOAT16 ? 1e-3 : 8e-3) + 1e-4;
    ASSERT_LE(std::fabs(got - want), tol) << where << ": got " << got << ", reference " << want;
}

void expect_matches_reference(const Problem &pr, const cgd_diag_hparams &h, const std::string &what) {
    for (size_t ti = 0; ti < pr.tensors.size(); ++ti) {
        const Tensor &t = pr.tensors[ti];
        const RefTensor &r = pr.ref[ti];
        ASSERT_EQ(t.step, r.step) << what << " tensor " << ti;
        for (size_t i = 0; i < t.n; ++i) {
            std::string where = what + " tensor " + std::to_string(ti) + " element " + std::to_string(i);
            expect_close(pr.dtype, decode(pr.dtype, t.param, i), r.p[i], where + " param");
            // States are float32, but with half parameters they inherit the parameters' rounding through weight decay.
            if (needs_m1(h)) expect_close(pr.dtype, t.m1[i], r.m1[i], where + " exp_avg");
            if (h.power != 0) expect_close(pr.dtype, t.m2[i], r.m2[i], where + " exp_avg_sq");
        }
    }
}

// ---------- configurations: torch's special cases and the paper's general ones ----------

struct Config {
    const char *name;
    cgd_diag_hparams h;
    float m2_init;
};

cgd_diag_hparams base() {
    cgd_diag_hparams h{};
    h.lr = 1e-2;
    h.beta1 = 0.9;
    h.beta2 = 0.999;
    h.grad_weight = 0.1;
    h.power = 0.5;
    h.eps = 1e-8;
    h.moment = CGD_MOMENT_RAW;
    h.bias_correction = 1;
    return h;
}

std::vector<Config> configs() {
    std::vector<Config> c;
    c.push_back({"adam", base(), 0.0f});
    cgd_diag_hparams h = base();
    h.weight_decay = 0.05, h.decoupled_weight_decay = 1;
    c.push_back({"adamw", h, 0.0f});
    h = base();
    h.weight_decay = 0.1, h.maximize = 1;
    c.push_back({"adam_l2_maximize", h, 0.0f});
    h = base();
    h.beta1 = 0, h.grad_weight = 1, h.beta2 = 0.99, h.bias_correction = 0;
    c.push_back({"rmsprop", h, 0.0f});
    h = base();
    h.beta1 = 0, h.grad_weight = 1, h.power = 0, h.bias_correction = 0;
    c.push_back({"sgd", h, 0.0f});
    h = base();
    h.grad_weight = 1, h.power = 0, h.bias_correction = 0, h.nesterov = 1, h.weight_decay = 1e-3;
    c.push_back({"sgd_nesterov", h, 0.0f});
    h = base();
    h.beta1 = 12.9 / 13.9, h.grad_weight = 1 / 13.9, h.beta2 = 12.3 / 13.3, h.power = 0.37, h.eps_inside = 1;
    h.bias_correction = 0;
    c.push_back({"paper_diagonal", h, 1.0f});
    // Centered with the paper's M2(0) = 1: with bias correction the variance of a single step is exactly 0 and
    // the comparison would measure float cancellation against eps, not the update.
    h = base();
    h.power = 0.4, h.moment = CGD_MOMENT_CENTERED, h.eps_inside = 1, h.bias_correction = 0;
    c.push_back({"centered", h, 1.0f});
    h = base();
    h.power = 0.3, h.moment = CGD_MOMENT_CENTERED, h.beta2 = 0.9, h.bias_correction = 0;
    c.push_back({"centered_eps_outside", h, 1.0f});
    h = base();
    h.moment = CGD_MOMENT_BELIEF, h.eps = 1e-12;
    c.push_back({"adabelief", h, 0.0f});
    h = base();
    h.power = 1.0, h.eps_inside = 1, h.eps = 1e-3, h.nesterov = 1;
    c.push_back({"power_one_nesterov", h, 0.0f});
    return c;
}

class DiagStep : public ::testing::TestWithParam<cgd_device> {
  protected:
    void SetUp() override {
        CGD_SKIP_UNLESS_RUNNABLE(GetParam());
    }
};

TEST_P(DiagStep, MatchesReferenceForEveryConfigDtypeAndSize) {
    // 0 (empty), 1, 3 (under a vector), 4097 (vector + tail), 70001 (several CUDA chunks + tail).
    const std::vector<size_t> sizes = {0, 1, 3, 4097, 70001};
    for (const Config &c : configs()) {
        for (cgd_dtype dt : {CGD_FLOAT32, CGD_FLOAT16, CGD_BFLOAT16}) {
            std::string what = std::string(c.name) + "/" + dtype_name(dt);
            Problem pr = make_problem(dt, sizes, c.m2_init, 7);
            std::mt19937 rng(11);
            for (int step = 0; step < 4; ++step) {
                auto grads = new_grads(pr, rng, 1.0);
                ASSERT_EQ(run_step(GetParam(), c.h, pr, nullptr, nullptr), CGD_OK) << what << ": " << cgd_last_error();
                for (size_t i = 0; i < pr.ref.size(); ++i) reference_step(c.h, dt, pr.ref[i], grads[i], 1.0);
                expect_matches_reference(pr, c.h, what + " step " + std::to_string(step));
                if (HasFatalFailure()) return;
            }
        }
    }
}

TEST_P(DiagStep, UnalignedPointersTakeTheScalarPath) {
    for (cgd_dtype dt : {CGD_FLOAT32, CGD_BFLOAT16}) {
        Problem pr = make_problem(dt, {5, 4099}, 0.0f, 3);
        std::mt19937 rng(5);
        cgd_diag_hparams h = base();
        auto grads = new_grads(pr, rng, 1.0);
        ASSERT_EQ(run_step(GetParam(), h, pr, nullptr, nullptr, 1), CGD_OK) << cgd_last_error();
        for (size_t i = 0; i < pr.ref.size(); ++i) reference_step(h, dt, pr.ref[i], grads[i], 1.0);
        expect_matches_reference(pr, h, std::string("unaligned/") + dtype_name(dt));
    }
}

TEST_P(DiagStep, ManyTensorsSpanSeveralLaunches) {
    std::mt19937 sizes_rng(1);
    std::vector<size_t> sizes;
    for (int i = 0; i < 450; ++i) sizes.push_back(sizes_rng() % 300);
    sizes[17] = 40000;
    Problem pr = make_problem(CGD_FLOAT32, sizes, 0.0f, 9);
    std::mt19937 rng(2);
    cgd_diag_hparams h = base();
    for (int step = 0; step < 2; ++step) {
        auto grads = new_grads(pr, rng, 1.0);
        ASSERT_EQ(run_step(GetParam(), h, pr, nullptr, nullptr), CGD_OK) << cgd_last_error();
        for (size_t i = 0; i < pr.ref.size(); ++i) reference_step(h, CGD_FLOAT32, pr.ref[i], grads[i], 1.0);
    }
    expect_matches_reference(pr, h, "450 tensors");
}

TEST_P(DiagStep, GradScaleDividesTheGradients) {
    Problem pr = make_problem(CGD_FLOAT32, {1000}, 0.0f, 4);
    std::mt19937 rng(8);
    cgd_diag_hparams h = base();
    const float scale = 1024.0f;
    auto grads = new_grads(pr, rng, scale);
    ASSERT_EQ(run_step(GetParam(), h, pr, &scale, nullptr), CGD_OK) << cgd_last_error();
    reference_step(h, CGD_FLOAT32, pr.ref[0], grads[0], scale);
    expect_matches_reference(pr, h, "grad_scale");
}

TEST_P(DiagStep, NonzeroSkipChangesNothing) {
    Problem pr = make_problem(CGD_BFLOAT16, {100, 5000}, 0.0f, 4);
    std::mt19937 rng(8);
    new_grads(pr, rng, 1.0);
    const Problem before = pr;
    const float skip = 1.0f;
    ASSERT_EQ(run_step(GetParam(), base(), pr, nullptr, &skip), CGD_OK);
    for (size_t i = 0; i < pr.tensors.size(); ++i) {
        EXPECT_EQ(pr.tensors[i].param, before.tensors[i].param);
        EXPECT_EQ(pr.tensors[i].m1, before.tensors[i].m1);
        EXPECT_EQ(pr.tensors[i].m2, before.tensors[i].m2);
        EXPECT_EQ(pr.tensors[i].step, 0.0f);
    }
    const float go = 0.0f;
    ASSERT_EQ(run_step(GetParam(), base(), pr, nullptr, &go), CGD_OK);
    EXPECT_EQ(pr.tensors[0].step, 1.0f);
    EXPECT_NE(pr.tensors[0].param, before.tensors[0].param);
}

TEST_P(DiagStep, GuardHoldsBackUnusableEntriesAndStepsTheRest) {
    // Tensor 0 is clean; 1 has a NaN; 2 an Inf and a finite value over the limit, one of them past the vector
    // part and in the tail. Held entries keep param, M1 and M2 bit for bit; every other entry follows the
    // reference, over two steps (the second clean).
    const double limit = 1e19;
    const std::vector<std::pair<size_t, size_t>> poisoned = {{1, 100}, {2, 5}, {2, 70000}};
    const double values[] = {NAN, -INFINITY, -2e19};
    for (const Config &c : configs()) {
        for (cgd_dtype dt : {CGD_FLOAT32, CGD_BFLOAT16}) {
            const std::string what = std::string("guard/") + c.name + "/" + dtype_name(dt);
            cgd_diag_hparams h = c.h;
            h.guard_limit = limit;
            Problem pr = make_problem(dt, {3, 4097, 70001}, c.m2_init, 7);
            std::mt19937 rng(11);
            for (int step = 0; step < 2; ++step) {
                auto grads = new_grads(pr, rng, 1.0);
                if (step == 0)
                    for (size_t k = 0; k < poisoned.size(); ++k) {
                        encode(dt, pr.tensors[poisoned[k].first].grad, poisoned[k].second, values[k]);
                        grads[poisoned[k].first][poisoned[k].second] = values[k];
                    }
                const Problem before = pr;
                std::vector<int32_t> flags;
                ASSERT_EQ(run_step(GetParam(), h, pr, nullptr, nullptr, 0, &flags), CGD_OK) << cgd_last_error();
                EXPECT_EQ(flags, (step == 0 ? std::vector<int32_t>{0, 1, 1} : std::vector<int32_t>{0, 0, 0})) << what;
                for (size_t i = 0; i < pr.ref.size(); ++i) {
                    reference_step(h, dt, pr.ref[i], grads[i], 1.0);
                    EXPECT_EQ(pr.tensors[i].step, (double)(step + 1)) << what;
                }
                if (step == 0)
                    for (const auto &[ti, j] : poisoned) {
                        const size_t es = elem_size(dt);
                        EXPECT_EQ(0, std::memcmp(&pr.tensors[ti].param[j * es], &before.tensors[ti].param[j * es], es))
                            << what;
                        EXPECT_EQ(pr.tensors[ti].m1[j], before.tensors[ti].m1[j]) << what;
                        EXPECT_EQ(pr.tensors[ti].m2[j], before.tensors[ti].m2[j]) << what;
                        pr.ref[ti].p[j] = before.ref[ti].p[j];
                        pr.ref[ti].m1[j] = before.ref[ti].m1[j];
                        pr.ref[ti].m2[j] = before.ref[ti].m2[j];
                    }
                expect_matches_reference(pr, h, what + " step " + std::to_string(step));
                if (HasFatalFailure()) return;
            }
        }
    }
}

TEST_P(DiagStep, WithoutAGuardEveryEntrySteps) {
    Problem pr = make_problem(CGD_FLOAT32, {10}, 0.0f, 4);
    std::mt19937 rng(8);
    new_grads(pr, rng, 1.0);
    encode(CGD_FLOAT32, pr.tensors[0].grad, 2, NAN);
    ASSERT_EQ(run_step(GetParam(), base(), pr, nullptr, nullptr), CGD_OK);
    EXPECT_TRUE(std::isnan(decode(CGD_FLOAT32, pr.tensors[0].param, 2)));
    EXPECT_FALSE(std::isnan(decode(CGD_FLOAT32, pr.tensors[0].param, 3)));
}

// Runs the non-finite scan over `data` on `device`; limits may be empty (NaN and Inf only).
cgd_status scan(cgd_device device, cgd_dtype dt, const std::vector<std::vector<uint8_t>> &data,
                const std::vector<double> &limits, std::vector<int32_t> &flags, float &found) {
    std::vector<int64_t> numels;
    for (const auto &d : data) numels.push_back((int64_t)(d.size() / elem_size(dt)));
    flags.assign(data.size(), 77);
    found = 5.0f;
    cgd_status st;
    { // the Mirror copies flags and found back when it goes
        Mirror m{device};
        std::vector<const void *> ptrs;
        for (const auto &d : data) ptrs.push_back(m.put(const_cast<uint8_t *>(d.data()), d.size()));
        int32_t *f = (int32_t *)m.put(flags.data(), flags.size() * 4);
        float *any = (float *)m.put(&found, 4);
        st = cgd_nonfinite_check(dt, ptrs.data(), numels.data(), limits.empty() ? nullptr : limits.data(),
                                 (int64_t)data.size(), f, any, device, nullptr);
    }
    return st;
}

// The non-finite scan: flags name exactly the tensors holding NaN or Inf, wherever the value sits.
TEST_P(DiagStep, NonfiniteCheckFlagsExactlyTheBadTensors) {
    for (cgd_dtype dt : {CGD_FLOAT32, CGD_FLOAT16, CGD_BFLOAT16, CGD_FLOAT64}) {
        const std::vector<size_t> sizes = {7, 70001, 4096, 1, 0, 33};
        std::vector<std::vector<uint8_t>> data;
        for (size_t n : sizes) {
            data.emplace_back(n * elem_size(dt));
            for (size_t i = 0; i < n; ++i) encode(dt, data.back(), i, 0.25 * (double)(i % 13) - 1.0);
        }
        encode(dt, data[1], 70000, NAN);     // last element, in the tail of the last chunk
        encode(dt, data[2], 1234, INFINITY); // inside the vector body
        encode(dt, data[5], 0, -INFINITY);
        std::vector<int32_t> flags;
        float found = 0.0f;
        ASSERT_EQ(scan(GetParam(), dt, data, {}, flags, found), CGD_OK) << cgd_last_error();
        EXPECT_EQ(flags, std::vector<int32_t>({0, 1, 1, 0, 0, 1})) << dtype_name(dt);
        EXPECT_EQ(found, 1.0f) << dtype_name(dt);

        encode(dt, data[1], 70000, 1.0), encode(dt, data[2], 1234, 2.0), encode(dt, data[5], 0, 3.0);
        ASSERT_EQ(scan(GetParam(), dt, data, {}, flags, found), CGD_OK) << cgd_last_error();
        EXPECT_EQ(flags, std::vector<int32_t>(sizes.size(), 0)) << dtype_name(dt);
        EXPECT_EQ(found, 0.0f) << dtype_name(dt);
    }
}

// With limits, a finite value of magnitude >= its tensor's limit counts as non-finite too (its square would
// overflow the state), with either sign and anywhere in the tensor; values below the limit do not.
TEST_P(DiagStep, NonfiniteCheckFlagsValuesAtOrAboveTheLimit) {
    for (cgd_dtype dt : {CGD_FLOAT32, CGD_FLOAT16, CGD_BFLOAT16, CGD_FLOAT64}) {
        const double big = dt == CGD_FLOAT16 ? 1024.0 : (dt == CGD_FLOAT64 ? 0x1p600 : 0x1p70);
        std::vector<std::vector<uint8_t>> data(4, std::vector<uint8_t>(70001 * elem_size(dt)));
        for (auto &d : data)
            for (size_t i = 0; i < 70001; ++i) encode(dt, d, i, 0.5 * (double)(i % 7) - 1.5);
        encode(dt, data[0], 70000, -big); // magnitude big, limit big: flagged
        encode(dt, data[1], 40000, big);  // limit 2 big: not flagged
        encode(dt, data[2], 3, big * 0.75);
        const std::vector<double> limits = {big, 2 * big, big / 2, INFINITY};
        std::vector<int32_t> flags;
        float found = 0.0f;
        ASSERT_EQ(scan(GetParam(), dt, data, limits, flags, found), CGD_OK) << cgd_last_error();
        EXPECT_EQ(flags, std::vector<int32_t>({1, 0, 1, 0})) << dtype_name(dt);
        EXPECT_EQ(found, 1.0f) << dtype_name(dt);
    }
    std::vector<int32_t> flags;
    float found = 0.0f;
    EXPECT_EQ(scan(GetParam(), CGD_FLOAT32, {std::vector<uint8_t>(4)}, {0.0}, flags, found), CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("limits[0] = 0 must be positive"), std::string::npos);
}

// One float32 tensor of plain host arrays stepped once on `device`; lr_device, when given, is a host value
// that travels to the device like the rest.
struct Flat {
    std::vector<float> p, m1, m2;
    double step = 0;
};

cgd_status step_flat(cgd_device device, cgd_diag_hparams h, Flat &f, std::vector<float> g, float *lr_device = nullptr) {
    Mirror m{device};
    h.lr_device = lr_device ? (const float *)m.put(lr_device, sizeof *lr_device) : nullptr;
    cgd_diag_tensor t = {m.put(f.p.data(), bytes(f.p)), m.put(g.data(), bytes(g)), (float *)m.put(f.m1.data(), bytes(f.m1)),
                         (float *)m.put(f.m2.data(), bytes(f.m2)), (double *)m.put(&f.step, sizeof f.step),
                         (int64_t)f.p.size()};
    return cgd_diag_step(&h, CGD_FLOAT32, &t, 1, nullptr, nullptr, device, nullptr);
}

// Both back ends round every product and sum as diag_math.h writes them (no fused multiply-add). Two
// bias-corrected centered steps of one gradient, each bit for bit the float32 sequence below: the first takes the
// second moment itself (its variance g^2 - g^2 would be exactly 0); the second's variance c / bc2 - mean^2 is a
// rounding residual of either sign that the clamp at 0 and eps then absorb. A contracted fma(-mean, mean, c / bc2)
// keeps a different residual, up to ulp(g^2) / 2, which at eps = 1e-8 moves the step by a large factor.
TEST_P(DiagStep, CenteredStepRoundsAsWritten) {
    cgd_diag_hparams h = base();
    h.moment = CGD_MOMENT_CENTERED;
    h.eps_inside = 1;
    std::mt19937 rng(31);
    std::normal_distribution<float> normal;
    std::uniform_real_distribution<float> decade(-3.0f, 3.0f);
    const size_t n = 4096;
    Flat f{normal_vector(rng, n), std::vector<float>(n, 0.0f), std::vector<float>(n, 0.0f)};
    std::vector<float> g(n);
    for (float &x : g) x = normal(rng) * std::pow(10.0f, decade(rng));
    size_t zero_variance = 0;
    for (int t = 1; t <= 2; ++t) {
        const Flat start = f;
        ASSERT_EQ(step_flat(GetParam(), h, f, g), CGD_OK) << cgd_last_error();
        const double bc1 = 1.0 - std::pow(h.beta1, (double)t), bc2 = 1.0 - std::pow(h.beta2, (double)t);
        const float step_size = (float)((double)(float)h.lr / bc1), inv_bc1 = (float)(1.0 / bc1),
                    inv_bc2 = (float)(1.0 / bc2);
        const float beta1 = (float)h.beta1, beta2 = (float)h.beta2, w1 = (float)h.grad_weight;
        const float w2 = (float)(1.0 - h.beta2), eps = (float)h.eps, mean_weight = t == 1 ? 0.0f : 1.0f;
        for (size_t i = 0; i < n; ++i) {
            const float avg = beta1 * start.m1[i] + w1 * g[i];
            const float c = beta2 * start.m2[i] + w2 * g[i] * g[i];
            const float mean = avg * inv_bc1;
            const float var = std::fmax(c * inv_bc2 - mean_weight * (mean * mean), 0.0f);
            if (t == 2) zero_variance += var == 0.0f;
            const float p = start.p[i] - step_size * (avg / std::sqrt(eps + var));
            ASSERT_EQ(f.m1[i], avg) << i;
            ASSERT_EQ(f.m2[i], c) << i;
            ASSERT_EQ(f.p[i], p) << "step " << t << ", element " << i << ", g = " << g[i];
        }
    }
    EXPECT_GT(zero_variance, 0u);
}

// lr_device replaces lr: the kernel reads it where the tensors live, so a captured graph follows its changes.
TEST_P(DiagStep, DeviceLrReplacesLr) {
    std::mt19937 rng(32);
    const size_t n = 300;
    cgd_diag_hparams h = base();
    h.weight_decay = 0.1;
    h.decoupled_weight_decay = 1;
    Flat a{normal_vector(rng, n), std::vector<float>(n, 0.0f), std::vector<float>(n, 0.0f)}, b = a;
    for (float lr : {1e-3f, 5e-4f, 0.25f}) {
        std::vector<float> g = normal_vector(rng, n);
        h.lr = lr;
        ASSERT_EQ(step_flat(GetParam(), h, a, g), CGD_OK) << cgd_last_error();
        h.lr = 7.0; // ignored
        float on_device = lr;
        ASSERT_EQ(step_flat(GetParam(), h, b, g, &on_device), CGD_OK) << cgd_last_error();
        ASSERT_EQ(a.p, b.p) << "lr " << lr;
        ASSERT_EQ(a.m2, b.m2);
    }
    EXPECT_EQ(b.step, 3.0);
}

INSTANTIATE_TEST_SUITE_P(Devices, DiagStep, ::testing::Values(CGD_CPU, CGD_CUDA),
                         [](const ::testing::TestParamInfo<cgd_device> &i) {
                             return std::string(i.param == CGD_CPU ? "CPU" : "CUDA");
                         });

// ---------- argument errors: a status and a message naming the argument and its value ----------

cgd_status step_one(const cgd_diag_hparams &h, cgd_diag_tensor t, cgd_dtype dt = CGD_FLOAT32,
                    cgd_device dev = CGD_CPU) {
    return cgd_diag_step(&h, dt, &t, 1, nullptr, nullptr, dev, nullptr);
}

TEST(DiagStepErrors, InvalidHyperparametersAreNamedWithTheirValue) {
    float p[2] = {1, 2}, g[2] = {0.1f, 0.2f}, m1[2] = {}, m2[2] = {};
    double step = 0;
    cgd_diag_tensor t = {p, g, m1, m2, &step, 2};
    struct Bad {
        const char *field;
        void (*set)(cgd_diag_hparams &);
        const char *value;
    };
    const Bad bad[] = {
        {"lr", [](cgd_diag_hparams &h) { h.lr = -0.5; }, "-0.5"},
        {"lr", [](cgd_diag_hparams &h) { h.lr = NAN; }, "nan"},
        {"beta1", [](cgd_diag_hparams &h) { h.beta1 = 1.0; }, "1"},
        {"beta2", [](cgd_diag_hparams &h) { h.beta2 = -0.1; }, "-0.1"},
        {"power", [](cgd_diag_hparams &h) { h.power = 1.5; }, "1.5"},
        {"eps", [](cgd_diag_hparams &h) { h.eps = -1e-8; }, "-1e-08"},
        {"weight_decay", [](cgd_diag_hparams &h) { h.weight_decay = INFINITY; }, "inf"},
        {"grad_weight", [](cgd_diag_hparams &h) { h.grad_weight = 0; }, "0"},
        {"moment", [](cgd_diag_hparams &h) { h.moment = 7; }, "7"},
    };
    for (const Bad &b : bad) {
        cgd_diag_hparams h = base();
        b.set(h);
        const float before = p[0];
        EXPECT_EQ(step_one(h, t), CGD_ERR_INVALID_ARGUMENT) << b.field;
        std::string msg = cgd_last_error();
        EXPECT_NE(msg.find(std::string("hparams.") + b.field), std::string::npos) << msg;
        EXPECT_NE(msg.find(b.value), std::string::npos) << msg;
        EXPECT_EQ(p[0], before);
        EXPECT_EQ(step, 0.0f);
    }
    EXPECT_EQ(step_one(base(), t), CGD_OK);
    EXPECT_STREQ(cgd_last_error(), "");
}

TEST(DiagStepErrors, MissingStateAndBadDescriptors) {
    float p[2] = {1, 2}, g[2] = {0.1f, 0.2f}, m2[2] = {};
    double step = 0;
    cgd_diag_hparams h = base();
    EXPECT_EQ(step_one(h, {p, g, nullptr, m2, &step, 2}), CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("tensors[0].exp_avg is NULL"), std::string::npos) << cgd_last_error();
    h.power = 0.5, h.beta1 = 0;
    EXPECT_EQ(step_one(h, {p, g, nullptr, nullptr, &step, 2}), CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("exp_avg_sq is NULL"), std::string::npos) << cgd_last_error();
    EXPECT_EQ(step_one(h, {p, g, nullptr, m2, &step, -3}), CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("-3"), std::string::npos) << cgd_last_error();
    EXPECT_EQ(step_one(h, {p, g, nullptr, m2, nullptr, 2}), CGD_ERR_INVALID_ARGUMENT);
    EXPECT_EQ(step_one(h, {p, g, nullptr, m2, &step, 2}, (cgd_dtype)9), CGD_ERR_INVALID_ARGUMENT);
    EXPECT_NE(std::string(cgd_last_error()).find("dtype = 9"), std::string::npos) << cgd_last_error();
    EXPECT_EQ(cgd_diag_step(nullptr, CGD_FLOAT32, nullptr, 0, nullptr, nullptr, CGD_CPU, nullptr),
              CGD_ERR_INVALID_ARGUMENT);
    // SGD without momentum needs no state at all.
    h.power = 0;
    EXPECT_EQ(step_one(h, {p, g, nullptr, nullptr, &step, 2}), CGD_OK) << cgd_last_error();
    EXPECT_EQ(step, 1.0f);
}

TEST(DiagStepErrors, CudaRequestInACpuBuildIsUnsupported) {
    if (cgd_has_cuda()) GTEST_SKIP() << "this build has CUDA kernels";
    float p[1] = {1}, g[1] = {1}, m1[1] = {}, m2[1] = {};
    double step = 0;
    EXPECT_EQ(step_one(base(), {p, g, m1, m2, &step, 1}, CGD_FLOAT32, CGD_CUDA), CGD_ERR_UNSUPPORTED);
    EXPECT_NE(std::string(cgd_last_error()).find("no CUDA kernels"), std::string::npos);
}

TEST(Api, VersionAndStatusNames) {
    std::string v = cgd_version();
    EXPECT_EQ(v.rfind("0.1.0+", 0), 0u) << v;
    EXPECT_EQ(v.find("cuda") != std::string::npos, cgd_has_cuda() == 1);
    EXPECT_STREQ(cgd_status_name(CGD_ERR_CUDA), "CGD_ERR_CUDA");
    EXPECT_STREQ(cgd_status_name((cgd_status)42), "CGD_UNKNOWN_STATUS");
}

} // namespace
