"""cgd.InducedMetric against a float64 reference of the induced-metric paper's Algorithms 1 and 2 and its RMS
variant, against torch.optim.AdamW (RMS metric, xi = 0), over two parameter groups; its checkpoints, loss
hand-off and errors; and the ballistic preset against the rule it implements."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batches
from reference_induced import ReferenceBallistic, ReferenceInduced

import cgd


def small_model(device="cpu", dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(4)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(device, dtype)


def two_groups(model, **second):
    params = list(model.parameters())
    return [{"params": params[:2]}, {"params": params[2:], **second}]


@pytest.mark.parametrize("gamma, embedding, kwargs", [
    ("identity", "loss", dict(lr=0.1, xi=0.1, beta=0.8)),                          # Algorithm 1 (SGD_METRIC)
    ("identity", "log", dict(lr=0.05, xi=0.05, beta=0.5)),                         # Algorithm 2 (SGD_LOG_METRIC)
    ("rms", "loss", dict(lr=0.01, xi=0.01, beta=0.8, beta_rms=0.99)),              # SGD_RMS
    ("rms", "log", dict(lr=0.01, xi=0.02, beta=0.0, momentum=0.5, weight_decay=0.1)),
    ("identity", "loss", dict(lr=0.1, xi=1.0, momentum=0.0)),
])
def test_matches_float64_reference(device, gamma, embedding, kwargs):
    model = small_model(device)
    params = list(model.parameters())
    second = dict(lr=kwargs["lr"] / 2, weight_decay=0.05)
    opt = cgd.InducedMetric(two_groups(model, **second), gamma=gamma, embedding=embedding, **kwargs)
    ref_groups = []
    for gi, group in enumerate(opt.param_groups):
        ref_groups.append({k: group[k] for k in ("lr", "momentum", "gamma", "beta_rms", "eps", "weight_decay")}
                          | {"params": [0, 1] if gi == 0 else [2, 3]})
    ref = ReferenceInduced([p.cpu() for p in params], ref_groups, opt.xi, opt.beta, embedding)
    worst = 0.0
    for x, y in batches(80, device=device):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        expected = ref.step([p.grad.cpu() for p in params], loss=float(loss.detach()))
        opt.step(loss=loss)
        for p, e in zip(params, expected):
            worst = max(worst, (p.detach().cpu().double() - e).abs().max().item())
        assert worst < 1e-5, f"parameters drifted {worst:.2e} from the float64 reference"
    assert abs(float(opt._scratch["rate"]) - 1.0) > 1e-3  # the metric acted: r = 1 would be plain SGD/AdamW


@pytest.mark.parametrize("kwargs", [dict(), dict(weight_decay=0.1, eps=1e-6), dict(betas=(0.5, 0.9))])
def test_rms_metric_with_xi_zero_is_adamw(device, kwargs):
    models = [small_model(device), small_model(device)]
    betas = kwargs.pop("betas", (0.9, 0.999))
    wd = kwargs.get("weight_decay", 0.01)
    ours = cgd.InducedMetric(models[0].parameters(), lr=1e-2, xi=0.0, gamma="rms", momentum=betas[0],
                             beta_rms=betas[1], eps=kwargs.get("eps", 1e-8), weight_decay=wd)
    theirs = torch.optim.AdamW(models[1].parameters(), lr=1e-2, betas=betas, eps=kwargs.get("eps", 1e-8),
                               weight_decay=wd, foreach=False)
    for x, y in batches(100, device=device):
        for model, opt in zip(models, (ours, theirs)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_resume_is_bit_identical_with_two_groups(device):
    def make(model):
        return cgd.InducedMetric(two_groups(model, lr=0.02, gamma="rms"), lr=0.05, xi=0.05, embedding="log")

    def run(steps, resume_at=None):
        model = small_model(device)
        opt = make(model)
        for i, (x, y) in enumerate(batches(steps, device=device)):
            if i == resume_at:
                saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
                model = small_model(device)
                opt = make(model)
                model.load_state_dict(saved_model)
                opt.load_state_dict(saved_opt)
            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss
            opt.step(closure)
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(15), run(15, resume_at=6)):
        assert torch.equal(a, b)


def test_low_precision_parameters_keep_float32_state(device):
    model = small_model(device)
    model[2].to(torch.bfloat16)
    opt = cgd.InducedMetric(model.parameters(), lr=0.01, gamma="rms")
    for x, y in batches(3, device=device):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model[2](model[1](model[0](x)).bfloat16()).float(), y).backward()
        opt.step()
    scalars = ("step", "metric_norm_step", "metric_norm_ema")  # float64 whatever the parameters
    assert all(v.dtype == (torch.float64 if k in scalars else torch.float32)
               for s in opt.state.values() for k, v in s.items())
    assert int(opt.state[next(model.parameters())]["metric_norm_step"]) == 3


def test_skipped_step_changes_nothing(device):
    model = small_model(device)
    opt = cgd.InducedMetric(model.parameters(), lr=0.01, gamma="rms")
    x, y = next(iter(batches(1, device=device)))
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    before = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    opt.found_inf = torch.ones((), device=device)
    opt.step()
    del opt.found_inf
    assert all(torch.equal(a, b) for a, b in zip(before[0].values(), model.state_dict().values()))
    for key in ("metric_norm_ema", "metric_norm_step", "exp_avg_sq"):
        assert torch.equal(before[1]["state"][0][key], opt.state_dict()["state"][0][key])


def test_errors_name_the_problem():
    model = small_model()
    with pytest.raises(ValueError, match="xi = -1"):
        cgd.InducedMetric(model.parameters(), xi=-1)
    with pytest.raises(ValueError, match="gamma = 'adam'"):
        cgd.InducedMetric(model.parameters(), gamma="adam")
    with pytest.raises(ValueError, match="embedding = 'exp'"):
        cgd.InducedMetric(model.parameters(), embedding="exp")
    with pytest.raises(ValueError, match="xi = 0.5 is invalid: is one per optimizer"):
        cgd.InducedMetric([{"params": list(model.parameters()), "xi": 0.5}])
    with pytest.raises(ValueError, match="eps = 0"):
        cgd.InducedMetric(model.parameters(), gamma="rms", eps=0.0)
    opt = cgd.InducedMetric(model.parameters(), embedding="log")
    x, y = next(iter(batches(1)))
    torch.nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(ValueError, match="needs the loss"):
        opt.step()
    with pytest.raises(ValueError, match="loss = -1.0"):
        opt.step(loss=-1.0)
    model[0].weight.grad[0, 0] = float("nan")
    with pytest.raises(cgd.NonFiniteGradientError, match=r"\['params'\]\[0\] \(shape \(5, 6\)\)"):
        opt.step(loss=1.0)


def test_opcheck_induced_ops(device):
    grads = [torch.randn(5, 3, device=device), torch.randn(7, device=device)]
    params = [torch.randn_like(g) for g in grads]
    m1 = [torch.zeros_like(g) for g in grads]
    m2 = [torch.zeros_like(g) for g in grads]
    steps = [torch.zeros((), dtype=torch.float64, device=device) for _ in grads]
    # sum, norm EMA, its step count and the rate: float64 (cgd.h)
    scalars = [torch.zeros((), dtype=torch.float64, device=device) for _ in range(4)]
    hyper = dict(gamma="rms", beta_rms=0.99, eps=1e-8)
    torch.library.opcheck(torch.ops.cgd.induced_norm_.default, (grads, m2, steps, scalars[0]), hyper)
    torch.library.opcheck(torch.ops.cgd.induced_rate_.default, tuple(scalars),
                          dict(xi=0.1, beta=0.8, embedding="loss"))
    torch.library.opcheck(torch.ops.cgd.induced_step_.default, (params, grads, m1, m2, steps, scalars[3]),
                          dict(lr=0.01, momentum=0.9, weight_decay=0.0, maximize=False, **hyper))


def test_ballistic_preset_is_the_rule(device):
    model = small_model(device)
    opt = cgd.Ballistic(model.parameters(), lr=1e-3, beta=0.99, eps=1e-8)
    refs = [ReferenceBallistic(p.cpu(), 1e-3, 0.99, 1e-8) for p in model.parameters()]
    for x, y in batches(60, device=device):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        expected = [r.step(p.grad.cpu()) for r, p in zip(refs, model.parameters())]
        opt.step()
        for p, e in zip(model.parameters(), expected):
            torch.testing.assert_close(p.detach().cpu().double(), e, rtol=1e-5, atol=1e-6)
    assert all("exp_avg" not in s for s in opt.state.values())  # no first moment is kept
