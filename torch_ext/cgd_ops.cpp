// Registers the C API (capi/cgd.h) as Torch operators in the `cgd` namespace, for CPU and CUDA tensors, on
// LibTorch's stable ABI (torch/csrc/stable): the library calls only torch's C shim, so one build loads in every
// later torch release (CMakeLists.txt sets TORCH_TARGET_VERSION, the oldest it supports, and TORCH_STABLE_ONLY,
// which makes any non-stable header a compile error). This file only checks tensors (dtype, device, layout,
// sizes), gathers their pointers, allocates the step's workspace through torch and passes the current CUDA
// stream; every formula lives in kernels/. Fake (meta) kernels for torch.compile are in python/cgd/_ops.py.
//
// Errors reach Python as RuntimeError (the stable ABI carries the message, not C++ exception types); the
// optimizer classes validate first and raise ValueError/TypeError themselves.
#include <torch/csrc/stable/accelerator.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cgd.h"

namespace {

using torch::headeronly::ScalarType;
using torch::stable::Device;
using torch::stable::Tensor;
using TensorList = std::vector<Tensor>;
using torch::headeronly::DeviceType;

// Like STD_TORCH_CHECK, but the message is ours alone: it names the argument and its value, and the C++ function,
// file and line STD_TORCH_CHECK puts first mean nothing to a Python user.
template <typename... Args> [[noreturn]] void cgd_fail(const Args &...args) {
    std::ostringstream message;
    ((message << args), ...);
    throw std::runtime_error(message.str());
}
#define CGD_CHECK(cond, ...)                                                                                    \
    do {                                                                                                        \
        if (!(cond)) cgd_fail(__VA_ARGS__);                                                                     \
    } while (0)

std::string device_name(const Device &d) {
    switch (d.type()) {
    case DeviceType::CPU: return "cpu";
    case DeviceType::CUDA: return "cuda:" + std::to_string(d.index());
    case DeviceType::Meta: return "meta";
    default: return "device type " + std::to_string(static_cast<int>(d.type()));
    }
}

template <typename Array> std::string list(const Array &values) {
    std::ostringstream out;
    out << "[";
    for (size_t i = 0; i < values.size(); ++i) out << (i ? ", " : "") << values[i];
    out << "]";
    return out.str();
}

bool same(const Device &a, const Device &b) { return a.type() == b.type() && a.index() == b.index(); }

template <typename A, typename B> bool same_values(const A &a, const B &b) {
    return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin());
}

// What the checks read of a tensor, read once: each accessor is a call through the stable ABI, and a step over
// hundreds of small tensors would otherwise spend more time asking the same questions again than stepping.
struct Facts {
    explicit Facts(const Tensor &t)
        : layout(t.layout()), dtype(t.scalar_type()), device(t.device()), sizes(t.sizes()), strides(t.strides()),
          numel(t.numel()) {}
    torch::headeronly::Layout layout;
    ScalarType dtype;
    Device device;
    torch::headeronly::IntHeaderOnlyArrayRef sizes, strides; // borrowed from the tensor, which the caller holds
    int64_t numel;
};

cgd_dtype to_cgd_dtype(ScalarType dtype, const char *what, size_t i) {
    switch (dtype) {
    case ScalarType::Float: return CGD_FLOAT32;
    case ScalarType::Half: return CGD_FLOAT16;
    case ScalarType::BFloat16: return CGD_BFLOAT16;
    case ScalarType::Double: return CGD_FLOAT64;
    default:
        CGD_CHECK(false, "cgd: ", what, "[", i, "] has dtype ", dtype,
                  "; parameters and gradients must be float32, float16, bfloat16 or float64");
    }
    return CGD_FLOAT32;
}
cgd_dtype to_cgd_dtype(const Tensor &t, const char *what, size_t i) { return to_cgd_dtype(t.scalar_type(), what, i); }

// Optimizer state is float32, or float64 for float64 parameters (cgd.h).
ScalarType state_type(cgd_dtype dtype) { return dtype == CGD_FLOAT64 ? ScalarType::Double : ScalarType::Float; }

// The kernels walk raw memory, so a tensor must cover its storage span exactly once (any dense layout, e.g.
// channels_last, not only contiguous): with the dimensions sorted by stride, each stride is the product of the
// sizes below it.
void check_dense(const Facts &t, const char *what, size_t i) {
    CGD_CHECK(t.layout == torch::headeronly::Layout::Strided, "cgd: ", what, "[", i,
              "] is not a dense (strided) tensor; sparse and other layouts are not supported");
    if (t.numel == 0) return;
    std::vector<std::pair<int64_t, int64_t>> dims; // (stride, size) of every dimension longer than 1
    for (size_t d = 0; d < t.sizes.size(); ++d)
        if (t.sizes[d] != 1) dims.emplace_back(t.strides[d], t.sizes[d]);
    std::sort(dims.begin(), dims.end());
    int64_t expected = 1;
    for (const auto &[stride, size] : dims) {
        CGD_CHECK(stride == expected, "cgd: ", what, "[", i, "] with sizes ", list(t.sizes), " and strides ",
                  list(t.strides), " has gaps or overlaps");
        expected *= size;
    }
}

// `t` must match `ref` (the list `ref_what`'s entry i: params[i] unless said) in device, sizes and memory layout,
// and have the given dtype.
void check_like(const Facts &t, const Facts &ref, ScalarType dtype, const char *what, size_t i,
                const char *ref_what = "params") {
    check_dense(t, what, i);
    CGD_CHECK(same(t.device, ref.device), "cgd: ", what, "[", i, "] is on ", device_name(t.device), " but ", ref_what,
              "[", i, "] is on ", device_name(ref.device));
    CGD_CHECK(t.dtype == dtype, "cgd: ", what, "[", i, "] has dtype ", t.dtype, ", expected ", dtype);
    CGD_CHECK(same_values(t.sizes, ref.sizes), "cgd: ", what, "[", i, "] has sizes ", list(t.sizes), " but ",
              ref_what, "[", i, "] has ", list(ref.sizes));
    CGD_CHECK(same_values(t.strides, ref.strides), "cgd: ", what, "[", i, "] has strides ", list(t.strides), " but ",
              ref_what, "[", i, "] has ", list(ref.strides), "; they must share one memory layout");
}

