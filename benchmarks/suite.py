"""The benchmark suite: every comparison in one command, at CPU scale (minutes) or GPU scale.

Parts (``--parts``, default all):
  rosenbrock      the CGD paper's Table 1: 2-D Rosenbrock from (0, 0.5), its tuned SGD, RMSProp, Adam,
                  AdaBelief, diagonal and full CGD rows (deterministic: one run each)
  multiplication  the CGD paper's Table 2 task (benchmarks/multiplication.py, 5 seeds)
  mlp, cnn, gpt   real models: an MLP and a ResNet-style CNN on scikit-learn's bundled digits (ResNet-18 at GPU
                  scale, on the digits upsampled to 32 x 32), a character GPT on TinyShakespeare (--data; skipped
                  without it): the induced-metric paper's 4 layers, 4 heads, 128 wide at GPU scale, 2 layers,
                  2 heads, 64 wide at CPU scale

Real-model protocol, the same for every optimizer: 7 tuning runs on seed 0 at the full step budget, chosen by
final validation loss, then seeds 0..2 at the chosen setting. The 7 runs are a learning-rate grid of 7 values
half a decade apart around the optimizer's own usual scale or, for a CGD mode with knobs, 5 of those rates and,
at the best of them, its two alternative power/beta2 settings (the same budget); the rate is widened by half a
decade past an end while the best sits there (up to 3 more runs, for everyone alike; every setting tried is
listed in the report). Every run: linear warmup over 5% of the steps, then a cosine to 10% of the rate (every
parameter group); on the GPT, gradient norms clipped at 1.0 as GPT training scripts do. Reported: final
validation loss (and accuracy) mean and spread, the best seed, steps and wall-clock until the validation loss
first reaches AdamW's mean final one, optimizer ms per step. Finished runs are cached (--cache), so a stopped
suite resumes; long runs show a progress bar with the running training loss.

Optimizers: AdamW (fused on a GPU), Muon (torch.optim.Muon on the 2-D hidden weights, AdamW at lr 1e-3 on the
rest: embeddings, the output head, biases, norms, conv kernels; cgd.split_parameters), cgd.Muon the same way
(conv kernels included, as out_channels x rest matrices), SOAP (pytorch_optimizer's, refresh every 10 steps),
diagonal CGD (cgd.CGD; knobs power 0.4, beta2 0.99), block CGD (cgd.FullCGD, block 16, eigenbasis refreshed
every 10 steps), Kronecker CGD (cgd.FullCGD metric="kron", refresh every 10 steps), CGD in the Kronecker
eigenbasis (metric="eigenbasis" at SOAP's settings, power 1/2; CPU only for now), the matrix metrics with the
two powers of 0.25, 0.4 and 0.5 they do not default to as knobs, and the induced RMS metric (cgd.InducedMetric,
xi = 1 / number of parameters, the paper's suggestion).

    ./run.sh suite                                   # CPU scale, or GPU scale on a GPU
    ./run.sh suite --parts gpt --data ../shared/data/tinyshakespeare.txt --scale gpu

Writes benchmarks/results/suite_<scale>.md and suite_<scale>_<task>.png.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import pathlib
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import multiplication  # noqa: E402
import tasks  # noqa: E402

import cgd  # noqa: E402

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
CACHE = pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / "torch-cgd" / "suite-runs"
SEEDS = (0, 1, 2)

# Steps per run and evaluation interval, per task and scale.
BUDGET = {
    "cpu": {"mlp": (600, 50), "cnn": (300, 50), "gpt": (300, 50)},
    "gpu": {"mlp": (3000, 100), "cnn": (2000, 100), "gpt": (5000, 250)},
}


# ---- optimizers ----

def log_grid(center: float, points: int = 7, step: float = 10**0.5) -> tuple[float, ...]:
    """`points` learning rates spaced by `step` (half a decade), centred on an optimizer's usual rate."""
    return tuple(float(f"{center * step ** (k - points // 2):.3g}") for k in range(points))


