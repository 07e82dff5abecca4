// Registers the C API (capi/cgd.h) as Torch operators in the `cgd` namespace, for CPU and CUDA tensors. This
// file only checks tensors (dtype, device, layout, sizes), gathers their pointers, and passes the current CUDA
// stream; every formula lives in kernels/. Fake (meta) kernels for torch.compile are in python/cgd/_ops.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <vector>

#ifdef CGD_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "cgd.h"

namespace {

cgd_dtype to_cgd_dtype(const at::Tensor &t, const char *what, size_t i) {
    switch (t.scalar_type()) {
    case at::kFloat: return CGD_FLOAT32;
    case at::kHalf: return CGD_FLOAT16;
    case at::kBFloat16: return CGD_BFLOAT16;
    default:
        TORCH_CHECK_TYPE(false, "cgd: ", what, "[", i, "] has dtype ", t.scalar_type(),
                         "; parameters and gradients must be float32, float16 or bfloat16");
    }
}

// The kernels walk raw memory, so a tensor must cover its storage span exactly once (any dense layout, e.g.
// channels_last, not only contiguous).
void check_dense(const at::Tensor &t, const char *what, size_t i) {
    TORCH_CHECK_TYPE(t.layout() == at::kStrided, "cgd: ", what, "[", i, "] is ", t.layout(),
                     "; only dense (strided) tensors are supported");
    TORCH_CHECK_VALUE(t.is_non_overlapping_and_dense(), "cgd: ", what, "[", i, "] with sizes ", t.sizes(),
                      " and strides ", t.strides(), " has gaps or overlaps");
}

// `t` must match params[i] in device, sizes and memory layout, and have the given dtype.
void check_like(const at::Tensor &t, const at::Tensor &param, at::ScalarType dtype, const char *what, size_t i) {
    check_dense(t, what, i);
    TORCH_CHECK_VALUE(t.device() == param.device(), "cgd: ", what, "[", i, "] is on ", t.device(), " but params[", i,
                      "] is on ", param.device());
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, "cgd: ", what, "[", i, "] has dtype ", t.scalar_type(),
                     ", expected ", dtype);
    TORCH_CHECK_VALUE(t.sizes() == param.sizes(), "cgd: ", what, "[", i, "] has sizes ", t.sizes(), " but params[", i,
                      "] has ", param.sizes());
    TORCH_CHECK_VALUE(t.strides() == param.strides(), "cgd: ", what, "[", i, "] has strides ", t.strides(),
                      " but params[", i, "] has ", param.strides(), "; they must share one memory layout");
}

// Step counters: one float64 each (exact up to 2^53 steps), on the parameter's device.
void check_step(const at::Tensor &t, const at::Tensor &param, const char *what, size_t i) {
    TORCH_CHECK_VALUE(t.device() == param.device(), "cgd: ", what, "[", i, "] is on ", t.device(), " but params[", i,
                      "] is on ", param.device(), " (step counters live on the parameter's device)");
    TORCH_CHECK_TYPE(t.scalar_type() == at::kDouble && t.numel() == 1, "cgd: ", what, "[", i,
                     "] must be a one-element float64 tensor, got ", t.scalar_type(), " with ", t.numel(), " elements");
}

const float *optional_scalar(const std::optional<at::Tensor> &t, const at::Device &device, const char *what) {
    if (!t.has_value()) return nullptr;
    TORCH_CHECK_VALUE(t->device() == device, "cgd: ", what, " is on ", t->device(), " but the parameters are on ",
                      device);
    TORCH_CHECK_TYPE(t->scalar_type() == at::kFloat && t->numel() == 1, "cgd: ", what,
                     " must be a one-element float32 tensor, got ", t->scalar_type(), " with ", t->numel(),
                     " elements");
    return t->data_ptr<float>();
}

void check_status(cgd_status status) {
    TORCH_CHECK(status == CGD_OK, "cgd: ", cgd_status_name(status), ": ", cgd_last_error());
}

