"""The streaming merge: plan every key from the headers, then read, merge and write key by key.

Memory is bounded by the budget, not by the model size or the number of models: big tensors are split
into chunks of rows (for methods whose result on a range of rows is that range of the whole result), a
bounded window of chunks is in flight on a thread pool, and results are written in order as soon as
they are ready. The output header is written first (shapes are known), to a temporary file that is
renamed once complete and verified.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

import merge_lab_methods as methods
from merge_lab import __version__, archs
from merge_lab.archs import current_key_name
from merge_lab.archs.blocks import block_of, key_role, parse_values, resolve_ratios
from merge_lab.archs.detect import Architecture, detect
from merge_lab.archs.presets import names_preset, preset_values
from merge_lab.engine.recipe import Recipe, check_output_path, parse_size
from merge_lab.errors import CheckpointError, MergeCancelled, MergeLabError, RecipeError
from merge_lab.io.checkpoints import open_checkpoint
from merge_lab.io.hashing import autov2, legacy_hash, remember_sha256, sha256_file
from merge_lab.io.header import DTYPES, ITEMSIZE
from merge_lab.io.writer import EXISTS_MESSAGE, OutputEntry, SafetensorsWriter

DTYPE_FLAGS = {"fp16": "F16", "bf16": "BF16", "fp32": "F32", "fp8_e4m3": "F8_E4M3", "fp8_e5m2": "F8_E5M2"}
# An output dtype per key: the first model's dtype of that key (files mix an fp32 VAE with an fp16 UNet).
PER_KEY_DTYPE = "per-key"
COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Input:
    path: str
    reader: Any
    role: str  # "model" | "base"
    index: int  # position among the models (the base: -1)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


@dataclass
class KeyTask:
    key: str
    shape: tuple[int, ...]
    out_dtype: str
    action: str  # "merge" | "copy"
    block: str | None = None
    ratio: float = 0.0
    source: int = 0  # input to copy from
    chunks: list[tuple[int, int] | None] = field(default_factory=lambda: [None])
    needs_stats: bool = False
    # An inpainting / instruct-pix2pix model A merged with normal models: only the first `channels` input
    # channels (dim 1) of this key are merged, `shape` is theirs; the output has A's `full_shape`, the other
    # channels A's values (A1111's run_modelmerger does the same).
    channels: int | None = None
    full_shape: tuple[int, ...] | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.full_shape or self.shape


@dataclass
class MergePlan:
    recipe: Recipe
    arch: Architecture
    models: list[Input]
    base: Input | None
    method: Any
    params: dict[str, Any]
    ratios: dict[str, float]
    tasks: list[KeyTask]
    out_dtype: str
    compute_dtype: torch.dtype
    device: torch.device
    threads: int
    budget: int
    hashes: dict[str, str] = field(default_factory=dict)  # input path -> sha256
    fingerprint: str = ""

    @property
    def inputs(self) -> list[Input]:
        return [*self.models, *([self.base] if self.base else [])]

    def close(self) -> None:
        for inp in self.inputs:
            inp.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def output_entries(self) -> list[OutputEntry]:
        return [OutputEntry(t.key, t.out_dtype, t.out_shape) for t in self.tasks]

    def recipe_record(self) -> dict[str, Any]:
        """The recipe as stored in the output's `sd_merge_recipe` metadata (names, not local paths)."""
        r = self.recipe
        record = {
            "type": "merge-lab",
            "version": __version__,
            "method": self.method.name,
            "models": [m.name for m in self.models],
            "base": self.base.name if self.base else None,
            "alpha": r.effective_alpha(),
            "blocks": r.blocks,
            "block": dict(r.block or {}),
            "ratios": self.ratios,
            "params": self.params,
            "weights": r.weights,
            "seed": r.seed,
            "dtype": _dtype_flag(self.out_dtype),
            "prune": r.prune or None,
            "precision": r.precision,
            "missing": r.missing,
            "nonfinite": r.nonfinite,
            "recipe_hash": self.fingerprint,
        }
        return {k: v for k, v in record.items() if v is not None}


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite: NaN and ±inf propagate to the minimum or maximum, and aminmax reads
    the tensor once without a temporary (a float32 sum of fp16 data first copied it all to float32)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype.itemsize == 1:  # float8: no aminmax on the CPU
        return bool(torch.isfinite(t.float()).all())
    low, high = torch.aminmax(t)
    return math.isfinite(low.item()) and math.isfinite(high.item())  # two scalars: no tensor ops


def _nonfinite_message(inp: Input, key: str) -> str:
    """Counted over the whole tensor (the error path reads it once more), whatever unit found the first."""
    t = inp.reader.read(key)
    return (f"holds {int(torch.isnan(t).sum())} NaN and {int(torch.isinf(t).sum())} inf values (of {t.numel()}); "
            "use --nonfinite take-first or --nonfinite zero to merge anyway")