// Step counters: one float64 each (exact up to 2^53 steps), on the parameter's device.
void check_step(const Facts &t, const Facts &param, const char *what, size_t i, const char *ref_what = "params") {
    CGD_CHECK(same(t.device, param.device), "cgd: ", what, "[", i, "] is on ", device_name(t.device), " but ",
              ref_what, "[", i, "] is on ", device_name(param.device),
              " (step counters live on the parameter's device)");
    CGD_CHECK(t.dtype == ScalarType::Double && t.numel == 1, "cgd: ", what, "[", i,
              "] must be a one-element float64 tensor, got ", t.dtype, " with ", t.numel, " elements");
}

const float *optional_scalar(const std::optional<Tensor> &t, const Device &device, const char *what) {
    if (!t.has_value()) return nullptr;
    CGD_CHECK(same(t->device(), device), "cgd: ", what, " is on ", device_name(t->device()),
              " but the parameters are on ", device_name(device));
    CGD_CHECK(t->scalar_type() == ScalarType::Float && t->numel() == 1, "cgd: ", what,
              " must be a one-element float32 tensor, got ", t->scalar_type(), " with ", t->numel(), " elements");
    return t->const_data_ptr<float>();
}

// grad_scale divides every gradient: on the CPU its value is checked here (free); on a GPU reading it would
// synchronise, so there it is trusted (GradScaler's scale is always positive and finite).
const float *grad_scale_ptr(const std::optional<Tensor> &t, const Device &device) {
    const float *scale = optional_scalar(t, device, "grad_scale");
    if (scale && t->device().type() == DeviceType::CPU)
        CGD_CHECK(*scale > 0.0f && *scale < INFINITY, "cgd: grad_scale = ", *scale,
                  " must be positive and finite (the gradients are divided by it)");
    return scale;
}

void check_status(cgd_status status) {
    CGD_CHECK(status == CGD_OK, "cgd: ", cgd_status_name(status), ": ", cgd_last_error());
}

cgd_moment to_moment(const std::string &moment) {
    if (moment == "raw") return CGD_MOMENT_RAW;
    if (moment == "centered") return CGD_MOMENT_CENTERED;
    if (moment == "belief") return CGD_MOMENT_BELIEF;
    CGD_CHECK(false, "cgd: moment = '", moment, "'; expected 'raw', 'centered' or 'belief'");
    return CGD_MOMENT_RAW;
}

// Where a call runs: the C API's device, the current CUDA stream of the tensors' device, and (for CUDA) a guard
// that makes that device current for the call's duration; on the CPU, torch's thread count.
struct Target {
    cgd_device device = CGD_CPU;
    void *stream = nullptr;
    std::optional<torch::stable::accelerator::DeviceGuard> guard;
};

void target_for(const Device &device, Target &target) {
    if (device.is_cpu()) {
        // The CPU kernels' OpenMP threads follow torch's thread count, so the two do not oversubscribe the cores.
        cgd_set_cpu_threads(static_cast<int>(torch::stable::get_num_threads()));
        return;
    }
    CGD_CHECK(device.is_cuda(), "cgd: tensors on ", device_name(device), " are not supported (CPU and CUDA only)");
    CGD_CHECK(cgd_has_cuda(), "cgd: got CUDA tensors, but this build of torch-cgd (", cgd_version(),
              ") has CPU kernels only: it was built without a CUDA compiler matching torch's CUDA version (see "
              "cgd.BUILD_INFO). Install the CUDA toolkit of torch's CUDA major version and reinstall with "
              "`pip install --no-build-isolation .` (CGD_CUDA=ON makes the build fail instead of falling back)");
#ifdef CGD_WITH_CUDA
    target.device = CGD_CUDA;
    target.guard.emplace(device.index());
    TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(device.index(), &target.stream));
#endif
}

// A step's scratch space from torch's allocator (the caching allocator on CUDA, stream-ordered on the current
// stream), so it shares torch's cached memory and a failed allocation raises before anything changed. The tensor
// keeps the memory alive until the call returns; data is nullptr when nothing is needed.
struct Workspace {
    std::optional<Tensor> tensor;
    void *data = nullptr;
    size_t bytes = 0;
};

Workspace workspace_for(const Device &device, size_t bytes) {
    Workspace w;
    if (bytes == 0) return w;
    std::vector<int64_t> size = {static_cast<int64_t>(bytes)};
    w.tensor = torch::stable::empty(size, ScalarType::Byte, std::nullopt, device);
    w.data = w.tensor->mutable_data_ptr();
    w.bytes = bytes;
    return w;
}

// State tensors of a block, kron or induced step, and the diag step's guard flags: of the given dtype,
// contiguous, on the parameters' device, of the size the layout needs.
void *state_ptr(const char *op, const Tensor &t, const Device &device, ScalarType dtype, int64_t numel,
                const char *what, int64_t index = -1) {
    const std::string name = index < 0 ? std::string(what) : std::string(what) + "[" + std::to_string(index) + "]";
    CGD_CHECK(same(t.device(), device), op, ": ", name, " is on ", device_name(t.device()),
              " but the parameters are on ", device_name(device));
    CGD_CHECK(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(), ", expected ", dtype);
    CGD_CHECK(t.is_contiguous() && t.numel() == numel, op, ": ", name, " must be contiguous with ", numel,
              " elements, got sizes ", list(t.sizes()), " and strides ", list(t.strides()));
    return t.mutable_data_ptr();
}

template <typename T>
T *typed_state(const char *op, const Tensor &t, const Device &device, ScalarType dtype, int64_t numel,
               const char *what, int64_t index = -1) {
    return static_cast<T *>(state_ptr(op, t, device, dtype, numel, what, index));
}

