"""Small tensor helpers shared by the methods."""

from __future__ import annotations

import torch


def sum_(vectors: list[torch.Tensor]) -> torch.Tensor:
    """Σ vectors, added in order into the first (overwritten: it must be ours)."""
    total = vectors[0]
    for vector in vectors[1:]:
        total.add_(vector)
    return total


def rows_of(tensor: torch.Tensor) -> torch.Tensor:
    """A (rows, width) view: rows along the first dimension (an output channel), all the other dimensions
    flattened into the row; a 1-D tensor is one row, a 0-d tensor a row of one entry."""
    if tensor.dim() <= 1:
        return tensor.reshape(1, -1)
    return tensor.reshape(tensor.shape[0], -1)


def linear_combination(vectors: list[torch.Tensor], coefficients, base: torch.Tensor | None = None) -> torch.Tensor:
    """Σ βᵢ·xᵢ (+ base) as a fresh tensor, one exactly rounded multiply and add per input (no fused
    multiply-add, so a chunk of rows gives the same bits as those rows of the whole tensor)."""
    active = [(float(c), v) for c, v in zip(coefficients, vectors) if float(c) != 0.0]
    if not active:
        out = torch.zeros_like(vectors[0]) if base is None else base.clone()
        return out
    out = torch.mul(active[0][1], active[0][0])
    scratch = torch.empty_like(out)
    for c, v in active[1:]:
        out.add_(torch.mul(v, c, out=scratch))
    return out.add_(base) if base is not None else out
