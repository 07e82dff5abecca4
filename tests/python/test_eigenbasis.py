"""cgd.FullCGD(metric="eigenbasis") against its float64 reference (SOAP's algorithm with CGD's power, centering
and start), against pytorch_optimizer's SOAP, and its checkpoints, diagnostics, fallbacks and errors."""

from __future__ import annotations

import copy

import pytest
import torch
from reference_eigenbasis import ReferenceEigenbasisCGD

import cgd


class Net(torch.nn.Module):
    """A square weight, a conv kernel read as 4 x 4, a wide 3 x 5 weight and vectors. With max_factor_dim=4 the
    wide weight keeps a left factor only: square and left-only factors have distinct eigenvalues from the first
    gradient on, so the first basis is unique up to signs, which the step does not depend on. (A full 5 x 5 right
    factor of rank-3 gradients has a degenerate null space whose basis is any LAPACK's choice; the test against
    SOAP covers such tensors from a shared first basis.)"""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(4, 4)
        self.conv = torch.nn.Conv2d(1, 4, 2)
        self.wide = torch.nn.Parameter(torch.randn(3, 5) * 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x[:, :4]))
        c = self.conv(x[:, :4].reshape(-1, 1, 2, 2)).flatten(1)
        return torch.tanh(h + c)[:, :3] @ self.wide


def net(dtype=torch.float32, device="cpu") -> Net:
    torch.manual_seed(4)
    return Net().to(dtype=dtype, device=device)


def data(steps: int, seed: int = 2, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 5, generator=g)
    for _ in range(steps):
        x = torch.randn(32, 6, generator=g)
        yield x.to(device), (torch.sin(x @ w) + 0.1 * torch.randn(32, 5, generator=g)).to(device)


def reference(opt: cgd.FullCGD, p: torch.Tensor) -> ReferenceEigenbasisCGD:
    group = opt.param_groups[0]
    return ReferenceEigenbasisCGD(p.detach().cpu(), lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1],
                                  power=group["power"], eps=group["eps"], centered=group["centered"],
                                  bias_correction=group["bias_correction"], m2_init=group["m2_init"],
                                  weight_decay=group["weight_decay"], refresh_every=group["refresh_every"],
                                  max_factor_dim=group["max_factor_dim"])


SOAP_LIKE = dict(power=0.5, centered=False, bias_correction=True, m2_init=0.0, betas=(0.95, 0.95))


@pytest.mark.parametrize("kwargs", [
    dict(lr=3e-3, refresh_every=5, eps=1e-12, **SOAP_LIKE),
    dict(lr=3e-3, refresh_every=1, eps=1e-12, weight_decay=0.1, **SOAP_LIKE),
    dict(lr=1e-2, refresh_every=3),                                        # the paper's start, a = 0.4, centered
    dict(lr=3e-3, refresh_every=4, power=0.4, betas=(0.9, 0.99), bias_correction=True, m2_init=0.0),  # Adam's
    dict(lr=3e-3, refresh_every=4, power=0.25, centered=False),
    dict(lr=3e-3, refresh_every=2, power=1.0, eps=1e-4, centered=False, bias_correction=True, m2_init=0.0),
    dict(lr=3e-2, refresh_every=2, power=0.0),
])
def test_matches_float64_reference(kwargs, device):
    model = net(device=device)
    opt = cgd.FullCGD(model.parameters(), metric="eigenbasis", max_factor_dim=4, **kwargs)
    refs = [reference(opt, p) for p in model.parameters()]
    worst = scale = 0.0
    start = [p.detach().double().cpu().clone() for p in model.parameters()]
    for x, y in data(40, device=device):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        expected = [ref.step(p.grad.cpu()) for ref, p in zip(refs, model.parameters())]
        opt.step()
        for p, e, s in zip(model.parameters(), expected, start):
            worst = max(worst, (p.detach().double().cpu() - e).abs().max().item())
            scale = max(scale, (e - s).abs().max().item())
    assert scale > 1e-3, "the parameters hardly moved: the comparison would prove nothing"
    assert worst < 2e-3 * scale, f"parameters drifted {worst:.2e} from the float64 reference (moved {scale:.2e})"
    assert opt.solver_stats() == {"float64_retries": 0, "kept_previous": 0, "diagonal_fallbacks": 0,
                                  "lanczos_fallbacks": 0}


def test_float64_parameters_match_the_reference_to_rounding():
    model = net(torch.float64)
    opt = cgd.FullCGD(model.parameters(), metric="eigenbasis", lr=1e-2, refresh_every=3, max_factor_dim=4)
    refs = [reference(opt, p) for p in model.parameters()]
    for x, y in data(30):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x.double()), y.double()).backward()
        expected = [ref.step(p.grad) for ref, p in zip(refs, model.parameters())]
        opt.step()
    for p, e in zip(model.parameters(), expected):
        assert (p.detach() - e).abs().max().item() < 1e-10