def choose_lr(run: Callable[[float], dict], grid: tuple[float, ...], widen: int = 3
              ) -> tuple[float, dict, dict[float, dict]]:
    """Runs `run(lr)` (a train_run result) over the grid and, while the lowest final loss sits at an end of the
    rates tried, one rate further past that end (half a decade; at most `widen` times): so the chosen rate is not
    at an edge unless the grid was widened `widen` times or the next rate failed. Returns the chosen rate (nan if
    every run failed), its run and every trial by rate."""
    trials = {lr: run(lr) for lr in grid}
    ratio = grid[1] / grid[0] if len(grid) > 1 else 10**0.5
    for _ in range(widen):
        ok = {lr: r for lr, r in trials.items() if "failed" not in r}
        if not ok:
            break
        best = min(ok, key=lambda lr: loss_of(ok[lr]["final"]))
        if best == min(trials):
            new = float(f"{best / ratio:.3g}")
        elif best == max(trials):
            new = float(f"{best * ratio:.3g}")
        else:
            break
        trials[new] = run(new)
    ok = {lr: r for lr, r in trials.items() if "failed" not in r}
    if not ok:
        first = min(trials)
        return float("nan"), trials[first], dict(sorted(trials.items()))
    best = min(ok, key=lambda lr: loss_of(ok[lr]["final"]))
    return best, ok[best], dict(sorted(trials.items()))


def choose_setting(run: Callable[[float, dict], dict], grid: tuple[float, ...], knobs: tuple[dict, ...] = (),
                   widen: int = 3) -> tuple[tuple[float, dict], dict, dict[str, dict]]:
    """The tuning of one optimizer within the same number of runs for everyone: without knobs, choose_lr over the
    grid; with them (a CGD mode's alternative power or beta2 settings), choose_lr over the grid less one point per
    knob (its ends dropped alternately), then each knob at the chosen rate. Returns the chosen (lr, knob), its
    run and every trial by label."""
    knob_label = lambda knob: ", ".join(f"{k}={v:g}" for k, v in knob.items())  # noqa: E731
    inner = grid
    for k in range(len(knobs)):
        inner = inner[1:] if k % 2 == 0 else inner[:-1]
    lr, first, by_lr = choose_lr(lambda x: run(x, {}), inner, widen)
    trials = {f"{x:g}": r for x, r in by_lr.items()}
    best = ((lr, {}), first)
    for knob in knobs if lr == lr else ():
        r = run(lr, knob)
        trials[f"{lr:g} ({knob_label(knob)})"] = r
        if "failed" not in r and ("failed" in best[1] or loss_of(r["final"]) < loss_of(best[1]["final"])):
            best = ((lr, knob), r)
    return best[0], best[1], trials


