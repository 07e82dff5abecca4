"""Checkpoints: a resumed run is bit-identical to an uninterrupted one; torch.optim state imports."""

from __future__ import annotations

import copy
import io

import pytest
import torch
from conftest import batches, make_mlp, train_step

import cgd

CONFIGS = {
    "default": lambda p: cgd.CGD(p, lr=1e-3, power=0.4),
    "paper_centered": lambda p: cgd.CGD(p, lr=0.01, tau=(10.9, 9.46), power=0.39, moment="centered",
                                        bias_correction=False, m2_init=1.0),
    "belief": lambda p: cgd.AdaBelief(p, lr=1e-3, weight_decay=0.01),
    "sgd_dampening": lambda p: cgd.SGD(p, lr=0.01, momentum=0.9, dampening=0.2),
}


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_resume_is_bit_identical(device, config, dtype):
    make = CONFIGS[config]
    data = list(batches(60, device=device, dtype=dtype))

    straight = make_mlp(device=device, dtype=dtype)
    opt = make(straight.parameters())
    for x, y in data:
        train_step(straight, opt, x, y)

    first = make_mlp(device=device, dtype=dtype)
    opt1 = make(first.parameters())
    for x, y in data[:25]:
        train_step(first, opt1, x, y)
    model_sd, opt_sd = roundtrip(first.state_dict()), roundtrip(opt1.state_dict())
    del first, opt1

    resumed = make_mlp(seed=123, device=device, dtype=dtype)  # different weights until the load
    resumed.load_state_dict(model_sd)
    opt2 = make(resumed.parameters())
    opt2.load_state_dict(opt_sd)
    for x, y in data[25:]:
        train_step(resumed, opt2, x, y)

    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
            want = torch.float64 if key == "step" else torch.float32  # step counters: float64, exact to 2^53
            assert b[key].device == a[key].device and b[key].dtype == want


def test_loaded_state_stays_float32_for_half_parameters():
    """torch's loader would cast state to the parameter dtype; CGD keeps its float32 state."""
    model = make_mlp(dtype=torch.bfloat16)
    opt = cgd.CGD(model.parameters(), lr=1e-3)
    for x, y in batches(3, dtype=torch.bfloat16):
        train_step(model, opt, x, y)
    sd = roundtrip(opt.state_dict())
    opt2 = cgd.CGD(model.parameters(), lr=1e-3)
    opt2.load_state_dict(sd)
    for state, saved in zip(opt2.state.values(), sd["state"].values()):
        assert state["exp_avg_sq"].dtype == torch.float32
        assert torch.equal(state["exp_avg_sq"], saved["exp_avg_sq"])
        assert state["exp_avg"].data_ptr() != saved["exp_avg"].data_ptr()  # a copy, not an alias


@pytest.mark.parametrize(
    "torch_cls,cgd_cls,kwargs",
    [
        (torch.optim.Adam, cgd.Adam, dict(lr=3e-3)),
        (torch.optim.AdamW, cgd.AdamW, dict(lr=3e-3, weight_decay=0.1)),
        (torch.optim.SGD, cgd.SGD, dict(lr=0.02, momentum=0.9)),
        (torch.optim.RMSprop, cgd.RMSprop, dict(lr=1e-3)),
    ],
    ids=["Adam", "AdamW", "SGD", "RMSprop"],
)
def test_torch_optimizer_state_imports(device, torch_cls, cgd_cls, kwargs):
    """Train with torch.optim, switch to the CGD preset mid-run from its state_dict: the run continues as if
    torch.optim had kept going (exp_avg/momentum_buffer -> M1, exp_avg_sq/square_avg -> M2, step kept)."""
    data = list(batches(80, device=device))
    model = make_mlp(device=device)
    opt = torch_cls(model.parameters(), **kwargs)
    for x, y in data[:40]:
        train_step(model, opt, x, y)
    twin = copy.deepcopy(model)
    ours = cgd_cls(twin.parameters(), **kwargs)
    ours.load_state_dict(roundtrip(opt.state_dict()))
    for x, y in data[40:]:
        train_step(model, opt, x, y)
        train_step(twin, ours, x, y)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    if torch_cls is not torch.optim.SGD:
        assert all(s["step"].item() == 80 for s in ours.state.values())


