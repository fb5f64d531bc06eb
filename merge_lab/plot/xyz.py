"""The X/Y/Z plot of merge settings without a web UI: a labelled grid of previews over up to three axes.

Axes (``NAME=VALUES``):

==================  =============================================  ==============
axis                values                                          re-merges?
==================  =============================================  ==============
``alpha``           global ratio α                                  yes
``block:NAME``      one block's ratio (IN04, M00, OUT11, VAE, …)    yes
``blocks``          whole MBW strings or preset names, ``|``-sep.   yes
``method``          merge methods                                   yes
``param:NAME``      a method parameter                              yes
``merge_seed``      seed of the drop masks                          yes
``models``          model lists, ``|`` between lists, ``,`` within  yes
``seed``            image seed                                      no
``prompt``          prompts                                         no
``negative_prompt`` negative prompts                                no
``steps``           sampling steps                                  no
``cfg``             CFG scale                                       no
``sampler``         samplers                                        no
==================  =============================================  ==============

Values are separated by ``,`` — or by ``|`` when the text contains one (always for ``blocks`` and
``models``, whose values hold commas). Numeric axes also take ranges: ``0-1[5]`` (5 evenly spaced values),
``0.2-1(+0.2)`` (a step), and for integer axes ``1-4``.

Every distinct recipe is merged once: cells are grouped by the engine's recipe hash (its fingerprint: two
recipes written differently that give the same weights share one merge), each group is merged, all its
cells are rendered, and the weights are dropped before the next merge; at most one merged model is in
memory however many cells. Every cell renders with the same seed unless ``seed`` is an axis.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from itertools import product
from pathlib import Path
from typing import Any

from merge_lab import __version__
from merge_lab.engine.recipe import Recipe
from merge_lab.errors import MergeLabError

MERGE_AXES = ("alpha", "block", "blocks", "method", "param", "merge_seed", "models")
RENDER_AXES = ("seed", "prompt", "negative_prompt", "steps", "cfg", "sampler")
NAMED_AXES = ("block", "param")  # written NAME:SUBNAME
FLOAT_AXES = ("alpha", "block", "cfg")
INT_AXES = ("seed", "merge_seed", "steps")
PIPE_ONLY_AXES = ("blocks", "models")


@dataclass
class Axis:
    kind: str
    name: str | None
    values: list[Any]
    spec: str = ""

    @property
    def changes_merge(self) -> bool:
        return self.kind in MERGE_AXES

    @property
    def label(self) -> str:
        if self.kind == "block":
            return str(self.name)
        if self.kind == "param":
            return str(self.name)
        return {"cfg": "CFG scale", "merge_seed": "merge seed", "negative_prompt": "negative prompt"}.get(
            self.kind, self.kind)

    def value_label(self, value: Any) -> str:
        if self.kind == "models":
            return " + ".join(Path(m).stem for m in value)
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)

    def header(self, value: Any) -> str:
        return f"{self.label}: {self.value_label(value)}"

    def apply(self, recipe: Recipe, settings, value: Any):
        """(recipe, settings) with this axis set to `value` (copies; the inputs are not changed)."""
        recipe = copy.deepcopy(recipe)
        if self.kind == "alpha":
            recipe.alpha = value
        elif self.kind == "block":
            recipe.block = {**recipe.block, self.name: value}
        elif self.kind == "blocks":
            recipe.blocks = value
        elif self.kind == "method":
            recipe.method = value
        elif self.kind == "param":
            recipe.params = {**recipe.params, self.name: value}
        elif self.kind == "merge_seed":
            recipe.seed = value
        elif self.kind == "models":
            recipe.models = list(value)
        elif self.kind == "seed":
            settings = replace(settings, seed=value)
        elif self.kind == "prompt":
            settings = replace(settings, prompt=value)
        elif self.kind == "negative_prompt":
            settings = replace(settings, negative_prompt=value)
        elif self.kind == "steps":
            settings = replace(settings, steps=value)
        elif self.kind == "cfg":
            settings = replace(settings, cfg_scale=value)
        elif self.kind == "sampler":
            settings = replace(settings, sampler=value)
        return recipe, settings


_NUMBER = r"[+-]?(?:\d+\.?\d*|\.\d+)"
_RANGE_COUNT = re.compile(rf"^({_NUMBER})\s*-\s*({_NUMBER})\s*\[\s*(\d+)\s*\]$")
_RANGE_STEP = re.compile(rf"^({_NUMBER})\s*-\s*({_NUMBER})\s*\(\s*({_NUMBER})\s*\)$")
_RANGE_INT = re.compile(r"^([+-]?\d+)\s*-\s*([+-]?\d+)$")


def _expand_number(text: str, integer: bool, where: str) -> list[float | int]:
    conv = int if integer else float

    def number(s):
        try:
            value = float(s)
        except ValueError:
            raise MergeLabError(f"{where}: {s!r} is not a number") from None
        if integer and value != int(value):
            raise MergeLabError(f"{where}: {s!r} is not an integer")
        return conv(value)

    m = _RANGE_COUNT.match(text)
    if m:
        start, end, count = number(m.group(1)), number(m.group(2)), int(m.group(3))
        if count < 1 or count > 1000:
            raise MergeLabError(f"{where}: range count must be from 1 to 1000, got {count}")
        if count == 1:
            return [start]
        values = [start + (end - start) * i / (count - 1) for i in range(count)]
        return [conv(round(v)) if integer else round(v, 10) for v in values]
    m = _RANGE_STEP.match(text)
    if m:
        start, end, step = number(m.group(1)), number(m.group(2)), number(m.group(3))
        if step == 0 or (end - start) * step < 0:
            raise MergeLabError(f"{where}: step {step:g} does not go from {start:g} to {end:g}")
        n = math.floor((end - start) / step + 1e-9) + 1
        if n > 1000:
            raise MergeLabError(f"{where}: range gives {n} values (at most 1000)")
        return [conv(start + i * step) if integer else round(start + i * step, 10) for i in range(n)]
    if integer:
        m = _RANGE_INT.match(text)
        if m:
            start, end = int(m.group(1)), int(m.group(2))
            if abs(end - start) >= 1000:
                raise MergeLabError(f"{where}: range gives more than 1000 values")
            step = 1 if end >= start else -1
            return list(range(start, end + step, step))
    return [number(text)]


def parse_axis(spec: str, where: str = "axis") -> Axis:
    """'alpha=0.2,0.5,0.8', 'block:IN04=0-1[3]', 'method=weighted_sum,slerp', 'models=a,b|a,c', …"""
    name, sep, text = spec.partition("=")
    if not sep:
        raise MergeLabError(f"{where}: expected NAME=VALUES, got {spec!r}")
    name = name.strip()
    kind, _, sub = name.partition(":")
    kind = kind.strip().lower()
    if kind in ("cfg_scale",):
        kind = "cfg"
    if kind not in MERGE_AXES + RENDER_AXES:
        raise MergeLabError(f"{where}: unknown axis {name!r} (valid: alpha, block:NAME, blocks, method, param:NAME, "
                            "merge_seed, models, seed, prompt, negative_prompt, steps, cfg, sampler)")
    if (kind in NAMED_AXES) != bool(sub.strip()):
        raise MergeLabError(f"{where}: axis {kind} needs a name, e.g. {kind}:IN04" if kind in NAMED_AXES else
                            f"{where}: axis {kind} takes no name")
    sub = sub.strip()
    if kind == "block":
        sub = sub.upper()
    separator = "|" if kind in PIPE_ONLY_AXES or "|" in text else ","
    raw = [part.strip() for part in text.split(separator)]
    raw = [part for part in raw if part]
    if not raw:
        raise MergeLabError(f"{where}: axis {name} has no values")
    values: list[Any] = []
    for part in raw:
        if kind in FLOAT_AXES or kind in INT_AXES:
            values.extend(_expand_number(part, kind in INT_AXES, f"{where} {name}"))
        elif kind == "models":
            models = [m.strip() for m in part.split(",") if m.strip()]
            values.append(models)
        elif kind == "sampler":
            from merge_lab.preview.settings import find_sampler

            values.append(find_sampler(part).name)
        else:
            values.append(part)
    return Axis(kind, sub or None, values, spec)


@dataclass
class Cell:
    index: tuple[int, int, int]  # (z, y, x)
    labels: tuple[str | None, str | None, str | None]  # (x, y, z) value labels
    recipe: Recipe
    settings: Any  # PreviewSettings
    fingerprint: str = ""
    model_name: str = ""
    image: str = ""  # path relative to the output folder
    seconds: float = 0.0

    def describe(self) -> str:
        return ", ".join(label for label in self.labels if label is not None) or "the base recipe"


@dataclass
class XYZResult:
    out_dir: Path
    cells: list[Cell]
    grids: list[Path]
    json_path: Path
    csv_path: Path
    merges: int
    cache_hits: int
    seconds: float
    axes: dict[str, Axis] = field(default_factory=dict)


def _cells(recipe: Recipe, settings, axes: dict[str, Axis | None]) -> list[Cell]:
    x, y, z = axes["x"], axes["y"], axes["z"]
    xs = list(enumerate(x.values)) if x else [(0, None)]
    ys = list(enumerate(y.values)) if y else [(0, None)]
    zs = list(enumerate(z.values)) if z else [(0, None)]
    cells = []
    for (zi, zv), (yi, yv), (xi, xv) in product(zs, ys, xs):
        r, s = recipe, settings
        for axis, value in ((x, xv), (y, yv), (z, zv)):
            if axis is not None:
                r, s = axis.apply(r, s, value)
        labels = tuple(axis.header(v) if axis is not None else None for axis, v in ((x, xv), (y, yv), (z, zv)))
        cells.append(Cell((zi, yi, xi), labels, r, s))
    return cells


def _fingerprints(cells: list[Cell]) -> None:
    """The engine's recipe hash of every cell (headers and cached input hashes only; nothing merged yet)."""
    from merge_lab.engine import prepare

    seen: dict[str, str] = {}
    for cell in cells:
        key = json.dumps(cell.recipe.to_dict(), sort_keys=True, default=str)
        if key not in seen:
            try:
                with prepare(cell.recipe) as plan:
                    seen[key] = plan.fingerprint
            except MergeLabError as e:
                raise MergeLabError(f"xyz cell ({cell.describe()}): {e}") from None
        cell.fingerprint = seen[key]