cgd_moment to_moment(const std::string &moment) {
    if (moment == "raw") return CGD_MOMENT_RAW;
    if (moment == "centered") return CGD_MOMENT_CENTERED;
    if (moment == "belief") return CGD_MOMENT_BELIEF;
    TORCH_CHECK_VALUE(false, "cgd: moment = '", moment, "'; expected 'raw', 'centered' or 'belief'");
}

// A step's scratch space from torch's allocator (the caching allocator on CUDA, stream-ordered on the current
// stream), so it shares torch's cached memory and a failed allocation raises before anything changed. The tensor
// keeps the memory alive until the call returns; data is nullptr when nothing is needed.
struct Workspace {
    at::Tensor tensor;
    void *data = nullptr;
    size_t bytes = 0;
};

Workspace workspace_for(const at::Device &device, size_t bytes) {
    Workspace w;
    if (bytes == 0) return w;
    w.tensor = at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).device(device));
    w.data = w.tensor.data_ptr();
    w.bytes = bytes;
    return w;
}

// The device the C API runs on and the stream it enqueues to: the current stream of the tensors' device.
struct Target {
    cgd_device device = CGD_CPU;
    void *stream = nullptr;
};

Target target_for(const at::Device &device) {
    Target target;
    if (device.is_cpu()) return target;
#ifdef CGD_WITH_CUDA
    if (device.is_cuda()) {
        target.device = CGD_CUDA;
        target.stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
        return target;
    }
#endif
    TORCH_CHECK(false, "cgd: tensors on ", device, " are not supported by this build (", cgd_version(), ")");
}

void diag_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
               at::TensorList steps, double lr, double beta1, double beta2, double grad_weight, double power,
               double eps, double weight_decay, const std::string &moment, bool eps_inside, bool bias_correction,
               bool decoupled_weight_decay, bool nesterov, bool maximize, const std::optional<at::Tensor> &grad_scale,
               const std::optional<at::Tensor> &found_inf, const std::optional<at::Tensor> &lr_tensor) {
    const size_t n = params.size();
    TORCH_CHECK_VALUE(grads.size() == n && steps.size() == n, "cgd::diag_step_: got ", n, " params, ", grads.size(),
                      " grads and ", steps.size(), " steps; the lists must have equal lengths");
    TORCH_CHECK_VALUE(exp_avgs.empty() || exp_avgs.size() == n, "cgd::diag_step_: got ", exp_avgs.size(),
                      " exp_avgs for ", n, " params (pass one per param, or none when beta1 == 0)");
    TORCH_CHECK_VALUE(exp_avg_sqs.empty() || exp_avg_sqs.size() == n, "cgd::diag_step_: got ", exp_avg_sqs.size(),
                      " exp_avg_sqs for ", n, " params (pass one per param, or none when power == 0)");
    if (n == 0) return;

    const at::Tensor &first = params[0];
    const cgd_dtype dtype = to_cgd_dtype(first, "params", 0);
    std::vector<cgd_diag_tensor> tensors(n);
    for (size_t i = 0; i < n; ++i) {
        const at::Tensor &p = params[i];
        to_cgd_dtype(p, "params", i);
        TORCH_CHECK_VALUE(p.device() == first.device() && p.scalar_type() == first.scalar_type(),
                          "cgd::diag_step_: params[", i, "] is ", p.scalar_type(), " on ", p.device(),
                          " but params[0] is ", first.scalar_type(), " on ", first.device(),
                          "; one call steps tensors of one dtype on one device");
        check_dense(p, "params", i);
        check_like(grads[i], p, p.scalar_type(), "grads", i);
        check_step(steps[i], p, "steps", i);
        cgd_diag_tensor &t = tensors[i];
        t.param = p.data_ptr();
        t.grad = grads[i].data_ptr();
        t.step = steps[i].data_ptr<double>();
        t.numel = p.numel();
        t.exp_avg = nullptr;
        t.exp_avg_sq = nullptr;
        if (!exp_avgs.empty()) {
            check_like(exp_avgs[i], p, at::kFloat, "exp_avgs", i);
            t.exp_avg = exp_avgs[i].data_ptr<float>();
        }
        if (!exp_avg_sqs.empty()) {
            check_like(exp_avg_sqs[i], p, at::kFloat, "exp_avg_sqs", i);
            t.exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
        }
    }

    cgd_diag_hparams h{};
    h.lr = lr;
    h.beta1 = beta1;
    h.beta2 = beta2;
    h.grad_weight = grad_weight;
    h.power = power;
    h.eps = eps;
    h.weight_decay = weight_decay;
    h.moment = to_moment(moment);
    h.eps_inside = eps_inside;
    h.bias_correction = bias_correction;
    h.decoupled_weight_decay = decoupled_weight_decay;
    h.nesterov = nesterov;
    h.maximize = maximize;
    h.lr_device = optional_scalar(lr_tensor, first.device(), "lr_tensor");

#ifdef CGD_WITH_CUDA
    c10::cuda::OptionalCUDAGuard guard;
    if (first.is_cuda()) guard.set_device(first.device());
#endif
    const Target target = target_for(first.device());
    check_status(cgd_diag_step(&h, dtype, tensors.data(), static_cast<int64_t>(n),
                               optional_scalar(grad_scale, first.device(), "grad_scale"),
                               optional_scalar(found_inf, first.device(), "found_inf"), target.device,
                               target.stream));
}

