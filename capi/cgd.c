/*
 * The C API: validates every argument (naming it and its value in the message), then dispatches to the CPU or
 * CUDA kernels. Nothing here aborts or prints.
 */
#include "cgd.h"

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>

#include "kernels.h"

#define CGD_STR2(x) #x
#define CGD_STR(x) CGD_STR2(x)
#define CGD_VERSION_STRING CGD_STR(CGD_VERSION_MAJOR) "." CGD_STR(CGD_VERSION_MINOR) "." CGD_STR(CGD_VERSION_PATCH)

/* Largest tensor accepted: 2^46 - 2^15 elements, far above any device memory, keeps every chunk count of the CUDA
   multi-tensor launches (CGD_MT_CHUNK elements each) within int32. */
#define CGD_MAX_NUMEL (((int64_t)1 << 46) - CGD_MT_CHUNK)

/* Largest side of a matrix the eigensolvers see: n^2 must stay below 2^31 for cuSOLVER's int sizes. */
#define CGD_MAX_MATRIX 46340

static _Thread_local char last_error[512];

static cgd_status fail(cgd_status status, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error, sizeof last_error, fmt, ap);
    va_end(ap);
    return status;
}

static cgd_status ok(void) {
    last_error[0] = '\0';
    return CGD_OK;
}

const char *cgd_version(void) {
#ifdef CGD_WITH_CUDA
    return CGD_VERSION_STRING "+cuda";
#else
    return CGD_VERSION_STRING "+cpu";
#endif
}

int cgd_has_cuda(void) {
#ifdef CGD_WITH_CUDA
    return 1;
#else
    return 0;
#endif
}

const char *cgd_status_name(cgd_status status) {
    switch (status) {
    case CGD_OK: return "CGD_OK";
    case CGD_ERR_INVALID_ARGUMENT: return "CGD_ERR_INVALID_ARGUMENT";
    case CGD_ERR_UNSUPPORTED: return "CGD_ERR_UNSUPPORTED";
    case CGD_ERR_CUDA: return "CGD_ERR_CUDA";
    }
    return "CGD_UNKNOWN_STATUS";
}

const char *cgd_last_error(void) { return last_error; }

/* The end of every call that reached the CUDA kernels (a build without them links stubs that report it). */
static cgd_status cuda_outcome(const char *fn, int e) {
    return e ? fail(CGD_ERR_CUDA, "%s: CUDA error %d: %s", fn, e, cgd_cuda_error_string(e)) : ok();
}

static cgd_status check_common(const char *fn, cgd_dtype dtype, cgd_device device, int64_t count) {
    if (dtype != CGD_FLOAT32 && dtype != CGD_FLOAT16 && dtype != CGD_BFLOAT16 && dtype != CGD_FLOAT64)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: dtype = %d is not a cgd_dtype", fn, (int)dtype);
    if (device != CGD_CPU && device != CGD_CUDA)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: device = %d is not a cgd_device", fn, (int)device);
    if (count < 0) return fail(CGD_ERR_INVALID_ARGUMENT, "%s: count = %lld is negative", fn, (long long)count);
#ifndef CGD_WITH_CUDA
    if (device == CGD_CUDA)
        return fail(CGD_ERR_UNSUPPORTED, "%s: device = CGD_CUDA but this build of torch-cgd (%s) has no CUDA kernels",
                    fn, cgd_version());
#endif
    return CGD_OK;
}

cgd_status cgd_prepare(cgd_device device) {
    static const char fn[] = "cgd_prepare";
    cgd_status st;
    if ((st = check_common(fn, CGD_FLOAT32, device, 0))) return st;
    if (device == CGD_CPU) return ok();
    char why[256];
    int e = cgd_cuda_prepare(why, sizeof why);
    return e ? fail(CGD_ERR_CUDA, "%s: %s", fn, why) : ok();
}

/* The end of a step that takes a workspace: NULL is only fine when none is needed, and a short one is refused
   before the kernels run. */
static cgd_status check_workspace(const char *fn, const void *workspace, size_t given, size_t needed) {
    if (given < needed || (needed > 0 && !workspace))
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: workspace of %zu bytes at %p, but this call needs %zu bytes (see "
                    "its *_workspace_size function)", fn, given, workspace, needed);
    if (((uintptr_t)workspace & 255u) != 0)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: workspace %p is not 256-byte aligned", fn, workspace);
    return CGD_OK;
}

static cgd_status check_numel(const char *fn, const char *label, int64_t i, int64_t numel) {
    if (numel < 0 || numel > CGD_MAX_NUMEL)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: %s[%lld] = %lld elements is outside [0, 2^46 - 2^15]", fn, label,
                    (long long)i, (long long)numel);
    return CGD_OK;
}

/* In [lo, hi], or [lo, hi) when hi_open; NaN fails every comparison and is reported like any other value. */
static cgd_status check_range(const char *fn, const char *name, double v, double lo, double hi, int hi_open) {
    int inside = v >= lo && (hi_open ? v < hi : v <= hi);
    if (!inside)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: hparams.%s = %g is outside [%g, %g%s", fn, name, v, lo, hi,
                    hi_open ? ")" : "]");
    return CGD_OK;
}

