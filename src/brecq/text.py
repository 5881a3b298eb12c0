"""Plain-text tables for people: the report's units, a quantized model's units."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]],
                 right: Sequence[int] = ()) -> str:
    """Columns padded to their widest cell (those in `right` right-aligned), a rule under the
    header; the last column is left ragged."""
    lines = [list(header), *[list(r) for r in rows]]
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]

    def render(line: list[str]) -> str:
        cells = [cell.rjust(w) if c in right else cell.ljust(w)
                 for c, (cell, w) in enumerate(zip(line, widths))]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([render(lines[0]), rule, *(render(line) for line in lines[1:])])


def bits_summary(bits: dict[str, int]) -> str:
    """'4' when all layers share a width, else the common width and the others: '4 (fc:8)'."""
    if not bits:
        return "-"
    values = list(bits.values())
    common = max(set(values), key=values.count)
    others = [f"{n}:{b}" for n, b in bits.items() if b != common]
    return str(common) + (f" ({', '.join(others)})" if others else "")


def units_table(rows: Sequence[dict]) -> str:
    """The table of `QuantizedModel.describe_rows()`: one line per reconstruction unit."""
    body = []
    for i, row in enumerate(rows):
        acts = ", ".join(f"{n}={b}" for n, b in row["act_quantizers"].items()) or "-"
        body.append([str(i), row["name"], row["kind"], str(len(row["layers"])),
                     f"{row['params']:,}", bits_summary(row["weight_bits"]), acts])
    return format_table(["#", "unit", "kind", "layers", "params", "weight bits",
                         "act quantizers (=bits)"], body, right=(0, 3, 4))
