"""LoRA math: the weight difference ΔW of one layer from its low-rank factors, and applying it. Pure tensors.

The formulas are the published ones, as the hosts apply them (kohya sd-scripts networks/merge_lora.py and
lora.py; LyCORIS lycoris/modules/{locon,loha,lokr}.py; ComfyUI comfy/weight_adapter/): every factor in
float32, the scale alpha / rank (alpha = rank when the file has none), then W + strength · ΔW.
"""

from __future__ import annotations

import torch


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float32)


def rebuild_tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """A Tucker-decomposed kernel: W[p, r, k, l] = Σ_ij core[i, j, k, l] · a[j, r] · b[i, p] (LyCORIS's
    rebuild_tucker: `a` maps the input channels into the rank, `b` the rank into the output channels)."""
    return torch.einsum("i j k l, j r, i p -> p r k l", _f32(core), _f32(a).flatten(1), _f32(b).flatten(1))


def lora_delta(up: torch.Tensor, down: torch.Tensor, *, alpha: float | None = None,
               mid: torch.Tensor | None = None, shape: tuple[int, ...] | None = None,
               strength: float = 1.0) -> torch.Tensor:
    """kohya LoRA / LoCon: ΔW = up · down · alpha / rank for a linear layer, a 1×1 and a k×k convolution
    (the k×k kernel in `down`, up 1×1: kohya's conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)), and
    with a Tucker `mid` (LoCon's lora_mid: down 1×1, mid k×k, up 1×1). `shape`: the layer's weight shape.
    Times `strength`, in kohya's order (strength · (up · down) · scale), so that W + this is their bits."""
    rank = down.shape[0]
    scale = 1.0 if alpha is None else float(alpha) / rank
    up32, down32 = _f32(up), _f32(down)
    if mid is not None:
        delta = rebuild_tucker(mid, down32, up32.flatten(1).T)
    elif down32.dim() == 4 and down32.shape[2:] == (1, 1):
        delta = (up32.flatten(1) @ down32.flatten(1))[:, :, None, None]
    elif down32.dim() == 4:  # kohya's form, so that the bits are theirs
        delta = torch.nn.functional.conv2d(down32.permute(1, 0, 2, 3), up32).permute(1, 0, 2, 3)
    else:
        delta = up32.flatten(1) @ down32.flatten(1)
    # in place, one multiply at a time (the same bits as strength · ΔW · scale, without two fresh copies of ΔW;
    # a factor of 1 is exact and skipped)
    if float(strength) != 1.0:
        delta.mul_(float(strength))
    if scale != 1.0:
        delta.mul_(scale)
    return delta if shape is None else delta.reshape(shape)


def loha_delta(w1a: torch.Tensor, w1b: torch.Tensor, w2a: torch.Tensor, w2b: torch.Tensor, *,
               alpha: float | None = None, t1: torch.Tensor | None = None, t2: torch.Tensor | None = None,
               shape: tuple[int, ...] | None = None, strength: float = 1.0) -> torch.Tensor:
    """LyCORIS LoHa: ΔW = (w1a · w1b) ⊙ (w2a · w2b) · alpha / rank (rank = w1b's rows); with Tucker cores
    t1 / t2 each factor is rebuild_tucker(t, wb, wa). Times `strength` as ComfyUI does: (strength · scale) · ΔW."""
    rank = w1b.shape[0]
    scale = 1.0 if alpha is None else float(alpha) / rank
    m1 = rebuild_tucker(t1, w1b, w1a) if t1 is not None else _f32(w1a) @ _f32(w1b).flatten(1)
    m2 = rebuild_tucker(t2, w2b, w2a) if t2 is not None else _f32(w2a) @ _f32(w2b).flatten(1)
    delta = (float(strength) * scale) * (m1 * m2)
    return delta if shape is None else delta.reshape(shape)


def lokr_delta(*, w1: torch.Tensor | None = None, w1a: torch.Tensor | None = None,
               w1b: torch.Tensor | None = None, w2: torch.Tensor | None = None, w2a: torch.Tensor | None = None,
               w2b: torch.Tensor | None = None, t2: torch.Tensor | None = None, alpha: float | None = None,
               shape: tuple[int, ...] | None = None, strength: float = 1.0) -> torch.Tensor:
    """LyCORIS LoKr: ΔW = w1 ⊗ w2 (Kronecker product), each factor whole or a product of two (w2 also with
    a Tucker core t2). The scale is alpha / rank of the decomposed factor (w1b's rows, else w2b's), 1 when
    both factors are whole (LyCORIS and ComfyUI ignore alpha then). Times `strength`: (strength · scale) · ΔW."""
    rank = w1b.shape[0] if w1b is not None else w2b.shape[0] if w2b is not None else None
    scale = float(alpha) / rank if alpha is not None and rank is not None else 1.0
    m1 = _f32(w1) if w1 is not None else _f32(w1a) @ _f32(w1b)
    if w2 is not None:
        m2 = _f32(w2)
    elif t2 is not None:
        m2 = rebuild_tucker(t2, w2b, w2a)
    else:
        m2 = _f32(w2a) @ _f32(w2b).flatten(1)
        if shape is not None and len(shape) == 4:
            m2 = m2.reshape(m2.shape[0], -1, *shape[2:])
    if m2.dim() == 4:
        m1 = m1[:, :, None, None]
    delta = (float(strength) * scale) * torch.kron(m1.contiguous(), m2.contiguous())  # kron views its inputs
    return delta if shape is None else delta.reshape(shape)


def apply_dora(weight: torch.Tensor, delta: torch.Tensor, dora_scale: torch.Tensor, strength: float
               ) -> torch.Tensor:
    """DoRA (weight-decomposed LoRA): W' = m · (W + ΔW) / ‖W + ΔW‖ with the norm taken per output channel
    when the magnitude m (`dora_scale`) has one value per output row, else per input channel; at a strength
    s ≠ 1 the result is W + s · (W' − W) (ComfyUI's weight_decompose, LyCORIS's wd_on_out)."""
    w = weight.to(torch.float32)
    merged = w + delta.to(torch.float32)
    m = dora_scale.to(torch.float32)
    if m.shape[0] == merged.shape[0] and m.numel() == merged.shape[0]:
        norm = merged.reshape(merged.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1))
        m = m.reshape(norm.shape)
    else:
        t = merged.transpose(0, 1)
        norm = t.reshape(t.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (merged.dim() - 1)).transpose(0, 1)
        m = m.reshape(norm.shape)
    decomposed = merged * (m / norm)
    return w + float(strength) * (decomposed - w)
