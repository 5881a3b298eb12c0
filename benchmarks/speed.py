"""Reconstruction speed: per-iteration time of single units and the wall time of a whole run.

Three measurements, each for every loop variant asked for (`eager` is the straightforward loop
of eager_baseline.py, kept as the baseline; `fast` is the library's; `+bf16`/`+compile` add
autocast / torch.compile, `+cl` channels-last batches, `+graph` CUDA graph replay of each step;
without it `fast` is the plain executor with no graph):

  (a) one CIFAR ResNet-20 block (`layer2.1`), batch 32;
  (b) torchvision ResNet-18 `layer1.0` and `layer4.1` at 224x224, batch 32 (random weights and
      inputs: the arithmetic is what is timed);
  (c) the whole ResNet-20 W4A4 BRECQ pipeline at the given budget: wall time, final unit
      losses and, when the data root holds CIFAR-10 and the pretrained weights, top-1 on val.

Per-iteration time is the AdaRound loop of `optimize_unit` (what 20,000 iterations per unit
repeat): (time of N iterations - time of N/5 iterations) / (4N/5), so that what each call pays
once (error evaluations, set-up, CUDA graph capture) cancels out; median over repetitions that
alternate between variants so machine load hits them alike. Also prints the
activation cache each ResNet-50 unit needs for 1,024 images, and peak host / device memory.
Writes benchmarks/results/speed.json with the device name.

    OMP_NUM_THREADS=1 python benchmarks/speed.py --device cpu --threads 1
    python benchmarks/speed.py --device cuda --variants eager,fast,fast+compile,fast+bf16
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import resource
import statistics
import time
from pathlib import Path

import torch

from brecq import BrecqConfig, prepare, quantize
from brecq.models.cifar_resnet import cifar_resnet20
from brecq.recon.cache import FP_OUT, Q_IN, ActivationCache
from brecq.recon.capture import capture
from brecq.recon.executors import GRAPH_WARMUP_STEPS, Executor
from brecq.recon.objective import UnitObjective
from brecq.recon.reconstruct import optimize_unit
from brecq.recon.step import LoopOptions, Schedule
from common import RESULTS, Cifar10, add_data_root_argument
from eager_baseline import in_pipeline, run_eager


def parse_variant(text: str) -> tuple[LoopOptions, Executor | None]:
    """The loop options of a variant and, for `eager`, the baseline executor."""
    loop, *extras = text.split("+")
    unknown = set(extras) - {"bf16", "fp16", "tf32", "compile", "cl", "graph"}
    if loop not in ("eager", "fast") or unknown:
        raise SystemExit(f"variant {text!r}: use eager|fast, optionally +bf16, +tf32, +compile,"
                         " +cl (channels-last), +graph (CUDA graph replay)")
    autocast = next((e for e in extras if e not in ("compile", "cl", "graph")), "none")
    options = LoopOptions(autocast=autocast, compile="compile" in extras,
                          channels_last="cl" in extras, cuda_graph="graph" in extras)
    return options, run_eager if loop == "eager" else None


def variant_arguments(name: str) -> dict:
    """The `options` and `executor` arguments of optimize_unit for variant `name`."""
    options, executor = parse_variant(name)
    return {"options": options, "executor": executor}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def unit_setup(model: torch.nn.Module, unit_name: str, calib: torch.Tensor, device: torch.device):
    """Prepared model, the unit and its cache (quantized inputs, float outputs)."""
    qmodel = prepare(model, BrecqConfig(weight_bits=2, act_bits=None), (calib[:2],)).to(device)
    unit = next(u for u in qmodel.units if u.name == unit_name)
    cache = ActivationCache(device, device)
    capture(qmodel, unit, calib, device, cache, weights=True, acts=False, inputs_key=Q_IN,
            outputs_key=None)
    capture(qmodel, unit, calib, device, cache, weights=False, acts=False, inputs_key=None,
            outputs_key=FP_OUT)
    return qmodel, unit, cache


def time_unit(model: torch.nn.Module, unit_name: str, calib: torch.Tensor, device: torch.device,
              variants: list[str], iters: int, repeats: int, batch: int) -> list[dict]:
    qmodel, unit, cache = unit_setup(model, unit_name, calib, device)
    pairs = [(q, w.detach()) for name in unit.layers
             for _, w, q in qmodel.layers[name].weight_quantizers()]
    schedule = Schedule(iters=iters, batch_size=batch, weight_lr=1e-3, act_lr=0.0,
                        round_lambda=0.01, beta_start=20, beta_end=2, warmup=0.2, loss_p=2.0,
                        drop_prob=0.0)
    objective = UnitObjective(unit.module, cache, 2.0)
    flops = step_flops(objective, len(cache), batch)
    times: dict[str, list[float]] = {v: [] for v in variants}
    losses: dict[str, float] = {}
    # Per-iteration time is the difference of a long and a short run over their iteration
    # difference: what every run pays once (error evaluations, optimizer set-up, CUDA graph
    # capture) cancels out.
    short = max(GRAPH_WARMUP_STEPS + 1, iters // 5)
    with qmodel.quantization(weights=True, acts=False):
        for name in variants:  # warm-up (and compilation) outside the timed repetitions
            optimize_unit(unit.module, cache, pairs, [],
                          dataclasses.replace(schedule, iters=GRAPH_WARMUP_STEPS + 2),
                          torch.Generator().manual_seed(0), **variant_arguments(name))
        for _ in range(repeats):
            for name in variants:
                seconds = {}
                for count in (iters, short):
                    sync(device)
                    started = time.perf_counter()
                    result = optimize_unit(unit.module, cache, pairs, [],
                                           dataclasses.replace(schedule, iters=count),
                                           torch.Generator().manual_seed(0),
                                           **variant_arguments(name))
                    sync(device)
                    seconds[count] = time.perf_counter() - started
                    if count == iters:
                        losses[name] = result.loss_after
                times[name].append((seconds[iters] - seconds[short]) / (iters - short) * 1000)
    return [{"unit": unit_name, "variant": name, "batch": batch, "iters": iters,
             "repeats": repeats, "median_ms": statistics.median(times[name]),
             "min_ms": min(times[name]), "loss_after": losses[name],
             "gflop_per_iter": flops / 1e9,
             "gflops": flops / 1e9 / (statistics.median(times[name]) / 1000)} for name in variants]


def step_flops(objective: UnitObjective, count: int, batch: int) -> float:
    """Floating-point operations of one forward + backward of the unit's loss (matmul/conv)."""
    from torch.utils.flop_counter import FlopCounterMode

    params = [p for p in objective.unit.parameters() if p.requires_grad]
    with FlopCounterMode(display=False) as counter:
        loss = objective.error(torch.arange(min(batch, count)))
        loss.backward()
    for p in params:
        p.grad = None
    return counter.get_total_flops()


