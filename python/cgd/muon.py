"""``cgd.Muon``: Muon as a covariant step, in the C core (``torch.ops.cgd.muon_step_``).

Muon's update ``(F F^T)^(-1/2) F`` is CGD with the force F (the momentum EMA) and the metric ``(F F^T)^(1/2)``
built from the force's own outer product: F's orthogonalisation, approximated by Newton-Schulz iterations. This
module owns the PyTorch contract (groups, state, the non-finite policy); the maths is in ``kernels/muon_cpu.c``
and ``kernels/muon_cuda.cu``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch

from . import _ops  # noqa: F401  (loads the operator library)
from ._base import BaseOptimizer, mark_updated, on_device, overflow_limit, state_dtype
from ._distributed import full, is_dtensor, local, step_shard
from ._validate import bad, check_lr, choice, in_range, number, tau_to_beta

ADJUST_LR_FNS = (None, "original", "match_rms_adamw")
NS_PRECISIONS = ("bfloat16", "float32")
SOLVERS = ("newton_schulz", "eigh")
# torch.optim.Muon's quintic Newton-Schulz coefficients (torch 2.11, after Keller Jordan's Muon).
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The rows x cols matrix Muon orthogonalises: a 2-D weight as it is, a conv kernel as out_channels x the rest
    (as FullCGD's kron metric reads it; torch.optim.Muon refuses conv kernels)."""
    return shape[0], math.prod(shape[1:])