static cgd_status check_hparams(const cgd_diag_hparams *h) {
    cgd_status st;
    if ((st = check_range("cgd_diag_step", "lr", h->lr, 0.0, INFINITY, 1))) return st;
    if ((st = check_range("cgd_diag_step", "beta1", h->beta1, 0.0, 1.0, h->bias_correction != 0))) return st;
    if ((st = check_range("cgd_diag_step", "beta2", h->beta2, 0.0, 1.0, h->bias_correction != 0))) return st;
    if ((st = check_range("cgd_diag_step", "power", h->power, 0.0, 1.0, 0))) return st;
    if ((st = check_range("cgd_diag_step", "eps", h->eps, 0.0, INFINITY, 1))) return st;
    if ((st = check_range("cgd_diag_step", "weight_decay", h->weight_decay, 0.0, INFINITY, 1))) return st;
    if (!(h->grad_weight > 0.0 && h->grad_weight < INFINITY))
        return fail(CGD_ERR_INVALID_ARGUMENT, "cgd_diag_step: hparams.grad_weight = %g must be positive and finite",
                    h->grad_weight);
    if (!(h->first_grad_weight >= 0.0 && h->first_grad_weight < INFINITY))
        return fail(CGD_ERR_INVALID_ARGUMENT,
                    "cgd_diag_step: hparams.first_grad_weight = %g must be 0 (none) or positive and finite",
                    h->first_grad_weight);
    if (h->moment != CGD_MOMENT_RAW && h->moment != CGD_MOMENT_CENTERED && h->moment != CGD_MOMENT_BELIEF)
        return fail(CGD_ERR_INVALID_ARGUMENT, "cgd_diag_step: hparams.moment = %d is not a cgd_moment", (int)h->moment);
    if (!(h->guard_limit >= 0.0))
        return fail(CGD_ERR_INVALID_ARGUMENT, "cgd_diag_step: hparams.guard_limit = %g must be >= 0 (0: none)",
                    h->guard_limit);
    return CGD_OK;
}

cgd_status cgd_diag_step(const cgd_diag_hparams *hparams, cgd_dtype dtype, const cgd_diag_tensor *tensors,
                         int64_t count, const float *grad_scale, const float *skip, cgd_device device,
                         void *stream) {
    static const char fn[] = "cgd_diag_step";
    cgd_status st;
    if (!hparams) return fail(CGD_ERR_INVALID_ARGUMENT, "%s: hparams is NULL", fn);
    if ((st = check_hparams(hparams))) return st;
    if ((st = check_common(fn, dtype, device, count))) return st;
    if (count > 0 && !tensors) return fail(CGD_ERR_INVALID_ARGUMENT, "%s: tensors is NULL but count = %lld", fn,
                                           (long long)count);
    const int has_m1 = cgd_diag_needs_m1(hparams), has_m2 = cgd_diag_needs_m2(hparams);
    for (int64_t i = 0; i < count; ++i) {
        const cgd_diag_tensor *t = &tensors[i];
        if ((st = check_numel(fn, "tensors.numel", i, t->numel))) return st;
        if (!t->step) return fail(CGD_ERR_INVALID_ARGUMENT, "%s: tensors[%lld].step is NULL", fn, (long long)i);
        if (t->numel == 0) continue;
        if (!t->param || !t->grad)
            return fail(CGD_ERR_INVALID_ARGUMENT, "%s: tensors[%lld].%s is NULL", fn, (long long)i,
                        t->param ? "grad" : "param");
        if (has_m1 && !t->exp_avg)
            return fail(CGD_ERR_INVALID_ARGUMENT,
                        "%s: tensors[%lld].exp_avg is NULL but beta1 = %g and moment = %d need the first moment", fn,
                        (long long)i, hparams->beta1, (int)hparams->moment);
        if (has_m2 && !t->exp_avg_sq)
            return fail(CGD_ERR_INVALID_ARGUMENT,
                        "%s: tensors[%lld].exp_avg_sq is NULL but power = %g needs the second moment", fn,
                        (long long)i, hparams->power);
    }
    if (device == CGD_CPU) {
        CGD_BY_REAL(dtype, cgd_cpu_diag_step)(hparams, dtype, tensors, count, grad_scale, skip);
        return ok();
    }
    return cuda_outcome(
        fn, CGD_BY_REAL(dtype, cgd_cuda_diag_step)(hparams, dtype, tensors, count, grad_scale, skip, stream));
}

cgd_status cgd_nonfinite_check(cgd_dtype dtype, const void *const *data, const int64_t *numels,
                               const double *limits, int64_t count, int32_t *flags, float *found, cgd_device device,
                               void *stream) {
    static const char fn[] = "cgd_nonfinite_check";
    cgd_status st;
    if ((st = check_common(fn, dtype, device, count))) return st;
    if (!found) return fail(CGD_ERR_INVALID_ARGUMENT, "%s: found is NULL", fn);
    if (count > 0 && (!data || !numels || !flags))
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: %s is NULL but count = %lld", fn,
                    !data ? "data" : (!numels ? "numels" : "flags"), (long long)count);
    for (int64_t i = 0; i < count; ++i) {
        if ((st = check_numel(fn, "numels", i, numels[i]))) return st;
        if (numels[i] > 0 && !data[i])
            return fail(CGD_ERR_INVALID_ARGUMENT, "%s: data[%lld] is NULL", fn, (long long)i);
        if (limits && !(limits[i] > 0.0))
            return fail(CGD_ERR_INVALID_ARGUMENT, "%s: limits[%lld] = %g must be positive (INFINITY for none)", fn,
                        (long long)i, limits[i]);
    }
    if (device == CGD_CPU) {
        cgd_cpu_nonfinite_check(dtype, data, numels, limits, count, flags, found);
        return ok();
    }
    return cuda_outcome(fn, cgd_cuda_nonfinite_check(dtype, data, numels, limits, count, flags, found, stream));
}

