"""The gradient noise scale over training: cgd.CGD.noise_scale() against a direct measurement, on the digits MLP.

B_simple = tr(Sigma) / |G|^2 in examples (McCandlish et al. 2018, "An empirical model of large-batch training").
noise_scale() estimates it from the moments the optimizer keeps anyway (no cost to the step); the direct
measurement, at the same parameters every --every steps, draws --draws mini-batches of the training batch size at
random from the training set, and with their gradients g_k takes tr(Sigma_B) as the summed unbiased variance over
k and |G|^2 = |mean g_k|^2 - tr(Sigma_B) / draws (unbiased), B_simple = batch tr(Sigma_B) / |G|^2. The same run is
made with Adam's betas (0.9, 0.999) and with beta2 = 0.99: the estimate assumes G constant over M2's window, so the
longer beta2 counts the drift of G as noise.

    ./run.sh python benchmarks/noise_scale.py [--steps 600] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import datetime
import math
import pathlib
import sys

import torch

import cgd

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tasks  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
BATCH = 64


def direct_noise_scale(task: tasks.Task, model: torch.nn.Module, draws: int, gen: torch.Generator) -> float:
    """B_simple from `draws` independent mini-batch gradients at the model's current parameters."""
    x_train, y_train = task.train_set
    grads = []
    for _ in range(draws):
        idx = torch.randint(len(x_train), (BATCH,), generator=gen)
        model.zero_grad()
        task.loss(model, x_train[idx], y_train[idx]).backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).double())
    g = torch.stack(grads)
    trace = float(g.var(dim=0, unbiased=True).sum())
    g2 = float(g.mean(dim=0).pow(2).sum()) - trace / draws
    return BATCH * trace / g2 if g2 > 0 else math.inf


def run(betas: tuple[float, float], steps: int, every: int, draws: int) -> list[tuple[int, float, float]]:
    """(step, noise_scale() estimate, direct measurement) at every `every`-th step."""
    task = tasks.digits("cpu", seed=0, batch_size=BATCH)
    model = task.make_model()
    opt = cgd.CGD(model.parameters(), lr=3e-3, betas=betas)
    gen = torch.Generator().manual_seed(7)
    rows = []
    for step in range(1, steps + 1):
        xb, yb = task.batch(step - 1)
        opt.zero_grad()
        task.loss(model, xb, yb).backward()
        opt.step()
        if step % every == 0:
            estimate = opt.noise_scale(batch_size=BATCH)["model"]
            rows.append((step, estimate, direct_noise_scale(task, model, draws, gen)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--draws", type=int, default=64, help="mini-batch gradients per direct measurement")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    command = "./run.sh python benchmarks/noise_scale.py " + " ".join(argv if argv is not None else sys.argv[1:])
    runs = {b2: run((0.9, b2), args.steps, args.every, args.draws) for b2 in (0.999, 0.99)}
    show = lambda v: "inf (|G|^2 estimate <= 0)" if v is None or not math.isfinite(v) else f"{v:.0f}"  # noqa: E731
    lines = ["# Gradient noise scale over training: noise_scale() against a direct measurement\n",
             f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, "
             f"{datetime.date.today().isoformat()}, `{command.strip()}`\n",
             f"Digits MLP (64-128-128-10), cgd.CGD lr 3e-3, batch {BATCH}. B_simple in examples; direct: "
             f"{args.draws} random mini-batch gradients at the same parameters (see the script's docstring).\n",
             "| step | direct | noise_scale(), betas (0.9, 0.999) | direct (second run) "
             "| noise_scale(), betas (0.9, 0.99) |",
             "|---|---|---|---|---|"]
    for (step, est_long, direct_long), (_, est_short, direct_short) in zip(runs[0.999], runs[0.99]):
        lines.append(f"| {step} | {show(direct_long)} | {show(est_long)} | {show(direct_short)} | {show(est_short)} |")
    lines.append("")
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for b2, style in ((0.999, "-"), (0.99, "--")):
            steps = [s for s, _, _ in runs[b2]]
            est = [e if e is not None and math.isfinite(e) and e > 0 else float("nan") for _, e, _ in runs[b2]]
            direct = [d if math.isfinite(d) and d > 0 else float("nan") for _, _, d in runs[b2]]
            ax.plot(steps, est, style, marker="o", label=f"noise_scale(), beta2 = {b2}")
            ax.plot(steps, direct, style, marker="x", color="black", alpha=0.6, label=f"direct, beta2 = {b2} run")
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("B_simple (examples)")
        ax.set_title("Gradient noise scale, digits MLP")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.out / "noise_scale_cpu.png", dpi=120)
        lines.append("![noise scale](noise_scale_cpu.png)\n")
    except ImportError:
        lines.append("(matplotlib missing: no plot)\n")
    report = "\n".join(lines)
    (args.out / "noise_scale_cpu.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