std::tuple<at::Tensor, at::Tensor> nonfinite_flags(at::TensorList tensors) {
    TORCH_CHECK_VALUE(!tensors.empty(), "cgd::nonfinite_flags: needs at least one tensor");
    const at::Tensor &first = tensors[0];
    const cgd_dtype dtype = to_cgd_dtype(first, "tensors", 0);
    std::vector<const void *> data(tensors.size());
    std::vector<int64_t> numels(tensors.size());
    for (size_t i = 0; i < tensors.size(); ++i) {
        check_dense(tensors[i], "tensors", i);
        TORCH_CHECK_VALUE(tensors[i].device() == first.device() && tensors[i].scalar_type() == first.scalar_type(),
                          "cgd::nonfinite_flags: tensors[", i, "] is ", tensors[i].scalar_type(), " on ",
                          tensors[i].device(), " but tensors[0] is ", first.scalar_type(), " on ", first.device());
        data[i] = tensors[i].data_ptr();
        numels[i] = tensors[i].numel();
    }
    at::Tensor flags = at::empty({static_cast<int64_t>(tensors.size())}, first.options().dtype(at::kInt));
    at::Tensor found = at::empty({}, first.options().dtype(at::kFloat));
#ifdef CGD_WITH_CUDA
    c10::cuda::OptionalCUDAGuard guard;
    if (first.is_cuda()) guard.set_device(first.device());
#endif
    const Target target = target_for(first.device());
    check_status(cgd_nonfinite_check(dtype, data.data(), numels.data(), static_cast<int64_t>(tensors.size()),
                                     flags.data_ptr<int32_t>(), found.data_ptr<float>(), target.device,
                                     target.stream));
    return {flags, found};
}

// State tensors of a block or kron step: float32 (outcome int32), contiguous, on the parameters' device, of the
// size the layout needs.
template <typename T>
T *state_ptr(const char *op, const at::Tensor &t, const at::Device &device, at::ScalarType dtype, int64_t numel,
             const char *what, int64_t index = -1) {
    const std::string name = index < 0 ? std::string(what) : std::string(what) + "[" + std::to_string(index) + "]";
    TORCH_CHECK_VALUE(t.device() == device, op, ": ", name, " is on ", t.device(), " but the parameters are on ",
                      device);
    TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " has dtype ", t.scalar_type(), ", expected ", dtype);
    TORCH_CHECK_VALUE(t.is_contiguous() && t.numel() == numel, op, ": ", name, " must be contiguous with ", numel,
                      " elements, got sizes ", t.sizes(), " and strides ", t.strides());
    return t.data_ptr<T>();
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

