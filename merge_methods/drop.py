"""Random drop methods: DARE and TSD ("TIES-SOUP with DROP", and TGMD: its geometric-median variant).

Drop masks are reproducible bit for bit whatever the thread count, key order, device or chunking, because
they are counter based: the draw of flat element i of (key, model) is a pure function of (seed, key, model
index, i). The first 16 bytes of sha256(f"{seed}\\0{key}\\0{model index}") seed two SplitMix64 streams, A
(bytes 0–7, little endian) and B (bytes 8–15); a = byte i mod 8 of A's output ⌊i/8⌋ and b = 16-bit word
i mod 4 of B's output ⌊i/4⌋ (least significant first). The draw is u = (a·2¹⁶ + b)·2⁻²⁴, a float32 in
[0, 1) with 24 random bits, and an element is kept where u ≥ p (p as a float32; probability 1 − p).

Why this shape: the keep mask needs B only where a alone cannot decide (a equal to the top 8 bits of the
threshold: 1 element in 256), so a mask costs one SplitMix64 output per 8 elements (~1–2 ns an element
with numpy on a 2-core test machine) instead of a 32-bit draw each; SplitMix64 is a few vectorized integer
operations over the indices, needs no state, and is the well-tested generator that seeds the xoshiro family.
(It replaced one seeded ``torch.Generator``, a Mersenne Twister at ~5.5 ns a draw, per block of 2**16
elements.) `drop_` draws the masks of all models of a key in the same numpy calls, one row a model: on
the thousands of small tensors of a checkpoint the calls' fixed cost, not the elements, is the time.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

from .median import MEDIAN_PARAMS, weiszfeld_coefficients
from .model_stock import gram, gram_for_cosines, tensor_t
from .registry import Chunking, Compiled, KeyContext, Param, Statistics, merge_method
from .task_vectors import (
    DENSITY_HELP,
    ELECTION,
    ELECTION_HELP,
    SCALE,
    apply_to_base,
    check_k,
    raw_ties_mean,
    task_vectors,
    ties_filter_,
    ties_merge,
    trim_stages,
    trim_statistics,
    trim_thresholds,
    trims_tensor,
    unchanged_base,
)
from .tensors import linear_combination, sum_

# SplitMix64 (Steele, Lea & Flood 2014; Vigna's reference constants).
GAMMA = np.uint64(0x9E3779B97F4A7C15)
MIX1 = np.uint64(0xBF58476D1CE4E5B9)
MIX2 = np.uint64(0x94D049BB133111EB)
# 0-d arrays, not numpy scalars: a ufunc call with a uint64 scalar costs twice the fixed overhead, which
# dominates on the many small tensors of a checkpoint.
SHIFT_27, SHIFT_30, SHIFT_31 = (np.array(s, dtype=np.uint64) for s in (27, 30, 31))
# Elements drawn at a time: bounds the temporaries whatever the tensor size, and keeps them in the caches.
DRAW_PIECE = 1 << 17
MIN_PIECE = 1 << 12  # per model, when the masks of many models are drawn together


def stream_seeds(seed: int, key: str, model_index: int) -> tuple[int, int]:
    """The SplitMix64 seeds (A, B) of the drop masks of one model's tensor `key`."""
    digest = hashlib.sha256(f"{seed}\0{key}\0{model_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little"), int.from_bytes(digest[8:16], "little")


def _splitmix(streams: np.ndarray, outputs: np.ndarray) -> np.ndarray:
    """SplitMix64 outputs number `outputs` (uint64, 1-D) of the streams seeded with `streams` (uint64: a
    column (n, 1), one row of outputs a stream; or 1-D like `outputs`, a stream per output)."""
    z = np.add(outputs, np.uint64(1))  # output j comes from the state after j + 1 steps: seed + (j + 1)·γ
    np.multiply(z, GAMMA, out=z)
    z = np.add(z, streams)  # broadcast: every stream's row at once (one set of numpy calls for n models)
    scratch = np.empty_like(z)
    for shift, factor in ((SHIFT_30, MIX1), (SHIFT_27, MIX2)):
        np.right_shift(z, shift, out=scratch)
        np.bitwise_xor(z, scratch, out=z)
        np.multiply(z, factor, out=z)
    np.right_shift(z, SHIFT_31, out=scratch)
    np.bitwise_xor(z, scratch, out=z)
    return z


