"""Model Stock (Jang et al. 2024): move from the base toward the mean fine-tune by the factor t that the
angle between the task vectors suggests.

c = mean of the cosines between τᵢ and τⱼ over ALL pairs i < j, t = N·c / (1 + (N−1)·c),
θ = θ_base + α_b·t·mean(τᵢ). The Gram matrix Gᵢⱼ = ⟨τᵢ, τⱼ⟩ (float64) carries everything t needs; it is
additive over chunks of a tensor and over the keys of a block, so the same helpers serve the tensor, row
and block granularities and the θ analysis (merge_lab/analysis.py).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch

from . import kernels
from .registry import Compiled, KeyContext, Param, Statistics, merge_method
from .task_vectors import apply_to_base, task_vectors, unchanged_base
from .tensors import sum_

# Elements converted to float64 at a time: a small buffer, reused, that stays in the CPU cache (large fresh
# float64 copies cost more in page faults than the products themselves).
GRAM_SLICE = 1 << 16
# Up to this many vectors gram_for_cosines takes dot products pair by pair; above, the N² pairs cost more in
# calls than `gram`'s one matrix product per slice.
DOT_MAX_VECTORS = 8
# |1 + (N−1)·c| below this is the singularity of t (only reachable for c < 0, where t is 0 anyway).
SINGULARITY_EPS = 1e-6


def gram(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Gᵢⱼ = Σ vᵢ·vⱼ over all elements, float64 products and sums, as an N×N CPU tensor."""
    flat = [v.reshape(-1) for v in vectors]
    n, numel = len(flat), flat[0].numel()
    device = flat[0].device
    total = torch.zeros(n, n, dtype=torch.float64, device=device)
    buffer = torch.empty(n, min(GRAM_SLICE, numel), dtype=torch.float64, device=device)
    for start in range(0, numel, GRAM_SLICE):
        stop = min(start + GRAM_SLICE, numel)
        x = buffer[:, :stop - start]
        for i, f in enumerate(flat):
            x[i].copy_(f[start:stop])
        total += x @ x.T
    return total.cpu()