def optimizer_grid(gpu: bool) -> dict[str, tuple[tuple[float, ...], Callable[..., object], tuple[dict, ...]]]:
    """Per optimizer, its lr grid, a factory of (model, lr, **knob) and its knobs (CGD's power/beta2
    alternatives, tuned within the same run budget, see choose_setting): the Muon rows split the model's
    parameters as Muon is meant to be used (cgd.split_parameters: hidden matrices to Muon, the rest to AdamW at
    lr 1e-3)."""
    def with_adamw(muon_cls):
        def make(model, lr):
            hidden, rest = cgd.split_parameters(model)
            if muon_cls is torch.optim.Muon:
                hidden_2d = [p for p in hidden if p.dim() == 2]
                rest += [p for p in hidden if p.dim() != 2]  # torch.optim.Muon refuses conv kernels
                hidden = hidden_2d
            if not hidden:
                raise ValueError("not applicable: torch.optim.Muon takes 2-D weights and this model's hidden "
                                 "weights are conv kernels (4-D)")
            return cgd.Combined(muon_cls(hidden, lr=lr, weight_decay=0.01),
                                torch.optim.AdamW(rest, lr=1e-3, weight_decay=0.01, fused=gpu or None))
        return make

    def induced(model, lr):
        n = sum(p.numel() for p in model.parameters())
        return cgd.InducedMetric(model.parameters(), lr=lr, gamma="rms", xi=1.0 / n, weight_decay=0.01)

    def soap(model, lr):
        from pytorch_optimizer import SOAP

        return SOAP(model.parameters(), lr=lr, weight_decay=0.01, precondition_frequency=10)

    def diagonal(model, lr, beta2=0.999, **knob):
        return cgd.CGD(model.parameters(), lr=lr, betas=(0.9, beta2), weight_decay=0.01, **knob)

    def matrix(metric, **fixed):
        def make(model, lr, beta2=None, **knob):
            betas = {} if beta2 is None else {"betas": (fixed.get("betas", (0.9, 0.999))[0], beta2)}
            return cgd.FullCGD(model.parameters(), lr=lr, metric=metric, refresh_every=10, weight_decay=0.01,
                               nonfinite="ignore", **{**fixed, **betas, **knob})
        return make

    adam_scale = log_grid(1e-3)
    muon_scale = log_grid(1e-2)
    powers = ({"power": 0.5}, {"power": 0.25})  # FullCGD's default power is the paper's 0.4
    # SOAP's own settings (Vyas et al. 2024), in the eigenbasis metric: a = 1/2, raw, Adam's start.
    soap_like = dict(power=0.5, centered=False, bias_correction=True, m2_init=0.0, betas=(0.95, 0.95), eps=1e-16)
    return {
        "AdamW": (adam_scale, lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01,
                                                               fused=gpu or None), ()),
        "Muon + AdamW": (muon_scale, with_adamw(torch.optim.Muon), ()),
        "cgd.Muon + AdamW": (muon_scale, with_adamw(cgd.Muon), ()),
        "SOAP": (log_grid(3e-3), soap, ()),
        "CGD diagonal": (adam_scale, diagonal, ({"power": 0.4}, {"beta2": 0.99})),
        "CGD block 16": (log_grid(3e-3), matrix("block", block_size=16), powers),
        "CGD kron": (log_grid(3e-3), matrix("kron"), powers),
        "CGD eigenbasis": (log_grid(3e-3), matrix("eigenbasis", **soap_like), ({"power": 0.4}, {"power": 0.25})),
        "Induced RMS": (adam_scale, induced, ()),
    }


# ---- tasks ----

class _Residual(torch.nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.skip = torch.nn.Sequential()
        if stride != 1 or cin != cout:
            self.skip = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False),
                                            torch.nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.skip(x))


class ResNet(torch.nn.Module):
    """ResNet-18's layout (He et al. 2016; CIFAR-style 3x3 stem, no max-pool) with `blocks` residual blocks per
    stage and `width` channels in the first: blocks=(2, 2, 2, 2), width=64 is ResNet-18."""

    def __init__(self, blocks=(2, 2, 2, 2), width: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, width, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(width),
                                        torch.nn.ReLU())
        layers, cin = [], width
        for stage, n in enumerate(blocks):
            cout = width * 2**stage
            for b in range(n):
                layers.append(_Residual(cin, cout, 2 if b == 0 and stage > 0 else 1))
                cin = cout
        self.layers = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(cin, classes)

    def forward(self, x):
        return self.head(self.layers(self.stem(x)).mean(dim=(2, 3)))


def digits_images(device, seed: int, scale: str) -> tasks.Task:
    """The digits as 1-channel images (8 x 8 on the CPU, upsampled to 32 x 32 for ResNet-18 on a GPU)."""
    base = tasks.digits(device, seed=seed)
    side = 32 if scale == "gpu" else 8

    def image(x):
        x = x.view(-1, 1, 8, 8)
        return F.interpolate(x, size=side, mode="bilinear", align_corners=False) if side != 8 else x

    def make_model():
        torch.manual_seed(seed)
        model = ResNet() if scale == "gpu" else ResNet(blocks=(1, 1), width=16)
        return model.to(device)

    def loss(model, xb, yb):
        return F.cross_entropy(model(image(xb)), yb)

    wrapped = _ImageModel(base.evaluate, image)
    return tasks.Task("cnn", make_model, base.batch, loss, wrapped)


class _ImageModel:
    """Evaluates an image model with the digits task's held-out set, reshaping the flat inputs first."""

    def __init__(self, evaluate, image) -> None:
        self.evaluate, self.image = evaluate, image

    def __call__(self, model):
        return self.evaluate(lambda x: model(self.image(x)))


