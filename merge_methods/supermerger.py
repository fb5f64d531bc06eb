"""SuperMerger's calculation modes, and sd-mecha's add-opposite merges, as per-key merge methods.

Source read: hako-mikan/sd-webui-supermerger at commit 0b1c4915a6ede98ce3528b4f097361842a641d1d
(2025-11-28), scripts/mergers/mergers.py: `smerge` (the per-key loop: the "Triple sum" and "sum Twice"
modes, smoothAdd inline), `precosine` / `cosine` (cosineA, cosineB), `traindiff` (trainDifference),
`extract_super` (extract), `tensormerge` (tensor, tensor2); the UI defaults (α 0.5, β 0.25, γ 0.3) from
scripts/supermerger.py. sd-mecha 1.1.8, sd_mecha/extensions/builtin/merge_methods/: cosine.py
`add_cosine_a` / `add_cosine_b`, linear.py `train_difference_mask` / `add_opposite_mask` /
`add_strict_opposite_mask` (each used as A + (B − C)·mask), slicing.py `tensor_sum`. Written from the
formulas; no code copied.

Model names follow SuperMerger's A, B, C. The engine gives one per-block ratio, α_b (the `ratio`); the
modes that take a second ratio (triple sum, sum twice, tensor, extract) take β as the parameter `beta`;
per block, SuperMerger's "weights B", it comes from the recipe's `beta_blocks` (the engine passes each key its
block's β as `beta`).

- train_difference: A + 1.8·α·s·(B − C), s = |B − A| / (|B − A| + |B − C|) per entry (0 where both are 0);
  = sd-mecha's A + (B − C)·train_difference_mask(A, B, C, α).
- smooth_add: A + α·G(M(B − C)), M the median over each entry's 3×…×3 neighbourhood (all dimensions), G the
  Gaussian filter σ = 1 (radius 4) along each dimension in turn, both with the half-sample symmetric
  boundary ("reflect") of scipy.ndimage.median_filter(size=3) / gaussian_filter(sigma=1) that SuperMerger
  calls. Here in torch (float64 sums, rounded to the compute dtype after each dimension as scipy does).
- cosine_a / cosine_b: θ = B·(1 − k) + A·k, k = clip((s − s_min)/(s_max − s_min) − α, 0, 1) per column
  (s has the tensor's shape without its first dimension), s = (cos₀(X, Y) + cos(X, Y))/2 where cos₀ is the
  cosine along dimension 0 and cos the cosine of the whole flattened tensors; cosine_b: X, Y = A, B;
  cosine_a: X, Y = A, B each normalized along dimension 0 (and |α|). [s_min, s_max] is, as in
  SuperMerger, the range of every key's similarities over the whole model pair (1st–99th percentile,
  `similarity_range`), gathered by the engine's model-wide first pass (sim_range=model, the default);
  sim_range=params takes sim_min / sim_max instead ([0, 1]: no rescaling, sd-mecha's add_cosine_b).
- tensor_swap ("tensor"): n = size of dimension 0; if α + β ≤ 1, A with rows ⌊n·β⌋ … ⌊n·(α+β)⌋ − 1 taken
  from B; otherwise B with rows ⌊n·(α+β−1)⌋ … ⌊n·β⌋ − 1 taken from A. A 0-d tensor stays A.
- tensor_swap2 ("tensor2"): the same along dimension 1 for tensors of 2 or more dimensions (1-D: dimension
  0); the bounds come from dimension 1's size when it is over 100, otherwise from dimension 0's (as
  SuperMerger computes them; python slicing then clips them to dimension 1's size).
- extract: with a = B − A, b = C − A (A the common base), c = cos(a, b) along the last dimension per row,
  d = ((c + 1)/2)^γ: θ = A + lerp(a, b, α)·lerp(d, 1 − d, β) — β = 0 similar features, β = 1 dissimilar.
- add_opposite / add_strict_opposite (sd-mecha only): θ = A + (B − C)·m, m = 2α·|A − B| / (|A − B| +
  |A + B − 2C|), respectively m = 2α·max(0, (C − A)(B − C) / max(|A − C|, |B − C|)²) (0 where 0/0).
- triple_sum: (1 − α − β)·A + α·B + β·C; sum_twice: ((1 − α)·A + α·B)·(1 − β) + β·C.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F

from .registry import Chunking, KeyContext, Param, Statistics, merge_method

# Methods whose formula needs the whole tensor (filters, cosines over columns, slices by fractions).
WHOLE = Chunking(split_rows=False)

BETA_HELP = "β, the second ratio (every block's, unless the recipe's beta_blocks sets it per block)"
THREE = "models A B C, or A B with --base C"
# The declaration every three-model mode shares (A B C, or A B with a base C; no per-model weights)
THREE_MODELS = dict(base="optional", min_models=2, max_models=3, takes_weights=False)


def _abc(name: str, models, base):
    """(A, B, C) from models A B C, or A B and the base as C (add_difference's convention)."""
    if len(models) == 3:
        if base is not None:
            raise ValueError(f"{name} takes A B C, or A B with a base C, not both")
        return models
    if base is None or len(models) != 2:
        raise ValueError(f"{name} needs three models A B C (or A B with --base C)")
    return models[0], models[1], base


def _a_copy(a: torch.Tensor, ctx: KeyContext) -> torch.Tensor:
    return a if ctx.inputs_writable else a.clone()


# ---- trainDifference and sd-mecha's add-opposite masks (elementwise) --------------------------------

def _ratio_of(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """numerator / denominator, 0 where the denominator is 0 (the numerator is then 0 too: 0/0)."""
    safe = torch.where(denominator == 0, torch.ones_like(denominator), denominator)
    return torch.where(denominator == 0, torch.zeros_like(numerator), numerator / safe)


def train_difference_scale(a, b, c) -> torch.Tensor:
    """s = |B − A| / (|B − A| + |B − C|) per entry, 0 where both distances are 0 (SuperMerger `traindiff`)."""
    to_a = (b - a).abs()
    return _ratio_of(to_a, to_a + (b - c).abs())


@merge_method(
    "train_difference",
    summary="SuperMerger trainDifference: A + 1.8·α·(B − C)·|B − A|/(|B − A| + |B − C|); " + THREE,
    **THREE_MODELS,
)
def train_difference(models, base, ratio, ctx: KeyContext):
    """θ = A + (s·(B − C))·(1.8·α), s = |B − A| / (|B − A| + |B − C|) (0/0 = 0): B's change from C, scaled
    per entry by how far B is from A relative to how far it moved from C. α = 0 gives A; B = C gives A."""
    a, b, c = _abc("train_difference", models, base)
    if ratio == 0:
        return _a_copy(a, ctx)
    new_diff = train_difference_scale(a, b, c) * (b - c)
    return a + new_diff * (ratio * 1.8)


@merge_method(
    "add_opposite",
    summary="sd-mecha add_opposite: A + (B − C)·2α·|A − B|/(|A − B| + |A + B − 2C|); " + THREE,
    **THREE_MODELS,
)
def add_opposite(models, base, ratio, ctx: KeyContext):
    """θ = A + (B − C)·m, m = 2α·|A − B| / (|A − B| + |A + B − 2C|) (0/0 = 0): m is 2α where A − C and
    B − C are opposite and equal (A + B = 2C), α where one of them is 0, 0 where A = B."""
    a, b, c = _abc("add_opposite", models, base)
    if ratio == 0:
        return _a_copy(a, ctx)
    apart = (a - b).abs()
    mask = _ratio_of(apart, apart + (a + b - 2 * c).abs()) * (2 * ratio)
    return a + (b - c) * mask


@merge_method(
    "add_strict_opposite",
    summary="sd-mecha add_strict_opposite: A + (B − C)·2α·max(0, (C − A)(B − C)/max(|A − C|, |B − C|)²); "
            + THREE,
    **THREE_MODELS,
)
def add_strict_opposite(models, base, ratio, ctx: KeyContext):
    """θ = A + (B − C)·m, m = 2α·max(0, (C − A)(B − C) / t²), t = max(|A − C|, |B − C|) (0/0 = 0): B's
    change is added only where A moved from C the other way (m = 2α where the moves are opposite and equal)."""
    a, b, c = _abc("add_strict_opposite", models, base)
    if ratio == 0:
        return _a_copy(a, ctx)
    threshold = torch.maximum((a - c).abs(), (b - c).abs())
    mask = _ratio_of((c - a) * (b - c), threshold * threshold).clamp_(min=0) * (2 * ratio)
    return a + (b - c) * mask


# ---- Triple sum, sum Twice (elementwise) ------------------------------------------------------------

BETA = Param("beta", float, 0.25, BETA_HELP)


@merge_method(
    "triple_sum",
    default_ratio=0.5,
    summary="SuperMerger Triple sum: (1 − α − β)·A + α·B + β·C, β the beta param (per block: beta_blocks); " + THREE,
    params=(BETA,),
    **THREE_MODELS,
)
def triple_sum(models, base, ratio, ctx: KeyContext, beta):
    """(1 − α − β)·A + α·B + β·C; α the block ratio, β the key's (beta, or its block's from beta_blocks)."""
    a, b, c = _abc("triple_sum", models, base)
    return (1 - ratio - beta) * a + ratio * b + beta * c


@merge_method(
    "sum_twice",
    default_ratio=0.5,
    summary="SuperMerger sum Twice: ((1 − α)·A + α·B)·(1 − β) + β·C, β the beta param (per block: beta_blocks); " + THREE,
    params=(BETA,),
    **THREE_MODELS,
)
def sum_twice(models, base, ratio, ctx: KeyContext, beta):
    """((1 − α)·A + α·B)·(1 − β) + β·C; α the block ratio, β the key's (beta, or its block's from beta_blocks)."""
    a, b, c = _abc("sum_twice", models, base)
    first = (1 - ratio) * a + ratio * b
    return (1 - beta) * first + beta * c


# ---- smoothAdd: median then Gaussian filter of B − C ---------------------------------------------------

# Elements a median pass holds at a time (each with its 3^d neighbours): ~64 MB of float32.
MEDIAN_PIECE = 1 << 24
GAUSS_SIGMA = 1.0
GAUSS_TRUNCATE = 4.0  # scipy.ndimage.gaussian_filter's default: radius = int(4·σ + 0.5) = 4
SMALL_AXIS = 16  # axes up to this size are filtered as one small matrix product


def _reflect_index(n: int, radius: int, device) -> torch.Tensor:
    """Indices of an axis of size n extended by `radius` each side, half-sample symmetric (d c b a | a b c d
    | d c b a …, scipy.ndimage's "reflect"), repeated as often as the radius needs."""
    i = torch.arange(-radius, n + radius, device=device).remainder(2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def median_filter3(x: torch.Tensor) -> torch.Tensor:
    """scipy.ndimage.median_filter(x, size=3): the median of each entry's 3^d neighbourhood (d = x.dim(),
    "reflect" boundary), in pieces of the first dimension so that the neighbourhoods stay within memory."""
    if x.dim() == 0:
        return x.clone()
    padded = x
    for dim in range(1, x.dim()):
        padded = padded.index_select(dim, _reflect_index(x.shape[dim], 1, x.device))
    rows = _reflect_index(x.shape[0], 1, x.device)
    window = 3 ** x.dim()
    row_elements = max(1, math.prod(padded.shape[1:]))
    step = max(1, MEDIAN_PIECE // (row_elements * window))
    out = torch.empty_like(x)
    for start in range(0, x.shape[0], step):
        stop = min(x.shape[0], start + step)
        piece = padded.index_select(0, rows[start:stop + 2])
        for dim in range(x.dim()):
            piece = piece.unfold(dim, 3, 1)
        piece = piece.reshape(*piece.shape[:x.dim()], window)
        out[start:stop] = piece.median(dim=-1).values
    return out


def _gaussian_weights(dtype, device) -> torch.Tensor:
    radius = int(GAUSS_TRUNCATE * GAUSS_SIGMA + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    w = torch.exp(-0.5 / (GAUSS_SIGMA * GAUSS_SIGMA) * x * x)
    return (w / w.sum()).to(dtype)


def gaussian_filter1(x: torch.Tensor) -> torch.Tensor:
    """scipy.ndimage.gaussian_filter(x, sigma=1): a 9-tap Gaussian along each dimension in turn ("reflect"
    boundary), each pass summed in float64 and rounded to x's dtype, as scipy does for a float32 array."""
    if x.dim() == 0:
        return x.clone()
    weights = _gaussian_weights(torch.float64, x.device)
    radius = len(weights) // 2
    out = x
    for dim in range(x.dim()):
        n = out.shape[dim]
        index = _reflect_index(n, radius, x.device)
        if n <= SMALL_AXIS:
            # a short axis (a kernel's 3 × 3): the filter as its n × n matrix, the reflected taps folded in
            matrix = torch.zeros(n, n, dtype=torch.float64, device=x.device)
            for k in range(len(weights)):
                matrix[torch.arange(n, device=x.device), index[k:k + n]] += weights[k]
            acc = torch.tensordot(out.to(torch.float64), matrix, dims=([dim], [1])).movedim(-1, dim)
        else:
            padded = out.to(torch.float64).index_select(dim, index)
            taps = weights.tolist()
            acc = padded.narrow(dim, 0, n) * taps[0]
            for k in range(1, len(taps)):
                acc += padded.narrow(dim, k, n) * taps[k]
        out = acc.to(x.dtype)
    return out


def smooth(difference: torch.Tensor) -> torch.Tensor:
    """G(M(difference)): SuperMerger smoothAdd's filters."""
    return gaussian_filter1(median_filter3(difference))


@merge_method(
    "smooth_add",
    summary="SuperMerger smoothAdd: A + α·G(M(B − C)), M a 3×…×3 median filter, G a Gaussian σ=1; " + THREE,
    **THREE_MODELS,
    chunking=WHOLE,
)
def smooth_add(models, base, ratio, ctx: KeyContext):
    """θ = A + α·G(M(B − C)) (module docstring): add difference with the difference denoised by a median
    then a Gaussian filter over all its dimensions. α = 0 gives A."""
    a, b, c = _abc("smooth_add", models, base)
    if ratio == 0:
        return _a_copy(a, ctx)
    return a + ratio * smooth(b - c)


# ---- cosineA / cosineB -----------------------------------------------------------------------------------

COSINE_VARIANTS = ("A", "B")


def _cosine_dim0(x, y):
    return F.cosine_similarity(x, y, dim=0)


def cosine_similarities(a: torch.Tensor, b: torch.Tensor, variant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-column cosine along dimension 0, combined similarity s) of SuperMerger's cosineA / cosineB; a 0-d
    tensor as a vector of one entry. cosineA works on A and B each normalized along dimension 0."""
    if a.dim() == 0:
        a, b = a.reshape(1), b.reshape(1)
    if variant == "A":
        a, b = F.normalize(a, p=2, dim=0), F.normalize(b, p=2, dim=0)
    per_column = _cosine_dim0(a, b)
    whole = F.cosine_similarity(a.reshape(-1), b.reshape(-1), dim=0)
    return per_column, (per_column + whole) / 2.0


def similarity_range(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], variant: str) -> tuple[float, float]:
    """SuperMerger's model-wide [s_min, s_max] (`precosine`): every key's similarities (cosineA: the
    per-column cosines of the normalized tensors; cosineB: the combined s) pooled, NaN dropped, those below
    the 1st percentile dropped, then those above the 99th percentile of the rest (numpy's "midpoint")."""
    if variant not in COSINE_VARIANTS:
        raise ValueError(f"variant must be A or B, got {variant!r}")
    pooled = []
    for a, b in pairs:
        per_column, combined = cosine_similarities(a.to(torch.float32), b.to(torch.float32), variant)
        pooled.append((per_column if variant == "A" else combined).reshape(-1).to(torch.float64).numpy())
    sims = np.concatenate(pooled) if pooled else np.array([], dtype=np.float64)
    sims = sims[~np.isnan(sims)]
    if sims.size == 0:
        raise ValueError("no similarities to take a range of")
    sims = np.delete(sims, np.where(sims < np.percentile(sims, 1, method="midpoint")))
    sims = np.delete(sims, np.where(sims > np.percentile(sims, 99, method="midpoint")))
    return float(sims.min()), float(sims.max())


def _check_range(params, n_models) -> None:
    if params["sim_range"] == "params" and not params["sim_max"] > params["sim_min"]:
        raise ValueError(f"sim_max must be greater than sim_min, got [{params['sim_min']}, {params['sim_max']}]")


COSINE_PARAMS = (
    Param("sim_range", str, "model", "model: the similarities rescaled by the range found over every key of "
                                     "the two models (SuperMerger's precosine: a first pass over the files); "
                                     "params: by [sim_min, sim_max]", choices=("model", "params")),
    Param("sim_min", float, 0.0, "with sim_range=params: the similarity mapped to k = 0 (0 and 1: no "
                                 "rescaling, sd-mecha's add_cosine_b)"),
    Param("sim_max", float, 1.0, "with sim_range=params: the similarity mapped to k = 1"),
)


def _model_range(variant):
    """Statistics.model_wide of cosineA / cosineB: SuperMerger's range over every key of the pair."""
    def model_wide(pairs, **params):
        return {"sim_range": similarity_range(((models[0], models[1]) for models, _ in pairs), variant)}
    return model_wide


def _wants_model_range(params) -> bool:
    return params["sim_range"] == "model"


def _cosine_range(ctx: KeyContext, sim_range, sim_min, sim_max) -> tuple[float, float]:
    if sim_range == "params":
        return sim_min, sim_max
    found = (ctx.stats or {}).get("model_wide")
    if found is None:
        raise ValueError("sim_range=model needs the model-wide similarity range (the engine's first pass); "
                         "called on tensors alone, give sim_range=params with sim_min / sim_max")
    return found["sim_range"]


def _cosine_merge(variant, models, ratio, ctx, sim_range, sim_min, sim_max):
    sim_min, sim_max = _cosine_range(ctx, sim_range, sim_min, sim_max)
    a, b = models
    _, s = cosine_similarities(a, b, variant)
    shift = abs(ratio) if variant == "A" else ratio
    k = ((s - sim_min) / (sim_max - sim_min) - shift).clamp(0.0, 1.0)
    if a.dim() == 0:
        k = k.reshape(())
    return b * (1 - k) + a * k


@merge_method(
    "cosine_a",
    default_ratio=0.5,
    summary="SuperMerger cosineA: B·(1−k) + A·k, k = clip(s − α) from the cosines of A and B normalized along "
            "dim 0 (A's structure)",
    params=COSINE_PARAMS,
    min_models=2,
    max_models=2,
    takes_weights=False,
    check=_check_range,
    chunking=WHOLE,
    statistics=Statistics(model_wide=_model_range("A"), model_wide_needed=_wants_model_range),
)
def cosine_a(models, base, ratio, ctx: KeyContext, sim_range, sim_min, sim_max):
    """θ = B·(1 − k) + A·k, k = clip((s − s_min)/(s_max − s_min) − |α|, 0, 1) per column, s the mean of the
    per-column and the whole-tensor cosine of A and B normalized along dimension 0 (module docstring)."""
    return _cosine_merge("A", models, ratio, ctx, sim_range, sim_min, sim_max)


@merge_method(
    "cosine_b",
    default_ratio=0.5,
    summary="SuperMerger cosineB: B·(1−k) + A·k, k = clip(s − α) from the per-column and whole cosines of A "
            "and B (B's structure)",
    params=COSINE_PARAMS,
    min_models=2,
    max_models=2,
    takes_weights=False,
    check=_check_range,
    chunking=WHOLE,
    statistics=Statistics(model_wide=_model_range("B"), model_wide_needed=_wants_model_range),
)
def cosine_b(models, base, ratio, ctx: KeyContext, sim_range, sim_min, sim_max):
    """θ = B·(1 − k) + A·k, k = clip((s − s_min)/(s_max − s_min) − α, 0, 1) per column, s the mean of the
    per-column and the whole-tensor cosine of A and B (module docstring)."""
    return _cosine_merge("B", models, ratio, ctx, sim_range, sim_min, sim_max)


# ---- tensor / tensor2: slices swapped by fractions of a dimension ------------------------------------------

def swap_bounds(n: int, alpha: float, beta: float) -> tuple[int, int, bool]:
    """(start, stop, inverted) as SuperMerger `tensormerge` computes them from α, β and a size n: B's slice
    ⌊n·β⌋ … ⌊n·(α+β)⌋ into A, or (α + β > 1, inverted) A's slice ⌊n·(α+β−1)⌋ … ⌊n·β⌋ into B."""
    if alpha + beta <= 1:
        return int(n * beta), int(n * (alpha + beta)), False
    return int(n * (alpha + beta - 1)), int(n * beta), True


def _swap(a: torch.Tensor, b: torch.Tensor, dim: int, n: int, alpha: float, beta: float) -> torch.Tensor:
    start, stop, inverted = swap_bounds(n, alpha, beta)
    size = a.shape[dim]
    start, stop = max(0, min(size, start)), max(0, min(size, stop))  # python's slice clipping (no wrap)
    into, source = (b, a) if inverted else (a, b)
    out = into.clone()
    if stop > start:
        out.narrow(dim, start, stop - start).copy_(source.narrow(dim, start, stop - start))
    return out


TENSOR_BETA = Param("beta", float, 0.25, "β: where the swapped slice starts, as a fraction of the dimension "
                                         "(per block: beta_blocks; the block ratio α is its width)")


@merge_method(
    "tensor_swap",
    default_ratio=0.5,
    summary="SuperMerger tensor: A with the slice of rows ⌊n·β⌋…⌊n·(α+β)⌋ of dim 0 taken from B (wraps past 1)",
    params=(TENSOR_BETA,),
    min_models=2,
    max_models=2,
    takes_weights=False,
    chunking=WHOLE,
)
def tensor_swap(models, base, ratio, ctx: KeyContext, beta):
    """A fraction α of each tensor's rows (dimension 0), starting at fraction β, taken from B whole (no
    interpolation); when α + β > 1 the slice wraps: B with A's rows ⌊n·(α+β−1)⌋…⌊n·β⌋. 0-d tensors stay A."""
    a, b = models
    if a.dim() == 0:
        return a.clone()
    return _swap(a, b, 0, a.shape[0], ratio, beta)


@merge_method(
    "tensor_swap2",
    default_ratio=0.5,
    summary="SuperMerger tensor2: tensor_swap along dim 1 (bounds from dim 1's size when over 100, else dim 0's)",
    params=(TENSOR_BETA,),
    min_models=2,
    max_models=2,
    takes_weights=False,
    chunking=WHOLE,
)
def tensor_swap2(models, base, ratio, ctx: KeyContext, beta):
    """tensor_swap along dimension 1 (input channels) for tensors of 2 or more dimensions, along dimension 0
    for 1-D ones; the bounds are fractions of dimension 1's size when it is over 100, of dimension 0's
    otherwise (SuperMerger's rule, kept: e.g. conv_in [320, 4, 3, 3] then gets A or B whole)."""
    a, b = models
    if a.dim() == 0:
        return a.clone()
    if a.dim() == 1:
        return _swap(a, b, 0, a.shape[0], ratio, beta)
    n = a.shape[1] if a.shape[1] > 100 else a.shape[0]
    return _swap(a, b, 1, n, ratio, beta)


# ---- extract: (dis)similar features of two differences ----------------------------------------------------

def _check_extract(params, n_models) -> None:
    if not 0 <= params["beta"] <= 1:
        raise ValueError(f"beta must be in [0, 1], got {params['beta']}")


@merge_method(
    "extract",
    default_ratio=0.5,
    summary="SuperMerger extract: A + lerp(B−A, C−A, α)·lerp(d, 1−d, β), d = ((cos+1)/2)^γ per row: β=0 similar, "
            "β=1 dissimilar features; models A B C, or B C with --base A",
    params=(
        Param("beta", float, 0.25, "β: 0 keeps the features B − A and C − A share, 1 those they do not (one "
                                   "value for every block)", minimum=0.0, maximum=1.0),
        Param("gamma", float, 0.3, "γ: selectivity of the similarity (high: only very similar rows count as "
                                   "similar; SuperMerger's option(gamma))", minimum=0.0),
    ),
    **THREE_MODELS,
    check=_check_extract,
    chunking=Chunking(whole_1d=True),
)
def extract(models, base, ratio, ctx: KeyContext, beta, gamma):
    """θ = A + lerp(a, b, α)·lerp(d, 1 − d, β), a = B − A, b = C − A, d = ((c + 1)/2)^γ with c the cosine of a
    and b along the last dimension (one per row; a 1-D tensor is one row). α selects B (0) or C (1)."""
    if len(models) == 3:
        if base is not None:
            raise ValueError("extract takes A B C, or B C with a base A, not both")
        base_t, b_model, c_model = models
    else:
        if base is None or len(models) != 2:
            raise ValueError("extract needs three models A B C (or B C with --base A)")
        base_t, (b_model, c_model) = base, models
    if not 0 <= ratio <= 1:
        raise ValueError(f"extract: the ratio α must be in [0, 1], got {ratio:g}")
    shape = base_t.shape
    if base_t.dim() == 0:
        base_t, b_model, c_model = base_t.reshape(1), b_model.reshape(1), c_model.reshape(1)
    a = b_model - base_t
    b = c_model - base_t
    c = F.cosine_similarity(a, b, dim=-1).clamp(-1, 1).unsqueeze(-1)
    d = ((c + 1) / 2) ** gamma
    result = base_t + torch.lerp(a, b, ratio) * torch.lerp(d, 1 - d, beta)
    return result.reshape(shape)