void diag_step(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs, TensorList steps,
               double lr, double beta1, double beta2, double grad_weight, double first_grad_weight, double power,
               double eps, double weight_decay, std::string moment, bool eps_inside, bool bias_correction,
               bool decoupled_weight_decay, bool nesterov, bool maximize, std::optional<Tensor> grad_scale,
               std::optional<Tensor> found_inf, std::optional<Tensor> lr_tensor, std::optional<Tensor> guard_flags,
               double guard_limit) {
    const size_t n = params.size();
    CGD_CHECK(grads.size() == n && steps.size() == n, "cgd::diag_step_: got ", n, " params, ", grads.size(),
              " grads and ", steps.size(), " steps; the lists must have equal lengths");
    CGD_CHECK(exp_avgs.empty() || exp_avgs.size() == n, "cgd::diag_step_: got ", exp_avgs.size(), " exp_avgs for ", n,
              " params (pass one per param, or none when beta1 == 0)");
    CGD_CHECK(exp_avg_sqs.empty() || exp_avg_sqs.size() == n, "cgd::diag_step_: got ", exp_avg_sqs.size(),
              " exp_avg_sqs for ", n, " params (pass one per param, or none when power == 0)");
    if (n == 0) return;

    const Facts first(params[0]);
    const cgd_dtype dtype = to_cgd_dtype(first.dtype, "params", 0);
    const ScalarType real = state_type(dtype);
    std::vector<cgd_diag_tensor> tensors(n);
    for (size_t i = 0; i < n; ++i) {
        const Facts p(params[i]);
        CGD_CHECK(same(p.device, first.device) && p.dtype == first.dtype, "cgd::diag_step_: params[", i, "] is ",
                  p.dtype, " on ", device_name(p.device), " but params[0] is ", first.dtype, " on ",
                  device_name(first.device), "; one call steps tensors of one dtype on one device");
        check_dense(p, "params", i);
        check_like(Facts(grads[i]), p, p.dtype, "grads", i);
        check_step(Facts(steps[i]), p, "steps", i);
        cgd_diag_tensor &t = tensors[i];
        t.param = params[i].mutable_data_ptr();
        t.grad = grads[i].const_data_ptr();
        t.step = static_cast<double *>(steps[i].mutable_data_ptr());
        t.numel = p.numel;
        t.exp_avg = nullptr;
        t.exp_avg_sq = nullptr;
        if (!exp_avgs.empty()) {
            check_like(Facts(exp_avgs[i]), p, real, "exp_avgs", i);
            t.exp_avg = exp_avgs[i].mutable_data_ptr();
        }
        if (!exp_avg_sqs.empty()) {
            check_like(Facts(exp_avg_sqs[i]), p, real, "exp_avg_sqs", i);
            t.exp_avg_sq = exp_avg_sqs[i].mutable_data_ptr();
        }
    }

    cgd_diag_hparams h{};
    h.lr = lr;
    h.beta1 = beta1;
    h.beta2 = beta2;
    h.grad_weight = grad_weight;
    h.first_grad_weight = first_grad_weight;
    h.power = power;
    h.eps = eps;
    h.weight_decay = weight_decay;
    h.moment = to_moment(moment);
    h.eps_inside = eps_inside;
    h.bias_correction = bias_correction;
    h.decoupled_weight_decay = decoupled_weight_decay;
    h.nesterov = nesterov;
    h.maximize = maximize;
    const Device device = first.device;
    h.lr_device = optional_scalar(lr_tensor, device, "lr_tensor");
    if (guard_flags.has_value())
        h.guard_flags = typed_state<int32_t>("cgd::diag_step_", *guard_flags, device, ScalarType::Int,
                                             static_cast<int64_t>(n), "guard_flags");
    h.guard_limit = guard_limit;
    Target target;
    target_for(device, target);
    check_status(cgd_diag_step(&h, dtype, tensors.data(), static_cast<int64_t>(n),
                               grad_scale_ptr(grad_scale, device),
                               optional_scalar(found_inf, device, "found_inf"), target.device, target.stream));
}

std::tuple<Tensor, Tensor> nonfinite_flags(TensorList tensors, std::vector<double> limits) {
    if (tensors.empty()) { // nothing to scan: no flags, nothing found (on the CPU, having no device to go by)
        const Device cpu(DeviceType::CPU);
        Tensor flags = torch::stable::empty(std::vector<int64_t>{0}, ScalarType::Int, std::nullopt, cpu);
        Tensor found = torch::stable::empty(std::vector<int64_t>{}, ScalarType::Float, std::nullopt, cpu);
        *found.mutable_data_ptr<float>() = 0.0f;
        return {flags, found};
    }
    CGD_CHECK(limits.empty() || limits.size() == tensors.size(), "cgd::nonfinite_flags: got ", limits.size(),
              " limits for ", tensors.size(), " tensors (pass one per tensor, or none)");
    const Facts first(tensors[0]);
    const cgd_dtype dtype = to_cgd_dtype(first.dtype, "tensors", 0);
    std::vector<const void *> data(tensors.size());
    std::vector<int64_t> numels(tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) {
        const Facts t(tensors[i]);
        check_dense(t, "tensors", i);
        CGD_CHECK(same(t.device, first.device) && t.dtype == first.dtype, "cgd::nonfinite_flags: tensors[", i,
                  "] is ", t.dtype, " on ", device_name(t.device), " but tensors[0] is ", first.dtype, " on ",
                  device_name(first.device));
        data[i] = tensors[i].const_data_ptr();
        numels[i] = t.numel;
    }
    const Device device = first.device;
    std::vector<int64_t> count = {static_cast<int64_t>(tensors.size())}, scalar = {};
    Tensor flags = torch::stable::empty(count, ScalarType::Int, std::nullopt, device);
    Tensor found = torch::stable::empty(scalar, ScalarType::Float, std::nullopt, device);
    Target target;
    target_for(device, target);
    check_status(cgd_nonfinite_check(dtype, data.data(), numels.data(), limits.empty() ? nullptr : limits.data(),
                                     static_cast<int64_t>(tensors.size()),
                                     flags.mutable_data_ptr<int32_t>(), found.mutable_data_ptr<float>(), target.device,
                                     target.stream));
    return {flags, found};
}

// The loss of the log-loss embedding: one float64 on the parameters' device.
const double *optional_loss(const std::optional<Tensor> &t, const Device &device) {
    if (!t.has_value()) return nullptr;
    CGD_CHECK(same(t->device(), device), "cgd: loss is on ", device_name(t->device()), " but the parameters are on ",
              device_name(device));
    CGD_CHECK(t->scalar_type() == ScalarType::Double && t->numel() == 1,
              "cgd: loss must be a one-element float64 tensor, got ", t->scalar_type(), " with ", t->numel(),
              " elements");
    return t->const_data_ptr<double>();
}

// params[i] of a block, kron or Muon step: of a supported dtype, of params[0]'s device and dtype, contiguous (the
// kernels read the parameter in its logical, row-major order; `layout` says why to the user), with grads[i] like it.
cgd_dtype check_step_param(const char *op, TensorList params, TensorList grads, size_t i, const Device &device,
                           const char *layout) {
    const Tensor &p = params[i];
    const Facts facts(p);
    const cgd_dtype dtype = to_cgd_dtype(facts.dtype, "params", i);
    const ScalarType first = i == 0 ? facts.dtype : params[0].scalar_type();
    CGD_CHECK(same(facts.device, device) && facts.dtype == first, op, ": params[", i, "] is ", facts.dtype, " on ",
              device_name(facts.device), " but params[0] is ", first, " on ", device_name(device),
              "; one call steps tensors of one dtype on one device");
    CGD_CHECK(p.is_contiguous(), op, ": params[", i, "] with strides ", list(facts.strides), " is not contiguous; ",
              layout);
    check_like(Facts(grads[i]), facts, facts.dtype, "grads", i);
    return dtype;
}

