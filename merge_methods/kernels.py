"""Compiled per-element kernels over the inputs' own dtypes (fp16, bf16, fp32), for the methods whose torch
form makes a dozen passes over every element (Model Stock: four conversions, three differences, six dot
products, a sum, the base again, a product, a sum and the output's conversion and check).

On 2 CPU cores those passes run at the memory's speed, so fusing them into one loop per slice is what
brings such a method near the I/O floor (docs/PERFORMANCE.md). numba compiles the loops (no C compiler on
the user's machine, a wheel on every platform the web UIs run on); without it, or when its conversions
do not match torch's bit for bit on this CPU (checked once), the methods decline and the engine runs
their torch form, which stays the reference.

Arrays reach the kernels as NumPy views of the raw tensors. fp16 and bf16 are both 16-bit patterns, so
the array's dtype names the format: fp16 as uint16, bf16 as int16, fp32 as float32 (`bits_view`).
Conversions are LLVM's (`fpext`/`fptrunc` of half, F16C on x86) and torch's bf16 rounding: exact to
fp32, round-to-nearest-even back, as torch does.
"""

from __future__ import annotations

import functools
import logging
import os

import numpy as np
import torch

log = logging.getLogger(__name__)

# Set MERGE_LAB_KERNELS=0 to run every method's torch form (A/B benchmarks, bisecting a difference).
ENV_SWITCH = "MERGE_LAB_KERNELS"
_VIEW_DTYPES = {torch.float16: torch.uint16, torch.bfloat16: torch.int16, torch.float32: torch.float32,
                torch.float8_e4m3fn: torch.uint8, torch.float8_e5m2: torch.int8}
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
FORMATS = frozenset(_VIEW_DTYPES)  # the dtypes the kernels read and write


def bits_view(tensor: torch.Tensor) -> np.ndarray:
    """A flat NumPy view of a contiguous CPU tensor in the kernels' convention (fp16 → uint16 bits,
    bf16 → int16 bits, fp32 as is)."""
    return tensor.reshape(-1).view(_VIEW_DTYPES[tensor.dtype]).numpy()


def raw_views(models, base, out=None):
    """(model views, base view, out view or None): the `bits_view`s of one slice's tensors, or None when the
    kernels cannot take them. They take contiguous CPU tensors, the inputs all of one supported dtype (one
    compiled specialization per dtype, not one per mix), and only when they are available. `base` None
    (a method without one): its view is None."""
    inputs = [*models, *([base] if base is not None else [])]
    first = inputs[0]
    if (first.dtype not in FORMATS or (out is not None and out.dtype not in FORMATS)
            or not all(t.device.type == "cpu" and t.dtype == first.dtype and t.is_contiguous() for t in inputs)
            or compiled() is None):
        return None
    return (tuple(bits_view(m) for m in models), None if base is None else bits_view(base),
            None if out is None else bits_view(out))


# the bits that are all set in an fp8 value that is not finite (e4m3fn: NaN only; e5m2: the exponent)
FP8_NONFINITE_MASK = {torch.float8_e4m3fn: 0x7F, torch.float8_e5m2: 0x7C}


def fp8_all_finite(tensor: torch.Tensor) -> bool:
    """Whether an fp8 CPU tensor holds no NaN / inf, read off its bytes (torch's isfinite upcasts every
    element to float32 first: at Flux's 12 G elements the slowest step of a merge)."""
    mask = FP8_NONFINITE_MASK[tensor.dtype]
    flat = tensor.reshape(-1).view(torch.uint8)
    k = compiled()
    if k is not None and flat.is_contiguous() and flat.device.type == "cpu":
        return bool(k.bits_all_finite(flat.numpy(), mask))
    return not bool(((flat & mask) == mask).any())


def compiled():
    """The compiled kernels' module, or None when numba is missing, the kernels are switched off
    (MERGE_LAB_KERNELS=0, read at every call), or its conversions differ from torch's here."""
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    return _load()


