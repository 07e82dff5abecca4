"""cgd.CGD.noise_scale: the simple gradient noise scale tr(Sigma) / |G|^2 from the step's moments, against a
float64 reference of the same estimator and against the known value of synthetic gradients."""

from __future__ import annotations

import pytest
import torch

import cgd


def synthetic(n: int, steps: int, seed: int = 0):
    """Gradients G + sigma * z with a known mean and a diagonal covariance: B_simple = sum(sigma^2) / |G|^2."""
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(n, generator=gen, dtype=torch.float64) * 0.1
    sigma = torch.rand(n, generator=gen, dtype=torch.float64) * 0.5
    grads = [mean + sigma * torch.randn(n, generator=gen, dtype=torch.float64) for _ in range(steps)]
    return grads, float((sigma**2).sum() / (mean**2).sum())


def reference(grads, beta1, beta2, m2_init):
    """The estimator in float64, from the EMAs written out: bias-corrected F and S, r = sum w^2 / (sum w)^2."""
    m1 = torch.zeros_like(grads[0])
    m2 = torch.full_like(grads[0], m2_init)
    for g in grads:
        m1 = beta1 * m1 + (1 - beta1) * g
        m2 = beta2 * m2 + (1 - beta2) * g * g
    t = len(grads)
    weights = torch.tensor([(1 - beta1) * beta1 ** (t - 1 - s) for s in range(t)], dtype=torch.float64)
    r = float((weights**2).sum() / weights.sum() ** 2)
    force = m1 / (1 - beta1**t)
    second = (m2 - beta2**t * m2_init) / (1 - beta2**t)
    var = float(((second - force**2) / (1 - r)).sum())
    return var / (float((force**2).sum()) - r * var)


@pytest.mark.parametrize("kw,m2_init", [(dict(), 0.0),
                                        (dict(bias_correction=False, m2_init=1.0, moment="centered"), 1.0)],
                         ids=["adam start", "paper start, centered"])
def test_matches_the_float64_estimator_and_the_true_value(kw, m2_init):
    n, steps = 4000, 1500
    grads, truth = synthetic(n, steps)
    p = torch.nn.Parameter(torch.zeros(n))
    opt = cgd.CGD([p], lr=0.0, betas=(0.9, 0.99), **kw)
    for g in grads:
        p.grad = g.float()
        opt.step()
    got = opt.noise_scale()
    expected = reference([g.float().double() for g in grads], 0.9, 0.99, m2_init)
    assert got["model"] == pytest.approx(expected, rel=1e-4)
    assert got["groups"] == [got["model"]] and list(got["params"].values()) == [got["model"]]
    assert list(got["params"]) == ["param_groups[0]['params'][0] (shape (4000,))"]
    # The estimate itself: within a few percent of tr(Sigma) / |G|^2 (4000 coordinates, a 100-step window).
    assert got["model"] == pytest.approx(truth, rel=0.1)
    assert opt.noise_scale(batch_size=32)["model"] == pytest.approx(32 * got["model"])


def test_groups_params_and_what_has_no_estimate():
    grads, _ = synthetic(300, 50, seed=1)
    a, b, c = (torch.nn.Parameter(torch.zeros(100)) for _ in range(3))
    opt = cgd.CGD([{"params": [a, b]}, {"params": [c], "betas": (0.0, 0.99)}], lr=0.0)
    assert opt.noise_scale() == {"model": None, "groups": [None, None], "params": {}}
    for g in grads:
        a.grad, b.grad, c.grad = g[:100].float(), g[100:200].float(), g[200:].float()
        opt.step()
    got = opt.noise_scale()
    assert got["groups"][1] is None  # beta1 = 0: no average of g to take the variance from
    assert [k.split(" ")[0] for k in got["params"]] == ["param_groups[0]['params'][0]",
                                                       "param_groups[0]['params'][1]"]
    assert got["model"] == pytest.approx(got["groups"][0])
    sgd = cgd.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1, momentum=0.9)
    assert sgd.noise_scale()["groups"] == [None]
    with pytest.raises(ValueError, match="batch_size = 0"):
        opt.noise_scale(batch_size=0)
