"""Reading a unit's inputs for the workers: the raw tensors of each input (checked for NaN/inf once), cut into
slices and converted to the compute dtype, with the `nonfinite` policy applied. The executor merges from
them; the block statistics pass (block_stats.py) reads through the same code.
"""

from __future__ import annotations

import math

import torch

from merge_lab.engine.chunking import slice_elements
from merge_lab.engine.plan import Input, KeyTask, MergePlan
from merge_lab.errors import MergeLabError
from merge_lab_methods.kernels import FP8_NONFINITE_MASK, fp8_all_finite


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every element is finite: NaN and ±inf propagate to the minimum or maximum, and aminmax reads
    the tensor once without a temporary (a float32 sum of fp16 data first copied it all to float32)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    if t.dtype in FP8_NONFINITE_MASK:  # float8: no aminmax on the CPU; read off the bytes
        return fp8_all_finite(t) if t.device.type == "cpu" else bool(torch.isfinite(t.float()).all())
    low, high = torch.aminmax(t)
    return math.isfinite(low.item()) and math.isfinite(high.item())  # two scalars: no tensor ops


def _nonfinite_message(inp: Input, key: str) -> str:
    """Counted over the whole tensor (the error path reads it once more), whatever unit found the first."""
    t = inp.reader.read(key)
    return (f"holds {int(torch.isnan(t).sum())} NaN and {int(torch.isinf(t).sum())} inf values (of {t.numel()}); "
            "use --nonfinite take-first or --nonfinite zero to merge anyway")


class RawInputs(list):
    """The raw tensors of one unit, one per input, and whether every one of them is finite."""

    finite = False

    def check_finite(self) -> bool:
        """Look at every tensor (once per read: later passes over them can skip it) and remember the answer."""
        self.finite = all(_all_finite(t) for t in self)
        return self.finite


def _one_torch_thread() -> None:
    # We parallelize over units ourselves; torch's intra-op threads on top of that oversubscribe the
    # cores, and on a busy machine its barrier waits made a one-worker merge 4x slower. The setting is
    # per thread, so the host's own threads keep theirs.
    torch.set_num_threads(1)


# A compiled form streams over its slice with its own small scratch (no float32 copies of the inputs), so it
# takes far longer slices than the torch form: the Python around each call (views, contexts, a few tens of
# µs) then costs a few percent, not half the time with the GIL held (Flux fp8: 46 k slices a pass).
KERNEL_SLICE_ELEMENTS = 1 << 21


class Loader:
    """Reads and converts the inputs of a plan's units (the worker side shared by the executor and the
    block statistics)."""

    def __init__(self, plan: MergePlan):
        self.plan = plan
        self.pin = plan.device.type == "cuda"
        self.slice_elements = slice_elements(plan)

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

    def _slices(self, shape: tuple[int, ...], whole: bool = False, compiled: bool = False):
        """Row-aligned [start, stop) ranges of about SLICE_ELEMENTS elements, KERNEL_SLICE_ELEMENTS for a
        compiled form (None: the whole tensor, for 0-d and empty ones and for tensors the method needs whole;
        an empty [2**40, 0] tensor must not become 2**22 empty slices)."""
        if not shape or whole or not math.prod(shape):
            yield None
            return
        row = math.prod(shape[1:]) or 1
        elements = KERNEL_SLICE_ELEMENTS if compiled else self.slice_elements
        step = shape[0] if self.plan.device.type == "cuda" else max(1, elements // row)
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