void block_step(at::TensorList params, at::TensorList grads, at::IntArrayRef offsets, const at::Tensor &exp_avg,
                const at::Tensor &exp_avg_sq, const at::Tensor &precond, const at::Tensor &eigvals,
                const at::Tensor &step, const at::Tensor &outcome, const at::Tensor &counters, int64_t block,
                int64_t nblocks, double lr, double beta1, double beta2, double power, double eps, double weight_decay,
                bool centered, bool bias_correction, bool maximize, bool refresh,
                const std::optional<at::Tensor> &grad_scale, const std::optional<at::Tensor> &found_inf) {
    static const char op[] = "cgd::block_step_";
    const size_t n = params.size();
    TORCH_CHECK_VALUE(grads.size() == n && offsets.size() == n, "cgd::block_step_: got ", n, " params, ",
                      grads.size(), " grads and ", offsets.size(), " offsets; the lists must have equal lengths");
    TORCH_CHECK_VALUE(block >= 1 && nblocks >= 1, "cgd::block_step_: block = ", block, " and nblocks = ", nblocks,
                      " must be positive");
    const at::Device device = n ? params[0].device() : exp_avg.device();
    std::vector<cgd_block_tensor> tensors(n);
    cgd_dtype dtype = CGD_FLOAT32;
    for (size_t i = 0; i < n; ++i) {
        const at::Tensor &p = params[i];
        dtype = to_cgd_dtype(p, "params", i);
        TORCH_CHECK_VALUE(p.device() == device && p.scalar_type() == params[0].scalar_type(), "cgd::block_step_: params[",
                          i, "] is ", p.scalar_type(), " on ", p.device(), " but params[0] is ",
                          params[0].scalar_type(), " on ", device, "; one call steps tensors of one dtype on one device");
        // Blocks follow the parameter's logical (row-major) order, so a block means the same on every layout.
        TORCH_CHECK_VALUE(p.is_contiguous(), "cgd::block_step_: params[", i, "] with strides ", p.strides(),
                          " is not contiguous; full/block metrics need contiguous parameters");
        check_like(grads[i], p, p.scalar_type(), "grads", i);
        tensors[i] = cgd_block_tensor{p.data_ptr(), grads[i].data_ptr(), p.numel(), offsets[i]};
    }
    const int64_t length = block * nblocks;
    cgd_block_state st{};
    st.block = block;
    st.nblocks = nblocks;
    st.exp_avg = state_ptr<float>(op, exp_avg, device, at::kFloat, length, "exp_avg");
    st.exp_avg_sq = state_ptr<float>(op, exp_avg_sq, device, at::kFloat, length * block, "exp_avg_sq");
    st.precond = state_ptr<float>(op, precond, device, at::kFloat, length * block, "precond");
    st.eigvals = state_ptr<float>(op, eigvals, device, at::kFloat, length, "eigvals");
    st.step = state_ptr<double>(op, step, device, at::kDouble, 1, "step");
    st.outcome = state_ptr<int32_t>(op, outcome, device, at::kInt, nblocks, "outcome");
    st.counters = state_ptr<float>(op, counters, device, at::kFloat, 3, "counters");

    const cgd_block_hparams h = matrix_hparams(lr, beta1, beta2, power, eps, weight_decay, centered, bias_correction,
                                               maximize, refresh);
#ifdef CGD_WITH_CUDA
    c10::cuda::OptionalCUDAGuard guard;
    if (device.is_cuda()) guard.set_device(device);
#endif
    const Target target = target_for(device);
    size_t bytes = 0;
    check_status(cgd_block_workspace_size(&h, &st, target.device, target.stream, &bytes));
    const Workspace workspace = workspace_for(device, bytes);
    check_status(cgd_block_step(&h, dtype, tensors.data(), static_cast<int64_t>(n), &st,
                                optional_scalar(grad_scale, device, "grad_scale"),
                                optional_scalar(found_inf, device, "found_inf"), workspace.data, workspace.bytes,
                                target.device, target.stream));
}

