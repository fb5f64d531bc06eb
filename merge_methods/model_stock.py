"""Model Stock (Jang et al. 2024): move from the base toward the mean fine-tune by the factor t that the
angle between the task vectors suggests.

c = mean of the cosines between τᵢ and τⱼ over ALL pairs i < j, t = N·c / (1 + (N−1)·c),
θ = θ_base + α_b·t·mean(τᵢ). The Gram matrix Gᵢⱼ = ⟨τᵢ, τⱼ⟩ (float64) carries everything t needs; it is
additive over chunks of a tensor and over the keys of a block, so the same helpers serve the tensor, row
and block granularities and the θ analysis (merge_lab/analysis.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .registry import KeyContext, Param, merge_method
from .task_vectors import apply_to_base, task_vectors, unchanged_base

# Length of the pieces whose dot products are summed in float32 (on the CPU) before the float64 sum: short
# enough that the float32 partial sums lose nothing measurable (~1e-9 relative on 16 M random elements),
# and 9x faster than float64 products of whole tensors.
PIECE = 256
# Elements converted to float64 at a time where float64 products are used (bounds the copy to N·8 MiB).
GRAM_SLICE = 1 << 20
# |1 + (N−1)·c| below this is the singularity of t (only reachable for c < 0, where t is 0 anyway).
SINGULARITY_EPS = 1e-6


def _float32_pieces_are_exact(t: torch.Tensor) -> bool:
    """float32 matrix products are IEEE float32 only on the CPU with the "highest" precision setting (a host
    may allow TF32 / bf16 for matmuls, which would cost 3 decimal digits); everywhere else use float64."""
    return t.dtype == torch.float32 and t.device.type == "cpu" and torch.get_float32_matmul_precision() == "highest"


def _dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ a·b of two flat tensors with a float64 accumulator."""
    n = a.numel()
    if n == 0:
        return 0.0
    if _float32_pieces_are_exact(a):
        whole = n - n % PIECE
        total = 0.0
        if whole:
            pieces = torch.bmm(a[:whole].view(-1, 1, PIECE), b[:whole].view(-1, PIECE, 1))
            total = float(pieces.sum(dtype=torch.float64))
        if whole < n:
            total += float(torch.dot(a[whole:].double(), b[whole:].double()))
        return total
    total = 0.0
    for start in range(0, n, GRAM_SLICE):
        stop = min(start + GRAM_SLICE, n)
        total += float(torch.dot(a[start:stop].double(), b[start:stop].double()))
    return total


