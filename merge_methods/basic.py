"""Interpolation methods: weighted sum, add difference, SLERP."""

from __future__ import annotations

import math

import torch

from . import kernels
from .registry import Compiled, KeyContext, Param, Statistics, merge_method


def _raw_weighted_sum(models, base, out, ratio, ctx: KeyContext):
    """The two-model case compiled: torch.lerp's bits in one pass over the raw inputs (fp8 files are read
    and written without the torch casts, which dominate a Flux fp8 merge on the CPU)."""
    weights = ctx.weights
    if len(models) != 2 or (weights is not None and (len(weights) != 2 or float(weights[1]) == 0 or float(weights[0]) != 0)):
        return None  # N models, or weights other than (0, w): the torch form
    views = kernels.raw_views(models, None, out)
    if views is None:
        return None
    (a, b), _, out_view = views
    k = kernels.compiled()
    # ATen's lerp: from A for |α| < 0.5, from B otherwise (computed in float32)
    kernel = k.lerp_from_start if abs(float(torch.tensor(ratio, dtype=torch.float32))) < 0.5 else k.lerp_from_end
    return kernel(a, b, float(ratio), out_view)


@merge_method(
    "weighted_sum",
    default_ratio=0.5,
    summary="(1−α)·A + α·B; N models: A moved by α toward the weighted mean Σwᵢθᵢ/Σwᵢ",
    min_models=2,
    compiled=Compiled(merge=_raw_weighted_sum),
)
def weighted_sum(models, base, ratio, ctx: KeyContext):
    """Two models: (1−α)A + αB. N models: (1−α)·θ₁ + α·Σwᵢθᵢ/Σwᵢ, weights default (0, 1, …, 1), i.e.
    the first model moves toward the mean of the others; weights (1, …, 1) and α = 1 give the plain mean."""
    first = models[0]
    if ctx.weights is None:
        weights = (0.0,) + (1.0,) * (len(models) - 1)
    else:
        weights = tuple(float(w) for w in ctx.weights)
        if len(weights) != len(models):
            raise ValueError(f"weighted_sum: {len(weights)} weights for {len(models)} models")
    total = sum(weights)
    if total == 0:
        raise ValueError("weighted_sum: the model weights sum to 0")
    active = [(w, m) for w, m in zip(weights, models) if w != 0]
    if len(active) == 1 and active[0][0] == total:
        # The two-model case: (1−α)A + αB computed as torch.lerp (A + α(B − A)), one pass instead of three.
        return torch.lerp(first, active[0][1], ratio)
    else:
        target = torch.zeros_like(first)
        for w, m in active:
            target.add_(m, alpha=w / total)
    return first * (1.0 - ratio) + target * ratio


@merge_method(
    "passthrough",
    default_ratio=1.0,
    summary="model A as it is: one-model jobs (bake LoRAs, cast the dtype, prune)",
    min_models=1,
    max_models=1,
    takes_weights=False,
    copies_first=True,
)
def passthrough(models, base, ratio, ctx: KeyContext):
    return models[0]


@merge_method(
    "add_difference",
    summary="A + α·(B − C): models A B C, or A B with --base C",
    base="optional",
    min_models=2,
    max_models=3,
)
def add_difference(models, base, ratio, ctx: KeyContext):
    if len(models) == 3:
        if base is not None:
            raise ValueError("add_difference takes A B C, or A B with a base C, not both")
        a, b, c = models
    else:
        if base is None:
            raise ValueError("add_difference needs a third model C (or --base C)")
        (a, b), c = models, base
    return a + (b - c) * ratio


def slerp_statistics(models, base, ctx: KeyContext):
    a, b = models
    return {
        "dot": torch.sum(a * b, dtype=torch.float64),
        "norm_a2": torch.sum(a * a, dtype=torch.float64),
        "norm_b2": torch.sum(b * b, dtype=torch.float64),
    }


# Below this sine of the angle the two tensors are treated as colinear and linearly interpolated.
SLERP_COLINEAR_EPS = 1e-6


@merge_method(
    "slerp",
    default_ratio=0.5,
    summary="great-circle interpolation of the directions of A and B, norms interpolated linearly",
    min_models=2,
    max_models=2,
    statistics=Statistics(slerp_statistics),
)
def slerp(models, base, ratio, ctx: KeyContext):
    """Spherical interpolation per tensor. Directions a/|a|, b/|b| follow the great circle; the norm is
    (1−t)|a| + t|b|. Falls back to the linear interpolation when a norm is 0 or the tensors are colinear
    (sin Ω < 1e-6, which also covers opposite directions, where the great circle is undefined)."""
    a, b = models
    t = ratio
    if t == 0:
        return a.clone()
    if t == 1:
        return b.clone()
    stats = ctx.stats if ctx.stats is not None else slerp_statistics(models, base, ctx)
    norm_a = math.sqrt(float(stats["norm_a2"]))
    norm_b = math.sqrt(float(stats["norm_b2"]))
    if norm_a == 0 or norm_b == 0:
        return a * (1.0 - t) + b * t
    cos = max(-1.0, min(1.0, float(stats["dot"]) / (norm_a * norm_b)))
    omega = math.acos(cos)
    sin_omega = math.sin(omega)
    if sin_omega < SLERP_COLINEAR_EPS:
        return a * (1.0 - t) + b * t
    scale = (1.0 - t) * norm_a + t * norm_b
    coef_a = math.sin((1.0 - t) * omega) / sin_omega / norm_a * scale
    coef_b = math.sin(t * omega) / sin_omega / norm_b * scale
    return a * coef_a + b * coef_b


@merge_method(
    "nearswap",
    summary="NearSwap: take the other model's entries where they are close to the base's, little of them elsewhere",
    params=(
        Param("t", float, 1e-4, "distance up to which an entry is taken from the other model entirely; beyond it "
                                "the weight falls as t / |other − base|", minimum=0.0),
    ),
    base="required",
    min_models=1,
    max_models=1,
    takes_weights=False,
)
def nearswap(models, base, ratio, ctx: KeyContext, t):
    """θ = base + α_b·w·(other − base), w = min(1, t / |other − base|) per entry (1 where they are equal):
    close entries are swapped for the other model's, distant ones barely move. α_b = 0 gives the base."""
    (other,) = models
    if ratio == 0:
        return base if ctx.inputs_writable else base.clone()
    difference = other.sub_(base) if ctx.inputs_writable and other.is_contiguous() else other - base
    distance = difference.abs()
    weight = torch.where(distance <= t, 1.0, t / distance)  # t/0 never used: 0 <= t
    if ratio != 1:
        weight.mul_(ratio)
    return difference.mul_(weight).add_(base)
