"""Bad, unusual and hostile inputs against every optimizer class (parametrised over all of them) and the raw ops:
each gets a clear error before anything changes, or behaves exactly as torch.optim does. One test per class of
fault; the classes are those the README's "NaN, Inf and faults: what is guaranteed" section lists."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import batches, make_mlp

import cgd

OPTIMIZERS = {
    "CGD": lambda p, **kw: cgd.CGD(p, lr=1e-3, **kw),
    "Adam": lambda p, **kw: cgd.Adam(p, lr=1e-3, **kw),
    "AdamW": lambda p, **kw: cgd.AdamW(p, lr=1e-3, **kw),
    "SGD": lambda p, **kw: cgd.SGD(p, lr=1e-2, momentum=0.9, dampening=0.5, **kw),
    "RMSprop": lambda p, **kw: cgd.RMSprop(p, lr=1e-3, **kw),
    "AdaBelief": lambda p, **kw: cgd.AdaBelief(p, lr=1e-3, **kw),
    "Ballistic": lambda p, **kw: cgd.Ballistic(p, lr=1e-3, **kw),
    "FullCGD": lambda p, **kw: cgd.FullCGD(p, lr=1e-3, **kw),
    "FullCGD block": lambda p, **kw: cgd.FullCGD(p, lr=1e-3, metric="block", block_size=8, **kw),
    "FullCGD kron": lambda p, **kw: cgd.FullCGD(p, lr=1e-3, metric="kron", **kw),
    "InducedMetric": lambda p, **kw: cgd.InducedMetric(p, lr=1e-3, **kw),
    "InducedMetric rms": lambda p, **kw: cgd.InducedMetric(p, lr=1e-3, gamma="rms", **kw),
}
ALL = pytest.mark.parametrize("name", list(OPTIMIZERS))
DIAGONAL = ("CGD", "Adam", "AdamW", "SGD", "RMSprop", "AdaBelief", "Ballistic")


def loss_of(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def stepped(name, steps=2, **kw):
    model = make_mlp()
    opt = OPTIMIZERS[name](model.parameters(), **kw)
    for x, y in batches(steps):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
    return model, opt


def train_alike_as_torch(model, opt, twin, ref, data):
    """Both optimizers step the same batches; the parameters must end where torch's do."""
    for x, y in data:
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            loss_of(m, x, y).backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def snapshot(model, opt):
    return copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())


