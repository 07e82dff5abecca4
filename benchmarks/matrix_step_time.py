"""Step time of the matrix metrics of cgd.FullCGD (block, kron, eigenbasis) against torch.optim.AdamW, and of
cgd.Muon against torch.optim.Muon on the same matrices, in one process.

Block mode for B in 8..64, kron mode and the eigenbasis metric with SOAP's settings for refresh_every in
1..100, and exact full CGD of one 2,000-element vector (steps/s), on GPT-2 small's parameter list on a GPU
(124M parameters in 148 tensors) or on a 4-layer, 128-wide character GPT's on a CPU. The time per step is the
mean over a window of steps that holds whole refresh periods, so refreshes are amortised as in training.
"vs AdamW" divides by AdamW's step time in the same run (fused on a GPU, foreach on a CPU). Configurations
whose state does not fit are reported with the size FullCGD refused.

    ./run.sh python benchmarks/matrix_step_time.py [--device cuda] [--out benchmarks/results/matrix_step_time.md]
"""

from __future__ import annotations

import argparse
import datetime
import math
import pathlib
import statistics
import sys
import time

import torch

import cgd
from step_time import emit_report, gpt2_small_shapes


def char_gpt_shapes(width: int = 128, layers: int = 4, vocab: int = 65, context: int = 256) -> list[tuple]:
    """The Shakespeare benchmark's model (tasks.py): token and position embeddings, per layer two norms, qkv,
    projection and a 4x MLP, a final norm and the output head."""
    d, shapes = width, [(vocab, width), (context, width)]
    for _ in range(layers):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,)]
    return shapes + [(d,), (d,), (vocab, d)]


def configurations(gpu: bool) -> list[tuple[str, dict]]:
    rows = [("AdamW fused" if gpu else "AdamW foreach", {})]
    # the matrices alone (Muon is meant for them), against torch.optim.Muon on the same ones; early on a GPU,
    # whose check has a time limit that the later rows may run into
    muon = [("torch.optim.Muon", dict(matrices=True)), ("cgd.Muon", dict(matrices=True))]
    rows += muon if gpu else []
    rows += [(f"block B={b}", dict(metric="block", block_size=b)) for b in (8, 16, 32, 64)]
    if not gpu:  # the eigendecompositions amortised as the kron rows' are (the paper refreshes every step)
        rows += [(f"block B={b} refresh=10", dict(metric="block", block_size=b, refresh_every=10)) for b in (8, 32)]
        # the CPU's two solvers side by side (solver="auto" picks one per block size)
        rows += [(f"block B={b} {solver}", dict(metric="block", block_size=b, solver=solver))
                 for b in (8, 16, 32, 64) for solver in ("eigh", "lanczos")]
    rows += [(f"kron refresh={k}", dict(metric="kron", refresh_every=k)) for k in (1, 10, 100)]
    rows += [(f"eigenbasis refresh={k}", dict(metric="eigenbasis", refresh_every=k, power=0.5, centered=False,
                                               bias_correction=True, m2_init=0.0)) for k in (1, 10, 100)]
    if not gpu:
        rows += [("pytorch_optimizer SOAP refresh=10", dict(refresh_every=10, soap=True))]  # in Python, for scale
    rows += [] if gpu else muon
    # exact full CGD of one 2,000-element vector (its own parameter, not the model's: "vs AdamW" is left out)
    rows += [("full n=2000", dict(metric="full", vector=2000))]
    return rows


def make(name: str, kwargs: dict, params: list, gpu: bool) -> torch.optim.Optimizer:
    if name.startswith("AdamW"):
        return torch.optim.AdamW(params, lr=1e-4, **({"fused": True} if gpu else {"foreach": True}))
    if name == "torch.optim.Muon":
        return torch.optim.Muon([p for p in params if p.dim() == 2], lr=1e-3)
    if kwargs.get("soap"):
        from pytorch_optimizer import SOAP

        return SOAP(params, lr=1e-4, precondition_frequency=kwargs["refresh_every"])
    if name == "cgd.Muon":
        return cgd.Muon([p for p in params if p.dim() == 2], lr=1e-3, nonfinite="ignore")
    return cgd.FullCGD(params, lr=1e-4, nonfinite="ignore", **{k: v for k, v in kwargs.items() if k != "vector"})


