"""The PyTorch contract beyond the maths: operator registration (opcheck), AMP's GradScaler, memory layouts,
many and empty tensors, parameters without gradients, named parameters."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import batches, make_mlp, train_step

import cgd


def diag_args(device, dtype=torch.float32, sizes=(5, 0, 130)):
    return (
        [torch.randn(n, device=device, dtype=dtype) for n in sizes],
        [torch.randn(n, device=device, dtype=dtype) for n in sizes],
        [torch.zeros(n, device=device) for n in sizes],
        [torch.rand(n, device=device) for n in sizes],
        [torch.zeros((), dtype=torch.float64, device=device) for _ in sizes],
    )


HYPER = dict(lr=1e-2, beta1=0.9, beta2=0.99, grad_weight=0.1, power=0.4, eps=1e-8, weight_decay=0.01,
             moment="centered", eps_inside=True, bias_correction=False, decoupled_weight_decay=True, nesterov=False,
             maximize=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck_diag_step(device, dtype):
    torch.library.opcheck(torch.ops.cgd.diag_step_.default, diag_args(device, dtype), HYPER)


def test_opcheck_nonfinite_flags(device):
    tensors = [torch.randn(7, device=device), torch.tensor([1.0, math.nan], device=device)]
    torch.library.opcheck(torch.ops.cgd.nonfinite_flags.default, (tensors,))
    flags, found = torch.ops.cgd.nonfinite_flags(tensors)
    assert flags.tolist() == [0, 1] and found.item() == 1.0


@pytest.mark.parametrize("make", [
    lambda p: cgd.CGD(p, lr=1e-2, nonfinite="ignore"),
    lambda p: cgd.FullCGD(p, lr=1e-2, metric="kron", refresh_every=2, nonfinite="ignore"),
    lambda p: cgd.FullCGD(p, lr=1e-2, metric="block", block_size=8, nonfinite="ignore"),
    lambda p: cgd.InducedMetric(p, lr=1e-2, gamma="rms", xi=0.01, nonfinite="ignore"),
], ids=["CGD", "kron", "block", "induced"])
def test_step_compiles_with_torch_compile(make):
    """Dynamo traces each optimizer's step through the fake kernels; the compiled step equals the eager one."""
    model = make_mlp()
    twin = copy.deepcopy(model)
    opt, ref = make(model.parameters()), make(twin.parameters())
    compiled_step = torch.compile(opt.step, backend="aot_eager")
    for x, y in batches(4):
        for m, o, stepper in ((model, opt, compiled_step), (twin, ref, ref.step)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            stepper()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_compiled_model_trains_like_eager():
    """torch.compile(model) with a cgd optimizer: the same parameters as the eager model."""
    model = make_mlp()
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend="aot_eager")
    opts = [cgd.CGD(model.parameters(), lr=1e-2), cgd.CGD(twin.parameters(), lr=1e-2)]
    for x, y in batches(5):
        for net, o in ((compiled, opts[0]), (twin, opts[1])):
            o.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            o.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grad_scaler_unscales_in_kernel_and_skips_overflow(device):
    """GradScaler hands the scale and found_inf to the optimizer: the step sees unscaled gradients and an
    overflowing step changes nothing, exactly as GradScaler + torch.optim.Adam."""
    model = make_mlp(device=device)
    twin = copy.deepcopy(model)
    opt, ref = cgd.Adam(model.parameters(), lr=3e-3), torch.optim.Adam(twin.parameters(), lr=3e-3)
    scalers = [torch.amp.GradScaler(device, init_scale=2.0**12, growth_interval=5) for _ in range(2)]
    for i, (x, y) in enumerate(batches(40, device=device)):
        for m, o, s in ((model, opt, scalers[0]), (twin, ref, scalers[1])):
            o.zero_grad()
            s.scale(torch.nn.functional.mse_loss(m(x), y)).backward()
            if i == 17:  # an overflow: both must skip this step and shrink the scale
                next(m.parameters()).grad.view(-1)[0] = math.inf
            s.step(o)
            s.update()
    assert scalers[0].get_scale() == scalers[1].get_scale() < 2.0**12 * 2**8
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


