"""``cgd.CGD``: diagonal Covariant Gradient Descent as a ``torch.optim.Optimizer``.

The maths runs in the C core (``torch.ops.cgd.diag_step_``); this module owns the PyTorch contract: parameter
groups, lazily created state, ``state_dict`` round trips, the closure, AMP's GradScaler hand-off, the non-finite
gradient policy, and argument checking with messages that name the argument and its value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import torch
from torch.optim import Optimizer

from . import _ops  # noqa: F401  (loads the operator library)
from ._distributed import local, sum_over_shards

MOMENTS = ("raw", "centered", "belief")
NONFINITE_POLICIES = ("raise", "skip", "ignore")
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# Complex parameters are stepped as torch.optim does, on their real view (real and imaginary parts as two elements);
# their state is complex too, so checkpoints interchange with torch's.
COMPLEX_DTYPES = (torch.complex64, torch.complex128)


def state_dtype(p: torch.Tensor) -> torch.dtype:
    """The precision of a parameter's optimizer state: float64 (complex128) for a float64 (complex128) parameter,
    as torch.optim keeps it; float32 (complex64) for every narrower parameter, whose maths runs in float32."""
    if p.dtype in (torch.float64, torch.complex128):
        return p.dtype
    return torch.complex64 if p.is_complex() else torch.float32


def state_precision(params: Iterable[torch.Tensor]) -> torch.dtype:
    """The real precision the kernels of these parameters compute and keep state in: float64 when every one keeps
    float64 (complex128) state, else float32 (a group shares one dtype, so "every" is "the group's")."""
    params = list(params)
    wide = bool(params) and all(state_dtype(p) in (torch.float64, torch.complex128) for p in params)
    return torch.float64 if wide else torch.float32


def _real(t: torch.Tensor) -> torch.Tensor:
    """What the kernels see of a tensor: a complex one's real view (..., 2), else the tensor itself."""
    return torch.view_as_real(t) if t.is_complex() else t

_DEFAULT_BETAS = (0.9, 0.999)
# Keys torch.optim.Optimizer.__setstate__ puts into `defaults` itself.
_TORCH_ADDED_DEFAULTS = ("differentiable",)

# State keys follow torch.optim where the meaning is the same, so checkpoints interchange.
_SECOND_MOMENT_KEY = {"raw": "exp_avg_sq", "centered": "exp_avg_sq", "belief": "exp_avg_var"}
_STATE_KEYS = ("step", "exp_avg", "exp_avg_sq", "exp_avg_var")
# torch.optim.SGD's and RMSprop's names for the same quantities.
_FOREIGN_STATE_KEYS = {"momentum_buffer": "exp_avg", "square_avg": "exp_avg_sq"}


class NonFiniteGradientError(RuntimeError):
    """A gradient held NaN or Inf under ``nonfinite="raise"``; the step was not applied."""


def tau_to_beta(tau: float) -> float:
    """The paper's averaging timescale tau >= 0 (eq 3.5) as an EMA coefficient: beta = tau / (1 + tau)
    (tau = inf: beta = 1, an average that never forgets)."""
    tau = _check_range("tau", tau, 0.0, math.inf, hi_open=False)
    return 1.0 if tau == math.inf else tau / (1.0 + tau)


def beta_to_tau(beta: float) -> float:
    """The inverse of :func:`tau_to_beta`: tau = beta / (1 - beta) for beta in [0, 1] (beta = 1: tau = inf)."""
    beta = _check_range("beta", beta, 0.0, 1.0, hi_open=False)
    return math.inf if beta == 1.0 else beta / (1.0 - beta)


