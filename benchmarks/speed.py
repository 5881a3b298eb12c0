"""Time per reconstruction iteration of one unit (the eager loop as it is today).

A first measurement for the speed work: median milliseconds per AdaRound iteration of a CIFAR
ResNet-20 block (batch 32) on the chosen device, for each CPU thread count asked for. Writes
benchmarks/results/speed.json with the device name.

    OMP_NUM_THREADS=1 python benchmarks/speed.py --threads 1,2 --iters 200
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from brecq import BrecqConfig, prepare
from brecq.quant import state
from brecq.recon.cache import ActivationCache
from brecq.recon.pipeline import capture
from brecq.recon.reconstruct import FP_OUT, Q_IN, UnitObjective

RESULTS = Path(__file__).resolve().parent / "results"


def time_unit_iterations(unit_name: str, iters: int, batch: int, device: torch.device) -> list[float]:
    from brecq.models.cifar_resnet import cifar_resnet20

    torch.manual_seed(0)
    model = cifar_resnet20().eval()
    calib = torch.randn(256, 3, 32, 32)
    qmodel = prepare(model, BrecqConfig(weight_bits=2, act_bits=None), (calib[:2],)).to(device)
    unit = next(u for u in qmodel.units if u.name == unit_name)
    cache = ActivationCache(device, device)
    capture(qmodel, unit, calib, device, cache, weights=True, acts=False, inputs_key=Q_IN,
            outputs_key=None)
    capture(qmodel, unit, calib, device, cache, weights=False, acts=False, inputs_key=None,
            outputs_key=FP_OUT)
    quantizers = [q for name in unit.layers for _, w, q in qmodel.layers[name].weight_quantizers()]
    weights = [w for name in unit.layers for _, w, _ in qmodel.layers[name].weight_quantizers()]
    params = [q.begin_adaround(w.detach()) for q, w in zip(quantizers, weights)]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    objective = UnitObjective(unit.module, cache, 2.0)
    generator = torch.Generator().manual_seed(0)
    times = []
    with state.soft_rounding(quantizers):
        for _ in range(iters):
            started = time.perf_counter()
            index = torch.randint(len(cache), (batch,), generator=generator)
            loss = objective.error(index) + 0.01 * sum(q.regularizer(10.0) for q in quantizers)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - started) * 1000)
    return times[iters // 10 :]  # drop the warm-up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", default="1,2", help="comma-separated CPU thread counts")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--unit", default="layer2.1", help="ResNet-20 unit to time")
    args = parser.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        times = time_unit_iterations(args.unit, args.iters, args.batch, device)
        rows.append({"device": str(device), "device_name": name or platform.machine(),
                     "threads": threads, "unit": args.unit, "batch": args.batch,
                     "median_ms": statistics.median(times), "min_ms": min(times),
                     "iterations_timed": len(times)})
        print(f"{args.unit} batch {args.batch} on {device} ({threads} threads): "
              f"median {rows[-1]['median_ms']:.2f} ms/iteration, min {rows[-1]['min_ms']:.2f} ms")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speed.json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
