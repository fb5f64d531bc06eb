"""The "Analyze" button: θ per block from merge_lab.analysis, shown as an HTML table and a heatmap image.

Integration point with the engine's analysis (one code path for the CLI, the UI, the HTTP route and
Model Stock's block granularity); this module only lays its numbers out for the tab.
"""

from __future__ import annotations

import html
import importlib
import os
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from merge_lab.engine.recipe import Recipe
from merge_lab.errors import RecipeError


@dataclass
class AnalysisReport:
    table_html: str
    heatmap: Any  # PIL image
    summary: str
    data: dict[str, Any]  # the JSON form (also the HTTP route's answer)


def _module(name: str):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name != name:
            raise
        raise RecipeError(f"θ analysis is not part of this build ({name} is missing)") from None


def engine_report(recipe: Recipe, *, progress: Callable[[int, int, str], None] | None = None,
                  cancel: threading.Event | None = None):
    """merge_lab.analysis's report: θ per block between every pair of the recipe's models (task vectors when
    it has a base). Its as_dict() is the HTTP route's answer."""
    analysis = _module("merge_lab.analysis")
    return analysis.analyze(recipe.expanded_models(), recipe.base, threads=recipe.threads, device=recipe.device,
                            memory_budget=recipe.memory_budget, precision=recipe.precision,
                            nonfinite=recipe.nonfinite, progress=progress, cancel=cancel)


def analyze(recipe: Recipe, *, progress: Callable[[int, int, str], None] | None = None,
            cancel: threading.Event | None = None) -> AnalysisReport:
    """The engine's report laid out for the tab: an HTML table and the heatmap image."""
    report = engine_report(recipe, progress=progress, cancel=cancel)
    blocks = [b.block for b in report.blocks]
    columns = [*(f"θ {label}" for label in report.pair_labels), "mean"]
    rows = [[*b.angles, b.mean_angle] for b in report.blocks]
    legend = "".join(f"<li>{i + 1} = {html.escape(name)}</li>" for i, name in enumerate(report.models))
    vectors = f"task vectors (model − {html.escape(report.base)})" if report.base else "raw weights (no base)"
    table = (f"<p>θ per block in degrees between {vectors}:</p><ul>{legend}</ul>"
             + table_html(blocks, columns, rows))
    return AnalysisReport(table, _heatmap_image(report), _summary(report), report.as_dict())


def _heatmap_image(report):
    heatmap = _module("merge_lab.plot.heatmap")
    from PIL import Image

    with tempfile.TemporaryDirectory(prefix="merge-lab-heatmap-") as folder:
        path = os.path.join(folder, "heatmap.png")
        heatmap.render_heatmap(report, path)
        with Image.open(path) as image:
            return image.copy()


def _summary(report) -> str:
    whole = next((b for b in report.blocks if b.block == "ALL"), None)
    mean = "" if whole is None or whole.mean_angle is None else f"; whole model {whole.mean_angle:.2f}°"
    return (f"θ per block for {len(report.models)} models ({len(report.pair_labels)} pair(s)) in "
            f"{report.seconds:.1f} s{mean}")


def table_html(blocks: list[str], columns: list[str], rows: list[list[float | None]]) -> str:
    """A plain table (degrees, 1 decimal; undefined angles shown as 'undefined', never 0)."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["block", *columns])
    body = []
    for block, values in zip(blocks, rows):
        cells = "".join(
            f"<td>{'undefined' if v is None else f'{v:.1f}°'}</td>" for v in values)
        body.append(f"<tr><th>{html.escape(block)}</th>{cells}</tr>")
    return (f"<table class='merge-lab-theta'><thead><tr>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")