def gram_for_cosines(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The Gram matrix as `gram` gives it, for cosines only: float32 dot products over blocks of GRAM_SLICE
    elements, summed in float64, ~5x cheaper than converting every element to float64. A cosine comes out
    within 1e-6 (tested), ample for Model Stock's t (dt/dc ≤ 1/N near c = 1, and task vectors meet at wide angles);
    not for small angles (the θ analysis of raw weights, a few degrees apart) or for distances between close
    vectors (Gᵢᵢ + Gⱼⱼ − 2Gᵢⱼ cancels: the geometric median): those use `gram`."""
    flat = [v.reshape(-1) for v in vectors]
    n, numel = len(flat), flat[0].numel()
    if flat[0].device.type != "cpu" or flat[0].dtype != torch.float32 or n > DOT_MAX_VECTORS:
        return gram(vectors)
    sums = [[0.0] * n for _ in range(n)]  # Python floats: float64 sums without a tensor op per block
    for start in range(0, numel, GRAM_SLICE):
        part = [f[start:start + GRAM_SLICE] for f in flat]
        for i in range(n):
            for j in range(i, n):
                sums[i][j] += float(torch.dot(part[i], part[j]))
    for i in range(n):
        for j in range(i):
            sums[i][j] = sums[j][i]
    return torch.tensor(sums, dtype=torch.float64)


def row_gram(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-row Gram matrices, rows = the first dimension (an output channel), shape (rows, N, N), float64."""
    rows = vectors[0].shape[0]
    flat = [v.reshape(rows, -1) for v in vectors]
    n, width = len(flat), flat[0].shape[1]
    device = flat[0].device
    out = torch.empty(rows, n, n, dtype=torch.float64, device=device)
    step = max(1, GRAM_SLICE // max(width, 1))
    buffer = torch.empty(min(step, rows), n, width, dtype=torch.float64, device=device)
    for start in range(0, rows, step):
        stop = min(start + step, rows)
        x = buffer[:stop - start]
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


@functools.lru_cache(maxsize=256)
def whole_tensor_t(gram_matrix: torch.Tensor) -> float:
    """t of one Gram matrix, remembered for that matrix object: the engine hands every slice of a tensor the
    same statistics, and t costs a dozen small tensor operations. (Keyed by identity, as tensors hash; the
    cache holds the matrices, so no other tensor can take their id.)"""
    return float(model_stock_t(gram_matrix))


def tensor_t(taus: Sequence[torch.Tensor], stats) -> float:
    """t of a whole tensor: from the engine's statistics of it ("gram") when the task vectors are a slice,
    else from the task vectors themselves."""
    return whole_tensor_t(stats["gram"]) if "gram" in stats else float(model_stock_t(gram_for_cosines(taus)))


GRANULARITIES = ("tensor", "row", "block")


def _uses_tensor_statistics(params, shape) -> bool:
    return params["granularity"] == "tensor" or (params["granularity"] == "row" and len(shape) <= 1)


def model_stock_statistics(models, base, ctx: KeyContext, granularity):
    taus = task_vectors(models, base, ctx, weighted=False)
    stats = {"gram": gram_for_cosines(taus)}
    if ctx.wants_partial:
        stats["partial"] = sum_(taus)  # Σ τᵢ: with the base and t, all the merge needs
    return stats


def model_stock_from_partial(partial, base, ratio, ctx: KeyContext, granularity):
    """`model_stock` of a slice whose Σ τᵢ (`partial`) the statistics pass kept: the same operations on the
    same values, so the same bits, without converting the fine-tunes and subtracting the base again."""
    if not ctx.stats or "gram" not in ctx.stats:
        raise ValueError("a merge from Σ τᵢ needs the whole tensor's Gram matrix")
    gram_matrix = ctx.stats["gram"]
    t = whole_tensor_t(gram_matrix)
    if ratio == 0 or t == 0:
        return unchanged_base(base, ctx)
    return apply_to_base(base, partial, t * (ratio / gram_matrix.shape[0]))


def _compiled_gram(views) -> torch.Tensor:
    """The Gram matrix of the task vectors from `kernels.raw_views` of a slice (compiled)."""
    models, base, _ = views
    total = np.zeros((len(models), len(models)))
    kernels.compiled().gram(models, base, total)
    return torch.from_numpy(total)


def model_stock_raw_statistics(models, base, ctx: KeyContext, granularity):
    views = kernels.raw_views(models, base)
    return None if views is None else {"gram": _compiled_gram(views)}


def model_stock_raw_merge(models, base, out, ratio, ctx: KeyContext, granularity):
    """`model_stock` of one slice from its raw inputs into `out`, compiled: one pass instead of a dozen.
    Per tensor t only (the row and block granularities decline). Same bits as the torch form for the same
    t; a tensor merged in one slice gets its Gram matrix from the compiled `gram`, whose float32 blocks are
    shorter than `gram_for_cosines`' (cosines within 1e-6 of each other, tested)."""
    if not _uses_tensor_statistics({"granularity": granularity}, ctx.shape or tuple(base.shape)):
        return None
    views = kernels.raw_views(models, base, out)
    if views is None:
        return None
    stats = ctx.stats or {}
    t = whole_tensor_t(stats["gram"] if "gram" in stats else _compiled_gram(views))
    if ratio == 0 or t == 0:
        return None  # the base itself: the torch form copies it
    model_views, base_view, out_view = views
    return kernels.compiled().base_plus_scaled_sum(model_views, base_view, t * (ratio / len(models)), out_view)


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
    statistics=Statistics(
        model_stock_statistics,
        needed=_uses_tensor_statistics,
        reveal_nonfinite=True,  # Gᵢᵢ = Σ τᵢ²: NaN/inf in θᵢ or the base makes it NaN/inf
        merge_from_partial=model_stock_from_partial,
        per_block=lambda params: params["granularity"] == "block",
    ),
    compiled=Compiled(statistics=model_stock_raw_statistics, merge=model_stock_raw_merge),
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
        t: float | torch.Tensor = whole_tensor_t(stats["block_gram"])
    elif granularity == "tensor" or taus[0].dim() <= 1:
        t = tensor_t(taus, stats)
    else:
        t = model_stock_t(row_gram(taus)).to(taus[0].device, taus[0].dtype)
        t = t.view(-1, *([1] * (taus[0].dim() - 1)))
    if isinstance(t, float) and t == 0:
        return unchanged_base(base, ctx)
    return apply_to_base(base, sum_(taus), t * (ratio / n))  # θ_base + α·t·mean(τᵢ)