def make_task(name: str, device, seed: int, scale: str, data: str | None, gpt: str = "small") -> tasks.Task:
    if name == "mlp":
        return tasks.digits(device, seed=seed, hidden=128 if scale == "cpu" else 512)
    if name == "cnn":
        return digits_images(device, seed, scale)
    if scale == "cpu" and gpt == "paper":  # the paper's model, at a CPU's context and batch
        return tasks.shakespeare(data, device, seed=seed, block=64, batch_size=16)
    if scale == "cpu":  # a 2-core CPU affords 36 runs of a small GPT, not of the paper's
        return tasks.shakespeare(data, device, seed=seed, block=32, batch_size=16, layers=2, heads=2, width=64)
    return tasks.shakespeare(data, device, seed=seed, block=256, batch_size=64)


# ---- runs ----

def train_run(task: tasks.Task, make, steps: int, every: int, gpu: bool, label: str | None = None) -> dict:
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    try:
        h = tasks.train(task, make, steps, eval_every=every, sync=sync, schedule=True, progress=label)
    except (RuntimeError, ValueError) as error:  # e.g. a non-finite gradient refused
        return {"failed": str(error).splitlines()[0][:120]}
    if h.diverged or not h.evals:
        return {"failed": "diverged"}
    return {"evals": h.evals, "seconds": h.seconds, "final": h.evals[-1][1],
            "opt_ms": 1e3 * h.optimizer_seconds / max(len(h.steps), 1)}


class RunCache:
    """Finished runs by their full description (task, scale, model, steps, optimizer, lr, knob, seed and the
    protocol's version), one JSON file each, so an interrupted suite resumes where it stopped. A run is cached
    whatever its outcome; change PROTOCOL (or pass --no-cache) when what a run computes changes."""

    PROTOCOL = "2026-12-01 warmup-cosine clip"

    def __init__(self, root: pathlib.Path | None) -> None:
        self.root = root
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)

    def run(self, key: dict, compute: Callable[[], dict]) -> dict:
        if self.root is None:
            return compute()
        text = json.dumps({**key, "protocol": self.PROTOCOL}, sort_keys=True)
        path = self.root / (hashlib.sha256(text.encode()).hexdigest()[:24] + ".json")
        if path.exists():
            return json.loads(path.read_text())["result"]
        result = compute()
        path.write_text(json.dumps({"key": json.loads(text), "result": result}))
        return result


def time_to(run: dict, target: float) -> float | None:
    step = steps_to(run, target)
    return None if step is None else run["seconds"][step - 1]


def steps_to(run: dict, target: float) -> int | None:
    """The first evaluation step whose held-out loss is at or below `target` (evaluation granularity)."""
    for step, metrics in run["evals"]:
        if loss_of(metrics) <= target:
            return step
    return None


def loss_of(metrics: dict) -> float:
    return metrics.get("val_loss", metrics.get("test_loss"))


