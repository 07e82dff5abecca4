"""Exact full CGD (paper eq 4.9, cgd.FullCGD(metric="full")): step time and direction accuracy of its solvers.

The solvers compute the direction (eps I + C)^-a F from the float32 state: "eigh" by an eigendecomposition of C
every step (O(n^3)), "lanczos" (the CPU default) by Lanczos iterations of one product with M2 each (O(n^2)), and
"window" exactly for M2 kept as the identity plus its last --window gradients' terms (O(n window + window^3),
no n x n matrix; equal to eq 4.9's M2 until step --window, then without the older terms' beta2^window share).

1. Step time, training a tanh MLP on the multiplication task (regress x y; n = 2,020 parameters) for --steps
   steps: the optimizer step alone, Lanczos over the whole run, the eigendecomposition over --eigh-steps steps,
   torch.optim.AdamW (foreach) and cgd.Adam on the same model; and the same for the paper's 552-parameter
   multiplication net (benchmarks/multiplication.py) against its Adam (Table 2).
2. Accuracy: the gradients of that run replayed into both solvers (float32 state) and into the float64 eq 4.9
   reference of the test suite, with the paper's start (M2 = I, no bias correction) and Adam's (M2 = 0, bias
   correction), centered; the relative error of each direction against the reference at every --every-th step.
   The parameter is reset to 0 before each step and lr = 1, so it holds exactly minus the direction.
3. A 100k-parameter model: a 2-314-314-1 tanh MLP (100,167 parameters) on the same task, full CGD with the window
   solver against cgd.Adam for --big-steps steps: loss, step time and the optimizer's state.

    ./run.sh python benchmarks/full_cgd.py [--steps 300] [--out benchmarks/results/full_cgd_cpu.md]
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

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "python"))
from reference_full import ReferenceFullCGD  # noqa: E402  (the float64 eq 4.9 reference of the test suite)

from multiplication import Unconstrained  # noqa: E402


def mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 43), torch.nn.Tanh(), torch.nn.Linear(43, 42), torch.nn.Tanh(),
                               torch.nn.Linear(42, 1), torch.nn.Flatten(0))


def batch(gen: torch.Generator, size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    xy = torch.rand(size, 2, generator=gen) * 2 - 1
    return xy, xy[:, 0] * xy[:, 1]


def train(make_model, make_opt, steps: int, record: bool = False):
    """Optimizer step times (s) over `steps` training steps, the losses, the flat gradients when `record`, and the
    optimizer."""
    model = make_model()
    opt = make_opt(list(model.parameters()))
    gen = torch.Generator().manual_seed(1)
    times, losses, grads = [], [], []
    for _ in range(steps):
        xy, target = batch(gen)
        loss = torch.nn.functional.mse_loss(model(xy), target)
        opt.zero_grad()
        loss.backward()
        if record:
            grads.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).clone())
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    return times, losses, grads, opt


def state_held(opt: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state the optimizer holds."""
    return sum(t.numel() * t.element_size() for st in opt.state.values() for t in st.values()
               if isinstance(t, torch.Tensor))


def direction_errors(grads: list[torch.Tensor], every: int, start: str, window: int) -> dict[str, list[float]]:
    """Relative error against the float64 reference of each solver's direction at steps 1, 1 + every, ..."""
    n = grads[0].numel()
    kw = dict(lr=1.0, power=0.4, centered=True)
    kw.update(dict(m2_init=1.0) if start == "paper" else dict(m2_init=0.0, bias_correction=True))
    ref = ReferenceFullCGD(torch.zeros(n), [list(range(n))], beta1=17.1 / 18.1, beta2=15.3 / 16.3,
                           refresh_every=every, **kw)
    expected = {}
    for t, g in enumerate(grads):
        ref.q.zero_()
        q = ref.step(g)
        if t % every == 0:
            expected[t] = -q
    errors = {}
    for solver in ("eigh", "lanczos", "window"):
        param = torch.nn.Parameter(torch.zeros(n))
        # eigh refreshes on exactly the compared steps: there its direction is this step's eigendecomposition.
        opt = cgd.FullCGD([param], solver=solver, refresh_every=every if solver == "eigh" else 1, window=window,
                          **kw)
        errors[solver] = []
        for t, g in enumerate(grads):
            with torch.no_grad():
                param.zero_()
            param.grad = g.clone()
            opt.step()
            if t in expected:
                d = -param.detach().double()
                errors[solver].append(((d - expected[t]).norm() / expected[t].norm()).item())
    return errors


def big_mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(2, 314), torch.nn.Tanh(), torch.nn.Linear(314, 314), torch.nn.Tanh(),
                               torch.nn.Linear(314, 1), torch.nn.Flatten(0))


def big_mlp_n() -> int:
    return sum(p.numel() for p in big_mlp().parameters())


