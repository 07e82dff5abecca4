"""float64 (and complex128) parameters: state and maths in float64 for every optimizer, as torch.optim keeps them.
The presets against torch.optim in float64, everything else against the float64 references of the paper's
equations; the tolerances are float64 ones (a float32 state or float32 arithmetic anywhere would miss them by
orders of magnitude), and checkpoints keep the precision."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batches, make_mlp
from reference import Hyper, ReferenceCGD
from reference_full import ReferenceFullCGD
from reference_induced import ReferenceInduced
from reference_kron import ReferenceKronCGD
from test_full import block_indices, flat, flat_grad
from test_full import small_model as small_full_model
from test_parity import CASES as PRESET_CASES

import cgd

F64 = torch.float64


def float64_batches(steps, device):
    return batches(steps, device=device, dtype=F64)


@pytest.mark.parametrize("name,ours,theirs,kwargs", PRESET_CASES, ids=[c[0] for c in PRESET_CASES])
def test_presets_match_torch_optim_in_float64(device, name, ours, theirs, kwargs):
    model = make_mlp(device=device, dtype=F64)
    twin = copy.deepcopy(model)
    opt, ref = ours(model.parameters(), **kwargs), theirs(twin.parameters(), **kwargs)
    sign = -1.0 if kwargs.get("maximize") else 1.0
    for x, y in float64_batches(100, device):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            (sign * torch.nn.functional.mse_loss(m(x), y)).backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
    for state in opt.state.values():
        assert all(v.dtype == F64 for v in state.values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("ours,theirs,kwargs", [
    (cgd.Adam, torch.optim.Adam, dict(lr=1e-2)),
    (cgd.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9)),
], ids=["Adam", "SGD_momentum"])
def test_complex128_parameters_step_as_in_torch(ours, theirs, kwargs):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex128))
    twin = torch.nn.Parameter(w.detach().clone())
    opt, ref = ours([w], **kwargs), theirs([twin], **kwargs)
    target = torch.randn(4, 3, dtype=torch.complex128)
    for _ in range(30):
        for p, o in ((w, opt), (twin, ref)):
            o.zero_grad()
            (p - target).abs().pow(2).sum().backward()
            o.step()
    torch.testing.assert_close(w, twin, rtol=1e-12, atol=1e-12)
    assert {k: v.dtype for k, v in opt.state[w].items() if k != "step"} == {"exp_avg": torch.complex128} | (
        {"exp_avg_sq": torch.complex128} if ours is cgd.Adam else {})


@pytest.mark.parametrize("power,moment", [(0.37, "raw"), (0.4, "centered"), (0.5, "belief")])
def test_general_cgd_matches_the_float64_reference(device, power, moment):
    model = make_mlp(device=device, dtype=F64)
    params = list(model.parameters())
    opt = cgd.CGD(params, lr=3e-3, power=power, moment=moment, bias_correction=False, m2_init=1.0)
    ref = ReferenceCGD(params, Hyper(lr=3e-3, beta1=0.9, beta2=0.999, power=power, moment=moment,
                                     bias_correction=False, m2_init=1.0))
    for x, y in float64_batches(100, device):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        grads = [p.grad.clone() for p in params]
        opt.step()
        ref.step(grads)
    for p, r in zip(params, ref.params):
        torch.testing.assert_close(p, r.to(device), rtol=1e-10, atol=1e-11)


@pytest.mark.parametrize("metric", ["full", "block"])
def test_full_and_block_metrics_match_the_float64_reference(device, metric):
    model = small_full_model(device, F64)
    opt = cgd.FullCGD(model.parameters(), metric=metric, block_size=4, lr=0.02)
    g = opt.param_groups[0]
    ref = ReferenceFullCGD(flat(model).cpu(), block_indices(model, metric, 4), lr=g["lr"], beta1=g["betas"][0],
                           beta2=g["betas"][1], power=g["power"], eps=g["eps"], centered=g["centered"],
                           bias_correction=g["bias_correction"], m2_init=g["m2_init"],
                           weight_decay=g["weight_decay"], refresh_every=1)
    worst = 0.0
    for x, y in float64_batches(60, device):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        expected = ref.step(flat_grad(model).cpu())
        opt.step()
        worst = max(worst, (flat(model).cpu() - expected).abs().max().item())
    # float32 state drifts ~1e-5 here (test_full.py allows 2e-4): float64 stays at float64 rounding.
    assert worst < 1e-10, f"{metric}: parameters drifted {worst:.2e} from the float64 reference"
    state = opt.state[next(model.parameters())]
    assert {state[k].dtype for k in ("exp_avg", "exp_avg_sq", "precond", "eigvals")} == {F64}
    assert set(opt.solver_stats().values()) == {0}


@pytest.mark.parametrize("max_factor_dim", [4096, 5])
def test_kron_metric_matches_the_float64_reference(device, max_factor_dim):
    model = small_full_model(device, F64)
    opt = cgd.FullCGD(model.parameters(), metric="kron", lr=0.02, max_factor_dim=max_factor_dim)
    g = opt.param_groups[0]
    refs = [ReferenceKronCGD(p.detach().cpu(), lr=g["lr"], beta1=g["betas"][0], beta2=g["betas"][1],
                             power=g["power"], eps=g["eps"], centered=g["centered"],
                             bias_correction=g["bias_correction"], m2_init=g["m2_init"],
                             weight_decay=g["weight_decay"], refresh_every=1, max_factor_dim=max_factor_dim)
            for p in model.parameters()]
    worst = 0.0
    for x, y in float64_batches(60, device):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        expected = [r.step(p.grad.cpu()) for r, p in zip(refs, model.parameters())]
        opt.step()
        worst = max(worst, max((p.detach().cpu() - e).abs().max().item()
                               for p, e in zip(model.parameters(), expected)))
    assert worst < 1e-10, f"parameters drifted {worst:.2e} from the float64 reference"
    assert all(v.dtype == F64 for s in opt.state.values() for k, v in s.items()
               if isinstance(v, torch.Tensor) and k not in ("step", "outcome", "counters"))


@pytest.mark.parametrize("gamma,embedding", [("identity", "loss"), ("rms", "log")])
def test_induced_metric_matches_the_float64_reference(device, gamma, embedding):
    torch.manual_seed(4)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(device, F64)
    params = list(model.parameters())
    opt = cgd.InducedMetric(params, lr=0.02, xi=0.05, beta=0.8, gamma=gamma, embedding=embedding)
    g = opt.param_groups[0]
    ref = ReferenceInduced([p.cpu() for p in params], [{k: g[k] for k in ("lr", "momentum", "gamma", "beta_rms",
                                                                           "eps", "weight_decay")}
                                                       | {"params": list(range(len(params)))}],
                           opt.xi, opt.beta, embedding)
    worst = 0.0
    for x, y in float64_batches(60, device):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        expected = ref.step([p.grad.cpu() for p in params], loss=float(loss.detach()))
        opt.step(loss=loss)
        worst = max(worst, max((p.detach().cpu() - e).abs().max().item() for p, e in zip(params, expected)))
    assert worst < 1e-11, f"parameters drifted {worst:.2e} from the float64 reference"
    assert all(v.dtype == F64 for s in opt.state.values() for v in s.values())


@pytest.mark.parametrize("make", [
    lambda p: cgd.Adam(p, lr=1e-2),
    lambda p: cgd.FullCGD(p, lr=1e-2, metric="block", block_size=8),
    lambda p: cgd.FullCGD(p, lr=1e-2, metric="kron"),
    lambda p: cgd.InducedMetric(p, lr=1e-2, gamma="rms", xi=0.01),
], ids=["Adam", "block", "kron", "induced"])
def test_float64_checkpoints_resume_bit_identically_and_float32_ones_load_as_float64(make):
    def run(model, opt, steps, skip=0):
        for i, (x, y) in enumerate(float64_batches(skip + steps, "cpu")):
            if i < skip:
                continue
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    model = make_mlp(dtype=F64)
    opt = make(model.parameters())
    run(model, opt, 4)
    saved = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    run(model, opt, 3, skip=4)
    resumed = make_mlp(dtype=F64)
    resumed.load_state_dict(saved[1])
    opt2 = make(resumed.parameters())
    opt2.load_state_dict(saved[0])
    run(resumed, opt2, 3, skip=4)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))

    # A checkpoint of the same model trained in float32 continues in float64 with float64 state.
    narrow = make_mlp()
    narrow_opt = make(narrow.parameters())
    for x, y in batches(2):
        narrow_opt.zero_grad()
        torch.nn.functional.mse_loss(narrow(x), y).backward()
        narrow_opt.step()
    wide = make_mlp(dtype=F64)
    wide_opt = make(wide.parameters())
    wide_opt.load_state_dict(narrow_opt.state_dict())
    wanted = {"outcome": torch.int32, "counters": torch.float32}
    for state in wide_opt.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                assert v.dtype == wanted.get(k, F64), (k, v.dtype)
    run(wide, wide_opt, 1)
