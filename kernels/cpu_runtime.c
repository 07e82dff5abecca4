/*
 * What the CPU kernels share at run time: their thread count, the split of a call's chunks among its threads, and
 * their heap scratch, taken through one pair of functions so the C tests can make an allocation fail
 * (cgd_test_hooks in kernels.h) and check that a step that cannot get its scratch changes nothing.
 */
#include <stdlib.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"

/* OpenBLAS's own pool does not follow OpenMP's setting; linked against another BLAS, the symbol is absent. */
void openblas_set_num_threads(int n) __attribute__((weak));

void cgd_set_cpu_threads(int n) {
    static _Thread_local int current = 0;
    if (n < 1 || n == current) return;
    current = n;
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
    if (openblas_set_num_threads) openblas_set_num_threads(n);
}

cgd_cpu_share cgd_cpu_my_share(void) {
    cgd_cpu_share share = {0, 1};
#ifdef _OPENMP
    share.id = omp_get_thread_num();
    share.threads = omp_get_num_threads();
#endif
    return share;
}

cgd_test_hooks cgd_hooks = {-1, 0, 0};

static int allocation_allowed(void) {
    int allowed = 1;
#pragma omp critical(cgd_hooks)
    {
        if (cgd_hooks.host_allocs_before_failure == 0)
            allowed = 0;
        else if (cgd_hooks.host_allocs_before_failure > 0)
            --cgd_hooks.host_allocs_before_failure;
    }
    return allowed;
}

void *cgd_host_alloc(size_t bytes) { return allocation_allowed() ? malloc(bytes ? bytes : 1) : NULL; }

void *cgd_host_zalloc(size_t bytes) { return allocation_allowed() ? calloc(bytes ? bytes : 1, 1) : NULL; }
