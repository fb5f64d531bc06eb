"""The geometric median (Weiszfeld's algorithm) of N tensors, each tensor one point.

The median m minimises Σ wᵢ‖xᵢ − m‖. Weiszfeld's iteration m ← Σ vᵢxᵢ / Σ vᵢ with vᵢ = wᵢ / max(‖xᵢ − m‖, eps)
keeps m a weighted mean of the points, m = Σ cᵢxᵢ, and ‖xᵢ − m‖² = Gᵢᵢ − 2(Gc)ᵢ + cᵀGc is a quadratic form of
the float64 Gram matrix G (additive over chunks of rows): the iterations run on N×N matrices and the result
is one pass Σ cᵢxᵢ, so big tensors stream like any elementwise merge and 100 iterations cost nothing.
"""

from __future__ import annotations

import numpy as np
import torch

from .model_stock import gram
from .registry import KeyContext, Param, Statistics, merge_method
from .tensors import linear_combination


def weiszfeld_coefficients(g: torch.Tensor, weights, eps: float, max_iter: int, tol: float) -> torch.Tensor:
    """cᵢ (summing to 1) of the weighted geometric median Σ cᵢxᵢ of the points whose Gram matrix is g. Starts at
    the weighted mean; stops after max_iter steps or when the objective Σ wᵢ‖xᵢ − m‖ changes by at most
    tol × its value (sd-mecha's rule). N×N arithmetic in float64 numpy: small arrays, no torch overhead."""
    gram_matrix = g.detach().cpu().double().numpy()
    diagonal = np.diagonal(gram_matrix)
    w = np.asarray(weights, dtype=np.float64)
    c = w / w.sum()

    def distances(c: np.ndarray) -> np.ndarray:
        gc = gram_matrix @ c
        return np.sqrt(np.maximum(diagonal - 2.0 * gc + c @ gc, 0.0))

    distance = distances(c)
    objective = float(w @ distance)
    for _ in range(max_iter):
        v = w / np.maximum(distance, eps)
        c = v / v.sum()
        distance = distances(c)
        previous, objective = objective, float(w @ distance)
        if abs(previous - objective) <= tol * objective:
            break
    return torch.from_numpy(c)


MEDIAN_PARAMS = (
    Param("eps", float, 1e-6, "smallest distance in Weiszfeld's weights 1/‖xᵢ − m‖ (a point at the median would "
                              "divide by 0)", minimum=1e-30),
    Param("max_iter", int, 100, "most Weiszfeld iterations", minimum=0, maximum=100000),
    Param("tol", float, 1e-12, "stop when the objective Σ wᵢ‖xᵢ − m‖ changes by at most tol × its value",
          minimum=0.0),
)


def median_weights(ctx: KeyContext, n: int) -> list[float]:
    if ctx.weights is None:
        return [1.0] * n
    weights = [float(w) for w in ctx.weights]
    if len(weights) != n:
        raise ValueError(f"geometric_median: {len(weights)} weights for {n} models")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"geometric_median: weights must not be negative and must not all be 0, got {weights}")
    return weights


def _offsets(models, base, ctx: KeyContext) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(reference r, [xᵢ − r]): r is the base, or the first model when there is none."""
    if base is not None:
        reference, others = base, list(models)
    else:
        reference, others = models[0], list(models[1:])
    vectors = [m.sub_(reference) if ctx.inputs_writable and m.is_contiguous() else m - reference for m in others]
    if base is None:
        vectors.insert(0, torch.zeros_like(reference))
    return reference, vectors


def geometric_median_statistics(models, base, ctx: KeyContext, eps, max_iter, tol):
    return {"gram": gram(_offsets(models, base, ctx)[1])}


@merge_method(
    "geometric_median",
    summary="geometric median of the models (Weiszfeld), each tensor a point; with --base, of the task vectors",
    params=MEDIAN_PARAMS,
    base="optional",
    min_models=2,
    nonnegative_weights=True,
    statistics=Statistics(geometric_median_statistics),
)
def geometric_median(models, base, ratio, ctx: KeyContext, eps, max_iter, tol):
    """r + α_b·(median − r), r the base (a task-vector method: α_b = 0 gives the base) or, without a base, the
    first model (α_b = 0 gives it, α_b = 1 the median). The median does not depend on r (it moves with the
    points); r only anchors the ratio."""
    weights = median_weights(ctx, len(models))
    reference = base if base is not None else models[0]
    if ratio == 0:
        return reference if ctx.inputs_writable else reference.clone()
    reference, vectors = _offsets(models, base, ctx)
    stats = ctx.stats or {}
    g = stats["gram"] if "gram" in stats else gram(vectors)
    coefficients = (ratio * weiszfeld_coefficients(g, weights, eps, max_iter, tol)).tolist()
    if base is None:  # the first vector is the zero vector x₁ − x₁
        vectors, coefficients = vectors[1:], coefficients[1:]
    return linear_combination(vectors, coefficients, reference)
