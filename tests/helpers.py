"""Test helpers (plain functions; the fixtures are in conftest.py): an independent statement of the block map,
the documented drop-mask draws, and small utilities."""

from __future__ import annotations

import hashlib
import re

import numpy as np
import torch


def expected_block(key: str, arch: str):
    """The block map (docs/blocks.md) and our extra-block rule, written independently of merge_lab.archs.blocks."""
    if key.endswith(("position_ids", "logit_scale")):
        return None
    m = re.match(r"model\.diffusion_model\.(input|output)_blocks\.(\d+)\.", key)
    if m:
        return ("IN" if m.group(1) == "input" else "OUT") + f"{int(m.group(2)):02d}"
    if key.startswith("model.diffusion_model.middle_block."):
        return "M00"
    if re.match(r"model\.diffusion_model\.(time_embed|label_emb)\.", key):
        return "TIME"
    if re.match(r"model\.diffusion_model\.out\.[02]\.", key):
        return "OUT"
    if key.startswith("first_stage_model."):
        return "VAE"
    if key.startswith("conditioner.embedders."):
        return {"0": "TE1", "1": "TE2"}[key.split(".")[2]]
    if key.startswith("cond_stage_model."):
        return "BASE"
    return None


def mergeable(key: str, tensor: torch.Tensor, arch: str) -> bool:
    return tensor.is_floating_point() and expected_block(key, arch) is not None


# ---- the documented drop-mask draws, restated in plain Python (independently of merge_methods/drop.py) ----

MASK64 = (1 << 64) - 1


def splitmix64_output(seed: int, j: int) -> int:
    """Output j (from 0) of SplitMix64 seeded with `seed` (Vigna's reference splitmix64.c)."""
    z = (seed + (j + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def reference_draws(seed, key, index, numel, positions=None):
    """u of the given flat positions (default all numel) of model `index`'s tensor `key`: sha256 of
    f"{seed}\\0{key}\\0{index}" seeds SplitMix64 streams A (bytes 0-7, little endian) and B (bytes 8-15);
    a = byte i % 8 of A's output i // 8, b = 16-bit word i % 4 of B's output i // 4 (least significant
    first), u = (a * 2**16 + b) / 2**24."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{index}".encode()).digest()
    stream_a, stream_b = int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:16], "little")
    out = []
    for i in range(numel) if positions is None else positions:
        a = splitmix64_output(stream_a, i // 8) >> (8 * (i % 8)) & 0xFF
        b = splitmix64_output(stream_b, i // 4) >> (16 * (i % 4)) & 0xFFFF
        out.append((a * 2**16 + b) / 2**24)
    return torch.tensor(out, dtype=torch.float32)


def reference_mask(seed, key, index, numel, p, positions=None):
    return reference_draws(seed, key, index, numel, positions) >= p


# ---- images ---------------------------------------------------------------------------------------------

def pixels(image) -> np.ndarray:
    """A PIL image's RGB pixels as signed integers (differences do not wrap)."""
    return np.asarray(image.convert("RGB"), dtype=np.int16)
