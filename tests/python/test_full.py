"""cgd.FullCGD (full and block-diagonal covariance metric) against the float64 reference of eq 4.9, against
diagonal CGD at block size 1, and its failure ladder, diagnostics, checkpoints and errors."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import batches, make_mlp
from reference_full import ReferenceFullCGD, ReferenceWindowCGD

import cgd


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def small_model(device="cpu", dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3)).to(device, dtype)


def block_indices(model: torch.nn.Module, metric: str, block_size: int) -> list[list[int]]:
    if metric == "full":
        return [list(range(sum(p.numel() for p in model.parameters())))]
    blocks, start = [], 0
    for p in model.parameters():
        n = p.numel()
        blocks += [list(range(start + b, start + min(b + block_size, n))) for b in range(0, n, block_size)]
        start += n
    return blocks


def run_against_reference(device, metric, block_size=4, steps=60, refresh_every=1, **kwargs):
    model = small_model(device)
    opt = cgd.FullCGD(model.parameters(), metric=metric, block_size=block_size, refresh_every=refresh_every,
                      **kwargs)
    group = opt.param_groups[0]
    ref = ReferenceFullCGD(flat(model).cpu(), block_indices(model, metric, block_size), lr=group["lr"],
                           beta1=group["betas"][0], beta2=group["betas"][1], power=group["power"], eps=group["eps"],
                           centered=group["centered"], bias_correction=group["bias_correction"],
                           m2_init=group["m2_init"], weight_decay=group["weight_decay"], refresh_every=refresh_every)
    worst = 0.0
    for x, y in batches(steps, device=device):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        # The reference steps from the same gradient; the parameters are compared, not reset, so errors compound.
        expected = ref.step(flat_grad(model).cpu())
        opt.step()
        worst = max(worst, (flat(model).cpu().double() - expected).abs().max().item())
        assert worst < 2e-4, f"{metric}: parameters drifted {worst:.2e} from the float64 reference"
    return worst


@pytest.mark.parametrize("solver", ["eigh", "lanczos"])
@pytest.mark.parametrize("metric", ["full", "block"])
@pytest.mark.parametrize("kwargs", [
    dict(lr=0.02),                                                       # paper defaults: tau, a = 0.4, M2(0) = I
    dict(lr=0.01, power=0.5, centered=False),
    dict(lr=0.005, betas=(0.9, 0.99), power=0.25, bias_correction=True, m2_init=0.0, centered=False),
    dict(lr=0.005, betas=(0.9, 0.99), power=0.4, eps=1e-6, bias_correction=True, m2_init=0.0),  # Adam's start
    dict(lr=0.02, power=0.4, weight_decay=0.1),
    dict(lr=0.05, power=0.0),                                            # SGD with an EMA force
])
def test_matches_float64_reference(device, metric, solver, kwargs):
    if solver == "lanczos" and device != "cpu":
        pytest.skip("the Lanczos solver runs on the CPU")
    run_against_reference(device, metric, solver=solver, **kwargs)


def _directions(opt, param, grads):
    """opt's direction (eps I + C)^-a F at each step of a fixed gradient sequence: the parameter is reset to 0
    before each step, so with lr = 1 it holds exactly minus the direction (no rounding of a difference)."""
    out = []
    for g in grads:
        with torch.no_grad():
            param.zero_()
        param.grad = g.float().clone()
        opt.step()
        out.append(-param.detach().double().clone())
    return out


@pytest.mark.parametrize("centered", [True, False], ids=["centered", "raw"])
@pytest.mark.parametrize("start", ["paper", "adam"])
def test_lanczos_direction_is_as_close_to_eq_4_9_as_the_eigendecomposition(centered, start):
    """Per step, the relative error of the direction against the float64 eq 4.9 reference: the Lanczos solver's
    is no larger than the float32 eigendecomposition's, from the ill-conditioned first steps (with Adam's start
    C has rank t, every other eigenvalue 0, so the metric spans eps^-a to 1) to a full-rank C whose eigenvalues
    spread over six decades."""
    n, steps = 120, 150
    gen = torch.Generator().manual_seed(11)
    basis = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))[0]
    scales = torch.logspace(0, -3, n, dtype=torch.float64)  # gradient covariance spectrum 1 .. 1e-6
    mean = 0.3 * torch.randn(n, generator=gen, dtype=torch.float64) * scales
    grads = [mean + basis @ (scales * torch.randn(n, generator=gen, dtype=torch.float64)) for _ in range(steps)]
    kw = dict(lr=1.0, betas=(0.9, 0.99), power=0.4, centered=centered)
    kw.update(dict(m2_init=1e-2) if start == "paper" else dict(m2_init=0.0, bias_correction=True))
    errors = {}
    for solver in ("eigh", "lanczos"):
        param = torch.nn.Parameter(torch.zeros(n))
        opt = cgd.FullCGD([param], solver=solver, **kw)
        ref = ReferenceFullCGD(torch.zeros(n), [list(range(n))], lr=1.0, beta1=0.9, beta2=0.99, power=0.4,
                               centered=centered, bias_correction=start == "adam", m2_init=kw["m2_init"])
        errors[solver] = []
        for d in _directions(opt, param, grads):
            ref.q.zero_()
            expected = -ref.step(grads[len(errors[solver])])
            errors[solver].append(((d - expected).norm() / expected.norm()).item())
        assert opt.solver_stats()["lanczos_fallbacks"] == 0
    worst = {k: max(v) for k, v in errors.items()}
    assert worst["lanczos"] <= max(worst["eigh"], 1e-6), worst
    assert sum(errors["lanczos"]) <= sum(errors["eigh"]), worst


def test_refresh_every_applies_cached_metric(device):
    run_against_reference(device, "full", refresh_every=5, lr=0.02)


def test_block_at_least_tensor_size_equals_full_for_one_tensor(device):
    start = torch.randn(4, 5, generator=torch.Generator().manual_seed(0)).to(device)
    weights = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    opts = [cgd.FullCGD([weights[0]], lr=0.03, metric="full"),
            cgd.FullCGD([weights[1]], lr=0.03, metric="block", block_size=32)]
    for step in range(40):
        g = torch.randn(4, 5, generator=torch.Generator().manual_seed(step)).to(device)
        for w, opt in zip(weights, opts):
            w.grad = g.clone()
            opt.step()
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("centered", [True, False])
def test_block_size_one_equals_diagonal_cgd(device, centered):
    a, b = make_mlp(device=device), make_mlp(device=device)
    full = cgd.FullCGD(a.parameters(), lr=0.01, betas=(0.9, 0.95), power=0.4, metric="block", block_size=1,
                       centered=centered)
    diag = cgd.CGD(b.parameters(), lr=0.01, betas=(0.9, 0.95), power=0.4, moment="centered" if centered else "raw",
                   bias_correction=False, m2_init=1.0)
    for x, y in batches(100, device=device):
        for model, opt in ((a, full), (b, diag)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_parameters_keep_fp32_state(device, dtype):
    model = small_model(device, dtype)
    opt = cgd.FullCGD(model.parameters(), lr=0.02)
    for x, y in batches(20, device=device, dtype=dtype):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    state = opt.state[next(model.parameters())]
    assert all(state[k].dtype == torch.float32 for k in ("exp_avg", "exp_avg_sq", "precond", "eigvals"))
    assert all(torch.isfinite(p).all() for p in model.parameters())


def train(model, opt, steps, start=0, device="cpu"):
    for i, (x, y) in enumerate(batches(start + steps, device=device)):
        if i < start:
            continue
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("metric,refresh_every", [("full", 3), ("block", 3), ("full", 1)],
                         ids=["full eigh", "block eigh", "full lanczos"])
def test_resume_is_bit_identical(device, metric, refresh_every, tmp_path):
    kw = dict(lr=0.02, metric=metric, block_size=8, refresh_every=refresh_every)
    a = small_model(device)
    opt_a = cgd.FullCGD(a.parameters(), **kw)
    train(a, opt_a, 40, device=device)

    b = small_model(device)
    opt_b = cgd.FullCGD(b.parameters(), **kw)
    train(b, opt_b, 17, device=device)
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, tmp_path / "ckpt.pt")
    c = small_model(device)
    opt_c = cgd.FullCGD(c.parameters(), **kw)
    saved = torch.load(tmp_path / "ckpt.pt")
    c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    train(c, opt_c, 23, start=17, device=device)
    for pa, pc in zip(a.parameters(), c.parameters()):
        assert torch.equal(pa, pc)


def test_failed_refresh_keeps_previous_metric_and_counts_it():
    model = small_model()
    opt = cgd.FullCGD(model.parameters(), lr=0.02, metric="block", block_size=8)
    train(model, opt, 3)
    state = opt.state[next(model.parameters())]
    before = state["precond"].clone()
    state["exp_avg_sq"][1, 0, 1] = state["exp_avg_sq"][1, 1, 0] = float("nan")  # block 1's solve now fails in float32 and float64
    train(model, opt, 1, start=3)
    assert opt.solver_stats() == {"float64_retries": 0, "kept_previous": 1, "diagonal_fallbacks": 0,
                                 "lanczos_fallbacks": 0}
    assert torch.equal(state["precond"][1], before[1])
    assert opt.metric_spectrum()[0]["outcome"][1] == "kept previous"
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_failed_first_refresh_falls_back_to_diagonal_metric():
    model = small_model()
    opt = cgd.FullCGD(model.parameters(), lr=0.02, metric="block", block_size=8)
    train(model, opt, 1)
    state = opt.state[next(model.parameters())]
    state["outcome"].fill_(-1)  # as if block 0 had never been refreshed
    state["exp_avg_sq"][0, 2, 3] = state["exp_avg_sq"][0, 3, 2] = float("inf")
    train(model, opt, 1, start=1)
    assert opt.solver_stats()["diagonal_fallbacks"] == 1
    p0 = state["precond"][0]
    assert torch.equal(p0, torch.diag(torch.diagonal(p0)))  # diagonal, finite
    assert torch.isfinite(p0).all()
    assert opt.metric_spectrum()[0]["outcome"][0] == "diagonal fallback"


@pytest.mark.parametrize("solver", ["eigh", "lanczos"])
def test_metric_spectrum_matches_eigh_of_the_covariance(solver):
    model = small_model()
    opt = cgd.FullCGD(model.parameters(), lr=0.02, tau=(10.0, 10.0), solver=solver)
    ref = ReferenceFullCGD(flat(model), block_indices(model, "full", 0), lr=0.02, beta1=10 / 11, beta2=10 / 11,
                           power=0.4)
    for x, y in batches(30):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        ref.step(flat_grad(model))
        opt.step()
    force = ref.m1
    expected = torch.linalg.eigvalsh(ref.m2[0] - torch.outer(force, force)).flip(0)
    spectrum = opt.metric_spectrum(top_k=10)[0]
    torch.testing.assert_close(spectrum["top"][0], expected[:10], rtol=1e-3, atol=1e-7)
    assert spectrum["condition"][0] >= 1.0
    assert 1.0 <= spectrum["effective_rank"][0] <= expected.numel()


def test_lanczos_on_a_non_finite_covariance_falls_back_to_the_diagonal_metric():
    model = small_model()
    opt = cgd.FullCGD(model.parameters(), lr=0.02)
    train(model, opt, 2)
    state = opt.state[next(model.parameters())]
    assert state["precond"].numel() == 0  # the Lanczos solver keeps no P
    assert opt.metric_spectrum()[0]["outcome"] == ["lanczos"]
    state["exp_avg_sq"][0, 2, 3] = state["exp_avg_sq"][0, 3, 2] = float("inf")
    train(model, opt, 1, start=2)
    assert opt.solver_stats() == {"float64_retries": 0, "kept_previous": 0, "diagonal_fallbacks": 1,
                                 "lanczos_fallbacks": 1}
    assert opt.metric_spectrum()[0]["outcome"] == ["diagonal fallback"]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_auto_solver_choice_and_switching_solvers_mid_run():
    """solver="auto": Lanczos on the CPU for blocks of 17 or more refreshed every step, the eigendecomposition
    otherwise; a group switched to "eigh" later gets its P at the next step (a refresh), and back again drops it."""
    def precond_numel(**kw):
        p = torch.nn.Parameter(torch.randn(40))
        opt = cgd.FullCGD([p], lr=0.01, metric="block", **kw)
        p.grad = torch.randn(40)
        opt.step()
        return opt.state[p]["precond"].numel()
    assert precond_numel(block_size=16) == 3 * 16 * 16  # eigh: 40 coordinates in 3 blocks of 16
    assert precond_numel(block_size=17) == 0
    assert precond_numel(block_size=17, refresh_every=2) == 3 * 17 * 17
    model = small_model()
    opt = cgd.FullCGD(model.parameters(), lr=0.02)
    twin_model = small_model()
    twin = cgd.FullCGD(twin_model.parameters(), lr=0.02, solver="eigh")
    train(model, opt, 3)
    train(twin_model, twin, 3)
    opt.param_groups[0]["solver"] = "eigh"
    train(model, opt, 2, start=3)
    train(twin_model, twin, 2, start=3)
    state = opt.state[next(model.parameters())]
    assert state["precond"].shape == twin.state[next(twin_model.parameters())]["precond"].shape
    for a, b in zip(model.parameters(), twin_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    opt.param_groups[0]["solver"] = "lanczos"
    train(model, opt, 1, start=5)
    assert state["precond"].numel() == 0


def test_a_state_dict_from_before_the_solver_option_loads():
    """Saved without the solver key (it ran the eigendecomposition) and with 3 counters: it loads and steps."""
    model = small_model()
    opt = cgd.FullCGD(model.parameters(), lr=0.02, solver="eigh")
    train(model, opt, 2)
    sd = copy.deepcopy(opt.state_dict())
    for group in sd["param_groups"]:
        del group["solver"]
    for state in sd["state"].values():
        if "counters" in state:
            state["counters"] = state["counters"][:3].clone()
    resumed = cgd.FullCGD(model.parameters(), lr=0.02)
    resumed.load_state_dict(sd)
    assert resumed.param_groups[0]["solver"] == "auto"
    train(model, resumed, 1, start=2)
    assert resumed.state[next(model.parameters())]["counters"].numel() == 4
    assert resumed.solver_stats()["lanczos_fallbacks"] == 0


def test_lanczos_results_do_not_depend_on_the_thread_count():
    """One large block spreads its products with M2 over the threads, many blocks spread over them whole: either
    way each entry is summed alike, so 1, 2 and 3 threads give the same bits."""
    gen = torch.Generator().manual_seed(2)
    grads = [torch.randn(700, generator=gen) for _ in range(4)]
    before, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            params = [torch.nn.Parameter(torch.zeros(700)) for _ in range(2)]
            opts = [cgd.FullCGD([params[0]], lr=0.1, metric="full"),
                    cgd.FullCGD([params[1]], lr=0.1, metric="block", block_size=70, solver="lanczos")]
            for g in grads:
                for p, opt in zip(params, opts):
                    p.grad = g.clone()
                    opt.step()
            results.append([p.detach().clone() for p in params])
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


WINDOW_SETTINGS = [
    dict(lr=0.02),                                                        # the paper's start, centered
    dict(lr=0.01, power=0.5, centered=False),
    dict(lr=0.005, betas=(0.9, 0.99), power=0.4, eps=1e-6, bias_correction=True, m2_init=0.0),  # Adam's start
    dict(lr=0.005, betas=(0.9, 0.8), power=0.25, bias_correction=True, m2_init=0.0, centered=False),
    dict(lr=0.02, power=0.4, weight_decay=0.1, maximize=True),
]


@pytest.mark.parametrize("window", [100, 3], ids=["every gradient kept", "truncated"])
@pytest.mark.parametrize("kwargs", WINDOW_SETTINGS)
def test_window_solver_matches_its_float64_reference(kwargs, window):
    """Float64 parameters: within 1e-10 of the dense float64 reference over 30 steps, both while the window holds
    every gradient (then the reference is eq 4.9 itself: ReferenceFullCGD) and past it (the truncated M2)."""
    model = small_model(dtype=torch.float64)
    opt = cgd.FullCGD(model.parameters(), solver="window", window=window, **kwargs)
    group = opt.param_groups[0]
    settings = dict(lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], power=group["power"],
                    eps=group["eps"], centered=group["centered"], bias_correction=group["bias_correction"],
                    m2_init=group["m2_init"], weight_decay=group["weight_decay"])
    q0 = flat(model)
    ref = (ReferenceFullCGD(q0, block_indices(model, "full", 0), **settings) if window > 30 else
           ReferenceWindowCGD(q0, window, **settings))
    sign = -1.0 if kwargs.get("maximize") else 1.0
    for x, y in batches(30):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x.double()), y.double()).backward()
        expected = ref.step(sign * flat_grad(model))
        opt.step()
        moved = (expected - q0).norm().item()
        assert (flat(model) - expected).norm().item() <= 1e-10 * moved


def test_window_solver_float32_is_as_close_to_eq_4_9_as_the_eigendecomposition():
    """Adam's start, centered, a poorly conditioned C (rank <= t): float32 state against the float64 reference."""
    errors = {}
    for solver in ("window", "eigh"):
        model = small_model()
        opt = cgd.FullCGD(model.parameters(), lr=0.005, betas=(0.9, 0.99), eps=1e-6, bias_correction=True,
                          m2_init=0.0, solver=solver, **({"window": 64} if solver == "window" else {}))
        ref = ReferenceFullCGD(flat(model).double(), block_indices(model, "full", 0), lr=0.005, beta1=0.9,
                               beta2=0.99, power=0.4, eps=1e-6, bias_correction=True, m2_init=0.0)
        q0, worst = flat(model).double(), 0.0
        for x, y in batches(40):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            expected = ref.step(flat_grad(model))
            opt.step()
            worst = max(worst, ((flat(model).double() - expected).norm() / (expected - q0).norm()).item())
        errors[solver] = worst
    assert errors["window"] <= max(errors["eigh"], 1e-4), errors


