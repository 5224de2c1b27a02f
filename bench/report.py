"""Print a benchmark's tables and keep its results as JSON and PNG."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.harness import RESULTS, machine

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Cell = str | int | float | None


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Cell]]) -> str:
    """Return rows as a Markdown table, numbers right-aligned."""
    text = [[_cell(value) for value in row] for row in rows]
    widths = [
        max(len(header), *(len(row[i]) for row in text))
        for i, header in enumerate(headers)
    ]
    numeric = [
        all(isinstance(row[i], int | float) or row[i] is None for row in rows)
        for i in range(len(headers))
    ]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(cells, widths, numeric, strict=True)
        ]
        return "| " + " | ".join(padded) + " |"

    rule = [
        "-" * (width - 1) + ":" if right else "-" * width
        for width, right in zip(widths, numeric, strict=True)
    ]

    return "\n".join([line(headers), line(rule), *(line(row) for row in text)])


def _cell(value: Cell) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if 0 < abs(value) < 0.1:
            return f"{value:.3f}"
        return f"{value:,.2f}" if abs(value) < 10 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"

    return value


def ratio(value: float, baseline: float) -> float | None:
    """Return ``value / baseline`` rounded, or None when the baseline is 0."""
    return round(value / baseline, 3) if baseline else None


def save(name: str, results: dict[str, Any], figure: Figure | None = None) -> Path:
    """Write ``bench/results/<name>.json`` (and ``.png``); return the JSON path."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    document = {"benchmark": name, "machine": machine(), **results}
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    if figure is not None:
        figure.savefig(RESULTS / f"{name}.png", dpi=110, bbox_inches="tight")
    print(f"\nResults: {path}" + (f" and {path.with_suffix('.png')}" if figure else ""))

    return path


def new_figure(columns: int = 1, *, width: float = 6.0) -> tuple[Figure, Any]:
    """Return a figure with ``columns`` side-by-side axes, drawn off-screen."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, columns, figsize=(width * columns, 4))

    return figure, axes
