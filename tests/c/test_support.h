// Shared by the GoogleTest files: whether the CUDA cases can run, and the skip that says why when they cannot.
#ifndef CGD_TEST_SUPPORT_H
#define CGD_TEST_SUPPORT_H

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cgd.h"
#include "kernels.h" // cgd_hooks

#ifdef CGD_WITH_CUDA
#include <cuda_runtime.h>
#endif

inline bool cuda_device_present() {
#ifdef CGD_WITH_CUDA
    int n = 0;
    return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
#else
    return false;
#endif
}

// CGD_REQUIRE_CUDA=1 (the GPU host's check, benchmarks/gpu_check.sh): there a CUDA case that cannot run is a
// failure, not a skip that a green run would hide.
inline bool cuda_required() {
    const char *v = std::getenv("CGD_REQUIRE_CUDA");
    return v && std::strcmp(v, "1") == 0;
}

#define CGD_SKIP_OR_FAIL_(why)                                                                                  \
    do {                                                                                                        \
        if (cuda_required()) FAIL() << why;                                                                     \
        GTEST_SKIP() << why;                                                                                    \
    } while (0)

// In SetUp of a suite parameterised by cgd_device: CUDA cases skip, saying why, without kernels or a device.
#define CGD_SKIP_UNLESS_RUNNABLE(device)                                                                        \
    do {                                                                                                        \
        if ((device) == CGD_CUDA && !cgd_has_cuda()) CGD_SKIP_OR_FAIL_("built without CUDA kernels");           \
        if ((device) == CGD_CUDA && !cuda_device_present())                                                     \
            CGD_SKIP_OR_FAIL_("CUDA kernels are built but no CUDA device is present: CUDA path not run");       \
    } while (0)

// The workspace of one call on `device`, of the size its *_workspace_size function reported (nothing on the
// CPU, where that size is 0). cudaMalloc returns 256-byte aligned memory, as the C API requires.
struct Workspace {
    void *data = nullptr;
    size_t bytes = 0;
    Workspace(cgd_device device, size_t size) : bytes(size) {
#ifdef CGD_WITH_CUDA
        if (device == CGD_CUDA && size > 0) EXPECT_EQ(cudaMalloc(&data, size), cudaSuccess);
#endif
    }
    ~Workspace() {
#ifdef CGD_WITH_CUDA
        if (data) {
            EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess); // the call's kernels may still be using it
            cudaFree(data);
        }
#endif
    }
    Workspace(const Workspace &) = delete;
    Workspace &operator=(const Workspace &) = delete;
};

// Copies host vectors to the device and back around one call (a no-op on the CPU). On the way back it also
// checks that the call left no sticky CUDA error behind for an unrelated later call to report.
struct Mirror {
    cgd_device device;
    std::vector<std::pair<void *, std::pair<void *, size_t>>> pairs; // device pointer, (host pointer, bytes)
    void *put(void *host, size_t bytes) {
        if (device == CGD_CPU || bytes == 0) return bytes ? host : nullptr;
#ifdef CGD_WITH_CUDA
        void *d = nullptr;
        EXPECT_EQ(cudaMalloc(&d, bytes), cudaSuccess);
        EXPECT_EQ(cudaMemcpy(d, host, bytes, cudaMemcpyHostToDevice), cudaSuccess);
        pairs.push_back({d, {host, bytes}});
        return d;
#else
        return host;
#endif
    }
    ~Mirror() {
#ifdef CGD_WITH_CUDA
        if (device == CGD_CPU) return;
        EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
        EXPECT_EQ(cudaPeekAtLastError(), cudaSuccess);
        for (auto &p : pairs) {
            EXPECT_EQ(cudaMemcpy(p.second.first, p.first, p.second.second, cudaMemcpyDeviceToHost), cudaSuccess);
            cudaFree(p.first);
        }
#endif
    }
};

template <typename T> size_t bytes(const std::vector<T> &v) { return v.size() * sizeof(T); }

inline std::vector<float> normal_vector(std::mt19937 &rng, int64_t n) {
    std::normal_distribution<float> normal;
    std::vector<float> v(n);
    for (float &x : v) x = normal(rng);
    return v;
}

// Fault injection for the CPU kernels' scratch: runs `step` with only the first k host allocations allowed, for
// k = 0, 1, ... until it succeeds, and after every failure has `unchanged(what)` check that nothing changed.
// Returns the number of allocations the successful step made.
template <typename Step, typename Check> long long fail_each_allocation(Step step, Check unchanged) {
    for (long long k = 0;; ++k) {
        cgd_hooks.host_allocs_before_failure = k;
        const cgd_status st = step();
        cgd_hooks.host_allocs_before_failure = -1;
        if (st == CGD_OK) return k;
        EXPECT_EQ(st, CGD_ERR_UNSUPPORTED) << cgd_last_error();
        EXPECT_NE(std::string(cgd_last_error()).find("nothing changed"), std::string::npos) << cgd_last_error();
        unchanged("allocation " + std::to_string(k) + " failed");
        if (k >= 100) {
            ADD_FAILURE() << "the step never succeeded";
            return k;
        }
    }
}

// One float32 tensor stepped by cgd_block_step with `nblocks` blocks of `block`, its state on the host.
struct Blocked {
    int64_t block, nblocks;
    std::vector<float> param, m1, m2, precond, eig;
    double step = 0.0;
    float counters[3] = {0, 0, 0};
    std::vector<int32_t> outcome;
};

inline Blocked make_blocked(int64_t block, int64_t nblocks, float m2_init, const std::vector<float> &start) {
    Blocked b{block, nblocks, start};
    b.m1.assign(block * nblocks, 0.0f);
    b.m2.assign(block * block * nblocks, 0.0f);
    for (int64_t n = 0; n < nblocks; ++n)
        for (int64_t i = 0; i < block; ++i) b.m2[n * block * block + i * block + i] = m2_init;
    b.precond.assign(b.m2.size(), 0.0f);
    b.eig.assign(block * nblocks, 0.0f);
    b.outcome.assign(nblocks, CGD_BLOCK_NEVER);
    return b;
}

// One step of b on `device`, with a workspace `shortfall` bytes smaller than the one cgd_block_workspace_size
// asks for (0: exactly that).
inline cgd_status run_blocked(cgd_device device, const cgd_block_hparams &h, Blocked &b, std::vector<float> grad,
                              size_t shortfall = 0) {
    Mirror m{device};
    cgd_block_tensor t{m.put(b.param.data(), bytes(b.param)), m.put(grad.data(), bytes(grad)),
                       (int64_t)b.param.size(), 0};
    cgd_block_state st{b.block, b.nblocks, (float *)m.put(b.m1.data(), bytes(b.m1)),
                       (float *)m.put(b.m2.data(), bytes(b.m2)), (float *)m.put(b.precond.data(), bytes(b.precond)),
                       (float *)m.put(b.eig.data(), bytes(b.eig)), (double *)m.put(&b.step, sizeof b.step),
                       (int32_t *)m.put(b.outcome.data(), bytes(b.outcome)),
                       (float *)m.put(b.counters, sizeof b.counters)};
    size_t need = 0;
    cgd_block_workspace_size(&h, CGD_FLOAT32, &st, device, nullptr, &need); // on bad arguments the step below names them
    Workspace ws(device, need);
    return cgd_block_step(&h, CGD_FLOAT32, &t, 1, &st, nullptr, nullptr, ws.data, ws.bytes - shortfall, device,
                          nullptr);
}

#endif // CGD_TEST_SUPPORT_H