def test_matches_pytorch_optimizer_soap():
    """SOAP spends its first call on the factors and first basis; from that state on, it and the eigenbasis
    metric with SOAP's settings take the same steps."""
    from pytorch_optimizer import SOAP

    torch.manual_seed(8)
    shapes = [(4, 4), (5, 3), (3, 6), (6,)]
    start = [torch.randn(s) for s in shapes]
    soap_params = [torch.nn.Parameter(p.clone()) for p in start]
    ours = [torch.nn.Parameter(p.clone()) for p in start]
    soap = SOAP(soap_params, lr=3e-3, betas=(0.95, 0.95), weight_decay=0.0, precondition_frequency=5, eps=0.0)
    opt = cgd.FullCGD(ours, metric="eigenbasis", lr=3e-3, refresh_every=5, eps=1e-30, **SOAP_LIKE)
    gen = torch.Generator().manual_seed(9)
    grads = [[torch.randn(s, generator=gen) * (1 + k) for k, s in enumerate(shapes)] for _ in range(31)]
    for p, g in zip(soap_params, grads[0]):
        p.grad = g.clone()
    soap.step()
    for p, q in zip(ours, soap_params):  # ours, from SOAP's state after its first call
        st = soap.state[q]
        rows, cols = (p.shape[0], p.numel() // p.shape[0]) if p.dim() == 2 else (p.numel(), 1)
        full = p.dim() == 2
        opt.state[p] = {
            "exp_avg": torch.zeros(rows, cols), "rotated_sq": torch.zeros(rows, cols),
            "left_sq": st["GG"][0].clone() if full else torch.zeros(rows),
            "right_sq": st["GG"][1].clone() if full else torch.zeros(cols),
            "left_basis": st["Q"][0].T.clone(memory_format=torch.contiguous_format) if full else torch.zeros(0),
            "right_basis": st["Q"][1].T.clone(memory_format=torch.contiguous_format) if full else torch.zeros(0),
            "left_eig": torch.zeros(rows), "right_eig": torch.zeros(cols),
            "step": torch.zeros((), dtype=torch.float64),
            "outcome": torch.tensor([0, 0] if full else [-1, -1], dtype=torch.int32),
            "counters": torch.zeros(3),
        }
    opt.state[ours[0]]["calls"] = 0
    worst = moved = 0.0
    for step_grads in grads[1:]:
        for p, q, g in zip(ours, soap_params, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        soap.step()
        for p, q, s in zip(ours, soap_params, start):
            worst = max(worst, (p.detach() - q.detach()).abs().max().item())
            moved = max(moved, (q.detach() - s).abs().max().item())
    assert moved > 0.05
    assert worst < 1e-4 * moved, f"ours and SOAP differ by {worst:.2e} after moving {moved:.2e}"


def test_a_vector_steps_as_diagonal_cgd():
    b = torch.nn.Parameter(torch.randn(7))
    d = torch.nn.Parameter(b.detach().clone())
    opt = cgd.FullCGD([b], metric="eigenbasis", lr=1e-3, **SOAP_LIKE)
    adam = torch.optim.Adam([d], lr=1e-3, betas=(0.95, 0.95), eps=0.0)
    gen = torch.Generator().manual_seed(3)
    for _ in range(20):
        g = torch.randn(7, generator=gen)
        b.grad, d.grad = g.clone(), g.clone()
        opt.step()
        adam.step()
    assert (b.detach() - d.detach()).abs().max().item() < 1e-6
    assert opt.state[b]["left_basis"].numel() == 0 and opt.state[b]["right_basis"].numel() == 0


def test_resume_is_bit_identical():
    def run(steps, resume_at=None):
        model = net()
        make = lambda m: cgd.FullCGD(m.parameters(), metric="eigenbasis", lr=3e-3, refresh_every=3)  # noqa: E731
        opt = make(model)
        for i, (x, y) in enumerate(data(steps)):
            if i == resume_at:
                saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
                model = net()
                opt = make(model)
                model.load_state_dict(saved_model)
                opt.load_state_dict(saved_opt)
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(14), run(14, resume_at=8)):
        assert torch.equal(a, b)


def test_a_non_finite_factor_keeps_the_basis_and_counts_it():
    w = torch.nn.Parameter(torch.randn(4, 4))
    opt = cgd.FullCGD([w], metric="eigenbasis", lr=1e-3, refresh_every=2, nonfinite="ignore")
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        w.grad = torch.randn(4, 4, generator=gen)
        opt.step()
    state = opt.state[w]
    basis = state["left_basis"].clone()
    state["left_sq"][0, 0] = float("inf")
    w.grad = torch.randn(4, 4, generator=gen)
    opt.step()  # step 4 refreshes: the left factor is not finite
    assert opt.solver_stats()["kept_previous"] == 1
    assert torch.equal(state["left_basis"], basis)
    assert torch.isfinite(state["right_basis"]).all() and torch.isfinite(state["rotated_sq"]).all()


def test_metric_spectrum_is_the_rotated_moment():
    model = net()
    opt = cgd.FullCGD(model.parameters(), metric="eigenbasis", lr=3e-3, centered=False, refresh_every=2)
    for x, y in data(5):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    spectrum = opt.metric_spectrum(top_k=3)[0]["tensors"][0]
    v = opt.state[next(model.parameters())]["rotated_sq"].flatten().sort(descending=True).values.double()
    assert torch.allclose(spectrum["top"], v[:3]) and spectrum["min"] == pytest.approx(float(v[-1]))
    assert spectrum["outcome"] == ("solved", "solved")


def test_errors_name_the_parameter_and_the_metric():
    w = torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match="solver"):
        cgd.FullCGD([w], metric="eigenbasis", solver="lanczos")
    opt = cgd.FullCGD([w], metric="kron", lr=1e-2)
    w.grad = torch.randn(3, 3)
    opt.step()
    other = cgd.FullCGD([w], metric="eigenbasis", lr=1e-2)
    with pytest.raises(ValueError, match="rotated_sq"):
        other.load_state_dict(opt.state_dict() | {"param_groups": other.state_dict()["param_groups"]})
    other.step()  # an eigenbasis state, loaded into a kron group, is refused at its step
    opt.load_state_dict(other.state_dict() | {"param_groups": opt.state_dict()["param_groups"]})
    with pytest.raises(ValueError, match="metric 'eigenbasis' but this group has 'kron'"):
        opt.step()