class Muon(BaseOptimizer):
    r"""Muon (torch.optim.Muon of torch 2.11, same defaults and results) with its maths in the C core.

    Per matrix parameter (a conv kernel read as out_channels x the rest), with mu = momentum::

        B <- B + (1 - mu) (G - B)                 momentum EMA: CGD's force
        F  = G + mu (B - G)  (nesterov)  or  B
        X  = F / max(||F||, eps), then ns_steps of  A = X X^T,  X <- a X + (b A + c A^2) X
        p <- p (1 - lr weight_decay) - lr s X,    s = sqrt(max(1, rows / cols)) ("original", default) or
                                                  0.2 sqrt(max(rows, cols)) ("match_rms_adamw")

    Muon is meant for the hidden matrices of a network; give embeddings, the output head, norms and biases to
    AdamW (or ``cgd.AdamW``) in another optimizer. A 1-D parameter is refused with its name.

    Args:
        params, lr, weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn: as
            ``torch.optim.Muon``.
        ns_precision: "bfloat16" (default): the iteration rounds every product, the normalisation and X to
            bfloat16 as torch.optim.Muon computes it, so the two agree to bfloat16 rounding; "float32": all in
            the state's precision (float64 for float64 parameters).
        power, solver: CGD's knob on Muon. The direction is ``(eps I + X X^T)^(-power) X`` for the normalised
            force X: ``power=0.5`` with ``solver="newton_schulz"`` (default) is Muon; ``solver="eigh"`` computes it
            exactly through the eigendecomposition of the smaller Gram matrix X X^T, at any power in [0, 1] (0.5:
            the exact orthogonalisation U V^T that Newton-Schulz approximates; 0: the normalised momentum). A
            failed eigendecomposition (float32, then float64) keeps X, counted in :meth:`solver_stats`.
        tau: the force's timescale in steps, CGD's way of giving the momentum: ``momentum = tau / (1 + tau)``
            (tau = 19 is the default 0.95); pass either this or ``momentum``.
        nonfinite: "raise" (default), "skip" or "ignore", as for ``cgd.FullCGD``.

    The momentum buffer (``momentum_buffer``, torch's name and shape) is float32 for bf16/fp16 parameters and
    float64 for float64 ones. Under DDP nothing is special; under FSDP2 every rank gathers each matrix's gradient,
    computes the same update and keeps the whole momentum buffer (the orthogonalisation couples a whole matrix),
    then steps its own shard. On CUDA the iteration runs as cuBLAS GEMMs (bfloat16 with float32 accumulation
    by default, as torch.optim.Muon's), matrix after matrix, with no host synchronisation; solver="eigh" there
    has no float64 retry (a failed float32 eigendecomposition keeps X, counted).
    """

    _step_supports_amp_scaling = True
    _FLOAT32_KEYS = ("failures",)

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
                 eps: float = 1e-7, ns_steps: int = 5, adjust_lr_fn: str | None = None, *,
                 ns_precision: str = "bfloat16", power: float = 0.5, solver: str = "newton_schulz",
                 tau: float | None = None, nonfinite: str | None = None) -> None:
        if tau is not None:
            if momentum != 0.95:
                raise bad("tau", tau, f"pass either tau or momentum (got momentum = {momentum!r} too)")
            momentum = tau_to_beta(tau)
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=ns_coefficients, eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                        ns_precision=ns_precision, power=power, solver=solver)
        self._init_base(params, defaults, nonfinite, capturable=False)

    def _check_group(self, gi: int, group: dict[str, Any]) -> None:
        self._validate(group)
        super()._check_group(gi, group)
        for j, p in enumerate(group["params"]):
            if p.dim() < 2:
                raise ValueError(f"cgd: parameter {self._label(gi, j)} has shape {tuple(p.shape)}; Muon steps "
                                 "matrices (2-D weights, conv kernels): give 1-D parameters (biases, norms) to "
                                 "AdamW or cgd.AdamW in another optimizer")

    @staticmethod
    def _validate(group: dict[str, Any]) -> None:
        check_lr(group["lr"], True)
        in_range("momentum", group["momentum"], 0.0, 1.0)
        in_range("weight_decay", group["weight_decay"], 0.0)
        coefficients = group["ns_coefficients"]
        if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3:
            raise bad("ns_coefficients", coefficients, "must be three numbers (a, b, c)")
        for value in coefficients:
            if not math.isfinite(number("ns_coefficients", value)):
                raise bad("ns_coefficients", coefficients, "must be finite")
        eps = number("eps", group["eps"])
        if not (eps > 0.0 and math.isfinite(eps)):
            raise bad("eps", group["eps"], "must be finite and > 0")
        steps = group["ns_steps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps < 100:
            raise bad("ns_steps", steps, "must be an integer in [0, 100)")
        if group["adjust_lr_fn"] not in ADJUST_LR_FNS:
            raise bad("adjust_lr_fn", group["adjust_lr_fn"], f"must be one of {ADJUST_LR_FNS}")
        choice("ns_precision", group["ns_precision"], NS_PRECISIONS)
        power = in_range("power", group["power"], 0.0, 1.0, hi_open=False)
        if choice("solver", group["solver"], SOLVERS) == "newton_schulz" and power != 0.5:
            raise bad("power", group["power"], "needs solver='eigh': Newton-Schulz iterates to the power 1/2 only")

    def _step(self, loss: Any) -> Any:
        work = []
        for gi, group in enumerate(self.param_groups):
            self._validate(group)
            # FSDP2: the orthogonalisation needs whole matrices, so every rank gathers each gradient and computes
            # the same update (and keeps the same whole momentum buffer), then steps its own shard.
            items = [(j, p, full(g)) for j, p, g in self._gradients(gi, group)]
            if items:
                work.append((gi, group, items))
        skip = self._skip_flag(lambda: [([(gi, j) for j, _, _ in items], [g for _, _, g in items],
                                         [overflow_limit(p) for _, p, _ in items], [p for _, p, _ in items])
                                        for gi, _, items in work])
        scale = getattr(self, "grad_scale", None)
        for _, group, items in work:
            for dtype in sorted({p.dtype for _, p, _ in items}, key=str):  # one kernel call per dtype
                chosen = [(p, g) for _, p, g in items if p.dtype == dtype]
                device = local(chosen[0][0]).device
                # The kernel reads a row-major matrix: a parameter in another layout steps through a dense copy, and
                # a DTensor through a zero stand-in of its whole shape that receives -lr s X (zero times the decay
                # stays zero), added to the shard below.
                targets = [torch.zeros(p.shape, dtype=p.dtype, device=device) if is_dtensor(p)
                           else p if p.is_contiguous() else p.contiguous() for p, _ in chosen]
                a, b, c = (float(x) for x in group["ns_coefficients"])
                eigen = group["solver"] == "eigh"
                torch.ops.cgd.muon_step_(
                    targets, [g.contiguous() for _, g in chosen], [self._buffer(p) for p, _ in chosen],
                    [self._failures(p) for p, _ in chosen] if eigen else [],
                    lr=number("lr", group["lr"]), momentum=float(group["momentum"]),
                    weight_decay=float(group["weight_decay"]), ns_a=a, ns_b=b, ns_c=c, eps=float(group["eps"]),
                    ns_steps=int(group["ns_steps"]), nesterov=bool(group["nesterov"]),
                    adjust_lr_fn=group["adjust_lr_fn"] or "original",
                    ns_bf16=group["ns_precision"] == "bfloat16", solver=group["solver"],
                    power=float(group["power"]),
                    grad_scale=on_device(scale, device), found_inf=on_device(skip, device))
                decay = 1.0 - number("lr", group["lr"]) * float(group["weight_decay"])
                for (p, _), target in zip(chosen, targets):
                    if is_dtensor(p):
                        step_shard(p, target, decay, skip)
                    elif target is not p:
                        p.copy_(target)
        mark_updated(p for _, _, items in work for _, p, _ in items)
        return loss

    def _buffer(self, p: torch.Tensor) -> torch.Tensor:
        """p's momentum buffer (torch's name and shape), as the rows x cols matrix the kernel reads."""
        state = self.state[p]
        if "momentum_buffer" not in state:  # whole, also for a DTensor: every rank keeps the same buffer
            state["momentum_buffer"] = torch.zeros(p.shape, dtype=state_dtype(p), device=local(p).device)
        return state["momentum_buffer"].view(_matrix_shape(tuple(p.shape)))

    def _failures(self, p: torch.Tensor) -> torch.Tensor:
        state = self.state[p]
        if "failures" not in state:
            state["failures"] = torch.zeros(1, dtype=torch.float32, device=local(p).device)
        return state["failures"]

    def solver_stats(self) -> dict[str, int]:
        """Cumulative failed eigendecompositions of solver="eigh" (each kept its step's X)."""
        return {"eigh_failures": int(sum(float(s["failures"].sum()) for s in self.state.values() if "failures" in s))}

    def _required_state(self, group: dict[str, Any], j: int, saved: dict[str, Any]) -> tuple[str, ...]:
        return ("momentum_buffer",)