def test_channels_last_conv_weights(device):
    conv = torch.nn.Conv2d(3, 8, 3).to(device=device, memory_format=torch.channels_last)
    twin = copy.deepcopy(conv)
    opt, ref = cgd.Adam(conv.parameters(), lr=1e-2), torch.optim.Adam(twin.parameters(), lr=1e-2)
    x = torch.randn(4, 3, 10, 10, device=device).to(memory_format=torch.channels_last)
    for _ in range(20):
        for m, o in ((conv, opt), (twin, ref)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert opt.state[conv.weight]["exp_avg"].stride() == conv.weight.stride()
    torch.testing.assert_close(conv.weight, twin.weight, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gamma", ["identity", "rms"])
def test_induced_metric_steps_channels_last_and_transposed_parameters(device, gamma):
    """The induced metric keeps a gradient in its parameter's layout (it once made it row-major, which the op
    then refused as a layout mismatch): a channels_last conv steps like its contiguous twin."""
    conv = torch.nn.Conv2d(3, 8, 3).to(device=device, memory_format=torch.channels_last)
    twin = copy.deepcopy(conv).to(memory_format=torch.contiguous_format)
    assert conv.weight.stride() != twin.weight.stride()
    extra = torch.nn.Parameter(torch.randn(5, 4, device=device).t())  # a transposed parameter
    extra_twin = torch.nn.Parameter(extra.detach().contiguous())
    opt = cgd.InducedMetric([*conv.parameters(), extra], lr=1e-2, gamma=gamma)
    ref = cgd.InducedMetric([*twin.parameters(), extra_twin], lr=1e-2, gamma=gamma)
    x = torch.randn(4, 3, 10, 10, device=device)
    for _ in range(5):
        for m, e, o, xx in ((conv, extra, opt, x.to(memory_format=torch.channels_last)), (twin, extra_twin, ref, x)):
            o.zero_grad()
            (m(xx).square().mean() + e.square().sum()).backward()
            o.step()
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(conv.weight, twin.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(extra, extra_twin, rtol=1e-5, atol=1e-6)


def test_gradient_with_another_layout_is_accepted():
    p = torch.nn.Parameter(torch.randn(4, 5))
    twin = torch.nn.Parameter(p.detach().clone())
    opt, ref = cgd.Adam([p], lr=0.1), torch.optim.Adam([twin], lr=0.1)
    g = torch.randn(5, 4).t()  # transposed: not p's strides
    p.grad, twin.grad = g, g.contiguous()
    opt.step()
    ref.step()
    torch.testing.assert_close(p, twin)


def test_many_tensors_and_empty_ones(device):
    params = [torch.nn.Parameter(torch.randn(n % 37, device=device)) for n in range(500)]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt, ref = cgd.AdamW(params, lr=1e-2), torch.optim.AdamW(twins, lr=1e-2)
    for step in range(3):
        for ps, o in ((params, opt), (twins, ref)):
            torch.manual_seed(step)
            for p in ps:
                p.grad = torch.randn_like(p)
            o.step()
    for a, b in zip(params, twins):
        torch.testing.assert_close(a, b)
    assert opt.state[params[0]]["step"].item() == 3  # an empty tensor still counts its steps, like torch


def test_parameters_without_gradients_are_left_alone(device):
    model = make_mlp(device=device)
    frozen = model[0].weight.detach().clone()
    model[0].weight.requires_grad_(False)
    opt = cgd.CGD(model.parameters(), lr=1e-2)
    for x, y in batches(3, device=device):
        train_step(model, opt, x, y)
    assert torch.equal(model[0].weight, frozen)
    assert model[0].weight not in opt.state


def test_zero_grad_and_set_to_none():
    model = make_mlp()
    opt = cgd.CGD(model.parameters())
    x, y = next(batches(1))
    train_step(model, opt, x, y)
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_state_dict_keeps_param_names():
    model = make_mlp()
    opt = cgd.CGD(model.named_parameters())
    x, y = next(batches(1))
    train_step(model, opt, x, y)
    assert opt.state_dict()["param_groups"][0]["param_names"][0] == "0.weight"


def test_tau_is_the_papers_timescale():
    opt = cgd.CGD(make_mlp().parameters(), tau=(9.0, 999.0))
    assert opt.param_groups[0]["betas"] == pytest.approx((0.9, 0.999))
    assert cgd.beta_to_tau(cgd.tau_to_beta(12.9)) == pytest.approx(12.9)


class _NoHostSync:
    """Makes every tensor-to-host read raise while active: a capturable step must not make any."""

    NAMES = ("item", "tolist", "__float__", "__int__", "__bool__")

    def __enter__(self):
        self.saved = {name: getattr(torch.Tensor, name) for name in self.NAMES}

        def refuse(*args, **kwargs):
            raise AssertionError("a capturable step read a tensor on the host")

        for name in self.NAMES:
            setattr(torch.Tensor, name, refuse)

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)


@pytest.mark.parametrize("make", [
    lambda p: cgd.Adam(p, lr=1e-3, capturable=True),
    lambda p: cgd.CGD(p, lr=1e-3, power=0.4, moment="centered", capturable=True),
    lambda p: cgd.InducedMetric(p, lr=1e-3, gamma="rms", capturable=True),
], ids=["Adam", "CGD", "InducedMetric"])
def test_capturable_step_reads_nothing_on_the_host(make):
    model = make_mlp()
    opt = make(model.parameters())
    for i, (x, y) in enumerate(batches(3)):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if i == 0:
            opt.step()  # state allocation may look at the device; later steps must not
            continue
        with _NoHostSync():
            opt.step()


def _warm_cosine(opt):
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 3) * (0.5 + 0.5 * math.cos(t / 4)))