// The rows x cols matrix `view` (entry i of the list `what`) through which a kron or Muon step reads params[i].
void check_matrix_view(const char *op, const Tensor &view, const Tensor &p, const char *what, size_t i) {
    CGD_CHECK(view.dim() == 2 && view.numel() == p.numel(), op, ": ", what, "[", i,
              "] must be the rows x cols matrix of params[", i, "] (", p.numel(), " elements), got sizes ",
              list(view.sizes()));
}

cgd_block_hparams matrix_hparams(double lr, double beta1, double beta2, double power, double eps, double weight_decay,
                                 bool centered, bool bias_correction, bool maximize, bool refresh) {
    cgd_block_hparams h{};
    h.lr = lr;
    h.beta1 = beta1;
    h.beta2 = beta2;
    h.power = power;
    h.eps = eps;
    h.weight_decay = weight_decay;
    h.centered = centered;
    h.bias_correction = bias_correction;
    h.maximize = maximize;
    h.refresh = refresh;
    return h;
}

void block_step(TensorList params, TensorList grads, std::vector<int64_t> offsets, Tensor exp_avg, Tensor exp_avg_sq,
                Tensor precond, Tensor eigvals, Tensor step, Tensor outcome, Tensor counters, int64_t block,
                int64_t nblocks, double lr, double beta1, double beta2, double power, double eps, double weight_decay,
                bool centered, bool bias_correction, bool maximize, bool refresh, std::string solver,
                std::optional<Tensor> grad_scale, std::optional<Tensor> found_inf) {
    static const char op[] = "cgd::block_step_";
    CGD_CHECK(solver == "eigh" || solver == "lanczos", "cgd::block_step_: solver = '", solver,
              "' must be 'eigh' or 'lanczos'");
    const bool lanczos = solver == "lanczos";
    const size_t n = params.size();
    CGD_CHECK(grads.size() == n && offsets.size() == n, "cgd::block_step_: got ", n, " params, ", grads.size(),
              " grads and ", offsets.size(), " offsets; the lists must have equal lengths");
    CGD_CHECK(block >= 1 && nblocks >= 1, "cgd::block_step_: block = ", block, " and nblocks = ", nblocks,
              " must be positive");
    const Device device = n ? params[0].device() : exp_avg.device();
    std::vector<cgd_block_tensor> tensors(n);
    cgd_dtype dtype = CGD_FLOAT32;
    for (size_t i = 0; i < n; ++i) {
        const Tensor &p = params[i];
        // Blocks follow the parameter's logical (row-major) order, so a block means the same on every layout.
        dtype = check_step_param(op, params, grads, i, device, "full/block metrics need contiguous parameters");
        tensors[i] = cgd_block_tensor{p.mutable_data_ptr(), grads[i].const_data_ptr(), p.numel(), offsets[i]};
    }
    const int64_t length = block * nblocks;
    cgd_block_state st{};
    st.block = block;
    st.nblocks = nblocks;
    const ScalarType real = state_type(dtype);
    st.exp_avg = state_ptr(op, exp_avg, device, real, length, "exp_avg");
    st.exp_avg_sq = state_ptr(op, exp_avg_sq, device, real, length * block, "exp_avg_sq");
    // The Lanczos solver keeps no preconditioner: its P and eigenvalue tensors are empty.
    st.precond = lanczos ? nullptr : state_ptr(op, precond, device, real, length * block, "precond");
    st.eigvals = lanczos ? nullptr : state_ptr(op, eigvals, device, real, length, "eigvals");
    st.step = typed_state<double>(op, step, device, ScalarType::Double, 1, "step");
    st.outcome = typed_state<int32_t>(op, outcome, device, ScalarType::Int, nblocks, "outcome");
    st.counters = typed_state<float>(op, counters, device, ScalarType::Float, 4, "counters");

    cgd_block_hparams h = matrix_hparams(lr, beta1, beta2, power, eps, weight_decay, centered, bias_correction,
                                         maximize, refresh);
    h.solver = lanczos ? CGD_SOLVER_LANCZOS : CGD_SOLVER_EIGH;
    Target target;
    target_for(device, target);
    size_t bytes = 0;
    check_status(cgd_block_workspace_size(&h, dtype, &st, target.device, target.stream, &bytes));
    const Workspace workspace = workspace_for(device, bytes);
    check_status(cgd_block_step(&h, dtype, tensors.data(), static_cast<int64_t>(n), &st,
                                grad_scale_ptr(grad_scale, device),
                                optional_scalar(found_inf, device, "found_inf"), workspace.data, workspace.bytes,
                                target.device, target.stream));
}

void window_step(TensorList params, TensorList grads, std::vector<int64_t> offsets, Tensor exp_avg, Tensor history,
                 Tensor gram, Tensor identity, Tensor step, Tensor counters, int64_t window, double lr, double beta1,
                 double beta2, double power, double eps, double weight_decay, bool centered, bool bias_correction,
                 bool maximize, std::optional<Tensor> grad_scale, std::optional<Tensor> found_inf) {
    static const char op[] = "cgd::window_step_";
    const size_t n = params.size();
    CGD_CHECK(grads.size() == n && offsets.size() == n, op, ": got ", n, " params, ", grads.size(), " grads and ",
              offsets.size(), " offsets; the lists must have equal lengths");
    CGD_CHECK(window >= 1, op, ": window = ", window, " must be positive");
    const Device device = n ? params[0].device() : exp_avg.device();
    std::vector<cgd_block_tensor> tensors(n);
    cgd_dtype dtype = CGD_FLOAT32;
    for (size_t i = 0; i < n; ++i) {
        dtype = check_step_param(op, params, grads, i, device, "the full metric needs contiguous parameters");
        tensors[i] = cgd_block_tensor{params[i].mutable_data_ptr(), grads[i].const_data_ptr(), params[i].numel(),
                                      offsets[i]};
    }
    const ScalarType real = state_type(dtype);
    cgd_window_state st{};
    st.n = exp_avg.numel();
    st.window = window;
    st.exp_avg = state_ptr(op, exp_avg, device, real, st.n, "exp_avg");
    st.history = state_ptr(op, history, device, real, window * st.n, "history");
    st.gram = typed_state<double>(op, gram, device, ScalarType::Double, window * window, "gram");
    st.identity = typed_state<double>(op, identity, device, ScalarType::Double, 1, "identity");
    st.step = typed_state<double>(op, step, device, ScalarType::Double, 1, "step");
    st.counters = typed_state<float>(op, counters, device, ScalarType::Float, 4, "counters");
    const cgd_block_hparams h = matrix_hparams(lr, beta1, beta2, power, eps, weight_decay, centered, bias_correction,
                                               maximize, false);
    Target target;
    target_for(device, target);
    check_status(cgd_window_step(&h, dtype, tensors.data(), static_cast<int64_t>(n), &st,
                                 grad_scale_ptr(grad_scale, device), optional_scalar(found_inf, device, "found_inf"),
                                 target.device));
}

