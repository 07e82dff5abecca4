"""Loads the compiled operator library and registers the fake (meta) kernels torch.compile traces with.

The library is built by CMake together with ``build_info.txt``, which records the torch and CUDA versions it was
compiled against: ``pip install`` puts both in ``cgd/_lib``; a CMake build from a clone (``./run.sh build``) leaves
them in its build folder, which the environment variable ``CGD_LIBRARY_DIR`` then names (``./run.sh`` sets it).
It is built on LibTorch's stable ABI, so it loads in the torch it was built with and every later release; an older
torch is reported here, before the library is loaded, instead of as an undefined-symbol error from the loader.
"""

from __future__ import annotations

import os
import sys

import torch


def _lib_dir() -> str:
    """CGD_LIBRARY_DIR when set, else cgd/_lib in the first of the package's directories that has one: beside these
    sources (an installed wheel), or where an editable install put the compiled files (its package spans the
    source folder and the installed one)."""
    if os.environ.get("CGD_LIBRARY_DIR"):
        return os.environ["CGD_LIBRARY_DIR"]
    package = sys.modules[__package__]
    for folder in getattr(package, "__path__", [os.path.dirname(os.path.abspath(__file__))]):
        candidate = os.path.join(folder, "_lib")
        if os.path.exists(os.path.join(candidate, "build_info.txt")):
            return candidate
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "_lib")


_LIB_DIR = _lib_dir()
_REBUILD = ("reinstall it against this torch with `pip install --no-build-isolation .` from a clone (or "
            "`./run.sh build` there and set CGD_LIBRARY_DIR to its build folder; README, Install)")


def _read_build_info() -> dict[str, str]:
    path = os.path.join(_LIB_DIR, "build_info.txt")
    if not os.path.exists(path):
        raise ImportError(f"torch-cgd's compiled library is missing ({_LIB_DIR} has no build_info.txt): {_REBUILD}")
    with open(path, encoding="utf-8") as f:
        return dict(line.strip().split("=", 1) for line in f if "=" in line)


def _release(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def _load() -> dict[str, str]:
    info = _read_build_info()
    oldest = info.get("torch_min", info.get("torch", "?"))
    if info.get("abi") != "stable":
        compatible = info.get("torch") == torch.__version__  # a library from before the stable ABI
    else:
        compatible = _release(torch.__version__) >= _release(oldest)
    if not compatible:
        raise ImportError(
            f"torch-cgd was built against torch {info.get('torch')} (CUDA {info.get('cuda') or 'none'}) and loads "
            f"in torch >= {oldest}, but this Python has torch {torch.__version__}: {_REBUILD}"
        )
    torch.ops.load_library(os.path.join(_LIB_DIR, "libcgd_torch.so"))
    return info


BUILD_INFO = _load()


@torch.library.register_fake("cgd::diag_step_")
def _diag_step_fake(params, grads, exp_avgs, exp_avg_sqs, steps, **hyperparameters) -> None:
    # The dispatcher also routes here when a real list mixes in a meta tensor: refuse that as the real kernel
    # refuses mixed devices, rather than returning as if the step had run.
    for name, tensors in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs), ("steps", steps)):
        for i, (t, p) in enumerate(zip(tensors, params)):
            if t.device != p.device:
                raise ValueError(f"cgd: {name}[{i}] is on {t.device} but params[{i}] is on {p.device}")
    _scalars_beside(params, hyperparameters)
    return None


def _scalars_beside(params, hyperparameters) -> None:
    """A meta grad_scale, found_inf, lr_tensor or guard_flags beside real parameters routes the call here too:
    refuse it."""
    if params:
        for key in ("grad_scale", "found_inf", "lr_tensor", "guard_flags"):
            t = hyperparameters.get(key)
            if t is not None and t.device != params[0].device:
                raise ValueError(f"cgd: {key} is on {t.device} but the parameters are on {params[0].device}")


def _vector_step_fake(names, params, grads, state, hyperparameters) -> None:
    for i, (g, p) in enumerate(zip(grads, params)):
        if g.device != p.device:
            raise ValueError(f"cgd: grads[{i}] is on {g.device} but params[{i}] is on {p.device}")
    for name, t in zip(names, state):
        if params and t.device != params[0].device:
            raise ValueError(f"cgd: {name} is on {t.device} but the parameters are on {params[0].device}")
    _scalars_beside(params, hyperparameters)


