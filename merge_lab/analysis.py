"""The cosine θ per block between models, from the block statistics pass (merge_lab.engine.block_stats):
θᵢⱼ = arccos(Gᵢⱼ / √(Gᵢᵢ·Gⱼⱼ)) for the task vectors τᵢ = θᵢ − θ_base (the raw weights when no base is given),
the mean angle (Model Stock's c) and, with a base, Model Stock's t per block.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

import merge_lab_methods as methods
from merge_lab import archs
from merge_lab.engine import MergePlan, Recipe, prepare
from merge_lab.engine.block_stats import BlockGrams, block_grams
from merge_lab.engine.chunking import ProgressFn
from merge_lab.errors import RecipeError


def display_order(arch: str) -> list[str]:
    """Every block once, in the model's order (the architecture record's analysis order)."""
    return list(archs.get(arch).display_order())


WHOLE_MODEL = "ALL"


@dataclass
class BlockAngles:
    block: str
    keys: int
    elements: int
    norms: list[float]
    cosines: list[float | None]  # per pair, None where undefined (a zero norm)
    angles: list[float | None]  # degrees
    mean_cosine: float | None  # mean over the defined pairs
    mean_angle: float | None  # degrees: arccos of the mean cosine (Model Stock's c)
    model_stock_t: float | None  # with a base only (zero-norm pairs count as cosine 0, c ≤ 0 gives 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "block": self.block, "keys": self.keys, "elements": self.elements, "norms": self.norms,
            "cosines": self.cosines, "angles": self.angles, "mean_cosine": self.mean_cosine,
            "mean_angle": self.mean_angle, "model_stock_t": self.model_stock_t,
        }


@dataclass
class AnalysisReport:
    arch: str
    models: list[str]  # file names
    base: str | None
    pairs: list[tuple[int, int]]
    blocks: list[BlockAngles] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def pair_labels(self) -> list[str]:
        return [f"{i + 1}·{j + 1}" for i, j in self.pairs]

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": "merge-lab-analysis",
            "architecture": self.arch,
            "vectors": "task vectors (model − base)" if self.base else "raw weights",
            "base": self.base,
            "models": self.models,
            "pairs": [list(p) for p in self.pairs],
            "pair_labels": self.pair_labels,
            "unit": "degrees",
            "blocks": [b.as_dict() for b in self.blocks],
        }


def angles_from_gram(block: str, gram: torch.Tensor, keys: int, elements: int, with_base: bool) -> BlockAngles:
    M = methods.model_stock
    cos = M.pairwise_cosines(gram)
    cosines = [None if math.isnan(c) else float(c) for c in cos.tolist()]
    angles = [None if c is None else math.degrees(math.acos(c)) for c in cosines]
    defined = [c for c in cosines if c is not None]
    mean_cos = sum(defined) / len(defined) if defined else None
    mean_angle = None if mean_cos is None else math.degrees(math.acos(max(-1.0, min(1.0, mean_cos))))
    t = float(M.model_stock_t(gram)) if with_base else None
    norms = [math.sqrt(max(float(x), 0.0)) for x in gram.diagonal().tolist()]
    return BlockAngles(block, keys, elements, norms, cosines, angles, mean_cos, mean_angle, t)


def report_from_grams(plan: MergePlan, result: BlockGrams) -> AnalysisReport:
    n = len(plan.models)
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    report = AnalysisReport(plan.arch.arch, [m.name for m in plan.models], plan.base.name if plan.base else None,
                            pairs)
    with_base = plan.base is not None
    for block in display_order(plan.arch.arch):
        if block in result.grams:
            report.blocks.append(angles_from_gram(block, result.grams[block], result.keys[block],
                                                  result.elements[block], with_base))
    if result.grams:
        whole = sum(result.grams.values(), torch.zeros(n, n, dtype=torch.float64))
        report.blocks.append(angles_from_gram(WHOLE_MODEL, whole, sum(result.keys.values()),
                                              sum(result.elements.values()), with_base))
    return report


def analyze(models: list[str], base: str | None = None, *, threads: int | None = None, device: str = "cpu",
            memory_budget: int | str | None = None, precision: str = "float32", nonfinite: str = "error",
            progress: ProgressFn | None = None, cancel: threading.Event | None = None) -> AnalysisReport:
    """θ per block between every pair of `models` (task vectors against `base`, or the raw weights)."""
    import time

    start = time.perf_counter()
    recipe = Recipe(models=list(models), base=base, method="task_arithmetic" if base else "weighted_sum",
                    threads=threads, device=device, memory_budget=memory_budget, precision=precision,
                    nonfinite=nonfinite)
    if len(recipe.expanded_models()) < 2:
        raise RecipeError("the θ analysis needs at least 2 models" + (" besides the base" if base else ""))
    with prepare(recipe, hash_inputs=False) as plan:
        report = report_from_grams(plan, block_grams(plan, progress=progress, cancel=cancel))
    report.seconds = time.perf_counter() - start
    return report