def ms(seconds: list[float]) -> str:
    return f"{1e3 * statistics.fmean(seconds):.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eigh-steps", type=int, default=5)
    parser.add_argument("--every", type=int, default=30, help="steps between accuracy samples")
    parser.add_argument("--window", type=int, default=128, help="the window solver's gradients")
    parser.add_argument("--big-steps", type=int, default=200, help="training steps of the 100k-parameter model")
    parser.add_argument("--out", type=pathlib.Path, default=None)
    args = parser.parse_args(argv)
    command = "benchmarks/full_cgd.py " + " ".join(argv if argv is not None else sys.argv[1:])
    n = sum(p.numel() for p in mlp().parameters())
    full = lambda solver: lambda p: cgd.FullCGD(p, lr=0.01, solver=solver, window=args.window)  # noqa: E731
    lines = ["# Exact full CGD: step time and direction accuracy of its solvers\n",
             f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, "
             f"{datetime.date.today().isoformat()}, `{command.strip()}`\n",
             "## Step time (optimizer step alone, mean ms over the run)\n",
             "| model | optimizer | steps | ms/step | vs Adam | note |", "|---|---|---|---|---|---|"]

    def rows(label, make_model, configs):
        adam = None
        for name, make_opt, steps in configs:
            train(make_model, make_opt, 3)  # first-call costs out of the timing
            times, _, _, opt = train(make_model, make_opt, steps)
            adam = adam or statistics.fmean(times)
            note = f"fallbacks {opt.solver_stats()}" if isinstance(opt, cgd.FullCGD) else ""
            lines.append(f"| {label} | {name} | {steps} | {ms(times)} | {statistics.fmean(times) / adam:.1f} "
                         f"| {note} |")
            print(lines[-1], file=sys.stderr)

    rows(f"MLP, n = {n:,}", mlp, [
        ("cgd.Adam", lambda p: cgd.Adam(p, lr=1e-3), args.steps),
        ("torch.optim.AdamW foreach", lambda p: torch.optim.AdamW(p, lr=1e-3, foreach=True), args.steps),
        ("FullCGD lanczos", full("lanczos"), args.steps),
        (f"FullCGD window {args.window}", full("window"), args.steps),
        ("FullCGD eigh", full("eigh"), args.eigh_steps),
    ])
    tau = lambda t1, t2: (cgd.tau_to_beta(t1), cgd.tau_to_beta(t2))  # noqa: E731
    rows("multiplication net, n = 552", Unconstrained, [
        ("Adam (Table 2)", lambda p: cgd.CGD(p, lr=0.099, betas=tau(9, 999), power=0.5, bias_correction=False,
                                             m2_init=1.0), args.steps),
        ("FullCGD lanczos (Table 2)", lambda p: cgd.FullCGD(p, lr=0.0512, tau=(17.1, 15.3), power=0.40),
         args.steps),
        (f"FullCGD window {args.window} (Table 2)", lambda p: cgd.FullCGD(p, lr=0.0512, tau=(17.1, 15.3), power=0.40,
                                                                        solver="window", window=args.window),
         args.steps),
        ("FullCGD eigh (Table 2)", lambda p: cgd.FullCGD(p, lr=0.0512, tau=(17.1, 15.3), power=0.40,
                                                         solver="eigh"), args.steps),
    ])

    _, _, grads, _ = train(mlp, full("lanczos"), args.steps, record=True)
    lines += ["", f"## Direction accuracy on the MLP's gradients (n = {n:,}, float32 state)\n",
              f"Relative error |d - d_ref| / |d_ref| against the float64 eq 4.9 reference (tests/python/"
              f"reference_full.py) at steps 1, {1 + args.every}, ... of {args.steps}; tau = (17.1, 15.3), "
              f"power 0.4, centered. The window solver's M2 drops the terms older than {args.window} steps, "
              f"{(15.3 / 16.3) ** args.window:.1e} of the EMA's weight at this beta2, from step {args.window + 1} "
              "on; its errors include that.\n",
              "| start | eigh worst | eigh mean | lanczos worst | lanczos mean | window worst | window mean |",
              "|---|---|---|---|---|---|---|"]
    for start in ("paper", "adam"):
        errors = direction_errors(grads, args.every, start, args.window)
        lines.append(f"| {start} | " + " | ".join(f"{max(errors[k]):.2e} | {statistics.fmean(errors[k]):.2e}"
                                                  for k in ("eigh", "lanczos", "window")) + " |")
        print(lines[-1], file=sys.stderr)

    lines += ["", "## A 100k-parameter model\n",
              f"2-314-314-1 tanh MLP ({sum(p.numel() for p in big_mlp().parameters()):,} parameters) on the same "
              f"task, {args.big_steps} steps, batch 64, the same batches for both, the learning rates of the "
              "2,020-parameter rows above (not tuned here): one n x n M2 would be "
              f"{big_mlp_n() ** 2 * 4 / 2**30:.1f} GiB (float32).\n",
              "| optimizer | final loss (mean of the last 20 steps) | optimizer ms/step | optimizer state |",
              "|---|---|---|---|"]
    for name, make_opt in (("cgd.Adam", lambda p: cgd.Adam(p, lr=1e-3)),
                           (f"FullCGD window {args.window}", lambda p: cgd.FullCGD(p, lr=0.01, solver="window",
                                                                                   window=args.window))):
        times, losses, _, opt = train(big_mlp, make_opt, args.big_steps)
        held = state_held(opt)
        lines.append(f"| {name} | {statistics.fmean(losses[-20:]):.3e} | {ms(times)} | {held / 2**20:.1f} MiB |")
        print(lines[-1], file=sys.stderr)
    report = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
