"""The evidence behind cgd.CGD's defaults: metric power a, learning rate and initial condition, swept on the
CPU tasks (digits MLP and a character-level GPT on a text file), with torch.optim.Adam as the reference.

    ./run.sh python benchmarks/defaults_sweep.py --data ../shared/data/tinyshakespeare.txt

Writes benchmarks/results/defaults_sweep_<device>.md: per task and setting, the held-out loss (mean over seeds)
for each learning rate, and the best learning rate's result.
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import statistics
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tasks  # noqa: E402

import cgd  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"

SETTINGS = {
    "Adam (torch)": lambda p, lr: torch.optim.Adam(p, lr=lr),
    "CGD a=0.5": lambda p, lr: cgd.CGD(p, lr=lr, power=0.5),
    "CGD a=0.4": lambda p, lr: cgd.CGD(p, lr=lr, power=0.4),
    "CGD a=0.25": lambda p, lr: cgd.CGD(p, lr=lr, power=0.25),
    "CGD a=0.5 paper start (M2=1, no bias corr.)":
        lambda p, lr: cgd.CGD(p, lr=lr, power=0.5, m2_init=1.0, bias_correction=False),
    "CGD a=0.5 centered": lambda p, lr: cgd.CGD(p, lr=lr, power=0.5, moment="centered"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", help="text file for the GPT task; without it only digits runs")
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--digits-steps", type=int, default=600)
    parser.add_argument("--gpt-steps", type=int, default=250)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    jobs = [("digits", lambda seed: tasks.digits(device, seed=seed), args.digits_steps, "test_loss")]
    if args.data:
        jobs.append(("char GPT (2 layers, 64 wide, block 64)",
                     lambda seed: tasks.shakespeare(args.data, device, seed=seed, layers=2, width=64, heads=4),
                     args.gpt_steps, "val_loss"))

    lines = [f"# Defaults sweep\n\n{device}, torch {torch.__version__}, {datetime.date.today().isoformat()}, "
             f"`{' '.join(['./run.sh python benchmarks/defaults_sweep.py'] + sys.argv[1:])}`\n",
             f"Held-out loss at the end of training, mean over {args.seeds} seeds; `nan` = diverged.\n"]
    for title, make_task, steps, key in jobs:
        lines.append(f"\n## {title}, {steps} steps ({key})\n")
        lines.append("| setting | " + " | ".join(f"lr {lr:g}" for lr in args.lrs) + " | best |")
        lines.append("|---|" + "---|" * (len(args.lrs) + 1))
        for name, make in SETTINGS.items():
            cells, best = [], (float("inf"), None)
            for lr in args.lrs:
                values = []
                for seed in range(args.seeds):
                    h = tasks.train(make_task(seed), lambda m, lr=lr, make=make: make(list(m.parameters()), lr), steps)
                    values.append(float("nan") if h.diverged else h.evals[-1][1][key])
                mean = statistics.fmean(values)
                cells.append(f"{mean:.4f}")
                if mean < best[0]:
                    best = (mean, lr)
            lines.append(f"| {name} | " + " | ".join(cells) + f" | {best[0]:.4f} (lr {best[1]:g}) |")
            print(lines[-1], file=sys.stderr)
    report = "\n".join(lines) + "\n"
    print(report)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"defaults_sweep_{device.type}.md").write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