// One Kronecker-factored step: per tensor, exp_avg is its rows x cols matrix view (which fixes rows and cols);
// an empty basis tensor marks that side as diagonal.
void kron_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList left_sqs,
               at::TensorList right_sqs, at::TensorList left_bases, at::TensorList right_bases,
               at::TensorList left_eigs, at::TensorList right_eigs, at::TensorList steps, at::TensorList outcomes,
               at::TensorList counters, double lr, double beta1, double beta2, double power, double eps,
               double weight_decay, bool centered, bool bias_correction, bool maximize, bool refresh,
               const std::optional<at::Tensor> &grad_scale, const std::optional<at::Tensor> &found_inf) {
    static const char op[] = "cgd::kron_step_";
    const size_t n = params.size();
    for (const at::TensorList &list : {grads, exp_avgs, left_sqs, right_sqs, left_bases, right_bases, left_eigs,
                                       right_eigs, steps, outcomes, counters})
        TORCH_CHECK_VALUE(list.size() == n, op, ": got ", n, " params but a state list of ", list.size(),
                          "; every list needs one entry per parameter");
    if (n == 0) return;
    const at::Device device = params[0].device();
    const cgd_dtype dtype = to_cgd_dtype(params[0], "params", 0);
    std::vector<cgd_kron_tensor> tensors(n);
    for (size_t i = 0; i < n; ++i) {
        const at::Tensor &p = params[i];
        to_cgd_dtype(p, "params", i);
        TORCH_CHECK_VALUE(p.device() == device && p.scalar_type() == params[0].scalar_type(), op, ": params[", i,
                          "] is ", p.scalar_type(), " on ", p.device(), " but params[0] is ", params[0].scalar_type(),
                          " on ", device, "; one call steps tensors of one dtype on one device");
        TORCH_CHECK_VALUE(p.is_contiguous(), op, ": params[", i, "] with strides ", p.strides(),
                          " is not contiguous; the Kronecker metric reads it as a row-major matrix");
        check_like(grads[i], p, p.scalar_type(), "grads", i);
        TORCH_CHECK_VALUE(exp_avgs[i].dim() == 2 && exp_avgs[i].numel() == p.numel(), op, ": exp_avgs[", i,
                          "] must be the rows x cols matrix of params[", i, "] (", p.numel(), " elements), got sizes ",
                          exp_avgs[i].sizes());
        const int64_t rows = exp_avgs[i].size(0), cols = exp_avgs[i].size(1);
        const bool lf = left_bases[i].numel() > 0, rf = right_bases[i].numel() > 0;
        const int64_t k = static_cast<int64_t>(i);
        cgd_kron_tensor &t = tensors[i];
        t.param = p.data_ptr();
        t.grad = grads[i].data_ptr();
        t.rows = rows;
        t.cols = cols;
        t.left_full = lf;
        t.right_full = rf;
        t.exp_avg = state_ptr<float>(op, exp_avgs[i], device, at::kFloat, rows * cols, "exp_avgs", k);
        t.left_sq = state_ptr<float>(op, left_sqs[i], device, at::kFloat, lf ? rows * rows : rows, "left_sqs", k);
        t.right_sq = state_ptr<float>(op, right_sqs[i], device, at::kFloat, rf ? cols * cols : cols, "right_sqs", k);
        t.left_basis = lf ? state_ptr<float>(op, left_bases[i], device, at::kFloat, rows * rows, "left_bases", k)
                          : nullptr;
        t.right_basis = rf ? state_ptr<float>(op, right_bases[i], device, at::kFloat, cols * cols, "right_bases", k)
                           : nullptr;
        t.left_eig = state_ptr<float>(op, left_eigs[i], device, at::kFloat, rows, "left_eigs", k);
        t.right_eig = state_ptr<float>(op, right_eigs[i], device, at::kFloat, cols, "right_eigs", k);
        t.step = state_ptr<double>(op, steps[i], device, at::kDouble, 1, "steps", k);
        t.outcome = state_ptr<int32_t>(op, outcomes[i], device, at::kInt, 2, "outcomes", k);
        t.counters = state_ptr<float>(op, counters[i], device, at::kFloat, 3, "counters", k);
    }
    const cgd_block_hparams h = matrix_hparams(lr, beta1, beta2, power, eps, weight_decay, centered, bias_correction,
                                               maximize, refresh);
#ifdef CGD_WITH_CUDA
    c10::cuda::OptionalCUDAGuard guard;
    if (device.is_cuda()) guard.set_device(device);
#endif
    const Target target = target_for(device);
    size_t bytes = 0;
    check_status(cgd_kron_workspace_size(&h, tensors.data(), static_cast<int64_t>(n), target.device, target.stream,
                                         &bytes));
    const Workspace workspace = workspace_for(device, bytes);
    check_status(cgd_kron_step(&h, dtype, tensors.data(), static_cast<int64_t>(n),
                               optional_scalar(grad_scale, device, "grad_scale"),
                               optional_scalar(found_inf, device, "found_inf"), workspace.data, workspace.bytes,
                               target.device, target.stream));
}