static cgd_status check_block_hparams(const char *fn, const cgd_block_hparams *h) {
    cgd_status st;
    if ((st = check_range(fn, "lr", h->lr, 0.0, INFINITY, 1))) return st;
    if ((st = check_range(fn, "beta1", h->beta1, 0.0, 1.0, 1))) return st;
    if ((st = check_range(fn, "beta2", h->beta2, 0.0, 1.0, 1))) return st;
    if ((st = check_range(fn, "power", h->power, 0.0, 1.0, 0))) return st;
    if ((st = check_range(fn, "eps", h->eps, 0.0, INFINITY, 1))) return st;
    if ((st = check_range(fn, "weight_decay", h->weight_decay, 0.0, INFINITY, 1))) return st;
    if (h->power > 0.0 && h->eps == 0.0)
        return fail(CGD_ERR_INVALID_ARGUMENT,
                    "%s: hparams.eps = 0 with power = %g: a covariance matrix is only semi-definite, so "
                    "(eps I + C)^-a needs eps > 0", fn, h->power);
    if (h->solver != CGD_SOLVER_EIGH && h->solver != CGD_SOLVER_LANCZOS)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: hparams.solver = %d is not a cgd_block_solver (0: eigh, 1: lanczos)",
                    fn, (int)h->solver);
    return CGD_OK;
}

/* On a direction without variance the metric's inverse is eps^-power: finite in the state's precision, or P holds
   Inf and the step NaN. */
static cgd_status check_eps_for_dtype(const char *fn, const cgd_block_hparams *h, cgd_dtype dtype) {
    const double largest = dtype == CGD_FLOAT64 ? DBL_MAX : FLT_MAX;
    if (h->power > 0.0 && !(pow(h->eps, -h->power) <= largest))
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: hparams.eps = %g with power = %g: eps^-power = %g overflows the %s "
                    "state", fn, h->eps, h->power, pow(h->eps, -h->power),
                    dtype == CGD_FLOAT64 ? "float64" : "float32");
    return CGD_OK;
}

static cgd_status check_block_layout(const char *fn, const cgd_block_hparams *hparams, const cgd_block_state *state) {
    cgd_status st;
    if (!hparams) return fail(CGD_ERR_INVALID_ARGUMENT, "%s: hparams is NULL", fn);
    if (!state) return fail(CGD_ERR_INVALID_ARGUMENT, "%s: state is NULL", fn);
    if ((st = check_block_hparams(fn, hparams))) return st;
    if (state->block < 1 || state->block > CGD_MAX_MATRIX)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: state.block = %lld is outside [1, %d]", fn,
                    (long long)state->block, CGD_MAX_MATRIX);
    if (state->nblocks < 1 || state->nblocks > CGD_MAX_NUMEL / state->block)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: state.nblocks = %lld is outside [1, (2^46 - 2^15) / block]", fn,
                    (long long)state->nblocks);
    return CGD_OK;
}

/* The workspace a block step needs on `device`, for the two public entry points. */
static cgd_status block_workspace(const char *fn, const cgd_block_hparams *hparams, cgd_dtype dtype,
                                  const cgd_block_state *state, cgd_device device, void *stream, size_t *bytes) {
    *bytes = 0;
    if (device == CGD_CPU) return CGD_OK;
    if (hparams->solver == CGD_SOLVER_LANCZOS)
        return fail(CGD_ERR_UNSUPPORTED, "%s: hparams.solver = CGD_SOLVER_LANCZOS runs on the CPU only; on CUDA use "
                    "CGD_SOLVER_EIGH", fn);
    char why[256];
    int e = CGD_BY_REAL(dtype, cgd_cuda_block_workspace)(hparams, state, stream, bytes, why, sizeof why);
    return e ? fail(CGD_ERR_CUDA, "%s: %s", fn, why) : CGD_OK;
}

cgd_status cgd_block_workspace_size(const cgd_block_hparams *hparams, cgd_dtype dtype, const cgd_block_state *state,
                                    cgd_device device, void *stream, size_t *bytes) {
    static const char fn[] = "cgd_block_workspace_size";
    cgd_status st;
    if (!bytes) return fail(CGD_ERR_INVALID_ARGUMENT, "%s: bytes is NULL", fn);
    if ((st = check_block_layout(fn, hparams, state))) return st;
    if ((st = check_common(fn, dtype, device, 0))) return st;
    if ((st = check_eps_for_dtype(fn, hparams, dtype))) return st;
    if ((st = block_workspace(fn, hparams, dtype, state, device, stream, bytes))) return st;
    return ok();
}

