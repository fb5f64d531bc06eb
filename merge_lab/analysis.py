"""The cosine θ per block (SPEC §4), streamed: one pass over the inputs accumulates, for every block, the
Gram matrix Gᵢⱼ = Σ_keys ⟨τᵢ, τⱼ⟩ (float64) of the task vectors τᵢ = θᵢ − θ_base (the raw weights when no
base is given). θᵢⱼ = arccos(Gᵢⱼ / √(Gᵢᵢ·Gⱼⱼ)).

The same pass feeds `merge-lab analyze` and Model Stock's `block` granularity (the engine runs it first
and hands each key its block's Gram matrix), so the numbers a user reads are the numbers the merge uses.
Memory stays bounded: keys are read on a thread pool in a bounded window, big keys in chunks of rows.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch

from ._own import methods
from .blocks import extra_blocks, main_blocks
from .engine import (
    UNIT_MAX_ELEMENTS,
    Executor,
    KeyTask,
    MergePlan,
    ProgressFn,
    _one_torch_thread,
    _row_chunks,
    prepare,
)
from .errors import MergeCancelled, RecipeError
from .recipe import Recipe
from .safetensors_io import ITEMSIZE


@dataclass
class AnalysisUnit:
    task: KeyTask
    rows: tuple[int, int] | None
    nbytes: int


def analysis_units(plan: MergePlan) -> list[AnalysisUnit]:
    """Every merged key of the plan, in units of rows sized like the merge's (memory budget, unit cap)."""
    share = max(1, plan.budget // (2 * plan.threads))
    units = []
    for task in plan.tasks:
        if task.action != "merge":
            continue
        raw = sum(ITEMSIZE[inp.reader.tensors[task.key].dtype] for inp in plan.inputs)
        row = task.numel // task.shape[0] if task.shape and task.shape[0] else task.numel
        for rows in _row_chunks(task.shape, max(1, min(UNIT_MAX_ELEMENTS, share // raw))):
            count = task.numel if rows is None else (rows[1] - rows[0]) * row
            units.append(AnalysisUnit(task, rows, count * raw))
    return units


@dataclass
class BlockGrams:
    grams: dict[str, torch.Tensor]  # block -> N×N float64 Gram matrix of the task vectors
    keys: dict[str, int]
    elements: dict[str, int]


def block_grams(plan: MergePlan, units: list[AnalysisUnit] | None = None, *, progress: ProgressFn | None = None,
                cancel: threading.Event | None = None, total: int | None = None) -> BlockGrams:
    """Stream the plan's inputs once and sum each block's Gram matrix (in a fixed order: the result does
    not depend on which thread finishes first)."""
    gram = methods().model_stock.gram  # exact: small angles between raw weights need float64 products
    units = analysis_units(plan) if units is None else units
    total = total if total is not None else sum(u.nbytes for u in units)
    loader = Executor(plan)
    n = len(plan.models)
    grams: dict[str, torch.Tensor] = {}
    keys: dict[str, int] = {}
    elements: dict[str, int] = {}

    def work(unit: AnalysisUnit) -> torch.Tensor:
        if cancel is not None and cancel.is_set():
            raise MergeCancelled("cancelled")
        total = torch.zeros(n, n, dtype=torch.float64)
        for models, base, _ in loader.converted_slices(unit.task, unit.rows):
            # a fresh difference: the converted slices may be views of the raw buffers
            vectors = models if base is None else [m - base for m in models]
            total += gram(vectors)
        return total

    done = 0
    window: deque[tuple[AnalysisUnit, Any]] = deque()
    pool = ThreadPoolExecutor(plan.threads, thread_name_prefix="merge-lab-analysis", initializer=_one_torch_thread)

    def drain() -> None:
        nonlocal done
        unit, future = window.popleft()
        part = future.result()
        block = unit.task.block
        if block not in grams:
            grams[block] = torch.zeros(n, n, dtype=torch.float64)
            keys[block] = elements[block] = 0
        grams[block] += part
        if unit.rows is None or unit.rows[0] == 0:
            keys[block] += 1
        elements[block] += part_elements(unit)
        done += unit.nbytes
        if progress is not None:
            progress(done, total, unit.task.key)

    try:
        for unit in units:
            if cancel is not None and cancel.is_set():
                raise MergeCancelled("cancelled; no output written")
            window.append((unit, pool.submit(work, unit)))
            while len(window) >= 2 * plan.threads:
                drain()
        while window:
            drain()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return BlockGrams(grams, keys, elements)


def part_elements(unit: AnalysisUnit) -> int:
    task = unit.task
    if unit.rows is None:
        return task.numel
    return (unit.rows[1] - unit.rows[0]) * (task.numel // task.shape[0])


# --------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------

def display_order(arch: str) -> list[str]:
    """Blocks in the order of the model: text encoders, time embedding, IN.., M00, OUT.., final out, VAE."""
    extras = extra_blocks(arch)
    order = ["BASE", *(b for b in ("TE1", "TE2") if b in extras), "TIME"]
    order += [b for b in main_blocks(arch) if b != "BASE"]
    return [*order, "OUT", "VAE"]


WHOLE_MODEL = "ALL"


@dataclass
class BlockAngles:
    block: str
    keys: int
    elements: int
    norms: list[float]
    cosines: list[float | None]  # per pair, None where undefined (a zero norm)
    angles: list[float | None]  # degrees
    mean_cosine: float | None  # mean over the defined pairs
    mean_angle: float | None  # degrees: arccos of the mean cosine (Model Stock's c)
    model_stock_t: float | None  # with a base only (zero-norm pairs count as cosine 0, c ≤ 0 gives 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "block": self.block, "keys": self.keys, "elements": self.elements, "norms": self.norms,
            "cosines": self.cosines, "angles": self.angles, "mean_cosine": self.mean_cosine,
            "mean_angle": self.mean_angle, "model_stock_t": self.model_stock_t,
        }


@dataclass
class AnalysisReport:
    arch: str
    models: list[str]  # file names
    base: str | None
    pairs: list[tuple[int, int]]
    blocks: list[BlockAngles] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def pair_labels(self) -> list[str]:
        return [f"{i + 1}·{j + 1}" for i, j in self.pairs]

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": "merge-lab-analysis",
            "architecture": self.arch,
            "vectors": "task vectors (model − base)" if self.base else "raw weights",
            "base": self.base,
            "models": self.models,
            "pairs": [list(p) for p in self.pairs],
            "pair_labels": self.pair_labels,
            "unit": "degrees",
            "blocks": [b.as_dict() for b in self.blocks],
        }


def angles_from_gram(block: str, gram: torch.Tensor, keys: int, elements: int, with_base: bool) -> BlockAngles:
    M = methods().model_stock
    cos = M.pairwise_cosines(gram)
    cosines = [None if math.isnan(c) else float(c) for c in cos.tolist()]
    angles = [None if c is None else math.degrees(math.acos(c)) for c in cosines]
    defined = [c for c in cosines if c is not None]
    mean_cos = sum(defined) / len(defined) if defined else None
    mean_angle = None if mean_cos is None else math.degrees(math.acos(max(-1.0, min(1.0, mean_cos))))
    t = float(M.model_stock_t(gram)) if with_base else None
    norms = [math.sqrt(max(float(x), 0.0)) for x in gram.diagonal().tolist()]
    return BlockAngles(block, keys, elements, norms, cosines, angles, mean_cos, mean_angle, t)


def report_from_grams(plan: MergePlan, result: BlockGrams) -> AnalysisReport:
    n = len(plan.models)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    report = AnalysisReport(plan.arch.arch, [m.name for m in plan.models], plan.base.name if plan.base else None,
                            pairs)
    with_base = plan.base is not None
    for block in display_order(plan.arch.arch):
        if block in result.grams:
            report.blocks.append(angles_from_gram(block, result.grams[block], result.keys[block],
                                                  result.elements[block], with_base))
    if result.grams:
        whole = sum(result.grams.values(), torch.zeros(n, n, dtype=torch.float64))
        report.blocks.append(angles_from_gram(WHOLE_MODEL, whole, sum(result.keys.values()),
                                              sum(result.elements.values()), with_base))
    return report


def analyze(models: list[str], base: str | None = None, *, threads: int | None = None, device: str = "cpu",
            memory_budget: int | str | None = None, precision: str = "float32", nonfinite: str = "error",
            progress: ProgressFn | None = None, cancel: threading.Event | None = None) -> AnalysisReport:
    """θ per block between every pair of `models` (task vectors against `base`, or the raw weights)."""
    import time

    start = time.perf_counter()
    recipe = Recipe(models=list(models), base=base, method="task_arithmetic" if base else "weighted_sum",
                    threads=threads, device=device, memory_budget=memory_budget, precision=precision,
                    nonfinite=nonfinite)
    if len(recipe.expanded_models()) < 2:
        raise RecipeError("the θ analysis needs at least 2 models" + (" besides the base" if base else ""))
    with prepare(recipe, hash_inputs=False) as plan:
        report = report_from_grams(plan, block_grams(plan, progress=progress, cancel=cancel))
    report.seconds = time.perf_counter() - start
    return report


def format_angle(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.2f}"


def format_report(report: AnalysisReport) -> str:
    """The table a user reads: blocks as rows, θ in degrees for every pair, the mean (and t with a base)."""
    from .commands.batch import format_table

    lines = []
    what = f"task vectors (model − {report.base})" if report.base else "raw weights (no base given)"
    lines.append(f"θ per block in degrees, {report.arch}, between {what}:")
    for i, name in enumerate(report.models):
        lines.append(f"  {i + 1} = {name}")
    header = ["block", "keys", *(f"θ {p}" for p in report.pair_labels), "mean"]
    if report.base:
        header.append("stock t")
    rows = []
    for b in report.blocks:
        row = [b.block, str(b.keys), *(format_angle(a) for a in b.angles), format_angle(b.mean_angle)]
        if report.base:
            row.append("-" if b.model_stock_t is None else f"{b.model_stock_t:.3f}")
        rows.append(row)
    lines.append("")
    lines.append(format_table(header, rows))
    lines.append("")
    lines.append("mean: arccos of the mean cosine over the defined pairs (Model Stock's c); undefined: a zero "
                 "norm (the vectors are 0 in that block)" + ("; stock t: Model Stock's factor for the block"
                                                             if report.base else ""))
    return "\n".join(lines)
