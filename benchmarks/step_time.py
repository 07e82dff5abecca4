"""Optimizer step time: cgd.CGD against torch.optim.AdamW (fused=True and foreach=True) in the same process.

Parameter sets: GPT-2 small's parameter list (124M parameters in 148 tensors) and flat sets of 1M..1B parameters
(split into tensors of at most 16M). Gradients are fixed random tensors; the step is timed alone, with CUDA
events on the GPU. Each diagonal step reads param, grad, M1, M2 and writes param, M1, M2: 28 bytes per fp32
parameter (bf16/fp16 parameters: 22). GB/s is those bytes over the step time; "of peak" divides it by the
bandwidth of the faster of two streams timed among the optimizers over the same gradients, a copy (read +
write) and an in-place sum x += g (two reads + one write): the practical peak (Stream).
The induced metric's GB/s counts the same bytes, though its norm pass reads the gradient and M2 once more.

    ./run.sh bench                               # GPU when there is one, else a small CPU run
    ./run.sh bench --sizes 1e6 1e8 1e9 --dtype bf16
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import random
import statistics
import sys
import time
from collections.abc import Callable

import torch

import cgd

RESULTS = pathlib.Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def emit_report(lines: list[str], out: pathlib.Path | None) -> None:
    """Prints the Markdown report, and writes it to `out` when given."""
    report = "\n".join(lines) + "\n"
    print(report)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(report)


def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """GPT-2 small (Radford et al. 2019): 50257-token vocabulary, 1024 positions, 12 layers, 768 wide."""
    d, shapes = 768, [(50257, 768), (1024, 768)]
    for _ in range(12):
        shapes += [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,), (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return shapes + [(d,), (d,)]


def flat_shapes(n: int, largest: int = 1 << 24) -> list[tuple[int, ...]]:
    count = -(-n // largest)
    return [(n // count + (1 if i < n % count else 0),) for i in range(count)]


def optimizers(device: torch.device) -> dict[str, Callable[[list], torch.optim.Optimizer]]:
    """Each cgd row beside the torch row it replaces (fused where torch has a fused kernel, foreach otherwise);
    "vs torch" divides by that row, "vs AdamW" by fused AdamW's."""
    table = {
        "cgd.CGD": lambda p: cgd.CGD(p, lr=1e-4, weight_decay=0.01),
        "cgd.CGD nonfinite=ignore": lambda p: cgd.CGD(p, lr=1e-4, weight_decay=0.01, nonfinite="ignore"),
        "cgd.CGD power=0.4": lambda p: cgd.CGD(p, lr=1e-4, power=0.4, weight_decay=0.01),
        "cgd.CGD power=0.7": lambda p: cgd.CGD(p, lr=1e-4, power=0.7, weight_decay=0.01),
        "cgd.InducedMetric rms": lambda p: cgd.InducedMetric(p, lr=1e-4, gamma="rms", nonfinite="ignore"),
        "cgd.Adam": lambda p: cgd.Adam(p, lr=1e-4),
        "cgd.AdamW": lambda p: cgd.AdamW(p, lr=1e-4),
        "cgd.SGD": lambda p: cgd.SGD(p, lr=1e-4, momentum=0.9),
        "cgd.RMSprop": lambda p: cgd.RMSprop(p, lr=1e-4),
        "Adam fused": lambda p: torch.optim.Adam(p, lr=1e-4, fused=True),
        "SGD fused": lambda p: torch.optim.SGD(p, lr=1e-4, momentum=0.9, fused=True),
        "RMSprop foreach": lambda p: torch.optim.RMSprop(p, lr=1e-4, foreach=True),
        "AdamW foreach": lambda p: torch.optim.AdamW(p, lr=1e-4, foreach=True),
        # torch has fused AdamW on the CPU too (float32 and others): the reference on every device.
        "AdamW fused": lambda p: torch.optim.AdamW(p, lr=1e-4, fused=True),
    }
    return table


# The torch optimizer each preset stands in for.
COUNTERPART = {"cgd.Adam": "Adam fused", "cgd.AdamW": "AdamW fused", "cgd.SGD": "SGD fused",
               "cgd.RMSprop": "RMSprop foreach"}
# Bytes per parameter each row moves beyond the gradient read: SGD keeps one buffer, RMSprop one average.
ONE_STATE = ("cgd.SGD", "SGD fused", "cgd.RMSprop", "RMSprop foreach")


class Clock:
    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def time(self, fn: Callable[[], None], repeats: int) -> float:
        """Median seconds per call over `repeats` timed calls."""
        samples = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                samples.append(time.perf_counter() - t0)
        return statistics.median(samples)


class Stream:
    """A row that moves memory and computes nothing, timed in the same rotation as the optimizers, so "of peak"
    divides by what the machine streamed in the same moments: a copy of the gradients (read + write) and an
    in-place sum x += g (two reads + one write, the access pattern of an optimizer step; on a CPU a copy writes to
    lines it never read, each costing a hidden read for ownership, so the copy alone understates the machine)."""

    def __init__(self, grads: list[torch.Tensor], in_place: bool) -> None:
        self.grads, self.in_place = grads, in_place
        self.scratch = [torch.zeros_like(g) for g in grads]
        self.bytes_per_param = (3 if in_place else 2) * grads[0].element_size()

    def step(self) -> None:
        if self.in_place:
            torch._foreach_add_(self.scratch, self.grads)
        else:
            torch._foreach_copy_(self.scratch, self.grads)


STREAMS = {"stream: copy": False, "stream: x += g": True}


