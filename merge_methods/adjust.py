"""SuperMerger's *Adjust*: eight values that scale / shift the first and last layers of an SD1 / SD2 / SDXL UNet
(detail, contrast, brightness, colour tone). Not a merge method: it is applied on top of any method's result.

Read from hako-mikan/sd-webui-supermerger at commit 0b1c4915a6ede98ce3528b4f097361842a641d1d (written anew
here, no code copied):

- ``scripts/mergers/mergers.py``, ``fineman(fine, isxl)``: the eight values ``v`` (the text "IN,OUT,OUT2,
  Contrast,Brightness,COL1,COL2,COL3", split at commas) become six factors
  ``[1 - 0.01 v0, 1 + 0.02 v0, 1 - 0.01 v1, 1 + 0.02 v1, 1 - 0.01 v2, [0.02 v3] + colorcalc(v4:8)]``;
- ``colorcalc(cols, isxl)``: ``0.02 · Σ_i cols[i] · C[i]`` over the four rows ``C`` of ``COLS`` (SD1/SD2:
  ``[-1, 1/3, 2/3], [1, 1, 0], [0, -1, -1], [1, 0, 1]``) or ``COLSXL`` (SDXL: ``[0, 0, 1], [1, 0, 0],
  [-1, -1, 0], [-1, 1, 0]``), a 3-vector;
- ``FINETUNES`` and the ``##### Adjust`` step of the merge loop in ``smerge``: factor ``i`` multiplies key
  ``FINETUNES[i]`` for ``i < 5``; the last key (``out.2.bias``, the 4 latent channels) gets the 4-vector
  ``[0.02 v3, *colorcalc]`` added. This runs on each key right after its merge, before the model is saved;
- ``scripts/supermerger.py``: the sliders IN / OUT / OUT2 "Detail/Noise" (-6..6), Contrast and Brightness
  (-10..10), Cyan-Red, Magenta-Green, Yellow-Blue (-10..10), default 0; "0,0,0,0,0,0,0,0" (or blank) is off.

SuperMerger treats a model as SDXL when it has ``conditioner.embedders.1.…`` (so an SDXL refiner would get the
SD1 colours): here the architecture is detected, and only sd1 / sd2 / sdxl take Adjust.

sd-mecha 1.1.8 has no equivalent among its built-in merge methods.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch

PREFIX = "model.diffusion_model."
# SuperMerger's FINETUNES, in its order: conv_in, the output GroupNorm, conv_out
ADJUST_KEYS = (
    PREFIX + "input_blocks.0.0.weight",
    PREFIX + "input_blocks.0.0.bias",
    PREFIX + "out.0.weight",
    PREFIX + "out.0.bias",
    PREFIX + "out.2.weight",
    PREFIX + "out.2.bias",
)
# The eight values, in SuperMerger's order (its slider labels)
VALUE_NAMES = ("IN", "OUT", "OUT2", "contrast", "brightness", "cyan-red", "magenta-green", "yellow-blue")
# SuperMerger's COLS / COLSXL: the latent-channel direction (channels 1..3) of brightness and the 3 colour tones
COLOURS = {
    "sd": ((-1.0, 1 / 3, 2 / 3), (1.0, 1.0, 0.0), (0.0, -1.0, -1.0), (1.0, 0.0, 1.0)),
    "sdxl": ((0.0, 0.0, 1.0), (1.0, 0.0, 0.0), (-1.0, -1.0, 0.0), (-1.0, 1.0, 0.0)),
}
# which colour table each architecture uses (every other architecture has no Adjust)
ARCH_COLOURS = {"sd1": "sd", "sd2": "sd", "sdxl": "sdxl"}
LATENT_CHANNELS = 4


@dataclass(frozen=True)
class AdjustOp:
    """What Adjust does to one key: multiply it by `scale`, or add `shift` (one value per element, a bias)."""
    scale: float | None = None
    shift: tuple[float, ...] | None = None


def parse_adjust(value) -> tuple[float, ...]:
    """The eight values from a text ("1,0,0,0,0,0,0,0"; commas, semicolons or spaces between) or a list.
    Exactly eight finite numbers, else ValueError (one line)."""
    if isinstance(value, str):
        parts = [p for p in re.split(r"[,;\s]+", value.strip()) if p]
        numbers = []
        for p in parts:
            try:
                numbers.append(float(p))
            except ValueError:
                raise ValueError(f"adjust: {p!r} is not a number") from None
    elif isinstance(value, Sequence):
        numbers = list(value)
        for x in numbers:
            if not isinstance(x, (int, float)) or isinstance(x, bool):
                raise ValueError(f"adjust: {x!r} is not a number")
        numbers = [float(x) for x in numbers]
    else:
        raise ValueError(f"adjust must be 8 comma-separated numbers, got {value!r}")
    if len(numbers) != len(VALUE_NAMES):
        raise ValueError(f"adjust takes 8 numbers ({','.join(VALUE_NAMES)}), got {len(numbers)}")
    for name, x in zip(VALUE_NAMES, numbers):
        if not math.isfinite(x):
            raise ValueError(f"adjust {name} must be a finite number, got {x}")
    return tuple(numbers)


def is_identity(values: Sequence[float] | None) -> bool:
    """All zeros (or none): Adjust changes nothing."""
    return values is None or all(float(v) == 0 for v in values)


def colour_shift(values: Sequence[float], arch: str) -> tuple[float, ...]:
    """The 4-vector added to out.2.bias: contrast on latent channel 0, brightness and the colour tones on 1..3
    (SuperMerger's ``[fine[3] * 0.02] + colorcalc(fine[4:8], isxl)``)."""
    table = COLOURS[_family(arch)]
    tones = [0.0, 0.0, 0.0]
    for amount, direction in zip(values[4:8], table):
        for c in range(3):
            tones[c] += direction[c] * amount * 0.02
    return (values[3] * 0.02, *tones)


def adjust_operations(values: Sequence[float], arch: str) -> dict[str, AdjustOp]:
    """Each of the six keys' operation for these eight values (SuperMerger's ``fineman``)."""
    v = [float(x) for x in values]
    ops = {
        ADJUST_KEYS[0]: AdjustOp(scale=1 - v[0] * 0.01),
        ADJUST_KEYS[1]: AdjustOp(scale=1 + v[0] * 0.02),
        ADJUST_KEYS[2]: AdjustOp(scale=1 - v[1] * 0.01),
        ADJUST_KEYS[3]: AdjustOp(scale=1 + v[1] * 0.02),
        ADJUST_KEYS[4]: AdjustOp(scale=1 - v[2] * 0.01),
        ADJUST_KEYS[5]: AdjustOp(shift=colour_shift(v, arch)),
    }
    return ops


def apply_operation(tensor: torch.Tensor, op: AdjustOp, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`tensor` (the whole key) with `op` applied, computed in `dtype` (float32 unless float64 is asked); a new
    tensor in `dtype`. A shift needs one value per element (out.2.bias: the 4 latent channels)."""
    t = tensor.to(dtype)
    if op.scale is not None:
        return t * op.scale
    shift = torch.tensor(op.shift, dtype=dtype, device=t.device)
    if t.shape != shift.shape:
        raise ValueError(f"adjust adds {len(op.shift)} values (one per latent channel) to a tensor of shape "
                         f"{list(t.shape)}")
    return t + shift


def apply_adjust(key: str, tensor: torch.Tensor, values: Sequence[float], arch: str,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`tensor` of checkpoint key `key` after Adjust (a key Adjust does not touch comes back unchanged)."""
    op = adjust_operations(values, arch).get(key)
    return tensor if op is None else apply_operation(tensor, op, dtype)


def _family(arch: str) -> str:
    try:
        return ARCH_COLOURS[arch]
    except KeyError:
        raise ValueError(f"adjust is defined for SD1 / SD2 / SDXL UNets only, not for {arch}") from None
