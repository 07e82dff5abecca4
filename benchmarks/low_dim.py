"""The induced-metric paper's low-dimensional problems (section 3.1): Rosenbrock, Beale, Himmelblau, Rastrigin
and Ackley in 2-D, every optimizer from the same start, a small learning-rate grid (and xi for the induced
metric), and the number of steps until f - f_min <= 1e-10.

Optimizers: the three induced-metric variants (cgd.InducedMetric: SGD metric, log-loss metric, RMS metric), CGD
(diagonal cgd.CGD and the exact cgd.FullCGD, a 2 x 2 covariance), torch.optim SGD (momentum 0.9), Adam, AdamW
and Muon. Muon is defined for matrices: the point is kept as a 1 x 2 matrix for every optimizer, and on a rank-1
matrix Muon's orthogonalised step is the unit vector along its (Nesterov) momentum, i.e. normalised gradient
descent with momentum, whose fixed step length cannot settle to 1e-10 without a schedule. AdamW's grid includes
weight decay 0 (which is Adam), because any decay moves the minimum. As in the paper, there is no batching, so the
induced metric's norm EMA uses beta = 0 (the current gradient).

    ./run.sh python benchmarks/low_dim.py [--steps 3000] [--out benchmarks/results]

Writes low_dim.md (best steps per function and optimizer, with the winning hyperparameters) and
low_dim_trajectories.png (each optimizer's best path on the function's contours).
"""

from __future__ import annotations

import argparse
import datetime
import math
import pathlib
import sys
import time
from collections.abc import Callable

import torch

