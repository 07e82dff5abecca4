"""torch.optim's optimizers as special cases of diagonal CGD (paper section 4, eqs 4.5-4.8).

Each preset takes the constructor arguments of its torch.optim namesake, so swapping ``torch.optim.Adam`` for
``cgd.Adam`` is a one-word change, and produces the same trajectory to float32 rounding (tested over hundreds
of steps). SGD, RMSprop, Adam and AdamW keep torch's argument names in their parameter groups, so a group may set
any of them (``{"params": ..., "momentum": 0.9}``) and a scheduler may change them, as with torch; each step
reads them through ``_cgd_group``. Arguments whose behaviour is not a CGD special case raise a ValueError saying
so, at construction and for a group that sets them, rather than being approximated. ``foreach`` and ``fused``
are accepted and ignored: every CGD step is one fused pass.

============  =====================================================================================
Preset        CGD settings
============  =====================================================================================
SGD           power=0 (G = 1), heavy-ball buffer M1 <- mu M1 + (1 - dampening) g, no bias correction
RMSprop       power=0.5, beta1=0 (tau1 = 0), beta2=alpha, eps outside, M2(0) = 0, no bias correction
Adam          power=0.5, betas, eps outside, bias correction, L2 weight decay
AdamW         Adam with decoupled weight decay
AdaBelief     power=0.5, moment="belief" (S <- beta2 S + (1-beta2)(g - M1)^2 + eps), decoupled decay
============  =====================================================================================
"""

from __future__ import annotations

from typing import Any

import torch

from ._validate import bad, in_range, pair
from .diagonal import CGD

_DEFAULT_BETAS = (0.9, 0.999)


def _reject_unsupported(name: str, foreach: Any, fused: Any, differentiable: bool) -> None:
    del foreach, fused  # one fused pass whatever they say
    if differentiable:
        raise bad(f"{name}(differentiable)", differentiable, "differentiating through the step is not supported")


def _check_tensor_hyperparameters(name: str, lr: Any, betas: Any, foreach: Any, capturable: bool) -> None:
    """torch.optim.Adam's rules for tensor hyperparameters, kept so that code written for it meets the same errors
    (the CGD kernels themselves take a tensor lr, read on the device, and tensor betas, read once per step)."""
    loop = bool(foreach) and not capturable
    if isinstance(lr, torch.Tensor) and loop:
        raise bad(f"{name}(lr)", lr, "lr as a Tensor is not supported for capturable=False and foreach=True")
    if isinstance(betas, (tuple, list)) and len(betas) == 2:
        if isinstance(betas[0], torch.Tensor) != isinstance(betas[1], torch.Tensor):
            raise bad(f"{name}(betas)", betas, "betas must be either both floats or both Tensors")
        if isinstance(betas[0], torch.Tensor) and loop:
            raise bad(f"{name}(betas)", betas,
                       "betas[0] as a Tensor is not supported for capturable=False and foreach=True")


