"""Block statistics: one streamed pass over the plan's inputs sums, for every block, the Gram matrix
Gᵢⱼ = Σ_keys ⟨τᵢ, τⱼ⟩ (float64) of the task vectors τᵢ = θᵢ − θ_base (the raw weights when no base is given).

The same pass feeds `merge-lab analyze` (merge_lab.analysis turns the matrices into angles) and Model Stock's
`block` granularity (the executor runs it first and hands each key its block's Gram matrix), so the numbers a
user reads are the numbers the merge uses. Memory stays bounded: keys are read on a thread pool in a bounded
window, big keys in chunks of rows.
"""


from __future__ import annotations

import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

import merge_lab_methods as methods
from merge_lab.engine.chunking import UNIT_MAX_ELEMENTS, ProgressFn, _row_chunks
from merge_lab.engine.loader import Loader, _one_torch_thread
from merge_lab.engine.plan import KeyTask, MergePlan
from merge_lab.errors import MergeCancelled
from merge_lab.io.header import ITEMSIZE


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
    gram = methods.model_stock.gram  # exact: small angles between raw weights need float64 products
    units = analysis_units(plan) if units is None else units
    total = total if total is not None else sum(u.nbytes for u in units)
    loader = Loader(plan)
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


def _merged_keys(plan: MergePlan) -> list[tuple[KeyTask, int]]:
    """The merged keys of the plan with the input bytes each reads."""
    return [(t, t.numel * sum(ITEMSIZE[inp.reader.tensors[t.key].dtype] for inp in plan.inputs))
            for t in plan.tasks if t.action == "merge"]


def model_wide_bytes(plan: MergePlan) -> int:
    """The input bytes the model-wide pass reads (for the progress total)."""
    return sum(size for _, size in _merged_keys(plan))


def model_wide_statistics(plan: MergePlan, *, progress: ProgressFn | None = None,
                          cancel: threading.Event | None = None, done: int = 0, total: int | None = None) -> dict:
    """The method's model-wide statistic (Statistics.model_wide): every merged key read whole, in plan
    order, converted to the compute dtype, handed to the method as one iterator of (models, base). One key
    in memory at a time (the method keeps what it needs of each: SuperMerger's cosines keep one value per
    column)."""
    loader = Loader(plan)
    keys = _merged_keys(plan)
    total = total if total is not None else done + sum(size for _, size in keys)

    def pairs():
        read = done
        for task, size in keys:
            if cancel is not None and cancel.is_set():
                raise MergeCancelled("cancelled; no output written")
            yield loader._convert(task, loader._read_raw(task, None), None)
            read += size
            if progress is not None:
                progress(read, total, task.key)

    return plan.method.statistics.model_wide(pairs(), **plan.params)