cgd_status cgd_block_step(const cgd_block_hparams *hparams, cgd_dtype dtype, const cgd_block_tensor *tensors,
                          int64_t count, const cgd_block_state *state, const float *grad_scale, const float *skip,
                          void *workspace, size_t workspace_bytes, cgd_device device, void *stream) {
    static const char fn[] = "cgd_block_step";
    cgd_status st;
    if ((st = check_block_layout(fn, hparams, state))) return st;
    if ((st = check_common(fn, dtype, device, count))) return st;
    if ((st = check_eps_for_dtype(fn, hparams, dtype))) return st;
    if (count > 0 && !tensors)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: tensors is NULL but count = %lld", fn, (long long)count);
    const int needs_p = hparams->solver == CGD_SOLVER_EIGH;
    if (!state->exp_avg || !state->exp_avg_sq || (needs_p && (!state->precond || !state->eigvals)) || !state->step ||
        !state->outcome || !state->counters)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: state.%s is NULL", fn,
                    !state->exp_avg ? "exp_avg" : !state->exp_avg_sq ? "exp_avg_sq" : !state->precond ? "precond"
                    : !state->eigvals ? "eigvals" : !state->step ? "step" : !state->outcome ? "outcome" : "counters");
    int64_t length = state->block * state->nblocks, end = 0;
    for (int64_t i = 0; i < count; ++i) {
        const cgd_block_tensor *t = &tensors[i];
        if ((st = check_numel(fn, "tensors.numel", i, t->numel))) return st;
        if (t->offset < end || t->offset > length - t->numel)
            return fail(CGD_ERR_INVALID_ARGUMENT,
                        "%s: tensors[%lld] covers [%lld, %lld), which overlaps the previous tensor (ends at %lld) or "
                        "leaves the blocked vector of %lld coordinates", fn, (long long)i, (long long)t->offset,
                        (long long)(t->offset + t->numel), (long long)end, (long long)length);
        if (t->numel > 0 && (!t->param || !t->grad))
            return fail(CGD_ERR_INVALID_ARGUMENT, "%s: tensors[%lld].%s is NULL", fn, (long long)i,
                        t->param ? "grad" : "param");
        end = t->offset + t->numel;
    }
    size_t needed = 0;
    if ((st = block_workspace(fn, hparams, dtype, state, device, stream, &needed))) return st;
    if ((st = check_workspace(fn, workspace, workspace_bytes, needed))) return st;
    if (device == CGD_CPU) {
        int failed = CGD_BY_REAL(dtype, cgd_cpu_block_step)(hparams, dtype, tensors, count, state, grad_scale, skip);
        if (failed)
            return fail(CGD_ERR_UNSUPPORTED, "%s: out of host memory for the scratch space; nothing changed", fn);
        return ok();
    }
    char why[256];
    int e = CGD_BY_REAL(dtype, cgd_cuda_block_step)(hparams, dtype, tensors, count, state, grad_scale, skip, workspace,
                                                    stream, why, sizeof why);
    return e ? fail(CGD_ERR_CUDA, "%s: %s", fn, why) : ok();
}

/* The window's largest size: its small eigenproblems are (window + 1)-sided, in double, every step. */
#define CGD_MAX_WINDOW 1024

cgd_status cgd_window_step(const cgd_block_hparams *hparams, cgd_dtype dtype, const cgd_block_tensor *tensors,
                           int64_t count, const cgd_window_state *state, const float *grad_scale, const float *skip,
                           cgd_device device) {
    static const char fn[] = "cgd_window_step";
    cgd_status st;
    if (!hparams) return fail(CGD_ERR_INVALID_ARGUMENT, "%s: hparams is NULL", fn);
    if (!state) return fail(CGD_ERR_INVALID_ARGUMENT, "%s: state is NULL", fn);
    cgd_block_hparams read = *hparams; /* refresh and solver are not read: whatever they hold is fine */
    read.solver = CGD_SOLVER_EIGH;
    if ((st = check_block_hparams(fn, &read))) return st;
    if ((st = check_common(fn, dtype, device, count))) return st;
    if ((st = check_eps_for_dtype(fn, hparams, dtype))) return st;
    if (device != CGD_CPU)
        return fail(CGD_ERR_UNSUPPORTED, "%s: the window solver runs on the CPU only", fn);
    if (state->n < 1)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: state.n = %lld must be >= 1", fn, (long long)state->n);
    if (state->window < 1 || state->window > CGD_MAX_WINDOW)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: state.window = %lld is outside [1, %d]", fn,
                    (long long)state->window, CGD_MAX_WINDOW);
    if (!state->exp_avg || !state->history || !state->gram || !state->identity || !state->step || !state->counters)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: state.%s is NULL", fn,
                    !state->exp_avg ? "exp_avg" : !state->history ? "history" : !state->gram ? "gram"
                    : !state->identity ? "identity" : !state->step ? "step" : "counters");
    if (!(*state->step >= 0.0) || *state->step != floor(*state->step))
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: *state.step = %g is not a count of steps", fn, *state->step);
    if (!(*state->identity >= 0.0) || !isfinite(*state->identity))
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: *state.identity = %g must be finite and >= 0", fn,
                    *state->identity);
    if (count > 0 && !tensors)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: tensors is NULL but count = %lld", fn, (long long)count);
    int64_t end = 0;
    for (int64_t i = 0; i < count; ++i) {
        const cgd_block_tensor *t = &tensors[i];
        if ((st = check_numel(fn, "tensors.numel", i, t->numel))) return st;
        if (t->offset < end || t->offset > state->n - t->numel)
            return fail(CGD_ERR_INVALID_ARGUMENT,
                        "%s: tensors[%lld] covers [%lld, %lld), which overlaps the previous tensor (ends at %lld) or "
                        "leaves the vector of %lld coordinates", fn, (long long)i, (long long)t->offset,
                        (long long)(t->offset + t->numel), (long long)end, (long long)state->n);
        if (t->numel > 0 && (!t->param || !t->grad))
            return fail(CGD_ERR_INVALID_ARGUMENT, "%s: tensors[%lld].%s is NULL", fn, (long long)i,
                        t->param ? "grad" : "param");
        end = t->offset + t->numel;
    }
    if (CGD_BY_REAL(dtype, cgd_cpu_window_step)(hparams, dtype, tensors, count, state, grad_scale, skip))
        return fail(CGD_ERR_UNSUPPORTED, "%s: out of host memory for the scratch space; nothing changed", fn);
    return ok();
}