def timed_steps(opt: torch.optim.Optimizer, steps: int, gpu: bool, params: list, pool: list) -> float:
    """Mean seconds per step over `steps` consecutive steps, each taking the next gradient set of the pool."""
    if gpu:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for k in range(steps):
        for p, g in zip(params, pool[k % len(pool)]):
            p.grad = g
        opt.step()
    if gpu:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--window", type=int, default=None,
                        help="timed steps per configuration (default 100 on a GPU, 20 on a CPU; kron refresh=100 "
                             "always gets at least one whole period)")
    parser.add_argument("--shapes", choices=("gpt2", "char-gpt"), default=None,
                        help="parameter list (default gpt2 on a GPU, char-gpt on a CPU)")
    parser.add_argument("--only", nargs="*", default=None, help="run only these configuration names")
    parser.add_argument("--pool", type=int, default=16, help="independent gradient sets the steps cycle through")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    shapes = gpt2_small_shapes() if (args.shapes or ("gpt2" if gpu else "char-gpt")) == "gpt2" else char_gpt_shapes()
    window = args.window or (100 if gpu else 20)
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(s, generator=gen, device=device) * 0.02 for s in shapes]
    # Independent gradients cycled from a pool: over the paper's tau2 = 15.3 steps C has about that rank, as a
    # training run's does (one gradient repeated would leave C rank one, which flatters an iterative solver).
    pool = [[torch.randn(s, generator=gen, device=device) * 1e-3 for s in shapes] for _ in range(args.pool)]
    numel = sum(math.prod(s) for s in shapes)
    where = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    command = "benchmarks/matrix_step_time.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# Matrix-metric step time: FullCGD block, kron and eigenbasis, Muon, vs AdamW ({numel / 1e6:.1f}M parameters, "
             f"{len(shapes)} tensors)\n",
             f"{where}, torch {torch.__version__}, {datetime.date.today().isoformat()}, `{command.strip()}`\n",
             "Mean ms per step over whole refresh periods (AdamW: the median of five windows' means); state is "
             f"float32; the steps cycle through {args.pool} independent gradient sets (after one pass unmeasured). "
             "\"vs AdamW\" < 1 is faster.\n",
             "| optimizer | ms/step | vs AdamW | state (GiB) | note |", "|---|---|---|---|---|"]
    base = muon = None
    model = params, pool
    for name, kwargs in configurations(gpu):
        if args.only is not None and name not in args.only and not name.startswith("AdamW"):
            continue
        params, pool = model
        if kwargs.get("vector"):
            params = [torch.randn(kwargs["vector"], generator=gen, device=device) * 0.02]
            pool = [[torch.randn(kwargs["vector"], generator=gen, device=device) * 1e-3] for _ in range(args.pool)]
        for p, g in zip(params, pool[0]):
            p.grad = g
        try:
            opt = make(name, kwargs, params, gpu)
            opt.step()  # allocates the state and does the first refresh
            steps = max(window, kwargs.get("refresh_every", 1))
            if name.startswith("AdamW"):
                # The reference of every ratio: its median over five windows, so one noisy window does not
                # move them all.
                seconds = statistics.median(timed_steps(opt, steps, gpu, params, pool) for _ in range(5))
                steps *= 5
            else:
                timed_steps(opt, len(pool), gpu, params, pool)  # the moments see the whole pool first
                seconds = timed_steps(opt, steps, gpu, params, pool)
        except (RuntimeError, ValueError) as error:  # the memory check, or the device running out
            lines.append(f"| {name} | | | | refused: {str(error).splitlines()[0][:160]} |")
            print(lines[-1], file=sys.stderr)
            continue
        state = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values()
                    if isinstance(v, torch.Tensor))
        base = base or seconds
        note = f"{steps} steps" + (f", solver {opt.solver_stats()}" if isinstance(opt, cgd.FullCGD) else "")
        if kwargs.get("matrices"):
            muon = muon or seconds
            note += f", the {sum(p.dim() == 2 for p in params)} matrices only; {seconds / muon:.2f}x torch.optim.Muon"
        if kwargs.get("vector"):
            note += f", {1 / seconds:,.0f} steps/s with solver={opt._solver(opt.param_groups[0])!r}"
        ratio = "" if kwargs.get("vector") else f"{seconds / base:.2f}"
        lines.append(f"| {name} | {seconds * 1e3:.2f} | {ratio} | {state / 2**30:.2f} | {note} |")
        print(lines[-1], file=sys.stderr)
        del opt
        if gpu:
            torch.cuda.empty_cache()
    emit_report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
