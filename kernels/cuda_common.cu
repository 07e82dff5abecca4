/*
 * The CUDA entry points that belong to no one kernel family: error strings and creating the cuSOLVER/cuBLAS
 * handles ahead of a CUDA-graph capture.
 */
#include "cuda_solver.cuh"
#include "kernels.h"

extern "C" const char *cgd_cuda_error_string(int error) { return cudaGetErrorString((cudaError_t)error); }

extern "C" int cgd_cuda_prepare(char *why, int why_size) {
    CgdFailure fail = {why, why_size, 0};
    return cgd_solver_handles(nullptr, false, fail) ? 0 : fail.code;
}