def run_xyz(recipe: Recipe, settings, out_dir: str | os.PathLike, *, x: Axis | None, y: Axis | None = None,
            z: Axis | None = None, progress: bool = True, cache=None, min_cell: int = 128,
            merge: Callable | None = None, components=()) -> XYZResult:
    """Merge, render and draw the grid(s). `merge` (default engine.merge_to_state_dict) is injectable for
    tests; `cache` is the preview PipelineCache (default: the shared one); `components`: files giving a
    Flux / Chroma / SD3 model's text encoders or VAE."""
    from tqdm import tqdm

    from merge_lab.engine import merge_to_state_dict
    from merge_lab.plot.grid import draw_grid
    from merge_lab.preview.infotext import merged_model_name, save_png
    from merge_lab.preview.pipeline import default_cache, render_merge
    from merge_lab.preview.settings import PreviewSettings

    start = time.perf_counter()
    if x is None and (y is not None or z is not None):
        raise MergeLabError("xyz: give --x before --y / --z")
    merge = merge or merge_to_state_dict
    cache = cache or default_cache()
    settings = replace(settings or PreviewSettings(), batch_size=1).resolved()
    recipe = copy.deepcopy(recipe)
    recipe.out = None
    axes = {"x": x, "y": y, "z": z}
    cells = _cells(recipe, settings, axes)
    for cell in cells:
        try:
            cell.settings.validate()
        except MergeLabError as e:
            raise MergeLabError(f"xyz cell ({cell.describe()}): {e}") from None
    _fingerprints(cells)

    # Group by recipe hash in order of first appearance: each group is merged once and fully rendered.
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        groups.setdefault(cell.fingerprint, []).append(cell)
    out = Path(out_dir)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    merges = hits = 0
    images: dict[tuple[int, int, int], Any] = {}
    bar = tqdm(total=len(cells), desc="xyz", unit="cell", disable=not progress, dynamic_ncols=True)
    try:
        for fingerprint, group in groups.items():
            bar.set_postfix_str(f"merging {merges + 1}/{len(groups)}")
            result = merge(group[0].recipe)
            if result.fingerprint != fingerprint:
                raise RuntimeError("the merge's recipe hash differs from the planned one")
            merges += 1
            bar.set_postfix_str(f"merge {merges}/{len(groups)}, rendering")
            for i, cell in enumerate(group):
                if i:
                    hits += 1  # the merged weights of this recipe are already loaded
                t0 = time.perf_counter()
                image = render_merge(result, cell.settings, consume=True, cache=cache, components=components)[0]
                cell.seconds = time.perf_counter() - t0
                cell.model_name = merged_model_name(result)
                zi, yi, xi = cell.index
                cell.image = f"cells/z{zi}-y{yi}-x{xi}.png"
                save_png(image, out / cell.image)
                images[cell.index] = image
                bar.update(1)
            del result
            cache.release_weights()  # at most one merged model in memory
    finally:
        bar.close()

    grids = []
    zs = list(enumerate(z.values)) if z else [(0, None)]
    ys = list(enumerate(y.values)) if y else [(0, None)]
    xs = list(enumerate(x.values)) if x else [(0, None)]
    for zi, zv in zs:
        rows = [[images[(zi, yi, xi)] for xi, _ in xs] for yi, _ in ys]
        col_labels = [x.header(v) if x else "" for _, v in xs]
        row_labels = [y.header(v) if y else "" for _, v in ys]
        title = _title(recipe, settings, axes, zv)
        grid, _layout = draw_grid(rows, col_labels, row_labels, title, min_cell=min_cell)
        first = rows[0][0]
        grid.info["parameters"] = first.info.get("parameters", "")
        grid.info["merge_lab_recipe"] = json.dumps({"xyz": _axes_record(axes), "base": recipe.to_dict()},
                                                   sort_keys=True, default=str)
        name = "xyz-grid.png" if z is None else f"xyz-grid-z{zi}-{_slug(z.value_label(zv))}.png"
        grids.append(save_png(grid, out / name))

    seconds = time.perf_counter() - start
    json_path, csv_path = out / "xyz.json", out / "xyz.csv"
    record = {
        "version": __version__,
        "axes": _axes_record(axes),
        "base_recipe": recipe.to_dict(),
        "settings": settings.to_dict(),
        "merges": merges,
        "cache_hits": hits,
        "seconds": round(seconds, 3),
        "grids": [{"z": z.value_label(zv) if z else None, "path": g.name} for g, (_, zv) in zip(grids, zs)],
        "cells": [_cell_record(cell, axes) for cell in cells],
    }
    json_path.write_text(json.dumps(record, indent=2, default=str), encoding="utf-8")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["x", "y", "z", "recipe_hash", "model", "seed", "prompt", "image"])
        for cell in cells:
            rec = _cell_record(cell, axes)
            writer.writerow([rec["x"], rec["y"], rec["z"], cell.fingerprint, cell.model_name, cell.settings.seed,
                             cell.settings.prompt, cell.image])
    return XYZResult(out, cells, grids, json_path, csv_path, merges, hits, seconds, axes)