class SGD(CGD):
    """``torch.optim.SGD`` (momentum, dampening, Nesterov, L2 weight decay) as CGD with power 0.

    The momentum buffer is torch's heavy-ball sum ``b <- mu b + (1 - dampening) g`` (first step: ``b = g``), so
    the state is torch's ``momentum_buffer``. The paper's EMA force ``M1 = (1 - mu) b`` is the same trajectory
    at learning rate ``lr / (1 - mu)``: ``cgd.CGD(power=0, betas=(mu, 0))``.
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False, foreach=None,
                 differentiable: bool = False, fused=None, capturable: bool = False,
                 nonfinite: str | None = None) -> None:
        _reject_unsupported("SGD", foreach, fused, differentiable)
        self._init_cgd(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                    nesterov=nesterov, maximize=maximize), nonfinite, capturable)

    def _cgd_group(self, group):
        momentum = in_range("momentum", group["momentum"], 0.0, 1.0, hi_open=False)
        dampening = in_range("dampening", group["dampening"], 0.0, 1.0, hi_open=False)
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise bad("SGD(nesterov)", group["nesterov"], "Nesterov momentum requires a momentum and zero dampening")
        return {**group, "betas": (momentum, 0.0), "power": 0.0, "eps": 0.0, "decoupled_weight_decay": False,
                "moment": "raw", "eps_inside": True, "bias_correction": False, "m2_init": 0.0, "heavy_ball": True}


class RMSprop(CGD):
    """``torch.optim.RMSprop`` without momentum and uncentered: CGD with tau1 = 0, power 0.5 (paper eq 4.6).

    torch applies RMSprop's momentum after dividing by the metric and centres with an average over ``alpha``;
    neither is a CGD special case, so ``momentum != 0`` and ``centered=True`` are refused. ``cgd.CGD(betas=(mu,
    alpha), power=0.5, moment="centered")`` is the CGD counterpart (momentum before the metric).
    """

    _EPS_AS_TORCH = True

    def __init__(self, params, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0, centered: bool = False,
                 capturable: bool = False, foreach=None, maximize: bool = False, differentiable: bool = False,
                 *, nonfinite: str | None = None) -> None:
        _reject_unsupported("RMSprop", foreach, None, differentiable)
        self._init_cgd(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                    centered=centered, maximize=maximize), nonfinite, capturable)

    def _cgd_group(self, group):
        if group["momentum"] != 0:
            raise bad("RMSprop(momentum)", group["momentum"], "torch's RMSprop momentum acts after the metric, "
                       "which is not a CGD special case; use cgd.CGD(betas=(momentum, alpha), power=0.5)")
        if group["centered"]:
            raise bad("RMSprop(centered)", group["centered"], "torch centres with an average over alpha, not "
                       "over tau1; use cgd.CGD(moment='centered') for the paper's variance metric")
        alpha = in_range("alpha", group["alpha"], 0.0, 1.0, hi_open=False)
        return {**group, "betas": (0.0, alpha), "power": 0.5, "decoupled_weight_decay": False, "moment": "raw",
                "eps_inside": False, "bias_correction": False, "m2_init": 0.0, "nesterov": False,
                "heavy_ball": False, "dampening": 0.0}


class Adam(CGD):
    """``torch.optim.Adam``: CGD with power 0.5, eps outside the root and bias correction (paper eq 4.7)."""

    _EPS_AS_TORCH = True

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = _DEFAULT_BETAS, eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, foreach=None, maximize: bool = False,
                 capturable: bool = False, differentiable: bool = False, fused=None,
                 decoupled_weight_decay: bool = False, nonfinite: str | None = None) -> None:
        _reject_unsupported(type(self).__name__, foreach, fused, differentiable)
        _check_tensor_hyperparameters(type(self).__name__, lr, betas, foreach, capturable)
        self._init_cgd(params, dict(lr=lr, betas=pair("betas", betas), eps=eps, weight_decay=weight_decay,
                                    amsgrad=amsgrad, maximize=maximize, decoupled_weight_decay=decoupled_weight_decay),
                       nonfinite, capturable)

    def _cgd_group(self, group):
        if group["amsgrad"]:
            raise bad(f"{type(self).__name__}(amsgrad)", group["amsgrad"],
                       "AMSGrad's running maximum is not a CGD special case")
        return {**group, "power": 0.5, "moment": "raw", "eps_inside": False, "bias_correction": True,
                "m2_init": 0.0, "nesterov": False, "heavy_ball": False, "dampening": 0.0}


class AdamW(Adam):
    """``torch.optim.AdamW``: Adam with decoupled weight decay (default 0.01)."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = _DEFAULT_BETAS, eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False, foreach=None,
                 capturable: bool = False, differentiable: bool = False, fused=None,
                 nonfinite: str | None = None) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         foreach=foreach, maximize=maximize, capturable=capturable, differentiable=differentiable,
                         fused=fused, decoupled_weight_decay=True, nonfinite=nonfinite)


class AdaBelief(CGD):
    """AdaBelief (Zhuang et al. 2020, Algorithm 2): the step divides by the spread of g around its EMA.

    ``S <- beta2 S + (1 - beta2)(g - M1)^2 + eps``, ``q <- q - lr M1_hat / (sqrt(S_hat) + eps)``, bias-corrected.
    Same arguments and defaults as the ``adabelief-pytorch`` package with ``rectify=False`` (RAdam's
    rectification is not a CGD special case) and ``weight_decouple=True``. The paper's own reading of AdaBelief
    (eq 4.8, the variance M2 - M1^2) is ``cgd.CGD(moment="centered", power=0.5)``.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = _DEFAULT_BETAS, eps: float = 1e-16,
                 weight_decay: float = 0.0, weight_decouple: bool = True, *, maximize: bool = False,
                 nonfinite: str | None = None) -> None:
        super().__init__(params, lr=lr, betas=betas, power=0.5, eps=eps, weight_decay=weight_decay,
                         decoupled_weight_decay=weight_decouple, moment="belief", eps_inside=False,
                         bias_correction=True, maximize=maximize, nonfinite=nonfinite)


class Ballistic(CGD):
    """The ballistic rule (the "learning rules from optimal control" paper, ``shared/papers/003_*``, Appendix B):
    ``s <- beta s + (1 - beta) g^2``, ``theta <- theta - lr g / sqrt(s + eps)``: an RMS-scaled step with no first
    moment, eps inside the root and no bias correction, from s = 0. CGD with betas (0, beta), power 0.5,
    eps inside, as the paper wrote it (so the first step is lr / sqrt(1 - beta) times the sign of g, in size)."""

    def __init__(self, params, lr: float = 1e-3, beta: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
                 *, maximize: bool = False, nonfinite: str | None = None) -> None:
        super().__init__(params, lr=lr, betas=(0.0, beta), power=0.5, eps=eps, weight_decay=weight_decay,
                         decoupled_weight_decay=True, eps_inside=True, bias_correction=False, m2_init=0.0,
                         maximize=maximize, nonfinite=nonfinite)