@pytest.mark.parametrize("make", [
    lambda p, **kw: cgd.Adam(p, lr=3e-3, **kw),
    lambda p, **kw: cgd.CGD(p, lr=3e-3, power=0.4, weight_decay=0.1, **kw),
    lambda p, **kw: cgd.InducedMetric(p, lr=3e-3, gamma="rms", weight_decay=0.1, **kw),
], ids=["Adam", "CGD", "InducedMetric"])
def test_capturable_lr_is_a_device_tensor_that_follows_the_scheduler(device, make):
    """capturable=True keeps lr as a float32 tensor on the parameters' device, which the kernel reads: a
    scheduler's in-place update reaches the step without a host read, and the run equals the eager one with a
    Python-float lr (to float32 rounding: the scheduler multiplies a float32 tensor there, a double here)."""
    model, twin = make_mlp(device=device), make_mlp(device=device)
    opt, ref = make(model.parameters(), capturable=True), make(twin.parameters())
    lr = opt.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and lr.dtype == torch.float32 and lr.device.type == device
    sched, ref_sched = _warm_cosine(opt), _warm_cosine(ref)
    for x, y in batches(12, device=device):
        for m, o, s in ((model, opt, sched), (twin, ref, ref_sched)):
            train_step(m, o, x, y)
            s.step()
        assert opt.param_groups[0]["lr"] is lr  # updated in place: a captured graph keeps reading it
        assert math.isclose(lr.item(), ref.param_groups[0]["lr"], rel_tol=1e-6)
    assert lr.item() < 0.5 * 3e-3  # the schedule did move it
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_skipped_steps_accumulate_in_one_device_tensor():
    """The skip counter is allocated once and added to in place, so the replays of a captured step keep
    counting (a new tensor per step would only record the capture's own)."""
    model = make_mlp()
    opt = cgd.CGD(model.parameters(), lr=1e-3, capturable=True)
    counter = None
    for i, (x, y) in enumerate(batches(5)):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        if i % 2:
            next(model.parameters()).grad[0, 0] = float("nan")
        opt.step()
        counter = opt._skipped if counter is None else counter
        assert opt._skipped is counter
    assert opt.skipped_steps == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a GPU")