def assert_unchanged(before, model, opt):
    params, state = before
    assert all(torch.equal(a, b) for a, b in zip(params.values(), model.state_dict().values()))
    now = opt.state_dict()["state"]
    assert now.keys() == state["state"].keys()
    for pid, entries in state["state"].items():
        for key, value in entries.items():
            other = now[pid][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other, (pid, key)


# ---- 1. the in-place update is visible to autograd ----

@ALL
def test_step_bumps_version_counters_so_stale_graphs_raise(name):
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = OPTIMIZERS[name]([w])
    saved = (w * w).sum()  # saves w for its backward
    saved.backward(retain_graph=True)
    version = w._version
    opt.step()
    assert w._version > version
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        saved.backward()


@ALL
def test_inference_tensors_are_refused_as_torch_refuses_them(name):
    with torch.inference_mode():
        w = torch.randn(4, 3)
    w.grad = torch.randn(4, 3)
    before = w.clone()
    with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
        OPTIMIZERS[name]([w]).step()
    assert torch.equal(w, before)


# ---- 2. a gradient too large to square is refused, not absorbed into the moments ----

@ALL
def test_a_gradient_whose_square_overflows_is_refused_and_never_enters_the_state(name):
    """The diagonal family's fused guard holds the entry back (its parameter and state keep their values, the
    other entries step); the matrix metrics, whose entries mix coordinates, change nothing. Both raise."""
    model, opt = stepped(name)
    before = snapshot(model, opt)
    x, y = next(iter(batches(1)))
    opt.zero_grad()
    loss_of(model, x, y).backward()
    model[0].weight.grad[1, 2] = 1e20  # finite, but its square is not in float32
    with pytest.raises(cgd.NonFiniteGradientError, match=r"too large for the optimizer state to square"):
        opt.step()
    if name not in DIAGONAL:
        assert_unchanged(before, model, opt)
        return
    params, state = before
    assert torch.equal(model[0].weight[1, 2], params["0.weight"][1, 2])
    assert not torch.equal(model[0].weight, params["0.weight"])
    for key, value in opt.state_dict()["state"][0].items():
        if isinstance(value, torch.Tensor) and value.shape == model[0].weight.shape:
            assert torch.equal(value[1, 2], state["state"][0][key][1, 2]), key
    for entries in opt.state_dict()["state"].values():
        assert all(torch.isfinite(v).all() for v in entries.values() if isinstance(v, torch.Tensor))


@ALL
def test_every_family_names_a_nan_gradient_alike(name):
    """One label format in every message: the parameter's name, its place in the groups and its shape."""
    model = make_mlp()
    opt = OPTIMIZERS[name](model.named_parameters())
    x, y = next(iter(batches(1)))
    loss_of(model, x, y).backward()
    model[2].weight.grad[1, 1] = math.nan
    with pytest.raises(cgd.NonFiniteGradientError,
                       match=r"gradient of '2.weight' \(param_groups\[0\]\['params'\]\[2\], shape \(16, 32\)\) contains NaN"):
        opt.step()


@ALL
def test_gradients_just_below_the_limit_keep_every_state_finite(name):
    model, opt = stepped(name)
    x, y = next(iter(batches(1)))
    opt.zero_grad()
    loss_of(model, x, y).backward()
    # An entry of the metric sums up to `side` gradient squares: a Kronecker factor over a side of the matrix, an
    # eigenvalue over the coordinates of its block (all of them for the full metric).
    side = {"FullCGD kron": max(model[0].weight.shape), "FullCGD block": 8,
            "FullCGD": sum(p.numel() for p in model.parameters())}.get(name, 1)
    model[0].weight.grad.fill_(0.9 * math.sqrt(torch.finfo(torch.float32).max / side) / 2)
    opt.step()
    for state in opt.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("name", ["CGD", "Adam", "SGD", "FullCGD", "FullCGD block", "FullCGD kron", "InducedMetric",
                                  "InducedMetric rms"])
def test_skip_policy_skips_the_overflowing_step(name):
    """Every family's "skip" (one shared policy): the step with an unusable gradient changes no parameter and no
    state tensor, is counted, and the next step is the one an optimizer that never met it takes."""
    model, opt = stepped(name, nonfinite="skip")
    twin = copy.deepcopy(model)
    twin_opt = OPTIMIZERS[name](twin.parameters(), nonfinite="skip")
    twin_opt.load_state_dict(opt.state_dict())
    before = snapshot(model, opt)
    x, y = next(iter(batches(1)))
    opt.zero_grad()
    loss_of(model, x, y).backward()
    model[2].bias.grad[0] = -3e19
    opt.step()
    params, state = before
    for entries in state["state"].values():
        entries.pop("calls", None)  # FullCGD's refresh schedule counts step calls, a skipped one too
    for entries in opt.state.values():
        if "calls" in entries:
            entries["calls"] -= 1
    assert_unchanged((params, state), model, opt)
    assert opt.skipped_steps == 1
    for m, o in ((model, opt), (twin, twin_opt)):
        o.zero_grad()
        loss_of(m, x, y).backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))


# ---- 3. hyperparameters that would make NaN are refused; torch's presets keep torch's result ----

@pytest.mark.parametrize("make,match", [
    (lambda p: cgd.CGD(p, eps=0.0), "eps = 0.0 is invalid: must be at least 1.4e-45"),
    (lambda p: cgd.CGD(p, eps=1e-300, moment="centered"), "eps = 1e-300 is invalid"),
    (lambda p: cgd.CGD(p, eps=0.0, eps_inside=False), "eps = 0.0 is invalid"),
    (lambda p: cgd.AdaBelief(p, eps=0.0), "eps = 0.0 is invalid"),
    (lambda p: cgd.Ballistic(p, eps=0.0), "eps = 0.0 is invalid"),
    (lambda p: cgd.InducedMetric(p, gamma="rms", eps=1e-300), "eps = 1e-300 is invalid: must be at least 1.4e-45"),
    (lambda p: cgd.FullCGD(p, eps=1e-300, m2_init=0.0), r"eps\^-power = 1e\+120, overflows the float32 state"),
    (lambda p: cgd.FullCGD(p, metric="block", power=1.0, eps=1e-40, m2_init=0.0), r"eps\^-power = 1e\+40"),
], ids=["CGD eps 0", "CGD eps 1e-300", "CGD eps 0 outside", "AdaBelief", "Ballistic", "InducedMetric rms",
        "FullCGD", "FullCGD block power 1"])
