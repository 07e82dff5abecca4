"""The main job: the optimizers this package is for, side by side on a model where the evidence says they matter.

AdamW and Muon (torch.optim.Muon on the hidden matrices, AdamW on the rest) against the CGD mode the suite found
best, CGD in the Kronecker eigenbasis at SOAP's settings (cgd.FullCGD metric="eigenbasis"); cgd.Muon (Muon's step as
a CGD step in the C core) on request. The task is the induced-metric paper's character GPT (4 layers, 4 heads, 128
wide) on TinyShakespeare at context 64 with batch 16 (context 256, batch 64 on a GPU), 300 steps; without the corpus
(--data, default ../shared/data/tinyshakespeare.txt beside the clone) the digits MLP (128 wide; 512 on a GPU) — both
suite.make_task's. Every optimizer runs at the learning rate benchmarks/suite.py chose for it on that task
(LEARNING_RATES, from the committed suite reports) with the suite's protocol: warmup + cosine, gradient clipping at
1.0 on the GPT, the same batches and initial weights for everyone. Prints and writes a Markdown table (final
validation loss, mean ± sd over seeds; steps to AdamW's mean final loss; optimizer ms per step), a plot of the
validation curves, and one line saying what the result means. CPU by default, the GPU when there is one.

    ./run.sh compare                                   # the GPT if the corpus is there, else digits
    ./run.sh compare --task mlp --seeds 3 --optimizers AdamW "Muon + AdamW" "cgd.Muon + AdamW" "CGD eigenbasis"
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import suite  # noqa: E402
import tasks  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
DEFAULT_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"

# The rate benchmarks/suite.py chose per optimizer and task (suite_cpu_gpt_paper.md, suite_cpu.md): the rows
# are suite.optimizer_grid's factories, so both scripts build each optimizer the same way.
LEARNING_RATES = {
    "gpt": {"AdamW": 0.01, "Muon + AdamW": 0.0316, "cgd.Muon + AdamW": 0.0316, "CGD eigenbasis": 0.00949},
    "mlp": {"AdamW": 0.00316, "Muon + AdamW": 0.01, "cgd.Muon + AdamW": 0.01, "CGD eigenbasis": 0.003},
}
CGD_ROWS = ("cgd.Muon + AdamW", "CGD eigenbasis")
# The rows run by default: the baselines and the best CGD mode, so that the job stays within five minutes of a
# 2-core CPU with the build (cgd.Muon, level with torch.optim.Muon in every report, by --optimizers).
DEFAULT_ROWS = ("AdamW", "Muon + AdamW", "CGD eigenbasis")


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def verdict(summary: dict[str, tuple[float, float]]) -> str:
    """One line: the best CGD row against AdamW and Muon, 'level' when the gap is within the larger sd."""
    def against(name: str, other: str) -> str:
        (m, s), (o, so) = summary[name], summary[other]
        if abs(m - o) <= max(s, so):
            return f"level with {other} ({o:.3f}, within one sd)"
        return f"{'below' if m < o else 'above'} {other} ({o:.3f})"

    cgd_rows = [n for n in CGD_ROWS if n in summary]
    if not cgd_rows:
        return "No CGD row finished, so this run says nothing about CGD."
    best = min(cgd_rows, key=lambda n: summary[n][0])
    parts = [against(best, b) for b in ("AdamW", "Muon + AdamW") if b in summary]
    wins = all(summary[best][0] < summary[b][0] - max(summary[best][1], summary[b][1])
               for b in ("AdamW", "Muon + AdamW") if b in summary)
    head = f"{best} reached the lowest validation loss of the CGD modes, {summary[best][0]:.3f}: " + ", ".join(parts)
    return head + (". A CGD mode wins here." if wins else ". No CGD mode beats both baselines here.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("auto", "gpt", "mlp"), default="auto",
                        help="gpt (needs --data), mlp (the digits), or auto: gpt when the corpus exists")
    parser.add_argument("--data", type=pathlib.Path, default=DEFAULT_DATA, help="TinyShakespeare text for the GPT")
    parser.add_argument("--steps", type=int, default=None, help="default 300 (gpt), 600 (mlp)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--context", type=int, default=None,
                        help="the GPT's context (default 64 on a CPU, 256 on a GPU; the rates stay those chosen "
                             "at the default)")
    parser.add_argument("--optimizers", nargs="*", default=DEFAULT_ROWS,
                        help=f"rows, of {', '.join(LEARNING_RATES['gpt'])} (default: {', '.join(DEFAULT_ROWS)})")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS, help="folder for the table and the plot")
    args = parser.parse_args(argv)
    task = args.task if args.task != "auto" else ("gpt" if args.data.is_file() else "mlp")
    if task == "gpt" and not args.data.is_file():
        raise SystemExit(f"compare.py: --task gpt needs --data PATH, the TinyShakespeare text ({args.data} is not "
                         "a file); or --task mlp")
    if args.task == "auto" and task == "mlp":
        print(f"compare.py: no corpus at {args.data}: running the digits MLP (pass --data for the GPT)",
              file=sys.stderr)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    steps = args.steps or (300 if task == "gpt" else 600)
    every = max(1, steps // 10)
    factories = suite.optimizer_grid(gpu)
    unknown = set(args.optimizers) - set(LEARNING_RATES[task])
    if unknown:
        raise SystemExit(f"compare.py: no such row {sorted(unknown)}; the rows are {list(LEARNING_RATES[task])}")
    rates = {k: v for k, v in LEARNING_RATES[task].items() if k in args.optimizers}
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    runs: dict[str, list[tasks.History]] = {}
    t0 = time.perf_counter()
    for name, lr in rates.items():
        make = factories[name][1]
        for seed in range(args.seeds):
            try:
                # The suite's task at this device's scale, so the rates it chose apply.
                made = (suite.make_task(task, device, seed, "gpu" if gpu else "cpu", str(args.data), "paper")
                        if args.context is None or task != "gpt" else
                        tasks.shakespeare(str(args.data), device, seed=seed, block=args.context,
                                          batch_size=64 if gpu else 16))
                h = tasks.train(made,
                                lambda m, make=make, lr=lr: make(m, lr),
                                steps, eval_every=every, sync=sync, schedule=True, progress=f"{name} seed {seed}")
            except (RuntimeError, ValueError) as error:  # e.g. a CPU-only mode given CUDA tensors
                print(f"  {name}: {str(error).splitlines()[0]}", file=sys.stderr)
                break
            runs.setdefault(name, []).append(h)
        print(f"  {name}: done at {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    final = {n: [suite.loss_of(h.evals[-1][1]) for h in hs if not h.diverged] for n, hs in runs.items()}
    summary = {n: spread(v) for n, v in final.items() if v}
    target = summary["AdamW"][0] if "AdamW" in summary else None
    held_out = "val loss" if task == "gpt" else "test loss"
    rows = [f"| optimizer | lr | final {held_out} (mean ± sd) | steps to AdamW's final loss | optimizer ms/step |",
            "|---|---|---|---|---|"]
    for name, hs in runs.items():
        ok = [h for h in hs if not h.diverged]
        cell = f"{summary[name][0]:.4f} ± {summary[name][1]:.4f}" if name in summary else "diverged"
        hit = [s for s in (suite.steps_to({"evals": h.evals}, target) for h in ok) if s is not None] if target else []
        steps_cell = f"{statistics.fmean(hit):.0f} ({len(hit)}/{len(ok)} seeds)" if hit else "not reached"
        ms = statistics.fmean(1e3 * h.optimizer_seconds / max(1, len(h.steps)) for h in hs)
        rows.append(f"| {name} | {rates[name]:g} | {cell} | {steps_cell} | {ms:.2f} |")
    where = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    command = "./run.sh compare " + " ".join(argv if argv is not None else sys.argv[1:])
    context = args.context or (256 if gpu else 64)
    model = (f"character GPT on TinyShakespeare (4 layers, 128 wide, context {context})"
             if task == "gpt" else "MLP on the digits")
    line = verdict(summary)
    report = (f"# The main comparison: {model}\n\n{where}, torch {torch.__version__}, "
              f"{datetime.date.today().isoformat()}, `{command.strip()}`, {time.perf_counter() - t0:.0f} s\n\n"
              f"{steps} steps, warmup + cosine, {args.seeds} seed{'s' if args.seeds != 1 else ''}, each optimizer at the "
              "learning rate "
              "benchmarks/suite.py chose for it on this task.\n\n" + "\n".join(rows) + f"\n\n**{line}**\n")
    print(report)
    print(line, file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"compare_{task}_{device.type}"
    (args.out / f"{stem}.md").write_text(report + f"\n![validation curves]({stem}.png)\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, hs in runs.items():
        ok = [h for h in hs if not h.diverged and h.evals]
        if ok:
            marks = [s for s, _ in ok[0].evals]
            ax.plot(marks, [statistics.fmean(suite.loss_of(h.evals[i][1]) for h in ok) for i in range(len(marks))],
                    label=name, marker="o", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(f"{held_out} (mean of {args.seeds} seeds)")
    ax.set_title(f"{model}, {where}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / f"{stem}.png", dpi=120)
    print(f"wrote {args.out / stem}.md and .png", file=sys.stderr)
    return 0 if summary else 1


if __name__ == "__main__":
    sys.exit(main())
