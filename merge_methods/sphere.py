"""Interpolation on the hypersphere: Multi-SLERP, the Karcher mean and NuSLERP.

Multi-SLERP and the Karcher mean of N tensors are, once the angles are known, weighted sums Σ βᵢ·xᵢ of the
inputs: every quantity they need (norms, angles, the norm of a tangent vector) is a quadratic form of the
float64 Gram matrix Gᵢⱼ = ⟨xᵢ, xⱼ⟩, which is additive over chunks of rows. So the coefficients βᵢ are found on
N×N matrices (the Karcher iterations included, without another pass over the weights) and big tensors are
streamed like any elementwise merge.

The block ratio α_b is the interpolation ratio, as for weighted_sum: with per-model weights w (default
0, 1, …, 1) the effective weights are (1 − α_b)·e₁ + α_b·w/Σw, so α_b = 0 gives the first model, two models
interpolate from A (α = 0) to B (α = 1), and `--weights 1,…,1 --alpha 1` is the plain barycenter of all.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .basic import SLERP_COLINEAR_EPS
from .model_stock import gram
from .registry import Chunking, KeyContext, Param, Statistics, merge_method
from .task_vectors import task_vectors
from .tensors import linear_combination, rows_of

# Below this norm the weighted mean of the unit vectors is treated as 0 (the directions cancel out).
MEAN_DIRECTION_EPS = 1e-8


def interpolation_weights(ctx: KeyContext, n: int, ratio: float, name: str) -> list[float]:
    """(1 − α)·e₁ + α·w/Σw, w the recipe's weights (default 0, 1, …, 1, as weighted_sum)."""
    if ctx.weights is None:
        weights = [0.0] + [1.0] * (n - 1)
    else:
        weights = [float(w) for w in ctx.weights]
        if len(weights) != n:
            raise ValueError(f"{name}: {len(weights)} weights for {n} models")
        if any(w < 0 for w in weights):
            raise ValueError(f"{name}: weights must not be negative (they are barycentric weights), got {weights}")
    total = sum(weights)
    if total <= 0:
        raise ValueError(f"{name}: the model weights sum to 0")
    out = [ratio * w / total for w in weights]
    out[0] += 1.0 - ratio
    return out


def points(models, base, ctx: KeyContext) -> list[torch.Tensor]:
    """The vectors being interpolated: the models, or their task vectors when a base is given."""
    return task_vectors(models, base, ctx, weighted=False) if base is not None else list(models)


def gram_statistics(models, base, ctx: KeyContext, **params):
    return {"gram": gram(points(models, base, ctx))}


def _gram(vectors, ctx: KeyContext) -> torch.Tensor:
    stats = ctx.stats or {}
    return stats["gram"] if "gram" in stats else gram(vectors)