def test_eps_that_would_give_nan_is_refused_with_the_reason(make, match):
    with pytest.raises(ValueError, match=match):
        make(make_mlp().parameters())


def test_float64_parameters_take_an_eps_float32_cannot_hold():
    model = make_mlp(dtype=torch.float64)
    opt = cgd.CGD(model.parameters(), eps=1e-300)
    for x, y in batches(2, dtype=torch.float64):
        opt.zero_grad()
        loss_of(model, x, y).backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("ours,theirs", [(cgd.Adam, torch.optim.Adam), (cgd.RMSprop, torch.optim.RMSprop)])
def test_torch_presets_with_eps_zero_give_torchs_result(ours, theirs):
    a, b = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    opt, ref = ours([a], eps=0.0), theirs([b], eps=0.0)
    for p, o in ((a, opt), (b, ref)):
        p.grad = torch.tensor([1.0, 0.0, -2.0, 0.0])  # exactly-zero coordinates: 0/0 in both
        o.step()
    torch.testing.assert_close(a, b, equal_nan=True)
    assert torch.isnan(a).tolist() == [False, True, False, True]


# ---- 4. a step that does not happen changes nothing ----

def test_a_skipped_first_sgd_step_leaves_the_next_one_first():
    model = make_mlp()
    twin = copy.deepcopy(model)
    opt = cgd.SGD(model.parameters(), lr=0.05, momentum=0.9, dampening=0.5, nonfinite="skip")
    ref = torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9, dampening=0.5)
    x, y = next(iter(batches(1)))
    loss_of(model, x, y).backward()
    model[0].weight.grad[0, 0] = float("nan")
    opt.step()
    train_alike_as_torch(model, opt, twin, ref, batches(5, seed=3))


# ---- 5. loaded state is checked before anything is replaced ----

@pytest.mark.parametrize("name", ["FullCGD", "FullCGD block", "FullCGD kron", "InducedMetric", "InducedMetric rms"])
def test_a_loaded_state_lacking_part_of_its_state_is_refused(name):
    model, opt = stepped(name)
    saved = opt.state_dict()
    for pid, entries in saved["state"].items():
        for key in entries:
            broken = copy.deepcopy(saved)
            del broken["state"][pid][key]
            if not broken["state"][pid] or set(broken["state"][pid]) == {"calls"}:
                continue  # removing the only key is a parameter without state, which is valid
            target_model, target = stepped(name, steps=1)
            before = snapshot(target_model, target)
            with pytest.raises(ValueError, match=rf"lacks '{key}'.*nothing was loaded"):
                target.load_state_dict(broken)
            assert_unchanged(before, target_model, target)


@pytest.mark.parametrize("name", ["FullCGD", "FullCGD kron", "InducedMetric"])
def test_a_loaded_state_holding_a_list_where_a_tensor_belongs_is_refused(name):
    _, opt = stepped(name)
    saved = opt.state_dict()
    saved["state"][0]["step"] = [2.0]
    with pytest.raises(ValueError, match=r"state 'step' of parameter id 0 is list \[2.0\], not a tensor"):
        stepped(name)[1].load_state_dict(saved)


# ---- 6. raw ops validate what they are given ----

DIAG = dict(lr=1e-3, beta1=0.9, beta2=0.999, grad_weight=0.1, power=0.5, eps=1e-8, weight_decay=0.0, moment="raw",
            eps_inside=True, bias_correction=True, decoupled_weight_decay=True, nesterov=False, maximize=False)


