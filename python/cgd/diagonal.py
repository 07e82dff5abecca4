"""``cgd.CGD``: diagonal Covariant Gradient Descent as a ``torch.optim.Optimizer``.

The maths runs in the C core (``torch.ops.cgd.diag_step_``); this module owns the PyTorch contract: parameter
groups, lazily created state, ``state_dict`` round trips, the closure, AMP's GradScaler hand-off, the non-finite
gradient policy, and argument checking with messages that name the argument and its value.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _ops  # noqa: F401  (loads the operator library)
from ._base import (SUPPORTED_DTYPES, TORCH_ADDED_DEFAULTS, UNUSABLE, BaseOptimizer, NonFiniteGradientError,
                    lr_operands, mark_updated, on_device, overflow_limit, smallest_eps, state_dtype)
from ._distributed import local, sum_over_shards
from ._validate import bad, betas_from_tau, in_range, pair, validate_step_size

MOMENTS = ("raw", "centered", "belief")
# Complex parameters are stepped as torch.optim does, on their real view (real and imaginary parts as two elements);
# their state is complex too, so checkpoints interchange with torch's.
COMPLEX_DTYPES = (torch.complex64, torch.complex128)


def _real(t: torch.Tensor) -> torch.Tensor:
    """What the kernels see of a tensor: a complex one's real view (..., 2), else the tensor itself."""
    return torch.view_as_real(t) if t.is_complex() else t

_DEFAULT_BETAS = (0.9, 0.999)

# State keys follow torch.optim where the meaning is the same, so checkpoints interchange.
_SECOND_MOMENT_KEY = {"raw": "exp_avg_sq", "centered": "exp_avg_sq", "belief": "exp_avg_var"}
_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "exp_avg_var")
# torch.optim.SGD's and RMSprop's names for the same quantities.
_FOREIGN_STATE_KEYS = {"momentum_buffer": "exp_avg", "square_avg": "exp_avg_sq"}


