"""The streaming merge: plan every key from the headers, then read, merge and write key by key.

Memory is bounded by the budget, not by the model size or the number of models: big tensors are split
into chunks of rows (for methods whose result on a range of rows is that range of the whole result), a
bounded window of chunks is in flight on a thread pool, and results are written in order as soon as
they are ready. The output header is written first (shapes are known), to a temporary file that is
renamed once complete and verified.
"""

from __future__ import annotations

import contextlib
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

from . import __version__
from ._own import methods
from .arch import MODELSPEC_ARCH, Architecture, detect
from .blocks import block_of, parse_values, resolve_ratios
from .checkpoint import open_checkpoint
from .errors import CheckpointError, MergeCancelled, MergeLabError, RecipeError
from .hashing import autov2, legacy_hash, remember_sha256, sha256_file
from .recipe import Recipe, check_output_path, parse_size
from .safetensors_io import DTYPES, ITEMSIZE, OutputEntry, SafetensorsWriter

DTYPE_FLAGS = {"fp16": "F16", "bf16": "BF16", "fp32": "F32"}
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

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


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
        return [OutputEntry(t.key, t.out_dtype, t.shape) for t in self.tasks]

    def recipe_record(self) -> dict[str, Any]:
        """The recipe as stored in the output's `sd_merge_recipe` metadata (names, not local paths)."""
        r = self.recipe
        record = {
            "type": "merge-lab",
            "version": __version__,
            "method": self.method.name,
            "models": [m.name for m in self.models],
            "base": self.base.name if self.base else None,
            "alpha": r.alpha,
            "blocks": r.blocks,
            "block": dict(r.block or {}),
            "ratios": self.ratios,
            "params": self.params,
            "weights": r.weights,
            "seed": r.seed,
            "dtype": _dtype_flag(self.out_dtype),
            "precision": r.precision,
            "missing": r.missing,
            "nonfinite": r.nonfinite,
            "recipe_hash": self.fingerprint,
        }
        return {k: v for k, v in record.items() if v is not None}


def _nonfinite_message(t: torch.Tensor, rows: tuple[int, int] | None) -> str:
    counts = f"{int(torch.isnan(t).sum())} NaN, {int(torch.isinf(t).sum())} inf"
    where = f" in rows {rows[0]}-{rows[1] - 1}" if rows is not None else ""
    return f"holds NaN/inf values ({counts}{where}); use --nonfinite take-first or --nonfinite zero to merge anyway"


def _dtype_flag(dtype: str) -> str:
    return {v: k for k, v in DTYPE_FLAGS.items()}.get(dtype, dtype)


# --------------------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------------------

def prepare(recipe: Recipe, *, hash_inputs: bool = True) -> MergePlan:
    """Validate the recipe against the models' headers and plan every key. Reads no tensor data."""
    recipe.validate()
    M = methods()
    method = M.get_method(recipe.method)
    params = method.normalize_params(recipe.params)
    model_paths = recipe.expanded_models()

    inputs: list[Input] = []
    base = None
    try:
        for i, p in enumerate(model_paths):
            inputs.append(Input(p, open_checkpoint(p), "model", i))
        if recipe.base:
            base = Input(recipe.base, open_checkpoint(recipe.base), "base", -1)
        all_inputs = [*inputs, *([base] if base else [])]

        archs = [detect(inp.reader.tensors, inp.reader.metadata, inp.path) for inp in all_inputs]
        for inp, a in zip(all_inputs[1:], archs[1:]):
            if a.arch != archs[0].arch:
                raise RecipeError(f"is {a.arch} but {all_inputs[0].name} is {archs[0].arch}: "
                                  "models of different architectures cannot be merged", path=inp.path)
        arch = archs[0]
        values = _block_values(recipe, arch.arch)
        ratios = resolve_ratios(arch.arch, recipe.alpha, values, recipe.block)

        out_dtype = DTYPE_FLAGS[recipe.dtype] if recipe.dtype else _dominant_float_dtype(inputs[0])
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
    if isinstance(spec, str) and not any(c.isdigit() for c in spec.split(",")[0]):
        from .presets import preset_values

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
        block = block_of(key, arch)
        if block is None or not info.is_float:
            tasks.append(KeyTask(key, info.shape, info.dtype, "copy", block, source=holders[0]))
            continue
        if len(holders) != len(merge_inputs):
            missing = next(inp for i, inp in enumerate(merge_inputs) if i not in holders)
            if plan.recipe.missing != "take-first":
                raise MergeLabError(f"is missing (present in {first.name}); use --missing take-first to copy it "
                                    "from the first model that has it", path=missing.path, key=key)
            tasks.append(KeyTask(key, info.shape, plan.out_dtype, "copy", block, source=holders[0]))
            continue
        for inp in merge_inputs:
            other = inp.reader.tensors[key]
            if other.shape != info.shape:
                raise MergeLabError(f"shape {list(other.shape)} differs from {list(info.shape)} in {first.name}",
                                    path=inp.path, key=key)
            if not other.is_float:
                raise MergeLabError(f"dtype {other.dtype} is not floating point, {first.name} has {info.dtype}",
                                    path=inp.path, key=key)
        tasks.append(KeyTask(key, info.shape, plan.out_dtype, "merge", block, ratio=plan.ratios[block]))

    _assign_chunks(plan, tasks)
    return tasks