def test_window_solver_resumes_bit_identically_past_the_window(tmp_path):
    kw = dict(lr=0.02, solver="window", window=5)
    a = small_model()
    opt_a = cgd.FullCGD(a.parameters(), **kw)
    train(a, opt_a, 20)
    b = small_model()
    opt_b = cgd.FullCGD(b.parameters(), **kw)
    train(b, opt_b, 7)
    torch.save({"model": b.state_dict(), "opt": opt_b.state_dict()}, tmp_path / "ckpt.pt")
    c = small_model()
    opt_c = cgd.FullCGD(c.parameters(), **kw)
    saved = torch.load(tmp_path / "ckpt.pt")
    c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    train(c, opt_c, 13, start=7)
    for pa, pc in zip(a.parameters(), c.parameters()):
        assert torch.equal(pa, pc)


def test_window_solver_state_scales_with_the_window_not_n_squared():
    """100,000 parameters in one full metric (past the dense matrices' 46,340): the state is n (window + 1) values
    and the Gram matrix, as state_bytes says; results do not depend on the thread count."""
    gen = torch.Generator().manual_seed(4)
    grads = [torch.randn(100_000, generator=gen) for _ in range(6)]
    before, results = torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            p = torch.nn.Parameter(torch.zeros(100_000))
            opt = cgd.FullCGD([p], lr=0.01, solver="window", window=4)
            for g in grads:
                p.grad = g.clone()
                opt.step()
            results.append(p.detach().clone())
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])
    state = opt.state[p]
    held = sum(t.numel() * t.element_size() for t in state.values() if isinstance(t, torch.Tensor))
    assert held == cgd.full.state_bytes([(100_000,)], solver="window", window=4)
    assert tuple(state["history"].shape) == (4, 100_000)


