"""Tiny LoRA files with the names trainers write, and the reference formulas written out independently of
merge_lab (kohya's conv2d form for 3×3 LoCon, torch.kron for LoKr, ComfyUI's weight_decompose for DoRA)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from merge_lab.io.checkpoints import read_header_any
from merge_lab.io.reader import SafetensorsReader


def shapes_of(path) -> dict[str, tuple[int, ...]]:
    return {k: t.shape for k, t in read_header_any(str(path)).tensors.items()}


def read_all(path) -> dict[str, torch.Tensor]:
    r = SafetensorsReader(path)
    try:
        return {k: r.read(k) for k in r.tensors}
    finally:
        r.close()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def lora_factors(out_shape: tuple[int, ...], rank: int, seed: int, *, conv3=False) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) for a layer of weight shape `out_shape`: linear (out, in), conv (out, in, kh, kw)."""
    g = gen(seed)
    out, cin = out_shape[0], out_shape[1]
    if len(out_shape) == 4:
        down = torch.randn(rank, cin, *out_shape[2:], generator=g) * 0.1
        up = torch.randn(out, rank, 1, 1, generator=g) * 0.1
    else:
        down = torch.randn(rank, cin, generator=g) * 0.1
        up = torch.randn(out, rank, generator=g) * 0.1
    return up, down


def reference_lora_delta(up, down, alpha=None, ratio=1.0) -> torch.Tensor:
    """kohya networks/merge_lora.py: `ratio * (up @ down) * scale`; conv 1×1 squeezed; conv k×k through
    conv2d (weight + this is their merged weight)."""
    rank = down.shape[0]
    scale = (alpha if alpha is not None else rank) / rank
    up, down = up.float(), down.float()
    if down.dim() == 2:
        return ratio * (up @ down) * scale
    if down.shape[2:] == (1, 1):
        return ratio * (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scale
    return ratio * F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale


def reference_dora(weight, delta, dora_scale, strength):
    """ComfyUI comfy/weight_adapter/base.py weight_decompose (wd on the output axis)."""
    w = weight.float()
    calc = w + delta
    norm = calc.reshape(calc.shape[0], -1).norm(dim=1, keepdim=True).reshape(calc.shape[0], *[1] * (calc.dim() - 1))
    calc = calc * (dora_scale.float() / norm)
    return w + strength * (calc - w)


def save_lora(tensors: dict[str, torch.Tensor], path, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or {"ss_network_module":
                                                                                              "networks.lora"})
    return path