def _dense(t: torch.Tensor) -> bool:
    """True when t covers its storage span exactly once (any dimension order), as the kernels require."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


# The elementwise second moments (EMAs of squares): like the step counts, never below 0. (FullCGD's exp_avg_sq is
# a matrix, whose off-diagonal entries may be.)
_ELEMENTWISE_SECOND_MOMENTS = ("exp_avg_sq", "exp_avg_var")


def validate_group(group: dict[str, Any], read_lr: bool = True, zero_eps: bool = False) -> None:
    """Raises ValueError naming the first invalid hyperparameter of a parameter group. zero_eps: the group is a
    torch.optim preset's, whose eps = 0 gives torch's own result (NaN where the second moment is 0)."""
    validate_step_size(group, read_lr, diagonal=True)
    betas = group["betas"]
    eps = in_range("eps", group["eps"], 0.0)
    tiny = smallest_eps(group.get("params", ()))
    if not zero_eps and group["power"] != 0.0 and eps < tiny:
        raise bad("eps", group["eps"], f"must be at least {tiny:.3g}, the smallest value the state's precision "
                   "holds: with eps = 0 (or a value that rounds to it) the metric (eps + C)^power is 0 at a "
                   "coordinate whose gradient is exactly 0, and its step 0/0 is NaN")
    in_range("weight_decay", group["weight_decay"], 0.0)
    in_range("m2_init", group["m2_init"], 0.0)
    in_range("dampening", group["dampening"], 0.0, 1.0, hi_open=False)
    if group["moment"] not in MOMENTS:
        raise bad("moment", group["moment"], f"must be one of {MOMENTS}")
    if group["bias_correction"] and group["m2_init"] != 0.0 and group["power"] != 0.0:
        raise bad(
            "m2_init",
            group["m2_init"],
            "bias_correction=True assumes the second moment starts at 0 (Adam); "
            "the paper's start m2_init=1.0 goes with bias_correction=False",
        )
    if group["nesterov"] and betas[0] == 0.0:
        raise bad("nesterov", True, "Nesterov momentum needs betas[0] > 0")
    if group["heavy_ball"] and group["moment"] != "raw" and group["power"] != 0.0:
        raise bad(
            "moment",
            group["moment"],
            "heavy_ball=True keeps a sum of gradients, not an average, so it has no variance; "
            "use heavy_ball=False with a centered metric",
        )


@dataclass
class _Batch:
    """Tensors of one group that share device and dtype: one operator call."""

    group: dict[str, Any]
    params: list[torch.Tensor] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    exp_avgs: list[torch.Tensor] = field(default_factory=list)
    exp_avg_sqs: list[torch.Tensor] = field(default_factory=list)
    steps: list[torch.Tensor] = field(default_factory=list)
    where: list[tuple[int, int]] = field(default_factory=list)  # (group index, param index) for messages
    sharded: list[torch.Tensor] = field(default_factory=list)  # the parameters as given (DTensor under FSDP2)
    # Parameters that are strided views with gaps (p = w[:, ::2]): the kernels step a dense copy, written back.
    write_back: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    guard_flags: torch.Tensor | None = None  # int32 per tensor, written by the step under nonfinite="raise"
    guard_limit: float = 0.0  # overflow_limit of the batch's state precision, with the flags
    indices: list[int] = field(default_factory=list)  # of the parameters in their group's list
    plain: bool = True  # every tensor as given (no DTensor, complex or gapped view): the step may reuse the lists


class _Refused(Exception):
    """The operator refused batch `applied` of a step (the ones before it were stepped): its error is the cause."""

    def __init__(self, applied: int) -> None:
        super().__init__(applied)
        self.applied = applied


class _Plan:
    """The batches of the last step, reused while nothing they were derived from has changed: per group the
    parameter list (the same list object and length), which of its parameters have gradients, the
    hyperparameters that decide which state exists, and the state mapping (the same object, as many entries).
    Only the gradients (new tensors after zero_grad) are fetched again; the operator checks them as it checks
    everything it is given. An added group, and load_state_dict (torch's replaces the state mapping), make the
    plan stale; so does replacing or clearing ``optimizer.state``. (Replacing one parameter's state tensors by
    hand is not noticed: load a state dict.)"""

    def __init__(self, optimizer: CGD, groups: list[dict[str, Any]], batches: list[_Batch]) -> None:
        self.batches = batches
        self.layout = [(g["params"], len(g["params"]), _state_kinds(g), _present([p.grad for p in g["params"]]))
                       for g in groups]
        self.state, self.state_len = optimizer.state, len(optimizer.state)
        self.updated = [p for b in batches for p in b.sharded]  # what mark_updated bumps, flattened once
        # A batch that holds its whole group in order takes the group's gradient list as it is.
        self.whole = [b.indices == list(range(len(groups[b.where[0][0]]["params"]))) for b in batches]

    def batches_for(self, optimizer: CGD, groups: list[dict[str, Any]]) -> list[_Batch] | None:
        """The planned batches with this step's gradients and hyperparameters, or None when the plan is stale."""
        if len(groups) != len(self.layout):
            return None
        grads_of = []
        for g, (params, n, kinds, with_grad) in zip(groups, self.layout):
            if g["params"] is not params or len(params) != n or _state_kinds(g) != kinds:
                return None
            grads = [p.grad for p in params]
            if _present(grads) != with_grad:
                return None
            grads_of.append(grads)
        if optimizer.state is not self.state or len(self.state) != self.state_len:
            return None
        for b, whole in zip(self.batches, self.whole):
            gi = b.where[0][0]
            b.group = groups[gi]
            b.grads = grads_of[gi] if whole else list(map(grads_of[gi].__getitem__, b.indices))
        return self.batches


def _present(grads: list[torch.Tensor | None]) -> list[bool]:
    """Which of these gradients exist."""
    return [g is not None for g in grads]


def _state_kinds(group: dict[str, Any]) -> tuple[bool, str | None]:
    """Which state a group's step keeps: M1 or not, and the second moment's key (None: none)."""
    power = group["power"]
    need_m1 = group["betas"][0] > 0.0 or (power != 0.0 and group["moment"] != "raw")
    return need_m1, (_SECOND_MOMENT_KEY[group["moment"]] if power != 0.0 else None)


class _GuardFlags:
    """One batch's guard flags (cgd_diag_hparams.guard_flags) on their way to the host. On a GPU they are copied
    into pinned memory behind the step, with an event to wait on, so nothing waits until they are read; under
    FSDP2 they are first summed over the ranks that hold the other shards (every rank then raises alike)."""

    def __init__(self, flags: torch.Tensor, where: list[tuple[int, int]], sharded: list[torch.Tensor]) -> None:
        flags = sum_over_shards(flags, sharded)
        self.where = where
        self.event = None
        self.host = flags
        if flags.device.type == "cuda":
            self.host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
            self.host.copy_(flags, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        elif flags.device.type != "cpu":
            self.host = flags.to("cpu")

    def found(self) -> list[tuple[int, int]]:
        """The (group, index) of each parameter whose step held an entry back (waits for that step)."""
        if self.event is not None:
            self.event.synchronize()
        flags = self.host.tolist()
        if not any(flags):
            return []
        return [where for where, flag in zip(self.where, flags) if flag]


class CGD(BaseOptimizer):
    r"""Diagonal Covariant Gradient Descent (Guskov & Vanchurin, arXiv 2504.05279).

    Per parameter element, with the gradient g and t the element's step count::

        M1 <- beta1 * M1 + (1 - beta1) * g          force F = M1 / (1 - beta1^t)
        M2 <- beta2 * M2 + (1 - beta2) * g^2        C = M2 / (1 - beta2^t)   (moment="raw")
        q  <- q - lr * F / (eps + C)^power          (eps_inside=True, the paper's eq 5.1)

    ``moment="centered"`` uses the variance C = M2/(1-beta2^t) - F^2 (paper eq 4.8; a bias-corrected first step,
    whose variance is exactly 0, takes C = M2/(1-beta2^t)), ``moment="belief"`` the
    AdaBelief estimator S <- beta2 S + (1 - beta2)(g - M1)^2 + eps. ``eps_inside=False`` gives torch's
    C^power + eps. ``bias_correction=False, m2_init=1.0`` is the paper's initial condition M1 = 0, M2 = 1.

    Args:
        params: parameters or parameter groups (named parameters work too).
        lr: learning rate gamma.
        betas: EMA coefficients (beta1, beta2) of M1 and M2; beta1 = 0 uses the raw gradient as force.
        tau: the paper's timescales (tau1, tau2) instead of ``betas``: beta = tau / (1 + tau), so
            ``tau=(9, 999)`` is ``betas=(0.9, 0.999)``.
        power: the metric exponent a in [0, 1]; 0 is SGD, 0.5 is Adam/RMSProp.
        eps: regulariser of the metric.
        weight_decay: decay coefficient; decoupled (AdamW) by default, L2 added to the gradient (Adam) with
            ``decoupled_weight_decay=False``.
        moment: "raw", "centered" or "belief" (see above).
        eps_inside: ``(eps + C)^power`` (True, the paper) or ``C^power + eps`` (False, torch's Adam).
        bias_correction: divide M1 and M2 by (1 - beta^t) (Adam); needs ``m2_init=0``.
        m2_init: initial value of M2 (0 for Adam, 1 for the paper).
        nesterov: use beta1 M1 + (1 - beta1) g as the force (one step of look-ahead).
        heavy_ball: keep torch.optim.SGD's momentum buffer M1 <- beta1 M1 + (1 - dampening) g instead of an
            average (the SGD preset sets it).
        dampening: see ``heavy_ball``.
        maximize: ascend instead of descend.
        nonfinite: what a NaN or Inf gradient (or one too large to square in the state) does. "raise"
            (default): the check is fused into the step kernel, so it costs no extra pass and no host
            synchronisation; each such gradient entry keeps its parameter and state values while every other
            entry steps, and :class:`NonFiniteGradientError` names the parameters, raised at the end of the step
            on the CPU and, on a GPU, at the start of the next :meth:`step` (which then changes nothing) or at
            :meth:`check_nonfinite`. "skip": one extra read of the gradients decides on the device, without a
            host synchronisation, to skip the whole step (counted in :attr:`skipped_steps`). "ignore": nothing
            is checked; a NaN then spreads into parameters and state, as with torch.optim. Default "raise", or
            "skip" with ``capturable=True``.
        capturable: promise a step with no host synchronisation, so it can be captured in a CUDA graph (the
            step counters already live on the device): refuses ``nonfinite="raise"``, and keeps each group's
            ``lr`` as a one-element float32 tensor on the parameters' device that the kernel reads there, so an
            LR scheduler changing it between replays of a captured step takes effect. :attr:`skipped_steps`
            accumulates in one device tensor, across replays too. Run one step before capturing (it creates
            the state), as with torch.optim.

    ``lr`` may be a tensor in any mode: on the parameters' device the kernel reads it (no host
    synchronisation); a CPU tensor lr for CUDA parameters is read on the host.

    Defaults: ``power=0.5``, ``betas=(0.9, 0.999)``, ``eps=1e-8`` (inside the power), bias correction on,
    ``m2_init=0``: Adam's timescales and start with the paper's placement of eps, so a learning rate tuned for
    Adam carries over. The evidence (``benchmarks/results/defaults_sweep_cpu.md``): at Adam's learning rate,
    a = 0.5 matches Adam on a digits MLP and a character GPT while a = 0.4 and 0.25 fall far behind, because the
    step scales as |g|^(1 - 2a); tuned per power on the MLP, lower powers win (a = 0.25 at lr 0.03, a = 0.4 at
    3e-3; the paper's tuned values are 0.23 to 0.40). So 0.5 is the default and 0.4 with a ~3x larger learning
    rate is the first value to try when tuning (README, "Choosing power").

    State per parameter (float32 for float32, float16 and bfloat16 parameters, float64 for float64 ones, as
    torch.optim keeps it; complex for a complex parameter, stepped on its real view as torch.optim does):
    ``step`` (a one-element float64 tensor on the parameter's device, exact up to 2^53 steps), ``exp_avg`` (M1,
    when beta1 > 0 or the metric is centered), ``exp_avg_sq`` (M2, when power > 0) or ``exp_avg_var``
    (moment="belief"). The names are torch.optim's, so an Adam checkpoint loads
    directly (:meth:`load_state_dict`).
    """

    _NON_NEGATIVE_KEYS = _ELEMENTWISE_SECOND_MOMENTS
    _DTYPES = SUPPORTED_DTYPES + COMPLEX_DTYPES
    _FUSED_GUARD = True
    _EPS_AS_TORCH = False  # the presets of torch's Adam, AdamW and RMSprop take eps = 0 as torch does

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]] | Iterable[tuple[str, torch.Tensor]],
        lr: float | torch.Tensor = 1e-3,
        betas: tuple[float, float] = _DEFAULT_BETAS,
        *,
        tau: tuple[float, float] | None = None,
        power: float = 0.5,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled_weight_decay: bool = True,
        moment: str = "raw",
        eps_inside: bool = True,
        bias_correction: bool = True,
        m2_init: float = 0.0,
        nesterov: bool = False,
        heavy_ball: bool = False,
        dampening: float = 0.0,
        maximize: bool = False,
        nonfinite: str | None = None,
        capturable: bool = False,
    ) -> None:
        if tau is not None:
            if betas is not _DEFAULT_BETAS:
                raise bad("tau", tau, "pass either betas or tau, not both")
            betas = betas_from_tau(tau)
        defaults = dict(lr=lr, betas=pair("betas", betas), power=power, eps=eps, weight_decay=weight_decay,
                        decoupled_weight_decay=decoupled_weight_decay, moment=moment, eps_inside=eps_inside,
                        bias_correction=bias_correction, m2_init=m2_init, nesterov=nesterov, heavy_ball=heavy_ball,
                        dampening=dampening, maximize=maximize)
        self._init_cgd(params, defaults, nonfinite, capturable)

    def _init_cgd(self, params: Any, defaults: dict[str, Any], nonfinite: str | None, capturable: bool) -> None:
        """Construction shared by CGD and the presets, whose defaults are torch's argument names."""
        # The hyperparameters first, as torch.optim checks them before it looks at params.
        # eps's lower bound depends on the parameters' precision: checked per group, once they are known.
        validate_group(self._cgd_group({**defaults, "params": []}), zero_eps=True)
        self._init_base(params, defaults, nonfinite, capturable)

    def _cgd_group(self, group: dict[str, Any]) -> dict[str, Any]:
        """The group with CGD's hyperparameters (the keys of CGD's constructor). The presets keep torch's
        argument names in their groups and translate them here, per group and on every step, so per-group
        arguments and schedulers that change them (OneCycleLR's momentum, say) act as in torch."""
        return group

    def _check_group(self, gi: int, group: dict[str, Any]) -> None:
        validate_group(self._cgd_group(group), zero_eps=self._EPS_AS_TORCH)
        super()._check_group(gi, group)

    def _step(self, loss: Any) -> Any:
        groups = [self._cgd_group(group) for group in self.param_groups]
        for hparams in groups:
            validate_group(hparams, read_lr=False, zero_eps=self._EPS_AS_TORCH)
        plan = self.__dict__.get("_plan")
        batches = plan.batches_for(self, groups) if plan is not None else None
        if batches is not None:
            try:
                return self._run(batches, loss, plan.updated)
            except _Refused as refused:
                # The reused lists met a gradient the operator refuses (another layout, a sparse one) before any
                # batch was written (the operator checks before it steps): the full gather handles it below,
                # copying it into the parameter's layout or raising with the parameter's name.
                if refused.applied:
                    raise refused.__cause__ from None
        self.__dict__.pop("_plan", None)
        batches = [b for gi, hparams in enumerate(groups) for b in self._gather(gi, hparams)]
        updated = [p for b in batches for p in b.sharded]
        if batches and all(b.plain for b in batches):
            self._plan = _Plan(self, groups, batches)
        try:
            return self._run(batches, loss, updated)
        except _Refused as refused:
            raise refused.__cause__ from None

    def _run(self, batches: list[_Batch], loss: Any, updated: list[torch.Tensor]) -> Any:
        if not batches:
            return loss
        skip = self._skip_flag(lambda: [(b.where, b.grads, [overflow_limit(p) for p in b.sharded], b.sharded)
                                        for b in batches])
        grad_scale = getattr(self, "grad_scale", None)
        guard = self.nonfinite == "raise" and batches[0].params[0].device.type != "meta"
        for i, batch in enumerate(batches):
            try:
                self._apply(batch, grad_scale, skip, guard)
            except RuntimeError as error:
                raise _Refused(i) from error
        mark_updated(updated)
        if guard:
            self._pending = [_GuardFlags(b.guard_flags, b.where, [] if b.plain else b.sharded) for b in batches]
            if batches[0].params[0].device.type == "cpu":  # the flags are already here: no reason to wait
                self.check_nonfinite()
        return loss

    def check_nonfinite(self) -> None:
        """Raises :class:`NonFiniteGradientError` when the last step (``nonfinite="raise"``) held back gradient
        entries that were NaN, Inf or too large to square; otherwise does nothing. :meth:`step` calls it first,
        so on a GPU an unusable gradient surfaces at the next step without waiting for the step that met it;
        call it after the last step of a run to hear of that one too (it then waits for that step)."""
        if not self._pending:  # (and no attribute written: torch.compile traces the step without one)
            return
        pending, self._pending = self._pending, []
        held = [self._label(*where) for guard in pending for where in guard.found()]
        if held:
            raise NonFiniteGradientError(
                f"cgd: the gradient of {', '.join(held)} {UNUSABLE}; those "
                "entries kept their parameter and state values, every other entry took the step "
                "(nonfinite='raise'). Pass nonfinite='skip' to skip such steps whole instead, or nonfinite='ignore' "
                "to apply them as torch.optim does"
            )

    def noise_scale(self, batch_size: int | None = None) -> dict[str, Any]:
        r"""The simple gradient noise scale ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018, "An
        empirical model of large-batch training"), from the moments the step already keeps: computed here, on
        demand, with no cost to the step (one read of M1 and M2 and a host synchronisation per call).

        With the bias-corrected EMAs ``F = M1 / (1 - beta1^t)`` and ``S = (M2 - beta2^t m2_init) / (1 - beta2^t)``
        of the mini-batch gradients g (mean G, covariance Sigma_B per coordinate), ``E[S] = G^2 + sigma^2`` and
        ``E[F^2] = G^2 + r sigma^2`` with ``r = sum w^2 / (sum w)^2 = (1 - beta1)(1 + beta1^t) / ((1 + beta1)(1 -
        beta1^t))`` the EMA's inverse effective sample count, so ``sigma^2 = (S - F^2) / (1 - r)`` and
        ``G^2 = F^2 - r sigma^2`` are unbiased, summed over the coordinates. Their ratio is the noise scale in
        mini-batches (times ``batch_size`` when given: in examples, McCandlish's B_simple).

        What it assumes: G constant over the EMA's window (about ``1 / (1 - beta2)`` steps for S); a drifting G
        counts as noise, so early in training, or with a long beta2, it reads high (with Adam's beta2 = 0.999 on a
        600-step digits MLP, the estimate of |G|^2 fell below 0 after about 100 steps). A ratio of estimates, it is
        noisy where ``|G|^2`` is small (inf where the estimate of ``|G|^2`` is <= 0).

        Under FSDP2 it sums what the calling rank holds (its shards): gather the state first for the model's.

        Returns ``{"model": value, "groups": [value or None, ...], "params": {label: value}}``; a group is None
        when its moments are not an EMA of g and of g^2 (``heavy_ball``, ``beta1 = 0``, ``power = 0`` or
        ``moment="belief"``) or no parameter has taken two steps yet.
        """
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int)
                                       or batch_size < 1):
            raise bad("batch_size", batch_size, "must be None or a positive integer")
        unit = float(batch_size or 1)
        ratio = lambda var, g2: unit * var / g2 if g2 > 0.0 else float("inf")  # noqa: E731
        out: dict[str, Any] = {"model": None, "groups": [], "params": {}}
        model = [0.0, 0.0]
        for gi, raw_group in enumerate(self.param_groups):
            group = self._cgd_group(raw_group)
            beta1, beta2 = (float(b) for b in group["betas"])
            usable = (not group["heavy_ball"] and beta1 > 0.0 and group["power"] != 0.0
                      and group["moment"] in ("raw", "centered"))
            sums = [0.0, 0.0]
            for j, p in enumerate(raw_group["params"]):
                state = self.state.get(p, {})
                t = float(state["step"]) if "step" in state else 0.0
                if not usable or "exp_avg" not in state or "exp_avg_sq" not in state or t < 2:
                    continue
                m1, m2 = (torch.view_as_real(x) if x.is_complex() else x.double()
                          for x in (local(state["exp_avg"]), local(state["exp_avg_sq"])))
                force = m1 / (1.0 - beta1**t)
                second = (m2 - beta2**t * float(group["m2_init"])) / (1.0 - beta2**t)
                r = (1.0 - beta1) * (1.0 + beta1**t) / ((1.0 + beta1) * (1.0 - beta1**t))
                var = float(((second - force**2) / (1.0 - r)).sum())
                g2 = float((force**2).sum()) - r * var
                out["params"][self._label(gi, j)] = ratio(var, g2)
                sums[0] += var
                sums[1] += g2
            seen = usable and any(self._label(gi, j) in out["params"] for j in range(len(raw_group["params"])))
            out["groups"].append(ratio(*sums) if seen else None)
            model[0] += sums[0]
            model[1] += sums[1]
        if out["params"]:
            out["model"] = ratio(*model)
        return out

    def _gather(self, gi: int, group: dict[str, Any]) -> list[_Batch]:
        need_m1, m2_key = _state_kinds(group)
        batches: dict[tuple[Any, ...], _Batch] = {}
        for j, p, g in self._gradients(gi, group, complex_ok=True):
            view, g = local(p), local(g)  # DTensor (FSDP2) parameters: the kernels step the local shard
            work = view if _dense(view) else view.contiguous()  # a view with gaps: one copy in, one back
            if g.stride() != work.stride() or not _dense(g):
                g = torch.empty_like(work).copy_(g)  # the kernels walk param, grad and state in one memory order
            state = self.state[p]
            kept_as = state_dtype(p)
            if "step" not in state:
                state["step"] = torch.zeros((), dtype=torch.float64, device=p.device)
            if need_m1 and "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(p, dtype=kept_as)
            if m2_key is not None and m2_key not in state:
                state[m2_key] = torch.zeros_like(p, dtype=kept_as)
                _real(local(state[m2_key])).fill_(group["m2_init"])  # both parts of a complex element
            key = (p.device, _real(work).dtype)
            batch = batches.get(key)
            if batch is None:
                batch = batches[key] = _Batch(group)
            # The state of a DTensor parameter is a DTensor like it; its local shard is what the kernels see.
            batch.params.append(_real(work))
            batch.grads.append(_real(g))
            if work is not view:
                batch.write_back.append((view, work))
            batch.steps.append(state["step"])
            batch.where.append((gi, j))
            batch.indices.append(j)
            batch.sharded.append(p)
            batch.plain &= work is p and g is p.grad and not p.is_complex()
            if need_m1:
                batch.exp_avgs.append(_real(local(state["exp_avg"])))
            if m2_key is not None:
                batch.exp_avg_sqs.append(_real(local(state[m2_key])))
        return list(batches.values())

    def _apply(self, batch: _Batch, grad_scale: torch.Tensor | None, skip: torch.Tensor | None,
               guard: bool) -> None:
        group = batch.group
        device = batch.params[0].device
        if guard and batch.guard_flags is None:
            batch.guard_flags = torch.empty(len(batch.params), dtype=torch.int32, device=device)
            batch.guard_limit = overflow_limit(batch.params[0])
        skip, grad_scale = on_device(skip, device), on_device(grad_scale, device)
        beta1, beta2 = group["betas"]
        lr, lr_tensor = lr_operands(group["lr"], device)
        torch.ops.cgd.diag_step_(
            batch.params,
            batch.grads,
            batch.exp_avgs,
            batch.exp_avg_sqs,
            batch.steps,
            lr=lr,
            beta1=float(beta1),
            beta2=float(beta2),
            # torch.optim.SGD starts its buffer with the raw gradient, then dampens: the kernel tells a tensor's
            # first step by its step counter, on the device, so a skipped or refused first step leaves the next
            # one first.
            grad_weight=1.0 - float(group["dampening"]) if group["heavy_ball"] else 1.0 - float(beta1),
            first_grad_weight=1.0 if group["heavy_ball"] else 0.0,
            power=float(group["power"]),
            eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]),
            moment=group["moment"],
            eps_inside=bool(group["eps_inside"]),
            bias_correction=bool(group["bias_correction"]),
            decoupled_weight_decay=bool(group["decoupled_weight_decay"]),
            nesterov=bool(group["nesterov"]),
            maximize=bool(group["maximize"]),
            grad_scale=grad_scale,
            found_inf=skip,
            lr_tensor=lr_tensor,
            guard_flags=batch.guard_flags,
            guard_limit=batch.guard_limit,
        )
        for view, work in batch.write_back:
            view.copy_(work)

    # ---- checkpoints ----

    def _translate_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A state dict of this class, or of torch.optim's Adam, AdamW, SGD or RMSprop. torch's state names are
        translated (``momentum_buffer`` becomes M1 ``exp_avg``, ``square_avg`` M2 ``exp_avg_sq``; ``step`` is
        kept). Groups that hold every hyperparameter of this optimizer are loaded as saved, as torch.optim does (a
        preset loading its torch namesake's checkpoint included); a foreign state dict (e.g. torch's Adam into
        ``cgd.CGD``) contributes its state only, and the hyperparameters stay as constructed."""
        groups = state_dict["param_groups"]
        if not all(set(self.defaults) - set(TORCH_ADDED_DEFAULTS) <= set(g) for g in groups):
            groups = self._keep_our_groups(groups)
        return {**state_dict, "param_groups": groups, "state": self._translate_state(state_dict["state"])}

    def _keep_our_groups(self, groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"cgd: the state dict has {len(groups)} parameter groups, this optimizer {len(self.param_groups)}"
            )
        merged = []
        for ours, theirs in zip(self.param_groups, groups):
            group = {k: v for k, v in ours.items() if k not in ("params", "param_names")}
            group["params"] = theirs["params"]
            if "param_names" in theirs:
                group["param_names"] = theirs["param_names"]
            merged.append(group)
        return merged

    @staticmethod
    def _translate_state(saved_state: dict[Any, Any]) -> dict[Any, Any]:
        translated = {}
        for pid, values in saved_state.items():
            out = {}
            for key, value in values.items():
                if value is None:  # SGD without momentum keeps momentum_buffer = None
                    continue
                key = _FOREIGN_STATE_KEYS.get(key, key)
                if key not in _STATE_KEYS:
                    raise ValueError(
                        f"cgd: cannot import optimizer state {key!r} (parameter id {pid!r}): it has no "
                        "counterpart in CGD (e.g. amsgrad's max_exp_avg_sq, RMSprop's grad_avg)"
                    )
                out[key] = value
            translated[pid] = out
        return translated

    def _place_state(self, key: str, value: Any, p: torch.Tensor) -> Any:
        if key == "step":  # float64 (exact to 2^53); checkpoints with a float32 or Python step load too
            return torch.as_tensor(value).detach().reshape(()).to(p.device, torch.float64, copy=True)
        if isinstance(value, torch.Tensor):
            if value.shape != p.shape:
                raise ValueError(
                    f"cgd: state {key!r} has shape {tuple(value.shape)} but its parameter has shape {tuple(p.shape)}"
                )
            return torch.empty_like(p, dtype=state_dtype(p)).copy_(value)
        return value
