"""How fast can a ResNet-20 block's reconstruction step be on this CPU? Its convolutions alone.

The step of `speed.py`'s CPU benchmark (CIFAR ResNet-20 `layer2.1`, batch 32, 32 channels at
16x16) must run two 3x3 convolutions forward and backward: the first needs only its weight
gradient (the block input is cached data), the second its weight and input gradients. This script
times exactly that, nothing else (no quantizer arithmetic, no batch gather, no ReLU, no optimizer),
in float32 NCHW and in bf16 autocast with NHWC batches (oneDNN's AMX kernels), then the eager
and the bf16 channels-last reconstruction steps, measured right after by `speed.py` (the same
unit and random data, run as a child process with the same threads). The convolution time is a
floor under any loop that computes this step; the ratio eager / floor bounds the speed-up any loop
can reach.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/cpu_floor.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SPEED = Path(__file__).resolve().parent / "speed.py"

BATCH, CHANNELS, SIZE = 32, 32, 16


def conv_step(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> None:
    """The block's two convolutions, forward and backward, as the reconstruction step needs."""
    w1.grad = w2.grad = None
    y = F.conv2d(F.conv2d(x, w1, padding=1), w2, padding=1)
    y.backward(torch.ones_like(y))


def time_ms(fn, iters: int, repeats: int) -> tuple[float, float]:  # noqa: ANN001
    for _ in range(5):
        fn()
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(iters):
            fn()
        runs.append((time.perf_counter() - started) / iters * 1000)
    return statistics.median(runs), min(runs)


def loop_steps(threads: int, iters: int, repeats: int) -> list[dict]:
    """speed.py's ResNet-20 block rows (`layer2.1`, batch 32) for the eager and bf16 NHWC loops."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "speed.json"
        subprocess.run([sys.executable, str(SPEED), "--device", "cpu", "--threads", str(threads),
                        "--variants", "eager,fast+bf16+cl", "--iters", str(iters),
                        "--repeats", str(repeats), "--skip", "resnet18,pipeline,resnet50-cache",
                        "--out", str(out)], check=True, stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())["units"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=gen)
    w1 = (torch.randn(CHANNELS, CHANNELS, 3, 3, generator=gen) * 0.1).requires_grad_()
    w2 = (torch.randn(CHANNELS, CHANNELS, 3, 3, generator=gen) * 0.1).requires_grad_()
    x_nhwc = x.contiguous(memory_format=torch.channels_last)

    def bf16_step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            conv_step(x_nhwc, w1, w2)

    floors = {
        "convs fp32 NCHW": time_ms(lambda: conv_step(x, w1, w2), args.iters, args.repeats),
        "convs bf16 NHWC": time_ms(bf16_step, args.iters, args.repeats),
    }
    loops = loop_steps(args.threads, args.iters, max(2, args.repeats // 2))
    eager = next(r["median_ms"] for r in loops if r["variant"] == "eager")
    print(f"CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}")
    print(f"{'what':<28}{'median ms':>10}{'min ms':>9}{'eager / it':>12}")
    for name, (median, low) in floors.items():
        print(f"{name:<28}{median:>10.2f}{low:>9.2f}{eager / median:>11.2f}x")
    for r in loops:
        print(f"{'step: ' + r['variant']:<28}{r['median_ms']:>10.2f}{r['min_ms']:>9.2f}"
              f"{eager / r['median_ms']:>11.2f}x")
    print(f"3x the eager step would be {eager / 3:.2f} ms; the bf16 NHWC convolutions alone take "
          f"{floors['convs bf16 NHWC'][0]:.2f} ms of it")
    if args.out:
        args.out.write_text(json.dumps({
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "floors_ms": {k: {"median": m, "min": lo} for k, (m, lo) in floors.items()},
            "loops": loops}, indent=1) + "\n")


if __name__ == "__main__":
    main()
