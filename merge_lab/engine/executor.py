"""The streaming merge: read, merge and write a plan's keys (plan.py) key by key.

Memory is bounded by the budget, not by the model size or the number of models: big tensors are split
into chunks of rows (for methods whose result on a range of rows is that range of the whole result), a
bounded window of chunks is in flight on a thread pool, and results are written in order as soon as
they are ready. The output header is written first (shapes are known), to a temporary file that is
renamed once complete and verified.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import merge_lab_methods as methods
from merge_lab.engine.block_stats import analysis_units, block_grams, model_wide_bytes, model_wide_statistics
from merge_lab.engine.chunking import MAX_UNITS_IN_FLIGHT, ProgressFn, Unit, _is_elementwise, _units
from merge_lab.engine.loader import Loader, RawInputs, _all_finite, _nonfinite_message, _one_torch_thread
from merge_lab.engine.metadata import RECIPE_METADATA_KEYS, build_metadata
from merge_lab.engine.plan import KeyTask, MergePlan, prepare
from merge_lab.engine.recipe import Recipe, check_output_path
from merge_lab.errors import CheckpointError, MergeCancelled, MergeLabError, RecipeError
from merge_lab.io.hashing import autov2, remember_sha256
from merge_lab.io.header import DTYPES
from merge_lab.io.writer import EXISTS_MESSAGE, SafetensorsWriter
from merge_lab_methods.adjust import apply_operation as apply_adjust_operation
from merge_lab_methods.kernels import compiled as compiled_kernels


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


class Executor(Loader):
    """Runs a plan on a thread pool; results go to `sink(key, tensor)` in output order."""

    def __init__(self, plan: MergePlan, progress: ProgressFn | None = None,
                 cancel: threading.Event | None = None):
        super().__init__(plan)
        self.progress = progress
        self.cancel = cancel
        self.block_grams: dict[str, torch.Tensor] | None = None
        self.model_wide: dict | None = None

    def run(self, sink: Callable[[str, torch.Tensor], None], first_task: int = 0) -> None:
        """Merge the plan's keys from `first_task` on (a resumed merge has written the ones before)."""
        plan = self.plan
        total = sum(u.nbytes for u in _units(plan, first_task))
        done = 0
        if plan.method.uses_block_statistics(plan.params):
            # A first pass over every input: the per-block Gram matrices of the task vectors (Model Stock's
            # block granularity), by the same code as `merge-lab analyze`.
            units = analysis_units(plan)
            done = sum(u.nbytes for u in units)
            total += done
            self.block_grams = block_grams(plan, units, progress=self.progress, cancel=self.cancel,
                                           total=total).grams
        if plan.method.uses_model_wide_statistics(plan.params):
            # A first pass over every merged key: the method's model-wide statistic (SuperMerger's cosine
            # range), read whole key by key.
            first = model_wide_bytes(plan)
            total += first
            self.model_wide = model_wide_statistics(plan, progress=self.progress, cancel=self.cancel,
                                                    done=done, total=total)
            done += first
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
    def _owns_converted(self, raws: list[torch.Tensor]) -> bool:
        """Whether converting `raws` copies them (a new dtype or device), so that a method may overwrite the
        converted tensors without touching the raw buffers, which later slices and passes read again."""
        return self.plan.device.type != "cpu" or all(r.dtype != self.plan.compute_dtype for r in raws)

    def _raw_slice(self, kernel, raws: RawInputs, rows):
        """(models, base) of one slice as the files hold them, for a method's compiled form `kernel`; None
        when it has none or cannot take them: kernels off or missing, not on the CPU, not in float32, or
        inputs that a NaN/inf policy must first rewrite (those take the torch form, which applies it)."""
        plan = self.plan
        if (kernel is None or plan.device.type != "cpu" or plan.compute_dtype != torch.float32
                or not getattr(raws, "finite", False) or compiled_kernels() is None):
            return None
        parts = [r if rows is None else r[rows[0]:rows[1]] for r in raws]
        if not plan.base:  # a method without a base (weighted sum) gets None; one whose base is a model, no kernel
            return (parts, None) if plan.method.base == "never" else None
        return parts[: len(plan.models)], parts[len(plan.models)]

    def _output_checked_instead(self, task: KeyTask) -> bool:
        """A copied key that LoRAs change, under nonfinite=error: NaN/inf in the input would reach the output,
        which is checked anyway, so the input is checked only when the output is not finite (one pass less
        over the most common bake)."""
        loras = self.plan.loras
        return (task.action == "copy" and loras is not None and task.key in loras.patches
                and self.plan.recipe.nonfinite == "error")

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
        if self.model_wide is not None:
            stats = {**(stats or {}), "model_wide": self.model_wide}
        return M.KeyContext(key=task.key, seed=self.plan.recipe.seed, shape=task.shape, offset=first_row * row,
                            weights=weights, stats=stats, inputs_writable=writable)

    def _stage_sums(self, task: KeyTask, raws: list[torch.Tensor], first_row: int, earlier: dict,
                    stage: int, partials: list | None = None) -> dict:
        """One stage's statistics of `raws` (rows from first_row on) summed over slices; `earlier` holds
        the sums of the earlier stages. With `partials`, each slice's "partial" is kept there, in order."""
        plan = self.plan
        writable = self._owns_converted(raws)
        sums: dict = {}
        compiled = self._raw_slice(plan.method.compiled.statistics, raws, None) is not None
        for rows in self._slices(tuple(raws[0].shape), whole=plan.method.keeps_whole(task.shape), compiled=compiled):
            offset = first_row + (rows[0] if rows else 0)
            ctx = dataclasses.replace(self._context(task, offset, earlier or None, writable=writable), stage=stage,
                                      wants_partial=partials is not None)
            raw = self._raw_slice(plan.method.compiled.statistics, raws, rows)
            part = None if raw is None else plan.method.compiled.statistics(*raw, ctx, **plan.params_for(task))
            if part is None:
                models, base = self._convert(task, raws, rows)
                part = plan.method.statistics.fn(models, base, ctx, **plan.params_for(task))
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
        out = self._compute_merged(unit, key_statistics)
        adjust = self.plan.adjust
        if adjust is not None and unit.task.key in adjust:
            # SuperMerger's Adjust, last: on the whole key (planned in one unit) as merged, LoRAs baked
            task = unit.task
            adjusted = apply_adjust_operation(out, adjust[task.key], self.plan.compute_dtype)
            out = self._check_result(to_output_dtype(adjusted, DTYPES[task.out_dtype]), task)
        return out

    def _compute_merged(self, unit: Unit, key_statistics: KeyStatistics | None) -> torch.Tensor:
        merged = self._compute_unit(unit, key_statistics)
        task = unit.task
        loras = self.plan.loras
        if loras is not None and task.key in loras.patches:
            # the LoRAs on the result as written (merge, then bake: the same bytes as the two steps)
            out_dtype = DTYPES[task.out_dtype]
            out = to_output_dtype(loras.apply(task.key, merged, unit.rows), out_dtype)
            if self._output_checked_instead(task) and not _all_finite(out):
                # the copied input was not checked: NaN/inf there is named as such, else the result is
                self._check_finite_copy(task, self.plan.inputs[task.source].reader.read(task.key, unit.rows))
            return self._check_result(out, task)
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
        if task.action == "position_ids":
            return torch.arange(task.shape[-1], dtype=torch.int64).expand(task.shape).contiguous()
        if task.action == "vae":
            vae = plan.vae
            t = vae.reader.read(task.source_key).reshape(task.shape)
            if not _all_finite(t):
                raise MergeLabError("NaN or inf in the VAE file", path=vae.path, key=task.source_key)
            out = to_output_dtype(t, out_dtype)
            if out is not t and not _all_finite(out):
                raise MergeLabError(f"a value does not fit in {task.out_dtype} (it would become inf); use "
                                    "--dtype fp32", path=vae.path, key=task.source_key)
            return out
        if task.action == "copy":
            t = plan.inputs[task.source].reader.read(task.key, unit.rows)
            if not self._output_checked_instead(task):
                t = self._check_finite_copy(task, t)
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
                result = method.fn(models, base, task.ratio, self._context(task, 0, writable=writable),
                                   **plan.params_for(task))
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
            if partials is not None and any(p is None for p in partials):
                partials = None  # the method did not give one for every slice: merge from the inputs
            compiled = partials is None and self._raw_slice(method.compiled.merge, raws, None) is not None
            slices = list(self._slices(tuple(raws[0].shape), whole=method.keeps_whole(task.shape), compiled=compiled))
            if partials is not None and len(partials) != len(slices):
                partials = None
            out = torch.empty(raws[0].shape, dtype=out_dtype, pin_memory=self.pin)
            for index, rows in enumerate(slices):
                offset = first_row + (rows[0] if rows else 0)
                ctx = self._context(task, offset, stats, writable)
                target = out if rows is None else out[rows[0]:rows[1]]
                raw = None if partials is not None else self._raw_slice(method.compiled.merge, raws, rows)
                finite = None if raw is None else method.compiled.merge(*raw, target, task.ratio, ctx, **plan.params_for(task))
                if finite is not None:  # the compiled form wrote the slice
                    if not finite:
                        self._check_result(target, task)
                    continue
                if partials is not None:
                    base = self._convert_one(raws[len(plan.models)], rows)
                    result = method.statistics.merge_from_partial(partials[index], base, task.ratio, ctx,
                                                                  **plan.params_for(task))
                    partials[index] = None  # its memory can go as soon as the slice is written
                    self._check_shape(result, base, task)
                else:
                    models, base = self._convert(task, raws, rows)
                    result = method.fn(models, base, task.ratio, ctx, **plan.params_for(task))
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
    plan = plan or prepare(recipe, notify=notify)
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