def test_foreign_import_keeps_our_hyperparameters():
    model = make_mlp()
    adam = torch.optim.Adam(model.parameters(), lr=0.5)
    for x, y in batches(2):
        train_step(model, adam, x, y)
    opt = cgd.CGD(model.parameters(), lr=1e-3, power=0.4)
    opt.load_state_dict(adam.state_dict())
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["power"] == 0.4
    assert "amsgrad" not in opt.param_groups[0]


def test_amsgrad_state_is_refused_with_its_name():
    model = make_mlp()
    adam = torch.optim.Adam(model.parameters(), amsgrad=True)
    for x, y in batches(2):
        train_step(model, adam, x, y)
    with pytest.raises(ValueError, match="max_exp_avg_sq"):
        cgd.Adam(model.parameters()).load_state_dict(adam.state_dict())


@pytest.mark.parametrize("make", [
    lambda p: cgd.CGD(p, lr=1e-3),
    lambda p: cgd.FullCGD(p, lr=1e-3, metric="block", block_size=8),
    lambda p: cgd.FullCGD(p, lr=1e-3, metric="kron"),
    lambda p: cgd.InducedMetric(p, lr=1e-3, gamma="rms"),
], ids=["CGD", "FullCGD block", "FullCGD kron", "InducedMetric"])
def test_step_counters_are_float64_and_old_float32_checkpoints_load(make):
    """Step counters are float64 (a float32 one stops at 2^24 = 16,777,216 steps), and a checkpoint that saved
    them as float32 loads into float64 and keeps counting."""
    model = make_mlp()
    opt = make(model.parameters())
    data = list(batches(3))
    train_step(model, opt, *data[0])
    sd = roundtrip(opt.state_dict())
    counters = ("step", "metric_norm_step")
    for state in sd["state"].values():
        for key in counters:
            if key in state:
                assert state[key].dtype == torch.float64
                state[key] = torch.tensor(2.0**24, dtype=torch.float32)  # an old checkpoint, far into a run
    resumed = make(model.parameters())
    resumed.load_state_dict(sd)
    train_step(model, resumed, *data[1])
    seen = 0
    for state in resumed.state.values():
        for key in counters:
            if key in state:
                assert state[key].dtype == torch.float64
                assert state[key].item() == 2.0**24 + 1, key
                seen += 1
    assert seen >= 1


@pytest.mark.parametrize("make", [
    lambda p: cgd.Adam(p, lr=1e-3),
    lambda p: cgd.SGD(p, lr=1e-2, momentum=0.9),
    lambda p: cgd.CGD(p, lr=1e-3, power=0.4),
], ids=["Adam", "SGD", "CGD"])
@pytest.mark.parametrize("how", ["load_state_dict", "deepcopy", "pickle"])
def test_state_dict_is_the_one_saved_after_loading_copying_or_pickling(make, how):
    """Loading, deep-copying or unpickling an optimizer gives back exactly the param groups it had (torch's own
    __setstate__ adds `differentiable` to the defaults; that key once leaked into every group)."""
    import pickle

    model = make_mlp()
    opt = make(model.parameters())
    train_step(model, opt, *next(iter(batches(1))))
    saved = opt.state_dict()
    if how == "load_state_dict":
        other = make(model.parameters())
        other.load_state_dict(roundtrip(saved))
    elif how == "deepcopy":
        other = copy.deepcopy(opt)
    else:
        other = pickle.loads(pickle.dumps(opt))
    assert other.state_dict()["param_groups"] == saved["param_groups"]


