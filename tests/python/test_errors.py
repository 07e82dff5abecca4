"""Bad input gets a clear error naming the argument and its value; NaN/Inf gradients follow the policy."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import batches, make_mlp, train_step

import cgd


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1e-3), r"lr = -0.001 is invalid"),
        (dict(lr=float("nan")), r"lr = nan is invalid"),
        (dict(eps=-1e-8), r"eps = -1e-08 is invalid"),
        (dict(power=1.5), r"power = 1.5 is invalid: must lie in \[0.0, 1.0\]"),
        (dict(power=-0.1), r"power = -0.1 is invalid"),
        (dict(betas=(1.0, 0.999)), r"betas\[0\] = 1.0 is invalid"),
        (dict(betas=(0.9, -0.1)), r"betas\[1\] = -0.1 is invalid"),
        (dict(betas=(0.9,)), r"betas = \(0.9,\) is invalid: must be a pair"),
        (dict(tau=(-1.0, 10.0)), r"tau\[0\] = -1.0 is invalid"),
        (dict(tau=(9.0, 999.0), betas=(0.9, 0.99)), r"pass either betas or tau"),
        (dict(weight_decay=-0.1), r"weight_decay = -0.1 is invalid"),
        (dict(moment="variance"), r"moment = 'variance' is invalid: must be one of"),
        (dict(nonfinite="warn"), r"nonfinite = 'warn' is invalid"),
        (dict(m2_init=1.0), r"m2_init = 1.0 is invalid: bias_correction=True assumes"),
        (dict(nesterov=True, betas=(0.0, 0.9)), r"nesterov = True is invalid"),
        (dict(power="0.5"), r"power = '0.5' is invalid: must be a real number"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        cgd.CGD(make_mlp().parameters(), **kwargs)


def test_hyperparameters_changed_after_construction_are_checked_at_step():
    model = make_mlp()
    opt = cgd.CGD(model.parameters())
    opt.param_groups[0]["power"] = 2.0
    x, y = next(batches(1))
    with pytest.raises(ValueError, match=r"power = 2.0 is invalid"):
        train_step(model, opt, x, y)


def test_invalid_param_group_is_not_added():
    model = make_mlp()
    opt = cgd.CGD(model[0].parameters())
    with pytest.raises(ValueError, match=r"lr = -1 is invalid"):
        opt.add_param_group({"params": model[2].parameters(), "lr": -1})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: cgd.Adam(p, amsgrad=True), r"Adam\(amsgrad\) = True is invalid"),
        (lambda p: cgd.AdamW(p, amsgrad=True), r"AdamW\(amsgrad\) = True is invalid"),
        (lambda p: cgd.Adam(p, capturable=True, nonfinite="raise"), r"capturable=True cannot raise"),
        (lambda p: cgd.RMSprop(p, momentum=0.9), r"RMSprop\(momentum\) = 0.9 is invalid"),
        (lambda p: cgd.RMSprop(p, centered=True), r"RMSprop\(centered\) = True is invalid"),
        (lambda p: cgd.SGD(p, nesterov=True), r"Nesterov momentum requires a momentum"),
        (lambda p: cgd.SGD(p, lr=-0.1), r"lr = -0.1 is invalid"),
    ],
)
def test_preset_arguments_outside_cgd(make, match):
    with pytest.raises(ValueError, match=match):
        make(make_mlp().parameters())


def test_unsupported_parameter_dtypes():
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float8_e4m3fn), requires_grad=False)
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['params'\]\[0\] \(shape \(3,\)\) is "
                                         r"torch.float8_e4m3fn; .*float64, complex64 and complex128"):
        cgd.CGD([p])


@pytest.mark.parametrize("make", [lambda p: cgd.FullCGD(p), lambda p: cgd.FullCGD(p, metric="kron"),
                                  lambda p: cgd.InducedMetric(p)], ids=["full", "kron", "induced"])
def test_matrix_and_induced_metrics_refuse_complex_parameters(make):
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"\['params'\]\[0\] \(shape \(3,\)\) is torch.complex64; supported parameter "
                                         r"dtypes are float32, float16, bfloat16 and float64 \(complex parameters: use "
                                         r"cgd.CGD"):
        make([p])


def test_sparse_gradients_are_refused_naming_the_parameter():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = cgd.CGD(emb.named_parameters())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match=r"'weight' .* has a sparse gradient"):
        opt.step()




# ---- NaN / Inf gradients ----

def poison(model, name, value):
    dict(model.named_parameters())[name].grad.view(-1)[3] = value


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e20])
def test_unusable_gradient_entry_is_held_back_and_raised(device, value):
    """nonfinite="raise": the entry keeps its parameter and state values, every other entry steps exactly as an
    unguarded step does, and the error names the parameter (CPU: from the step; GPU: by check_nonfinite)."""
    model = make_mlp(device=device)
    opt = cgd.CGD(model.named_parameters(), lr=1e-2, moment="centered", weight_decay=0.1)
    data = list(batches(3, device=device))
    train_step(model, opt, *data[0])
    twin = copy.deepcopy(model)
    twin_opt = cgd.CGD(twin.named_parameters(), lr=1e-2, moment="centered", weight_decay=0.1, nonfinite="ignore")
    twin_opt.load_state_dict(opt.state_dict())
    before = {n: p.clone() for n, p in model.named_parameters()}
    state_before = {n: {k: t.clone() for k, t in opt.state[p].items()} for n, p in model.named_parameters()}
    for m in (model, twin):
        m.zero_grad()
        torch.nn.functional.mse_loss(m(data[1][0]), data[1][1]).backward()
    poison(model, "2.weight", value)
    with pytest.raises(cgd.NonFiniteGradientError, match=r"gradient of '2.weight' \(param_groups\[0\]\['params'\]\[2\]"):
        opt.step()
        opt.check_nonfinite()
    twin_opt.step()
    twin_params = dict(twin.named_parameters())
    for n, p in model.named_parameters():
        expected = {"param": twin_params[n].detach().clone(),
                    **{k: t.clone() for k, t in twin_opt.state[twin_params[n]].items()}}
        if n == "2.weight":
            expected["param"].view(-1)[3] = before[n].view(-1)[3]
            for k in ("exp_avg", "exp_avg_sq"):
                expected[k].view(-1)[3] = state_before[n][k].view(-1)[3]
        assert torch.equal(p, expected["param"]), n
        for k, t in opt.state[p].items():
            assert torch.equal(t, expected[k]), (n, k)
    assert not torch.equal(model[2].weight, before["2.weight"])  # the other entries did step
    opt.check_nonfinite()  # reported once
    # Fixing the gradient lets training go on.
    train_step(model, opt, *data[2])
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_nonfinite_in_several_groups_names_them_all():
    model = make_mlp()
    opt = cgd.CGD([{"params": model[0].parameters()}, {"params": model[4].parameters(), "lr": 1e-2}])
    model(torch.randn(2, 6)).sum().backward()
    model[0].bias.grad[0] = math.nan
    model[4].weight.grad[0, 0] = math.inf
    with pytest.raises(cgd.NonFiniteGradientError) as info:
        opt.step()
    assert "param_groups[0]['params'][1]" in str(info.value) and "param_groups[1]['params'][0]" in str(info.value)


def test_skip_policy_skips_the_whole_step_and_counts_it(device):
    model = make_mlp(device=device)
    opt = cgd.CGD(model.parameters(), lr=1e-2, nonfinite="skip")
    data = list(batches(4, device=device))
    train_step(model, opt, *data[0])
    before = [p.clone() for p in model.parameters()]
    steps = [s["step"].clone() for s in opt.state.values()]
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(data[1][0]), data[1][1]).backward()
    model[0].weight.grad[0, 0] = math.nan
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert all(torch.equal(s["step"], t) for s, t in zip(opt.state.values(), steps))
    assert opt.skipped_steps == 1
    train_step(model, opt, *data[2])
    assert opt.skipped_steps == 1
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), before))


def test_ignore_policy_applies_nan_like_torch_optim():
    model = make_mlp()
    opt = cgd.CGD(model.parameters(), nonfinite="ignore")
    model(torch.randn(2, 6)).sum().backward()
    model[0].weight.grad[0, 0] = math.nan
    opt.step()
    assert torch.isnan(model[0].weight[0, 0])


# ---- the operators themselves ----

def op_args(n=3, device="cpu"):
    params = [torch.randn(5, device=device) for _ in range(n)]
    return dict(
        params=params,
        grads=[torch.randn(5, device=device) for _ in range(n)],
        exp_avgs=[torch.zeros(5, device=device) for _ in range(n)],
        exp_avg_sqs=[torch.zeros(5, device=device) for _ in range(n)],
        steps=[torch.zeros((), dtype=torch.float64, device=device) for _ in range(n)],
    )


HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, grad_weight=0.1, power=0.5, eps=1e-8, weight_decay=0.0,
             moment="raw", eps_inside=True, bias_correction=True, decoupled_weight_decay=True, nesterov=False,
             maximize=False)


def call(args, **over):
    torch.ops.cgd.diag_step_(args["params"], args["grads"], args["exp_avgs"], args["exp_avg_sqs"], args["steps"],
                             **{**HYPER, **over})


def test_op_accepts_valid_input():
    args = op_args()
    before = args["params"][0].clone()
    call(args)
    assert not torch.equal(before, args["params"][0]) and args["steps"][0].item() == 1.0


@pytest.mark.parametrize(
    "mutate,exc,match",
    # The operators run on LibTorch's stable ABI, which carries an error's message but not its C++ type: a raw op
    # raises RuntimeError (the optimizer classes check first and raise ValueError/TypeError naming the parameter).
    [
        (lambda a: a["grads"].pop(), RuntimeError, r"got 3 params, 2 grads"),
        (lambda a: a["exp_avgs"].pop(), RuntimeError, r"got 2 exp_avgs for 3 params"),
        (lambda a: a["grads"].__setitem__(1, torch.randn(6)), RuntimeError, r"grads\[1\] has sizes \[6\]"),
        (lambda a: a["exp_avgs"].__setitem__(2, torch.zeros(5, dtype=torch.float16)), RuntimeError,
         r"exp_avgs\[2\] has dtype Half, expected Float"),
        (lambda a: a["grads"].__setitem__(0, torch.randn(5, device="meta")), ValueError,
         r"grads\[0\] is on meta but params\[0\] is on cpu"),
        (lambda a: a["params"].__setitem__(1, torch.randn(5, dtype=torch.float16)), RuntimeError,
         r"params\[1\] is Half on cpu but params\[0\] is Float on cpu"),
        (lambda a: a["params"].__setitem__(0, torch.zeros(5, dtype=torch.int32)), RuntimeError,
         r"params\[0\] has dtype Int; parameters and gradients must be float32, float16, bfloat16 or float64"),
        # float64 parameters keep float64 state: float32 state beside them is refused, not misread.
        (lambda a: a.update(params=[t.double() for t in a["params"]], grads=[t.double() for t in a["grads"]]),
         RuntimeError, r"exp_avgs\[0\] has dtype Float, expected Double"),
        (lambda a: a["grads"].__setitem__(1, torch.randn(10)[::2]), RuntimeError, r"grads\[1\] .* has gaps"),
        (lambda a: a["steps"].__setitem__(1, torch.zeros(2, dtype=torch.float64)), RuntimeError,
         r"steps\[1\] must be a one-element float64"),
        (lambda a: a["steps"].__setitem__(1, torch.zeros(())), RuntimeError, r"steps\[1\] must be a one-element float64"),
        (lambda a: a["grads"].__setitem__(0, torch.randn(5).to_sparse()), RuntimeError,
         r"^cgd: grads\[0\] is not a dense \(strided\) tensor"),
    ],
)
def test_op_rejects_bad_tensors(mutate, exc, match):
    args = op_args()
    mutate(args)
    with pytest.raises(exc, match=match):
        call(args)


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(power=1.5), r"hparams.power = 1.5 is outside \[0, 1\]"),
        (dict(beta2=1.0), r"hparams.beta2 = 1 is outside \[0, 1\)"),
        (dict(lr=-1.0), r"hparams.lr = -1 is outside"),
        (dict(moment="median"), r"moment = 'median'; expected 'raw', 'centered' or 'belief'"),
    ],
)
def test_op_reports_c_api_validation(over, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        call(op_args(), **over)


def test_op_missing_state_is_reported_by_the_c_api():
    args = op_args()
    args["exp_avgs"] = []
    with pytest.raises(RuntimeError, match=r"CGD_ERR_INVALID_ARGUMENT: .*tensors\[0\].exp_avg is NULL"):
        call(args)


def test_cuda_tensors_without_cuda_device_or_build():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises((RuntimeError, AssertionError)):
        call(op_args(device="cuda"))


@pytest.mark.parametrize("make,group,match", [
    (lambda p: cgd.SGD(p, lr=0.1), dict(nesterov=True), r"Nesterov momentum requires a momentum"),
    (lambda p: cgd.SGD(p, lr=0.1), dict(momentum=-0.5), r"momentum = -0.5 is invalid"),
    (lambda p: cgd.RMSprop(p), dict(centered=True), r"RMSprop\(centered\) = True is invalid"),
    (lambda p: cgd.RMSprop(p), dict(momentum=0.5), r"RMSprop\(momentum\) = 0.5 is invalid"),
    (lambda p: cgd.Adam(p), dict(amsgrad=True), r"Adam\(amsgrad\) = True is invalid"),
], ids=["SGD nesterov", "SGD momentum", "RMSprop centered", "RMSprop momentum", "Adam amsgrad"])
def test_preset_arguments_outside_cgd_are_refused_per_group(make, group, match):
    """A group that asks for what the constructor refuses is refused too, naming the argument, and not added;
    set on an existing group later, the next step refuses it."""
    model = make_mlp()
    opt = make(model[0].parameters())
    with pytest.raises(ValueError, match=match):
        opt.add_param_group({"params": model[2].parameters(), **group})
    assert len(opt.param_groups) == 1
    opt.param_groups[0].update(group)
    x, y = next(batches(1))
    with pytest.raises(ValueError, match=match):
        train_step(model, opt, x, y)


@pytest.mark.parametrize("make,match", [
    (lambda: cgd.SGD(None, lr=-0.5), r"lr = -0.5 is invalid"),
    (lambda: cgd.SGD(None, lr=0.1, momentum=-0.5), r"momentum = -0.5 is invalid"),
    (lambda: cgd.Adam(None, lr=1e-3, betas=(1.0, 0.999)), r"betas\[0\] = 1.0 is invalid"),
    (lambda: cgd.RMSprop(None, lr=1e-2, alpha=-0.1), r"alpha = -0.1 is invalid"),
    (lambda: cgd.CGD(None, power=2.0), r"power = 2.0 is invalid"),
], ids=["SGD lr", "SGD momentum", "Adam betas", "RMSprop alpha", "CGD power"])
def test_hyperparameters_are_checked_before_params(make, match):
    """As torch.optim does: a bad hyperparameter is reported even when params is bad too (None here), naming
    the argument as the user spelled it."""
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("make", [
    lambda p: cgd.CGD(p),
    lambda p: cgd.FullCGD(p, metric="block", block_size=4),
    lambda p: cgd.InducedMetric(p),
], ids=["CGD", "FullCGD", "InducedMetric"])
def test_a_gradient_of_another_shape_is_refused_naming_the_parameter(make):
    """A (3, 1) gradient for a (3, 4) parameter is an error, not broadcast into the parameter's layout."""
    p = torch.nn.Parameter(torch.randn(3, 4))
    opt = make([p])
    p.grad = torch.randn(3, 4)
    p.grad.set_(torch.randn(3, 1))  # torch refuses to assign such a gradient, but a tensor can be resized under it
    with pytest.raises(ValueError, match=r"gradient of parameter .*shape \(3, 1\), but the parameter has shape "
                                         r"\(3, 4\)"):
        opt.step()


def test_raw_ops_refuse_a_meta_tensor_mixed_into_real_lists():
    """The dispatcher sends a list that mixes in a meta tensor to the fake kernels: they refuse it, naming it,
    instead of returning uninitialised flags or a step that never ran."""
    with pytest.raises(ValueError, match=r"tensors\[1\] is on meta but tensors\[0\] is on cpu"):
        torch.ops.cgd.nonfinite_flags([torch.tensor([float("nan")]), torch.zeros(2, device="meta")])
    grads = [torch.randn(3), torch.randn(3, device="meta")]
    steps = [torch.zeros((), dtype=torch.float64) for _ in grads]
    with pytest.raises(ValueError, match=r"grads\[1\] is on meta but grads\[0\] is on cpu"):
        torch.ops.cgd.induced_norm_(grads, [], steps, torch.zeros(()), gamma="identity", beta_rms=0.99, eps=1e-8)