@pytest.mark.parametrize("make", [
    lambda p: cgd.Adam(p, lr=1e-3, capturable=True),
    lambda p: cgd.CGD(p, lr=1e-3, power=0.4, moment="centered", weight_decay=0.05, capturable=True),
    lambda p: cgd.InducedMetric(p, lr=1e-3, gamma="rms", capturable=True),
], ids=["Adam", "CGD", "InducedMetric"])
def test_cuda_graph_replay_equals_eager(make):
    """One captured step replayed with a scheduler changing lr between replays equals the same optimizer run
    eagerly (the kernel reads lr and the step counts on the device)."""
    model, twin = make_mlp(device="cuda"), make_mlp(device="cuda")
    twin.load_state_dict(model.state_dict())
    opt, ref = make(model.parameters()), make(twin.parameters())
    sched, ref_sched = _warm_cosine(opt), _warm_cosine(ref)
    data = list(batches(8, device="cuda"))
    static = [torch.zeros_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), static):
        p.grad = g
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (state allocation) outside the capture, with zero gradients
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for p in twin.parameters():  # the same zero-gradient warm-up step for the eager twin
        p.grad = torch.zeros_like(p)
    ref.step()
    for x, y in data:
        twin.zero_grad(set_to_none=False)
        torch.nn.functional.mse_loss(twin(x), y).backward()
        for g, p in zip(static, twin.parameters()):
            g.copy_(p.grad)
        graph.replay()
        ref.step()
        sched.step()
        ref_sched.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("make", [
    lambda p: cgd.FullCGD(p, lr=1e-3, metric="kron"),
    lambda p: cgd.FullCGD(p, lr=1e-3, metric="block", block_size=8),
    lambda p: cgd.InducedMetric(p, lr=1e-3, gamma="rms"),
], ids=["FullCGD kron", "FullCGD block", "InducedMetric"])
def test_grad_scaler_overflow_is_skipped_not_raised(make):
    """With the default nonfinite='raise', a GradScaler step whose gradients overflowed is skipped on the device
    and the scaler lowers its scale, as with torch.optim (it raised NonFiniteGradientError and killed AMP runs)."""
    model = make_mlp()
    opt = make(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for i, (x, y) in enumerate(batches(4)):
        opt.zero_grad()
        scaler.scale(torch.nn.functional.mse_loss(model(x), y)).backward()
        if i == 2:
            next(model.parameters()).grad.view(-1)[0] = math.inf
            before = [p.detach().clone() for p in model.parameters()]
        scaler.step(opt)
        scaler.update()
        if i == 2:
            assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
            assert scaler.get_scale() < 2.0**10
    # Outside GradScaler the policy still holds.
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    next(model.parameters()).grad.view(-1)[0] = math.nan
    with pytest.raises(cgd.NonFiniteGradientError):
        opt.step()


def test_reused_step_lists_follow_gradient_sets_groups_loads_and_layouts():
    """The step reuses its argument lists between steps (optimizer._Plan) and rebuilds them whenever what they
    came from changes: a parameter without a gradient on some steps, an added group, a loaded state dict, a
    gradient in another memory layout. Parameters and state equal torch.optim.Adam's throughout."""
    torch.manual_seed(0)
    ours = [torch.randn(4, 3, requires_grad=True), torch.randn(5, requires_grad=True), torch.randn(2, 2, requires_grad=True)]
    theirs = [t.detach().clone().requires_grad_() for t in ours]
    opt, ref = cgd.Adam(ours[:2], lr=1e-2), torch.optim.Adam(theirs[:2], lr=1e-2)
    for step in range(8):
        if step == 3:
            opt.add_param_group({"params": [ours[2]]})
            ref.add_param_group({"params": [theirs[2]]})
        if step == 5:
            opt.load_state_dict(copy.deepcopy(opt.state_dict()))
        for i, (p, q) in enumerate(zip(ours, theirs)):
            g = torch.randn(p.shape[::-1]).t() if step == 6 and p.dim() == 2 else torch.randn(p.shape)
            p.grad, q.grad = (None, None) if step % 3 == 1 and i == 1 else (g, g.clone())
        opt.step()
        ref.step()
        for p, q in zip(ours, theirs):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
    for p, q in zip(ours, theirs):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], ref.state[q][key], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("sizes,with_grad", [((7,), (True,)), ((7, 3, 5), (True, True, True)),
                                             ((7, 3, 5), (True, False, True)), ((7, 3), (False, True))])
