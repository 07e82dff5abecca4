"""Presets against torch.optim: the same model, data and hyperparameters give the same parameters after 250
steps, to float32 tolerance, on every device present."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batches, make_mlp, train_step

import cgd

STEPS = 250

CASES = [
    ("Adam", cgd.Adam, torch.optim.Adam, dict(lr=3e-3)),
    ("Adam_betas_eps", cgd.Adam, torch.optim.Adam, dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6)),
    ("Adam_l2_maximize", cgd.Adam, torch.optim.Adam, dict(lr=2e-3, weight_decay=0.05, maximize=True)),
    ("AdamW", cgd.AdamW, torch.optim.AdamW, dict(lr=3e-3, weight_decay=0.1)),
    ("RMSprop", cgd.RMSprop, torch.optim.RMSprop, dict(lr=1e-3, alpha=0.95, weight_decay=1e-3)),
    ("SGD", cgd.SGD, torch.optim.SGD, dict(lr=0.05)),
    ("SGD_momentum", cgd.SGD, torch.optim.SGD, dict(lr=0.02, momentum=0.9, weight_decay=1e-3)),
    ("SGD_dampening", cgd.SGD, torch.optim.SGD, dict(lr=0.02, momentum=0.9, dampening=0.3)),
    ("SGD_nesterov", cgd.SGD, torch.optim.SGD, dict(lr=0.02, momentum=0.8, nesterov=True)),
]


@pytest.mark.parametrize("name,ours,theirs,kwargs", CASES, ids=[c[0] for c in CASES])
def test_preset_matches_torch_optim(device, name, ours, theirs, kwargs):
    model = make_mlp(device=device)
    twin = copy.deepcopy(model)
    opt, ref = ours(model.parameters(), **kwargs), theirs(twin.parameters(), **kwargs)
    sign = -1.0 if kwargs.get("maximize") else 1.0
    worst = 0.0
    for x, y in batches(STEPS, device=device):
        for m, o in ((model, opt), (twin, ref)):
            o.zero_grad()
            (sign * torch.nn.functional.mse_loss(m(x), y)).backward()
            o.step()
        worst = max(worst, max((a - b).abs().max().item() for a, b in zip(model.parameters(), twin.parameters())))
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # The trajectories moved: a preset that did nothing would fail here, not pass vacuously.
    assert any((a - b).abs().max() > 1e-2 for a, b in zip(model.parameters(), make_mlp(device=device).parameters()))
    print(f"{name}: largest difference over {STEPS} steps {worst:.2e}")


def test_param_groups_and_lr_scheduler_match_torch(device):
    """Two groups with their own lr and weight decay, a StepLR schedule, and the closure form of step()."""
    model = make_mlp(device=device)
    twin = copy.deepcopy(model)

    def groups(m):
        return [
            {"params": list(m[0].parameters()), "lr": 5e-3, "weight_decay": 0.1},
            {"params": list(m[2].parameters()) + list(m[4].parameters())},
        ]

    opt = cgd.AdamW(groups(model), lr=1e-3, weight_decay=0.01)
    ref = torch.optim.AdamW(groups(twin), lr=1e-3, weight_decay=0.01)
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=50, gamma=0.5) for o in (opt, ref)]
    for x, y in batches(220, device=device):
        for m, o in ((model, opt), (twin, ref)):
            def closure(m=m, o=o):
                o.zero_grad()
                loss = torch.nn.functional.mse_loss(m(x), y)
                loss.backward()
                return loss
            loss = o.step(closure)
            assert torch.is_tensor(loss)
        for s in scheds:
            s.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(5e-3 * 0.5**4)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_onecyclelr_drives_betas(device):
    """OneCycleLR cycles beta1 through group['betas'], which CGD reads every step, as torch's Adam does."""
    model = make_mlp(device=device)
    twin = copy.deepcopy(model)
    opt, ref = cgd.Adam(model.parameters()), torch.optim.Adam(twin.parameters())
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=1e-2, total_steps=120) for o in (opt, ref)]
    for x, y in batches(120, device=device):
        train_step(model, opt, x, y)
        train_step(twin, ref, x, y)
        for s in scheds:
            s.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _three_groups(model, *settings):
    """The model's three layers as three parameter groups, the i-th with settings[i] (a dict)."""
    layers = [m for m in model if isinstance(m, torch.nn.Linear)]
    return [{"params": list(layer.parameters()), **s} for layer, s in zip(layers, settings)]


GROUP_CASES = [
    ("SGD", cgd.SGD, torch.optim.SGD, dict(lr=0.02),
     [dict(momentum=0.9, nesterov=True), dict(momentum=0.5, dampening=0.3, weight_decay=0.01), dict(lr=0.05)]),
    ("RMSprop", cgd.RMSprop, torch.optim.RMSprop, dict(lr=1e-3),
     [dict(alpha=0.5), dict(weight_decay=0.01, eps=1e-6), dict(maximize=True)]),
    ("Adam", cgd.Adam, torch.optim.Adam, dict(lr=3e-3),
     [dict(betas=(0.8, 0.99)), dict(weight_decay=0.05, eps=1e-6), dict(lr=1e-3, decoupled_weight_decay=True,
                                                                      weight_decay=0.1)]),
    ("AdamW", cgd.AdamW, torch.optim.AdamW, dict(lr=3e-3), [dict(weight_decay=0.3), dict(betas=(0.5, 0.9)), {}]),
]


