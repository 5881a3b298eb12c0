"""`brecq search-bits`: per-layer weight bits under a size budget (mixed precision)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from ..data import load_calibration
from ..search import SearchConfig, allocate_bits, measure_sensitivity
from ..search.plot import plot_pareto
from . import common
from .flags import (
    add_config_arguments,
    add_dataclass_arguments,
    config_from_args,
    given_dataclass_values,
    help_group,
)


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    parser = common.add_command(
        subparsers, "search-bits", run, model="required", data="calibration",
        summary="choose per-layer weight bits under a size budget (mixed precision)",
        description="Measure each unit's sensitivity to candidate bit widths on calibration "
        "images from DATA/train, then choose per-layer bits under --size-budget with a genetic "
        "algorithm (checked by an exact solver). Writes OUT/bits.json for `brecq quantize "
        "--bits-config` and the Pareto front (pareto.json, pareto.png).",
    )
    output = help_group(parser, "output")
    output.add_argument("--out", metavar="DIR", required=True,
                        help="output folder for bits.json, pareto.json/png and sensitivity.json")
    output.add_argument("--sensitivity-cache", metavar="FILE",
                        help="sensitivity table to reuse and update (default: OUT/sensitivity.json);"
                        " share it between searches with other budgets")
    add_dataclass_arguments(parser.add_argument_group("search options"), SearchConfig)
    add_config_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.data is None:
        raise common.UsageError("search-bits needs --data DIR (calibration images in DIR/train/<class>/)")
    config = config_from_args(args)
    search = SearchConfig(**given_dataclass_values(args, SearchConfig))
    started = time.perf_counter()
    model, base_prep = common.build_model_from_args(args)
    prep = common.preprocessing_from_args(args, base_prep)
    out = common.make_out_dir(args.out)
    cache = Path(args.sensitivity_cache).expanduser() if args.sensitivity_cache else (
        out / "sensitivity.json")
    samples = load_calibration(args.data, prep, num_samples=search.samples, seed=config.seed,
                               strict=args.strict)
    table = measure_sensitivity(model, samples, config, search, cache)
    found = allocate_bits(table, search, seed=config.seed)
    params = sum(info.params for info in table.layers.values())
    chosen = {k: v for k, v in found.to_dict().items() if k not in ("bits", "front", "uniform")}
    chosen["budget_mean_bits"] = found.budget_bits / params
    common.write_json(out / "bits.json", {"bits": found.bits, "model": args.model, "search": chosen,
                                          "search_config": search.to_dict(),
                                          "config": config.to_dict()})
    pareto = {"chosen": chosen, "uniform": found.uniform, "front": found.front}
    common.write_json(out / "pareto.json", pareto)
    try:
        plot_pareto(pareto, out / "pareto.png", title=f"{args.model}: size vs sensitivity")
        plotted = True
    except ImportError:
        common.logger.warning("matplotlib is not installed: pareto.png not written (pip install "
                              "matplotlib)")
        plotted = False
    _print_search(args.model, table, search, found, cache)
    print(f"Wrote {out / 'bits.json'} (use: brecq quantize ... --bits-config {out / 'bits.json'}), "
          f"{out / 'pareto.json'}" + (f", {out / 'pareto.png'}" if plotted else "")
          + f" in {time.perf_counter() - started:.0f}s")
    return 0


def _print_search(model: str, table: Any, search: SearchConfig, found: Any, cache: Path) -> None:
    """The budget, the chosen allocation against uniform bit widths, and every layer's bits."""
    params = sum(info.params for info in table.layers.values())
    print(f"Model {model}: {len(table.layers)} weight layers, {params:,} weights, "
          f"{len(table.units)} units; sensitivity table {cache}")
    print(f"Size budget {search.size_budget}: {found.budget_bits:,} bits "
          f"({found.budget_bits / 8000:.2f} kB, {found.budget_bits / params:.3f} bits/weight)"
          + (f"; BitOPs budget {search.bitops_budget}: {found.bitops_limit:,}"
             if found.bitops_limit is not None else ""))
    print(f"Chosen: {found.size_bits:,} bits ({found.mean_bits:.3f} bits/weight), "
          f"BitOPs {found.bitops:,}, summed sensitivity {found.sensitivity:.6g} ({found.solver}; "
          f"GA {found.genetic_sensitivity:.6g}"
          + (f", exact optimum {found.exact_sensitivity:.6g}" if found.exact_sensitivity is not None
             else "") + ")")
    for point in found.uniform:
        print(f"  uniform W{point['bits']}: {point['size_bits']:,} bits, "
              f"sensitivity {point['sensitivity']:.6g}")
    width = max(len(n) for n in found.bits)
    for unit in table.units:
        for name in unit.layers:
            print(f"  {name:{width}s}  {found.bits[name]} bits  ({table.layers[name].params:,} "
                  f"weights, unit {unit.name})")
