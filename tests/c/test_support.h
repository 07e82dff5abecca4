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

#endif // CGD_TEST_SUPPORT_H