def real_model(name: str, args, device, gpu: bool, lines: list[str]) -> None:
    steps, every = BUDGET[args.scale][name]
    if args.steps:
        steps, every = args.steps, max(1, args.steps // 4)
    grid = optimizer_grid(gpu)
    chosen: dict[str, tuple[str, list[dict]]] = {}
    tried: dict[str, list[str]] = {}
    cache = RunCache(None if args.no_cache else args.cache)
    for opt_name, (lrs, factory, knobs) in grid.items():
        if args.optimizers and opt_name not in args.optimizers:
            continue

        def one(lr, knob, seed=0, factory=factory, opt_name=opt_name):
            label = f"{name} {opt_name} lr={lr:g}" + "".join(f" {k}={v:g}" for k, v in knob.items()) + f" seed {seed}"
            key = dict(task=name, scale=args.scale, gpt=args.gpt, steps=steps, every=every, optimizer=opt_name,
                       lr=lr, knob=knob, seed=seed, device=device.type)
            r = cache.run(key, lambda: train_run(make_task(name, device, seed, args.scale, args.data, args.gpt),
                                                 lambda m: factory(m, lr, **knob), steps, every, gpu, label))
            print(f"{label}: {r.get('failed') or loss_of(r['final'])}", file=sys.stderr)
            return r

        (lr, knob), first, trials = choose_setting(one, lrs, knobs)
        tried[opt_name] = list(trials)
        setting = f"{lr:g}" + "".join(f", {k}={v:g}" for k, v in knob.items())
        if lr != lr:  # every rate failed
            chosen[opt_name] = ("–", [first])
            continue
        chosen[opt_name] = (setting, [first] + [one(lr, knob, seed) for seed in SEEDS[1:]])
    good = {k: [r for r in runs if "failed" not in r] for k, (_, runs) in chosen.items()}
    target = statistics.mean(loss_of(r["final"]) for r in good.get("AdamW", [])) if good.get("AdamW") else None
    title = {"mlp": "MLP on digits", "cnn": "ResNet-style CNN on digits",
             "gpt": "character GPT on TinyShakespeare" + (
                 "" if args.scale != "cpu" else " (4 layers, 128 wide, context 64)" if args.gpt == "paper"
                 else " (2 layers, 64 wide)")}
    lines += [f"\n## {title[name]} ({steps} steps, evaluation every {every})\n",
              "| optimizer | settings tried (seed 0) | chosen | final val loss (mean ± sd over seeds) | best seed "
              "| accuracy | steps to AdamW's loss | time to it (s) | optimizer ms/step |",
              "|---|---|---|---|---|---|---|---|---|"]
    for opt_name, (setting, runs) in chosen.items():
        ok = good[opt_name]
        settings = "; ".join(tried[opt_name])
        if not ok:
            lines.append(f"| {opt_name} | {settings} | – | failed: {runs[0].get('failed')} | | | | | |")
            continue
        losses = [loss_of(r["final"]) for r in ok]
        acc = [r["final"]["test_acc"] for r in ok if "test_acc" in r["final"]]
        steps_hit = [steps_to(r, target) for r in ok] if target is not None else []
        hit = [x for x in steps_hit if x is not None]
        reached = [t for t in ([time_to(r, target) for r in ok] if target is not None else []) if t is not None]
        sd = statistics.stdev(losses) if len(losses) > 1 else 0.0
        acc_cell = f"{100 * statistics.mean(acc):.1f}%" if acc else "–"
        steps_cell = f"{statistics.mean(hit):.0f} ({len(hit)}/{len(ok)} seeds)" if hit else "not reached"
        time_cell = f"{statistics.mean(reached):.1f}" if reached else "–"
        lines.append(f"| {opt_name} | {settings} | {setting} | {statistics.mean(losses):.4f} ± {sd:.4f} "
                     f"| {min(losses):.4f} | {acc_cell} | {steps_cell} | {time_cell} "
                     f"| {statistics.mean(r['opt_ms'] for r in ok):.2f} |")
    plot(name, good, args)
    lines.append(f"\n![{name}](suite_{args.scale}_{name}.png)\n")


def plot(name: str, good: dict, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for opt_name, runs in good.items():
        if not runs:
            continue
        steps = [s for s, _ in runs[0]["evals"]]
        mean = [statistics.mean(loss_of(r["evals"][i][1]) for r in runs if len(r["evals"]) > i)
                for i in range(len(steps))]
        seconds = [statistics.mean(r["seconds"][s - 1] for r in runs) for s in steps]
        by_step.plot(steps, mean, label=opt_name)
        by_time.plot(seconds, mean, label=opt_name)
    for ax, xlabel in ((by_step, "step"), (by_time, "wall-clock seconds")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (mean over seeds)")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.suptitle(name)
    fig.tight_layout()
    fig.savefig(args.out / f"suite_{args.scale}_{name}.png", dpi=100)
    plt.close(fig)


def rosenbrock(lines: list[str], steps: int) -> None:
    """Table 1 of the CGD paper, moments started as the paper does (M1 = 0, M2 = I, no bias correction)."""
    def tau(t1, t2):
        return cgd.tau_to_beta(t1), cgd.tau_to_beta(t2)

    common = dict(bias_correction=False, m2_init=1.0)
    rows = {
        "SGD": lambda p: cgd.CGD(p, lr=0.0024, betas=(0.0, 0.0), power=0.0, bias_correction=False),
        "RMSProp": lambda p: cgd.CGD(p, lr=0.0067, betas=tau(0, 999), power=0.5, **common),
        "Adam": lambda p: cgd.CGD(p, lr=0.0822, betas=tau(9, 999), power=0.5, **common),
        "AdaBelief": lambda p: cgd.CGD(p, lr=0.034, betas=tau(8.21, 11.78), power=0.5, moment="centered", **common),
        "CGD (diagonal)": lambda p: cgd.CGD(p, lr=0.028, betas=tau(9.24, 13.6), power=0.23, moment="centered",
                                            **common),
        "CGD (full)": lambda p: cgd.FullCGD(p, lr=0.012, tau=(10.9, 9.46), power=0.39),
    }
    marks = [m for m in (100, 300, 1000, 3000) if m <= steps]
    lines += [f"\n## Rosenbrock from (0, 0.5), the CGD paper's Table 1 hyperparameters ({steps} steps)\n",
              "| optimizer | " + " | ".join(f"loss at {m}" for m in marks) + " | final point |",
              "|---|" + "---|" * (len(marks) + 1)]
    for name, make in rows.items():
        q = torch.nn.Parameter(torch.tensor([0.0, 0.5]))
        opt = make([q])
        at = {}
        for step in range(1, steps + 1):
            opt.zero_grad()
            loss = (1 - q[0]) ** 2 + 100 * (q[1] - q[0] ** 2) ** 2
            loss.backward()
            opt.step()
            if step in marks:
                with torch.no_grad():
                    at[step] = float((1 - q[0]) ** 2 + 100 * (q[1] - q[0] ** 2) ** 2)
        point = ", ".join(f"{v:.4f}" for v in q.detach().tolist())
        lines.append(f"| {name} | " + " | ".join(f"{at[m]:.2e}" for m in marks) + f" | ({point}) |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", choices=("cpu", "gpu"), default=None, help="default: gpu on a GPU, else cpu")
    parser.add_argument("--parts", nargs="*", default=["rosenbrock", "multiplication", "mlp", "cnn", "gpt"])
    parser.add_argument("--optimizers", nargs="*", default=None, help="only these real-model optimizers")
    parser.add_argument("--data", default=None, help="TinyShakespeare text for the gpt part")
    parser.add_argument("--steps", type=int, default=None, help="override every real-model step budget")
    parser.add_argument("--gpt", choices=("small", "paper"), default="small",
                        help="CPU scale's GPT: 2 layers, 64 wide, context 32 (small), or the induced-metric "
                             "paper's 4 layers, 4 heads, 128 wide at context 64 (paper)")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS)
    parser.add_argument("--cache", type=pathlib.Path, default=CACHE,
                        help=f"finished runs, kept so that a stopped suite resumes (default {CACHE})")
    parser.add_argument("--no-cache", action="store_true", help="neither read nor write the run cache")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.scale = args.scale or ("gpu" if gpu else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    where = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    command = "./run.sh suite " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# Benchmark suite, {args.scale} scale\n",
             f"{where}, torch {torch.__version__}, {datetime.date.today().isoformat()}, `{command.strip()}`\n",
             "Protocol: see the docstring of benchmarks/suite.py (7 runs per optimizer on seed 0: a 7-point lr "
             "grid, or for a CGD mode 5 rates and its two power/beta2 alternatives at the best; widened while the "
             f"best rate sits at an end; then seeds {SEEDS} at the chosen setting; warmup + cosine schedule, "
             "gradient clipping at 1.0 on the GPT; steps/time-to-target: to AdamW's mean final loss)."]
    t0 = time.perf_counter()
    for part in args.parts:
        if part == "rosenbrock":
            rosenbrock(lines, 3000 if args.scale == "gpu" else 1000)
        elif part == "multiplication":
            steps = "500" if args.scale == "cpu" else "2000"
            multiplication.main(["--steps", str(args.steps or steps), "--seeds", "5", "--out", str(args.out)])
            lines.append("\n## Multiplication task (CGD paper, Table 2)\n\nSee [multiplication.md](multiplication.md).")
        elif part in ("mlp", "cnn", "gpt"):
            if part == "gpt" and args.data is None:
                lines.append("\n## character GPT\n\nSkipped: no --data (TinyShakespeare) given.")
                continue
            real_model(part, args, device, gpu, lines)
        else:
            raise SystemExit(f"suite.py: unknown part {part!r}")
        print(f"[suite] {part} done at {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        # Written after every part, so a long run that is stopped keeps what it finished.
        (args.out / f"suite_{args.scale}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