def pair(name: str, value: Any) -> tuple[Any, Any]:
    """A two-element hyperparameter (betas, tau) as a tuple, or a ValueError naming it."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise _bad(name, value, "must be a pair of two numbers")
    return tuple(value)


def _dense(t: torch.Tensor) -> bool:
    """True when t covers its storage span exactly once (any dimension order), as the kernels require."""
    expected = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _bad(name: str, value: Any, why: str) -> ValueError:
    return ValueError(f"cgd: {name} = {value!r} is invalid: {why}")


def _number(name: str, value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise _bad(name, value, "a tensor hyperparameter must hold one element")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(name, value, "must be a real number")
    return float(value)


def _check_range(name: str, value: Any, lo: float, hi: float = math.inf, hi_open: bool = True) -> float:
    v = _number(name, value)
    inside = lo <= v < hi if hi_open else lo <= v <= hi
    if not inside:
        raise _bad(name, value, f"must lie in [{lo}, {hi}{')' if hi_open else ']'}")
    return v


def betas_from_tau(tau: Any) -> tuple[float, float]:
    """The paper's timescales (tau1, tau2), checked, as EMA coefficients."""
    if not isinstance(tau, (tuple, list)) or len(tau) != 2:
        raise _bad("tau", tau, "must be a pair (tau1, tau2)")
    return tuple(tau_to_beta(_check_range(f"tau[{i}]", t, 0.0)) for i, t in enumerate(tau))


# Step counters are float64 (exact to 2^53 steps); a checkpoint that saved them as float32 loads into float64.
_COUNTER_KEYS = ("step", "metric_norm_step")
# Attributes torch.optim.Optimizer keeps out of a pickled optimizer: its hooks, and ours that translate state.
_UNPICKLED = ("_state_hooks", "_loading", "_plan")


# The elementwise second moments (EMAs of squares): like the step counts, never below 0. (FullCGD's exp_avg_sq is
# a matrix, whose off-diagonal entries may be.)
_ELEMENTWISE_SECOND_MOMENTS = ("exp_avg_sq", "exp_avg_var")


def _check_loaded_state(state: dict[Any, Any], non_negative: tuple[str, ...]) -> None:
    """Refuses impossible saved values before anything is replaced: a step count or second moment below 0, or any
    NaN/Inf (a run that diverged saves them; loading one would step with garbage or freeze)."""
    for pid, values in state.items():
        for key, value in values.items():
            if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.numel() == 0:
                continue
            bad = None
            if not bool(torch.isfinite(value).all()):
                bad = "holds NaN or Inf"
            elif key in non_negative and bool((value < 0).any()):
                bad = "is negative" if value.numel() == 1 else "has negative entries"
            if bad:
                shown = f" = {value.item()!r}" if value.numel() == 1 else ""
                raise ValueError(f"cgd: the state dict's state {key!r}{shown} of parameter id {pid!r} {bad}; nothing "
                                 "was loaded")