/* The sizes and pointers of a kron step's tensors; the workspace query, which a caller makes before it allocates
   anything, reads the sizes and flags only (check_pointers = 0). */
static cgd_status check_kron_tensors(const char *fn, const cgd_block_hparams *hparams, cgd_dtype dtype,
                                     const cgd_kron_tensor *tensors, int64_t count, cgd_device device,
                                     int check_pointers, int eigenbasis) {
    cgd_status st;
    if (!hparams) return fail(CGD_ERR_INVALID_ARGUMENT, "%s: hparams is NULL", fn);
    if ((st = check_block_hparams(fn, hparams))) return st;
    if (hparams->solver != CGD_SOLVER_EIGH)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: hparams.solver = %d; a kron step eigendecomposes its factors "
                    "(CGD_SOLVER_EIGH = 0)", fn, (int)hparams->solver);
    if ((st = check_common(fn, dtype, device, count))) return st;
    if ((st = check_eps_for_dtype(fn, hparams, dtype))) return st;
    if (count > 0 && !tensors)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: tensors is NULL but count = %lld", fn, (long long)count);
    for (int64_t i = 0; i < count; ++i) {
        const cgd_kron_tensor *t = &tensors[i];
        if (t->rows < 1 || t->cols < 1 || t->rows > CGD_MAX_NUMEL / t->cols)
            return fail(CGD_ERR_INVALID_ARGUMENT, "%s: tensors[%lld] is %lld x %lld; both sides must be >= 1 and "
                        "the product <= 2^46 - 2^15", fn, (long long)i, (long long)t->rows, (long long)t->cols);
        if ((t->left_full && t->rows > CGD_MAX_MATRIX) || (t->right_full && t->cols > CGD_MAX_MATRIX))
            return fail(CGD_ERR_INVALID_ARGUMENT, "%s: tensors[%lld] asks for a full %s factor of side %lld; the "
                        "largest is %d (keep that side diagonal)", fn, (long long)i, t->left_full &&
                        t->rows > CGD_MAX_MATRIX ? "left" : "right", (long long)(t->left_full &&
                        t->rows > CGD_MAX_MATRIX ? t->rows : t->cols), CGD_MAX_MATRIX);
        if (!check_pointers) continue;
        const char *missing = !t->param ? "param" : !t->grad ? "grad" : !t->exp_avg ? "exp_avg"
                              : !t->left_sq ? "left_sq" : !t->right_sq ? "right_sq"
                              : (t->left_full && !t->left_basis) ? "left_basis"
                              : (t->right_full && !t->right_basis) ? "right_basis" : !t->left_eig ? "left_eig"
                              : !t->right_eig ? "right_eig" : !t->step ? "step" : !t->outcome ? "outcome"
                              : !t->counters ? "counters" : (eigenbasis && !t->rotated_sq) ? "rotated_sq" : NULL;
        if (missing) return fail(CGD_ERR_INVALID_ARGUMENT, "%s: tensors[%lld].%s is NULL", fn, (long long)i, missing);
    }
    return CGD_OK;
}

/* The workspace of a kron step or (eigenbasis = 1) an eigenbasis step: none on the CPU. */
static cgd_status kron_workspace(const char *fn, const cgd_block_hparams *hparams, cgd_dtype dtype,
                                 const cgd_kron_tensor *tensors, int64_t count, cgd_device device, void *stream,
                                 int eigenbasis, size_t *bytes) {
    *bytes = 0;
    if (device == CGD_CPU) return CGD_OK;
    char why[256];
    int e = eigenbasis ? CGD_BY_REAL(dtype, cgd_cuda_eigenbasis_workspace)(hparams, tensors, count, stream, bytes,
                                                                          why, sizeof why)
                       : CGD_BY_REAL(dtype, cgd_cuda_kron_workspace)(hparams, tensors, count, stream, bytes, why,
                                                                    sizeof why);
    return e ? fail(CGD_ERR_CUDA, "%s: %s", fn, why) : CGD_OK;
}

static cgd_status kron_workspace_size(const char *fn, const cgd_block_hparams *hparams, cgd_dtype dtype,
                                      const cgd_kron_tensor *tensors, int64_t count, cgd_device device, void *stream,
                                      int eigenbasis, size_t *bytes) {
    cgd_status st;
    if (!bytes) return fail(CGD_ERR_INVALID_ARGUMENT, "%s: bytes is NULL", fn);
    if ((st = check_kron_tensors(fn, hparams, dtype, tensors, count, device, 0, eigenbasis))) return st;
    if ((st = kron_workspace(fn, hparams, dtype, tensors, count, device, stream, eigenbasis, bytes))) return st;
    return ok();
}

