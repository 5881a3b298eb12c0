"""The Pareto front of a search (weight size vs summed sensitivity) as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_pareto(result: dict[str, Any], path: Path, title: str = "") -> None:
    """Front, uniform bit widths and the chosen solution; needs matplotlib (imported here)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    front = result["front"]
    ax.step([p["mean_bits"] for p in front], [p["sensitivity"] for p in front], where="post",
            color="tab:blue", lw=1.2, label="Pareto front (exact)")
    for point in result["uniform"]:
        ax.scatter(point["mean_bits"], point["sensitivity"], marker="s", color="tab:red", zorder=3)
        ax.annotate(f"uniform W{point['bits']}", (point["mean_bits"], point["sensitivity"]),
                    textcoords="offset points", xytext=(5, 5), fontsize=8)
    chosen = result["chosen"]
    ax.scatter(chosen["mean_bits"], chosen["sensitivity"], marker="*", s=160, color="tab:green",
               zorder=4, label=f"chosen ({chosen['solver']}, budget {chosen['size_budget']})")
    ax.axvline(chosen["budget_mean_bits"], color="gray", ls="--", lw=1, label="size budget")
    ax.set_yscale("log")
    ax.set_xlabel("weight size (mean bits per weight, all layers)")
    ax.set_ylabel("summed unit sensitivity")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