def _assign_chunks(plan: MergePlan, tasks: list[KeyTask]) -> None:
    """Split big tensors into row chunks so that the chunks in flight stay within the memory budget."""
    n_inputs = len(plan.inputs)
    compute_size = torch.empty((), dtype=plan.compute_dtype).element_size()
    # Each input is held raw and converted, plus ~3 compute-size temporaries for the method's result.
    per_element = n_inputs * (4 + compute_size) + 3 * compute_size
    in_flight = 2 * plan.threads
    elements_per_chunk = max(1, plan.budget // (in_flight * per_element))
    for task in tasks:
        if task.action == "copy":
            per_copy = max(1, plan.budget // (in_flight * 8))
            task.chunks = _row_chunks(task.shape, per_copy)
            continue
        if not plan.method.elementwise:
            continue
        task.chunks = _row_chunks(task.shape, elements_per_chunk)
        task.needs_stats = len(task.chunks) > 1 and plan.method.statistics is not None


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
        "dtype": plan.out_dtype,
        "precision": r.precision,
        "missing": r.missing,
        "nonfinite": r.nonfinite,
    }
    import hashlib

    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------------
# execution
# --------------------------------------------------------------------------------------------------

ProgressFn = Callable[[int, int, str], None]  # (bytes done, bytes total, key)


@dataclass
class Unit:
    task: KeyTask
    rows: tuple[int, int] | None
    nbytes: int  # input bytes this unit reads


def _units(plan: MergePlan):
    for task in plan.tasks:
        sources = [plan.inputs[task.source]] if task.action == "copy" else plan.inputs
        item = ITEMSIZE[sources[0].reader.tensors[task.key].dtype]
        row = task.numel // task.shape[0] if task.shape and task.shape[0] else task.numel
        for rows in task.chunks:
            count = task.numel if rows is None else (rows[1] - rows[0]) * row
            factor = 2 if task.needs_stats else 1
            yield Unit(task, rows, count * item * len(sources) * factor)


class Executor:
    """Runs a plan on a thread pool; results go to `sink(key, tensor)` in output order."""

    def __init__(self, plan: MergePlan, progress: ProgressFn | None = None,
                 cancel: threading.Event | None = None):
        self.plan = plan
        self.progress = progress
        self.cancel = cancel
        self.pin = plan.device.type == "cuda"

    def run(self, sink: Callable[[str, torch.Tensor], None]) -> None:
        plan = self.plan
        total = sum(u.nbytes for u in _units(plan))
        done = 0
        window: deque[tuple[Unit, Future]] = deque()
        stats: dict[str, Future] = {}
        pool = ThreadPoolExecutor(plan.threads, thread_name_prefix="merge-lab")
        try:
            for unit in _units(plan):
                if self.cancel is not None and self.cancel.is_set():
                    raise MergeCancelled("merge cancelled; no output written")
                task = unit.task
                if task.needs_stats and task.key not in stats:
                    stats[task.key] = pool.submit(self._statistics, task)
                window.append((unit, pool.submit(self._compute, unit, stats.get(task.key))))
                while len(window) >= 2 * plan.threads:
                    done = self._drain(window, sink, done, total)
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
    def _read(self, inp: Input, key: str, rows):
        t = inp.reader.read(key, rows)
        if self.pin:
            t = t.pin_memory()
        return t

    def _load_inputs(self, task: KeyTask, rows):
        plan = self.plan
        device, dtype = plan.device, plan.compute_dtype
        tensors = []
        for inp in plan.inputs:
            raw = self._read(inp, task.key, rows)
            tensors.append(raw.to(device=device, dtype=dtype, non_blocking=True))
        tensors = self._check_finite(task, tensors, rows)
        models = tensors[: len(plan.models)]
        base = tensors[len(plan.models)] if plan.base else None
        return models, base

    def _check_finite(self, task: KeyTask, tensors: list[torch.Tensor], rows=None) -> list[torch.Tensor]:
        """Apply the `nonfinite` policy to the inputs of one key (or chunk), in input order.

        error: raise, naming the first input (file) that holds NaN/inf and the key;
        take-first: a NaN/inf of a later input takes the first model's value at that element, and where
        that is not finite either (or in the first model itself) 0;
        zero: every NaN/inf becomes 0.
        """
        plan = self.plan
        # A finite sum proves every element finite (NaN and ±inf propagate); only then is the full mask needed.
        bad = [i for i, t in enumerate(tensors) if not bool(torch.isfinite(t.sum())) and
               not bool(torch.isfinite(t).all())]
        if not bad:
            return tensors
        policy = plan.recipe.nonfinite
        if policy == "error":
            i = bad[0]
            raise MergeLabError(_nonfinite_message(tensors[i], rows), path=plan.inputs[i].path, key=task.key)
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

    def _check_finite_copy(self, task: KeyTask, tensor: torch.Tensor, rows=None) -> torch.Tensor:
        """A copied key (never merged, or missing elsewhere) has one source: NaN/inf in it is an error, or
        0 under take-first and zero (the source is the first model that has it)."""
        if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
            return tensor
        if self.plan.recipe.nonfinite == "error":
            raise MergeLabError(_nonfinite_message(tensor, rows), path=self.plan.inputs[task.source].path,
                                key=task.key)
        return torch.where(torch.isfinite(tensor), tensor, torch.zeros((), dtype=tensor.dtype))

    def _context(self, task: KeyTask, rows, stats=None):
        M = methods()
        row = task.numel // task.shape[0] if task.shape and task.shape[0] else task.numel
        weights = tuple(self.plan.recipe.weights) if self.plan.recipe.weights is not None else None
        return M.KeyContext(key=task.key, seed=self.plan.recipe.seed, shape=task.shape,
                            offset=0 if rows is None else rows[0] * row, weights=weights, stats=stats)

    def _statistics(self, task: KeyTask) -> dict[str, torch.Tensor]:
        plan = self.plan
        total: dict[str, torch.Tensor] = {}
        for rows in task.chunks:
            models, base = self._load_inputs(task, rows)
            part = plan.method.statistics(models, base, self._context(task, rows), **plan.params)
            for name, value in part.items():
                total[name] = total[name] + value if name in total else value
        return total

    def _compute(self, unit: Unit, stats_future: Future | None) -> torch.Tensor:
        plan = self.plan
        task = unit.task
        out_dtype = DTYPES[task.out_dtype]
        if task.action == "copy":
            t = self._check_finite_copy(task, plan.inputs[task.source].reader.read(task.key, unit.rows), unit.rows)
            out = t if t.dtype == out_dtype else t.to(out_dtype)
            if out.is_floating_point() and not bool(torch.isfinite(out).all()):
                raise MergeLabError(f"a value does not fit in {task.out_dtype} (it would become inf); use "
                                    "--dtype fp32", path=plan.inputs[task.source].path, key=task.key)
            return out
        if self.cancel is not None and self.cancel.is_set():
            raise MergeCancelled("merge cancelled; no output written")
        models, base = self._load_inputs(task, unit.rows)
        stats = stats_future.result() if stats_future is not None else None
        ctx = self._context(task, unit.rows, stats)
        try:
            result = plan.method.fn(models, base, task.ratio, ctx, **plan.params)
        except ValueError as e:
            raise MergeLabError(f"{plan.method.name}: {e}", key=task.key) from None
        if result.shape != models[0].shape:
            raise RuntimeError(f"{plan.method.name} returned shape {tuple(result.shape)} for {task.key}")
        out = result.to(device="cpu", dtype=out_dtype)
        # Finite inputs can still give inf: a value beyond the output dtype's range (fp16: 65504), or a
        # method dividing by ~0. Writing it would silently break the model.
        if not bool(torch.isfinite(out).all()):
            raise MergeLabError(f"the merged value is NaN or inf (beyond the range of {task.out_dtype}?); use "
                                "--dtype fp32 or smaller ratios", key=task.key)
        return out


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
        "modelspec.architecture": MODELSPEC_ARCH[plan.arch.arch] + ("/inpaint" if "inpaint" in plan.arch.variants
                                                                     else ""),
        "modelspec.title": title,
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "modelspec.description": f"Merged by Merge Lab {__version__}: {plan.method.name}",
        "merge_lab.version": __version__,
    }
    if "v-prediction" in plan.arch.variants:
        meta["modelspec.prediction_type"] = "v"
    return meta


def merge_to_file(recipe: Recipe, *, progress: ProgressFn | None = None, cancel: threading.Event | None = None,
                  plan: MergePlan | None = None) -> MergeResult:
    if not recipe.out:
        raise RecipeError("no output file given (--out)")
    start = time.perf_counter()
    own_plan = plan is None
    plan = plan or prepare(recipe)
    try:
        out = Path(recipe.out)
        check_output_path(out, [inp.path for inp in plan.inputs])  # also when the plan came from elsewhere
        writer = SafetensorsWriter(out, plan.output_entries(), build_metadata(plan, out.stem))
        with writer:
            Executor(plan, progress, cancel).run(writer.write)
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
        shapes = {t.key: t.shape for t in plan.tasks}

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