/* One kron or (eigenbasis = 1) eigenbasis step: both take the same tensors, checks and workspace protocol. */
static cgd_status kron_step(const char *fn, const cgd_block_hparams *hparams, cgd_dtype dtype,
                            const cgd_kron_tensor *tensors, int64_t count, const float *grad_scale, const float *skip,
                            void *workspace, size_t workspace_bytes, cgd_device device, void *stream, int eigenbasis) {
    cgd_status st;
    size_t needed = 0;
    if ((st = check_kron_tensors(fn, hparams, dtype, tensors, count, device, 1, eigenbasis))) return st;
    if ((st = kron_workspace(fn, hparams, dtype, tensors, count, device, stream, eigenbasis, &needed))) return st;
    if ((st = check_workspace(fn, workspace, workspace_bytes, needed))) return st;
    if (device == CGD_CPU) {
        const int failed = eigenbasis
                               ? CGD_BY_REAL(dtype, cgd_cpu_eigenbasis_step)(hparams, dtype, tensors, count, grad_scale,
                                                                             skip)
                               : CGD_BY_REAL(dtype, cgd_cpu_kron_step)(hparams, dtype, tensors, count, grad_scale, skip);
        if (failed)
            return fail(CGD_ERR_UNSUPPORTED, "%s: out of host memory for the scratch space; nothing changed", fn);
        return ok();
    }
    char why[256];
    int e = eigenbasis ? CGD_BY_REAL(dtype, cgd_cuda_eigenbasis_step)(hparams, dtype, tensors, count, grad_scale, skip,
                                                                      workspace, stream, why, sizeof why)
                       : CGD_BY_REAL(dtype, cgd_cuda_kron_step)(hparams, dtype, tensors, count, grad_scale, skip,
                                                                workspace, stream, why, sizeof why);
    return e ? fail(CGD_ERR_CUDA, "%s: %s", fn, why) : ok();
}

cgd_status cgd_kron_workspace_size(const cgd_block_hparams *hparams, cgd_dtype dtype, const cgd_kron_tensor *tensors,
                                   int64_t count, cgd_device device, void *stream, size_t *bytes) {
    return kron_workspace_size("cgd_kron_workspace_size", hparams, dtype, tensors, count, device, stream, 0, bytes);
}

cgd_status cgd_kron_step(const cgd_block_hparams *hparams, cgd_dtype dtype, const cgd_kron_tensor *tensors,
                         int64_t count, const float *grad_scale, const float *skip, void *workspace,
                         size_t workspace_bytes, cgd_device device, void *stream) {
    return kron_step("cgd_kron_step", hparams, dtype, tensors, count, grad_scale, skip, workspace, workspace_bytes,
                     device, stream, 0);
}

cgd_status cgd_eigenbasis_workspace_size(const cgd_block_hparams *hparams, cgd_dtype dtype,
                                         const cgd_kron_tensor *tensors, int64_t count, cgd_device device,
                                         void *stream, size_t *bytes) {
    return kron_workspace_size("cgd_eigenbasis_workspace_size", hparams, dtype, tensors, count, device, stream, 1,
                               bytes);
}

cgd_status cgd_eigenbasis_step(const cgd_block_hparams *hparams, cgd_dtype dtype, const cgd_kron_tensor *tensors,
                               int64_t count, const float *grad_scale, const float *skip, void *workspace,
                               size_t workspace_bytes, cgd_device device, void *stream) {
    return kron_step("cgd_eigenbasis_step", hparams, dtype, tensors, count, grad_scale, skip, workspace,
                     workspace_bytes, device, stream, 1);
}

/* The hyperparameters and matrices of a Muon step; the workspace query reads the sizes only (check_pointers = 0). */
static cgd_status check_muon(const char *fn, const cgd_muon_hparams *h, cgd_dtype dtype,
                             const cgd_muon_tensor *tensors, int64_t count, cgd_device device, int check_pointers) {
    cgd_status st;
    if (!h) return fail(CGD_ERR_INVALID_ARGUMENT, "%s: hparams is NULL", fn);
    if ((st = check_range(fn, "lr", h->lr, 0.0, INFINITY, 1))) return st;
    if ((st = check_range(fn, "momentum", h->momentum, 0.0, 1.0, 1))) return st;
    if ((st = check_range(fn, "weight_decay", h->weight_decay, 0.0, INFINITY, 1))) return st;
    if (!(h->eps > 0.0) || !isfinite(h->eps))
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: hparams.eps = %g must be finite and > 0", fn, h->eps);
    if (!isfinite(h->ns_a) || !isfinite(h->ns_b) || !isfinite(h->ns_c))
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: hparams.ns_a, ns_b, ns_c = %g, %g, %g must be finite", fn, h->ns_a,
                    h->ns_b, h->ns_c);
    if (h->ns_steps < 0 || h->ns_steps >= 100)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: hparams.ns_steps = %d is outside [0, 100)", fn, (int)h->ns_steps);
    if (h->scale != CGD_MUON_ORIGINAL && h->scale != CGD_MUON_MATCH_RMS_ADAMW)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: hparams.scale = %d is not a cgd_muon_scale", fn, (int)h->scale);
    if (h->solver != CGD_MUON_NEWTON_SCHULZ && h->solver != CGD_MUON_EIGH)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: hparams.solver = %d is not a cgd_muon_solver", fn, (int)h->solver);
    if ((st = check_range(fn, "power", h->power, 0.0, 1.0, 0))) return st;
    if (h->solver == CGD_MUON_NEWTON_SCHULZ && h->power != 0.5)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: hparams.power = %g needs solver = CGD_MUON_EIGH (Newton-Schulz "
                    "iterates to the power 1/2 only)", fn, h->power);
    if ((st = check_common(fn, dtype, device, count))) return st;
    if (count > 0 && !tensors)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: tensors is NULL but count = %lld", fn, (long long)count);
    for (int64_t i = 0; i < count; ++i) {
        const cgd_muon_tensor *t = &tensors[i];
        if (t->rows < 1 || t->cols < 1 || t->rows > CGD_MAX_MATRIX || t->cols > CGD_MAX_MATRIX)
            return fail(CGD_ERR_INVALID_ARGUMENT, "%s: tensors[%lld] is %lld x %lld; each side must be in [1, %d]", fn,
                        (long long)i, (long long)t->rows, (long long)t->cols, CGD_MAX_MATRIX);
        if (check_pointers && (!t->param || !t->grad || !t->momentum || (h->solver == CGD_MUON_EIGH && !t->failures)))
            return fail(CGD_ERR_INVALID_ARGUMENT, "%s: tensors[%lld].%s is NULL", fn, (long long)i,
                        !t->param ? "param" : !t->grad ? "grad" : !t->momentum ? "momentum" : "failures");
    }
    return CGD_OK;
}