@torch.library.register_fake("cgd::block_step_")
def _block_step_fake(params, grads, offsets, exp_avg, *state, **hyperparameters) -> None:
    _vector_step_fake(("exp_avg", "exp_avg_sq", "precond", "eigvals", "step", "outcome", "counters"), params, grads,
                      (exp_avg,) + state, hyperparameters)


@torch.library.register_fake("cgd::window_step_")
def _window_step_fake(params, grads, offsets, exp_avg, *state, **hyperparameters) -> None:
    _vector_step_fake(("exp_avg", "history", "gram", "identity", "step", "counters"), params, grads,
                      (exp_avg,) + state, hyperparameters)
    return None


@torch.library.register_fake("cgd::muon_step_")
def _muon_step_fake(params, grads, momentum_buffers, failures, **hyperparameters) -> None:
    for name, tensors in (("grads", grads), ("momentum_buffers", momentum_buffers), ("failures", failures)):
        for i, (t, p) in enumerate(zip(tensors, params)):
            if t.device != p.device:
                raise ValueError(f"cgd: {name}[{i}] is on {t.device} but params[{i}] is on {p.device}")
    _scalars_beside(params, hyperparameters)
    return None


@torch.library.register_fake("cgd::eigenbasis_step_")
@torch.library.register_fake("cgd::kron_step_")
def _kron_step_fake(params, grads, *state_lists, **hyperparameters) -> None:
    for i, (g, p) in enumerate(zip(grads, params)):
        if g.device != p.device:
            raise ValueError(f"cgd: grads[{i}] is on {g.device} but params[{i}] is on {p.device}")
    for tensors in state_lists:
        for i, (t, p) in enumerate(zip(tensors, params)):
            if t.device != p.device:
                raise ValueError(f"cgd: a state tensor of params[{i}] is on {t.device} but the parameter is on "
                                 f"{p.device}")
    _scalars_beside(params, hyperparameters)
    return None


def _same_device(op: str, lists: dict) -> None:
    """A real list that mixes in a meta tensor is routed to the fake kernel by the dispatcher: refuse it, as the
    real kernel refuses mixed devices, rather than returning as if the op had run."""
    tensors = [(name, i, t) for name, ts in lists.items() for i, t in enumerate(ts if isinstance(ts, (list, tuple))
                                                                               else [ts]) if t is not None]
    if tensors:
        first = tensors[0]
        for name, i, t in tensors[1:]:
            if t.device != first[2].device:
                raise ValueError(f"cgd::{op}: {name}[{i}] is on {t.device} but {first[0]}[{first[1]}] is on "
                                 f"{first[2].device}")


@torch.library.register_fake("cgd::nonfinite_flags")
def _nonfinite_flags_fake(tensors, limits=()):
    _same_device("nonfinite_flags", {"tensors": tensors})
    first = tensors[0]
    return first.new_empty((len(tensors),), dtype=torch.int32), first.new_empty((), dtype=torch.float32)


@torch.library.register_fake("cgd::induced_norm_")
def _induced_norm_fake(grads, exp_avg_sqs, steps, sum, **hyperparameters) -> None:
    _same_device("induced_norm_", {"grads": grads, "exp_avg_sqs": exp_avg_sqs, "steps": steps, "sum": sum})


@torch.library.register_fake("cgd::induced_rate_")
def _induced_rate_fake(sum, norm_ema, norm_step, rate, **hyperparameters) -> None:
    _same_device("induced_rate_", {"sum": sum, "norm_ema": norm_ema, "norm_step": norm_step, "rate": rate,
                                   "loss": hyperparameters.get("loss")})


@torch.library.register_fake("cgd::induced_step_")
def _induced_step_fake(params, grads, exp_avgs, exp_avg_sqs, steps, rate, **hyperparameters) -> None:
    _same_device("induced_step_", {"params": params, "grads": grads, "exp_avgs": exp_avgs,
                                   "exp_avg_sqs": exp_avg_sqs, "steps": steps, "rate": rate})