import cgd

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
TARGET = 1e-10
LRS = (1e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
XIS = (0.1, 1.0, 10.0)


def rosenbrock(x, y):
    return (1 - x) ** 2 + 100 * (y - x**2) ** 2


def beale(x, y):
    return (1.5 - x + x * y) ** 2 + (2.25 - x + x * y**2) ** 2 + (2.625 - x + x * y**3) ** 2


def himmelblau(x, y):
    return (x**2 + y - 11) ** 2 + (x + y**2 - 7) ** 2


def rastrigin(x, y):
    return 20 + x**2 - 10 * torch.cos(2 * math.pi * x) + y**2 - 10 * torch.cos(2 * math.pi * y)


def ackley(x, y):
    r = torch.sqrt(0.5 * (x**2 + y**2))
    return -20 * torch.exp(-0.2 * r) - torch.exp(0.5 * (torch.cos(2 * math.pi * x) + torch.cos(2 * math.pi * y))) \
        + math.e + 20


# name: (function, start, f_min, plot window)
FUNCTIONS = {
    "Rosenbrock": (rosenbrock, (0.0, 0.5), 0.0, (-0.5, 1.5, -0.5, 1.5)),
    "Beale": (beale, (1.0, 1.0), 0.0, (-0.5, 4.0, -1.0, 2.0)),
    "Himmelblau": (himmelblau, (0.0, 0.0), 0.0, (-5.0, 5.0, -5.0, 5.0)),
    "Rastrigin": (rastrigin, (0.3, -0.4), 0.0, (-1.0, 1.0, -1.0, 1.0)),
    "Ackley": (ackley, (0.6, 0.6), 0.0, (-1.0, 1.0, -1.0, 1.0)),
}


def grid() -> dict[str, list[tuple[str, Callable]]]:
    """Per optimizer, its (label, factory) settings."""
    out: dict[str, list[tuple[str, Callable]]] = {}

    def add(name, label, make):
        out.setdefault(name, []).append((label, make))

    for lr in LRS:
        add("SGD (momentum 0.9)", f"lr {lr:g}", lambda p, lr=lr: torch.optim.SGD(p, lr=lr, momentum=0.9))
        add("Adam", f"lr {lr:g}", lambda p, lr=lr: torch.optim.Adam(p, lr=lr))
        for wd in (0.0, 1e-4):
            add("AdamW", f"lr {lr:g}, wd {wd:g}", lambda p, lr=lr, wd=wd: torch.optim.AdamW(p, lr=lr, weight_decay=wd))
        add("Muon", f"lr {lr:g}", lambda p, lr=lr: torch.optim.Muon(p, lr=lr, weight_decay=0.0))
        add("CGD (diagonal)", f"lr {lr:g}", lambda p, lr=lr: cgd.CGD(p, lr=lr))
        add("CGD (full)", f"lr {lr:g}", lambda p, lr=lr: cgd.FullCGD(p, lr=lr))
        for xi in XIS:
            label = f"lr {lr:g}, xi {xi:g}"
            add("Induced: SGD metric", label, lambda p, lr=lr, xi=xi: cgd.InducedMetric(p, lr=lr, xi=xi, beta=0.0))
            add("Induced: log-loss metric", label,
                lambda p, lr=lr, xi=xi: cgd.InducedMetric(p, lr=lr, xi=xi, beta=0.0, embedding="log"))
            add("Induced: RMS metric", label,
                lambda p, lr=lr, xi=xi: cgd.InducedMetric(p, lr=lr, xi=xi, beta=0.0, gamma="rms"))
    return out


def run(fn, start, f_min, make, steps: int) -> dict:
    point = torch.nn.Parameter(torch.tensor([start], dtype=torch.float32))
    opt = make([point])
    path, best = [tuple(start)], math.inf
    t0 = time.perf_counter()
    for step in range(steps + 1):
        gap = float(fn(*point.detach()[0].double())) - f_min
        best = min(best, gap) if math.isfinite(gap) else best
        if gap <= TARGET:
            return {"steps": step, "gap": gap, "best": best, "path": path, "seconds": time.perf_counter() - t0}
        if not gap < 1e8 or step == steps:  # diverged (or NaN), or out of budget
            break
        opt.zero_grad()
        loss = fn(point[0, 0], point[0, 1])
        loss.backward()
        if isinstance(opt, cgd.InducedMetric) and opt.embedding == "log" and not float(loss) > 0.0:
            break  # the float32 loss rounded to 0 short of the target: log(loss) cannot step further
        try:
            if isinstance(opt, cgd.InducedMetric):
                opt.step(loss=loss)
            else:
                opt.step()
        except cgd.NonFiniteGradientError:  # the float32 gradient overflowed: diverged
            break
        path.append(tuple(point.detach()[0].tolist()))
    return {"steps": None, "gap": gap, "best": best, "path": path, "seconds": time.perf_counter() - t0}


def pick(results: list[tuple[str, dict]]) -> tuple[str, dict]:
    """Fastest to the target; if none reaches it, the one that got closest."""
    reached = [(label, r) for label, r in results if r["steps"] is not None]
    if reached:
        return min(reached, key=lambda lr: lr[1]["steps"])
    return min(results, key=lambda lr: lr[1]["best"])


def plot(best: dict, out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(best), figsize=(5 * len(best), 5), squeeze=False)
    for ax, name in zip(axes[0], best):
        fn, start, _, (x0, x1, y0, y1) = FUNCTIONS[name]
        xs, ys = torch.meshgrid(torch.linspace(x0, x1, 300), torch.linspace(y0, y1, 300), indexing="xy")
        ax.contour(xs, ys, torch.log10(fn(xs, ys) + 1e-3), levels=30, cmap="Greys", linewidths=0.5)
        for opt_name, (_, r) in best[name].items():
            path = torch.tensor(r["path"])
            steps = r["steps"] if r["steps"] is not None else "-"
            ax.plot(path[:, 0], path[:, 1], lw=1, label=f"{opt_name} ({steps})")
        ax.plot(*start, "k*", ms=10)
        ax.set_xlim(x0, x1)
        ax.set_ylim(y0, y1)
        ax.set_title(name)
        ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3000, help="step budget per run")
    parser.add_argument("--functions", nargs="*", default=list(FUNCTIONS), choices=list(FUNCTIONS))
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    settings = grid()
    best: dict[str, dict[str, tuple[str, dict]]] = {}
    for name in args.functions:
        fn, start, f_min, _ = FUNCTIONS[name]
        best[name] = {}
        for opt_name, options in settings.items():
            results = [(label, run(fn, start, f_min, make, args.steps)) for label, make in options]
            best[name][opt_name] = pick(results)
            label, r = best[name][opt_name]
            print(f"{name:10s} {opt_name:26s} {label:22s} steps={r['steps']} best={r['best']:.2e}", file=sys.stderr)
    command = "./run.sh python benchmarks/low_dim.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = ["# Low-dimensional problems: steps to f - f_min <= 1e-10\n",
             f"CPU, torch {torch.__version__}, {datetime.date.today().isoformat()}, `{command.strip()}`\n",
             f"Budget {args.steps} steps per run; grid lr in {LRS}, xi in {XIS} for the induced metric (beta = 0), "
             "AdamW weight decay in (0, 1e-4); float32 parameters. Each cell: the fewest steps over the grid, or "
             "\"-\" and the smallest gap reached when no setting reached 1e-10; then the winning setting.\n"]
    lines += ["| optimizer | " + " | ".join(args.functions) + " |", "|---|" + "---|" * len(args.functions)]
    for opt_name in settings:
        cells = []
        for name in args.functions:
            label, r = best[name][opt_name]
            cells.append(f"{r['steps']} ({label})" if r["steps"] is not None else f"- ({r['best']:.1e}; {label})")
        lines.append(f"| {opt_name} | " + " | ".join(cells) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "low_dim.md").write_text("\n".join(lines) + "\n\n![trajectories](low_dim_trajectories.png)\n")
    plot(best, args.out / "low_dim_trajectories.png")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