// The tensors of a Kronecker-factored or eigenbasis step: per tensor, exp_avg is its rows x cols matrix view (which
// fixes rows and cols); an empty basis tensor marks that side as diagonal. rotated_sqs: the eigenbasis metric's V'.
std::vector<cgd_kron_tensor> kron_tensors(const char *op, TensorList params, TensorList grads, TensorList exp_avgs,
                                          TensorList left_sqs, TensorList right_sqs, TensorList left_bases,
                                          TensorList right_bases, TensorList left_eigs, TensorList right_eigs,
                                          TensorList steps, TensorList outcomes, TensorList counters,
                                          const TensorList *rotated_sqs) {
    const size_t n = params.size();
    for (const TensorList *list_ : {&grads, &exp_avgs, &left_sqs, &right_sqs, &left_bases, &right_bases, &left_eigs,
                                    &right_eigs, &steps, &outcomes, &counters})
        CGD_CHECK(list_->size() == n, op, ": got ", n, " params but a state list of ", list_->size(),
                  "; every list needs one entry per parameter");
    CGD_CHECK(!rotated_sqs || rotated_sqs->size() == n, op, ": got ", n, " params but ",
              rotated_sqs ? rotated_sqs->size() : 0, " rotated_sqs; every list needs one entry per parameter");
    std::vector<cgd_kron_tensor> tensors(n);
    if (n == 0) return tensors;
    const Device device = params[0].device();
    const cgd_dtype dtype = to_cgd_dtype(params[0], "params", 0);
    const ScalarType real = state_type(dtype);
    for (size_t i = 0; i < n; ++i) {
        const Tensor &p = params[i];
        check_step_param(op, params, grads, i, device, "the Kronecker metric reads it as a row-major matrix");
        check_matrix_view(op, exp_avgs[i], p, "exp_avgs", i);
        const int64_t rows = exp_avgs[i].size(0), cols = exp_avgs[i].size(1);
        const bool lf = left_bases[i].numel() > 0, rf = right_bases[i].numel() > 0;
        const int64_t k = static_cast<int64_t>(i);
        cgd_kron_tensor &t = tensors[i];
        t.param = p.mutable_data_ptr();
        t.grad = grads[i].const_data_ptr();
        t.rows = rows;
        t.cols = cols;
        t.left_full = lf;
        t.right_full = rf;
        t.exp_avg = state_ptr(op, exp_avgs[i], device, real, rows * cols, "exp_avgs", k);
        t.left_sq = state_ptr(op, left_sqs[i], device, real, lf ? rows * rows : rows, "left_sqs", k);
        t.right_sq = state_ptr(op, right_sqs[i], device, real, rf ? cols * cols : cols, "right_sqs", k);
        t.left_basis = lf ? state_ptr(op, left_bases[i], device, real, rows * rows, "left_bases", k) : nullptr;
        t.right_basis = rf ? state_ptr(op, right_bases[i], device, real, cols * cols, "right_bases", k) : nullptr;
        t.left_eig = state_ptr(op, left_eigs[i], device, real, rows, "left_eigs", k);
        t.right_eig = state_ptr(op, right_eigs[i], device, real, cols, "right_eigs", k);
        t.step = typed_state<double>(op, steps[i], device, ScalarType::Double, 1, "steps", k);
        t.outcome = typed_state<int32_t>(op, outcomes[i], device, ScalarType::Int, 2, "outcomes", k);
        t.counters = typed_state<float>(op, counters[i], device, ScalarType::Float, 3, "counters", k);
        if (rotated_sqs)
            t.rotated_sq = state_ptr(op, (*rotated_sqs)[i], device, real, rows * cols, "rotated_sqs", k);
    }
    return tensors;
}

// Steps the tensors of kron_tensors (of params' device and dtype) by the kron or the eigenbasis call, with its
// workspace.
void run_factored(const std::vector<cgd_kron_tensor> &tensors, TensorList params, const cgd_block_hparams &h,
                  bool eigenbasis, const std::optional<Tensor> &grad_scale, const std::optional<Tensor> &found_inf) {
    if (tensors.empty()) return;
    const Device device = params[0].device();
    const cgd_dtype dtype = to_cgd_dtype(params[0], "params", 0);
    const int64_t n = static_cast<int64_t>(tensors.size());
    Target target;
    target_for(device, target);
    const float *scale = grad_scale_ptr(grad_scale, device);
    const float *skip = optional_scalar(found_inf, device, "found_inf");
    size_t bytes = 0;
    if (eigenbasis) {
        check_status(
            cgd_eigenbasis_workspace_size(&h, dtype, tensors.data(), n, target.device, target.stream, &bytes));
        const Workspace workspace = workspace_for(device, bytes);
        check_status(cgd_eigenbasis_step(&h, dtype, tensors.data(), n, scale, skip, workspace.data, workspace.bytes,
                                         target.device, target.stream));
        return;
    }
    check_status(cgd_kron_workspace_size(&h, dtype, tensors.data(), n, target.device, target.stream, &bytes));
    const Workspace workspace = workspace_for(device, bytes);
    check_status(cgd_kron_step(&h, dtype, tensors.data(), n, scale, skip, workspace.data, workspace.bytes,
                               target.device, target.stream));
}

