// Shared by the GoogleTest files: whether the CUDA cases can run, and the skip that says why when they cannot.
#ifndef CGD_TEST_SUPPORT_H
#define CGD_TEST_SUPPORT_H

#include <gtest/gtest.h>

#include "cgd.h"

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

// In SetUp of a suite parameterised by cgd_device: CUDA cases skip, saying why, without kernels or a device.
#define CGD_SKIP_UNLESS_RUNNABLE(device)                                                                        \
    do {                                                                                                        \
        if ((device) == CGD_CUDA && !cgd_has_cuda()) GTEST_SKIP() << "built without CUDA kernels";              \
        if ((device) == CGD_CUDA && !cuda_device_present())                                                     \
            GTEST_SKIP() << "CUDA kernels are built but no CUDA device is present: CUDA path not run";          \
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
        if (data) cudaFree(data);
#endif
    }
    Workspace(const Workspace &) = delete;
    Workspace &operator=(const Workspace &) = delete;
};

#endif // CGD_TEST_SUPPORT_H
