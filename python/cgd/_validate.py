"""Named validators for hyperparameters: each raises a ValueError naming the argument and its value, and returns
the value as the kernels take it. Every optimizer of the package checks its arguments through these."""

from __future__ import annotations

import math
from typing import Any

import torch


def bad(name: str, value: Any, why: str) -> ValueError:
    return ValueError(f"cgd: {name} = {value!r} is invalid: {why}")


def number(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise bad(name, value, "a tensor hyperparameter must hold one element")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad(name, value, "must be a real number")
    return float(value)


def in_range(name: str, value: Any, lo: float, hi: float = math.inf, hi_open: bool = True) -> float:
    v = number(name, value)
    inside = lo <= v < hi if hi_open else lo <= v <= hi
    if not inside:
        raise bad(name, value, f"must lie in [{lo}, {hi}{')' if hi_open else ']'}")
    return v


def choice(name: str, value: Any, options: tuple[str, ...]) -> str:
    if value not in options:
        raise bad(name, value, f"must be one of {options}")
    return value


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad(name, value, "must be a positive integer")
    return value


def pair(name: str, value: Any) -> tuple[Any, Any]:
    """A two-element hyperparameter (betas, tau) as a tuple, or a ValueError naming it."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise bad(name, value, "must be a pair of two numbers")
    return tuple(value)


def tau_to_beta(tau: float) -> float:
    """The paper's averaging timescale tau >= 0 (eq 3.5) as an EMA coefficient: beta = tau / (1 + tau)
    (tau = inf: beta = 1, an average that never forgets)."""
    tau = in_range("tau", tau, 0.0, math.inf, hi_open=False)
    return 1.0 if tau == math.inf else tau / (1.0 + tau)


def beta_to_tau(beta: float) -> float:
    """The inverse of :func:`tau_to_beta`: tau = beta / (1 - beta) for beta in [0, 1] (beta = 1: tau = inf)."""
    beta = in_range("beta", beta, 0.0, 1.0, hi_open=False)
    return math.inf if beta == 1.0 else beta / (1.0 - beta)


def betas_from_tau(tau: Any) -> tuple[float, float]:
    """The paper's timescales (tau1, tau2), checked, as EMA coefficients."""
    if not isinstance(tau, (tuple, list)) or len(tau) != 2:
        raise bad("tau", tau, "must be a pair (tau1, tau2)")
    return tuple(tau_to_beta(in_range(f"tau[{i}]", t, 0.0)) for i, t in enumerate(tau))


def check_lr(lr: Any, read_tensor: bool = True) -> None:
    """lr must be >= 0. A tensor lr must hold one floating element; its value is checked only with
    ``read_tensor`` (when it is set), since reading it on every step would synchronise with its device."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise bad("lr", lr, "a tensor lr must hold one floating-point element")
        if not read_tensor:
            return
    in_range("lr", lr, 0.0)


def validate_step_size(group: dict[str, Any], read_lr: bool = True, diagonal: bool = False) -> None:
    """Checks lr, betas and power, which every CGD optimizer shares."""
    check_lr(group["lr"], read_lr)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise bad("betas", betas, "must be a pair (beta1, beta2)")
    # beta = 1 (an average that never forgets: torch's SGD momentum=1, RMSprop alpha=1) is for the diagonal step
    # without bias correction, which would divide by 1 - 1^t = 0; for M1 it needs the heavy-ball sum, whose
    # gradient weight is not 1 - beta.
    closed = diagonal and not group["bias_correction"]
    in_range("betas[0]", betas[0], 0.0, 1.0, hi_open=not (closed and group.get("heavy_ball", False)))
    in_range("betas[1]", betas[1], 0.0, 1.0, hi_open=not closed)
    in_range("power", group["power"], 0.0, 1.0, hi_open=False)
