"""Work units: keys cut into row chunks so that the units in flight stay within the memory budget, the sizes
of units and of the slices a method runs on, and the units a plan's keys make.

The plan's types are named here for annotations only: the plan imports this module, not the reverse.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from merge_lab.io.header import ITEMSIZE

if TYPE_CHECKING:
    from merge_lab.engine.plan import KeyTask, MergePlan

# Work is cut in two levels. A *unit* (a key, or a range of its rows) is what a worker reads and writes
# at once: at most UNIT_MAX_ELEMENTS, so raw buffers stay small enough for the allocator to recycle
# instead of page-faulting fresh memory for every key. Inside a unit the method runs on row-aligned
# *slices* of about SLICE_ELEMENTS, converted to the compute dtype one slice at a time, so that the
# method's temporaries stay in the CPU caches.
UNIT_MAX_ELEMENTS = 1 << 23
SLICE_ELEMENTS = 1 << 18
# ...but the converted inputs of one slice together stay near this size, however many models there are.
SLICE_BYTES = 4 << 20
MIN_SLICE_ELEMENTS = 1 << 14
MAX_UNITS_IN_FLIGHT = 32


def _is_elementwise(method, params) -> bool:
    return method.chunkable(params)


def _assign_chunks(plan: MergePlan, tasks: list[KeyTask]) -> None:
    """Split keys into units so that the units in flight stay within the memory budget."""
    in_flight = 2 * plan.threads
    share = max(1, plan.budget // in_flight)
    elementwise = _is_elementwise(plan.method, plan.params)
    for task in tasks:
        if task.action == "copy":
            task.chunks = _row_chunks(task.shape, min(UNIT_MAX_ELEMENTS, share // 8))
            continue
        if task.channels is not None:
            continue  # a first convolution: small, merged whole
        raw = (sum(ITEMSIZE[inp.reader.tensors[task.key].dtype] for inp in plan.inputs) + ITEMSIZE[task.out_dtype]
               + _partial_itemsize(plan, task))
        if not elementwise or plan.method.keeps_whole(task.shape):
            continue  # whole tensors: the method needs all of it at once
        needs_stats = plan.method.needs_statistics(plan.params, task.shape)
        fits_whole = task.numel * raw <= share
        if needs_stats and fits_whole:
            continue  # one unit, statistics gathered in memory before the slices are merged
        task.chunks = _row_chunks(task.shape, max(1, min(UNIT_MAX_ELEMENTS, share // raw)))
        task.needs_stats = len(task.chunks) > 1 and needs_stats


def _partial_itemsize(plan: MergePlan, task: KeyTask) -> int:
    """Bytes an element of a unit's kept partial result takes (a merged key whose method gathers statistics
    and can merge from `Statistics.merge_from_partial`), else 0."""
    method = plan.method
    if (task.action != "merge" or method.statistics.merge_from_partial is None
            or not method.needs_statistics(plan.params, task.shape)):
        return 0
    return torch.finfo(plan.compute_dtype).bits // 8


def _row_chunks(shape: tuple[int, ...], max_elements: int) -> list[tuple[int, int] | None]:
    numel = math.prod(shape)
    if numel <= max_elements or len(shape) == 0 or shape[0] <= 1:
        return [None]
    row = numel // shape[0]
    rows = max(1, max_elements // max(row, 1))
    return [(s, min(s + rows, shape[0])) for s in range(0, shape[0], rows)]


def slice_elements(plan: MergePlan) -> int:
    """Elements per slice: about SLICE_ELEMENTS, fewer when the plan's inputs together would pass SLICE_BYTES
    once converted, never under MIN_SLICE_ELEMENTS."""
    per_element = len(plan.inputs) * torch.empty((), dtype=plan.compute_dtype).element_size()
    return max(MIN_SLICE_ELEMENTS, min(SLICE_ELEMENTS, SLICE_BYTES // per_element))


ProgressFn = Callable[[int, int, str], None]  # (bytes done, bytes total, key)


@dataclass
class Unit:
    task: KeyTask
    rows: tuple[int, int] | None
    nbytes: int  # input bytes this unit reads
    memory: int = 0  # bytes it holds while in flight: its inputs (one read) and its output


def _units(plan: MergePlan, first_task: int = 0):
    stages = plan.method.stages(plan.params, plan.compute_dtype)
    for task in plan.tasks[first_task:]:
        if task.action in ("vae", "position_ids"):  # one small read (or none) from their own source
            item = ITEMSIZE[plan.vae.reader.tensors[task.source_key].dtype if task.action == "vae" else "I64"]
            yield Unit(task, None, task.numel * item, task.numel * (item + ITEMSIZE[task.out_dtype]))
            continue
        sources = [plan.inputs[task.source]] if task.action == "copy" else plan.inputs
        item = ITEMSIZE[sources[0].reader.tensors[task.key].dtype]
        row = task.numel // task.shape[0] if task.shape and task.shape[0] else task.numel
        out_item = ITEMSIZE[task.out_dtype] + _partial_itemsize(plan, task)
        for rows in task.chunks:
            count = task.numel if rows is None else (rows[1] - rows[0]) * row
            factor = 1 + (stages if task.needs_stats else 0)
            yield Unit(task, rows, count * item * len(sources) * factor, count * (item * len(sources) + out_item))
