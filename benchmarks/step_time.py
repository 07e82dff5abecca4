"""Optimizer step time: cgd.CGD against torch.optim.AdamW (fused=True and foreach=True) in the same process.

Parameter sets: GPT-2 small's parameter list (124M parameters in 148 tensors) and flat sets of 1M..1B parameters
(split into tensors of at most 16M). Gradients are fixed random tensors; the step is timed alone, with CUDA
events on the GPU. Each diagonal step reads param, grad, M1, M2 and writes param, M1, M2: 28 bytes per fp32
parameter (bf16/fp16 parameters: 22). GB/s is those bytes over the step time; "of copy" divides it by the
bandwidth a device-to-device copy reaches in the same run (read + write of a 1 GiB buffer), the practical peak.
The induced metric's GB/s counts the same bytes, though its norm pass reads the gradient and M2 once more.

    ./run.sh bench                               # GPU when there is one, else a small CPU run
    ./run.sh bench --sizes 1e6 1e8 1e9 --dtype bf16
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
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
    table = {
        "cgd.CGD": lambda p: cgd.CGD(p, lr=1e-4, weight_decay=0.01, nonfinite="ignore"),
        "cgd.CGD nonfinite=raise": lambda p: cgd.CGD(p, lr=1e-4, weight_decay=0.01),
        "cgd.CGD power=0.4": lambda p: cgd.CGD(p, lr=1e-4, power=0.4, weight_decay=0.01, nonfinite="ignore"),
        "cgd.CGD power=0.7": lambda p: cgd.CGD(p, lr=1e-4, power=0.7, weight_decay=0.01, nonfinite="ignore"),
        "cgd.InducedMetric rms": lambda p: cgd.InducedMetric(p, lr=1e-4, gamma="rms", nonfinite="ignore"),
        "AdamW foreach": lambda p: torch.optim.AdamW(p, lr=1e-4, foreach=True),
        # torch has fused AdamW on the CPU too (float32 and others): the reference on every device.
        "AdamW fused": lambda p: torch.optim.AdamW(p, lr=1e-4, fused=True),
    }
    return table


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


def copy_bandwidth(device: torch.device, clock: Clock, nbytes: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * src.numel() * 4 / clock.time(lambda: dst.copy_(src), 20)


def measure(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device, clock: Clock,
            steps: int, copy_bw: float) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(0)
    params = [torch.randn(s, generator=gen, device=device).to(dtype) for s in shapes]
    grads = [torch.randn(s, generator=gen, device=device).to(dtype) * 1e-3 for s in shapes]
    n = sum(p.numel() for p in params)
    bytes_per_param = 3 * params[0].element_size() + 4 * 4  # param read+write, grad read; fp32 M1, M2 read+write
    rows = []
    for name, make in optimizers(device).items():
        for p, g in zip(params, grads):
            p.grad = g
        try:
            opt = make(params)
            for _ in range(3):  # state allocation and warm-up
                opt.step()
            seconds = clock.time(opt.step, steps)
        except (RuntimeError, ValueError) as error:  # e.g. torch's fused AdamW refusing a dtype
            rows.append({"optimizer": name, "error": str(error).splitlines()[0]})
            continue
        finally:
            for p in params:
                p.grad = None
        gbps = n * bytes_per_param / seconds / 1e9
        rows.append({"optimizer": name, "ms": seconds * 1e3, "gbps": gbps, "of_copy": gbps * 1e9 / copy_bw})
        del opt
    fused = next((r for r in rows if r["optimizer"] == "AdamW fused" and "ms" in r), None)
    base = fused or next((r for r in rows if r["optimizer"] == "AdamW foreach" and "ms" in r), None)
    for r in rows:
        if "ms" in r and base:
            r["vs"] = r["ms"] / base["ms"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--sizes", type=float, nargs="*", default=None,
                        help="flat parameter counts (default: 1e6 1e7 1e8 1e9 on a GPU, 1e5 1e6 1e7 on a CPU)")
    parser.add_argument("--no-gpt2", action="store_true", help="skip the GPT-2-small parameter list")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per case (default 50 GPU, 5 CPU)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write the Markdown report here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    sizes = args.sizes if args.sizes is not None else ([1e6, 1e7, 1e8, 1e9] if gpu else [1e5, 1e6, 1e7])
    steps = args.steps or (50 if gpu else 5)
    clock = Clock(device)
    dtype = DTYPES[args.dtype]

    copy_bw = copy_bandwidth(device, clock, (1 << 30) if gpu else (1 << 27))
    cases = ([] if args.no_gpt2 else [("GPT-2 small (148 tensors)", gpt2_small_shapes())])
    cases += [(f"{int(s):,} flat", flat_shapes(int(s))) for s in sizes]
    where = torch.cuda.get_device_name(device) if gpu else f"CPU ({torch.get_num_threads()} threads)"
    command = "./run.sh bench " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [f"# Optimizer step time, {args.dtype} parameters\n",
             f"{where}, torch {torch.__version__}, {datetime.date.today().isoformat()}, `{command.strip()}`\n",
             f"Device-to-device copy: {copy_bw / 1e9:.1f} GB/s. Median of {steps} steps. "
             "\"vs AdamW\" is the step time over fused AdamW's (foreach where fused refuses); < 1 is faster.\n",
             "| parameters | params (M) | optimizer | ms/step | GB/s | of copy | vs AdamW |",
             "|---|---|---|---|---|---|---|"]
    for title, shapes in cases:
        numel = sum(int(torch.Size(s).numel()) for s in shapes)
        for r in measure(shapes, dtype, device, clock, steps, copy_bw):
            if "error" in r:
                lines.append(f"| {title} | {numel / 1e6:.1f} | {r['optimizer']} | refused: {r['error']} | | | |")
            else:
                lines.append(f"| {title} | {numel / 1e6:.1f} | {r['optimizer']} | {r['ms']:.3f} | {r['gbps']:.1f} "
                             f"| {100 * r['of_copy']:.0f}% | {r.get('vs', float('nan')):.2f} |")
            print(lines[-1], file=sys.stderr)
        if gpu:
            torch.cuda.empty_cache()
    emit_report(lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