def gram(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Gᵢⱼ = Σ vᵢ·vⱼ over all elements, accumulated in float64, as an N×N CPU tensor."""
    flat = [v.reshape(-1) for v in vectors]
    n = len(flat)
    out = torch.empty(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            out[i, j] = out[j, i] = _dot(flat[i], flat[j])
    return out


def _piece_length(width: int) -> int | None:
    """The length rows are cut into for float32 partial sums: the whole row up to PIECE elements, else the
    largest divisor of the width in [PIECE/4, PIECE]; None when there is none (float64 products then)."""
    if width <= PIECE:
        return width
    return next((d for d in range(PIECE, PIECE // 4 - 1, -1) if width % d == 0), None)


def row_gram(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-row Gram matrices, rows = the first dimension (an output channel), shape (rows, N, N), float64."""
    rows = vectors[0].shape[0]
    flat = [v.reshape(rows, -1) for v in vectors]
    n, width = len(flat), flat[0].shape[1]
    out = torch.empty(rows, n, n, dtype=torch.float64, device=flat[0].device)
    piece = _piece_length(width)
    if width and piece and _float32_pieces_are_exact(flat[0]):
        pieces = width // piece
        for i in range(n):
            for j in range(i, n):
                dots = torch.bmm(flat[i].reshape(-1, 1, piece), flat[j].reshape(-1, piece, 1))
                out[:, i, j] = out[:, j, i] = dots.view(rows, pieces).sum(dim=1, dtype=torch.float64)
        return out
    step = max(1, GRAM_SLICE // max(width, 1))
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        x = torch.empty(stop - start, n, width, dtype=torch.float64, device=flat[0].device)
        for i, f in enumerate(flat):
            x[:, i].copy_(f[start:stop])
        out[start:stop] = torch.bmm(x, x.transpose(1, 2))
    return out


def pairwise_cosines(gram_matrix: torch.Tensor) -> torch.Tensor:
    """Cosines of all pairs i < j (in the order of ``torch.triu_indices``) from a Gram matrix (…, N, N);
    NaN where a vector has zero norm (the angle is undefined)."""
    n = gram_matrix.shape[-1]
    i, j = torch.triu_indices(n, n, 1)
    norms2 = gram_matrix.diagonal(dim1=-2, dim2=-1)
    denominator = torch.sqrt(norms2[..., i]) * torch.sqrt(norms2[..., j])
    cos = (gram_matrix[..., i, j] / denominator).clamp(-1.0, 1.0)
    return cos.masked_fill(denominator == 0, float("nan"))


def model_stock_t(gram_matrix: torch.Tensor) -> torch.Tensor:
    """t = N·c / (1 + (N−1)·c) from Gram matrices (…, N, N), with c the mean pairwise cosine.

    Guards (our definitions): a pair with a zero-norm vector counts as cosine 0; c ≤ 0 (no agreement
    between the fine-tunes, which includes the singularity c = −1/(N−1)) gives t = 0, i.e. the base. The
    formula would give t ≤ 0 or a huge t there (mergekit and sd-mecha use it as is)."""
    n = gram_matrix.shape[-1]
    c = pairwise_cosines(gram_matrix).nan_to_num(0.0).mean(dim=-1)
    denominator = 1.0 + (n - 1) * c
    t = n * c / denominator
    return t.masked_fill((c <= 0) | (denominator.abs() < SINGULARITY_EPS), 0.0)


GRANULARITIES = ("tensor", "row", "block")


def _uses_tensor_statistics(params, shape) -> bool:
    return params["granularity"] == "tensor" or (params["granularity"] == "row" and len(shape) <= 1)


def model_stock_statistics(models, base, ctx: KeyContext, granularity):
    return {"gram": gram(task_vectors(models, base, ctx, weighted=False))}


@merge_method(
    "model_stock",
    summary="Model Stock: θ_base + t·mean(τᵢ), t from the mean pairwise cosine of the task vectors",
    params=(
        Param("granularity", str, "tensor",
              "one t per tensor, per row (output channel) or per block (from all the block's keys)",
              choices=GRANULARITIES),
    ),
    base="required",
    min_models=2,
    takes_weights=False,
    statistics=model_stock_statistics,
    statistics_needed=_uses_tensor_statistics,
    needs_block_statistics=lambda params: params["granularity"] == "block",
)
def model_stock(models, base, ratio, ctx: KeyContext, granularity):
    n = len(models)
    if n < 2:
        raise ValueError(f"model_stock needs at least 2 fine-tuned models besides the base, got {n}")
    if ratio == 0:
        return unchanged_base(base, ctx)
    stats = ctx.stats or {}
    taus = task_vectors(models, base, ctx, weighted=False)
    if granularity == "block":
        if "block_gram" not in stats:
            raise ValueError("granularity block needs the block statistics (computed by the engine)")
        t: float | torch.Tensor = float(model_stock_t(stats["block_gram"]))
    elif granularity == "tensor" or taus[0].dim() <= 1:
        t = float(model_stock_t(stats["gram"] if "gram" in stats else gram(taus)))
    else:
        t = model_stock_t(row_gram(taus)).to(taus[0].device, taus[0].dtype)
        t = t.view(-1, *([1] * (taus[0].dim() - 1)))
    if isinstance(t, float) and t == 0:
        return unchanged_base(base, ctx)
    total = taus[0]
    for tau in taus[1:]:
        total.add_(tau)
    return apply_to_base(base, total, t * (ratio / n))  # θ_base + α·t·mean(τᵢ)
