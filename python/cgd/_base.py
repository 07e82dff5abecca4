"""What every optimizer of the package shares: the step's template (the closure, the non-finite policy, AMP's
GradScaler hand-off), one gathering and checking of gradients with messages that name the parameter, atomic
``add_param_group``, the precision state is kept in, and checkpoints through torch's own ``load_state_dict``.
Each family (``diagonal.py``, ``full.py``, ``induced.py``) adds its group checks, its state and its operator calls.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import chain
from typing import Any

import torch
from torch.optim import Optimizer

from ._distributed import sum_over_shards
from ._validate import bad, number

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
NONFINITE_POLICIES = ("raise", "skip", "ignore")
# Keys torch.optim.Optimizer.__setstate__ puts into `defaults` itself.
TORCH_ADDED_DEFAULTS = ("differentiable",)
# Step counters are float64 (exact to 2^53 steps); a checkpoint that saved them as float32 loads into float64.
_COUNTER_KEYS = ("step", "metric_norm_step")
# Attributes torch.optim.Optimizer keeps out of a pickled optimizer: its hooks, and ours that translate state.
_UNPICKLED = ("_state_hooks", "_loading", "_plan")
# What the non-finite check catches (cgd.h, cgd_nonfinite_check): a value whose square overflows the state's
# second moments is as unusable as an Inf, so it is caught with them.
UNUSABLE = "contains NaN, Inf, or a value too large for the optimizer state to square"


class NonFiniteGradientError(RuntimeError):
    """A gradient held NaN, Inf or a value too large to square under ``nonfinite="raise"``. What the step did
    with it depends on the family (the message says, and the README's table): cgd.CGD held those entries back,
    FullCGD and InducedMetric changed nothing."""


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


def overflow_limit(p: torch.Tensor, summed: int = 1) -> float:
    """The gradient magnitude from which a step's second moments would overflow p's state precision: half the
    square root of its largest value (the centered and belief moments square a difference of two gradients),
    over sqrt(summed) where `summed` squares add up in one entry (a Kronecker factor's Gram sums)."""
    return math.sqrt(torch.finfo(state_precision([p])).max / max(summed, 1)) / 2


def smallest_eps(params: Iterable[torch.Tensor]) -> float:
    """The smallest positive eps the kernels of these parameters see as nonzero: float64's least subnormal when
    every parameter keeps float64 state, else float32's (2^-149 = 1.4e-45; 1e-300 rounds to 0 there)."""
    return 5e-324 if state_precision(params) == torch.float64 else 2.0**-149


def mark_updated(params: Iterable[torch.Tensor]) -> None:
    """Bumps each stepped parameter's autograd version counter, as torch's in-place ops do (the kernels write
    through raw pointers, which autograd cannot see): a backward through a graph saved before the step then
    raises "modified by an inplace operation" instead of silently using the new values."""
    torch.autograd.graph.increment_version(list(params))


def resolve_nonfinite(nonfinite: str | None, capturable: bool, policies: tuple[str, ...]) -> str:
    """The non-finite policy: "raise" by default, or "skip" under capturable=True, where raising would need the
    flag on the host (a synchronisation CUDA-graph capture forbids)."""
    if nonfinite is None:
        nonfinite = "skip" if capturable and "skip" in policies else ("ignore" if capturable else "raise")
    if nonfinite not in policies:
        raise bad("nonfinite", nonfinite, f"must be one of {policies}")
    if capturable and nonfinite == "raise":
        raise bad("nonfinite", nonfinite, "capturable=True cannot raise: that reads the non-finite flag on the "
                   f"host; use one of {tuple(p for p in policies if p != 'raise')}")
    return nonfinite


def lr_operands(lr: Any, device: torch.device) -> tuple[float, torch.Tensor | None]:
    """The (lr, lr_tensor) arguments of a diag or induced op for parameters on `device`. A tensor lr on that
    device goes to the kernel, which reads it there: no host read, and a captured CUDA graph follows a
    scheduler's in-place change. A tensor lr elsewhere (a CPU tensor for CUDA parameters) is read on the host
    once per step, as torch.optim does."""
    if not isinstance(lr, torch.Tensor):
        return float(lr), None
    if lr.device == device:
        return 0.0, lr.detach().reshape(()).to(torch.float32)
    return number("lr", lr), None


def lr_on_device(lr: Any, params: list[torch.Tensor]) -> Any:
    """capturable=True keeps lr as a one-element float32 tensor on the parameters' device, so the kernels read it
    there and an LR scheduler's update (it fill_s a tensor lr in place) reaches a replayed CUDA graph."""
    if isinstance(lr, torch.Tensor) or not params:
        return lr
    return torch.tensor(float(lr), dtype=torch.float32, device=params[0].device)


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
    """The shared base. A family sets its class attributes, calls :meth:`_init_base` (the policy, then torch's
    Optimizer), extends :meth:`_check_group` and implements :meth:`_step`; this class runs the step template
    (pending non-finite flags, the closure, :meth:`_step`), gathers and checks gradients (:meth:`_gradients`),
    applies the non-finite policy for the families that check before they step (:meth:`_skip_flag`), and names
    parameters alike in every message (:meth:`_label`).

    State is kept as float32 for float32, float16 and bfloat16 parameters and as float64 for float64 ones
    (int32, float64 or float32 where a class says so), loaded through torch's own load_state_dict with the
    translation and placement as its first pre- and post-hook, so hooks, FSDP and DCP see what they see with
    torch.optim; the optimizer's own attributes survive copy.deepcopy and pickling (torch keeps only defaults,
    state and param_groups)."""

    _INT_KEYS: tuple[str, ...] = ()
    _FLOAT64_KEYS: tuple[str, ...] = ()  # float64 whatever the parameter (beyond the step counts)
    _FLOAT32_KEYS: tuple[str, ...] = ()  # float32 whatever the parameter (e.g. failure counts)
    _STATE_LIKE_PARAM = False  # state of the parameter's shape takes its memory layout (else: contiguous)
    _NON_NEGATIVE_KEYS: tuple[str, ...] = ()  # state that is never below 0, beyond the step counts
    _DTYPES = SUPPORTED_DTYPES  # parameter dtypes the family steps
    _DTYPES_HINT = "(complex parameters: use cgd.CGD, which steps their real view)"
    _FUSED_GUARD = False  # nonfinite="raise" is the kernel's own guard (cgd.CGD), not a scan before the step
    _step_supports_amp_scaling = True  # GradScaler hands over grad_scale and found_inf instead of unscaling

    def _init_base(self, params: Any, defaults: dict[str, Any], nonfinite: str | None, capturable: bool,
                   policies: tuple[str, ...] = NONFINITE_POLICIES) -> None:
        """The non-finite policy and capturable first (add_param_group reads them), then torch's Optimizer."""
        self.capturable = bool(capturable)
        self.nonfinite = resolve_nonfinite(nonfinite, self.capturable, policies)
        self._skipped: torch.Tensor | None = None
        self._pending: list[Any] = []
        Optimizer.__init__(self, params, defaults)
        self._install_state_hooks()

    def _install_state_hooks(self) -> None:
        if "_state_hooks" not in self.__dict__:
            self._state_hooks = (self.register_load_state_dict_pre_hook(_translate_pre_hook),
                                 self.register_load_state_dict_post_hook(_place_post_hook))

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in _UNPICKLED and not k.endswith("_hooks")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._install_state_hooks()
        # Pickles made before these attributes travelled with the optimizer.
        self.__dict__.setdefault("nonfinite", "raise")
        self.__dict__.setdefault("capturable", False)
        self.__dict__.setdefault("_skipped", None)
        self.__dict__.setdefault("_pending", [])
        # A group saved before a hyperparameter existed gets its default; not the keys torch's own __setstate__
        # adds to the defaults (`differentiable`), which would make state_dict() differ from the one saved.
        for group in self.param_groups:
            for key, value in self.defaults.items():
                if key not in TORCH_ADDED_DEFAULTS:
                    group.setdefault(key, value)

    # ---- groups ----

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group, then the family's checks: a group that fails them is not added."""
        super().add_param_group(param_group)
        try:
            self._check_group(len(self.param_groups) - 1, self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    def _check_group(self, gi: int, group: dict[str, Any]) -> None:
        """Raises ValueError naming the first unusable hyperparameter or parameter of group gi."""
        for j, p in enumerate(group["params"]):
            if p.dtype not in self._DTYPES:
                *most, last = [str(d).removeprefix("torch.") for d in self._DTYPES]
                hint = f" {self._DTYPES_HINT}" if p.is_complex() and self._DTYPES_HINT else ""
                raise ValueError(f"cgd: parameter {self._label(gi, j)} is {p.dtype}; supported parameter dtypes are "
                                 f"{', '.join(most)} and {last}{hint}")
        if self.capturable:
            group["lr"] = lr_on_device(group["lr"], group["params"])

    def _label(self, gi: int, j: int) -> str:
        """How every message names parameter j of group gi: its name when the group has names, and where it is."""
        group = self.param_groups[gi]
        p = group["params"][j]
        names = group.get("param_names")
        where = f"param_groups[{gi}]['params'][{j}]"
        return f"'{names[j]}' ({where}, shape {tuple(p.shape)})" if names else f"{where} (shape {tuple(p.shape)})"

    # ---- the step ----

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs one optimisation step; ``closure`` re-evaluates the model and returns the loss."""
        return self._step(self._begin(closure))

    def _begin(self, closure: Callable[[], Any] | None) -> Any:
        """What every step does first: raise for gradient entries the last step held back (cgd.CGD on a GPU), then
        run the closure, if any, with gradients enabled. Its loss, or None."""
        self.check_nonfinite()
        if closure is None:
            return None
        with torch.enable_grad():
            return closure()

    def _step(self, loss: Any) -> Any:
        raise NotImplementedError

    def _gradients(self, gi: int, group: dict[str, Any], complex_ok: bool = False
                   ) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(j, parameter, gradient) for each parameter of group gi that has a gradient, checked alike for every
        family: dense, real unless the family steps complex ones, the parameter's shape, a writable parameter."""
        out = []
        for j, p in enumerate(group["params"]):
            g = p.grad
            if g is None:
                continue
            if g.is_sparse or (g.is_complex() and not complex_ok):
                kind = "sparse" if g.is_sparse else "complex"
                hint = "use torch.optim.SparseAdam for sparse embeddings, or dense gradients" if g.is_sparse else \
                    "use cgd.CGD, which steps a complex parameter's real view"
                raise RuntimeError(f"cgd: parameter {self._label(gi, j)} has a {kind} gradient, which "
                                   f"{type(self).__name__} does not support; {hint}")
            if tuple(g.shape) != tuple(p.shape):  # copying it into the parameter's layout would broadcast it
                raise ValueError(f"cgd: the gradient of parameter {self._label(gi, j)} has shape {tuple(g.shape)}, "
                                 f"but the parameter has shape {tuple(p.shape)}")
            # torch.optim's in-place updates refuse an inference tensor outside inference mode; so does every step
            # here, before anything changes (the kernels write through raw pointers, past torch's own check).
            if p.is_inference() and not torch.is_inference_mode_enabled():
                raise RuntimeError(f"cgd: parameter {self._label(gi, j)} is an inference tensor: Inplace update to "
                                   "inference tensor outside InferenceMode is not allowed (create the parameter "
                                   "outside torch.inference_mode, or clone it first)")
            out.append((j, p, g))
        return out

    def _skip_flag(self, checks: Callable[[], list[tuple[list[tuple[int, int]], list[torch.Tensor], list[float],
                                                         list[torch.Tensor]]]]) -> torch.Tensor | None:
        """The step's non-finite decision as a one-element device tensor that is nonzero to skip the step, or None
        for never. GradScaler's found_inf when it manages the step (an overflow is routine there: it skips on the
        device and lowers the scale). Otherwise the policy: "ignore" checks nothing; "raise" (in the families
        that check before they step) scans every gradient, reads the result once, and raises naming the
        parameters before anything changed; "skip" scans, keeps the decision on the device and counts it in
        :attr:`skipped_steps`. ``checks()`` gives per batch the (group, index) of each gradient, the gradients,
        their overflow limits and the parameters as given (DTensors under FSDP2, so every rank decides alike)."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None:
            return found_inf
        if self.nonfinite == "ignore" or (self.nonfinite == "raise" and self._FUSED_GUARD):
            return None
        batches = checks()
        if not batches or batches[0][1][0].device.type == "meta":  # meta tensors hold no values to check
            return None
        scans = [torch.ops.cgd.nonfinite_flags(grads, limits) for _, grads, limits, _ in batches]
        device = scans[0][1].device
        total = scans[0][1]
        for _, found in scans[1:]:
            total = total + found.to(device, non_blocking=True)
        total = sum_over_shards(total, chain.from_iterable(sharded for *_, sharded in batches))
        if self.nonfinite == "raise":
            if float(total.item()) == 0.0:
                return None
            bad_ones = [self._label(*where[i]) for (where, *_), (flags, _) in zip(batches, scans)
                        for i in flags.nonzero().flatten().tolist()]
            raise NonFiniteGradientError(
                f"cgd: the gradient of {', '.join(bad_ones) or 'a parameter shard on another rank'} {UNUSABLE}; "
                "no parameter or state was changed (nonfinite='raise')")
        # One counter, allocated on the first (uncaptured) step and added to in place: a captured step's replays
        # keep adding to it.
        if self._skipped is None:
            self._skipped = torch.zeros((), dtype=torch.float64, device=device)
        self._skipped.add_(total)
        return total

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients under ``nonfinite="skip"`` (reading it synchronises)."""
        return 0 if self._skipped is None else int(self._skipped.item())

    def check_nonfinite(self) -> None:
        """Raises :class:`NonFiniteGradientError` for a step whose non-finite check is still to be read (cgd.CGD's
        fused guard on a GPU); otherwise does nothing."""

    def _translate_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Only state dicts of this optimizer's own kind load: another optimizer's groups lack hyperparameters
        this one steps with, and loading them would break the next step (KeyError) after replacing everything."""
        wanted = set(self.defaults) - set(TORCH_ADDED_DEFAULTS)
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


def on_device(t: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    """A step's one-element tensor (GradScaler's grad_scale or found_inf, a skip flag) where a kernel reads it."""
    return t if t is None or t.device == device else t.to(device, non_blocking=True)