// Induced-metric ops: the per-list tensors of cgd_induced_norm / cgd_induced_step (param and exp_avg only for the
// step, exp_avg_sq only for the RMS metric).
cgd_induced_gamma to_gamma(const std::string &gamma) {
    if (gamma == "identity") return CGD_GAMMA_IDENTITY;
    if (gamma == "rms") return CGD_GAMMA_RMS;
    TORCH_CHECK_VALUE(false, "cgd: gamma = '", gamma, "'; expected 'identity' or 'rms'");
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

std::vector<cgd_diag_tensor> induced_tensors(const char *op, at::TensorList params, at::TensorList grads,
                                             at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                             at::TensorList steps, bool rms, cgd_dtype *dtype) {
    const size_t n = grads.size();
    TORCH_CHECK_VALUE((params.empty() || params.size() == n) && (exp_avgs.empty() || exp_avgs.size() == n) &&
                          steps.size() == n && (!rms || exp_avg_sqs.size() == n),
                      op, ": got ", n, " grads, ", params.size(), " params, ", exp_avgs.size(), " exp_avgs, ",
                      exp_avg_sqs.size(), " exp_avg_sqs and ", steps.size(),
                      " steps; every list needs one entry per gradient (exp_avg_sqs only with gamma='rms')");
    std::vector<cgd_diag_tensor> tensors(n);
    for (size_t i = 0; i < n; ++i) {
        const at::Tensor &g = grads[i];
        *dtype = to_cgd_dtype(g, "grads", i);
        TORCH_CHECK_VALUE(g.device() == grads[0].device() && g.scalar_type() == grads[0].scalar_type(), op,
                          ": grads[", i, "] is ", g.scalar_type(), " on ", g.device(), " but grads[0] is ",
                          grads[0].scalar_type(), " on ", grads[0].device(),
                          "; one call steps tensors of one dtype on one device");
        check_dense(g, "grads", i);
        check_step(steps[i], g, "steps", i);
        cgd_diag_tensor &t = tensors[i];
        t = cgd_diag_tensor{};
        t.grad = g.data_ptr();
        t.step = steps[i].data_ptr<double>();
        t.numel = g.numel();
        if (!params.empty()) {
            check_like(params[i], g, g.scalar_type(), "params", i);
            t.param = params[i].data_ptr();
        }
        if (!exp_avgs.empty()) {
            check_like(exp_avgs[i], g, at::kFloat, "exp_avgs", i);
            t.exp_avg = exp_avgs[i].data_ptr<float>();
        }
        if (rms) {
            check_like(exp_avg_sqs[i], g, at::kFloat, "exp_avg_sqs", i);
            t.exp_avg_sq = exp_avg_sqs[i].data_ptr<float>();
        }
    }
    return tensors;
}

void induced_norm(at::TensorList grads, at::TensorList exp_avg_sqs, at::TensorList steps, const at::Tensor &sum,
                  const std::string &gamma, double beta_rms, double eps, const std::optional<at::Tensor> &grad_scale,
                  const std::optional<at::Tensor> &found_inf) {
    static const char op[] = "cgd::induced_norm_";
    const cgd_induced_hparams h = induced_hparams(0.0, 0.0, beta_rms, eps, 0.0, gamma, false);
    cgd_dtype dtype = CGD_FLOAT32;
    std::vector<cgd_diag_tensor> tensors =
        induced_tensors(op, {}, grads, {}, exp_avg_sqs, steps, h.gamma == CGD_GAMMA_RMS, &dtype);
    const at::Device device = grads.empty() ? sum.device() : grads[0].device();
    float *total = state_ptr<float>(op, sum, device, at::kFloat, 1, "sum");
#ifdef CGD_WITH_CUDA
    c10::cuda::OptionalCUDAGuard guard;
    if (device.is_cuda()) guard.set_device(device);
#endif
    const Target target = target_for(device);
    size_t bytes = 0;
    check_status(cgd_induced_norm_workspace_size(tensors.data(), static_cast<int64_t>(tensors.size()), target.device,
                                                 &bytes));
    const Workspace workspace = workspace_for(device, bytes);
    check_status(cgd_induced_norm(&h, dtype, tensors.data(), static_cast<int64_t>(tensors.size()), total,
                                  optional_scalar(grad_scale, device, "grad_scale"),
                                  optional_scalar(found_inf, device, "found_inf"), workspace.data, workspace.bytes,
                                  target.device, target.stream));
}

void induced_rate(const at::Tensor &sum, const at::Tensor &norm_ema, const at::Tensor &norm_step,
                  const at::Tensor &rate, double xi, double beta, const std::string &embedding,
                  const std::optional<at::Tensor> &loss, const std::optional<at::Tensor> &found_inf) {
    static const char op[] = "cgd::induced_rate_";
    const at::Device device = sum.device();
    cgd_induced_metric m{};
    m.xi = xi;
    m.beta = beta;
    TORCH_CHECK_VALUE(embedding == "loss" || embedding == "log", "cgd: embedding = '", embedding,
                      "'; expected 'loss' or 'log'");
    m.embedding = embedding == "log" ? CGD_EMBED_LOG_LOSS : CGD_EMBED_LOSS;
    const float *total = state_ptr<float>(op, sum, device, at::kFloat, 1, "sum");
    float *ema = state_ptr<float>(op, norm_ema, device, at::kFloat, 1, "norm_ema");
    double *step = state_ptr<double>(op, norm_step, device, at::kDouble, 1, "norm_step");
    float *r = state_ptr<float>(op, rate, device, at::kFloat, 1, "rate");
#ifdef CGD_WITH_CUDA
    c10::cuda::OptionalCUDAGuard guard;
    if (device.is_cuda()) guard.set_device(device);
#endif
    const Target target = target_for(device);
    check_status(cgd_induced_rate(&m, total, optional_scalar(loss, device, "loss"), ema, step, r,
                                  optional_scalar(found_inf, device, "found_inf"), target.device, target.stream));
}

void induced_step(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                  at::TensorList steps, const at::Tensor &rate, double lr, double momentum, double beta_rms,
                  double eps, double weight_decay, const std::string &gamma, bool maximize,
                  const std::optional<at::Tensor> &grad_scale, const std::optional<at::Tensor> &found_inf,
                  const std::optional<at::Tensor> &lr_tensor) {
    static const char op[] = "cgd::induced_step_";
    TORCH_CHECK_VALUE(params.size() == grads.size() && exp_avgs.size() == grads.size(), op, ": got ", params.size(),
                      " params, ", grads.size(), " grads and ", exp_avgs.size(), " exp_avgs");
    const at::Device device = grads.empty() ? rate.device() : grads[0].device();
    const cgd_induced_hparams h = induced_hparams(lr, momentum, beta_rms, eps, weight_decay, gamma, maximize,
                                                  optional_scalar(lr_tensor, device, "lr_tensor"));
    cgd_dtype dtype = CGD_FLOAT32;
    std::vector<cgd_diag_tensor> tensors =
        induced_tensors(op, params, grads, exp_avgs, exp_avg_sqs, steps, h.gamma == CGD_GAMMA_RMS, &dtype);
    const float *r = state_ptr<float>(op, rate, device, at::kFloat, 1, "rate");
#ifdef CGD_WITH_CUDA
    c10::cuda::OptionalCUDAGuard guard;
    if (device.is_cuda()) guard.set_device(device);
#endif
    const Target target = target_for(device);
    check_status(cgd_induced_step(&h, dtype, tensors.data(), static_cast<int64_t>(tensors.size()), r,
                                  optional_scalar(grad_scale, device, "grad_scale"),
                                  optional_scalar(found_inf, device, "found_inf"), target.device, target.stream));
}

// Creates the handles later block and kron steps on `device` need, from this thread: done before a CUDA-graph
// capture, where creating them would fail.
void prepare(const at::Device &device) {
#ifdef CGD_WITH_CUDA
    c10::cuda::OptionalCUDAGuard guard;
    if (device.is_cuda()) guard.set_device(device);
#endif
    check_status(cgd_prepare(target_for(device).device));
}

std::string build_info() { return cgd_version(); }

} // namespace