@pytest.mark.parametrize("name,ours,theirs,kwargs,groups", GROUP_CASES, ids=[c[0] for c in GROUP_CASES])
def test_per_group_arguments_act_as_in_torch(name, ours, theirs, kwargs, groups):
    """Every torch argument a parameter group sets acts on that group exactly as in torch (a group's momentum,
    dampening, nesterov, alpha or betas were once ignored), and so does one added later."""
    model = make_mlp()
    twin = copy.deepcopy(model)
    opt, ref = ours(_three_groups(model, *groups[:2]), **kwargs), theirs(_three_groups(twin, *groups[:2]), **kwargs)
    layers, twin_layers = [m for m in model if isinstance(m, torch.nn.Linear)], [m for m in twin if
                                                                                 isinstance(m, torch.nn.Linear)]
    opt.add_param_group({"params": list(layers[2].parameters()), **groups[2]})
    ref.add_param_group({"params": list(twin_layers[2].parameters()), **groups[2]})
    for x, y in batches(40):
        for m, o in ((model, opt), (twin, ref)):
            train_step(m, o, x, y)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("ours,theirs,kwargs", [
    (cgd.SGD, torch.optim.SGD, dict(lr=0.02, momentum=0.9)),
    (cgd.Adam, torch.optim.Adam, dict(lr=3e-3)),
], ids=["SGD momentum", "Adam betas"])
def test_a_scheduler_that_cycles_momentum_acts_as_in_torch(ours, theirs, kwargs):
    """OneCycleLR changes lr and each group's momentum (SGD) or betas[0] (Adam) every step."""
    model = make_mlp()
    twin = copy.deepcopy(model)
    opt, ref = ours(model.parameters(), **kwargs), theirs(twin.parameters(), **kwargs)
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=30) for o in (opt, ref)]
    for x, y in batches(30):
        for m, o, s in zip((model, twin), (opt, ref), scheds):
            train_step(m, o, x, y)
            s.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


COMPLEX_CASES = [
    ("Adam", cgd.Adam, torch.optim.Adam, dict(lr=3e-3, weight_decay=0.01)),
    ("AdamW", cgd.AdamW, torch.optim.AdamW, dict(lr=3e-3)),
    ("SGD", cgd.SGD, torch.optim.SGD, dict(lr=0.02, momentum=0.9, nesterov=True)),
    ("RMSprop", cgd.RMSprop, torch.optim.RMSprop, dict(lr=1e-3)),
]


@pytest.mark.parametrize("name,ours,theirs,kwargs", COMPLEX_CASES, ids=[c[0] for c in COMPLEX_CASES])
def test_complex_parameters_step_as_in_torch(name, ours, theirs, kwargs):
    """Complex parameters step on their real view, as torch.optim does, with complex state that interchanges
    with torch's: the same trajectory, and torch's checkpoint continues in ours."""
    torch.manual_seed(3)
    w = torch.randn(5, 4, dtype=torch.complex64)
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt, ref = ours([a], **kwargs), theirs([b], **kwargs)
    target = torch.randn(4, dtype=torch.complex64)
    x = torch.randn(8, 5, dtype=torch.complex64)

    def step(p, o):
        o.zero_grad()
        ((x @ p - target).abs() ** 2).mean().backward()
        o.step()

    for _ in range(60):
        step(a, opt)
        step(b, ref)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert all(v.dtype in (torch.complex64, torch.float64) for v in opt.state[a].values())
    resumed = ours([torch.nn.Parameter(b.detach().clone())], **kwargs)
    resumed.load_state_dict(ref.state_dict())
    c = resumed.param_groups[0]["params"][0]
    for _ in range(10):
        step(b, ref)
        step(c, resumed)
    torch.testing.assert_close(c, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,ours,theirs,kwargs", CASES[:1] + CASES[3:5] + CASES[6:7],
                         ids=[c[0] for c in CASES[:1] + CASES[3:5] + CASES[6:7]])
def test_strided_view_parameters_step_as_in_torch(name, ours, theirs, kwargs):
    """A parameter that is a view with gaps (torch's contiguous=False inputs) is stepped like torch.optim steps
    it: the kernels work on a dense copy that is written back, and the base tensor outside the view is untouched."""
    torch.manual_seed(5)
    base = torch.randn(6, 8)
    twin_base, start = base.clone(), base.clone()
    a, b = base[:, ::2], twin_base[:, ::2]
    a.requires_grad_(), b.requires_grad_()
    opt, ref = ours([a], **kwargs), theirs([b], **kwargs)
    for i in range(30):
        g = torch.randn(6, 4, generator=torch.Generator().manual_seed(i))
        a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(base, twin_base, rtol=1e-5, atol=1e-6)
    assert torch.equal(base[:, 1::2], start[:, 1::2]) and not torch.equal(base[:, ::2], start[:, ::2])