def _translate_pre_hook(optimizer: BaseOptimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """First of the load_state_dict pre-hooks: translates a foreign state dict, refuses impossible values, and
    notes the saved state as it is (torch's loader then casts floating state to each parameter's dtype, which
    _place_post_hook undoes). Everything that can refuse runs here, before torch replaces anything."""
    state_dict = optimizer._translate_state_dict(state_dict)
    _check_loaded_state(state_dict["state"], _COUNTER_KEYS + optimizer._NON_NEGATIVE_KEYS)
    optimizer._loading = (state_dict["state"], [g["params"] for g in state_dict["param_groups"]])
    return state_dict


def _place_post_hook(optimizer: BaseOptimizer) -> None:
    """First of the load_state_dict post-hooks: puts the noted state back at the precision the optimizer keeps it
    in (BaseOptimizer._place_state) on each parameter's device, before any hook of the user's sees it."""
    saved, ids = optimizer.__dict__.pop("_loading")
    id_map = dict(zip(chain.from_iterable(ids), chain.from_iterable(g["params"] for g in optimizer.param_groups)))
    for pid, values in saved.items():
        p = id_map.get(pid)
        if p is None:
            raise ValueError(f"cgd: the state dict has state for parameter id {pid!r}, which no group lists")
        optimizer.state[p] = {key: optimizer._place_state(key, value, p) for key, value in values.items()}


class BaseOptimizer(Optimizer):
    """What every optimizer of this package shares about checkpoints: state kept as float32 for float32, float16
    and bfloat16 parameters and as float64 for float64 ones (int32, float64 or float32 where a class says so),
    loaded through torch's own load_state_dict with the translation and placement as its first pre- and
    post-hook, so hooks, FSDP and DCP see what they see with torch.optim; and
    the optimizer's own attributes kept by copy.deepcopy and pickling (torch keeps only defaults, state and
    param_groups)."""

    _INT_KEYS: tuple[str, ...] = ()
    _FLOAT64_KEYS: tuple[str, ...] = ()  # float64 whatever the parameter (beyond the step counts)
    _FLOAT32_KEYS: tuple[str, ...] = ()  # float32 whatever the parameter (e.g. failure counts)
    _STATE_LIKE_PARAM = False  # state of the parameter's shape takes its memory layout (else: contiguous)
    _NON_NEGATIVE_KEYS: tuple[str, ...] = ()  # state that is never below 0, beyond the step counts

    def _install_state_hooks(self) -> None:
        if "_state_hooks" not in self.__dict__:
            self._state_hooks = (self.register_load_state_dict_pre_hook(_translate_pre_hook),
                                 self.register_load_state_dict_post_hook(_place_post_hook))

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in _UNPICKLED and not k.endswith("_hooks")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._install_state_hooks()

    def _translate_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Only state dicts of this optimizer's own kind load: another optimizer's groups lack hyperparameters
        this one steps with, and loading them would break the next step (KeyError) after replacing everything."""
        wanted = set(self.defaults) - set(_TORCH_ADDED_DEFAULTS)
        for gi, group in enumerate(state_dict["param_groups"]):
            missing = sorted(wanted - set(group))
            if missing:
                raise ValueError(f"cgd: the state dict's param_groups[{gi}] lacks {', '.join(missing)}: it is not a "
                                 f"{type(self).__name__} state dict; nothing was loaded")
        for gi, group in enumerate(state_dict["param_groups"]):
            for j, pid in enumerate(group["params"]):
                saved = state_dict["state"].get(pid)
                if not saved:  # no state yet: the first step creates it
                    continue
                required = self._required_state(group, j, saved)
                lacking = [k for k in required if k not in saved]
                if lacking:
                    raise ValueError(f"cgd: the state dict's state of parameter id {pid!r} lacks "
                                     f"{', '.join(map(repr, lacking))} (it has {', '.join(map(repr, saved))}); "
                                     "nothing was loaded")
                for key, value in saved.items():
                    wrong = not isinstance(value, int) or value < 0 if key == "calls" else (
                        key in required and not isinstance(value, torch.Tensor))
                    if wrong:
                        raise ValueError(f"cgd: the state dict's state {key!r} of parameter id {pid!r} is "
                                         f"{type(value).__name__} {value!r}, not "
                                         f"{'a count' if key == 'calls' else 'a tensor'}; nothing was loaded")
        return state_dict

    def _required_state(self, group: dict[str, Any], j: int, saved: dict[str, Any]) -> tuple[str, ...]:
        """The state keys parameter j of a saved group must have, given that it has `saved` (not empty): the step
        cannot recreate a part of it without silently restarting the rest."""
        return ()

    def _place_state(self, key: str, value: Any, p: torch.Tensor) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if key in self._INT_KEYS:
            dtype = torch.int32
        elif key in _COUNTER_KEYS + self._FLOAT64_KEYS:
            dtype = torch.float64
        elif key in self._FLOAT32_KEYS:
            dtype = torch.float32
        else:
            dtype = state_dtype(p)
        if self._STATE_LIKE_PARAM and value.shape == p.shape:  # walked in the parameter's memory order
            return torch.empty_like(p, dtype=dtype).copy_(value)
        return value.detach().to(p.device, dtype, copy=True).contiguous()


# What the non-finite check catches (cgd.h, cgd_nonfinite_check): a value whose square overflows the state's
# second moments is as unusable as an Inf, so it is caught with them.
UNUSABLE = "contains NaN, Inf, or a value too large for the optimizer state to square"


def overflow_limit(p: torch.Tensor, summed: int = 1) -> float:
    """The gradient magnitude from which a step's second moments would overflow p's state precision: half the
    square root of its largest value (the centered and belief moments square a difference of two gradients),
    over sqrt(summed) where `summed` squares add up in one entry (a Kronecker factor's Gram sums)."""
    return math.sqrt(torch.finfo(state_precision([p])).max / max(summed, 1)) / 2


def smallest_eps(params: Iterable[torch.Tensor]) -> float:
    """The smallest positive eps the kernels of these parameters see as nonzero: float64's least subnormal when
    every parameter keeps float64 state, else float32's (2^-149 = 1.4e-45; 1e-300 rounds to 0 there)."""
    return 5e-324 if state_precision(params) == torch.float64 else 2.0**-149


def check_writable(label: str, p: torch.Tensor) -> None:
    """torch.optim's in-place updates refuse an inference tensor outside inference mode; so does every step here,
    before anything changes (the kernels write through raw pointers, past the check torch's own ops make)."""
    if p.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(f"cgd: parameter {label} is an inference tensor: Inplace update to inference tensor "
                           "outside InferenceMode is not allowed (create the parameter outside torch.inference_mode, "
                           "or clone it first)")


def mark_updated(params: Iterable[torch.Tensor]) -> None:
    """Bumps each stepped parameter's autograd version counter, as torch's in-place ops do (the kernels write
    through raw pointers, which autograd cannot see): a backward through a graph saved before the step then
    raises "modified by an inplace operation" instead of silently using the new values."""
    torch.autograd.graph.increment_version(list(params))


def check_grad_shape(label: str, p: torch.Tensor, g: torch.Tensor) -> None:
    """A gradient must have its parameter's shape: copying one into the parameter's layout would broadcast it."""
    if tuple(g.shape) != tuple(p.shape):
        raise ValueError(f"cgd: the gradient of parameter {label} has shape {tuple(g.shape)}, but the parameter has "
                         f"shape {tuple(p.shape)}")


def group_param_label(group: dict[str, Any], j: int) -> str:
    """How messages name parameter j of a group: its name when the group has names, else its index; with shape."""
    names = group.get("param_names")
    shape = tuple(group["params"][j].shape)
    return f"'{names[j]}' (shape {shape})" if names else f"params[{j}] (shape {shape})"


def resolve_nonfinite(nonfinite: str | None, capturable: bool, policies: tuple[str, ...]) -> str:
    """The non-finite policy: "raise" by default, or "skip" under capturable=True, where raising would need the
    flag on the host (a synchronisation CUDA-graph capture forbids)."""
    if nonfinite is None:
        nonfinite = "skip" if capturable and "skip" in policies else ("ignore" if capturable else "raise")
    if nonfinite not in policies:
        raise _bad("nonfinite", nonfinite, f"must be one of {policies}")
    if capturable and nonfinite == "raise":
        raise _bad("nonfinite", nonfinite, "capturable=True cannot raise: that reads the non-finite flag on the "
                   f"host; use one of {tuple(p for p in policies if p != 'raise')}")
    return nonfinite


def check_lr(lr: Any, read_tensor: bool = True) -> None:
    """lr must be >= 0. A tensor lr must hold one floating element; its value is checked only with
    ``read_tensor`` (when it is set), since reading it on every step would synchronise with its device."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise _bad("lr", lr, "a tensor lr must hold one floating-point element")
        if not read_tensor:
            return
    _check_range("lr", lr, 0.0)


def lr_operands(lr: Any, device: torch.device) -> tuple[float, torch.Tensor | None]:
    """The (lr, lr_tensor) arguments of a diag or induced op for parameters on `device`. A tensor lr on that
    device goes to the kernel, which reads it there: no host read, and a captured CUDA graph follows a
    scheduler's in-place change. A tensor lr elsewhere (a CPU tensor for CUDA parameters) is read on the host
    once per step, as torch.optim does."""
    if not isinstance(lr, torch.Tensor):
        return float(lr), None
    if lr.device == device:
        return 0.0, lr.detach().reshape(()).to(torch.float32)
    return _number("lr", lr), None


def lr_on_device(lr: Any, params: list[torch.Tensor]) -> Any:
    """capturable=True keeps lr as a one-element float32 tensor on the parameters' device, so the kernels read it
    there and an LR scheduler's update (it fill_s a tensor lr in place) reaches a replayed CUDA graph."""
    if isinstance(lr, torch.Tensor) or not params:
        return lr
    return torch.tensor(float(lr), dtype=torch.float32, device=params[0].device)


def validate_step_size(group: dict[str, Any], read_lr: bool = True, diagonal: bool = False) -> None:
    """Checks lr, betas and power, which every CGD optimizer shares."""
    check_lr(group["lr"], read_lr)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise _bad("betas", betas, "must be a pair (beta1, beta2)")
    # beta = 1 (an average that never forgets: torch's SGD momentum=1, RMSprop alpha=1) is for the diagonal step
    # without bias correction, which would divide by 1 - 1^t = 0; for M1 it needs the heavy-ball sum, whose
    # gradient weight is not 1 - beta.
    closed = diagonal and not group["bias_correction"]
    _check_range("betas[0]", betas[0], 0.0, 1.0, hi_open=not (closed and group.get("heavy_ball", False)))
    _check_range("betas[1]", betas[1], 0.0, 1.0, hi_open=not closed)
    _check_range("power", group["power"], 0.0, 1.0, hi_open=False)


def validate_group(group: dict[str, Any], read_lr: bool = True, zero_eps: bool = False) -> None:
    """Raises ValueError naming the first invalid hyperparameter of a parameter group. zero_eps: the group is a
    torch.optim preset's, whose eps = 0 gives torch's own result (NaN where the second moment is 0)."""
    validate_step_size(group, read_lr, diagonal=True)
    betas = group["betas"]
    eps = _check_range("eps", group["eps"], 0.0)
    tiny = smallest_eps(group.get("params", ()))
    if not zero_eps and group["power"] != 0.0 and eps < tiny:
        raise _bad("eps", group["eps"], f"must be at least {tiny:.3g}, the smallest value the state's precision "
                   "holds: with eps = 0 (or a value that rounds to it) the metric (eps + C)^power is 0 at a "
                   "coordinate whose gradient is exactly 0, and its step 0/0 is NaN")
    _check_range("weight_decay", group["weight_decay"], 0.0)
    _check_range("m2_init", group["m2_init"], 0.0)
    _check_range("dampening", group["dampening"], 0.0, 1.0, hi_open=False)
    if group["moment"] not in MOMENTS:
        raise _bad("moment", group["moment"], f"must be one of {MOMENTS}")
    if group["bias_correction"] and group["m2_init"] != 0.0 and group["power"] != 0.0:
        raise _bad(
            "m2_init",
            group["m2_init"],
            "bias_correction=True assumes the second moment starts at 0 (Adam); "
            "the paper's start m2_init=1.0 goes with bias_correction=False",
        )
    if group["nesterov"] and betas[0] == 0.0:
        raise _bad("nesterov", True, "Nesterov momentum needs betas[0] > 0")
    if group["heavy_ball"] and group["moment"] != "raw" and group["power"] != 0.0:
        raise _bad(
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
        for b in self.batches:
            gi = b.where[0][0]
            b.group = groups[gi]
            b.grads = list(map(grads_of[gi].__getitem__, b.indices))
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
        return [where for where, flag in zip(self.where, self.host.tolist()) if flag]


class CGD(BaseOptimizer):
    r"""Diagonal Covariant Gradient Descent (Guskov & Vanchurin, arXiv 2504.05279).

    Per parameter element, with the gradient g and t the element's step count::

        M1 <- beta1 * M1 + (1 - beta1) * g          force F = M1 / (1 - beta1^t)
        M2 <- beta2 * M2 + (1 - beta2) * g^2        C = M2 / (1 - beta2^t)   (moment="raw")
        q  <- q - lr * F / (eps + C)^power          (eps_inside=True, the paper's eq 5.1)

    ``moment="centered"`` uses the variance C = M2/(1-beta2^t) - F^2 (paper eq 4.8), ``moment="belief"`` the
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

    _step_supports_amp_scaling = True  # GradScaler hands over grad_scale and found_inf instead of unscaling
    _NON_NEGATIVE_KEYS = _ELEMENTWISE_SECOND_MOMENTS
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
                raise _bad("tau", tau, "pass either betas or tau, not both")
            betas = betas_from_tau(tau)
        defaults = dict(
            lr=lr,
            betas=pair("betas", betas),
            power=power,
            eps=eps,
            weight_decay=weight_decay,
            decoupled_weight_decay=decoupled_weight_decay,
            moment=moment,
            eps_inside=eps_inside,
            bias_correction=bias_correction,
            m2_init=m2_init,
            nesterov=nesterov,
            heavy_ball=heavy_ball,
            dampening=dampening,
            maximize=maximize,
        )
        self._init_cgd(params, defaults, nonfinite, capturable)

    def _init_cgd(self, params: Any, defaults: dict[str, Any], nonfinite: str | None, capturable: bool) -> None:
        """Construction shared by CGD and the presets, whose defaults are torch's argument names: the non-finite
        policy and capturable first (add_param_group reads them), then torch's Optimizer."""
        self.capturable = bool(capturable)
        self.nonfinite = resolve_nonfinite(nonfinite, self.capturable, NONFINITE_POLICIES)
        self._skipped: torch.Tensor | None = None
        self._pending: list[_GuardFlags] = []
        # The hyperparameters first, as torch.optim checks them before it looks at params.
        # eps's lower bound depends on the parameters' precision: checked per group, once they are known.
        validate_group(self._cgd_group({**defaults, "params": []}), zero_eps=True)
        Optimizer.__init__(self, params, defaults)
        self._install_state_hooks()

    def _cgd_group(self, group: dict[str, Any]) -> dict[str, Any]:
        """The group with CGD's hyperparameters (the keys of CGD's constructor). The presets keep torch's
        argument names in their groups and translate them here, per group and on every step, so per-group
        arguments and schedulers that change them (OneCycleLR's momentum, say) act as in torch."""
        return group

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        # Pickles made before these attributes travelled with the optimizer.
        self.__dict__.setdefault("nonfinite", "raise")
        self.__dict__.setdefault("capturable", False)
        self.__dict__.setdefault("_skipped", None)
        self.__dict__.setdefault("_pending", [])
        # A group saved before a hyperparameter existed gets its default; not the keys torch's own __setstate__
        # adds to the defaults (`differentiable`), which would make state_dict() differ from the one saved.
        for group in self.param_groups:
            for key, value in self.defaults.items():
                if key not in _TORCH_ADDED_DEFAULTS:
                    group.setdefault(key, value)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            validate_group(self._cgd_group(group), zero_eps=self._EPS_AS_TORCH)
            if self.capturable:
                group["lr"] = lr_on_device(group["lr"], group["params"])
            for j, p in enumerate(group["params"]):
                if p.dtype not in SUPPORTED_DTYPES + COMPLEX_DTYPES:
                    kind = "complex" if p.is_complex() else str(p.dtype)
                    raise ValueError(
                        f"cgd: parameter {self._label(len(self.param_groups) - 1, j)} is {kind} "
                        f"({p.dtype}); supported parameter dtypes are float32, float16, bfloat16, float64, "
                        "complex64 and complex128"
                    )
        except ValueError:
            self.param_groups.pop()
            raise

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients under ``nonfinite="skip"`` (reading it synchronises)."""
        return 0 if self._skipped is None else int(self._skipped.item())

    # ---- the step ----

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        self.check_nonfinite()
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups = [self._cgd_group(group) for group in self.param_groups]
        for hparams in groups:
            validate_group(hparams, read_lr=False, zero_eps=self._EPS_AS_TORCH)
        plan = self.__dict__.get("_plan")
        batches = plan.batches_for(self, groups) if plan is not None else None
        if batches is not None:
            try:
                return self._run(batches, loss)
            except _Refused as refused:
                # The reused lists met a gradient the operator refuses (another layout, a sparse one) before any
                # batch was written (the operator checks before it steps): the full gather handles it below,
                # copying it into the parameter's layout or raising with the parameter's name.
                if refused.applied:
                    raise refused.__cause__ from None
        self.__dict__.pop("_plan", None)
        batches = [b for gi, hparams in enumerate(groups) for b in self._gather(gi, hparams)]
        if batches and all(b.plain for b in batches):
            self._plan = _Plan(self, groups, batches)
        try:
            return self._run(batches, loss)
        except _Refused as refused:
            raise refused.__cause__ from None

    def _run(self, batches: list[_Batch], loss: Any) -> Any:
        if not batches:
            return loss
        skip = self._skip_flag(batches)
        grad_scale = getattr(self, "grad_scale", None)
        guard = self.nonfinite == "raise" and batches[0].params[0].device.type != "meta"
        for i, batch in enumerate(batches):
            try:
                self._apply(batch, grad_scale, skip, guard)
            except RuntimeError as error:
                raise _Refused(i) from error
        mark_updated(chain.from_iterable(b.sharded for b in batches))
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
        bad = [self._label(*where) for guard in pending for where in guard.found()]
        if bad:
            raise NonFiniteGradientError(
                f"cgd: the gradient of {', '.join(bad)} {UNUSABLE}; those "
                "entries kept their parameter and state values, every other entry took the step "
                "(nonfinite='raise'). Pass nonfinite='skip' to skip such steps whole instead, or nonfinite='ignore' "
                "to apply them as torch.optim does"
            )

    def _label(self, gi: int, j: int) -> str:
        group = self.param_groups[gi]
        p = group["params"][j]
        names = group.get("param_names")
        where = f"param_groups[{gi}]['params'][{j}]"
        return f"'{names[j]}' ({where}, shape {tuple(p.shape)})" if names else f"{where} (shape {tuple(p.shape)})"

    def _gather(self, gi: int, group: dict[str, Any]) -> list[_Batch]:
        need_m1, m2_key = _state_kinds(group)
        batches: dict[tuple[Any, ...], _Batch] = {}
        for j, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse:
                raise RuntimeError(
                    f"cgd: parameter {self._label(gi, j)} has a sparse gradient, which CGD does not support; "
                    "use torch.optim.SparseAdam for sparse embeddings, or dense gradients"
                )
            check_grad_shape(self._label(gi, j), p, g)
            check_writable(self._label(gi, j), p)
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

    def _skip_flag(self, batches: list[_Batch]) -> torch.Tensor | None:
        """A one-element tensor that is nonzero when the step must be skipped, or None for never."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None:  # GradScaler already checked every gradient
            return found_inf
        if self.nonfinite != "skip" or batches[0].params[0].device.type == "meta":  # meta: no values to check
            return None
        checks = [torch.ops.cgd.nonfinite_flags(b.grads, [overflow_limit(p) for p in b.sharded]) for b in batches]
        device = checks[0][1].device
        total = checks[0][1]
        for _, found in checks[1:]:
            total = total + found.to(device, non_blocking=True)
        # Under FSDP2 every rank must take the same decision, whichever shard held the NaN.
        total = sum_over_shards(total, chain.from_iterable(b.sharded for b in batches))
        # One counter, allocated on the first (uncaptured) step and added to in place: a captured step's replays
        # keep adding to it.
        if self._skipped is None:
            self._skipped = torch.zeros((), dtype=torch.float64, device=device)
        self._skipped.add_(total)
        return total

    def _apply(self, batch: _Batch, grad_scale: torch.Tensor | None, skip: torch.Tensor | None,
               guard: bool) -> None:
        group = batch.group
        device = batch.params[0].device
        if guard and batch.guard_flags is None:
            batch.guard_flags = torch.empty(len(batch.params), dtype=torch.int32, device=device)
            batch.guard_limit = overflow_limit(batch.params[0])
        if skip is not None and skip.device != device:
            skip = skip.to(device, non_blocking=True)
        if grad_scale is not None and grad_scale.device != device:
            grad_scale = grad_scale.to(device, non_blocking=True)
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
        if not all(set(self.defaults) - set(_TORCH_ADDED_DEFAULTS) <= set(g) for g in groups):
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