@pytest.mark.parametrize("ratio", [1e3, 1e5])
def test_window_solver_keeps_a_short_gradient_s_own_direction(ratio):
    """Gradients of very different lengths are still independent: the rank is decided on unit columns, so the
    short one keeps its variance (on the raw Gram matrix its direction fell below the 1e-12 cut and stepped 7 to
    700 times too far). The long one's coordinate is h(c) F less a correction of nearly the same size (h(0) =
    eps^-1/2 = 1e4 here), so it holds to about 1e-16 times their ratio: 1e-7 at 1e5."""
    p = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    kw = dict(lr=1.0, power=0.5, eps=1e-8, m2_init=0.0, centered=False)
    opt = cgd.FullCGD([p], betas=(0.9, 0.5), solver="window", window=8, **kw)
    ref = ReferenceWindowCGD(torch.zeros(3, dtype=torch.float64), 8, beta1=0.9, beta2=0.5, **kw)
    for g in (torch.tensor([ratio, 0.0, 0.0]), torch.tensor([0.0, 1e-3, 0.0])):
        p.grad = g.double()
        opt.step()
        expected = ref.step(g.double())
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=0.0)
    assert abs(p.detach()[1] - expected[1]) <= 1e-12 * abs(expected[1])  # the short gradient's own coordinate