def stepped_once() -> tuple[Net, cgd.FullCGD]:
    """The net after one eigenbasis step with a left-only factor for the wide weight, its gradients kept."""
    model = net()
    opt = cgd.FullCGD(model.parameters(), metric="eigenbasis", lr=3e-3, max_factor_dim=4)
    for x, y in data(1):
        torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    return model, opt


def test_opcheck_eigenbasis_step():
    model, opt = stepped_once()
    params = list(model.parameters())
    states = [opt.state[p] for p in params]
    args = (params, [p.grad for p in params], *([st[k] for st in states] for k in cgd.FullCGD._EIGENBASIS_KEYS))
    hyper = dict(lr=0.01, beta1=0.9, beta2=0.99, power=0.5, eps=1e-8, weight_decay=0.0, centered=True,
                 bias_correction=False, maximize=False, refresh=True)
    torch.library.opcheck(torch.ops.cgd.eigenbasis_step_.default, args, hyper)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_parameters_keep_float32_state(dtype):
    model, reference = net(dtype), net()
    make = lambda m: cgd.FullCGD(m.parameters(), metric="eigenbasis", lr=3e-3, refresh_every=3,  # noqa: E731
                                 **SOAP_LIKE)
    opt, ref_opt = make(model), make(reference)
    for x, y in data(10):
        for m, o, xx in ((model, opt, x.to(dtype)), (reference, ref_opt, x)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(xx).float(), y).backward()
            o.step()
    moved = 0.0
    for p, q, s in zip(model.parameters(), reference.parameters(), net().parameters()):
        expected = {"step": torch.float64, "outcome": torch.int32}
        assert all(v.dtype == expected.get(k, torch.float32) for k, v in opt.state[p].items()
                   if isinstance(v, torch.Tensor))
        assert (p.float() - q).abs().max().item() < 0.01  # measured 0.003 (fp16), 0.004 (bf16)
        moved = max(moved, (q - s).abs().max().item())
    assert moved > 0.02  # the comparison is not between two models that stood still


def test_grad_scaler_steps_as_unscaled_and_skips_an_overflow(device):
    """An overflow skips the step, the first one included: a tensor's first basis is then built at the next
    step (on CUDA, where the skip is decided on the device, the first basis's solve runs until the host learns,
    without waiting, that a step went through)."""
    model, reference = net(device=device), net(device=device)
    make = lambda m: cgd.FullCGD(m.parameters(), metric="eigenbasis", lr=3e-3, refresh_every=2)  # noqa: E731
    opt, ref_opt = make(model), make(reference)
    scaler = torch.amp.GradScaler(device, init_scale=1024.0)
    for i, (x, y) in enumerate(data(8, device=device)):
        opt.zero_grad()
        ref_opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if i in (0, 3):  # an overflow: the scaler skips the step, the reference does not take it either
            next(model.parameters()).grad.view(-1)[0] = float("inf")
            scaler.step(opt)
            scaler.update()
            continue
        torch.nn.functional.mse_loss(reference(x), y).backward()
        scaler.step(opt)
        scaler.update()
        ref_opt.step()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert (p - q).abs().max().item() < 1e-5


def test_state_bytes_is_what_the_state_holds():
    model, opt = stepped_once()
    held = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))
    predicted = cgd.full.state_bytes([p.shape for p in model.parameters()], "eigenbasis", max_factor_dim=4)
    assert held == predicted