void kron_step(TensorList params, TensorList grads, TensorList exp_avgs, TensorList left_sqs, TensorList right_sqs,
               TensorList left_bases, TensorList right_bases, TensorList left_eigs, TensorList right_eigs,
               TensorList steps, TensorList outcomes, TensorList counters, double lr, double beta1, double beta2,
               double power, double eps, double weight_decay, bool centered, bool bias_correction, bool maximize,
               bool refresh, std::optional<Tensor> grad_scale, std::optional<Tensor> found_inf) {
    run_factored(kron_tensors("cgd::kron_step_", params, grads, exp_avgs, left_sqs, right_sqs, left_bases,
                              right_bases, left_eigs, right_eigs, steps, outcomes, counters, nullptr),
                 params, matrix_hparams(lr, beta1, beta2, power, eps, weight_decay, centered, bias_correction,
                                        maximize, refresh),
                 false, grad_scale, found_inf);
}

void eigenbasis_step(TensorList params, TensorList grads, TensorList exp_avgs, TensorList left_sqs,
                     TensorList right_sqs, TensorList left_bases, TensorList right_bases, TensorList left_eigs,
                     TensorList right_eigs, TensorList rotated_sqs, TensorList steps, TensorList outcomes,
                     TensorList counters, double lr, double beta1, double beta2, double power, double eps,
                     double weight_decay, bool centered, bool bias_correction, bool maximize, bool refresh,
                     std::vector<int64_t> may_be_first, std::optional<Tensor> grad_scale,
                     std::optional<Tensor> found_inf) {
    static const char op[] = "cgd::eigenbasis_step_";
    std::vector<cgd_kron_tensor> tensors = kron_tensors(op, params, grads, exp_avgs, left_sqs, right_sqs, left_bases,
                                                        right_bases, left_eigs, right_eigs, steps, outcomes, counters,
                                                        &rotated_sqs);
    CGD_CHECK(may_be_first.empty() || may_be_first.size() == tensors.size(), op, ": got ", tensors.size(),
              " params but ", may_be_first.size(), " may_be_first flags (one per parameter, or none)");
    for (size_t i = 0; i < may_be_first.size(); ++i) tensors[i].may_be_first = may_be_first[i] != 0;
    run_factored(tensors, params, matrix_hparams(lr, beta1, beta2, power, eps, weight_decay, centered, bias_correction,
                                        maximize, refresh),
                 true, grad_scale, found_inf);
}

// One Muon step: per matrix, the momentum buffer is its rows x cols view (which fixes rows and cols).
void muon_step(TensorList params, TensorList grads, TensorList momentum_buffers, TensorList failures, double lr,
               double momentum, double weight_decay, double ns_a, double ns_b, double ns_c, double eps,
               int64_t ns_steps, bool nesterov, std::string adjust_lr_fn, bool ns_bf16, std::string solver,
               double power, std::optional<Tensor> grad_scale, std::optional<Tensor> found_inf) {
    static const char op[] = "cgd::muon_step_";
    const size_t n = params.size();
    CGD_CHECK(grads.size() == n && momentum_buffers.size() == n, op, ": got ", n, " params, ", grads.size(),
              " grads and ", momentum_buffers.size(), " momentum_buffers; the lists must have equal lengths");
    CGD_CHECK(adjust_lr_fn == "original" || adjust_lr_fn == "match_rms_adamw", op, ": adjust_lr_fn = '",
              adjust_lr_fn, "' must be 'original' or 'match_rms_adamw'");
    CGD_CHECK(ns_steps >= 0 && ns_steps < 100, op, ": ns_steps = ", ns_steps, " must be in [0, 100)");
    CGD_CHECK(solver == "newton_schulz" || solver == "eigh", op, ": solver = '", solver,
              "' must be 'newton_schulz' or 'eigh'");
    const bool eigen = solver == "eigh";
    CGD_CHECK(failures.size() == (eigen ? n : 0), op, ": got ", failures.size(), " failure counters for ", n,
              " params (one each with solver 'eigh', none otherwise)");
    if (n == 0) return;
    const Device device = params[0].device();
    const cgd_dtype dtype = to_cgd_dtype(params[0], "params", 0);
    std::vector<cgd_muon_tensor> tensors(n);
    for (size_t i = 0; i < n; ++i) {
        const Tensor &p = params[i];
        check_step_param(op, params, grads, i, device, "Muon reads it as a row-major matrix");
        const Tensor &b = momentum_buffers[i];
        check_matrix_view(op, b, p, "momentum_buffers", i);
        const int64_t rows = b.size(0), cols = b.size(1);
        tensors[i] = cgd_muon_tensor{p.mutable_data_ptr(), grads[i].const_data_ptr(),
                                     state_ptr(op, b, device, state_type(dtype), rows * cols, "momentum_buffers",
                                               static_cast<int64_t>(i)),
                                     rows, cols,
                                     eigen ? typed_state<float>(op, failures[i], device, ScalarType::Float, 1,
                                                                "failures", static_cast<int64_t>(i))
                                           : nullptr};
    }
    cgd_muon_hparams h{};
    h.lr = lr;
    h.momentum = momentum;
    h.weight_decay = weight_decay;
    h.ns_a = ns_a;
    h.ns_b = ns_b;
    h.ns_c = ns_c;
    h.eps = eps;
    h.ns_steps = static_cast<int32_t>(ns_steps);
    h.nesterov = nesterov;
    h.scale = adjust_lr_fn == "match_rms_adamw" ? CGD_MUON_MATCH_RMS_ADAMW : CGD_MUON_ORIGINAL;
    h.ns_bf16 = ns_bf16;
    h.solver = eigen ? CGD_MUON_EIGH : CGD_MUON_NEWTON_SCHULZ;
    h.power = power;
    Target target;
    target_for(device, target);
    size_t bytes = 0;
    check_status(cgd_muon_workspace_size(&h, dtype, tensors.data(), static_cast<int64_t>(n), target.device,
                                         target.stream, &bytes));
    const Workspace workspace = workspace_for(device, bytes);
    check_status(cgd_muon_step(&h, dtype, tensors.data(), static_cast<int64_t>(n), grad_scale_ptr(grad_scale, device),
                               optional_scalar(found_inf, device, "found_inf"), workspace.data, workspace.bytes,
                               target.device, target.stream));
}

// Induced-metric ops: the per-list tensors of cgd_induced_norm / cgd_induced_step (param and exp_avg only for the
// step, exp_avg_sq only for the RMS metric).
cgd_induced_gamma to_gamma(const std::string &gamma) {
    if (gamma == "identity") return CGD_GAMMA_IDENTITY;
    if (gamma == "rms") return CGD_GAMMA_RMS;
    CGD_CHECK(false, "cgd: gamma = '", gamma, "'; expected 'identity' or 'rms'");
    return CGD_GAMMA_IDENTITY;
}

