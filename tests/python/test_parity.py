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
