"""The presets against PyTorch's own optimizer test inputs: every input torch's optimizer database
(torch.testing._internal.common_optimizers.optim_db, from the installed torch, not copied) gives Adam, AdamW, SGD
and RMSprop either steps our preset exactly as torch's class steps it, or is one of the refusals by design listed
here, which raises a ValueError naming the argument; and every error input of theirs raises torch's error type."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import batches, make_mlp, train_step

import cgd

common_optimizers = pytest.importorskip("torch.testing._internal.common_optimizers")

PRESETS = {"Adam": cgd.Adam, "AdamW": cgd.AdamW, "SGD": cgd.SGD, "RMSprop": cgd.RMSprop}

# The refusals by design, in one place: (preset, argument, value that is refused, what the message says).
REFUSED = [
    ("Adam", "amsgrad", True, r"Adam\(amsgrad\) = True is invalid"),
    ("AdamW", "amsgrad", True, r"AdamW\(amsgrad\) = True is invalid"),
    ("RMSprop", "centered", True, r"RMSprop\(centered\) = True is invalid"),
    ("RMSprop", "momentum", 0.1, r"RMSprop\(momentum\) = 0.1 is invalid"),
    ("SGD", "differentiable", True, r"SGD\(differentiable\) = True is invalid"),
    ("Adam", "differentiable", True, r"Adam\(differentiable\) = True is invalid"),
]


def _db(inputs_of):
    """(preset name, torch's OptimizerInfo, one of its inputs) for every input `inputs_of(info)` gives."""
    for info in common_optimizers.optim_db:
        if info.optim_cls.__name__ in PRESETS:
            for given in inputs_of(info)(device="cpu", dtype=torch.float32):
                yield info.optim_cls.__name__, info, given


def _inputs():
    return [pytest.param(name, info.optim_cls, given.kwargs, id=f"{name}: {given.desc}")
            for name, info, given in _db(lambda info: info.optim_inputs_func)]


def _refusal(name, kwargs):
    """The message an input must raise, or None: any of its refused arguments may be the one named."""
    matches = [match for preset, key, value, match in REFUSED
               if preset == name and key in kwargs and kwargs[key] not in (False, 0) and kwargs[key] == value]
    return "|".join(matches) or None


# float32 parameters match torch to float32 rounding; float64 ones (float64 state and arithmetic) to float64's.
TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-11, atol=1e-12)}


@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=["float32", "float64"])
@pytest.mark.parametrize("name,torch_cls,kwargs", _inputs())
def test_torch_optimizer_inputs(name, torch_cls, kwargs, dtype):
    match = _refusal(name, kwargs)
    model = make_mlp(dtype=dtype)
    if match:
        with pytest.raises(ValueError, match=match):
            PRESETS[name](model.parameters(), **kwargs)
        return
    twin = copy.deepcopy(model)
    ours = PRESETS[name](model.parameters(), **copy.deepcopy(kwargs))
    theirs = torch_cls(twin.parameters(), **copy.deepcopy(kwargs))
    for x, y in batches(20, dtype=dtype):
        train_step(model, ours, x, y)
        train_step(twin, theirs, x, y)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, **TOLERANCES[dtype])


@pytest.mark.parametrize("name,key,value,match", REFUSED, ids=[f"{r[0]}({r[1]})" for r in REFUSED])
def test_refusals_by_design(name, key, value, match):
    with pytest.raises(ValueError, match=match):
        PRESETS[name](make_mlp().parameters(), **{key: value})


def _error_inputs():
    return [pytest.param(name, error, id=f"{name}: {error.optimizer_error_input.desc}")
            for name, _, error in _db(lambda info: info.optim_error_inputs_func)]


@pytest.mark.parametrize("name,error", _error_inputs())
def test_torch_error_inputs(name, error):
    """Each of torch's error inputs raises (or warns) with torch's error type, checked before params as torch does;
    the message is torch's own where the base class raises it, else ours, naming the argument torch names."""
    given = error.optimizer_error_input
    if issubclass(error.error_type, Warning):
        with pytest.warns(error.error_type, match=error.error_regex):
            PRESETS[name](given.params, **given.kwargs)
        return
    with pytest.raises(error.error_type) as raised:
        opt = PRESETS[name](given.params, **given.kwargs)
        if error.error_on == common_optimizers.OptimizerErrorEnum.STEP_ERROR:
            opt.step()
    message = str(raised.value)
    assert re.search(error.error_regex, message) or any(key in message for key in given.kwargs), message
