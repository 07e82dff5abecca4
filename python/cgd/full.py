"""``cgd.FullCGD``: CGD with the full covariance metric (paper eq 4.9), exact or block-diagonal.

The maths runs in the C core (``torch.ops.cgd.block_step_``: LAPACK on the CPU, cuSOLVER/cuBLAS on CUDA); this
module lays a parameter group out as one vector of blocks, owns the state, the refresh schedule and the
diagnostics.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Iterable
from typing import Any

import torch

from . import _ops  # noqa: F401  (loads the operator library)
from ._distributed import full, is_dtensor, step_shard
from ._base import BaseOptimizer, mark_updated, on_device, overflow_limit, state_dtype, state_precision
from ._validate import bad, betas_from_tau, choice, in_range, number, pair, positive_int, validate_step_size

METRICS = ("full", "block", "kron", "eigenbasis")
# Metrics whose state is per tensor, read as a matrix (the rest lay a group out as one blocked vector).
_FACTORED = ("kron", "eigenbasis")
# 0: solved in the state's precision (float32, or float64 for float64 parameters); 1: float32 failed, float64 did not.
OUTCOMES = {-1: "never", 0: "solved", 1: "float64 retry", 2: "kept previous", 3: "diagonal fallback", 4: "lanczos"}
SOLVERS = ("auto", "eigh", "lanczos", "window")
_MAX_WINDOW = 1024  # capi/cgd.c: its (window + 1)-sided problems are solved in double every step
# Where Lanczos overtakes the batched Jacobi eigensolver on the CPU (benchmarks/matrix_step_time.py, 0.8M
# parameters, 2026-12-02: B = 8 Jacobi 59 ms, Lanczos 311 ms; B = 16 141 ms against 168 ms; B = 32 693 ms against
# 107 ms).
_LANCZOS_MIN_BLOCK = 17
_PAPER_TAU = (17.1, 15.3)  # Table 2, full CGD
_MAX_MATRIX = 46340  # capi/cgd.c: n^2 < 2^31


def _layout(numels: list[int], metric: str, block_size: int) -> tuple[list[int], int, int]:
    """Offsets of each tensor in the blocked vector, the block size and the number of blocks."""
    if metric == "full":
        offsets, total = [], 0
        for n in numels:
            offsets.append(total)
            total += n
        return offsets, max(total, 1), 1
    offsets, total = [], 0
    for n in numels:  # every tensor starts a new block: blocks never straddle two tensors
        offsets.append(total)
        total += -(-n // block_size) * block_size
    return offsets, block_size, max(total // block_size, 1)


def _full_sides(shape: tuple[int, ...], metric: str, max_factor_dim: int) -> tuple[bool, bool]:
    """Which sides of a tensor's matrix get a full factor: those of at most max_factor_dim; for the eigenbasis
    metric none of a vector's (as SOAP leaves 1-D tensors to Adam), so a vector there is diagonal CGD."""
    if metric == "eigenbasis" and len(shape) < 2:
        return False, False
    rows, cols = _matrix_shape(shape)
    return rows <= max_factor_dim, cols <= max_factor_dim


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The rows x cols matrix the Kronecker metric reads a tensor as: a conv weight is out_channels x the rest, a
    vector (or scalar) is a column, so its left factor is its full covariance."""
    numel = math.prod(shape)
    rows = shape[0] if len(shape) >= 2 else numel
    return rows, (numel // rows if rows else 0)


def state_bytes(shapes: list, metric: str = "full", block_size: int = 64, max_factor_dim: int = 4096,
                dtype: torch.dtype = torch.float32, solver: str = "eigh", window: int = 128) -> int:
    """Bytes of state FullCGD keeps for tensors of these shapes (or element counts, for "full"/"block") of this
    parameter dtype: state values are 8 bytes for float64 parameters, 4 bytes otherwise (the sizes below are for 4).

    full/block: M1 and the eigenvalues (4 bytes per coordinate each), M2 and the preconditioner P (4 * block bytes
    per coordinate each); with ``solver="lanczos"`` (the effective solver, not "auto") M1 and M2 only; with
    ``solver="window"`` M1 and ``window`` gradients (4 (window + 1) bytes per coordinate) and the window's Gram
    matrix (8 window^2 bytes). kron, per
    rows x cols tensor: M1 (rows * cols), and per side of n <= max_factor_dim its
    EMA factor and eigenbasis (n^2 each) and eigenvalues (n); a larger side keeps 2 n values. eigenbasis: as kron,
    plus the rotated second moment (rows * cols), with no full factor for a vector.
    """
    value_bytes = 8 if dtype == torch.float64 else 4
    if metric in _FACTORED:
        total = fixed = 0
        for shape in shapes:
            shape = (shape,) if isinstance(shape, int) else tuple(shape)
            rows, cols = _matrix_shape(shape)
            if rows * cols == 0:
                continue
            total += rows * cols * (2 if metric == "eigenbasis" else 1)
            fixed += 8 + 2 * 4 + 3 * 4  # the float64 step, two int32 outcomes, three float32 counters
            for n, full_side in zip((rows, cols), _full_sides(shape, metric, max_factor_dim)):
                total += 2 * n * n + n if full_side else 2 * n
        return value_bytes * total + fixed
    numels = [n if isinstance(n, int) else math.prod(n) for n in shapes]
    if solver == "window":
        n = max(sum(numels), 1)
        return value_bytes * (n + window * n) + 8 * window * window + 8 + 8 + 4 * 4
    _, block, nblocks = _layout(numels, metric, block_size)
    length = block * nblocks
    if solver == "lanczos":
        return value_bytes * (length + length * block + nblocks + 5)
    return value_bytes * (2 * length + 2 * length * block + nblocks + 5)


def _effective_rank(clamped: torch.Tensor) -> torch.Tensor:
    """(sum lambda)^2 / sum lambda^2 along the last dimension, 0 for an all-zero spectrum."""
    square_sum = (clamped**2).sum(-1)
    return torch.where(square_sum > 0, clamped.sum(-1) ** 2 / square_sum.clamp_min(1e-300),
                       torch.zeros_like(square_sum))


def _bias_corrections(group: dict[str, Any], state: dict[str, Any]) -> tuple[float, float]:
    """(1 - beta1^t, 1 - beta2^t) after the state's t steps with bias correction, else (1, 1): what the last step
    divided M1 and M2 by."""
    t = float(state["step"])
    if not group["bias_correction"] or t <= 0:
        return 1.0, 1.0
    beta1, beta2 = group["betas"]
    return 1.0 - beta1**t, 1.0 - beta2**t


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class FullCGD(BaseOptimizer):
    r"""Covariant Gradient Descent with the full (or block-diagonal) covariance metric, paper eq 4.9.

    For the vector q of all parameters of a group (``metric="full"``), or for each block of ``block_size``
    consecutive elements of each tensor (``metric="block"``)::

        M1 <- beta1 M1 + (1 - beta1) g           F = M1 (/ (1 - beta1^t) with bias_correction)
        M2 <- beta2 M2 + (1 - beta2) g g^T       S = M2 (/ (1 - beta2^t) with bias_correction)
        C  = S - F F^T   (centered=True; S with centered=False)
        q  <- q - lr (eps I + C)^(-power) F,  through C = V diag(lambda) V^T with lambda clamped at 0

    ``solver`` says how ``(eps I + C)^(-power) F`` is found ("window" also how M2 is kept). "eigh" eigendecomposes C
    every ``refresh_every``
    steps (1 = the paper's method) and in between multiplies the current F by the cached ``(eps I + C)^(-power)``:
    O(N^3) per refresh. "lanczos" (CPU) computes the direction itself every step by Lanczos on the Krylov space of
    C and F, in double: each iteration one product with M2, O(N^2), typically 5-40 iterations, converged to 1e-7
    relative (float32 state) where rounding M2 to float32 already moves the direction further; no cached P, so
    half the state. A run that needs more than 256 iterations takes that step's eigendecomposition instead
    (counted, :meth:`solver_stats`). "auto" (default) is "lanczos" on the CPU for blocks of 17 or more (and the
    full metric) with ``refresh_every=1``, and "eigh" otherwise (smaller blocks are eigendecomposed 16 at a time
    by a batched Jacobi solver, faster there; CUDA has batched eigensolvers). "window" (CPU, full metric, opt-in)
    keeps no N x N matrix: M2 as ``beta2^t m2_init I`` plus the terms of the last ``window`` gradients, and the
    direction exactly for that M2 through their Gram matrix, O(N window + window^3) per step. It equals eq 4.9
    until step ``window``; later it lacks the older terms (``beta2^window`` of the EMA's weight, but where the
    window does not span they were all of C: see the README for the measured direction error).

    ``metric="kron"`` is the mode for real networks (GPT, ResNet): each tensor, read as a rows x cols matrix G
    (conv weights as out_channels x the rest, vectors as a column), gets C approximated by the Kronecker product
    ``(L (x) R) / tr(R)`` of its partial traces ``L = EMA(G G^T) - F F^T`` and ``R = EMA(G^T G) - F^T F``.
    The direction ``(eps I + C)^(-power) F`` is then exact for that C through the factors' eigenbases (see the
    README's derivation); it equals full mode whenever the gradients' covariance is a Kronecker product. A side
    longer than ``max_factor_dim`` keeps only the diagonal of its factor.

    ``metric="eigenbasis"`` takes only the basis ``U (x) V`` from those factors' eigenvectors and
    keeps C's diagonal in that basis as its own EMA, ``V' <- beta2 V' + (1 - beta2) (U^T G V)^2``, so the metric
    is exact wherever the eigenvectors of C are Kronecker products, whatever its eigenvalues (the state's
    ``exp_avg`` is M1 in that basis, ``U^T M1 V``, which saves a rotation per step)::

        F' = U^T F V,   C' = V' / bc2 - F'^2 (centered) or V' / bc2,   q <- q - lr U [F' / (eps + C')^power] V^T

    A tensor's first step eigendecomposes its factors; after every ``refresh_every``-th step each basis moves
    by one power iteration, ``U <- qr(L U)``, its vectors ordered by ``u^T L u`` with ``V'`` following them, as
    SOAP does (Vyas et al. 2024). Vectors (and sides over ``max_factor_dim``) have the identity basis, so they
    step as diagonal CGD. SOAP is ``power=0.5, centered=False, bias_correction=True, m2_init=0`` with its
    ``refresh_every=10``, ``betas=(0.95, 0.95)``, ``weight_decay=0.01`` and ``eps`` small (ours sits inside the
    power: ``eps=1e-16`` is SOAP's 1e-8 added to the square root, to first order).

    Args:
        params: parameters or parameter groups. All parameters of a group must share device and dtype (float32,
            float16 or bfloat16 with float32 state and maths, or float64 with float64 state and maths) and have
            gradients on the same steps. Any memory layout steps (one other than contiguous costs a copy in and
            out per step): the metric reads a tensor in its logical, row-major order.
        lr: learning rate.
        betas / tau: EMA coefficients of M1 and M2, or the paper's timescales (beta = tau / (1 + tau)). Default:
            the paper's tuned full-CGD timescales tau = (17.1, 15.3) (Table 2).
        power: the exponent a in [0, 1]; default 0.4, the paper's tuned full-CGD value (Table 2).
        eps: regulariser, > 0.
        metric: "full" (one matrix over the whole group: exact; memory grows as N^2), "block" (each tensor cut
            into blocks of ``block_size``; memory 8 * block_size bytes per parameter), "kron" (Kronecker factors
            per tensor; memory 8 (rows^2 + cols^2) bytes per matrix) or "eigenbasis" (the kron factors' basis with
            a diagonal metric in it; 4 bytes per parameter more than kron).
        block_size: coordinates per block for ``metric="block"``.
        refresh_every: steps between eigendecompositions (solver "eigh"), or between the eigenbasis metric's
            basis refreshes.
        solver: "auto", "eigh", "lanczos" or "window" (full/block metrics; "window" full only; see above).
        window: the window solver's gradients, 1 to 1024.
        max_factor_dim: for ``metric="kron"`` and ``"eigenbasis"``, the longest side that gets a full factor (at
            most 46340).
        centered: use the covariance M2 - M1 M1^T (True, eq 4.9) or the second moment M2.
        bias_correction, m2_init: default is the paper's start M1 = 0, M2 = m2_init * I = I without bias
            correction. With Adam's start (m2_init=0, bias_correction=True) the first step's covariance is exactly
            0, so that step takes C = S (the raw moment) instead of stepping lr * eps^-power times the gradient.
        weight_decay: decoupled weight decay.
        maximize: ascend.
        nonfinite: what a NaN or Inf gradient (or one too large to square in the state) does: "raise" (default:
            one read of the gradients before the step and one host synchronisation, then an error naming the
            parameters, nothing changed), "skip" (the same read, decided on the device: the step is skipped
            whole, counted in :attr:`skipped_steps`) or "ignore" (nothing is checked).
        max_state_bytes: refuse, before allocating, state larger than this (default: the free memory of the
            device).

    Memory per group of N parameters: ``metric="full"`` 8 N^2 + 8 N bytes (4 N^2 + 4 N with the Lanczos solver,
    4 (window + 1) N + 8 window^2 with the window solver);
    ``metric="block"`` about 8 * block_size * N bytes (plus padding of each tensor to a multiple of block_size);
    ``metric="kron"`` 4 N + 8 (rows^2 + cols^2) per tensor; ``metric="eigenbasis"`` 8 N + 8 (rows^2 + cols^2) per
    matrix (8 N for a vector). See :func:`state_bytes`.
    """

    _INT_KEYS = ("outcome",)
    _FLOAT32_KEYS = ("counters",)
    _FLOAT64_KEYS = ("gram", "identity")  # the window solver's Gram matrix and M2's coefficient of I

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-2,
        betas: tuple[float, float] | None = None,
        *,
        tau: tuple[float, float] | None = None,
        power: float = 0.4,
        eps: float = 1e-8,
        metric: str = "full",
        block_size: int = 64,
        refresh_every: int = 1,
        solver: str = "auto",
        window: int = 128,
        max_factor_dim: int = 4096,
        centered: bool = True,
        bias_correction: bool = False,
        m2_init: float = 1.0,
        weight_decay: float = 0.0,
        maximize: bool = False,
        nonfinite: str | None = None,
        max_state_bytes: int | None = None,
    ) -> None:
        if betas is not None and tau is not None:
            raise bad("tau", tau, "pass either betas or tau, not both")
        if betas is None:
            betas = betas_from_tau(_PAPER_TAU if tau is None else tau)
        self.max_state_bytes = max_state_bytes
        if max_state_bytes is not None and (isinstance(max_state_bytes, bool) or not isinstance(max_state_bytes, int)
                                            or max_state_bytes < 0):
            raise bad("max_state_bytes", max_state_bytes, "must be None (the device's free memory) or an integer "
                       "number of bytes >= 0")
        defaults = dict(lr=lr, betas=pair("betas", betas), power=power, eps=eps, metric=metric, block_size=block_size,
                        refresh_every=refresh_every, solver=solver, window=window, max_factor_dim=max_factor_dim,
                        centered=centered,
                        bias_correction=bias_correction, m2_init=m2_init, weight_decay=weight_decay, maximize=maximize)
        self._init_base(params, defaults, nonfinite, capturable=False)

    def _check_group(self, gi: int, group: dict[str, Any]) -> None:
        self._validate(group)
        super()._check_group(gi, group)
        params = group["params"]
        for j, p in enumerate(params):
            if p.device != params[0].device or p.dtype != params[0].dtype:
                raise ValueError(f"cgd: parameter {self._label(gi, j)} is {p.dtype} on {p.device} but the group's "
                                 f"first is {params[0].dtype} on {params[0].device}; FullCGD couples the parameters "
                                 "of a group, so put other devices/dtypes in their own groups")
        self._check_memory(group)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        # cuSOLVER/cuBLAS handles are made now, on this thread: made on a first step inside a CUDA-graph capture
        # they would allocate and break it.
        for device in {p.device for p in self.param_groups[-1]["params"] if p.device.type == "cuda"}:
            torch.ops.cgd.prepare(device)

    @staticmethod
    def _validate(group: dict[str, Any]) -> None:
        validate_step_size(group)
        eps = number("eps", group["eps"])
        if not eps > 0.0:
            raise bad("eps", group["eps"], "must be > 0: a covariance is only semi-definite")
        power = in_range("power", group["power"], 0.0, 1.0, hi_open=False)
        # On a direction the covariance does not reach, the metric's inverse is eps^-power: it must be finite in
        # the state's precision, or the preconditioner holds Inf and the step NaN.
        precision = state_precision(group["params"])
        if power > 0.0 and math.log(eps) * -power >= math.log(torch.finfo(precision).max):
            raise bad("eps", group["eps"], f"with power = {power:g} the metric's inverse on a direction without "
                       f"variance, eps^-power = {math.exp(-power * math.log(eps)):.3g}, overflows the "
                       f"{str(precision).removeprefix('torch.')} state; raise eps")
        in_range("weight_decay", group["weight_decay"], 0.0)
        in_range("m2_init", group["m2_init"], 0.0)
        if group["metric"] not in METRICS:
            raise bad("metric", group["metric"], f"must be one of {METRICS} (the diagonal metric is cgd.CGD)")
        for key in ("block_size", "refresh_every", "max_factor_dim", "window"):
            positive_int(key, group[key])
        if group["window"] > _MAX_WINDOW:
            raise bad("window", group["window"], f"must be <= {_MAX_WINDOW} (its (window + 1)-sided problems are "
                       "solved every step)")
        if group["max_factor_dim"] > _MAX_MATRIX:
            raise bad("max_factor_dim", group["max_factor_dim"], f"must be <= {_MAX_MATRIX} (the eigensolvers' "
                       "int32 sizes)")
        # Refused here, before the first step allocates two matrices of that side (17 GB at the cap).
        if group["metric"] == "block" and group["block_size"] > _MAX_MATRIX:
            raise bad("block_size", group["block_size"], f"must be <= {_MAX_MATRIX} (the eigensolvers' int32 "
                       "sizes)")
        total = sum(p.numel() for p in group.get("params", ()))
        solver = choice("solver", group["solver"], SOLVERS)
        if solver == "window" and group["metric"] != "full":
            raise bad("solver", solver, f"applies to metric='full' (it keeps the full M2 as a window of gradients); "
                       f"metric={group['metric']!r} keeps its own state")
        if solver == "window" and group["refresh_every"] != 1:
            raise bad("solver", solver, f"computes the direction every step, so refresh_every = "
                       f"{group['refresh_every']} has nothing to cache; use refresh_every=1")
        if group["metric"] == "full" and total > _MAX_MATRIX and solver != "window":
            raise bad("metric", "full", f"over {total:,} parameters needs one {total:,}-sided matrix, but the "
                       f"eigensolvers take at most {_MAX_MATRIX} (int32 sizes): use solver='window', metric='block' or "
                       "'kron'")
        if solver == "lanczos" and group["metric"] in _FACTORED:
            raise bad("solver", solver, f"applies to metric='full' or 'block'; metric={group['metric']!r} "
                       "eigendecomposes its factors (use solver='auto' or 'eigh')")
        if solver == "lanczos" and group["refresh_every"] != 1:
            raise bad("solver", solver, f"computes the direction every step, so refresh_every = "
                       f"{group['refresh_every']} has nothing to cache; use refresh_every=1 or solver='eigh'")
        devices = {p.device.type for p in group.get("params", ())}
        if solver in ("lanczos", "window") and devices - {"cpu"}:
            raise bad("solver", solver, f"runs on the CPU only, but the group is on {sorted(devices)}; use "
                       "solver='auto' or 'eigh' there")

    @staticmethod
    def _solver(group: dict[str, Any]) -> str:
        """The solver a full/block group steps with: "auto" takes Lanczos where it beats an eigendecomposition per
        step (one large block on the CPU, refreshed every step)."""
        if group["solver"] != "auto":
            return group["solver"]
        params = group["params"]
        side = group["block_size"] if group["metric"] == "block" else sum(p.numel() for p in params)
        on_cpu = bool(params) and params[0].device.type == "cpu"
        fits = group["metric"] not in _FACTORED and side >= _LANCZOS_MIN_BLOCK and group["refresh_every"] == 1
        return "lanczos" if on_cpu and fits else "eigh"

    def _check_memory(self, group: dict[str, Any]) -> None:
        params = group["params"]
        if not params:
            return
        need = state_bytes([p.shape for p in params], group["metric"], group["block_size"], group["max_factor_dim"],
                           params[0].dtype, self._solver(group), group["window"])
        limit = self.max_state_bytes if self.max_state_bytes is not None else _available_bytes(params[0].device)
        if need > limit:
            n = sum(p.numel() for p in params)
            raise ValueError(
                f"cgd: metric={group['metric']!r} over {n:,} parameters needs {need / 2**30:.2f} GiB of optimizer "
                f"state but {limit / 2**30:.2f} GiB are available on {params[0].device}; use metric='kron' (with a "
                "smaller max_factor_dim), metric='block' with a smaller block_size, or cgd.CGD (diagonal, 8 bytes "
                "per parameter)"
            )

    # ---- the step ----

    def _step(self, loss: Any) -> Any:
        work = []
        for gi, group in enumerate(self.param_groups):
            self._validate(group)
            params = group["params"]
            present = self._gradients(gi, group)
            if not present:
                continue
            if len(present) != len(params) and group["metric"] not in _FACTORED:
                have = {j for j, _, _ in present}
                missing = [self._label(gi, j) for j in range(len(params)) if j not in have]
                raise RuntimeError(f"cgd: FullCGD couples a group's parameters, but {', '.join(missing)} got no "
                                   "gradient this step; give them their own group, or freeze them")
            grads: list[torch.Tensor | None] = [None] * len(params)
            for j, _, g in present:
                grads[j] = full(g).contiguous()  # FSDP2: the metric couples elements across shards, so gathered
            # What the kernels update, in the logical (row-major) order the metric reads: the parameter itself; a
            # dense copy of one in another layout (channels_last, a transpose), written back after the step; or
            # for a DTensor a zero stand-in of its full shape that receives -lr * direction, later added to the
            # local shard.
            targets = [torch.zeros(p.shape, dtype=p.dtype, device=p.device) if is_dtensor(p) else p.contiguous()
                       for p in params]
            work.append((gi, group, grads, targets))
        found_inf = self._skip_flag(lambda: self._nonfinite_checks(work))
        grad_scale = getattr(self, "grad_scale", None)
        for _, group, grads, targets in work:
            self._step_group(group, grads, targets, grad_scale, found_inf)
            self._add_to_shards(group, targets, found_inf)
            for p, target in zip(group["params"], targets):
                if target is not p and not is_dtensor(p) and p.grad is not None:
                    p.copy_(target)
        mark_updated(p for _, group, grads, _ in work for p, g in zip(group["params"], grads) if g is not None)
        return loss

    @staticmethod
    def _add_to_shards(group: dict[str, Any], targets: list[torch.Tensor], found_inf) -> None:
        """DTensor parameters: p <- p (1 - lr wd) - lr direction on each rank's shard. Every rank computed the same
        full direction from the same gathered gradients, so the shards stay one consistent tensor."""
        decay = 1.0 - number("lr", group["lr"]) * float(group["weight_decay"])
        for p, target in zip(group["params"], targets):
            if is_dtensor(p) and p.grad is not None:
                step_shard(p, target, decay, found_inf)

    def _nonfinite_checks(self, work: list[tuple[int, dict[str, Any], list, list]]) -> list[tuple]:
        """The gradients for the non-finite policy (BaseOptimizer._skip_flag). They are whole on every rank
        (gathered in _step), so the decision needs no collective."""
        checks = []
        for gi, group, grads, _ in work:
            js = [j for j, g in enumerate(grads) if g is not None]
            checks.append(([(gi, j) for j in js], [grads[j] for j in js], self._overflow_limits(group, js), []))
        return checks

    @staticmethod
    def _overflow_limits(group: dict[str, Any], js: list[int]) -> list[float]:
        """The non-finite check's limit for parameters js of a group: a Kronecker factor's entry sums a side's
        worth of gradient squares; an eigenvalue of a block's covariance sums the block's (all coordinates of the
        group for the full metric)."""
        params = group["params"]
        if group["metric"] in _FACTORED:
            return [overflow_limit(params[j], max(_matrix_shape(tuple(params[j].shape)))) for j in js]
        side = group["block_size"] if group["metric"] == "block" else sum(p.numel() for p in params)
        return [overflow_limit(params[j], side) for j in js]

    def _translate_state_dict(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """A FullCGD state dict saved before the solver or window options existed loads with their defaults,
        solver="auto" and window=128."""
        groups = state_dict["param_groups"]
        if all("metric" in g for g in groups) and any("solver" not in g or "window" not in g for g in groups):
            state_dict = {**state_dict, "param_groups": [{"solver": "auto", "window": 128, **g} for g in groups]}
        return super()._translate_state_dict(state_dict)

    _BLOCK_KEYS = ("exp_avg", "exp_avg_sq", "precond", "eigvals", "step", "outcome", "counters", "calls")
    _KRON_KEYS = ("exp_avg", "left_sq", "right_sq", "left_basis", "right_basis", "left_eig", "right_eig", "step",
                  "outcome", "counters")
    _EIGENBASIS_KEYS = _KRON_KEYS[:7] + ("rotated_sq",) + _KRON_KEYS[7:]
    _WINDOW_KEYS = ("exp_avg", "history", "gram", "identity", "step", "counters")

    def _required_state(self, group: dict[str, Any], j: int, saved: dict[str, Any]) -> tuple[str, ...]:
        # full/block: the group's state lives under its first parameter; kron/eigenbasis: each tensor's own, and
        # the group's refresh count ("calls") under the first parameter, which may hold nothing else.
        if group["metric"] not in _FACTORED:
            if j:
                return ()
            return self._WINDOW_KEYS if group.get("solver") == "window" else self._BLOCK_KEYS
        keys = self._EIGENBASIS_KEYS if group["metric"] == "eigenbasis" else self._KRON_KEYS
        return keys + (("calls",) if j == 0 else ()) if set(saved) - {"calls"} else ("calls",)

    def _group_state(self, group: dict[str, Any]) -> tuple[dict[str, Any], tuple[list[int], int, int]]:
        """The group's block state, kept under its first parameter so state_dict() saves it, and its layout."""
        params = group["params"]
        state = self.state[params[0]]
        offsets, block, nblocks = _layout([p.numel() for p in params], group["metric"], group["block_size"])
        device, length = params[0].device, block * nblocks
        real = dict(dtype=state_dtype(params[0]), device=device)
        lanczos = self._solver(group) == "lanczos"
        if "history" in state:
            raise ValueError("cgd: the saved state is of the window solver; keep solver='window', or start this "
                             "solver from a fresh optimizer")
        if "precond" not in state:
            self._check_memory(group)
            state["exp_avg"] = torch.zeros(length, **real)
            m2 = torch.zeros(nblocks, block, block, **real)
            m2.diagonal(dim1=1, dim2=2).fill_(group["m2_init"])  # the paper's M2(0) = I (eq 4.4), scaled
            state["exp_avg_sq"] = m2
            state["step"] = torch.zeros((), dtype=torch.float64, device=device)
            state["outcome"] = torch.full((nblocks,), -1, dtype=torch.int32, device=device)
            state["counters"] = torch.zeros(4, dtype=torch.float32, device=device)
            state["calls"] = 0
        elif state["exp_avg_sq"].shape != (nblocks, block, block):
            raise ValueError(f"cgd: the saved state has blocks {tuple(state['exp_avg_sq'].shape)} but this group's "
                             f"layout needs {(nblocks, block, block)}: metric or block_size changed")
        if state["counters"].numel() == 3:  # saved before the Lanczos solver's counter
            state["counters"] = torch.cat([state["counters"], state["counters"].new_zeros(1)])
        # The Lanczos solver keeps no P; a group that moves to the eigendecomposition gets one at its next step,
        # which then refreshes.
        if lanczos or "precond" not in state or state["precond"].numel() == 0:
            size = (0,) if lanczos else (nblocks, block, block)
            if "precond" not in state or tuple(state["precond"].shape) != size:
                state["precond"] = torch.zeros(size, **real)
                state["eigvals"] = torch.zeros((0,) if lanczos else (nblocks, block), **real)
                state["calls"] = 0
        return state, (offsets, block, nblocks)

    def _step_group(self, group, grads, targets, grad_scale, found_inf) -> None:
        if group["metric"] in _FACTORED:
            self._step_kron(group, grads, targets, grad_scale, found_inf)
            return
        if self._solver(group) == "window":
            self._step_window(group, grads, targets, grad_scale, found_inf)
            return
        params = group["params"]
        state, (offsets, block, nblocks) = self._group_state(group)
        device = params[0].device
        refresh = state["calls"] % group["refresh_every"] == 0
        beta1, beta2 = group["betas"]
        solver = self._solver(group)
        torch.ops.cgd.block_step_(
            targets, grads, offsets, state["exp_avg"], state["exp_avg_sq"], state["precond"], state["eigvals"],
            state["step"], state["outcome"], state["counters"],
            block=block, nblocks=nblocks, lr=number("lr", group["lr"]), beta1=float(beta1), beta2=float(beta2),
            power=float(group["power"]), eps=float(group["eps"]), weight_decay=float(group["weight_decay"]),
            centered=bool(group["centered"]), bias_correction=bool(group["bias_correction"]),
            maximize=bool(group["maximize"]), refresh=refresh, solver=solver,
            grad_scale=on_device(grad_scale, device), found_inf=on_device(found_inf, device),
        )
        state["calls"] += 1

    def _window_state(self, group: dict[str, Any]) -> tuple[dict[str, Any], list[int], int]:
        """The window solver's state, under the group's first parameter, its offsets and its length."""
        params = group["params"]
        state = self.state[params[0]]
        offsets, n, _ = _layout([p.numel() for p in params], "full", 1)
        window = int(group["window"])
        if "history" not in state:
            if "exp_avg" in state:
                raise ValueError("cgd: the saved state is of another full-metric solver (it has no window "
                                 "history); keep its solver, or start the window solver from a fresh optimizer")
            self._check_memory(group)
            device = params[0].device
            real = dict(dtype=state_dtype(params[0]), device=device)
            state["exp_avg"] = torch.zeros(n, **real)
            state["history"] = torch.zeros(window, n, **real)
            state["gram"] = torch.zeros(window, window, dtype=torch.float64, device=device)
            state["identity"] = torch.tensor(float(group["m2_init"]), dtype=torch.float64, device=device)
            state["step"] = torch.zeros((), dtype=torch.float64, device=device)
            state["counters"] = torch.zeros(4, dtype=torch.float32, device=device)
        elif tuple(state["history"].shape) != (window, n):
            raise ValueError(f"cgd: the saved window history is {tuple(state['history'].shape)} but this group needs "
                             f"{(window, n)}: window or the parameters changed")
        return state, offsets, window

    def _step_window(self, group, grads, targets, grad_scale, found_inf) -> None:
        state, offsets, window = self._window_state(group)
        device = group["params"][0].device
        beta1, beta2 = group["betas"]
        torch.ops.cgd.window_step_(
            targets, grads, offsets, state["exp_avg"], state["history"], state["gram"], state["identity"],
            state["step"], state["counters"], window=window, lr=number("lr", group["lr"]), beta1=float(beta1),
            beta2=float(beta2), power=float(group["power"]), eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), centered=bool(group["centered"]),
            bias_correction=bool(group["bias_correction"]), maximize=bool(group["maximize"]),
            grad_scale=on_device(grad_scale, device), found_inf=on_device(found_inf, device),
        )

    def _kron_state(self, group: dict[str, Any], p: torch.Tensor) -> dict[str, Any]:
        """One tensor's Kronecker state; a side of n <= max_factor_dim gets n x n matrices, a longer one vectors
        and an empty basis. M2(0) = m2_init * I has the partial traces m2_init * cols * I and m2_init * rows * I,
        and in any orthonormal basis the diagonal m2_init (the eigenbasis metric's rotated second moment)."""
        state = self.state[p]
        rows, cols = _matrix_shape(tuple(p.shape))
        eigenbasis = group["metric"] == "eigenbasis"
        if "left_sq" in state:
            if tuple(state["exp_avg"].shape) != (rows, cols):
                raise ValueError(f"cgd: the saved state of {tuple(state['exp_avg'].shape)} does not match the "
                                 f"parameter's {rows} x {cols} matrix")
            if eigenbasis != ("rotated_sq" in state):
                raise ValueError("cgd: the saved state is of metric "
                                 f"{'kron' if eigenbasis else 'eigenbasis'!r} but this group has {group['metric']!r}")
            return state
        real = dict(dtype=state_dtype(p), device=p.device)
        init = float(group["m2_init"])
        state["exp_avg"] = torch.zeros(rows, cols, **real)
        sides = _full_sides(tuple(p.shape), group["metric"], group["max_factor_dim"])
        for (side, n, other), full_side in zip((("left", rows, cols), ("right", cols, rows)), sides):
            if full_side:
                state[f"{side}_sq"] = torch.eye(n, **real).mul_(init * other)
                state[f"{side}_basis"] = torch.eye(n, **real)
            else:
                state[f"{side}_sq"] = torch.full((n,), init * other, **real)
                state[f"{side}_basis"] = torch.zeros(0, **real)
        # Until its first refresh (which an AMP-skipped step can postpone) a tensor's metric is the initial one,
        # (eps + m2_init)^power I: mu = m2_init * cols and the normalised nu = 1 / cols give mu nu = m2_init.
        state["left_eig"] = torch.full((rows,), init * cols, **real)
        state["right_eig"] = torch.full((cols,), 1.0 / cols, **real)
        if eigenbasis:
            state["rotated_sq"] = torch.full((rows, cols), init, **real)
        state["step"] = torch.zeros((), dtype=torch.float64, device=p.device)
        state["outcome"] = torch.full((2,), -1, dtype=torch.int32, device=p.device)
        state["counters"] = torch.zeros(3, dtype=torch.float32, device=p.device)
        return state

    def _step_kron(self, group, grads, targets, grad_scale, found_inf) -> None:
        live = [(p, g) for p, g in zip(group["params"], grads) if g is not None and p.numel() > 0]
        stand_in = {id(p): t for p, t in zip(group["params"], targets)}
        if not live:
            return
        fresh = not all("left_sq" in self.state[p] for p, _ in live)
        if fresh:
            self._check_memory(group)
        states = [self._kron_state(group, p) for p, _ in live]
        calls = self.state[group["params"][0]].setdefault("calls", 0)
        if group["metric"] == "eigenbasis":
            # SOAP's schedule: a basis moves after every refresh_every-th step, and a tensor's first step builds its
            # own (in the kernel).
            refresh = (calls + 1) % group["refresh_every"] == 0
            keys, op = self._EIGENBASIS_KEYS, torch.ops.cgd.eigenbasis_step_
        else:
            # The schedule is the group's; a tensor whose first step falls between refreshes refreshes anyway.
            refresh = calls % group["refresh_every"] == 0 or fresh
            keys, op = self._KRON_KEYS, torch.ops.cgd.kron_step_
        device = live[0][0].device
        beta1, beta2 = group["betas"]
        extra = {}
        if group["metric"] == "eigenbasis":
            extra["may_be_first"] = [int(not self._started(st)) for st in states]
        op(
            [stand_in[id(p)] for p, _ in live], [g for _, g in live], *([st[k] for st in states] for k in keys),
            lr=number("lr", group["lr"]), beta1=float(beta1), beta2=float(beta2), power=float(group["power"]),
            eps=float(group["eps"]), weight_decay=float(group["weight_decay"]), centered=bool(group["centered"]),
            bias_correction=bool(group["bias_correction"]), maximize=bool(group["maximize"]), refresh=refresh,
            grad_scale=on_device(grad_scale, device), found_inf=on_device(found_inf, device), **extra,
        )
        if group["metric"] == "eigenbasis":
            for st in states:
                self._note_started(st, found_inf is None)
        self.state[group["params"][0]]["calls"] = calls + 1

    def _started(self, state: dict[str, Any]) -> bool:
        """Whether the tensor's first eigenbasis step is known to have happened (its outcome left NEVER): only then
        may the CUDA kernel skip the first basis's eigendecomposition. The knowledge is keyed by the state's
        outcome tensor (by identity, held weakly), so a loaded state starts unknown. On the CPU the outcome is
        read directly; on CUDA a step that could not be skipped on the device settles it, and otherwise a copy of
        the outcome made without waiting is read once it has arrived, so no step waits for the device."""
        outcome = state["outcome"]
        known = self._start_record(outcome)
        if known is True:
            return True
        if outcome.device.type == "cpu":
            known = bool(outcome[0] != -1 or outcome[1] != -1)
        elif known is not None:  # (host copy, event) of an earlier step's outcome
            copy, event = known
            known = True if event.query() and bool(copy[0] != -1 or copy[1] != -1) else known
        self.__dict__["_eigenbasis_started"][id(outcome)] = (weakref.ref(outcome), known)
        return known is True

    def _start_record(self, outcome: torch.Tensor) -> Any:
        """What is known of this outcome tensor's first step: True, a pending (copy, event), or None."""
        records = self.__dict__.setdefault("_eigenbasis_started", {})
        entry = records.get(id(outcome))
        return entry[1] if entry is not None and entry[0]() is outcome else None

    def _note_started(self, state: dict[str, Any], applied: bool) -> None:
        """After an eigenbasis step: a step that no device flag could skip has made the first basis (CUDA)."""
        outcome = state["outcome"]
        if outcome.device.type == "cpu" or self._start_record(outcome) is True:
            return
        if applied:
            known = True
        else:
            copy = torch.empty(2, dtype=outcome.dtype, pin_memory=True)
            copy.copy_(outcome, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            known = (copy, event)
        self.__dict__["_eigenbasis_started"][id(outcome)] = (weakref.ref(outcome), known)

    # ---- diagnostics ----

    def solver_stats(self) -> dict[str, int]:
        """Cumulative eigensolver failures over all groups, by the rung of the ladder that caught them, and the
        Lanczos runs that did not converge in 256 iterations and took that step's eigendecomposition."""
        totals = [0.0, 0.0, 0.0, 0.0]
        for state in self.state.values():
            if "counters" in state:
                for k, value in enumerate(state["counters"].tolist()):
                    totals[k] += float(value)
        return {"float64_retries": int(totals[0]), "kept_previous": int(totals[1]),
                "diagonal_fallbacks": int(totals[2]), "lanczos_fallbacks": int(totals[3])}

    def metric_spectrum(self, top_k: int = 10) -> list[dict[str, Any]]:
        """Per group, the spectrum of C at the last refresh (the paper's Fig 2, right).

        full/block groups: one dict with ``eigenvalues`` (nblocks x block, descending; under the Lanczos solver,
        which keeps no spectrum, those of the current C, computed here by ``torch.linalg.eigvalsh``), ``top`` (the
        ``top_k`` largest per block), ``min``, ``condition`` ((eps + max) / (eps + max(min, 0))), ``effective_rank``
        ((sum lambda)^2 / sum lambda^2 over the clamped eigenvalues), ``outcome`` (how each block's last refresh
        went, see ``cgd.full.OUTCOMES``). Padding coordinates of a block contribute zero eigenvalues. Groups of
        the window solver are not listed (their C is N-sided and never formed).

        kron groups: one dict with ``tensors``, a list with per stepped tensor its ``param`` label, ``shape``
        (rows, cols), and ``top``, ``min``, ``condition``, ``effective_rank`` of C's eigenvalues mu_i nu_j (the
        products of the factors' clamped spectra; the effective rank of a Kronecker product is the product of
        the factors' effective ranks) and ``outcome`` (left, right).

        eigenbasis groups: as kron, with C's eigenvalues those the metric uses, the entries of
        ``C' = V' / bc2 (- F'^2 when centered)`` in the current basis (computed here from the state).
        """
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise bad("top_k", top_k, "must be an integer >= 0")
        out = []
        for gi, group in enumerate(self.param_groups):
            eps = float(group["eps"])
            if group["metric"] in _FACTORED:
                spectrum = self._kron_spectrum if group["metric"] == "kron" else self._eigenbasis_spectrum
                tensors = [spectrum(gi, j, top_k, eps) for j, p in enumerate(group["params"])
                           if "left_eig" in self.state.get(p, {})]
                if tensors:
                    out.append({"group": gi, "tensors": tensors})
                continue
            state = self.state.get(group["params"][0]) if group["params"] else None
            if not state or "eigvals" not in state:
                continue
            lam = (self._current_spectrum(group, state) if state["eigvals"].numel() == 0 else
                   state["eigvals"].detach().to("cpu", torch.float64)).flip(-1)
            clamped = lam.clamp_min(0.0)
            out.append({
                "group": gi,
                "eigenvalues": lam,
                "top": lam[:, :top_k],
                "min": lam[:, -1],
                "condition": (eps + lam[:, 0]) / (eps + clamped[:, -1]),
                "effective_rank": _effective_rank(clamped),
                "outcome": [OUTCOMES[int(o)] for o in state["outcome"].tolist()],
            })
        return out

    @staticmethod
    def _current_spectrum(group: dict[str, Any], state: dict[str, Any]) -> torch.Tensor:
        """Eigenvalues (ascending) of each block's C = M2 / bc2 - F F^T (or M2 / bc2) after the last step."""
        bc1, bc2 = _bias_corrections(group, state)
        m2 = state["exp_avg_sq"].detach().to("cpu", torch.float64) / bc2
        force = state["exp_avg"].detach().to("cpu", torch.float64).view(m2.shape[0], -1) / bc1
        if group["centered"]:
            m2 = m2 - force.unsqueeze(-1) * force.unsqueeze(-2)
        return torch.linalg.eigvalsh(m2)

    def _eigenbasis_spectrum(self, gi: int, j: int, top_k: int, eps: float) -> dict[str, Any]:
        group = self.param_groups[gi]
        state = self.state[group["params"][j]]
        bc1, bc2 = _bias_corrections(group, state)
        c = state["rotated_sq"].detach().to("cpu", torch.float64) / bc2
        if group["centered"]:  # exp_avg is M1 in the eigenbasis already
            c = c - (state["exp_avg"].detach().to("cpu", torch.float64) / bc1) ** 2
        lam = c.clamp_min(0.0).flatten().sort(descending=True).values
        return {
            "param": self._label(gi, j),
            "shape": tuple(state["exp_avg"].shape),
            "top": lam[:top_k],
            "min": float(lam[-1]),
            "condition": (eps + float(lam[0])) / (eps + float(lam[-1])),
            "effective_rank": float(_effective_rank(lam)),
            "outcome": tuple(OUTCOMES[int(o)] for o in state["outcome"].tolist()),
        }

    def _kron_spectrum(self, gi: int, j: int, top_k: int, eps: float) -> dict[str, Any]:
        state = self.state[self.param_groups[gi]["params"][j]]
        mu = state["left_eig"].detach().to("cpu", torch.float64).clamp_min(0.0).sort(descending=True).values
        nu = state["right_eig"].detach().to("cpu", torch.float64).clamp_min(0.0).sort(descending=True).values
        # The k largest products lie among the products of the k largest of each factor.
        top = torch.outer(mu[:top_k], nu[:top_k]).flatten().sort(descending=True).values[:top_k]
        smallest = float(mu[-1] * nu[-1])
        return {
            "param": self._label(gi, j),
            "shape": tuple(state["exp_avg"].shape),
            "top": top,
            "min": smallest,
            "condition": (eps + float(mu[0] * nu[0])) / (eps + smallest),  # the largest product, whatever top_k
            "effective_rank": float(_effective_rank(mu) * _effective_rank(nu)),
            "outcome": tuple(OUTCOMES[int(o)] for o in state["outcome"].tolist()),
        }
