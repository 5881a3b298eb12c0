"""Quantize every torchvision classifier and a set of timm families (random weights, small inputs).

For each model: weight layers quantized / weight layers the forward pass uses, the relative
error of the prepared model with quantization switched off (BN folding and layer wrapping alone:
float rounding only, ~1e-6, when the structure is right), W8A8 output
agreement with the float model on a fixed random batch (top-1 agreement and mean cosine of the
logits), and whether BRECQ reconstruction ran (2 + 2 iterations). Scales are min-max (the Lp
search costs minutes per large model on a shared CPU core). Random weights give degenerate
activation scales (timm's EfficientNet init shrinks activations to ~1e-6 by the head), so each
model's BatchNorm statistics are first recomputed on a random batch: that makes the random network
behave like a trained one in scale, which is what the quantizer placement is tested against.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/model_zoo.py --out benchmarks/results/model_zoo

Rows are appended to <out>.jsonl as they finish (a rerun skips models already there) and the
Markdown table <out>.md is rewritten from all rows after each model.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from brecq import BrecqConfig, quantize
from brecq.quant.modules import QUANTIZABLE_LAYERS

TIMM_MODELS = (
    "efficientnet_b0", "tf_efficientnet_b0", "mobilenetv3_large_100", "ghostnet_100", "rexnet_100",
    "regnety_002", "resnet26d", "dla34", "cspresnet50", "convnext_atto", "vit_tiny_patch16_224",
    "deit_tiny_patch16_224", "levit_128s", "mobilevit_xxs", "edgenext_xx_small", "poolformer_s12",
    "mixer_s16_224", "efficientformer_l1", "hrnet_w18_small", "swin_tiny_patch4_window7_224",
)
# Parameter counts of 300M and more: one-image batch (CPU time and memory).
HUGE = ("vit_h_14", "regnet_y_128gf", "vit_l_16", "vit_l_32")
# From 100M parameters on, round-to-nearest without reconstruction: the CPU time of this run
# (shared by other jobs) did not allow it; the smaller models show that reconstruction runs.
NO_RECON_PARAMS = 100e6
# Costly models run last so that a cut-short run still has every other row.
LAST = ("vit_l", "vit_h", "regnet_y_32gf", "regnet_y_16gf", "regnet_y_128gf", "efficientnet_b7",
        "efficientnet_b6", "efficientnet_v2_l", "convnext_large", "swin_v2_b", "swin_b", "maxvit")
SIZES = (64, 96, 128, 224, 299)


def build(name: str) -> nn.Module:
    if name.startswith("timm/"):
        try:
            import timm
        except ImportError:
            raise SystemExit(f"{name} needs timm: pip install -e '.[timm]' (or pass --models "
                             "with torchvision models only)") from None
        return timm.create_model(name[5:], pretrained=False)
    return torchvision.models.get_model(name, weights=None)


@torch.no_grad()
def smallest_input(model: nn.Module, batch: int) -> torch.Tensor:
    for size in SIZES:
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        try:
            model(x[:1])
        except Exception:  # noqa: BLE001 - too small for this model: try the next size
            continue
        return x
    raise RuntimeError(f"no input size of {SIZES} works")


@torch.no_grad()
def randomize_zero_layers(model: nn.Module) -> None:
    """Zero-initialized weight layers (torchvision's ViT head) would make every output 0."""
    for m in model.modules():
        if isinstance(m, QUANTIZABLE_LAYERS) and not m.weight.any():
            nn.init.normal_(m.weight, std=0.02)


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, x: torch.Tensor) -> None:
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches seen
        bn.train()  # only the BatchNorms: the rest (auxiliary heads, dropout) stays in eval
    model(x)
    model.eval()


def weight_layers_used(model: nn.Module, x: torch.Tensor) -> int:
    used = set()
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: used.add(n))
               for n, m in model.named_modules()
               if isinstance(m, (*QUANTIZABLE_LAYERS, nn.MultiheadAttention))]
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    # Layers not called may still be used: code that reads their weight (torchvision's Swin
    # passes qkv.weight to a function). Those get a gradient from the output.
    others = {n: m for n, m in model.named_modules()
              if isinstance(m, QUANTIZABLE_LAYERS) and n not in used}
    if others:
        for m in others.values():
            m.weight.grad = None
        logits(model(x[:1])).sum().backward()
        used |= {n for n, m in others.items() if m.weight.grad is not None}
        model.zero_grad(set_to_none=True)
    # out_proj of a MultiheadAttention is part of the attention layer, not a layer of its own
    return len({n for n in used if not any(n.startswith(o + ".") for o in used)})