TORCH_LIBRARY(cgd, m) {
    m.def("diag_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
          "Tensor(d!)[] steps, *, float lr, float beta1, float beta2, float grad_weight, float power, float eps, "
          "float weight_decay, str moment, bool eps_inside, bool bias_correction, bool decoupled_weight_decay, "
          "bool nesterov, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None, Tensor? lr_tensor=None) -> ()");
    m.def("block_step_(Tensor(a!)[] params, Tensor[] grads, int[] offsets, Tensor(b!) exp_avg, "
          "Tensor(c!) exp_avg_sq, Tensor(d!) precond, Tensor(e!) eigvals, Tensor(f!) step, Tensor(g!) outcome, "
          "Tensor(h!) counters, *, int block, int nblocks, float lr, float beta1, float beta2, float power, "
          "float eps, float weight_decay, bool centered, bool bias_correction, bool maximize, bool refresh, "
          "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
    m.def("kron_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] left_sqs, "
          "Tensor(d!)[] right_sqs, Tensor(e!)[] left_bases, Tensor(f!)[] right_bases, Tensor(g!)[] left_eigs, "
          "Tensor(h!)[] right_eigs, Tensor(i!)[] steps, Tensor(j!)[] outcomes, Tensor(k!)[] counters, *, float lr, "
          "float beta1, float beta2, float power, float eps, float weight_decay, bool centered, "
          "bool bias_correction, bool maximize, bool refresh, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
    m.def("induced_norm_(Tensor[] grads, Tensor(a!)[] exp_avg_sqs, Tensor[] steps, Tensor(b!) sum, *, str gamma, "
          "float beta_rms, float eps, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
    m.def("induced_rate_(Tensor sum, Tensor(a!) norm_ema, Tensor(b!) norm_step, Tensor(c!) rate, *, float xi, "
          "float beta, str embedding, Tensor? loss=None, Tensor? found_inf=None) -> ()");
    m.def("induced_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor[] exp_avg_sqs, "
          "Tensor(c!)[] steps, Tensor rate, *, float lr, float momentum, float beta_rms, float eps, "
          "float weight_decay, str gamma, bool maximize, Tensor? grad_scale=None, Tensor? found_inf=None, "
          "Tensor? lr_tensor=None) -> ()");
    m.def("nonfinite_flags(Tensor[] tensors) -> (Tensor flags, Tensor found)");
    m.def("build_info() -> str", &build_info);
    m.def("prepare(Device device) -> ()", &prepare);
}

TORCH_LIBRARY_IMPL(cgd, CPU, m) {
    m.impl("diag_step_", &diag_step);
    m.impl("block_step_", &block_step);
    m.impl("kron_step_", &kron_step);
    m.impl("induced_norm_", &induced_norm);
    m.impl("induced_rate_", &induced_rate);
    m.impl("induced_step_", &induced_step);
    m.impl("nonfinite_flags", &nonfinite_flags);
}

#ifdef CGD_WITH_CUDA
TORCH_LIBRARY_IMPL(cgd, CUDA, m) {
    m.impl("diag_step_", &diag_step);
    m.impl("block_step_", &block_step);
    m.impl("kron_step_", &kron_step);
    m.impl("induced_norm_", &induced_norm);
    m.impl("induced_rate_", &induced_rate);
    m.impl("induced_step_", &induced_step);
    m.impl("nonfinite_flags", &nonfinite_flags);
}
#endif
