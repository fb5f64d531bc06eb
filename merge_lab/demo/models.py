"""Small checkpoints with the REAL key sets (tiny widths), for the demo and the tests.

A "family" is a base plus fine-tunes made as base + a shared direction + each one's own noise, so that
the fine-tunes are related the way real fine-tunes of one base are (positive cosine between their task
vectors, different per block).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import torch

from merge_lab.archs import layout_for
from merge_lab.archs.layouts import TINY_WIDTH, ModelLayout
from merge_lab.io.header import DTYPE_NAMES
from merge_lab.io.writer import OutputEntry, SafetensorsWriter


def _generator(*parts) -> torch.Generator:
    digest = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def _init(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = _generator("init", seed, key)
    if key.endswith("position_ids"):
        return torch.arange(shape[-1], dtype=torch.int64).reshape(shape)
    if key.endswith("logit_scale"):
        return torch.tensor(math.log(100.0))
    if len(shape) == 1 and ("norm" in key or "ln_" in key or "layer_norm" in key) and key.endswith("weight"):
        return 1.0 + 0.05 * torch.randn(shape, generator=g)
    if len(shape) == 1:
        return 0.02 * torch.randn(shape, generator=g)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return torch.randn(shape, generator=g) / math.sqrt(max(fan_in, 1))


def base_state_dict(layout: ModelLayout, seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    out = {}
    for key, shape in layout.shapes().items():
        t = _init(key, shape, seed)
        out[key] = t if not t.is_floating_point() else t.to(dtype)
    return out


def finetune_state_dict(base: dict[str, torch.Tensor], index: int, seed: int = 0, shared: float = 0.6,
                        own: float = 0.8, strength: float = 0.05) -> dict[str, torch.Tensor]:
    """base + strength·std·(shared·d + own·εᵢ): a related "fine-tune" of `base`."""
    out = {}
    for key, t in base.items():
        if not t.is_floating_point() or key.endswith("logit_scale"):
            out[key] = t.clone()
            continue
        x = t.float()
        scale = strength * (float(x.std()) if x.numel() > 1 else 0.02) or strength * 0.02
        d = torch.randn(x.shape, generator=_generator("shared", seed, key))
        e = torch.randn(x.shape, generator=_generator("own", seed, index, key))
        out[key] = (x + scale * (shared * d + own * e)).to(t.dtype)
    return out


def save_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None, *,
                    overwrite: bool = True) -> Path:
    """Write with our streaming writer (atomic: temporary file, verified, renamed). A builder of demo and test
    files: it rewrites its own files unless told not to."""
    entries = [OutputEntry(k, DTYPE_NAMES[v.dtype], tuple(v.shape)) for k, v in state.items()]
    with SafetensorsWriter(path, entries, {"format": "pt", **(metadata or {})}, overwrite=overwrite) as writer:
        for k, v in state.items():
            writer.write(k, v)
        writer.finish()
    return Path(path)


def make_family(arch: str, folder: str | os.PathLike, *, finetunes: int = 3, width: int = TINY_WIDTH,
                vocab: int = 49408, dtype: torch.dtype = torch.float16, seed: int = 0,
                prefix: str | None = None) -> tuple[Path, list[Path]]:
    """Write <prefix>-base.safetensors and <prefix>-ft1.. into `folder`; returns (base, fine-tunes)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    prefix = prefix or f"tiny-{arch}"
    layout = layout_for(arch, width=width, vocab=vocab)
    base = base_state_dict(layout, seed, dtype)
    base_path = save_state_dict(base, folder / f"{prefix}-base.safetensors")
    paths = []
    for i in range(1, finetunes + 1):
        paths.append(save_state_dict(finetune_state_dict(base, i, seed), folder / f"{prefix}-ft{i}.safetensors"))
    return base_path, paths