def _slug(text: str) -> str:
    return re.sub(r"[^\w.+-]+", "_", text).strip("_")[:60] or "value"


def _axes_record(axes: dict[str, Axis | None]) -> dict[str, Any]:
    return {name: None if a is None else {"axis": a.kind if a.name is None else f"{a.kind}:{a.name}",
                                          "label": a.label, "spec": a.spec,
                                          "values": [a.value_label(v) for v in a.values]}
            for name, a in axes.items()}


def _cell_record(cell: Cell, axes: dict[str, Axis | None]) -> dict[str, Any]:
    zi, yi, xi = cell.index
    rec: dict[str, Any] = {}
    for name, index in (("x", xi), ("y", yi), ("z", zi)):
        axis = axes[name]
        rec[name] = axis.value_label(axis.values[index]) if axis else None
    rec.update({"index": {"x": xi, "y": yi, "z": zi}, "recipe_hash": cell.fingerprint, "model": cell.model_name,
                "seed": cell.settings.seed, "prompt": cell.settings.prompt, "image": cell.image,
                "render_seconds": round(cell.seconds, 3), "recipe": cell.recipe.to_dict()})
    return rec


def _title(recipe: Recipe, settings, axes: dict[str, Axis | None], z_value) -> str:
    parts = []
    for name in ("x", "y"):
        axis = axes[name]
        if axis is not None:
            parts.append(f"{name.upper()}: {axis.label}")
    z = axes["z"]
    if z is not None:
        parts.append(f"Z: {z.header(z_value)}")
    kinds = {a.kind for a in axes.values() if a is not None}
    base = recipe.method if "method" not in kinds else "merge"
    if "models" not in kinds:
        base += " of " + " + ".join(Path(m).stem for m in recipe.models)
    if "alpha" not in kinds and "blocks" not in kinds:
        base += f", alpha {recipe.effective_alpha():g}"
    parts.append(base)
    if "seed" not in kinds:
        parts.append(f"seed {settings.seed}")
    parts.append(f"{settings.steps} steps {settings.sampler}, CFG {settings.cfg_scale:g}")
    return "   ·   ".join(parts)