def test_a_steady_loop_gathers_once(monkeypatch, sizes, with_grad):
    """Between unchanged steps only the gradients are fetched: the full gather runs on the first step alone."""
    params = [torch.randn(n, requires_grad=True) for n in sizes]
    opt = cgd.CGD(params, lr=1e-2)
    calls = []
    gather = cgd.CGD._gather
    monkeypatch.setattr(cgd.CGD, "_gather", lambda self, *a: calls.append(1) or gather(self, *a))
    for _ in range(4):
        for p, has in zip(params, with_grad):
            p.grad = torch.randn_like(p) if has else None
        opt.step()
    assert len(calls) == 1


@pytest.mark.parametrize("kw", [dict(), dict(power=0.4), dict(eps_inside=False, power=0.5), dict(betas=(0.0, 0.99))],
                         ids=["sqrt", "pow", "eps outside", "no M1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_the_cpu_kernels_plain_and_general_copies_agree_bit_for_bit(kw, dtype):
    """maximize=True on -g takes the same values as maximize=False on g, through the kernel's general copy and its
    plain one (raw moment, no maximize/Nesterov/L2: the options Adam and the default use)."""
    torch.manual_seed(3)
    start = torch.randn(40003, dtype=dtype)  # two of the kernel's chunks, the second with a vector tail
    plain_p, general_p = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    plain = cgd.CGD([plain_p], lr=1e-2, weight_decay=0.1, **kw)
    general = cgd.CGD([general_p], lr=1e-2, weight_decay=0.1, maximize=True, **kw)
    for _ in range(3):
        g = torch.randn(40003, dtype=dtype)
        plain_p.grad, general_p.grad = g.clone(), -g
        plain.step()
        general.step()
    assert torch.equal(plain_p, general_p)
    for key, value in plain.state[plain_p].items():
        assert torch.equal(value, general.state[general_p][key]), key


@pytest.mark.parametrize("make", [lambda p: cgd.CGD(p, lr=1e-2, weight_decay=0.1),
                                  lambda p: cgd.CGD(p, lr=1e-2, weight_decay=0.1, power=0.4, moment="centered"),
                                  lambda p: cgd.InducedMetric(p, lr=1e-2, gamma="rms", weight_decay=0.1)],
                         ids=["default", "power centered", "induced rms"])
def test_cpu_results_do_not_depend_on_the_thread_count(make):
    """The CPU kernels deal a call's chunks round torch's threads; every entry is computed alike whichever thread
    takes it (and the induced norm's chunk sums are added in one order), so 1, 2 and 3 threads give the same bits
    (and a NaN entry is held back alike)."""
    torch.manual_seed(5)
    start = [torch.randn(300_001), torch.randn(7, 9)]
    grads = [[torch.randn_like(t) for t in start] for _ in range(3)]
    grads[1][0][123_456] = math.nan
    before = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            params = [torch.nn.Parameter(t.clone()) for t in start]
            opt = make(params)
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = g.clone()
                try:
                    opt.step()
                except cgd.NonFiniteGradientError:
                    pass
            results.append([p.detach().clone() for p in params] +
                           [t.clone() for p in params for t in opt.state[p].values()])
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@pytest.mark.parametrize("make", [
    lambda p: cgd.CGD(p, lr=1e-3, moment="centered"),
    lambda p: cgd.FullCGD(p, lr=1e-3, bias_correction=True, m2_init=0.0),
    lambda p: cgd.FullCGD(p, lr=1e-3, metric="kron", bias_correction=True, m2_init=0.0),
], ids=["CGD", "FullCGD full", "FullCGD kron"])
def test_centered_first_step_with_adams_start_is_adam_sized(make):
    """With bias correction the first step's variance is exactly 0 (S = g^2 = F^2), which once made the step
    lr eps^-a g, 10^3..10^4 times Adam's. The first step takes the second moment instead: |step| ~ lr |g|^(1 - 2a)
    per coordinate, about lr for gradients of order 1."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.zeros(4, 6))
    opt = make([p])
    p.grad = torch.randn(4, 6)
    opt.step()
    assert p.detach().abs().max().item() < 10 * 1e-3
