"""cgd.FullCGD(metric="kron") against the float64 reference of the Kronecker-factored metric, against full mode
where the covariance is a Kronecker product, and its checkpoints, diagnostics, precision and errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batches
from reference_kron import ReferenceKronCGD

import cgd


def small_model(device="cpu", dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(device, dtype)


@pytest.mark.parametrize("kwargs", [
    dict(lr=0.02),                                                       # paper's full-CGD tau and a = 0.4
    dict(lr=0.01, power=0.5, centered=False),
    dict(lr=0.005, betas=(0.9, 0.99), power=0.25, bias_correction=True, m2_init=0.0, centered=False),
    dict(lr=0.005, betas=(0.9, 0.99), power=0.4, eps=1e-6, bias_correction=True, m2_init=0.0),  # Adam's start
    dict(lr=0.02, weight_decay=0.1, refresh_every=4),
    dict(lr=0.02, max_factor_dim=5),                                     # the 5 x 6 weight's right side diagonal
    dict(lr=0.05, power=0.0),
])
def test_matches_float64_reference(device, kwargs):
    model = small_model(device)
    opt = cgd.FullCGD(model.parameters(), metric="kron", **kwargs)
    group = opt.param_groups[0]
    refs = [ReferenceKronCGD(p.detach().cpu(), lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                             power=group["power"], eps=group["eps"], centered=group["centered"],
                             bias_correction=group["bias_correction"], m2_init=group["m2_init"],
                             weight_decay=group["weight_decay"], refresh_every=group["refresh_every"],
                             max_factor_dim=group["max_factor_dim"]) for p in model.parameters()]
    worst = 0.0
    for x, y in batches(60, device=device):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        expected = [ref.step(p.grad.cpu()) for ref, p in zip(refs, model.parameters())]
        opt.step()
        for p, e in zip(model.parameters(), expected):
            worst = max(worst, (p.detach().cpu().double() - e).abs().max().item())
        assert worst < 2e-4, f"parameters drifted {worst:.2e} from the float64 reference"


def _kron_vs_full(device, grads, **kwargs):
    start = torch.randn(grads[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weights = [torch.nn.Parameter(start.to(device, torch.float32)) for _ in range(2)]
    opts = [cgd.FullCGD([weights[0]], metric="kron", **kwargs), cgd.FullCGD([weights[1]], metric="full", **kwargs)]
    for g in grads:
        for w, opt in zip(weights, opts):
            w.grad = g.to(device, torch.float32)
            opt.step()
    return weights


def test_equals_full_when_the_covariance_is_a_kronecker_product(device):
    # G_t = w_t v^T with a fixed v: vec(G) = w_t (x) v, so M2 and C are (EMA over w) (x) v v^T for every t (with
    # M2(0) = 0, as I (x) I plus a Kronecker product is not one).
    gen = torch.Generator().manual_seed(5)
    v = torch.randn(3, generator=gen)
    grads = [torch.outer(torch.randn(4, generator=gen), v) for _ in range(25)]
    weights = _kron_vs_full(device, grads, lr=0.01, power=0.5, m2_init=0.0, eps=1e-4)
    moved = (weights[1].detach() - weights[0].detach()).abs().max().item()
    assert moved < 1e-4, f"kron and full differ by {moved:.2e} on a Kronecker covariance"
    # ...and the check can fail: a generic covariance is not a Kronecker product.
    generic = [torch.randn(4, 3, generator=gen) for _ in range(25)]
    weights = _kron_vs_full(device, generic, lr=0.01, power=0.5, m2_init=0.0, eps=1e-4)
    assert (weights[1].detach() - weights[0].detach()).abs().max().item() > 1e-3


def test_vector_equals_full_for_any_start(device):
    # A vector is a column: its left factor is its whole covariance and the right factor is its trace.
    gen = torch.Generator().manual_seed(6)
    grads = [torch.randn(7, generator=gen) for _ in range(20)]
    weights = _kron_vs_full(device, grads, lr=0.02)
    assert (weights[1].detach() - weights[0].detach()).abs().max().item() < 1e-5


def test_resume_is_bit_identical(device):
    def run(steps, resume_at=None):
        model = small_model(device)
        opt = cgd.FullCGD(model.parameters(), metric="kron", lr=0.02, refresh_every=3)
        for i, (x, y) in enumerate(batches(steps, device=device)):
            if i == resume_at:
                saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
                model = small_model(device)
                opt = cgd.FullCGD(model.parameters(), metric="kron", lr=0.02, refresh_every=3)
                model.load_state_dict(saved_model)
                opt.load_state_dict(saved_opt)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(12), run(12, resume_at=7)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_parameters_keep_float32_state(device, dtype):
    model = small_model(device, dtype)
    opt = cgd.FullCGD(model.parameters(), metric="kron", lr=0.02)
    reference = small_model(device)
    ref_opt = cgd.FullCGD(reference.parameters(), metric="kron", lr=0.02)
    for x, y in batches(10, device=device):
        for m, o, xx, yy in ((model, opt, x.to(dtype), y.to(dtype)), (reference, ref_opt, x, y)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(xx).float(), yy.float()).backward()
            o.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        expected = {"step": torch.float64, "outcome": torch.int32}
        assert all(v.dtype == expected.get(k, torch.float32) for k, v in opt.state[p].items()
                   if isinstance(v, torch.Tensor))
        assert (p.float() - q).abs().max().item() < 0.05


def test_conv_weight_is_out_channels_by_the_rest_and_frozen_params_are_skipped(device):
    conv = torch.nn.Conv2d(2, 4, 3).to(device)
    frozen = torch.nn.Parameter(torch.randn(3, 3, device=device))
    opt = cgd.FullCGD([conv.weight, conv.bias, frozen], metric="kron", lr=0.01)
    conv(torch.randn(2, 2, 5, 5, device=device)).square().mean().backward()
    opt.step()
    state = opt.state[conv.weight]
    assert state["exp_avg"].shape == (4, 18) and state["left_basis"].shape == (4, 4)
    assert state["right_basis"].shape == (18, 18) and frozen not in opt.state


def test_large_side_keeps_a_diagonal_factor(device):
    w = torch.nn.Parameter(torch.randn(40, 3, device=device))
    opt = cgd.FullCGD([w], metric="kron", lr=0.01, max_factor_dim=16)
    w.grad = torch.randn_like(w)
    opt.step()
    state = opt.state[w]
    assert state["left_sq"].shape == (40,) and state["left_basis"].numel() == 0
    assert state["right_sq"].shape == (3, 3)
    assert cgd.full.state_bytes([(40, 3)], "kron", max_factor_dim=16) == 4 * (120 + 80 + 2 * 9 + 3) + 28


def test_metric_spectrum_is_the_product_of_the_factor_spectra(device):
    model = small_model(device)
    opt = cgd.FullCGD(model.parameters(), metric="kron", lr=0.02)
    for x, y in batches(5, device=device):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    (spectrum,) = opt.metric_spectrum(top_k=4)
    first = spectrum["tensors"][0]
    state = opt.state[model[0].weight]
    products = torch.outer(state["left_eig"].double().clamp_min(0), state["right_eig"].double().clamp_min(0))
    expected = products.flatten().sort(descending=True).values
    assert torch.allclose(first["top"], expected[:4].cpu())
    assert first["shape"] == (5, 6) and first["outcome"] == ("solved", "solved")
    assert first["effective_rank"] == pytest.approx((expected.sum() ** 2 / (expected**2).sum()).item(), rel=1e-9)
    assert opt.solver_stats() == {"float64_retries": 0, "kept_previous": 0, "diagonal_fallbacks": 0,
                                 "lanczos_fallbacks": 0}


def test_errors_name_the_parameter():
    w = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="max_factor_dim"):
        cgd.FullCGD([w], metric="kron", max_factor_dim=0)
    with pytest.raises(ValueError, match="max_factor_dim"):
        cgd.FullCGD([w], metric="kron", max_factor_dim=50000)
    with pytest.raises(ValueError, match="metric='kron'"):
        cgd.FullCGD([torch.nn.Parameter(torch.randn(3000, 3000))], metric="kron", max_state_bytes=10**6)


def test_opcheck_kron_step(device):
    model = small_model(device)
    opt = cgd.FullCGD(model.parameters(), metric="kron", lr=0.02, max_factor_dim=5)
    for x, y in batches(1, device=device):
        torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    params = list(model.parameters())
    states = [opt.state[p] for p in params]
    keys = ("exp_avg", "left_sq", "right_sq", "left_basis", "right_basis", "left_eig", "right_eig", "step",
            "outcome", "counters")
    args = (params, [p.grad for p in params], *([st[k] for st in states] for k in keys))
    hyper = dict(lr=0.01, beta1=0.9, beta2=0.99, power=0.5, eps=1e-8, weight_decay=0.0, centered=True,
                 bias_correction=False, maximize=False, refresh=True)
    torch.library.opcheck(torch.ops.cgd.kron_step_.default, args, hyper)


@pytest.mark.parametrize("metric", ["kron", "block"])
def test_metric_spectrum_takes_top_k_zero_and_names_a_bad_one(metric):
    model = small_model()
    opt = cgd.FullCGD(model.parameters(), metric=metric, block_size=4, lr=0.02)
    for x, y in batches(2):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    full = opt.metric_spectrum()
    none = opt.metric_spectrum(top_k=0)
    first, first_none = (full[0]["tensors"][0], none[0]["tensors"][0]) if metric == "kron" else (full[0], none[0])
    assert first_none["top"].numel() == 0
    assert torch.equal(torch.as_tensor(first_none["condition"]), torch.as_tensor(first["condition"]))
    with pytest.raises(ValueError, match=r"top_k = '3' is invalid"):
        opt.metric_spectrum(top_k="3")