@torch.no_grad()
def sensitivity(model: nn.Module, x: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative output change of the float model for a 1e-6 relative input perturbation.

    Some random networks are chaotic (float32 rounding alone moves their output by tens of
    percent): their agreement figures say nothing about the quantizer; this column shows which.
    """
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    out = logits(model(x * (1 + 1e-6 * noise)))
    return float(f"{((out - ref).norm() / ref.norm()).item():.1e}")


def logits(output: object) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output[0]


def run_one(name: str) -> dict:
    short = name.removeprefix("timm/")
    batch = 1 if short in HUGE else 4
    started = time.perf_counter()
    torch.manual_seed(0)
    model = build(name).eval()
    params = sum(p.numel() for p in model.parameters())
    huge = params >= NO_RECON_PARAMS
    randomize_zero_layers(model)
    x = smallest_input(model, max(batch, 2))
    recompute_batchnorm(model, torch.randn(max(batch, 2), *x.shape[1:]))
    x = x[:batch]
    total = weight_layers_used(model, x)
    with torch.no_grad():
        ref = logits(model(x))
    row_sensitivity = sensitivity(model, x, ref)
    config = BrecqConfig(weight_bits=8, act_bits=8, method="rtn" if huge else "brecq", iters_w=2,
                         iters_a=2, calib_size=x.shape[0], batch_size=x.shape[0],
                         act_init_samples=x.shape[0], first_last_bits=None, scale_search="minmax")
    row = {"model": name, "params_m": round(params / 1e6, 1), "input": list(x.shape), "total": total,
           "sensitivity": row_sensitivity}
    try:
        qmodel, _ = quantize(model, x, config)
    except Exception as exc:  # noqa: BLE001 - the row records the failure
        row.update(quantized=0, error=f"{type(exc).__name__}: {str(exc)[:300]}", recon="no")
    else:
        with torch.no_grad():
            out = logits(qmodel(x))
            with qmodel.quantization(weights=False, acts=False):
                exact = logits(qmodel(x))  # folding and wrapping alone: equal to float
        row.update(
            float_rel_err=float(f"{((exact - ref).norm() / ref.norm()).item():.1e}"),
            quantized=len(qmodel.layers), traced=qmodel.traced,
            cosine=round(F.cosine_similarity(ref.flatten(1), out.flatten(1)).mean().item(), 4),
            top1=round((ref.argmax(-1) == out.argmax(-1)).float().mean().item(), 3),
            recon="skipped (rtn, >= 100M params)" if huge else "yes",
        )
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0e}"


def fill_sensitivity(row: dict) -> None:
    """The sensitivity column for a row written before the column existed (same model, input),
    and the used-layer count for rows counted before functional weight reads were."""
    torch.manual_seed(0)
    model = build(row["model"]).eval()
    randomize_zero_layers(model)
    x = smallest_input(model, max(row["input"][0], 2))
    recompute_batchnorm(model, torch.randn(x.shape))
    x = x[: row["input"][0]]
    with torch.no_grad():
        row["sensitivity"] = sensitivity(model, x, logits(model(x)))
    row["total"] = weight_layers_used(model, x)


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | params (M) | input | layers quantized / used | traced | quant-off rel. err |"
        " float sensitivity | W8A8 top-1 agree | W8A8 cosine | reconstruction | s |",
        "|---|---:|---|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in rows:
        shape = "x".join(str(s) for s in r["input"])
        if "error" in r:
            lines.append(f"| {r['model']} | {r['params_m']} | {shape} | 0 / {r['total']} |"
                         f" - | - | - | - | - | error: {r['error'][:120]} | {r['seconds']} |")
            continue
        lines.append(
            f"| {r['model']} | {r['params_m']} | {shape} | {r['quantized']} / {r['total']} |"
            f" {'fx' if r['traced'] else 'module tree'} | {r['float_rel_err']:.0e} |"
            f" {_fmt(r.get('sensitivity'))} | {r['top1']:.2f} |"
            f" {r['cosine']:.4f} |"
            f" {r['recon']} | {r['seconds']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/model_zoo")
    parser.add_argument("--models", help="comma-separated subset (timm ones as timm/<name>)")
    parser.add_argument("--fill-sensitivity", action="store_true",
                        help="first add the sensitivity column to rows that lack it")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    if args.models:
        names = args.models.split(",")
    else:
        tv = torchvision.models.list_models(module=torchvision.models)
        names = [n for n in tv if not any(n.startswith(p) for p in LAST)]
        names += [f"timm/{n}" for n in TIMM_MODELS]
        names += sorted((n for n in tv if any(n.startswith(p) for p in LAST)),
                        key=lambda n: (n in HUGE, n))
    jsonl, md = Path(args.out + ".jsonl"), Path(args.out + ".md")
    jsonl.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()] if jsonl.exists() else []
    done = {r["model"] for r in rows}
    order = {n: i for i, n in enumerate(names)}

    def write_table() -> None:
        md.write_text(markdown(sorted(rows, key=lambda r: order.get(r["model"], len(order)))))

    for row in rows:
        stale = "sensitivity" not in row or row.get("quantized", 0) > row["total"]
        if args.fill_sensitivity and stale and "error" not in row:
            fill_sensitivity(row)
            print(row["model"], row["sensitivity"], flush=True)
            jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
            write_table()
    for name in names:
        if name in done:
            continue
        try:
            row = run_one(name)
        except Exception as exc:  # noqa: BLE001 - a model that fails before quantize is a row too
            row = {"model": name, "params_m": 0, "input": [], "total": 0, "seconds": 0,
                   "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        print(json.dumps(row), flush=True)
        rows.append(row)
        with jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        write_table()


if __name__ == "__main__":
    main()
