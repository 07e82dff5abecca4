"""The CGD paper's multiplication task (arXiv 2504.05279, section 5, Table 2, Fig 2): regress f(x, y) = x y
with the paper's unconstrained network (eq 2.3): 23 tanh neurons (2 input, 20 bulk, 1 output), all-to-all
weights w (23 x 23) and biases, iterated L = 5 times; the inputs are clamped onto the two input neurons at the
start and the output neuron is read after the last iteration. Every optimizer uses Table 2's hyperparameters and
the same initial weights and batches per seed.

    ./run.sh python benchmarks/multiplication.py --steps 1000 --seeds 5

Writes benchmarks/results/multiplication.md (final loss mean and spread), multiplication_loss.png (mean loss
curves) and multiplication_eigenvalues.png (the 10 largest eigenvalues of full CGD's covariance over training,
the paper's Fig 2 right).
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import statistics
import sys
import time

import torch

import cgd

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
NEURONS, INPUTS, DEPTH = 23, 2, 5


class Unconstrained(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(NEURONS, NEURONS) / NEURONS**0.5)
        self.b = torch.nn.Parameter(torch.zeros(NEURONS))

    def forward(self, xy: torch.Tensor) -> torch.Tensor:
        state = torch.zeros(xy.shape[0], NEURONS, dtype=xy.dtype)
        state = torch.cat([xy, state[:, INPUTS:]], dim=1)
        for _ in range(DEPTH):
            state = torch.tanh(state @ self.w.T + self.b)
        return state[:, -1]


def tau(t1: float, t2: float) -> tuple[float, float]:
    return cgd.tau_to_beta(t1), cgd.tau_to_beta(t2)


# Table 2. The paper's moments start at M1 = 0, M2 = I (eq 4.4) with no bias correction; SGD has tau1 = 0.
OPTIMIZERS = {
    "SGD": lambda p: cgd.CGD(p, lr=0.098, betas=(0.0, 0.0), power=0.0, bias_correction=False),
    "RMSProp": lambda p: cgd.CGD(p, lr=0.058, betas=tau(0, 999), power=0.5, bias_correction=False, m2_init=1.0),
    "Adam": lambda p: cgd.CGD(p, lr=0.099, betas=tau(9, 999), power=0.5, bias_correction=False, m2_init=1.0),
    "AdaBelief": lambda p: cgd.CGD(p, lr=0.01, betas=tau(18.3, 9.21), power=0.5, moment="centered",
                                   bias_correction=False, m2_init=1.0),
    "CGD (diagonal)": lambda p: cgd.CGD(p, lr=0.069, betas=tau(12.9, 12.3), power=0.37, moment="centered",
                                        bias_correction=False, m2_init=1.0),
    "CGD (full)": lambda p: cgd.FullCGD(p, lr=0.0512, tau=(17.1, 15.3), power=0.40),
    "torch.optim.Adam (lr 0.01)": lambda p: torch.optim.Adam(p, lr=0.01),
}


def run(name: str, seed: int, steps: int, batch: int, spectrum_every: int):
    torch.manual_seed(seed)
    model = Unconstrained()
    opt = OPTIMIZERS[name](list(model.parameters()))
    gen = torch.Generator().manual_seed(1000 + seed)
    losses, spectra, seconds = [], [], 0.0
    for step in range(steps):
        t0 = time.perf_counter()
        xy = torch.rand(batch, 2, generator=gen) * 2 - 1
        loss = torch.nn.functional.mse_loss(model(xy), xy[:, 0] * xy[:, 1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        seconds += time.perf_counter() - t0
        # The spectrum is a diagnostic, computed on demand (an eigendecomposition under the Lanczos solver):
        # outside the timed training step.
        if isinstance(opt, cgd.FullCGD) and (step % spectrum_every == 0 or step == steps - 1):
            spectra.append((step, opt.metric_spectrum(top_k=10)[0]["top"][0].tolist()))
    solver = opt.solver_stats() if isinstance(opt, cgd.FullCGD) else None
    return losses, spectra, solver, seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead, and timings stay comparable

    tail = max(1, args.steps // 10)
    curves, rows, eig_history, solver_totals = {}, [], None, None
    for name in OPTIMIZERS:
        run(name, 0, 5, args.batch, 1)  # warm-up: first-call costs stay out of the timing
        finals, seconds = [], 0.0
        for seed in range(args.seeds):
            losses, spectra, solver, took = run(name, seed, args.steps, args.batch, max(1, args.steps // 50))
            seconds += took
            curves.setdefault(name, []).append(losses)
            finals.append(statistics.fmean(losses[-tail:]))
            if spectra and seed == 0:
                eig_history = spectra
            if solver:
                solver_totals = solver
        mean, sd = statistics.fmean(finals), statistics.stdev(finals) if len(finals) > 1 else 0.0
        rows.append((mean, f"| {name} | {mean:.3e} | {sd:.1e} | {min(finals):.3e} | {max(finals):.3e} "
                           f"| {1e3 * seconds / (args.seeds * args.steps):.2f} |"))
        print(rows[-1][1], file=sys.stderr)

    rows.sort()
    lines = [
        "# Multiplication task (CGD paper, Table 2 hyperparameters)\n",
        f"CPU, torch {torch.__version__}, {datetime.date.today().isoformat()}, "
        f"`./run.sh python benchmarks/multiplication.py --steps {args.steps} --seeds {args.seeds}`\n",
        f"23-neuron tanh network (552 parameters), L = 5, batches of {args.batch} uniform (x, y) in [-1, 1]^2, "
        f"{args.steps} steps, {args.seeds} seeds. Final loss = mean training MSE over the last {tail} steps.\n",
        "| optimizer | final loss (mean) | sd | best seed | worst seed | ms/step |",
        "|---|---|---|---|---|---|",
        *[r for _, r in rows],
        "",
        "ms/step: one whole training step (batch, forward, backward, optimizer step), mean over all seeds; full "
        "CGD solves for its direction with FullCGD's default solver (Lanczos on the CPU).",
        "",
        f"Full CGD solver fallbacks: {solver_totals}.",
    ]
    best = rows[0][1].split("|")[1].strip()
    lines.append(f"\nLowest final loss: **{best}**.")
    report = "\n".join(lines) + "\n\n![loss](multiplication_loss.png)\n\n![eigenvalues](multiplication_eigenvalues.png)\n"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "multiplication.md").write_text(report)
    print(report)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    window = max(1, args.steps // 50)
    for name, runs in curves.items():
        mean = [statistics.fmean(r[i] for r in runs) for i in range(args.steps)]
        smooth = [statistics.fmean(mean[max(0, i - window + 1):i + 1]) for i in range(args.steps)]
        ax.plot(smooth, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training MSE (mean of {args.seeds} seeds, smoothed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out / "multiplication_loss.png", dpi=120)

    if eig_history:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        steps = [s for s, _ in eig_history]
        for k in range(10):
            ax.plot(steps, [max(top[k], 1e-30) for _, top in eig_history], label=f"lambda_{k + 1}")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("eigenvalue of the covariance (full CGD, seed 0)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(args.out / "multiplication_eigenvalues.png", dpi=120)
    return 0


if __name__ == "__main__":
    sys.exit(main())