def measure(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device, clock: Clock,
            steps: int) -> list[dict]:
    """Every optimizer steps the same parameters; the timed steps go round the optimizers and the two streams in
    turn (one step each per round, in a shuffled order), so a slow moment of a shared machine falls on all of
    them alike. Median per row; "of peak" divides by the faster stream's GB/s."""
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(s, generator=gen, device=device).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen, device=device).to(dtype) * 1e-3 for s in shapes]
    for p, g in zip(params, grads):
        p.grad = g
    n = sum(p.numel() for p in params)
    rows, live = {}, {}
    for name, make in optimizers(device).items():
        try:
            opt = make(params)
            for _ in range(3):  # state allocation and warm-up
                opt.step()
            live[name] = opt
        except (RuntimeError, ValueError) as error:  # e.g. torch's fused AdamW refusing a dtype
            rows[name] = {"optimizer": name, "error": str(error).splitlines()[0]}
    for name, in_place in STREAMS.items():
        live[name] = Stream(grads, in_place)
        live[name].step()
    samples = {name: [] for name in live}
    # A fixed order would give each row the same predecessor every round (the one after fused AdamW found the
    # caches coldest and read 30% slower on host time than the same code further down): shuffled per round.
    order = random.Random(0)
    for _ in range(steps):
        names = list(live)
        order.shuffle(names)
        for name in names:
            samples[name].append(clock.time(live[name].step, 1))
    names = list(optimizers(device)) + list(STREAMS)
    for name in names:
        if name in rows:
            continue
        seconds = statistics.median(samples[name])
        # param read+write and grad read, plus fp32 state read+write: M1 and M2, or one buffer
        states = 1 if name in ONE_STATE else 2
        bytes_per_param = live[name].bytes_per_param if name in STREAMS else \
            3 * params[0].element_size() + states * 2 * 4
        rows[name] = {"optimizer": name, "ms": seconds * 1e3, "gbps": n * bytes_per_param / seconds / 1e9,
                      "bytes": bytes_per_param}
    live.clear()
    for p in params:
        p.grad = None
    peak = max(rows[name]["gbps"] for name in STREAMS)
    fused = rows.get("AdamW fused")
    base = fused if fused and "ms" in fused else rows.get("AdamW foreach")
    for r in rows.values():
        if "ms" not in r:
            continue
        r["of_peak"] = r["gbps"] / peak
        if base and "ms" in base:
            r["vs"] = r["ms"] / base["ms"]
        twin = rows.get(COUNTERPART.get(r["optimizer"], ""))
        if twin and "ms" in twin:
            r["vs_torch"] = r["ms"] / twin["ms"]
    return [rows[name] for name in names]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--sizes", type=float, nargs="*", default=None,
                        help="flat parameter counts (default: 1e6 1e7 1e8 1e9 on a GPU, 1e5 1e6 1e7 on a CPU)")
    parser.add_argument("--no-gpt2", action="store_true", help="skip the GPT-2-small parameter list")
    parser.add_argument("--tiny", type=int, nargs="*", default=[148, 600],
                        help="host-time cases: this many tensors of 64 elements each (default 148 600)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default 50 GPU, 5 CPU)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write the Markdown report here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    sizes = args.sizes if args.sizes is not None else ([1e6, 1e7, 1e8, 1e9] if gpu else [1e5, 1e6, 1e7])
    steps = args.steps or (50 if gpu else 5)
    clock = Clock(device)
    dtype = DTYPES[args.dtype]

    cases = ([] if args.no_gpt2 else [("GPT-2 small (148 tensors)", gpt2_small_shapes())])
    cases += [(f"{int(s):,} flat", flat_shapes(int(s))) for s in sizes]
    # Tiny tensors: the step is all host work (gathering, checking, launching), the kernels next to nothing.
    cases += [(f"{k} tiny tensors (host time)", [(64,)] * k) for k in args.tiny]
    where = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    command = "./run.sh bench " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# Optimizer step time, {args.dtype} parameters\n",
             f"{where}, torch {torch.__version__}, {datetime.date.today().isoformat()}, `{command.strip()}`\n",
             "\"of peak\" divides a row's GB/s by the faster of two streams timed in the same rotation over the "
             "same gradients, a copy (read + write) and an in-place x += g (two reads + one write). "
             f"Median of {steps} steps. "
             "\"vs AdamW\" is the step time over fused AdamW's (foreach where fused refuses), \"vs torch\" a "
             "preset's over the torch optimizer it replaces (fused where torch has one, else foreach); < 1 is "
             "faster. The steps go round all optimizers in turn, one each per round, in a shuffled order each "
             "round. Bytes per parameter: param read and written, gradient read, and each float32 state tensor "
             "read and written.\n",
             "| parameters | params (M) | optimizer | ms/step | bytes/param | GB/s | of peak | vs AdamW | vs torch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for title, shapes in cases:
        numel = sum(int(torch.Size(s).numel()) for s in shapes)
        for r in measure(shapes, dtype, device, clock, steps):
            if "error" in r:
                lines.append(f"| {title} | {numel / 1e6:.1f} | {r['optimizer']} | refused: {r['error']} | | | | | |")
            else:
                twin = f"{r['vs_torch']:.2f}" if "vs_torch" in r else ""
                lines.append(f"| {title} | {numel / 1e6:.4g} | {r['optimizer']} | {r['ms']:.3f} | {r['bytes']} "
                             f"| {r['gbps']:.1f} | {100 * r['of_peak']:.0f}% | {r.get('vs', float('nan')):.2f} "
                             f"| {twin} |")
            print(lines[-1], file=sys.stderr)
        if gpu:
            torch.cuda.empty_cache()
    emit_report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
