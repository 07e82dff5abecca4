"""cgd.Muon against torch.optim.Muon (torch 2.11) and a float64 Newton-Schulz reference, on every device; conv
kernels, errors, checkpoints and the non-finite policy."""

from __future__ import annotations

import copy

import pytest
import torch

import cgd

SETTINGS = [dict(), dict(adjust_lr_fn="match_rms_adamw"), dict(nesterov=False), dict(weight_decay=0.0),
            dict(momentum=0.9, nesterov=False, weight_decay=0.3, adjust_lr_fn="original")]
IDS = ["defaults", "match_rms_adamw", "no nesterov", "no decay", "momentum 0.9 decay 0.3"]


def quadratic_run(make, steps, device="cpu", **kw):
    """Two matrices (one wide, one tall) pulled towards fixed targets: a problem on which trajectories do not
    diverge from each other, so 200 steps compare."""
    torch.manual_seed(0)
    ws = [torch.nn.Parameter((torch.randn(16, 32) * 0.1).to(device)),
          torch.nn.Parameter((torch.randn(40, 12) * 0.1).to(device))]
    targets = [torch.randn(16, 32).to(device), torch.randn(40, 12).to(device)]
    opt = make(ws, **kw)
    for _ in range(steps):
        loss = sum(((w - t) ** 2).sum() * (1 + i) for i, (w, t) in enumerate(zip(ws, targets)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [w.detach().clone() for w in ws], opt


@pytest.mark.parametrize("kw", SETTINGS, ids=IDS)
def test_first_steps_equal_torch_muon_to_bfloat16_rounding(kw, device):
    """In bfloat16 (torch's precision) the iteration rounds as torch's does: three steps agree to a few units of
    bfloat16 (2^-8 = 0.4%) of the displacement. Not closer: the products sum in another order than torch's, so
    now and then a rounding to bfloat16 falls the other way, and the iteration carries it to every entry. The
    algorithm itself is pinned by the float32 path against the float64 reference below."""
    start, _ = quadratic_run(lambda ws, **k: torch.optim.Muon(ws, lr=0.01, **k), 0, device, **kw)
    ref, _ = quadratic_run(lambda ws, **k: torch.optim.Muon(ws, lr=0.01, **k), 3, device, **kw)
    got, _ = quadratic_run(lambda ws, **k: cgd.Muon(ws, lr=0.01, **k), 3, device, **kw)
    for a, b, s in zip(ref, got, start):
        assert ((a - b).abs().max() / (a - s).abs().max()).item() < 2e-2


@pytest.mark.parametrize("kw", SETTINGS, ids=IDS)
def test_200_steps_stay_within_a_fraction_of_one_step_of_torch_muon(kw, device):
    ref, _ = quadratic_run(lambda ws, **k: torch.optim.Muon(ws, lr=0.01, **k), 200, device, **kw)
    got, opt = quadratic_run(lambda ws, **k: cgd.Muon(ws, lr=0.01, **k), 200, device, **kw)
    for a, b in zip(ref, got):
        assert (a - b).abs().max().item() < 0.5 * 0.01  # lr = 0.01 bounds one step's move of an entry (s = 1)
    assert opt.state[next(iter(opt.state))]["momentum_buffer"].shape == (16, 32)


def newton_schulz64(f: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Muon's quintic Newton-Schulz iteration in float64, written from Jordan et al.'s published algorithm."""
    a, b, c = cgd.muon.NS_COEFFICIENTS
    x = f.double()
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    x = x / max(x.norm().item(), eps)
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


@pytest.mark.parametrize("shape", [(12, 30), (30, 12), (7, 7)])
def test_float32_iteration_matches_float64_reference(shape, device):
    """ns_precision="float32": one step from a zero momentum buffer, B = (1 - mu) g and the Nesterov force
    F = g + mu (B - g), is p (1 - lr wd) - lr s NS(F) as the float64 reference computes it."""
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(shape).to(device))
    start = w.detach().double().clone()
    g = torch.randn(shape).to(device)
    opt = cgd.Muon([w], lr=0.05, weight_decay=0.1, ns_precision="float32")
    w.grad = g.clone()
    opt.step()
    mu = 0.95
    buf = (1 - mu) * g.double()
    force = g.double() + mu * (buf - g.double())
    scale = max(1.0, shape[0] / shape[1]) ** 0.5
    expected = start * (1 - 0.05 * 0.1) - 0.05 * scale * newton_schulz64(force)
    torch.testing.assert_close(w.detach().double(), expected, rtol=0, atol=2e-6)


@pytest.mark.parametrize("power", [0.5, 0.25, 1.0, 0.0])
@pytest.mark.parametrize("shape", [(12, 30), (30, 12)])
def test_eigh_solver_gives_cgds_metric_of_the_force_at_any_power(shape, power, device):
    """solver="eigh": p - lr s (eps I + X X^T)^-a X for the normalised force X, against float64 eigh (the wide
    orientation's Gram matrix, as the kernel takes it); a = 1/2 is the exact orthogonalisation U V^T."""
    torch.manual_seed(4)
    w = torch.nn.Parameter(torch.randn(shape).to(device))
    start = w.detach().double().clone()
    g = torch.randn(shape).to(device)
    opt = cgd.Muon([w], lr=0.05, weight_decay=0.0, solver="eigh", power=power)
    w.grad = g.clone()
    opt.step()
    mu = 0.95
    force = g.double() + mu * ((1 - mu) * g.double() - g.double())
    x = force.T if shape[0] > shape[1] else force
    x = x / x.norm()
    lam, vecs = torch.linalg.eigh(x @ x.T)
    direction = vecs @ torch.diag((1e-7 + lam.clamp_min(0)) ** -power) @ vecs.T @ x
    direction = direction.T if shape[0] > shape[1] else direction
    scale = max(1.0, shape[0] / shape[1]) ** 0.5
    torch.testing.assert_close(w.detach().double(), start - 0.05 * scale * direction, rtol=0, atol=2e-6)
    if power == 0.5:
        u, _, vh = torch.linalg.svd(force)
        k = min(shape)
        torch.testing.assert_close(direction, u[:, :k] @ vh[:k], rtol=0, atol=1e-5)
    assert opt.solver_stats() == {"eigh_failures": 0}


def test_newton_schulz_takes_power_one_half_only():
    with pytest.raises(ValueError, match="power = 0.3 is invalid: needs solver='eigh'"):
        cgd.Muon([torch.nn.Parameter(torch.zeros(3, 4))], power=0.3)


def test_conv_kernel_steps_as_its_out_channels_by_rest_matrix():
    torch.manual_seed(2)
    kernel = torch.nn.Parameter(torch.randn(8, 3, 3, 3) * 0.1)
    matrix = torch.nn.Parameter(kernel.detach().reshape(8, 27).clone())
    ours, ref = cgd.Muon([kernel], lr=0.02), torch.optim.Muon([matrix], lr=0.02)
    for _ in range(3):
        g = torch.randn(8, 3, 3, 3)
        kernel.grad, matrix.grad = g.clone(), g.reshape(8, 27).clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(kernel.detach().reshape(8, 27), matrix.detach(), rtol=0, atol=1e-6)
    channels_last = torch.nn.Parameter(kernel.detach().clone().to(memory_format=torch.channels_last))
    twin = torch.nn.Parameter(kernel.detach().clone())
    a, b = cgd.Muon([channels_last], lr=0.02), cgd.Muon([twin], lr=0.02)
    channels_last.grad = twin.grad = torch.randn(8, 3, 3, 3)
    a.step()
    b.step()
    assert torch.equal(channels_last.detach().contiguous(), twin.detach())


def test_errors_name_the_problem():
    bias = torch.nn.Parameter(torch.zeros(5))
    with pytest.raises(ValueError, match=r"shape \(5,\); Muon steps matrices"):
        cgd.Muon([bias])
    w = [torch.nn.Parameter(torch.zeros(3, 4))]
    with pytest.raises(ValueError, match="adjust_lr_fn = 'rms'"):
        cgd.Muon(w, adjust_lr_fn="rms")
    with pytest.raises(ValueError, match="ns_steps = 100"):
        cgd.Muon(w, ns_steps=100)
    with pytest.raises(ValueError, match="ns_coefficients"):
        cgd.Muon(w, ns_coefficients=(1.0, 2.0))
    with pytest.raises(ValueError, match="momentum = 1.0"):
        cgd.Muon(w, momentum=1.0)
    with pytest.raises(ValueError, match="ns_precision = 'half'"):
        cgd.Muon(w, ns_precision="half")


def test_nan_gradient_raises_and_changes_nothing():
    w = torch.nn.Parameter(torch.randn(4, 6))
    opt = cgd.Muon([w], lr=0.02)
    w.grad = torch.randn(4, 6)
    opt.step()
    before, state = w.detach().clone(), copy.deepcopy(opt.state[w])
    w.grad = torch.full((4, 6), float("nan"))
    with pytest.raises(cgd.NonFiniteGradientError, match=r"\['params'\]\[0\]"):
        opt.step()
    assert torch.equal(w.detach(), before)
    assert torch.equal(opt.state[w]["momentum_buffer"], state["momentum_buffer"])


def test_resume_is_bit_identical(tmp_path):
    def make():
        torch.manual_seed(3)
        return [torch.nn.Parameter(torch.randn(6, 9)), torch.nn.Parameter(torch.randn(9, 4))]

    grads = [[torch.randn(6, 9), torch.randn(9, 4)] for _ in range(10)]

    def train(ws, opt, chunk):
        for gs in chunk:
            for w, g in zip(ws, gs):
                w.grad = g.clone()
            opt.step()

    straight = make()
    train(straight, cgd.Muon(straight, lr=0.02), grads)
    first = make()
    opt = cgd.Muon(first, lr=0.02)
    train(first, opt, grads[:4])
    torch.save({"w": [w.detach() for w in first], "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt")
    resumed = [torch.nn.Parameter(w.clone()) for w in saved["w"]]
    opt2 = cgd.Muon(resumed, lr=0.02)
    opt2.load_state_dict(saved["opt"])
    train(resumed, opt2, grads[4:])
    assert all(torch.equal(a, b) for a, b in zip(straight, resumed))


def test_tau_gives_the_momentum_and_is_exclusive_with_it():
    w = torch.nn.Parameter(torch.randn(4, 3))
    assert cgd.Muon([w], tau=19.0).param_groups[0]["momentum"] == pytest.approx(0.95)
    assert cgd.Muon([w], tau=9.0).param_groups[0]["momentum"] == pytest.approx(0.9)
    with pytest.raises(ValueError, match="tau"):
        cgd.Muon([w], tau=9.0, momentum=0.9)
    with pytest.raises(ValueError, match="tau"):
        cgd.Muon([w], tau=-1.0)