def test_window_solver_falls_back_to_the_diagonal_on_a_failed_solve_and_counts_it():
    """An Inf gradient under nonfinite="ignore" makes the small eigenproblems fail: that step takes C's diagonal
    (Inf coordinates aside, finite) and counts it; nothing is NaN where the gradient was finite."""
    p = torch.nn.Parameter(torch.zeros(6))
    opt = cgd.FullCGD([p], lr=0.01, solver="window", window=4, nonfinite="ignore")
    p.grad = torch.ones(6)
    opt.step()
    p.grad = torch.tensor([1.0, 2.0, float("inf"), 1.0, 1.0, 1.0])
    opt.step()
    assert opt.solver_stats()["diagonal_fallbacks"] == 1
    finite = [0, 1, 3, 4, 5]
    assert torch.isfinite(p.detach()[finite]).all()


def test_window_solver_refuses_a_state_of_another_window():
    model = small_model()
    opt = cgd.FullCGD(model.parameters(), solver="window", window=4)
    train(model, opt, 2)
    opt.param_groups[0]["window"] = 6
    with pytest.raises(ValueError, match=r"window history is \(4, 53\) but this group needs \(6, 53\)"):
        train(model, opt, 1, start=2)


def test_opcheck_window_step():
    model = small_model()
    opt = cgd.FullCGD(model.parameters(), solver="window", window=4)
    train(model, opt, 2)
    params = list(model.parameters())
    state = opt.state[params[0]]
    offsets, _, _ = cgd.full._layout([p.numel() for p in params], "full", 1)
    args = (params, [p.grad for p in params], offsets, *(state[k] for k in cgd.FullCGD._WINDOW_KEYS))
    hyper = dict(window=4, lr=0.01, beta1=0.9, beta2=0.99, power=0.4, eps=1e-8, weight_decay=0.0, centered=True,
                 bias_correction=False, maximize=False)
    torch.library.opcheck(torch.ops.cgd.window_step_.default, args, hyper)