cgd_induced_hparams induced_hparams(double lr, double momentum, double beta_rms, double eps, double weight_decay,
                                    const std::string &gamma, bool maximize, const float *lr_device = nullptr) {
    cgd_induced_hparams h{};
    h.lr = lr;
    h.momentum = momentum;
    h.beta_rms = beta_rms;
    h.eps = eps;
    h.weight_decay = weight_decay;
    h.gamma = to_gamma(gamma);
    h.maximize = maximize;
    h.lr_device = lr_device;
    return h;
}

std::vector<cgd_diag_tensor> induced_tensors(const char *op, const TensorList &params, const TensorList &grads,
                                             const TensorList &exp_avgs, const TensorList &exp_avg_sqs,
                                             const TensorList &steps, bool rms, cgd_dtype *dtype) {
    const size_t n = grads.size();
    CGD_CHECK((params.empty() || params.size() == n) && (exp_avgs.empty() || exp_avgs.size() == n) &&
                  steps.size() == n && (!rms || exp_avg_sqs.size() == n),
              op, ": got ", n, " grads, ", params.size(), " params, ", exp_avgs.size(), " exp_avgs, ",
              exp_avg_sqs.size(), " exp_avg_sqs and ", steps.size(),
              " steps; every list needs one entry per gradient (exp_avg_sqs only with gamma='rms')");
    std::vector<cgd_diag_tensor> tensors(n);
    if (n == 0) return tensors;
    const Facts first(grads[0]);
    for (size_t i = 0; i < n; ++i) {
        const Facts g(grads[i]);
        *dtype = to_cgd_dtype(g.dtype, "grads", i);
        CGD_CHECK(same(g.device, first.device) && g.dtype == first.dtype, op, ": grads[", i, "] is ", g.dtype,
                  " on ", device_name(g.device), " but grads[0] is ", first.dtype, " on ", device_name(first.device),
                  "; one call steps tensors of one dtype on one device");
        check_dense(g, "grads", i);
        check_step(Facts(steps[i]), g, "steps", i, "grads");
        const ScalarType real = state_type(*dtype);
        cgd_diag_tensor &t = tensors[i];
        t = cgd_diag_tensor{};
        t.grad = grads[i].const_data_ptr();
        t.step = static_cast<double *>(steps[i].mutable_data_ptr());
        t.numel = g.numel;
        if (!params.empty()) {
            check_like(Facts(params[i]), g, g.dtype, "params", i, "grads");
            t.param = params[i].mutable_data_ptr();
        }
        if (!exp_avgs.empty()) {
            check_like(Facts(exp_avgs[i]), g, real, "exp_avgs", i, "grads");
            t.exp_avg = exp_avgs[i].mutable_data_ptr();
        }
        if (rms) {
            check_like(Facts(exp_avg_sqs[i]), g, real, "exp_avg_sqs", i, "grads");
            t.exp_avg_sq = exp_avg_sqs[i].mutable_data_ptr();
        }
    }
    return tensors;
}

void induced_norm(TensorList grads, TensorList exp_avg_sqs, TensorList steps, Tensor sum, std::string gamma,
                  double beta_rms, double eps, std::optional<Tensor> grad_scale, std::optional<Tensor> found_inf) {
    static const char op[] = "cgd::induced_norm_";
    const cgd_induced_hparams h = induced_hparams(0.0, 0.0, beta_rms, eps, 0.0, gamma, false);
    cgd_dtype dtype = CGD_FLOAT32;
    std::vector<cgd_diag_tensor> tensors =
        induced_tensors(op, {}, grads, {}, exp_avg_sqs, steps, h.gamma == CGD_GAMMA_RMS, &dtype);
    const Device device = grads.empty() ? sum.device() : grads[0].device();
    double *total = typed_state<double>(op, sum, device, ScalarType::Double, 1, "sum");
    Target target;
    target_for(device, target);
    size_t bytes = 0;
    check_status(cgd_induced_norm_workspace_size(tensors.data(), static_cast<int64_t>(tensors.size()), target.device,
                                                 &bytes));
    const Workspace workspace = workspace_for(device, bytes);
    check_status(cgd_induced_norm(&h, dtype, tensors.data(), static_cast<int64_t>(tensors.size()), total,
                                  grad_scale_ptr(grad_scale, device),
                                  optional_scalar(found_inf, device, "found_inf"), workspace.data, workspace.bytes,
                                  target.device, target.stream));
}

void induced_rate(Tensor sum, Tensor norm_ema, Tensor norm_step, Tensor rate, double xi, double beta,
                  std::string embedding, std::optional<Tensor> loss, std::optional<Tensor> found_inf) {
    static const char op[] = "cgd::induced_rate_";
    const Device device = sum.device();
    cgd_induced_metric m{};
    m.xi = xi;
    m.beta = beta;
    CGD_CHECK(embedding == "loss" || embedding == "log", "cgd: embedding = '", embedding,
              "'; expected 'loss' or 'log'");
    m.embedding = embedding == "log" ? CGD_EMBED_LOG_LOSS : CGD_EMBED_LOSS;
    const double *total = typed_state<double>(op, sum, device, ScalarType::Double, 1, "sum");
    double *ema = typed_state<double>(op, norm_ema, device, ScalarType::Double, 1, "norm_ema");
    double *step = typed_state<double>(op, norm_step, device, ScalarType::Double, 1, "norm_step");
    double *r = typed_state<double>(op, rate, device, ScalarType::Double, 1, "rate");
    Target target;
    target_for(device, target);
    check_status(cgd_induced_rate(&m, total, optional_loss(loss, device), ema, step, r,
                                  optional_scalar(found_inf, device, "found_inf"), target.device, target.stream));
}

