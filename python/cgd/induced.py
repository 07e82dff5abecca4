"""``cgd.InducedMetric``: optimizers with the metric the loss surface induces on the parameters.

The induced-metric paper (``shared/papers/004_*``, eqs 7-14, Algorithms 1 and 2) embeds the loss surface
L = f(loss(theta)) in one more dimension; pulled back, the metric is ``g = gamma + xi grad f grad f^T`` and
Sherman-Morrison turns ``g^-1 grad`` into ``r * gamma^-1 grad`` with one scalar r for all parameters. The maths runs
in the C core (``torch.ops.cgd.induced_norm_``, ``induced_rate_``, ``induced_step_``); this module owns the
PyTorch contract: groups, state, the loss hand-off, the state dict, the non-finite policy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from . import _ops  # noqa: F401  (loads the operator library)
from ._distributed import local, mean_over_shards, sum_over_shards
from ._base import (BaseOptimizer, lr_operands, mark_updated, on_device, overflow_limit, smallest_eps,
                    state_dtype)
from ._validate import bad, check_lr, choice, in_range, number

GAMMAS = ("identity", "rms")
EMBEDDINGS = ("loss", "log")
_GLOBAL = ("xi", "beta", "embedding")


class InducedMetric(BaseOptimizer):
    r"""Gradient descent with the induced (pull-back) metric ``g = gamma + xi grad grad^T``.

    Per step, over all parameters of all groups (one sum per optimizer)::

        s  = xi * sum_i g_i (gamma^-1 g)_i
        v <- beta v + (1 - beta) s,   v_hat = v / (1 - beta^t)
        r  = 1 / (1 + |v_hat|)                 (embedding="loss", Algorithm 1)
        r  = L / (L^2 + |v_hat|)               (embedding="log", Algorithm 2; L the loss, > 0)
        m <- momentum m + (1 - momentum) g
        p <- p (1 - lr weight_decay) - lr r gamma^-1 m / (1 - momentum^t)

    ``gamma="identity"`` is the paper's SGD metric (``SGD_METRIC``, ``SGD_LOG_METRIC``); ``gamma="rms"`` takes
    gamma^-1 = 1 / (sqrt(M2 / (1 - beta_rms^t)) + eps) from RMSProp's M2 (``SGD_RMS``), and with ``xi=0`` it is
    exactly ``torch.optim.AdamW(betas=(momentum, beta_rms))``.

    Args:
        params: parameters or groups; all on one device (the norm is one number). Per group: ``lr``,
            ``momentum``, ``gamma``, ``beta_rms``, ``eps``, ``weight_decay``, ``maximize``.
        xi, beta, embedding: the metric's coefficient, the EMA of the norm and the embedding f; one per
            optimizer, since they define the one metric (a group may not set them).
        nonfinite: "raise" (default: one read of the gradients before the step and one host synchronisation, then
            an error naming the parameters, nothing changed), "skip" (the same read, decided on the device: the step
            is skipped whole, counted in :attr:`skipped_steps`) or "ignore" (nothing checked).
        capturable: a step without host synchronisation, for CUDA-graph capture: needs ``nonfinite="skip"`` or
            ``"ignore"`` ("skip" is the default then) and the "loss" embedding; keeps each group's ``lr`` as a
            float32 tensor on the parameters' device, read by the kernel, so an LR scheduler reaches a replayed
            graph (as cgd.CGD).

    The loss (needed with ``embedding="log"``) comes from the closure's return value or ``step(loss=...)``.
    Under FSDP2 the norm and the loss are averaged over the ranks by cgd; under DDP pass the loss averaged over
    the ranks yourself (``dist.all_reduce(loss, op=AVG)``), since each rank only sees its own batch's loss.

    The norm EMA v and its step count are state of the first parameter of the first group
    (``metric_norm_ema``, ``metric_norm_step``), so ``state_dict()`` and distributed checkpoints carry them.
    Defaults are the paper's (Appendix A): momentum 0.9, xi 0.1, beta 0.8, beta_rms 0.99, eps 1e-8; its
    suggestion for xi is about 1 / (number of parameters).
    """

    _step_supports_amp_scaling = True
    _NON_NEGATIVE_KEYS = ("exp_avg_sq",)
    _FLOAT64_KEYS = ("metric_norm_ema",)
    _STATE_LIKE_PARAM = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, momentum: float = 0.9, *, xi: float = 0.1,
                 beta: float = 0.8, embedding: str = "loss", gamma: str = "identity", beta_rms: float = 0.99,
                 eps: float = 1e-8, weight_decay: float = 0.0, maximize: bool = False,
                 nonfinite: str | None = None, capturable: bool = False) -> None:
        in_range("xi", xi, 0.0)
        in_range("beta", beta, 0.0, 1.0)
        choice("embedding", embedding, EMBEDDINGS)
        if capturable and embedding == "log":
            raise bad("capturable", capturable, "embedding='log' reads the loss on the host to refuse a "
                       "non-positive one, which CUDA-graph capture forbids")
        self.xi, self.beta, self.embedding = float(xi), float(beta), embedding
        defaults = dict(lr=lr, momentum=momentum, gamma=gamma, beta_rms=beta_rms, eps=eps,
                        weight_decay=weight_decay, maximize=maximize)
        self._scratch: dict[str, torch.Tensor] = {}
        self._init_base(params, defaults, nonfinite, capturable)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key in _GLOBAL:
            if key in param_group:
                raise bad(key, param_group[key], "is one per optimizer (it defines the one induced metric); pass "
                          "it to InducedMetric(...), not to a parameter group")
        super().add_param_group(param_group)

    def _check_group(self, gi: int, group: dict[str, Any]) -> None:
        self._validate(group)
        super()._check_group(gi, group)
        first = self._first_param()
        for j, p in enumerate(group["params"]):
            if p.device != first.device:
                raise ValueError(f"cgd: parameter {self._label(gi, j)} is on {p.device} but the first parameter is "
                                 f"on {first.device}; the induced metric sums one norm over all parameters, so they "
                                 "must share a device")

    @staticmethod
    def _validate(group: dict[str, Any], read_lr: bool = True) -> None:
        check_lr(group["lr"], read_lr)
        in_range("momentum", group["momentum"], 0.0, 1.0)
        in_range("beta_rms", group["beta_rms"], 0.0, 1.0)
        in_range("weight_decay", group["weight_decay"], 0.0)
        choice("gamma", group["gamma"], GAMMAS)
        eps = in_range("eps", group["eps"], 0.0)
        tiny = smallest_eps(group.get("params", ()))
        if group["gamma"] == "rms" and eps < tiny:
            raise bad("eps", group["eps"], f"must be at least {tiny:.3g} with gamma='rms', the smallest value the "
                       "state's precision holds (it divides where M2 is 0)")

    def _loss_tensor(self, loss: Any, device: torch.device) -> torch.Tensor | None:
        if self.embedding != "log":
            return None
        if loss is None:
            raise ValueError("cgd: embedding='log' needs the loss: return it from the closure, or call "
                             "step(loss=loss)")
        value = number("loss", loss.detach() if isinstance(loss, torch.Tensor) else loss)
        if not value > 0.0 or value == float("inf"):
            raise bad("loss", value, "embedding='log' needs a positive, finite loss (it steps on log(loss))")
        # Under FSDP2 each rank computed the loss of its own batch; the metric needs the global (mean) one.
        return mean_over_shards(torch.tensor(value, dtype=torch.float64, device=device), self.param_groups[0]["params"])

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:
        """One step. ``closure`` re-evaluates the model and returns the loss; ``loss`` passes it directly (the
        log embedding needs one of the two)."""
        returned = self._begin(closure)
        return self._step(loss if closure is None else returned)

    def _step(self, loss: Any) -> Any:
        work = []  # (group index, group, [(index, param, grad)]) batched by dtype below
        for gi, group in enumerate(self.param_groups):
            self._validate(group, read_lr=False)
            items = []
            for j, p, g in self._gradients(gi, group):
                g = local(g)
                # The kernels walk param, grad and state in one memory order: the parameter's (channels_last too).
                if g.stride() != local(p).stride():
                    g = torch.empty_like(local(p)).copy_(g)
                items.append((j, p, g))
            if items:
                work.append((gi, group, items))
        if not work:
            return loss
        device = work[0][2][0][1].device
        loss_t = self._loss_tensor(loss, device)
        batches = [(gi, group, [item for item in items if item[1].dtype == dtype])  # one kernel call per dtype
                   for gi, group, items in work for dtype in sorted({p.dtype for _, p, _ in items}, key=str)]
        skip = on_device(self._skip_flag(lambda: [
            ([(gi, j) for j, _, _ in items], [g for _, _, g in items], [overflow_limit(p) for _, p, _ in items],
             [p for _, p, _ in items]) for gi, _, items in batches]), device)
        scale = on_device(getattr(self, "grad_scale", None), device)
        metric = self._metric_state(device)
        sharded = [p for _, _, items in batches for _, p, _ in items]
        # The kernels see local shards (FSDP2) and their state likewise; the state itself stays like p.
        batches = [(group, [(local(p), g, {k: local(v) for k, v in self._state(group, p).items()})
                            for _, p, g in items]) for _, group, items in batches]
        metric["sum"].zero_()
        for group, chosen in batches:
            rms = group["gamma"] == "rms"
            torch.ops.cgd.induced_norm_(
                [g for _, g, _ in chosen], [st["exp_avg_sq"] for _, _, st in chosen] if rms else [],
                [st["step"] for _, _, st in chosen], metric["sum"], gamma=group["gamma"],
                beta_rms=float(group["beta_rms"]), eps=float(group["eps"]), grad_scale=scale, found_inf=skip)
        sum_over_shards(metric["sum"], sharded)  # the one collective of a step under FSDP2
        torch.ops.cgd.induced_rate_(metric["sum"], metric["norm_ema"], metric["norm_step"], metric["rate"],
                                    xi=self.xi, beta=self.beta, embedding=self.embedding, loss=loss_t,
                                    found_inf=skip)
        for group, chosen in batches:
            rms = group["gamma"] == "rms"
            lr, lr_tensor = lr_operands(group["lr"], device)
            torch.ops.cgd.induced_step_(
                [p for p, _, _ in chosen], [g for _, g, _ in chosen], [st["exp_avg"] for _, _, st in chosen],
                [st["exp_avg_sq"] for _, _, st in chosen] if rms else [], [st["step"] for _, _, st in chosen],
                metric["rate"], lr=lr, momentum=float(group["momentum"]),
                beta_rms=float(group["beta_rms"]), eps=float(group["eps"]),
                weight_decay=float(group["weight_decay"]), gamma=group["gamma"], maximize=bool(group["maximize"]),
                grad_scale=scale, found_inf=skip, lr_tensor=lr_tensor)
        mark_updated(sharded)
        return loss

    def _state(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, torch.Tensor]:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.zeros((), dtype=torch.float64, device=p.device)
            state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
        if group["gamma"] == "rms" and "exp_avg_sq" not in state:
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype(p), memory_format=torch.preserve_format)
        return state

    def _required_state(self, group: dict[str, Any], j: int, saved: dict[str, Any]) -> tuple[str, ...]:
        own = ("step", "exp_avg") + (("exp_avg_sq",) if group["gamma"] == "rms" else ())
        # The optimizer-wide norm lives beside the first parameter's own state (it may have no own state yet).
        norm = ("metric_norm_ema", "metric_norm_step")
        wide = norm if any(k in saved for k in norm) else ()
        return (own if set(saved) - set(norm) else ()) + wide

    def _first_param(self) -> torch.Tensor | None:
        """The first parameter of the first group that has one: where the optimizer-wide state lives."""
        return next((p for group in self.param_groups for p in group["params"]), None)

    def _metric_state(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The optimizer-wide norm EMA v and its step count, kept in the state of the first parameter (so
        state_dict() and torch.distributed.checkpoint save them like any state), plus scratch tensors for the sum
        and the rate: all float64, whatever the parameters (cgd.h)."""
        anchor = self.state[self._first_param()]
        for key in ("metric_norm_ema", "metric_norm_step"):
            if key not in anchor:
                anchor[key] = torch.zeros((), dtype=torch.float64, device=device)
        if not self._scratch:  # filled in place: torch.compile traces a dict update, not a new attribute
            # Shape (1,), not (): torch.compile (aot_eager, torch 2.11) drops the sum's zero_() when a 0-dim
            # float64 CPU tensor is then mutated by the op, adding every step's norm to the last.
            self._scratch.update({k: torch.zeros((1,), dtype=torch.float64, device=device) for k in ("sum", "rate")})
        return {"norm_ema": anchor["metric_norm_ema"], "norm_step": anchor["metric_norm_step"], **self._scratch}