@functools.cache
def _load():
    try:
        from . import _numba_kernels as k
    except ImportError as e:  # numba not installed: the torch forms run
        log.info("merge kernels off (%s); using the torch form of every method", e)
        return None
    problem = _self_test(k)
    if problem:
        log.warning("merge kernels off: %s; using the torch form of every method", problem)
        return None
    return k


def _self_test(k) -> str | None:
    """Every fp16 and bf16 pattern to fp32 and a spread of fp32 values back, against torch's conversions."""
    patterns = torch.arange(-(1 << 15), 1 << 15, dtype=torch.int32).to(torch.int16)
    values = torch.cat([patterns.view(torch.float16).float(), patterns.view(torch.bfloat16).float(),
                        torch.tensor([65504.0, 65520.0, 1e-8, -3e38, 2.0 ** -24, 2.0 ** -25])])
    values = values[torch.isfinite(values)].contiguous()
    for dtype in (torch.float16, torch.bfloat16):
        raw = patterns.view(dtype)
        got = np.empty(raw.numel(), np.float32)
        k.to_float32(bits_view(raw), got)
        want = raw.float().numpy()
        nan = np.isnan(want)
        if not (np.array_equal(np.isnan(got), nan) and np.array_equal(got[~nan].view(np.uint32),
                                                                        want[~nan].view(np.uint32))):
            return f"{dtype} to float32 differs from torch"
        out = torch.empty(values.numel(), dtype=dtype)
        k.from_float32(values.numpy(), bits_view(out))
        if not torch.equal(out.view(_VIEW_DTYPES[dtype]), values.to(dtype).view(_VIEW_DTYPES[dtype])):
            return f"float32 to {dtype} differs from torch"
    return _self_test_fp8(k)


def _fp8_test_values(dtype) -> torch.Tensor:
    """Every finite value of the format, the midpoints between neighbours (ties), values just off them,
    beyond the largest (saturated), in the subnormal range and below it, and ±inf."""
    patterns = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).float()
    exact = patterns[torch.isfinite(patterns)].unique()
    mids = (exact[1:].double() + exact[:-1].double()) / 2
    near = torch.cat([mids, torch.nextafter(mids, torch.full_like(mids, 1e9)),
                      torch.nextafter(mids, torch.full_like(mids, -1e9))]).float()
    limit = float(torch.finfo(dtype).max)
    tiny = float(torch.finfo(dtype).smallest_normal)
    extra = torch.tensor([limit * 1.01, limit * 1.5, 1e30, tiny / 3, tiny / 7, 1e-30, 0.0, float("inf")])
    generator = torch.Generator().manual_seed(0)
    spread = torch.randn(4096, generator=generator) * torch.exp2(torch.randint(-20, 20, (4096,),
                                                                               generator=generator).float())
    values = torch.cat([exact, near, extra, spread])
    return torch.cat([values, -values]).contiguous()


def _self_test_fp8(k) -> str | None:
    """fp8 (e4m3fn, e5m2): every pattern to float32, and float32 back as the engine's to_output_dtype casts
    (saturated at the largest finite value, then rounded to nearest even), against torch."""
    for dtype in FP8:
        raw = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)
        got = np.empty(256, np.float32)
        k.to_float32(bits_view(raw), got)
        want = raw.float().numpy()
        nan = np.isnan(want)
        if not (np.array_equal(np.isnan(got), nan) and np.array_equal(got[~nan].view(np.uint32),
                                                                        want[~nan].view(np.uint32))):
            return f"{dtype} to float32 differs from torch"
        values = _fp8_test_values(dtype)
        out = torch.empty(values.numel(), dtype=dtype)
        k.from_float32(values.numpy(), bits_view(out))
        limit = torch.finfo(dtype).max
        expected = values.clamp(-limit, limit).to(dtype)
        if not torch.equal(out.view(torch.uint8), expected.view(torch.uint8)):
            return f"float32 to {dtype} differs from torch"
    return None
