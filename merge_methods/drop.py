"""Random drop methods: DARE and TSD ("TIES-SOUP with DROP").

Drop masks are reproducible bit for bit whatever the thread count, key order, device or chunking: the
flat index space of each (key, model) is cut into fixed blocks of 2**16 elements, and block j draws
``torch.rand(block length)`` from its own CPU ``torch.Generator`` seeded with the first 8 bytes (little
endian) of sha256(f"{seed}\\0{key}\\0{model index}\\0{j}"). A chunk of rows draws the blocks it overlaps
and keeps its slice; an element is kept where u ≥ p (probability 1 − p).

Block size: the engine merges in cache-sized slices of 2**14–2**18 elements; each thread remembers the last
block it drew per model, so a block is drawn once however the slices cut it, and 2**16 keeps that memory
small (64 KiB per model and thread) while the seeding costs ~7% over one generator per 2**20 elements.
"""

from __future__ import annotations

import hashlib
import math
import threading

import torch

from .model_stock import gram, model_stock_t
from .registry import KeyContext, Param, merge_method
from .task_vectors import (
    DENSITY_HELP,
    ELECTION,
    ELECTION_HELP,
    SCALE,
    apply_to_base,
    check_k,
    task_vectors,
    ties_merge,
    trim_stages,
    trim_statistics,
    trim_thresholds,
    trims_tensor,
    unchanged_base,
)

MASK_BLOCK = 1 << 16
# Per thread: model index -> ((seed, key, block, p), keep mask of that block). A memo, not state: the
# masks are a pure function of their identity.
_last_block = threading.local()


