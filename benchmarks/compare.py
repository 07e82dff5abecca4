"""The main job: a short training comparison of cgd.CGD against torch.optim.Adam and AdamW.

Every optimizer trains the same model from the same initial weights on the same batches, for several seeds,
at its swap-in settings (the learning rate a user would pass to Adam). Prints a Markdown table, writes it
with a loss-curve plot (PNG) under benchmarks/results/. Runs on the GPU when there is one, else on the CPU.

    ./run.sh compare                                    # digits MLP, seconds on a CPU
    ./run.sh compare --task shakespeare --data ../shared/data/tinyshakespeare.txt --steps 300
"""

from __future__ import annotations

import argparse
import datetime
import math
import pathlib
import statistics
import sys
from collections.abc import Callable

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import tasks  # noqa: E402

import cgd  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def optimizers(lr: float, weight_decay: float, device: torch.device) -> dict[str, Callable[[list], torch.optim.Optimizer]]:
    fused = device.type == "cuda"  # torch's fastest AdamW on a GPU; on the CPU its default (foreach) path
    return {
        "cgd.CGD": lambda p: cgd.CGD(p, lr=lr, weight_decay=weight_decay),
        "cgd.CGD(power=0.4)": lambda p: cgd.CGD(p, lr=lr, power=0.4, weight_decay=weight_decay),
        "torch.optim.Adam": lambda p: torch.optim.Adam(p, lr=lr, fused=fused or None),
        "torch.optim.AdamW": lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=weight_decay, fused=fused or None),
        "cgd.AdamW": lambda p: cgd.AdamW(p, lr=lr, weight_decay=weight_decay),
    }


def make_task(args: argparse.Namespace, device: torch.device, seed: int) -> tasks.Task:
    if args.task == "digits":
        return tasks.digits(device, seed=seed)
    if args.data is None:
        raise SystemExit("compare.py: --task shakespeare needs --data PATH (e.g. ../shared/data/tinyshakespeare.txt)")
    return tasks.shakespeare(args.data, device, seed=seed)


def smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def spread(values: list[float]) -> str:
    if not values:
        return "diverged"
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} ± {sd:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("digits", "shakespeare"), default="digits")
    parser.add_argument("--data", help="text file for --task shakespeare")
    parser.add_argument("--steps", type=int, default=None, help="default: 600 (digits), 300 (shakespeare)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="folder for the table and the plot")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    steps = args.steps or (600 if args.task == "digits" else 300)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    runs: dict[str, list[tasks.History]] = {}
    for name, make in optimizers(args.lr, args.weight_decay, device).items():
        for seed in range(args.seeds):
            runs.setdefault(name, []).append(
                tasks.train(make_task(args, device, seed), lambda m, make=make: make(list(m.parameters())), steps,
                            eval_every=max(1, steps // 10), sync=sync))
        print(f"  {name}: done", file=sys.stderr)

    metric = "test_acc" if args.task == "digits" else "val_ppl"
    held_out = "test_loss" if args.task == "digits" else "val_loss"
    tail = max(1, steps // 10)
    header = (f"| optimizer | train loss (last {tail} steps) | {held_out} | {metric} | optimizer ms/step |\n"
              "|---|---|---|---|---|\n")
    rows = []
    for name, histories in runs.items():
        ok = [h for h in histories if not h.diverged]
        rows.append(
            f"| {name} | {spread([statistics.fmean(h.train_loss[-tail:]) for h in ok])} "
            f"| {spread([h.evals[-1][1][held_out] for h in ok])} "
            f"| {spread([h.evals[-1][1][metric] for h in ok])} "
            f"| {statistics.fmean(1e3 * h.optimizer_seconds / max(1, len(h.steps)) for h in histories):.3f} |"
            + (f" ({len(histories) - len(ok)} of {len(histories)} seeds diverged)" if len(ok) < len(histories) else "")
        )
    table = header + "\n".join(rows) + "\n"
    stamp = datetime.date.today().isoformat()
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    command = "./run.sh compare " + " ".join(argv if argv is not None else sys.argv[1:])
    report = (f"# {args.task}: CGD vs Adam vs AdamW\n\n{where}, torch {torch.__version__}, {stamp}, "
              f"`{command.strip()}`\n\n{steps} steps, lr {args.lr}, weight decay {args.weight_decay}, "
              f"{args.seeds} seeds (mean ± sd)\n\n{table}")
    print(report)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"compare_{args.task}_{device.type}"
    (args.out / f"{stem}.md").write_text(report + f"\n![loss curves]({stem}.png)\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return 0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, histories in runs.items():
        ok = [h for h in histories if not h.diverged and h.train_loss]
        if not ok:
            continue
        n = min(len(h.train_loss) for h in ok)
        mean = [statistics.fmean(h.train_loss[i] for h in ok) for i in range(n)]
        ax.plot(range(1, n + 1), smooth(mean, max(1, steps // 50)), label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (mean of {args.seeds} seeds, smoothed)")
    ax.set_yscale("log")
    ax.set_title(f"{args.task} on {where}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / f"{stem}.png", dpi=120)
    print(f"wrote {args.out / stem}.md and .png", file=sys.stderr)
    return 0 if all(math.isfinite(h.train_loss[-1]) for hs in runs.values() for h in hs if h.train_loss) else 1


if __name__ == "__main__":
    sys.exit(main())