OPTIMIZERS = {
    "Adam": lambda p: cgd.Adam(p, lr=1e-3),
    "CGD skip": lambda p: cgd.CGD(p, lr=1e-3, nonfinite="skip"),
    "FullCGD kron": lambda p: cgd.FullCGD(p, lr=1e-3, metric="kron", nonfinite="ignore"),
    "InducedMetric": lambda p: cgd.InducedMetric(p, lr=1e-3, gamma="rms", xi=0.05),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_load_state_dict_hooks_see_the_state(name):
    """Loading goes through torch's own load_state_dict, so a user's pre-hook sees the saved state and a
    post-hook the loaded one (state was once installed after the base class had run on an empty one)."""
    model = make_mlp()
    opt = OPTIMIZERS[name](model.parameters())
    train_step(model, opt, *next(iter(batches(1))))
    saved = roundtrip(opt.state_dict())
    other = OPTIMIZERS[name](model.parameters())
    seen = {}
    other.register_load_state_dict_pre_hook(lambda o, sd: seen.update(pre=len(sd["state"])))
    other.register_load_state_dict_post_hook(
        lambda o: seen.update(post=sum(len(s) for s in o.state.values()), dtypes={
            v.dtype for s in o.state.values() for v in s.values() if isinstance(v, torch.Tensor)}))
    other.load_state_dict(saved)
    assert seen["pre"] == len(saved["state"]) > 0
    assert seen["post"] == sum(len(s) for s in opt.state.values())
    assert seen["dtypes"] <= {torch.float32, torch.float64, torch.int32}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_keep_the_optimizers_own_settings_and_continue_identically(name, how):
    """copy.deepcopy and pickling keep what torch's __getstate__ leaves out (the non-finite policy, FullCGD's
    and InducedMetric's own settings), and the copy steps exactly as the original."""
    import pickle

    model = make_mlp()
    opt = OPTIMIZERS[name](model.parameters())
    data = list(batches(4))
    train_step(model, opt, *data[0])
    # Copied together, the copy's parameters are the copied model's.
    twin, other = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    assert other.nonfinite == opt.nonfinite
    for x, y in data[1:]:
        train_step(model, opt, x, y)
        train_step(twin, other, x, y)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def _snapshot(opt):
    return copy.deepcopy(opt.state_dict())


def _same(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for pid in a["state"]:
        for key, value in a["state"][pid].items():
            other = b["state"][pid][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("key,value,match", [
    ("step", -1.0, r"'step' = -1.0 .* is negative"),
    ("step", float("nan"), r"'step' = nan .* holds NaN or Inf"),
])
def test_impossible_loaded_values_are_refused_and_change_nothing(name, key, value, match):
    model = make_mlp()
    opt = OPTIMIZERS[name](model.parameters())
    train_step(model, opt, *next(iter(batches(1))))
    bad = roundtrip(opt.state_dict())
    first = next(iter(bad["state"]))
    bad["state"][first][key] = torch.tensor(value, dtype=torch.float64)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    _same(before, _snapshot(opt))


def test_a_negative_second_moment_is_refused():
    model = make_mlp()
    opt = cgd.Adam(model.parameters())
    train_step(model, opt, *next(iter(batches(1))))
    bad = roundtrip(opt.state_dict())
    bad["state"][0]["exp_avg_sq"][0, 0] = -1.0
    with pytest.raises(ValueError, match=r"'exp_avg_sq' of parameter id 0 has negative entries"):
        opt.load_state_dict(bad)


@pytest.mark.parametrize("name", ["FullCGD kron", "InducedMetric"])
@pytest.mark.parametrize("foreign", ["torch Adam", "cgd.CGD"])
def test_another_optimizers_state_dict_is_refused_at_load_time(name, foreign):
    """FullCGD and InducedMetric refuse a state dict of another optimizer when it is loaded, naming what it
    lacks, and stay as they were (it was accepted, replaced the groups, and the next step failed with KeyError)."""
    model = make_mlp()
    other = (torch.optim.Adam if foreign == "torch Adam" else cgd.CGD)(model.parameters())
    train_step(model, other, *next(iter(batches(1))))
    opt = OPTIMIZERS[name](model.parameters())
    train_step(model, opt, *next(iter(batches(1))))
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=r"param_groups\[0\] lacks .*: it is not a .* state dict; nothing was"):
        opt.load_state_dict(other.state_dict())
    _same(before, _snapshot(opt))
    train_step(model, opt, *next(iter(batches(1))))