static cgd_status muon_workspace(const char *fn, const cgd_muon_hparams *h, cgd_dtype dtype,
                                 const cgd_muon_tensor *tensors, int64_t count, cgd_device device, void *stream,
                                 size_t *bytes) {
    *bytes = 0;
    if (device == CGD_CPU) return CGD_OK;
    char why[256];
    int e = CGD_BY_REAL(dtype, cgd_cuda_muon_workspace)(h, tensors, count, stream, bytes, why, sizeof why);
    return e ? fail(CGD_ERR_CUDA, "%s: %s", fn, why) : CGD_OK;
}

cgd_status cgd_muon_workspace_size(const cgd_muon_hparams *h, cgd_dtype dtype, const cgd_muon_tensor *tensors,
                                   int64_t count, cgd_device device, void *stream, size_t *bytes) {
    static const char fn[] = "cgd_muon_workspace_size";
    cgd_status st;
    if (!bytes) return fail(CGD_ERR_INVALID_ARGUMENT, "%s: bytes is NULL", fn);
    if ((st = check_muon(fn, h, dtype, tensors, count, device, 0))) return st;
    if ((st = muon_workspace(fn, h, dtype, tensors, count, device, stream, bytes))) return st;
    return ok();
}

cgd_status cgd_muon_step(const cgd_muon_hparams *h, cgd_dtype dtype, const cgd_muon_tensor *tensors,
                         int64_t count, const float *grad_scale, const float *skip, void *workspace,
                         size_t workspace_bytes, cgd_device device, void *stream) {
    static const char fn[] = "cgd_muon_step";
    cgd_status st;
    size_t needed = 0;
    if ((st = check_muon(fn, h, dtype, tensors, count, device, 1))) return st;
    if ((st = muon_workspace(fn, h, dtype, tensors, count, device, stream, &needed))) return st;
    if ((st = check_workspace(fn, workspace, workspace_bytes, needed))) return st;
    if (device == CGD_CPU) {
        if (CGD_BY_REAL(dtype, cgd_cpu_muon_step)(h, dtype, tensors, count, grad_scale, skip))
            return fail(CGD_ERR_UNSUPPORTED, "%s: out of host memory for the scratch space; nothing changed", fn);
        return ok();
    }
    char why[256];
    int e = CGD_BY_REAL(dtype, cgd_cuda_muon_step)(h, dtype, tensors, count, grad_scale, skip, workspace, stream, why,
                                                   sizeof why);
    return e ? fail(CGD_ERR_CUDA, "%s: %s", fn, why) : ok();
}

static cgd_status check_induced(const char *fn, const cgd_induced_hparams *h, cgd_dtype dtype,
                                const cgd_diag_tensor *tensors, int64_t count, cgd_device device, int need_param) {
    cgd_status st;
    if (!h) return fail(CGD_ERR_INVALID_ARGUMENT, "%s: hparams is NULL", fn);
    if ((st = check_range(fn, "lr", h->lr, 0.0, INFINITY, 1))) return st;
    if ((st = check_range(fn, "momentum", h->momentum, 0.0, 1.0, 1))) return st;
    if ((st = check_range(fn, "beta_rms", h->beta_rms, 0.0, 1.0, 1))) return st;
    if ((st = check_range(fn, "eps", h->eps, 0.0, INFINITY, 1))) return st;
    if ((st = check_range(fn, "weight_decay", h->weight_decay, 0.0, INFINITY, 1))) return st;
    if (h->gamma != CGD_GAMMA_IDENTITY && h->gamma != CGD_GAMMA_RMS)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: hparams.gamma = %d is not a cgd_induced_gamma", fn, (int)h->gamma);
    if (h->gamma == CGD_GAMMA_RMS && (h->eps == 0.0 || (dtype != CGD_FLOAT64 && (float)h->eps == 0.0f)))
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: hparams.eps = %g with the RMS metric divides by zero where M2 "
                    "is 0 (in float32 state it rounds to 0 below 1.4e-45)", fn, h->eps);
    if ((st = check_common(fn, dtype, device, count))) return st;
    if (count > 0 && !tensors)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: tensors is NULL but count = %lld", fn, (long long)count);
    for (int64_t i = 0; i < count; ++i) {
        const cgd_diag_tensor *t = &tensors[i];
        if ((st = check_numel(fn, "tensors.numel", i, t->numel))) return st;
        if (!t->step) return fail(CGD_ERR_INVALID_ARGUMENT, "%s: tensors[%lld].step is NULL", fn, (long long)i);
        if (t->numel == 0) continue;
        const char *missing = (need_param && !t->param) ? "param" : !t->grad ? "grad"
                              : (need_param && !t->exp_avg) ? "exp_avg"
                              : (h->gamma == CGD_GAMMA_RMS && !t->exp_avg_sq) ? "exp_avg_sq" : NULL;
        if (missing) return fail(CGD_ERR_INVALID_ARGUMENT, "%s: tensors[%lld].%s is NULL", fn, (long long)i, missing);
    }
    return CGD_OK;
}