def mask_seed(seed: int, key: str, model_index: int, block: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{key}\0{model_index}\0{block}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _mask_blocks(ctx: KeyContext, model_index: int, count: int, p: float):
    """(start, stop, keep) for each mask block that elements [ctx.offset, ctx.offset + count) of the whole
    tensor overlap; start/stop are relative to ctx.offset, keep is a CPU bool tensor of stop − start."""
    total = ctx.numel
    first, last = ctx.offset, ctx.offset + count
    if last > total:
        raise ValueError(f"chunk [{first}, {last}) lies outside the tensor of {total} elements")
    if count == 0:
        return
    for block in range(first // MASK_BLOCK, (last - 1) // MASK_BLOCK + 1):
        block_start = block * MASK_BLOCK
        length = min(MASK_BLOCK, total - block_start)
        keep = _block_keep(ctx.seed, ctx.key, model_index, block, length, p)
        lo, hi = max(first, block_start), min(last, block_start + length)
        yield lo - first, hi - first, keep[lo - block_start:hi - block_start]


def _block_keep(seed: int, key: str, model_index: int, block: int, length: int, p: float) -> torch.Tensor:
    memo = getattr(_last_block, "masks", None)
    if memo is None:
        memo = _last_block.masks = {}
    identity = (seed, key, block, length, p)
    hit = memo.get(model_index)
    if hit is not None and hit[0] == identity:
        return hit[1]
    generator = torch.Generator().manual_seed(mask_seed(seed, key, model_index, block))
    keep = torch.rand(length, generator=generator) >= p
    memo[model_index] = (identity, keep)
    return keep


def keep_mask(ctx: KeyContext, model_index: int, count: int, p: float) -> torch.Tensor:
    """The keep mask (bool, CPU, flat) of `count` elements starting at flat index ctx.offset of the whole
    tensor ctx.shape: the same bits for a chunk as for those elements of the whole tensor."""
    parts = [keep for _, _, keep in _mask_blocks(ctx, model_index, count, p)]
    if not parts:
        return torch.zeros(0, dtype=torch.bool)
    return parts[0].clone() if len(parts) == 1 else torch.cat(parts)  # never hand out the memo itself


def drop_(taus: list[torch.Tensor], ctx: KeyContext, p: float, rescale: bool) -> list[torch.Tensor]:
    """mᵢ ⊙ τᵢ (÷ (1 − p) when rescaling), in place, one mask block at a time (no whole-tensor mask).
    p = 0 keeps everything, p = 1 drops everything (no rescale then: there is nothing left)."""
    if p <= 0:
        return taus
    for index, tau in enumerate(taus):
        if p >= 1:
            tau.zero_()
            continue
        flat = tau.view(-1)
        for start, stop, keep in _mask_blocks(ctx, index, flat.numel(), p):
            flat[start:stop].mul_(keep.to(flat.device))
        if rescale:
            tau.div_(1.0 - p)
    return taus


def _check_p(p: float) -> None:
    if not 0.0 <= p <= 1.0 or math.isnan(p):
        raise ValueError(f"p must be in [0, 1], got {p}")


P_HELP = "drop probability of each task-vector entry (0 keeps all, 1 drops all: the base)"
RESCALE_HELP = "divide the kept entries by 1 − p (keeps the expected task vector)"


def _dare_trims(params, shape) -> bool:
    return params["combine"] == "ties" and trims_tensor(params, shape)


def dare_statistics(models, base, ctx: KeyContext, p, rescale, combine, k, election, scale):
    """The trimming thresholds' radix counts of the dropped task vectors (combine ties with k < 1)."""
    return trim_statistics(drop_(task_vectors(models, base, ctx), ctx, p, rescale), ctx, k)


@merge_method(
    "dare",
    summary="DARE: drop task-vector entries with probability p (rescaled), then add them up or TIES them",
    params=(
        Param("p", float, 0.9, P_HELP, minimum=0.0, maximum=1.0),
        Param("rescale", bool, True, RESCALE_HELP),
        Param("combine", str, "sum", "sum: task arithmetic of the dropped vectors (dare_linear); "
                                     "ties: TIES of them (dare_ties)", choices=("sum", "ties")),
        Param("k", float, 1.0, "combine ties: " + DENSITY_HELP, minimum=0.0, maximum=1.0),
        Param("election", str, "mass", "combine ties: " + ELECTION_HELP, choices=ELECTION),
        SCALE,
    ),
    base="required",
    randomized=True,
    statistics=dare_statistics,
    statistics_needed=_dare_trims,
    statistics_stages=trim_stages,
)
def dare(models, base, ratio, ctx: KeyContext, p, rescale, combine, k, election, scale):
    _check_p(p)
    check_k(k)
    coefficient = ratio * scale
    if coefficient == 0 or p >= 1 or (combine == "ties" and k == 0):
        return unchanged_base(base, ctx)
    taus = drop_(task_vectors(models, base, ctx), ctx, p, rescale)
    if combine == "ties":
        merged = ties_merge(taus, k, election, trim_thresholds(ctx, k, len(taus), taus[0].dtype))
    else:
        merged = taus[0]
        for tau in taus[1:]:
            merged.add_(tau)
    return apply_to_base(base, merged, coefficient)


def _check_tsd(params, n_models: int) -> None:
    if params["stock"] and n_models < 2:
        raise ValueError(f"tsd with stock=true needs at least 2 fine-tuned models besides the base, got {n_models}")


def tsd_statistics(models, base, ctx: KeyContext, p, k, election, rescale, scale, stock):
    """Gram matrix of the dropped task vectors (for `stock`; additive over chunks since masks are), and
    the radix counts of their trimming thresholds (k < 1)."""
    taus = drop_(task_vectors(models, base, ctx), ctx, p, rescale)
    out = trim_statistics(taus, ctx, k)
    if stock and ctx.stage == 0:
        # Rescaling multiplies every vector by the same factor: the cosines, hence t, do not change.
        out["gram"] = gram(taus)
    return out


def _tsd_needs_statistics(params, shape) -> bool:
    return params["stock"] or trims_tensor(params, shape)


@merge_method(
    "tsd",
    summary="TSD (TIES-SOUP with DROP): drop entries with probability p, then TIES-SOUP (6DammK9)",
    params=(
        Param("p", float, 0.1, P_HELP, minimum=0.0, maximum=1.0),
        Param("k", float, 1.0, DENSITY_HELP, minimum=0.0, maximum=1.0),
        Param("election", str, "count", ELECTION_HELP, choices=ELECTION),
        Param("rescale", bool, False, RESCALE_HELP + "; off by default: the disjoint mean keeps the scale"),
        SCALE,
        Param("stock", bool, False, "multiply λ by the Model Stock t of the dropped task vectors, per tensor "
                                    "(TIES-STOCK)"),
    ),
    base="required",
    randomized=True,
    statistics=tsd_statistics,
    statistics_needed=_tsd_needs_statistics,
    statistics_stages=trim_stages,
    check=_check_tsd,
)
def tsd(models, base, ratio, ctx: KeyContext, p, k, election, rescale, scale, stock):
    _check_p(p)
    check_k(k)
    _check_tsd({"stock": stock}, len(models))
    coefficient = ratio * scale
    if coefficient == 0 or p >= 1 or k == 0:
        return unchanged_base(base, ctx)
    taus = drop_(task_vectors(models, base, ctx), ctx, p, rescale)
    if stock:
        stats = ctx.stats or {}
        # Rescaling multiplies every vector by the same factor: the cosines, hence t, do not change.
        coefficient *= float(model_stock_t(stats["gram"] if "gram" in stats else gram(taus)))
        if coefficient == 0:
            return unchanged_base(base, ctx)
    return apply_to_base(base, ties_merge(taus, k, election, trim_thresholds(ctx, k, len(taus), taus[0].dtype)),
                         coefficient)