def _unit_gram(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(norms, Gram matrix of the unit vectors xᵢ/‖xᵢ‖), a zero vector's unit vector being 0."""
    norms = g.diagonal().clamp(min=0).sqrt()
    inverse = torch.where(norms > 0, 1.0 / norms.clamp(min=1e-300), torch.zeros_like(norms))
    return norms, g * inverse[:, None] * inverse[None, :]


def _quadratic(u_gram: torch.Tensor, c: torch.Tensor) -> float:
    return max(float(c @ u_gram @ c), 0.0)


def multislerp_coefficients(g: torch.Tensor, weights) -> torch.Tensor | None:
    """βᵢ of Multi-SLERP, mergekit's construction: the unit vectors uᵢ = xᵢ/‖xᵢ‖ are projected to the tangent
    space at m = ũ/‖ũ‖, ũ = Σ wᵢuᵢ, averaged there with the weights and mapped back by the exponential map; the
    norm is Σ wᵢ‖xᵢ‖. The tangent average Σ wᵢ(uᵢ − ⟨uᵢ, m⟩m) = ũ − ‖ũ‖m is 0 by construction, so the map
    returns m itself and the result is Σ wᵢ‖xᵢ‖ · ũ/‖ũ‖: the normalised weighted mean of the directions with
    the weighted mean norm. None when the directions cancel out (‖ũ‖ < 1e-8)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    norms, u_gram = _unit_gram(g)
    mean_norm = math.sqrt(_quadratic(u_gram, w))
    if mean_norm < MEAN_DIRECTION_EPS:
        return None
    scale = float(w @ norms)
    return torch.where(norms > 0, scale * w / (mean_norm * norms.clamp(min=1e-300)), torch.zeros_like(w))


@merge_method(
    "multislerp",
    default_ratio=0.5,
    summary="Multi-SLERP: barycentric interpolation of N models on the hypersphere (task vectors with --base)",
    base="optional",
    min_models=2,
    nonnegative_weights=True,
    statistics=Statistics(gram_statistics),
)
def multislerp(models, base, ratio, ctx: KeyContext):
    weights = interpolation_weights(ctx, len(models), ratio, "multislerp")
    if weights[0] == 1.0 and not any(weights[1:]):
        return models[0] if ctx.inputs_writable else models[0].clone()
    vectors = points(models, base, ctx)
    beta = multislerp_coefficients(_gram(vectors, ctx), weights)
    if beta is None:  # the directions cancel out: the weighted linear mean (mergekit does so for 2 models)
        beta = weights
    return linear_combination(vectors, beta, base)


def karcher_coefficients(g: torch.Tensor, weights, max_iter: int, tol: float) -> torch.Tensor:
    """βᵢ of the weighted Karcher (Riemannian) mean of the directions, times Σ wᵢ‖xᵢ‖ (mergekit's algorithm on
    the Gram matrix): start from the normalised weighted mean of the unit vectors; at each step move along
    T = Σ wᵢ·θᵢ/sin θᵢ·(uᵢ − cos θᵢ·u) (the mean of the logarithm maps, θᵢ the angle between u and uᵢ) by the
    exponential map; stop after max_iter steps or when ‖T‖ < tol. Zero vectors have no direction: they only
    count in the norm. N×N arithmetic in float64 numpy."""
    w = np.asarray(weights, dtype=np.float64)
    norms_t, u_gram_t = _unit_gram(g)
    norms, u_gram = norms_t.numpy(), u_gram_t.numpy()
    valid = norms > 0
    a = np.where(valid, w, 0.0)
    if a.sum() == 0:  # no direction to average (the weighted norm is 0 too)
        return torch.zeros(len(w), dtype=torch.float64)
    a = a / a.sum()

    def length(c: np.ndarray) -> float:
        return math.sqrt(max(float(c @ u_gram @ c), 0.0))

    u = a.copy()  # the direction u = Σ u[i]·uᵢ
    if length(u) < tol:
        u = np.zeros_like(a)
        u[int(np.flatnonzero(valid)[0])] = 1.0
    else:
        u = u / length(u)
    for _ in range(max_iter):
        cosines = np.clip(u_gram @ u, -1.0, 1.0)
        angles = np.arccos(cosines)
        moving = valid & (angles >= tol)
        factors = np.where(moving, a * angles / np.where(moving, np.sin(angles), 1.0), 0.0)
        step = factors - float(factors @ cosines) * u  # Σ fᵢ(eᵢ − cos θᵢ·u) in the coefficients of the uᵢ
        step_norm = length(step)
        if step_norm < tol:
            break
        u = math.cos(step_norm) * u + math.sin(step_norm) / step_norm * step
        norm_u = length(u)
        if norm_u > tol:
            u = u / norm_u
    scale = float(w @ norms)
    beta = np.where(valid, scale * u / np.where(valid, norms, 1.0), 0.0)
    return torch.from_numpy(beta)


@merge_method(
    "karcher",
    default_ratio=0.5,
    summary="Karcher mean: the Riemannian barycenter of the models' directions, scaled by their mean norm",
    params=(
        Param("max_iter", int, 10, "most iterations of the Karcher mean", minimum=1, maximum=10000),
        Param("tol", float, 1e-5, "stop when the update's norm (an angle, radians) falls below this",
              minimum=0.0),
    ),
    min_models=2,
    nonnegative_weights=True,
    statistics=Statistics(gram_statistics),
)
def karcher(models, base, ratio, ctx: KeyContext, max_iter, tol):
    weights = interpolation_weights(ctx, len(models), ratio, "karcher")
    if weights[0] == 1.0 and not any(weights[1:]):
        return models[0] if ctx.inputs_writable else models[0].clone()
    beta = karcher_coefficients(_gram(models, ctx), weights, max_iter, tol)
    return linear_combination(models, beta)


# ---- NuSLERP -------------------------------------------------------------------------------------------

NUSLERP_GRANULARITIES = ("tensor", "row", "column")


def slerp_coefficients(dot: torch.Tensor, norm0: torch.Tensor, norm1: torch.Tensor, t: float):
    """(c₀, c₁) with slerp = c₀·v₀ + c₁·v₁ = [sin((1−t)Ω)·v₀ + sin(tΩ)·v₁] / sin Ω, Ω the angle between v₀ and
    v₁ (the sine weights applied to the raw vectors, as mergekit's nuslerp); the linear (1 − t, t) where a
    norm is 0 or the vectors are colinear (sin Ω < 1e-6). Float64 tensors of any shape."""
    denominator = norm0 * norm1
    cos = torch.where(denominator > 0, dot / denominator.clamp(min=1e-300), torch.ones_like(dot)).clamp(-1, 1)
    omega = torch.acos(cos)
    sin_omega = torch.sin(omega)
    linear = sin_omega < SLERP_COLINEAR_EPS
    safe = torch.where(linear, torch.ones_like(sin_omega), sin_omega)
    c0 = torch.where(linear, torch.full_like(cos, 1.0 - t), torch.sin((1.0 - t) * omega) / safe)
    c1 = torch.where(linear, torch.full_like(cos, t), torch.sin(t * omega) / safe)
    return c0, c1


def _columns(v: torch.Tensor) -> torch.Tensor:
    """(rows, columns) view: column j holds the j-th entry of every row (a 1-D tensor is one column)."""
    return v.reshape(-1, 1) if v.dim() <= 1 else v.reshape(v.shape[0], -1)


def pair_statistics(v0: torch.Tensor, v1: torch.Tensor, granularity: str) -> dict[str, torch.Tensor]:
    """⟨v₀, v₁⟩, ‖v₀‖², ‖v₁‖² in float64: scalars, or one per column (additive over chunks of rows)."""
    v0, v1 = v0.to(torch.float64), v1.to(torch.float64)
    if granularity == "column":
        v0, v1 = _columns(v0), _columns(v1)
        return {"dot": (v0 * v1).sum(0).cpu(), "norm0_2": (v0 * v0).sum(0).cpu(), "norm1_2": (v1 * v1).sum(0).cpu()}
    return {"dot": (v0 * v1).sum().cpu(), "norm0_2": (v0 * v0).sum().cpu(), "norm1_2": (v1 * v1).sum().cpu()}


def nuslerp_statistics(models, base, ctx: KeyContext, granularity):
    return pair_statistics(*points(models, base, ctx), granularity)


def _nuslerp_needs_statistics(params, shape) -> bool:
    return params["granularity"] == "tensor" or (params["granularity"] == "column" and len(shape) >= 2)


@merge_method(
    "nuslerp",
    default_ratio=0.5,
    summary="NuSLERP: SLERP of two models (or of their task vectors with --base) per tensor, row or column",
    params=(
        Param("granularity", str, "tensor", "one angle per tensor, per row (first dimension; a 1-D tensor is "
                                            "one row) or per column (across the rows)",
              choices=NUSLERP_GRANULARITIES),
    ),
    base="optional",
    min_models=2,
    max_models=2,
    takes_weights=False,
    chunking=Chunking(whole_1d=True),
    statistics=Statistics(nuslerp_statistics, needed=_nuslerp_needs_statistics),
)
def nuslerp(models, base, ratio, ctx: KeyContext, granularity):
    """t = α_b: α_b = 0 gives the first model, 1 the second (with a base too: base + slerp of the task
    vectors)."""
    t = ratio
    if t in (0.0, 1.0):
        chosen = models[int(t)]
        return chosen if ctx.inputs_writable else chosen.clone()
    v0, v1 = points(models, base, ctx)
    if granularity == "row" and v0.dim() >= 1:
        r0, r1 = (rows_of(v).to(torch.float64) for v in (v0, v1))
        c0, c1 = slerp_coefficients((r0 * r1).sum(1), r0.norm(dim=1), r1.norm(dim=1), t)
        shape: tuple[int, ...] | None = (-1,) + (1,) * (v0.dim() - 1)
    else:
        stats = ctx.stats if ctx.stats is not None and "dot" in ctx.stats else pair_statistics(v0, v1, granularity)
        c0, c1 = slerp_coefficients(stats["dot"], stats["norm0_2"].sqrt(), stats["norm1_2"].sqrt(), t)
        shape = (1, *v0.shape[1:]) if granularity == "column" and v0.dim() >= 2 else None
    if shape is None:  # one angle for the whole tensor
        return linear_combination([v0, v1], (float(c0), float(c1)), base)
    c0, c1 = (c.to(v0.device, v0.dtype).reshape(shape) for c in (c0, c1))
    out = torch.mul(v0, c0)
    out.add_(torch.mul(v1, c1))
    return out.add_(base) if base is not None else out