def matmul_gflops(device: torch.device) -> float:
    """Float32 matrix-multiply throughput: the practical arithmetic limit of this device."""
    a = torch.randn(2048, 2048, device=device)
    a @ a
    sync(device)
    started = time.perf_counter()
    for _ in range(5):
        a @ a
    sync(device)
    return 5 * 2 * 2048**3 / (time.perf_counter() - started) / 1e9


def pipeline_runs(device: torch.device, variants: list[str], iters_w: int, iters_a: int,
                  calib_size: int, cifar: Cifar10) -> list[dict]:
    """Whole ResNet-20 W4A4 BRECQ runs; real data and weights from the data root when present."""
    real = not cifar.missing(["resnet20"])
    if real:
        from brecq.data import eval_loader
        from brecq.evaluate import evaluate

        model, prep = cifar.build("resnet20")
        calib = cifar.calibration(prep.to_transform(), calib_size, 0)
        val = eval_loader(cifar.data_dir, prep.to_transform(), batch_size=500, num_workers=2)
    else:
        torch.manual_seed(0)
        model, calib = cifar_resnet20(), torch.randn(calib_size, 3, 32, 32)
    model.eval()
    rows = []
    for name in variants:
        options, executor = parse_variant(name)
        config = BrecqConfig(weight_bits=4, act_bits=4, iters_w=iters_w, iters_a=iters_a,
                             calib_size=calib_size, device=str(device),
                             autocast=options.autocast, compile=options.compile,
                             channels_last=options.channels_last,
                             cuda_graph=options.cuda_graph)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        started = time.perf_counter()
        with in_pipeline() if executor is not None else contextlib.nullcontext():
            qmodel, report = quantize(model, calib, config)
        sync(device)
        row = {"variant": name, "iters_w": iters_w, "iters_a": iters_a,
               "wall_seconds": time.perf_counter() - started,
               "final_losses": [round(u.loss_after, 6) for u in report.units],
               "sum_final_loss": sum(u.loss_after for u in report.units),
               "data": "cifar10" if real else "random (no CIFAR-10 under the data root)"}
        if device.type == "cuda":
            row["peak_device_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        if real:
            row["top1"] = evaluate(qmodel, val, device, batch_size=500, progress=False)["top1"]
        rows.append(row)
    return rows


def resnet50_cache_mib(calib_size: int) -> list[dict]:
    """Bytes each ResNet-50 unit caches (quantized inputs + float outputs) for `calib_size` images."""
    from torchvision.models import resnet50

    model = resnet50().eval()
    sample = torch.randn(2, 3, 224, 224)
    qmodel = prepare(model, BrecqConfig(), (sample,))
    rows = []
    for unit in qmodel.units:
        cache = ActivationCache(torch.device("cpu"), torch.device("cpu"))
        capture(qmodel, unit, sample, torch.device("cpu"), cache, weights=False, acts=False,
                inputs_key=Q_IN, outputs_key=FP_OUT)
        rows.append({"unit": unit.name, "cache_mib": cache.nbytes() / 2 * calib_size / 2**20})
    return rows


def torchvision_run(device: torch.device, arch: str, bits: str, calib_size: int, iters_w: int,
                    iters_a: int, budget_gb: float | None) -> dict:
    """A whole BRECQ run of a torchvision model at 224x224 (random weights and images).

    Random weights: what is measured is the wall time of the whole run and where the activation
    caches go (at most `budget_gb` on the device, the rest in pinned host memory), with the peak
    memory that results; not accuracy.
    """
    import torchvision.models

    w_bits, a_bits = (int(v) for v in bits.upper().lstrip("W").split("A"))
    # Per-unit progress with the peak GPU memory so far, in case the run is cut short.
    logging.getLogger("brecq.recon.pipeline").setLevel(logging.INFO)
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)().eval()
    calib = torch.randn(calib_size, 3, 224, 224)
    config = BrecqConfig(weight_bits=w_bits, act_bits=a_bits, iters_w=iters_w, iters_a=iters_a,
                         calib_size=calib_size, device=str(device), cache_budget_gb=budget_gb)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    quantize(model, calib, config)
    sync(device)
    row = {"model": arch, "bits": bits, "calib_size": calib_size, "iters_w": iters_w,
           "iters_a": iters_a, "cache_budget_gb": budget_gb,
           "wall_seconds": time.perf_counter() - started,
           "peak_host_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        row["peak_device_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        row["peak_device_reserved_mib"] = torch.cuda.max_memory_reserved(device) / 2**20
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.add_argument("--variants", default="eager,fast,fast+bf16",
                        help="comma-separated loop variants: eager|fast[+bf16|+tf32][+compile]")
    parser.add_argument("--iters", type=int, default=100, help="timed iterations per repetition")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resnet18-iters", type=int, default=None,
                        help="iterations for the 224x224 units (default: --iters, 10 on CPU)")
    parser.add_argument("--pipeline-iters", default="500,100",
                        help="weight,activation iterations per unit of the whole-run timing;"
                             " 'skip' to leave it out; the paper budget is 20000,5000")
    parser.add_argument("--calib-size", type=int, default=1024)
    parser.add_argument("--whole-run", default="skip", metavar="ARCH:BITS:W,A",
                        help="a whole run of a torchvision model at 224x224 with random weights"
                             " (wall time, peak memory), e.g. resnet50:W4A4:20,10 or"
                             " resnet18:W2A4:20000,5000; default skip")
    parser.add_argument("--cache-budget-gb", type=float, default=4.0,
                        help="device budget of the activation cache in the --whole-run")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out:"
                        " resnet20,resnet18,pipeline,resnet50-cache")
    parser.add_argument("--out", type=Path, default=RESULTS / "speed.json")
    add_data_root_argument(parser)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    variants = args.variants.split(",")
    skip = set(filter(None, args.skip.split(",")))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        platform.processor() or platform.machine())
    result: dict = {"device": str(device), "device_name": name,
                    "torch": torch.__version__, "threads": torch.get_num_threads(),
                    "load_average_start": list(os.getloadavg())}
    result["matmul_gflops"] = matmul_gflops(device)
    print(f"device {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads,"
          f" float32 matmul {result['matmul_gflops']:.0f} GFLOP/s")

    unit_rows = []
    if "resnet20" not in skip:
        torch.manual_seed(0)
        unit_rows += [dict(r, model="cifar_resnet20") for r in time_unit(
            cifar_resnet20().eval(), "layer2.1", torch.randn(256, 3, 32, 32), device, variants,
            args.iters, args.repeats, 32)]
    if "resnet18" not in skip:
        from torchvision.models import resnet18

        torch.manual_seed(0)
        model = resnet18().eval()
        iters = args.resnet18_iters or (10 if device.type == "cpu" else args.iters)
        calib = torch.randn(64, 3, 224, 224)
        for unit in ("layer1.0", "layer4.1"):
            unit_rows += [dict(r, model="resnet18_224") for r in time_unit(
                model, unit, calib, device, variants, iters, max(2, args.repeats // 2), 32)]
    baseline = {(r["model"], r["unit"]): r["median_ms"] for r in unit_rows
                if r["variant"] == "eager"}
    if unit_rows:
        print(f"\n{'model':<16}{'unit':<10}{'variant':<18}{'median ms/it':>13}{'min':>9}"
              f"{'vs eager':>10}{'GFLOP/s':>9}{'loss after':>12}")
    for r in unit_rows:
        base = baseline.get((r["model"], r["unit"]))
        r["speedup_vs_eager"] = base / r["median_ms"] if base else None
        ratio = f"{r['speedup_vs_eager']:.2f}x" if base else "-"
        print(f"{r['model']:<16}{r['unit']:<10}{r['variant']:<18}{r['median_ms']:>13.2f}"
              f"{r['min_ms']:>9.2f}{ratio:>10}{r['gflops']:>9.0f}{r['loss_after']:>12.5g}")
    result["units"] = unit_rows

    if "pipeline" not in skip and args.pipeline_iters != "skip":
        iters_w, iters_a = (int(v) for v in args.pipeline_iters.split(","))
        rows = pipeline_runs(device, variants, iters_w, iters_a, args.calib_size,
                             Cifar10.under(args.data_root))
        print(f"\nResNet-20 W4A4 BRECQ, {iters_w}/{iters_a} iterations per unit, "
              f"{args.calib_size} calibration images ({rows[0]['data']}):")
        for r in rows:
            top1 = f", top-1 {r['top1']:.2f}" if "top1" in r else ""
            mem = f", peak device {r['peak_device_mib']:.0f} MiB" if "peak_device_mib" in r else ""
            print(f"  {r['variant']:<18} {r['wall_seconds']:8.1f} s, sum of final unit losses "
                  f"{r['sum_final_loss']:.5g}{top1}{mem}")
        result["pipeline"] = rows

    if "resnet50-cache" not in skip:
        rows = resnet50_cache_mib(args.calib_size)
        largest = max(rows, key=lambda r: r["cache_mib"])
        print(f"\nResNet-50, {args.calib_size} images: largest unit cache {largest['unit']} "
              f"{largest['cache_mib']:.0f} MiB (inputs + targets, float32); the cache keeps at most"
              " its device budget (--cache-budget-gb) on the GPU and the rest in pinned host memory")
        result["resnet50_cache"] = rows

    if args.whole_run != "skip":
        arch, bits, iters = args.whole_run.split(":")
        iters_w, iters_a = (int(v) for v in iters.split(","))
        row = torchvision_run(device, arch, bits, args.calib_size, iters_w, iters_a,
                              args.cache_budget_gb)
        peak = (f", peak device {row['peak_device_mib']:.0f} MiB allocated"
                f" ({row['peak_device_reserved_mib']:.0f} MiB reserved)"
                if "peak_device_mib" in row else "")
        print(f"\n{arch} {bits}, {args.calib_size} images at 224x224, {iters_w}/{iters_a}"
              f" iterations per unit, cache budget {args.cache_budget_gb} GiB:"
              f" {row['wall_seconds']:.1f} s{peak}, peak host RSS {row['peak_host_rss_mib']:.0f} MiB")
        result["whole_run"] = row

    result["peak_host_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["load_average_end"] = list(os.getloadavg())
    print(f"\npeak host memory (RSS) {result['peak_host_rss_mib']:.0f} MiB")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