def test_window_solver_errors_name_the_problem():
    model = small_model()
    with pytest.raises(ValueError, match="window = 0"):
        cgd.FullCGD(model.parameters(), solver="window", window=0)
    with pytest.raises(ValueError, match="window = 5000 is invalid: must be <= 1024"):
        cgd.FullCGD(model.parameters(), solver="window", window=5000)
    with pytest.raises(ValueError, match="solver = 'window' is invalid: applies to metric='full'"):
        cgd.FullCGD(model.parameters(), solver="window", metric="block")
    with pytest.raises(ValueError, match="refresh_every = 2 has nothing to cache"):
        cgd.FullCGD(model.parameters(), solver="window", refresh_every=2)
    opt = cgd.FullCGD(model.parameters(), solver="window", window=4)
    train(model, opt, 2)
    opt.param_groups[0]["solver"] = "eigh"
    with pytest.raises(ValueError, match="state is of the window solver"):
        train(model, opt, 1, start=2)
    other = cgd.FullCGD(model.parameters(), solver="eigh")
    train(model, other, 1)
    other.param_groups[0]["solver"] = "window"
    with pytest.raises(ValueError, match="another full-metric solver"):
        train(model, other, 1, start=1)


def test_errors_name_the_problem():
    model = small_model()
    with pytest.raises(ValueError, match="metric = 'diagonal'"):
        cgd.FullCGD(model.parameters(), metric="diagonal")
    with pytest.raises(ValueError, match="eps = 0"):
        cgd.FullCGD(model.parameters(), eps=0)
    with pytest.raises(ValueError, match="power = 1.5"):
        cgd.FullCGD(model.parameters(), power=1.5)
    with pytest.raises(ValueError, match="block_size = 0"):
        cgd.FullCGD(model.parameters(), metric="block", block_size=0)
    with pytest.raises(ValueError, match="needs .* GiB"):
        cgd.FullCGD(model.parameters(), max_state_bytes=1000)
    big = torch.nn.Parameter(torch.zeros(30_000))
    with pytest.raises(ValueError, match="metric='full' over 30,000 parameters needs 3.35 GiB"):
        cgd.FullCGD([big], max_state_bytes=2**30)  # Lanczos: M2 and M1
    with pytest.raises(ValueError, match="metric='full' over 30,000 parameters needs 6.71 GiB"):
        cgd.FullCGD([big], max_state_bytes=2**30, solver="eigh")  # and P
    with pytest.raises(ValueError, match="solver = 'qr'"):
        cgd.FullCGD(model.parameters(), solver="qr")
    with pytest.raises(ValueError, match="solver = 'lanczos' is invalid: applies to metric='full' or 'block'"):
        cgd.FullCGD(model.parameters(), metric="kron", solver="lanczos")
    with pytest.raises(ValueError, match="refresh_every = 4 has nothing to cache"):
        cgd.FullCGD(model.parameters(), solver="lanczos", refresh_every=4)
    # Past the eigensolvers' side, refused before any allocation whatever memory is allowed.
    with pytest.raises(ValueError, match="over 46,341 parameters needs one 46,341-sided matrix, but the eigensolvers "
                                         "take at most 46340"):
        cgd.FullCGD([torch.nn.Parameter(torch.zeros(46_341))], max_state_bytes=2**50)
    opt = cgd.FullCGD(model.parameters())
    model[0].weight.grad = torch.full_like(model[0].weight, float("nan"))
    for p in list(model.parameters())[1:]:
        p.grad = torch.zeros_like(p)
    before = copy.deepcopy(list(model.parameters()))
    with pytest.raises(cgd.NonFiniteGradientError, match=r"\['params'\]\[0\] \(shape \(5, 6\)\)"):
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    model[0].weight.grad = None
    with pytest.raises(RuntimeError, match="got no gradient"):
        opt.step()