def _dtype_flag(dtype: str) -> str:
    return {v: k for k, v in DTYPE_FLAGS.items()}.get(dtype, dtype)


def to_output_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`t` in the output dtype. Into fp8 the cast saturates: values beyond the format's largest finite value
    (e4m3: ±448, e5m2: ±57344) become that value, as a plain cast would make them NaN (e4m3fn has no inf)
    or inf; everything else rounds to nearest, ties to even (torch's cast)."""
    if t.dtype == dtype:
        return t
    if dtype.is_floating_point and dtype.itemsize == 1:
        limit = torch.finfo(dtype).max
        t = (t.float() if t.dtype.itemsize == 1 else t).clamp(-limit, limit)
    return t.to(dtype)


# --------------------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------------------

def prepare(recipe: Recipe, *, hash_inputs: bool = True) -> MergePlan:
    """Validate the recipe against the models' headers and plan every key. Reads no tensor data."""
    recipe.validate()
    M = methods
    method = M.get_method(recipe.method)
    params = method.normalize_params(recipe.params)
    model_paths = recipe.expanded_models()

    inputs: list[Input] = []
    base = None
    try:
        for i, p in enumerate(model_paths):
            inputs.append(Input(p, open_checkpoint(p, current_key_name), "model", i))
        if recipe.base:
            base = Input(recipe.base, open_checkpoint(recipe.base, current_key_name), "base", -1)
        all_inputs = [*inputs, *([base] if base else [])]

        archs = [detect(inp.reader.tensors, inp.reader.metadata, inp.path) for inp in all_inputs]
        for inp, a in zip(all_inputs[1:], archs[1:]):
            if a.arch != archs[0].arch:
                raise RecipeError(f"is {a.arch} but {all_inputs[0].name} is {archs[0].arch}: "
                                  "models of different architectures cannot be merged", path=inp.path)
        arch = archs[0]
        values = _block_values(recipe, arch.arch)
        ratios = resolve_ratios(arch.arch, recipe.effective_alpha(), values, recipe.block)

        out_dtype = DTYPE_FLAGS[recipe.dtype] if recipe.dtype else PER_KEY_DTYPE
        if not recipe.dtype:
            _dominant_float_dtype(inputs[0])  # a file without any float tensor is refused here
        compute_dtype = COMPUTE_DTYPES[recipe.precision]
        device = torch.device(recipe.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RecipeError("device cuda requested but torch sees no CUDA device")
        threads = recipe.threads or min(4, os.cpu_count() or 1)
        budget = parse_size(recipe.memory_budget)

        plan = MergePlan(recipe, arch, inputs, base, method, params, ratios, [], out_dtype, compute_dtype,
                         device, threads, budget)
        plan.tasks = _plan_tasks(plan)
        if hash_inputs:
            plan.hashes = _hash_inputs(all_inputs)
        plan.fingerprint = fingerprint(plan)
        return plan
    except BaseException:
        for inp in [*inputs, *([base] if base else [])]:
            inp.reader.close()
        raise


def _block_values(recipe: Recipe, arch: str) -> list[float] | None:
    spec = recipe.blocks
    if spec is None or spec == "":
        return None
    if names_preset(spec):
        return preset_values(spec.strip(), arch)
    return parse_values(spec)


def _dominant_float_dtype(inp: Input) -> str:
    counts = Counter(t.dtype for k, t in inp.reader.tensors.items() if t.is_float and t.numel > 1)
    if not counts:
        raise RecipeError("has no floating-point tensors", path=inp.path)
    return counts.most_common(1)[0][0]


def _plan_tasks(plan: MergePlan) -> list[KeyTask]:
    arch = plan.arch.arch
    merge_inputs = plan.inputs
    order: list[str] = list(plan.models[0].reader.tensors)
    seen = set(order)
    for inp in merge_inputs[1:]:
        for key in inp.reader.tensors:
            if key not in seen:
                seen.add(key)
                order.append(key)

    tasks = []
    for key in order:
        holders = [i for i, inp in enumerate(merge_inputs) if key in inp.reader.tensors]
        first = merge_inputs[holders[0]]
        info = first.reader.tensors[key]
        role = key_role(key, arch)
        if role == "unknown":
            raise MergeLabError(f"is not part of the {archs.get(arch).title} layout we know; refusing to copy it "
                                "unmerged (remove the key, or report the file's origin)", path=first.path, key=key)
        if role == "leftover" and plan.recipe.prune:
            continue
        out_dtype = plan.out_dtype if plan.out_dtype != PER_KEY_DTYPE and info.is_float else info.dtype
        block = block_of(key, arch)
        if role != "merge":
            tasks.append(KeyTask(key, info.shape, out_dtype, "copy", block, source=holders[0]))
            continue
        if not info.is_float:
            raise MergeLabError(f"dtype {info.dtype} of a weight is not floating point; refusing to copy it "
                                "unmerged", path=first.path, key=key)
        if len(holders) != len(merge_inputs):
            missing = next(inp for i, inp in enumerate(merge_inputs) if i not in holders)
            if plan.recipe.missing != "take-first":
                raise MergeLabError(f"is missing (present in {first.name}); use --missing take-first to copy it "
                                    "from the first model that has it", path=missing.path, key=key)
            tasks.append(KeyTask(key, info.shape, out_dtype, "copy", block, source=holders[0]))
            continue
        channels = None
        for inp in merge_inputs:
            other = inp.reader.tensors[key]
            if other.shape != info.shape:
                channels = _merged_channels(key, merge_inputs, plan)
            if not other.is_float:
                raise MergeLabError(f"dtype {other.dtype} is not floating point, {first.name} has {info.dtype}",
                                    path=inp.path, key=key)
        if channels is None:
            tasks.append(KeyTask(key, info.shape, out_dtype, "merge", block, ratio=plan.ratios[block]))
        else:
            narrow = (info.shape[0], channels, *info.shape[2:])
            tasks.append(KeyTask(key, narrow, out_dtype, "merge", block, ratio=plan.ratios[block],
                                 channels=channels, full_shape=info.shape))

    _assign_chunks(plan, tasks)
    return tasks


# Input channels of the first UNet convolution: 4 latent channels, + 4 of the masked image and 1 of the mask
# (inpainting), + 4 of the original image's latent (instruct-pix2pix).
_VARIANT_CHANNELS = {9: "an inpainting model (9 input channels)", 8: "an instruct-pix2pix model (8 input channels)"}
FIRST_CONV = "model.diffusion_model.input_blocks.0.0.weight"
LATENT_CHANNELS = 4


def _merged_channels(key: str, inputs: list[Input], plan: MergePlan) -> int:
    """The inputs of `key` differ in shape: the number of leading input channels to merge when that is the
    inpainting / instruct-pix2pix case (A that model, every other input a normal one), else a one-line error."""
    first = inputs[0]
    shape = first.reader.tensors[key].shape
    shapes = [inp.reader.tensors[key].shape for inp in inputs]
    differ = next(inp for inp, s in zip(inputs, shapes) if s != shape)
    other = differ.reader.tensors[key].shape
    if key != FIRST_CONV or len(shape) != 4 or any(len(s) != 4 or s[:1] + s[2:] != shape[:1] + shape[2:]
                                                   for s in shapes):
        raise MergeLabError(f"shape {list(other)} differs from {list(shape)} in {first.name}", path=differ.path,
                            key=key)
    wide = next((inp for inp, s in zip(inputs, shapes) if s[1] in _VARIANT_CHANNELS and s[1] != shape[1]), None)
    if shape[1] == LATENT_CHANNELS and wide is not None:
        what = _VARIANT_CHANNELS[wide.reader.tensors[key].shape[1]]
        raise MergeLabError(f"is {what} and {first.name} is not: put it first, as model A (its extra input "
                            "channels are kept from A, as in A1111's merger)", path=wide.path, key=key)
    if shape[1] in _VARIANT_CHANNELS and all(s[1] == LATENT_CHANNELS for s in shapes[1:]):
        return LATENT_CHANNELS
    raise MergeLabError(f"shape {list(other)} differs from {list(shape)} in {first.name} (an inpainting or "
                        "instruct-pix2pix model A merges only with normal models)", path=differ.path, key=key)


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


def _hash_inputs(inputs: list[Input]) -> dict[str, str]:
    paths = sorted({inp.path for inp in inputs})

    def one(path: str) -> str:
        try:
            return sha256_file(path)
        except OSError as e:
            raise CheckpointError(f"cannot read: {e.strerror or e}", path=path) from None

    with ThreadPoolExecutor(min(len(paths), os.cpu_count() or 1)) as pool:
        return dict(zip(paths, pool.map(one, paths)))


def fingerprint(plan: MergePlan) -> str:
    """A hash of everything that determines the merged weights (inputs by content when hashed)."""
    def ident(inp: Input) -> str:
        return plan.hashes.get(inp.path) or os.path.realpath(inp.path)

    r = plan.recipe
    data = {
        "method": plan.method.name,
        "models": [ident(m) for m in plan.models],
        "base": ident(plan.base) if plan.base else None,
        "ratios": plan.ratios,
        "params": plan.params,
        "weights": r.weights,
        "seed": r.seed if plan.method.randomized else None,
        # the drop-mask scheme: the same seed draws other masks than the torch.Generator blocks before it
        "masks": "splitmix64-bytes" if plan.method.randomized else None,
        "dtype": plan.out_dtype,
        "prune": r.prune,
        "precision": r.precision,
        "missing": r.missing,
        "nonfinite": r.nonfinite,
    }
    import hashlib

    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# execution
# --------------------------------------------------------------------------------------------------

class RawInputs(list):
    """The raw tensors of one unit, one per input, and whether every one of them is finite."""

    finite = False

    def check_finite(self) -> bool:
        """Look at every tensor (once per read: later passes over them can skip it) and remember the answer."""
        self.finite = all(_all_finite(t) for t in self)
        return self.finite


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
        sources = [plan.inputs[task.source]] if task.action == "copy" else plan.inputs
        item = ITEMSIZE[sources[0].reader.tensors[task.key].dtype]
        row = task.numel // task.shape[0] if task.shape and task.shape[0] else task.numel
        out_item = ITEMSIZE[task.out_dtype] + _partial_itemsize(plan, task)
        for rows in task.chunks:
            count = task.numel if rows is None else (rows[1] - rows[0]) * row
            factor = 1 + (stages if task.needs_stats else 0)
            yield Unit(task, rows, count * item * len(sources) * factor, count * (item * len(sources) + out_item))


def _one_torch_thread() -> None:
    # We parallelize over units ourselves; torch's intra-op threads on top of that oversubscribe the
    # cores, and on a busy machine its barrier waits made a one-worker merge 4x slower. The setting is
    # per thread, so the host's own threads keep theirs.
    torch.set_num_threads(1)


def add_statistics(total: dict, part: dict, *, owned: bool) -> None:
    """Add one part's statistics into `total`, in place (per-part sums were a fragmenting churn of big
    buffers). A name seen first keeps `part`'s tensor when it is ours to add into (`owned`), else a copy."""
    for name, value in part.items():
        if name in total:
            total[name].add_(value)
        else:
            total[name] = value if owned else value.clone()


class KeyStatistics:
    """The whole-tensor statistics of a key too big for one unit: passes over its row chunks (read again for
    each stage). Every thread that needs them takes chunks to compute, so the units of a big key do not wait
    idle on one thread's passes; the chunks' sums are added in chunk order, the same bits whoever computed
    which chunk."""

    def __init__(self, executor: Executor, task: KeyTask):
        self.executor, self.task = executor, task
        self.stages = executor._stages()
        self.stage = 0
        self.total: dict = {}
        self.parts: dict[int, dict] = {}
        self.next_chunk = 0
        self.error: BaseException | None = None
        self.condition = threading.Condition()

    def result(self) -> dict:
        chunks = self.task.chunks
        cancel = self.executor.cancel
        while True:
            if cancel is not None and cancel.is_set():
                raise MergeCancelled("merge cancelled; no output written")
            with self.condition:
                if self.error is not None:
                    raise self.error
                if self.stage == self.stages:
                    return self.total
                if self.next_chunk == len(chunks):
                    self.condition.wait()  # the last chunks of this stage are being computed
                    continue
                index, stage, earlier = self.next_chunk, self.stage, dict(self.total)
                self.next_chunk += 1
            try:
                rows = chunks[index]
                part = self.executor._stage_sums(self.task, self.executor._read_raw(self.task, rows),
                                                 rows[0] if rows else 0, earlier, stage)
            except BaseException as e:
                with self.condition:
                    self.error = self.error or e
                    self.condition.notify_all()
                raise
            with self.condition:
                self.parts[index] = part
                if len(self.parts) == len(chunks):
                    self._finish_stage()

    def _finish_stage(self) -> None:
        stage_total: dict = {}
        for index in range(len(self.task.chunks)):
            add_statistics(stage_total, self.parts[index], owned=True)
        self.total.update(stage_total)
        self.parts = {}
        self.stage += 1
        self.next_chunk = 0
        self.condition.notify_all()


class Executor:
    """Runs a plan on a thread pool; results go to `sink(key, tensor)` in output order."""

    def __init__(self, plan: MergePlan, progress: ProgressFn | None = None,
                 cancel: threading.Event | None = None):
        self.plan = plan
        self.progress = progress
        self.cancel = cancel
        self.pin = plan.device.type == "cuda"
        per_element = len(plan.inputs) * torch.empty((), dtype=plan.compute_dtype).element_size()
        self.slice_elements = max(MIN_SLICE_ELEMENTS, min(SLICE_ELEMENTS, SLICE_BYTES // per_element))
        self.block_grams: dict[str, torch.Tensor] | None = None

    def run(self, sink: Callable[[str, torch.Tensor], None], first_task: int = 0) -> None:
        """Merge the plan's keys from `first_task` on (a resumed merge has written the ones before)."""
        plan = self.plan
        total = sum(u.nbytes for u in _units(plan, first_task))
        done = 0
        if plan.method.uses_block_statistics(plan.params):
            # A first pass over every input: the per-block Gram matrices of the task vectors (Model Stock's
            # block granularity), by the same code as `merge-lab analyze`.
            from merge_lab.engine.block_stats import analysis_units, block_grams

            units = analysis_units(plan)
            done = sum(u.nbytes for u in units)
            total += done
            self.block_grams = block_grams(plan, units, progress=self.progress, cancel=self.cancel,
                                           total=total).grams
        window: deque[tuple[Unit, Future]] = deque()
        held = 0  # memory of the units in the window
        stats: dict[str, KeyStatistics] = {}
        pool = ThreadPoolExecutor(plan.threads, thread_name_prefix="merge-lab", initializer=_one_torch_thread)
        try:
            for unit in _units(plan, first_task):
                if self.cancel is not None and self.cancel.is_set():
                    raise MergeCancelled("merge cancelled; no output written")
                task = unit.task
                if task.needs_stats and task.key not in stats:
                    # Units come key by key: an earlier key's statistics are held only by its own units'
                    # futures from here on (keeping them all held a whole model's worth of counts).
                    stats.clear()
                    stats[task.key] = KeyStatistics(self, task)
                # Many small units may be in flight (a big one at the head must not idle the other workers),
                # as long as what they hold stays within the budget.
                while window and (len(window) >= MAX_UNITS_IN_FLIGHT or held + unit.memory > plan.budget):
                    held -= window[0][0].memory
                    done = self._drain(window, sink, done, total)
                window.append((unit, pool.submit(self._compute, unit, stats.get(task.key))))
                held += unit.memory
            while window:
                done = self._drain(window, sink, done, total)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _drain(self, window, sink, done, total):
        unit, future = window.popleft()
        tensor = future.result()
        sink(unit.task.key, tensor)
        done += unit.nbytes
        if self.progress is not None:
            self.progress(done, total, unit.task.key)
        return done

    # -- worker side ---------------------------------------------------------------------------------
    def _read_raw(self, task: KeyTask, rows, check: bool = True) -> RawInputs:
        """The inputs of one unit, checked for NaN/inf once, on the raw data (every later pass over them can
        skip the check); `check=False` leaves that to the caller and marks them finite until it has."""
        raws = RawInputs()
        for inp in self.plan.inputs:
            t = inp.reader.read(task.key, rows)
            if task.channels is not None and t.shape[1] != task.channels:
                t = t[:, :task.channels].contiguous()  # an inpainting A's latent channels
            raws.append(t.pin_memory() if self.pin else t)
        if check:
            raws.check_finite()
        else:
            raws.finite = True
        return raws

    def _slices(self, shape: tuple[int, ...], whole: bool = False):
        """Row-aligned [start, stop) ranges of about SLICE_ELEMENTS elements (None: the whole tensor, for
        0-d and empty ones and for tensors the method needs whole; an empty [2**40, 0] tensor must not
        become 2**22 empty slices)."""
        if not shape or whole or not math.prod(shape):
            yield None
            return
        row = math.prod(shape[1:]) or 1
        step = shape[0] if self.plan.device.type == "cuda" else max(1, self.slice_elements // row)
        for start in range(0, shape[0], step):
            yield start, min(start + step, shape[0])

    def _slice_count(self, shape: tuple[int, ...], whole: bool = False) -> int:
        return sum(1 for _ in self._slices(shape, whole))

    def converted_slices(self, task: KeyTask, rows):
        """(models, base, first row) for each slice of one unit, in the compute dtype (the analysis pass)."""
        raws = self._read_raw(task, rows)
        first_row = rows[0] if rows else 0
        for part in self._slices(tuple(raws[0].shape)):
            models, base = self._convert(task, raws, part)
            yield models, base, first_row + (part[0] if part else 0)

    def _owns_converted(self, raws: list[torch.Tensor]) -> bool:
        """Whether converting `raws` copies them (a new dtype or device), so that a method may overwrite the
        converted tensors without touching the raw buffers, which later slices and passes read again."""
        return self.plan.device.type != "cpu" or all(r.dtype != self.plan.compute_dtype for r in raws)

    def _raw_slice(self, kernel, raws: RawInputs, rows):
        """(models, base) of one slice as the files hold them, for a method's compiled form `kernel`; None
        when it has none or cannot take them: not on the CPU, not in float32, or inputs that a NaN/inf
        policy must first rewrite (those take the torch form, which applies it)."""
        plan = self.plan
        if (kernel is None or plan.device.type != "cpu" or plan.compute_dtype != torch.float32
                or not plan.base or not getattr(raws, "finite", False)):
            return None
        parts = [r if rows is None else r[rows[0]:rows[1]] for r in raws]
        return parts[: len(plan.models)], parts[len(plan.models)]

    def _convert_one(self, raw: torch.Tensor, rows) -> torch.Tensor:
        return (raw if rows is None else raw[rows[0]:rows[1]]).to(device=self.plan.device,
                                                                 dtype=self.plan.compute_dtype, non_blocking=True)

    def _convert(self, task: KeyTask, raws: list[torch.Tensor], rows):
        plan = self.plan
        tensors = [self._convert_one(r, rows) for r in raws]
        if not getattr(raws, "finite", False):
            tensors = self._check_finite(task, tensors)
        models = tensors[: len(plan.models)]
        base = tensors[len(plan.models)] if plan.base else None
        return models, base

    def _check_finite(self, task: KeyTask, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Apply the `nonfinite` policy to the inputs of one slice of a key, in input order.

        error: raise, naming the first input (file) that holds NaN/inf and the key;
        take-first: a NaN/inf of a later input takes the first model's value at that element, and where
        that is not finite either (or in the first model itself) 0;
        zero: every NaN/inf becomes 0.
        """
        plan = self.plan
        bad = [i for i, t in enumerate(tensors) if not _all_finite(t)]
        if not bad:
            return tensors
        policy = plan.recipe.nonfinite
        if policy == "error":
            inp = plan.inputs[bad[0]]
            raise MergeLabError(_nonfinite_message(inp, task.key), path=inp.path, key=task.key)
        first = tensors[0]
        out = list(tensors)
        for i in bad:
            t = tensors[i].clone()
            mask = ~torch.isfinite(t)
            if policy == "take-first" and i != 0:
                t[mask] = first[mask]
            t[~torch.isfinite(t)] = 0
            out[i] = t
        return out

    def _check_finite_copy(self, task: KeyTask, tensor: torch.Tensor) -> torch.Tensor:
        """A copied key (never merged, or missing elsewhere) has one source: NaN/inf in it is an error, or
        0 under take-first and zero (the source is the first model that has it)."""
        if _all_finite(tensor):
            return tensor
        inp = self.plan.inputs[task.source]
        if self.plan.recipe.nonfinite == "error":
            raise MergeLabError(_nonfinite_message(inp, task.key), path=inp.path, key=task.key)
        return torch.where(torch.isfinite(tensor), tensor, torch.zeros((), dtype=tensor.dtype))

    def _context(self, task: KeyTask, first_row: int, stats=None, writable: bool = False):
        M = methods
        row = task.numel // task.shape[0] if task.shape and task.shape[0] else task.numel
        weights = tuple(self.plan.recipe.weights) if self.plan.recipe.weights is not None else None
        if self.block_grams is not None:
            stats = {**(stats or {}), "block_gram": self.block_grams[task.block]}
        return M.KeyContext(key=task.key, seed=self.plan.recipe.seed, shape=task.shape, offset=first_row * row,
                            weights=weights, stats=stats, inputs_writable=writable)

    def _stage_sums(self, task: KeyTask, raws: list[torch.Tensor], first_row: int, earlier: dict,
                    stage: int, partials: list | None = None) -> dict:
        """One stage's statistics of `raws` (rows from first_row on) summed over slices; `earlier` holds
        the sums of the earlier stages. With `partials`, each slice's "partial" is kept there, in order."""
        plan = self.plan
        writable = self._owns_converted(raws)
        sums: dict = {}
        for rows in self._slices(tuple(raws[0].shape), whole=plan.method.keeps_whole(task.shape)):
            offset = first_row + (rows[0] if rows else 0)
            ctx = dataclasses.replace(self._context(task, offset, earlier or None, writable=writable), stage=stage,
                                      wants_partial=partials is not None)
            raw = self._raw_slice(plan.method.compiled.statistics, raws, rows)
            part = None if raw is None else plan.method.compiled.statistics(*raw, ctx, **plan.params)
            if part is None:
                models, base = self._convert(task, raws, rows)
                part = plan.method.statistics.fn(models, base, ctx, **plan.params)
            if partials is not None:
                partials.append(part.pop("partial", None))
            add_statistics(sums, part, owned=False)
        return sums

    def _stages(self) -> int:
        return self.plan.method.stages(self.plan.params, self.plan.compute_dtype)

    def _in_memory_statistics(self, task: KeyTask, raws: list[torch.Tensor], first_row: int,
                              partials: list | None = None) -> dict:
        """Whole-tensor statistics of a key held in one unit (and the last stage's partials, if asked)."""
        total: dict = {}
        stages = self._stages()
        for stage in range(stages):
            keep = partials if stage == stages - 1 else None
            total.update(self._stage_sums(task, raws, first_row, total, stage, keep))
        return total

    def _compute(self, unit: Unit, key_statistics: KeyStatistics | None) -> torch.Tensor:
        merged = self._compute_unit(unit, key_statistics)
        task = unit.task
        if task.channels is None:
            return merged
        # A's other input channels, as they are but for the output dtype, around the merged latent ones
        first = self.plan.inputs[0]
        out = to_output_dtype(self._check_finite_copy(task, first.reader.read(task.key)), merged.dtype).clone()
        out[:, :task.channels] = merged
        return out

    def _compute_unit(self, unit: Unit, key_statistics: KeyStatistics | None) -> torch.Tensor:
        plan = self.plan
        task = unit.task
        out_dtype = DTYPES[task.out_dtype]
        if task.action == "copy":
            t = self._check_finite_copy(task, plan.inputs[task.source].reader.read(task.key, unit.rows))
            out = to_output_dtype(t, out_dtype)
            if out is not t and not _all_finite(out):
                raise MergeLabError(f"a value does not fit in {task.out_dtype} (it would become inf); use "
                                    "--dtype fp32", path=plan.inputs[task.source].path, key=task.key)
            return out
        if self.cancel is not None and self.cancel.is_set():
            raise MergeCancelled("merge cancelled; no output written")
        method = plan.method
        try:
            # before this unit reads its own inputs: a thread helping with the statistics holds one read
            stats = key_statistics.result() if key_statistics is not None else None
            elementwise = _is_elementwise(method, plan.params)
            whole_slice = unit.rows is None and self._slice_count(task.shape, method.keeps_whole(task.shape)) == 1
            in_memory_stats = (elementwise and stats is None and not whole_slice
                               and method.needs_statistics(plan.params, task.shape))
            # Statistics that turn NaN/inf whenever an input holds one check the inputs for free.
            optimistic = in_memory_stats and method.statistics.reveal_nonfinite
            raws = self._read_raw(task, unit.rows, check=not optimistic)
            first_row = unit.rows[0] if unit.rows else 0
            writable = self._owns_converted(raws)
            if not elementwise:
                models, base = self._convert(task, raws, None)
                result = method.fn(models, base, task.ratio, self._context(task, 0, writable=writable), **plan.params)
                self._check_shape(result, models[0], task)
                return self._check_result(to_output_dtype(result.to(device="cpu"), out_dtype), task)
            partials = None
            if in_memory_stats:
                # the method sees only slices: give it the whole tensor's statistics first. (A tensor
                # merged in one slice needs none: the method sees all of it.) Its partial results are
                # kept when it can merge from them, unless a NaN/inf policy must rewrite the inputs.
                partials = [] if method.statistics.merge_from_partial is not None and raws.finite else None
                stats = self._in_memory_statistics(task, raws, first_row, partials)
                # A statistic that is not finite means an input holds NaN/inf, or the statistic overflowed:
                # check the inputs, and if they hold any, apply the policy (or raise) slice by slice as for
                # any other unit
                if optimistic and not all(_all_finite(v) for v in stats.values()) and not raws.check_finite():
                    partials = None
                    stats = self._in_memory_statistics(task, raws, first_row)
            slices = list(self._slices(tuple(raws[0].shape), whole=method.keeps_whole(task.shape)))
            if partials is not None and (len(partials) != len(slices) or any(p is None for p in partials)):
                partials = None  # the method did not give one for every slice: merge from the inputs
            out = torch.empty(raws[0].shape, dtype=out_dtype, pin_memory=self.pin)
            for index, rows in enumerate(slices):
                offset = first_row + (rows[0] if rows else 0)
                ctx = self._context(task, offset, stats, writable)
                target = out if rows is None else out[rows[0]:rows[1]]
                raw = None if partials is not None else self._raw_slice(method.compiled.merge, raws, rows)
                finite = None if raw is None else method.compiled.merge(*raw, target, task.ratio, ctx, **plan.params)
                if finite is not None:  # the compiled form wrote the slice
                    if not finite:
                        self._check_result(target, task)
                    continue
                if partials is not None:
                    base = self._convert_one(raws[len(plan.models)], rows)
                    result = method.statistics.merge_from_partial(partials[index], base, task.ratio, ctx,
                                                                  **plan.params)
                    partials[index] = None  # its memory can go as soon as the slice is written
                    self._check_shape(result, base, task)
                else:
                    models, base = self._convert(task, raws, rows)
                    result = method.fn(models, base, task.ratio, ctx, **plan.params)
                    self._check_shape(result, models[0], task)
                target.copy_(to_output_dtype(result, out_dtype) if out_dtype.itemsize == 1 else result)
                self._check_result(target, task)  # while the slice is still in the CPU cache
            return out
        except ValueError as e:
            raise MergeLabError(f"{method.name}: {e}", key=task.key) from None

    def _check_result(self, out: torch.Tensor, task: KeyTask) -> torch.Tensor:
        # Finite inputs can still give inf: a value beyond the output dtype's range (fp16: 65504), or a
        # method dividing by ~0. Writing it would silently break the model.
        if not _all_finite(out):
            raise MergeLabError(f"the merged value is NaN or inf (beyond the range of {task.out_dtype}?); use "
                                "--dtype fp32 or smaller ratios", key=task.key)
        return out

    def _check_shape(self, result: torch.Tensor, like: torch.Tensor, task: KeyTask) -> None:
        if result.shape != like.shape:
            raise RuntimeError(f"{self.plan.method.name} returned shape {tuple(result.shape)} for {task.key}")


# --------------------------------------------------------------------------------------------------
# entry points
# --------------------------------------------------------------------------------------------------

@dataclass
class MergeResult:
    out: str | None
    sha256: str | None
    autov2: str | None
    seconds: float
    fingerprint: str
    arch: str
    method: str
    keys: int
    recipe_record: dict[str, Any]
    state_dict: dict[str, torch.Tensor] | None = None

    def summary(self) -> str:
        where = self.out or "(in memory)"
        hashes = f" sha256 {self.sha256} AutoV2 {self.autov2}" if self.sha256 else ""
        return f"{where}: {self.arch} {self.method}, {self.keys} keys in {self.seconds:.2f}s;{hashes}"


def build_metadata(plan: MergePlan, title: str) -> dict[str, str]:
    models: dict[str, dict[str, Any]] = {}
    for inp in plan.inputs:
        sha = plan.hashes.get(inp.path)
        if not sha:
            continue
        try:
            entry: dict[str, Any] = {"name": inp.name, "legacy_hash": legacy_hash(inp.path)}
        except OSError as e:
            raise CheckpointError(f"cannot read: {e.strerror or e}", path=inp.path) from None
        own = inp.reader.metadata.get("sd_merge_recipe")
        if own:
            with contextlib.suppress(ValueError):
                entry["sd_merge_recipe"] = json.loads(own)
        models[sha] = entry
    meta = {
        "format": "pt",
        "sd_merge_recipe": json.dumps(plan.recipe_record()),
        "sd_merge_models": json.dumps(models),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": archs.get(plan.arch.arch).modelspec + ("/inpaint" if "inpaint" in plan.arch.variants
                                                                     else ""),
        "modelspec.title": title,
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "modelspec.description": f"Merged by Merge Lab {__version__}: {plan.method.name}",
        "merge_lab.version": __version__,
    }
    if "v-prediction" in plan.arch.variants:
        meta["modelspec.prediction_type"] = "v"
    return meta


# Metadata that describes how a file was made; a user sharing a model may leave it out.
RECIPE_METADATA_KEYS = ("sd_merge_recipe", "sd_merge_models")


def merge_to_file(recipe: Recipe, *, progress: ProgressFn | None = None, cancel: threading.Event | None = None,
                  plan: MergePlan | None = None, recipe_metadata: bool = True, resume: bool = False,
                  notify: Callable[[str], None] | None = None, overwrite: bool = False) -> MergeResult:
    """Merge into `recipe.out`. `recipe_metadata=False` leaves out `sd_merge_recipe` / `sd_merge_models`.
    An existing `recipe.out` is refused before anything is read, unless `overwrite`.
    `resume`: keep a partial output when the merge stops, and continue one of the same merge (see
    SafetensorsWriter); `notify` hears where it starts."""
    if not recipe.out:
        raise RecipeError("no output file given (--out)")
    if not overwrite and os.path.lexists(recipe.out):
        check_output_path(recipe.out, [*recipe.expanded_models(), *([recipe.base] if recipe.base else [])])
        raise CheckpointError(EXISTS_MESSAGE, path=recipe.out)
    start = time.perf_counter()
    own_plan = plan is None
    plan = plan or prepare(recipe)
    try:
        out = Path(recipe.out)
        check_output_path(out, [inp.path for inp in plan.inputs])  # also when the plan came from elsewhere
        metadata = build_metadata(plan, out.stem)
        if not recipe_metadata:
            metadata = {k: v for k, v in metadata.items() if k not in RECIPE_METADATA_KEYS}
        writer = SafetensorsWriter(out, plan.output_entries(), metadata, resume=resume, overwrite=overwrite)
        if notify is not None and writer.resume_note:
            notify(writer.resume_note)
        with writer:
            Executor(plan, progress, cancel).run(writer.write, first_task=writer.entries_done)
            sha = writer.finish()
        remember_sha256(out, sha)
        return MergeResult(str(out), sha, autov2(sha), time.perf_counter() - start, plan.fingerprint,
                           plan.arch.label, plan.method.name, len(plan.tasks), plan.recipe_record())
    finally:
        if own_plan:
            plan.close()


def merge_to_state_dict(recipe: Recipe, *, progress: ProgressFn | None = None,
                        cancel: threading.Event | None = None, plan: MergePlan | None = None) -> MergeResult:
    """Merge in memory (for previews and loading into a running web UI without saving)."""
    start = time.perf_counter()
    own_plan = plan is None
    plan = plan or prepare(recipe)
    try:
        state: dict[str, torch.Tensor] = {}
        filled: dict[str, int] = {}
        shapes = {t.key: t.out_shape for t in plan.tasks}

        def sink(key: str, tensor: torch.Tensor) -> None:
            if key not in state and tuple(tensor.shape) == shapes[key]:
                state[key] = tensor
                return
            if key not in state:
                state[key] = torch.empty(shapes[key], dtype=tensor.dtype)
                filled[key] = 0
            n = tensor.shape[0]
            state[key][filled[key]:filled[key] + n] = tensor
            filled[key] += n

        Executor(plan, progress, cancel).run(sink)
        return MergeResult(None, None, None, time.perf_counter() - start, plan.fingerprint, plan.arch.label,
                           plan.method.name, len(plan.tasks), plan.recipe_record(), state)
    finally:
        if own_plan:
            plan.close()