def _seeds(ctx: KeyContext, model_indices) -> np.ndarray:
    """The (A, B) stream seeds of these models for ctx's key as uint64, one row a model (n × 2): made once
    per call, then sliced per piece ([:, :1] is the column of A seeds that `_parts` takes)."""
    streams = [stream_seeds(ctx.seed, ctx.key, index) for index in model_indices]
    return np.array(streams, dtype=np.uint64).reshape(len(streams), 2)


def _parts(seeds: np.ndarray, first: int, count: int, per_output: int, dtype: str) -> np.ndarray:
    """The `per_output`-way split parts (8 bytes or 4 words of 16 bits, least significant first) of
    elements [first, first + count), one row a stream of `seeds` (a uint64 column)."""
    j0 = first // per_output
    j1 = (first + count + per_output - 1) // per_output
    outputs = _splitmix(seeds, np.arange(j0, j1, dtype=np.uint64)).astype("<u8", copy=False)
    offset = first - j0 * per_output
    return outputs.view(dtype)[:, offset:offset + count]


def _words_at(seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """B's 16-bit words of the given element positions (int64), each of the stream of the same index in
    `seeds` (uint64, 1-D), as uint32."""
    outputs = _splitmix(seeds, (positions // 4).astype(np.uint64))
    shifts = ((positions % 4) * 16).astype(np.uint64)
    return (np.right_shift(outputs, shifts) & np.uint64(0xFFFF)).astype(np.uint32)


def _pieces(ctx: KeyContext, count: int, piece: int = DRAW_PIECE):
    """[start, stop) ranges, relative to ctx.offset, of at most `piece` elements covering `count`."""
    if ctx.offset + count > ctx.numel:
        raise ValueError(f"chunk [{ctx.offset}, {ctx.offset + count}) lies outside the tensor of {ctx.numel} elements")
    for start in range(0, count, piece):
        yield start, min(start + piece, count)


def keep_threshold(p: float) -> int:
    """M such that u ≥ p ⟺ a·2¹⁶ + b ≥ M (p compared as a float32, as a torch float32 tensor does); 2²⁴
    keeps nothing."""
    return math.ceil(float(np.float32(p)) * 2**24)


def _keep(seeds: np.ndarray, first: int, count: int, threshold: int, out: np.ndarray) -> None:
    """Keep flags (bool, one row a model of `seeds`, from `_seeds`) of elements [first, first + count) into
    `out` (n × count): a > M_hi decides alone, and where a = M_hi, B's word does (b ≥ M_lo)."""
    if threshold >= 2**24:
        out[:] = False
        return
    high, low = threshold >> 16, threshold & 0xFFFF
    a = _parts(seeds[:, :1], first, count, 8, "<u1")
    np.greater(a, np.uint8(high), out=out)
    undecided = np.flatnonzero(a == np.uint8(high))  # 10x faster than a 2-D nonzero
    if undecided.size:
        rows, columns = np.divmod(undecided, count)
        out[rows, columns] = _words_at(seeds[rows, 1], columns + first) >= low


def uniform_draws(ctx: KeyContext, model_index: int, count: int) -> torch.Tensor:
    """The uniform draws u (float32, CPU, flat) of `count` elements starting at flat index ctx.offset of the
    whole tensor: the keep mask of DARE with probability p is exactly ``draws >= p``, and methods with a drop
    probability per element (DELLA) compare the same draws with their own thresholds."""
    seeds = _seeds(ctx, [model_index])
    out = np.empty(count, dtype=np.float32)
    for start, stop in _pieces(ctx, count):
        first, n = ctx.offset + start, stop - start
        x = _parts(seeds[:, :1], first, n, 8, "<u1")[0].astype(np.uint32) << np.uint32(16)
        x |= _parts(seeds[:, 1:], first, n, 4, "<u2")[0]
        np.multiply(x.astype(np.float32), np.float32(2.0**-24), out=out[start:stop])
    return torch.from_numpy(out)


def keep_mask(ctx: KeyContext, model_index: int, count: int, p: float) -> torch.Tensor:
    """The keep mask (bool, CPU, flat) of `count` elements starting at flat index ctx.offset of the whole
    tensor ctx.shape: the same bits for a chunk as for those elements of the whole tensor."""
    seeds, threshold = _seeds(ctx, [model_index]), keep_threshold(p)
    out = np.empty((1, count), dtype=np.bool_)
    for start, stop in _pieces(ctx, count):
        _keep(seeds, ctx.offset + start, stop - start, threshold, out[:, start:stop])
    return torch.from_numpy(out[0])


def keep_pieces(ctx: KeyContext, n_models: int, numel: int, threshold: int):
    """The keep masks of models 0 … n_models − 1 over `numel` elements from ctx.offset, drawn together a
    piece at a time: (start, stop, bool array n_models × (stop − start)), start and stop relative to
    ctx.offset. The masks of a piece stay one DRAW_PIECE in all, in one buffer reused for every piece."""
    seeds = _seeds(ctx, range(n_models))
    piece = max(MIN_PIECE, DRAW_PIECE // n_models)
    keep = np.empty((n_models, min(piece, numel)), dtype=np.bool_)
    for start, stop in _pieces(ctx, numel, piece):
        masks = keep[:, :stop - start]
        _keep(seeds, ctx.offset + start, stop - start, threshold, masks)
        yield start, stop, masks


def drop_(taus: list[torch.Tensor], ctx: KeyContext, p: float, rescale: bool) -> list[torch.Tensor]:
    """mᵢ ⊙ τᵢ (÷ (1 − p) when rescaling), in place, a piece of the masks at a time (no whole-tensor mask).
    p = 0 keeps everything, p = 1 drops everything (no rescale then: there is nothing left). The masks of
    all models are drawn together, a piece of each per set of numpy calls: a checkpoint has thousands of
    small tensors, on which the calls' fixed cost, not the elements, is the time."""
    if p <= 0 or not taus:
        return taus
    threshold = keep_threshold(p)
    if threshold >= 2**24:
        for tau in taus:
            tau.zero_()
        return taus
    # numpy views of CPU float tensors: numpy's float-by-bool product is 3x faster than torch's
    arrays = [tau.view(-1).numpy() if tau.device.type == "cpu" and tau.dtype in (torch.float32, torch.float64)
              else tau.view(-1) for tau in taus]
    for start, stop, masks in keep_pieces(ctx, len(taus), taus[0].numel(), threshold):
        for values, mask in zip(arrays, masks):
            if isinstance(values, np.ndarray):
                np.multiply(values[start:stop], mask, out=values[start:stop])
            else:
                values[start:stop].mul_(torch.from_numpy(mask).to(device=values.device, dtype=values.dtype))
    if rescale:
        for tau in taus:
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
    statistics=Statistics(dare_statistics, needed=_dare_trims, stages=trim_stages),
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
        merged = sum_(taus)
    return apply_to_base(base, merged, coefficient)


def _check_tsd(params, n_models: int) -> None:
    if params["stock"] and n_models < 2:
        raise ValueError(f"tsd with stock=true needs at least 2 fine-tuned models besides the base, got {n_models}")


TSD_COMBINE = ("mean", "geometric_median")


def _raw_tsd(models, base, out, ratio, ctx: KeyContext, p, k, election, rescale, scale, stock, combine, eps,
             max_iter, tol):
    """TSD's default form (mean, no trimming, no rescale, no stock) compiled: the keep masks of all models
    drawn piece by piece as `drop_` draws them, the TIES-SOUP of the kept entries in the kernel."""
    coefficient = ratio * scale
    threshold = keep_threshold(p)
    if combine != "mean" or k < 1 or rescale or stock or coefficient == 0 or threshold >= 2**24:
        return None
    masks = None if p <= 0 else keep_pieces(ctx, len(models), base.numel(), threshold)
    return raw_ties_mean(models, base, out, ctx, election, coefficient, masks)


def tsd_statistics(models, base, ctx: KeyContext, p, k, election, rescale, scale, stock, combine, eps, max_iter,
                   tol):
    """Gram matrices of the dropped task vectors (for `stock`) and of the sign-filtered ones (for the geometric
    median, k = 1 only: with k < 1 that combine merges whole tensors), additive over chunks since the masks
    and the election are elementwise; and the radix counts of the trimming thresholds (mean, k < 1)."""
    taus = drop_(task_vectors(models, base, ctx), ctx, p, rescale)
    out = trim_statistics(taus, ctx, k) if combine == "mean" else {}
    if ctx.stage == 0:
        if stock:
            # Rescaling multiplies every vector by the same factor: the cosines, hence t, do not change.
            out["gram"] = gram_for_cosines(taus)
        if combine == "geometric_median":
            out["filtered_gram"] = gram(ties_filter_(taus, k, election))
    return out


def _tsd_needs_statistics(params, shape) -> bool:
    return params["stock"] or params["combine"] == "geometric_median" or trims_tensor(params, shape)


def _tsd_chunkable(params) -> bool:
    # The geometric median of trimmed vectors would need the thresholds before its Gram matrix: a further
    # statistics stage for a rare combination; such tensors are merged whole instead.
    return params["combine"] == "mean" or params["k"] >= 1


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
        Param("combine", str, "mean", "mean: the disjoint mean of the entries that agree with the elected sign "
                                      "(TIES); geometric_median: the geometric median of the sign-filtered task "
                                      "vectors, each tensor one point (TGMD)", choices=TSD_COMBINE),
        *(Param(q.name, q.kind, q.default, "combine geometric_median: " + q.help, q.choices, q.minimum, q.maximum)
          for q in MEDIAN_PARAMS),
    ),
    base="required",
    randomized=True,
    check=_check_tsd,
    chunking=Chunking(split_rows=_tsd_chunkable),
    statistics=Statistics(tsd_statistics, needed=_tsd_needs_statistics, stages=trim_stages),
    compiled=Compiled(merge=_raw_tsd),
)
def tsd(models, base, ratio, ctx: KeyContext, p, k, election, rescale, scale, stock, combine, eps, max_iter, tol):
    _check_p(p)
    check_k(k)
    _check_tsd({"stock": stock}, len(models))
    coefficient = ratio * scale
    if coefficient == 0 or p >= 1 or k == 0:
        return unchanged_base(base, ctx)
    taus = drop_(task_vectors(models, base, ctx), ctx, p, rescale)
    stats = ctx.stats or {}
    if stock:
        # Rescaling multiplies every vector by the same factor: the cosines, hence t, do not change.
        coefficient *= tensor_t(taus, stats)
        if coefficient == 0:
            return unchanged_base(base, ctx)
    if combine == "mean":
        thresholds = trim_thresholds(ctx, k, len(taus), taus[0].dtype)
        return apply_to_base(base, ties_merge(taus, k, election, thresholds), coefficient)
    filtered = ties_filter_(taus, k, election)
    g = stats["filtered_gram"] if "filtered_gram" in stats else gram(filtered)
    median = weiszfeld_coefficients(g, [1.0] * len(filtered), eps, max_iter, tol)
    return apply_to_base(base, linear_combination(filtered, median.tolist()), coefficient)
