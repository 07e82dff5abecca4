"""General power and timescales against the float64 reference of the paper's equations (tests/python/
reference.py). The reference is stepped with the very gradients the optimizer saw, so any difference is the
update rule's, not the model's; 200 steps on an MLP, then low-precision parameters step by step."""

from __future__ import annotations

import pytest
import torch
from conftest import batches, make_mlp
from reference import Hyper, ReferenceCGD

import cgd

# (name, CGD kwargs, reference hyperparameters)
CASES = [
    # Table 2's diagonal CGD: tau = (12.9, 12.3), a = 0.37, paper start M1 = 0, M2 = 1, eps inside.
    ("paper_table2_diagonal", dict(lr=0.069, tau=(12.9, 12.3), power=0.37, bias_correction=False, m2_init=1.0),
     Hyper(lr=0.069, beta1=12.9 / 13.9, beta2=12.3 / 13.3, power=0.37, bias_correction=False, m2_init=1.0)),
    # The paper's variance metric (eq 4.8 with 5.1), as its full CGD uses, on the diagonal.
    ("paper_centered", dict(lr=0.02, tau=(17.1, 15.3), power=0.40, moment="centered", bias_correction=False,
                            m2_init=1.0),
     Hyper(lr=0.02, beta1=17.1 / 18.1, beta2=15.3 / 16.3, power=0.40, moment="centered", bias_correction=False,
           m2_init=1.0)),
    ("default", dict(lr=1e-3), Hyper(lr=1e-3, beta1=0.9, beta2=0.999, power=0.5)),
    # The variance with Adam's start: its first step takes the second moment (the variance is exactly 0 there;
    # that step would be 250 lr g at this eps). eps 1e-6 keeps later near-zero variances, whose float32
    # cancellation the float64 reference does not share, from amplifying rounding by eps^-a.
    ("centered_adam_start", dict(lr=1e-3, power=0.4, eps=1e-6, moment="centered"),
     Hyper(lr=1e-3, beta1=0.9, beta2=0.999, power=0.4, eps=1e-6, moment="centered")),
    ("power_0.23_eps_outside_l2", dict(lr=3e-3, power=0.23, eps_inside=False, weight_decay=0.01,
                                       decoupled_weight_decay=False),
     Hyper(lr=3e-3, beta1=0.9, beta2=0.999, power=0.23, eps_inside=False, weight_decay=0.01,
           decoupled_weight_decay=False)),
    ("power_1_nesterov_decoupled", dict(lr=1e-4, power=1.0, eps=1e-4, nesterov=True, weight_decay=0.1),
     Hyper(lr=1e-4, beta1=0.9, beta2=0.999, power=1.0, eps=1e-4, nesterov=True, weight_decay=0.1)),
    ("ballistic_like_tau1_0", dict(lr=1e-3, tau=(0, 99), power=0.5, eps=1e-8),
     Hyper(lr=1e-3, beta1=0.0, beta2=0.99, power=0.5)),
    ("adabelief", dict(lr=1e-3, moment="belief", eps=1e-16, eps_inside=False),
     Hyper(lr=1e-3, beta1=0.9, beta2=0.999, power=0.5, moment="belief", eps=1e-16, eps_inside=False)),
    ("maximize_power_0.4", dict(lr=1e-3, power=0.4, maximize=True),
     Hyper(lr=1e-3, beta1=0.9, beta2=0.999, power=0.4, maximize=True)),
]


@pytest.mark.parametrize("name,kwargs,hyper", CASES, ids=[c[0] for c in CASES])
def test_matches_float64_reference(device, name, kwargs, hyper):
    model = make_mlp(device=device)
    params = list(model.parameters())
    opt = cgd.CGD(params, **kwargs)
    ref = ReferenceCGD(params, hyper)
    sign = -1.0 if hyper.maximize else 1.0
    for x, y in batches(200, device=device):
        opt.zero_grad()
        (sign * torch.nn.functional.mse_loss(model(x), y)).backward()
        grads = [p.grad.clone() for p in params]
        opt.step()
        ref.step(grads)
    for p, r in zip(params, ref.params):
        torch.testing.assert_close(p.double(), r, rtol=2e-5, atol=2e-6)
    moved = max((p.double() - r0).abs().max().item() for p, r0 in zip(params, ReferenceCGD(
        list(make_mlp(device=device).parameters()), hyper).params))
    assert moved > 1e-3, "the optimizer did not move the parameters: the comparison would be vacuous"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("moment", ["raw", "centered"])
def test_half_precision_parameters_follow_reference(device, dtype, moment):
    """fp16/bf16 parameters with fp32 state: each step equals the float64 update rounded to the dtype."""
    model = make_mlp(device=device, dtype=dtype)
    params = list(model.parameters())
    kwargs = dict(lr=1e-2, power=0.4, moment=moment, bias_correction=moment == "raw",
                  m2_init=0.0 if moment == "raw" else 1.0)
    opt = cgd.CGD(params, **kwargs)
    hyper = Hyper(lr=1e-2, beta1=0.9, beta2=0.999, power=0.4, moment=moment, bias_correction=moment == "raw",
                  m2_init=0.0 if moment == "raw" else 1.0)
    ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    for step, (x, y) in enumerate(batches(30, device=device, dtype=dtype)):
        # Restart the reference from the optimizer's state each step: a one-ulp rounding tie decided differently
        # must not compound, and every step is checked on its own.
        ref = ReferenceCGD(params, hyper)
        ref.t = step
        if step:
            ref.m1 = [opt.state[p]["exp_avg"].double().clone() for p in params]
            ref.m2 = [opt.state[p]["exp_avg_sq"].double().clone() for p in params]
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x).float(), y.float()).backward()
        grads = [p.grad.clone() for p in params]
        opt.step()
        ref.step(grads, round_to=dtype)
        for p, r in zip(params, ref.params):
            assert opt.state[p]["exp_avg"].dtype == torch.float32
            torch.testing.assert_close(p.double(), r, rtol=ulp, atol=1e-6)