void induced_step(TensorList params, TensorList grads, TensorList exp_avgs, TensorList exp_avg_sqs, TensorList steps,
                  Tensor rate, double lr, double momentum, double beta_rms, double eps, double weight_decay,
                  std::string gamma, bool maximize, std::optional<Tensor> grad_scale, std::optional<Tensor> found_inf,
                  std::optional<Tensor> lr_tensor) {
    static const char op[] = "cgd::induced_step_";
    CGD_CHECK(params.size() == grads.size() && exp_avgs.size() == grads.size(), op, ": got ", params.size(),
              " params, ", grads.size(), " grads and ", exp_avgs.size(), " exp_avgs");
    const Device device = grads.empty() ? rate.device() : grads[0].device();
    const cgd_induced_hparams h = induced_hparams(lr, momentum, beta_rms, eps, weight_decay, gamma, maximize,
                                                  optional_scalar(lr_tensor, device, "lr_tensor"));
    cgd_dtype dtype = CGD_FLOAT32;
    std::vector<cgd_diag_tensor> tensors =
        induced_tensors(op, params, grads, exp_avgs, exp_avg_sqs, steps, h.gamma == CGD_GAMMA_RMS, &dtype);
    const double *r = typed_state<double>(op, rate, device, ScalarType::Double, 1, "rate");
    Target target;
    target_for(device, target);
    check_status(cgd_induced_step(&h, dtype, tensors.data(), static_cast<int64_t>(tensors.size()), r,
                                  grad_scale_ptr(grad_scale, device),
                                  optional_scalar(found_inf, device, "found_inf"), target.device, target.stream));
}

// Creates the handles later block and kron steps on `device` need, from this thread: done before a CUDA-graph
// capture, where creating them would fail.
void prepare(Device device) {
    Target target;
    target_for(device, target);
    check_status(cgd_prepare(target.device));
}

std::string build_info() { return cgd_version(); }

} // namespace

STABLE_TORCH_LIBRARY(cgd, m) {
    m.def("diag_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
          "Tensor(d!)[] steps, *, float lr, float beta1, float beta2, float grad_weight, float first_grad_weight=0.0, "
          "float power, float eps, float weight_decay, str moment, bool eps_inside, bool bias_correction, bool decoupled_weight_decay, "
          "bool nesterov, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None, "
          "Tensor? lr_tensor=None, Tensor(e!)? guard_flags=None, float guard_limit=0.0) -> ()");
    m.def("block_step_(Tensor(a!)[] params, Tensor[] grads, int[] offsets, Tensor(b!) exp_avg, "
          "Tensor(c!) exp_avg_sq, Tensor(d!) precond, Tensor(e!) eigvals, Tensor(f!) step, Tensor(g!) outcome, "
          "Tensor(h!) counters, *, int block, int nblocks, float lr, float beta1, float beta2, float power, "
          "float eps, float weight_decay, bool centered, bool bias_correction, bool maximize, bool refresh, "
          "str solver, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
    m.def("muon_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] failures, *, "
          "float lr, float momentum, float weight_decay, float ns_a, float ns_b, float ns_c, float eps, int ns_steps, "
          "bool nesterov, str adjust_lr_fn, bool ns_bf16, str solver, float power, Tensor? grad_scale=None, "
          "Tensor? found_inf=None) -> ()");
    m.def("window_step_(Tensor(a!)[] params, Tensor[] grads, int[] offsets, Tensor(b!) exp_avg, Tensor(c!) history, "
          "Tensor(d!) gram, Tensor(e!) identity, Tensor(f!) step, Tensor(g!) counters, *, int window, float lr, "
          "float beta1, float beta2, float power, float eps, float weight_decay, bool centered, bool bias_correction, "
          "bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
    m.def("kron_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] left_sqs, "
          "Tensor(d!)[] right_sqs, Tensor(e!)[] left_bases, Tensor(f!)[] right_bases, Tensor(g!)[] left_eigs, "
          "Tensor(h!)[] right_eigs, Tensor(i!)[] steps, Tensor(j!)[] outcomes, Tensor(k!)[] counters, *, float lr, "
          "float beta1, float beta2, float power, float eps, float weight_decay, bool centered, "
          "bool bias_correction, bool maximize, bool refresh, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
    m.def("eigenbasis_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] left_sqs, "
          "Tensor(d!)[] right_sqs, Tensor(e!)[] left_bases, Tensor(f!)[] right_bases, Tensor(g!)[] left_eigs, "
          "Tensor(h!)[] right_eigs, Tensor(i!)[] rotated_sqs, Tensor(j!)[] steps, Tensor(k!)[] outcomes, "
          "Tensor(l!)[] counters, *, float lr, float beta1, float beta2, float power, float eps, "
          "float weight_decay, bool centered, bool bias_correction, bool maximize, bool refresh, "
          "int[] may_be_first=[], Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
    m.def("induced_norm_(Tensor[] grads, Tensor(a!)[] exp_avg_sqs, Tensor[] steps, Tensor(b!) sum, *, str gamma, "
          "float beta_rms, float eps, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
    m.def("induced_rate_(Tensor sum, Tensor(a!) norm_ema, Tensor(b!) norm_step, Tensor(c!) rate, *, float xi, "
          "float beta, str embedding, Tensor? loss=None, Tensor? found_inf=None) -> ()");
    m.def("induced_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor[] exp_avg_sqs, "
          "Tensor(c!)[] steps, Tensor rate, *, float lr, float momentum, float beta_rms, float eps, "
          "float weight_decay, str gamma, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None, "
          "Tensor? lr_tensor=None) -> ()");
    m.def("nonfinite_flags(Tensor[] tensors, float[] limits=[]) -> (Tensor flags, Tensor found)");
    m.def("build_info() -> str");
    m.def("prepare(Device device) -> ()");
}

// One registration for every backend key, and for calls with no tensor at all (empty lists: a no-op): the
// implementations check devices and layouts themselves, so a CUDA tensor in a CPU-only build, a sparse tensor or
// another backend's gets a message naming the argument instead of the dispatcher's "could not run ... with
// arguments from the ... backend". Meta tensors go to the fake kernels (python/cgd/_ops.py).
STABLE_TORCH_LIBRARY_IMPL(cgd, CompositeExplicitAutograd, m) {
    m.impl("diag_step_", TORCH_BOX(&diag_step));
    m.impl("block_step_", TORCH_BOX(&block_step));
    m.impl("kron_step_", TORCH_BOX(&kron_step));
    m.impl("window_step_", TORCH_BOX(&window_step));
    m.impl("eigenbasis_step_", TORCH_BOX(&eigenbasis_step));
    m.impl("muon_step_", TORCH_BOX(&muon_step));
    m.impl("induced_norm_", TORCH_BOX(&induced_norm));
    m.impl("induced_rate_", TORCH_BOX(&induced_rate));
    m.impl("induced_step_", TORCH_BOX(&induced_step));
    m.impl("nonfinite_flags", TORCH_BOX(&nonfinite_flags));
    m.impl("build_info", TORCH_BOX(&build_info));
    m.impl("prepare", TORCH_BOX(&prepare));
}