static size_t induced_norm_workspace(const cgd_diag_tensor *tensors, int64_t count, cgd_device device) {
    return device == CGD_CPU ? 0 : (size_t)cgd_induced_norm_chunks(tensors, count) * sizeof(double);
}

cgd_status cgd_induced_norm_workspace_size(const cgd_diag_tensor *tensors, int64_t count, cgd_device device,
                                           size_t *bytes) {
    static const char fn[] = "cgd_induced_norm_workspace_size";
    cgd_status st;
    if (!bytes) return fail(CGD_ERR_INVALID_ARGUMENT, "%s: bytes is NULL", fn);
    if ((st = check_common(fn, CGD_FLOAT32, device, count))) return st;
    if (count > 0 && !tensors)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: tensors is NULL but count = %lld", fn, (long long)count);
    for (int64_t i = 0; i < count; ++i)
        if ((st = check_numel(fn, "tensors.numel", i, tensors[i].numel))) return st;
    *bytes = induced_norm_workspace(tensors, count, device);
    return ok();
}

cgd_status cgd_induced_norm(const cgd_induced_hparams *hparams, cgd_dtype dtype, const cgd_diag_tensor *tensors,
                            int64_t count, double *sum, const float *grad_scale, const float *skip, void *workspace,
                            size_t workspace_bytes, cgd_device device, void *stream) {
    static const char fn[] = "cgd_induced_norm";
    cgd_status st;
    if ((st = check_induced(fn, hparams, dtype, tensors, count, device, 0))) return st;
    if (!sum) return fail(CGD_ERR_INVALID_ARGUMENT, "%s: sum is NULL", fn);
    if ((st = check_workspace(fn, workspace, workspace_bytes, induced_norm_workspace(tensors, count, device))))
        return st;
    if (device == CGD_CPU) {
        if (CGD_BY_REAL(dtype, cgd_cpu_induced_norm)(hparams, dtype, tensors, count, sum, grad_scale, skip))
            return fail(CGD_ERR_UNSUPPORTED, "%s: out of host memory for the partial sums; nothing changed", fn);
        return ok();
    }
    return cuda_outcome(fn, CGD_BY_REAL(dtype, cgd_cuda_induced_norm)(hparams, dtype, tensors, count, sum, grad_scale,
                                                                      skip, (double *)workspace, stream));
}

cgd_status cgd_induced_rate(const cgd_induced_metric *metric, const double *sum, const double *loss, double *norm_ema,
                            double *norm_step, double *rate, const float *skip, cgd_device device, void *stream) {
    static const char fn[] = "cgd_induced_rate";
    cgd_status st;
    if (!metric) return fail(CGD_ERR_INVALID_ARGUMENT, "%s: metric is NULL", fn);
    if ((st = check_range(fn, "xi", metric->xi, 0.0, INFINITY, 1))) return st;
    if ((st = check_range(fn, "beta", metric->beta, 0.0, 1.0, 1))) return st;
    if (metric->embedding != CGD_EMBED_LOSS && metric->embedding != CGD_EMBED_LOG_LOSS)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: metric.embedding = %d is not a cgd_induced_embedding", fn,
                    (int)metric->embedding);
    if (metric->embedding == CGD_EMBED_LOG_LOSS && !loss)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: loss is NULL but the log-loss embedding needs the loss", fn);
    if ((st = check_common(fn, CGD_FLOAT32, device, 0))) return st;
    if (!sum || !norm_ema || !norm_step || !rate)
        return fail(CGD_ERR_INVALID_ARGUMENT, "%s: %s is NULL", fn,
                    !sum ? "sum" : !norm_ema ? "norm_ema" : !norm_step ? "norm_step" : "rate");
    if (device == CGD_CPU) {
        cgd_cpu_induced_rate(metric, sum, loss, norm_ema, norm_step, rate, skip);
        return ok();
    }
    return cuda_outcome(fn, cgd_cuda_induced_rate(metric, sum, loss, norm_ema, norm_step, rate, skip, stream));
}

cgd_status cgd_induced_step(const cgd_induced_hparams *hparams, cgd_dtype dtype, const cgd_diag_tensor *tensors,
                            int64_t count, const double *rate, const float *grad_scale, const float *skip,
                            cgd_device device, void *stream) {
    static const char fn[] = "cgd_induced_step";
    cgd_status st;
    if ((st = check_induced(fn, hparams, dtype, tensors, count, device, 1))) return st;
    if (!rate) return fail(CGD_ERR_INVALID_ARGUMENT, "%s: rate is NULL", fn);
    if (device == CGD_CPU) {
        CGD_BY_REAL(dtype, cgd_cpu_induced_step)(hparams, dtype, tensors, count, rate, grad_scale, skip);
        return ok();
    }
    return cuda_outcome(
        fn, CGD_BY_REAL(dtype, cgd_cuda_induced_step)(hparams, dtype, tensors, count, rate, grad_scale, skip, stream));
}