def test_raw_ops_with_all_lists_empty_are_a_no_op():
    torch.ops.cgd.diag_step_([], [], [], [], [], **DIAG)
    torch.ops.cgd.kron_step_(*([[]] * 12), lr=1e-3, beta1=0.9, beta2=0.9, power=0.5, eps=1e-8, weight_decay=0.0,
                             centered=True, bias_correction=False, maximize=False, refresh=True)
    flags, found = torch.ops.cgd.nonfinite_flags([])
    assert flags.numel() == 0 and found.item() == 0.0


@pytest.mark.parametrize("scale", [0.0, float("nan"), float("inf"), -1.0])
def test_raw_op_refuses_a_cpu_grad_scale_it_cannot_divide_by(scale):
    p, g = torch.randn(5), torch.randn(5)
    m1, m2, step = torch.zeros(5), torch.zeros(5), torch.zeros((), dtype=torch.float64)
    before = p.clone()
    with pytest.raises(RuntimeError, match=r"^cgd: grad_scale = .* must be positive and finite"):
        torch.ops.cgd.diag_step_([p], [g], [m1], [m2], [step], grad_scale=torch.tensor(scale), **DIAG)
    assert torch.equal(p, before) and step.item() == 0.0


@pytest.mark.parametrize("op", ["nonfinite_flags", "diag_step_"])
def test_raw_ops_name_a_sparse_tensor(op):
    sparse = torch.randn(5).to_sparse()
    with pytest.raises(RuntimeError, match=r"^cgd: .*\[0\] is not a dense \(strided\) tensor"):
        if op == "nonfinite_flags":
            torch.ops.cgd.nonfinite_flags([sparse])
        else:
            torch.ops.cgd.diag_step_([sparse], [torch.randn(5)], [], [], [torch.zeros((), dtype=torch.float64)],
                                     **DIAG)


def test_raw_induced_op_names_the_list_it_compares_against():
    g = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match=r"params\[0\] has sizes \[3, 1\] but grads\[0\] has \[3, 4\]"):
        torch.ops.cgd.induced_step_([torch.randn(3, 1)], [g], [torch.zeros(3, 4)], [],
                                    [torch.zeros((), dtype=torch.float64)], torch.ones(1, dtype=torch.float64),
                                    lr=1e-3, momentum=0.9, beta_rms=0.99, eps=1e-8, weight_decay=0.0,
                                    gamma="identity", maximize=False)


# ---- 7. a gradient of another shape is refused, never broadcast ----

@ALL
def test_a_gradient_of_another_shape_is_refused_naming_the_parameter(name):
    model, opt = stepped(name)
    before = snapshot(model, opt)
    model[0].weight.grad.data = torch.randn(model[0].weight.shape[0], 1)  # .data: past autograd's own check
    with pytest.raises(ValueError, match=r"gradient of .* has shape \(32, 1\), but the parameter has shape \(32, 6\)"):
        opt.step()
    assert_unchanged(before, model, opt)


# ---- valid inputs that must work ----

@ALL
def test_zero_size_parameters_and_an_empty_first_group_step(name):
    empty = torch.nn.Parameter(torch.zeros(3, 0))
    w = torch.nn.Parameter(torch.randn(4, 3))
    opt = OPTIMIZERS[name]([{"params": []}, {"params": [empty, w]}])
    start = w.detach().clone()
    for _ in range(2):
        empty.grad, w.grad = torch.zeros(3, 0), torch.randn(4, 3)
        opt.step()
    assert not torch.equal(w, start)


@pytest.mark.parametrize("ours,theirs,kwargs", [
    (cgd.SGD, torch.optim.SGD, dict(lr=1e-3, momentum=1.0)),
    (cgd.RMSprop, torch.optim.RMSprop, dict(lr=1e-4, alpha=1.0, eps=1e-2)),
], ids=["SGD momentum=1", "RMSprop alpha=1"])
def test_averages_that_never_forget_act_as_in_torch(ours, theirs, kwargs):
    model = make_mlp()
    twin = copy.deepcopy(model)
    opt, ref = ours(model.parameters(), **kwargs), theirs(twin.parameters(), **kwargs)
    train_alike_as_torch(model, opt, twin, ref, batches(10))


@pytest.mark.parametrize("name", ["FullCGD", "FullCGD block", "FullCGD kron", "InducedMetric rms", "CGD"])
def test_channels_last_and_transposed_parameters_step_like_contiguous_twins(name):
    torch.manual_seed(0)
    conv = torch.randn(4, 3, 2, 2)
    weights = [conv.to(memory_format=torch.channels_last), torch.randn(5, 3).t()]
    dense = [w.contiguous() for w in weights]
    ours = [torch.nn.Parameter(w.clone(memory_format=torch.preserve_format)) for w in weights]
    twin = [torch.nn.Parameter(w.clone()) for w in dense]
    opt, ref = OPTIMIZERS[name](ours), OPTIMIZERS[name](twin)
    for step in range(3):
        grads = [torch.randn(w.shape, generator=torch.Generator().manual_seed(step + 10 * i)) for i, w in
                 enumerate(dense)]
        for params, o in ((ours, opt), (twin, ref)):
            for p, g in zip(params, grads):
                p.grad = g.clone()
            o.step()
    assert ours[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(ours, twin):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_a_state_saved_in_another_memory_layout_loads_into_induced_metric():
    weight = torch.randn(4, 3, 2, 2)
    a = torch.nn.Parameter(weight.to(memory_format=torch.channels_last))
    b = torch.nn.Parameter(weight.clone())
    opt_a = cgd.InducedMetric([a], lr=1e-2, gamma="rms")
    a.grad = torch.randn(4, 3, 2, 2)
    opt_a.step()
    b.data.copy_(a.detach())
    opt_b = cgd.InducedMetric([b], lr=1e-2, gamma="rms")
    opt_b.load_state_dict(opt_a.state_dict())
    b.grad = a.grad.contiguous()
    opt_a.step()
    opt_b.step()
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# ---- unclear errors made clear ----

@pytest.mark.parametrize("call,match", [
    (lambda: cgd.tau_to_beta(-1), r"tau = -1 is invalid: must lie in \[0.0, inf\]"),
    (lambda: cgd.beta_to_tau(1.5), r"beta = 1.5 is invalid"),
    (lambda: cgd.tau_to_beta("3"), r"tau = '3' is invalid: must be a real number"),
    (lambda: cgd.CGD(make_mlp().parameters(), betas=None), r"betas = None is invalid: must be a pair"),
    (lambda: cgd.Adam(make_mlp().parameters(), betas=None), r"betas = None is invalid: must be a pair"),
    (lambda: cgd.FullCGD(make_mlp().parameters(), max_state_bytes="big"), r"max_state_bytes = 'big' is invalid"),
    (lambda: cgd.FullCGD([torch.nn.Parameter(torch.zeros(8))], metric="block", block_size=50_000),
     r"block_size = 50000 is invalid: must be <= 46340"),
], ids=["tau_to_beta", "beta_to_tau", "tau str", "CGD betas", "Adam betas", "max_state_bytes", "block cap"])
def test_errors_name_the_argument_and_its_value(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_conversions_between_timescale_and_beta_reach_the_never_forgetting_end():
    assert cgd.beta_to_tau(1.0) == math.inf and cgd.tau_to_beta(math.inf) == 1.0
    assert cgd.tau_to_beta(cgd.beta_to_tau(0.9)) == pytest.approx(0.9)


@ALL
def test_meta_parameters_step_as_with_torch(name):
    w = torch.nn.Parameter(torch.empty(4, 3, device="meta"))
    w.grad = torch.empty(4, 3, device="meta")
    OPTIMIZERS[name]([w]).step()


@pytest.mark.parametrize("key", ["grad_scale", "found_inf", "lr_tensor"])
def test_a_meta_scalar_beside_real_tensors_is_refused_not_skipped(key):
    p, g = torch.randn(5), torch.randn(5)
    m1, m2, step = torch.zeros(5), torch.zeros(5), torch.zeros((), dtype=torch.float64)
    with pytest.raises(ValueError, match=rf"{key} is on meta but the parameters are on cpu"):
        torch.ops.cgd.diag_step_([p], [g], [m1], [m2], [step], **{key: torch.ones((), device="meta")}, **DIAG)
    assert step.item() == 0.0
