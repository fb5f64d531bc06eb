"""Sparsifying task-vector methods: DELLA (drop probabilities ranked by magnitude), Model Breadcrumbs (drop
the largest and the smallest entries) and SCE (select by variance, weight by mean square, erase by sign).

τᵢ = wᵢ·(θᵢ − θ_base) as for every task-vector method (a negative weight negates a task), and the result is
θ_base + α_b·λ·τ*.
"""

from __future__ import annotations

import torch

from .drop import uniform_draws
from .registry import Chunking, KeyContext, Param, Statistics, Variant, merge_method
from .task_vectors import (
    ELECTION,
    ELECTION_HELP,
    SCALE,
    apply_to_base,
    kth_smallest,
    task_vectors,
    ties_merge,
    unchanged_base,
)
from .tensors import rows_of, sum_

# ---- DELLA -----------------------------------------------------------------------------------------


def normalized_ranks(rows: torch.Tensor) -> torch.Tensor:
    """rank / (n − 1) of each |entry| within its row: 0 for the smallest magnitude, 1 for the largest; equal
    magnitudes are ranked by position (a stable sort), so the ranks are a pure function of the row. A row of
    one entry gets 0.5 (the middle of the range)."""
    width = rows.shape[1]
    if width == 1:
        return torch.full_like(rows, 0.5)
    order = rows.abs().argsort(dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(width, device=rows.device).expand_as(order))
    return ranks.to(rows.dtype).div_(width - 1)


def della_keep_probabilities(rows: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """q = (density − ε) + 2ε·rank/(n − 1) per entry of each row: from density − ε for the smallest magnitude
    to density + ε for the largest (rank-based, not proportional to the magnitude)."""
    return normalized_ranks(rows).mul_(2 * epsilon).add_(density - epsilon).clamp_(0.0, 1.0)


def della_drop_(taus: list[torch.Tensor], ctx: KeyContext, density: float, epsilon: float,
                rescale: bool) -> list[torch.Tensor]:
    """Keep each entry with its probability q (u ≥ 1 − q on the seeded uniform draws of drop.py) and divide the
    kept ones by q when rescaling (the expected task vector is unchanged), in place."""
    for index, tau in enumerate(taus):
        rows = rows_of(tau)  # a view: tau is contiguous
        keep_probability = della_keep_probabilities(rows, density, epsilon)
        draws = uniform_draws(ctx, index, tau.numel()).to(tau.device).view(rows.shape)
        keep = draws >= torch.rsub(keep_probability, 1.0)
        rows.mul_(keep)
        if rescale:
            rows.div_(keep_probability.masked_fill_(~keep, 1.0))
    return taus


def _check_della(params, n_models: int) -> None:
    density, epsilon = params["density"], params["epsilon"]
    if 0 < density < 1 and epsilon > min(density, 1.0 - density) + 1e-12:
        raise ValueError(f"epsilon must be at most min(density, 1 − density) = {min(density, 1.0 - density):g} "
                         f"so that every keep probability lies in [0, 1], got {epsilon}")


DELLA_PARAMS = (
    Param("density", float, 0.7, "mean keep probability of each task-vector entry (1 keeps all, 0 keeps "
                                  "nothing: the base)", minimum=0.0, maximum=1.0),
    Param("epsilon", float, 0.1, "half-width of the keep probabilities: from density − ε (smallest magnitude "
                                  "in its row) to density + ε (largest)", minimum=0.0, maximum=0.5),
    Param("rescale", bool, True, "divide each kept entry by its keep probability (keeps the expected task "
                                 "vector, as DARE)"),
)


def _combine(taus, election):
    """The pruned task vectors' TIES (with `election`), or their plain sum (election None)."""
    if election is not None:
        return ties_merge(taus, 1.0, election)
    return sum_(taus)


@merge_method(
    "della",
    summary="DELLA: drop entries with probabilities ranked by magnitude per row, rescale, TIES; θ_base + λ·τ*",
    params=(*DELLA_PARAMS, Param("election", str, "mass", ELECTION_HELP, choices=ELECTION), SCALE),
    base="required",
    randomized=True,
    check=_check_della,
    chunking=Chunking(whole_1d=True),
    variants=(
        Variant("della_linear", summary="DELLA without the sign election: the dropped, rescaled task vectors added up",
                fixed={"election": None}),
    ),
)
def della(models, base, ratio, ctx: KeyContext, density, epsilon, rescale, election, scale):
    _check_della({"density": density, "epsilon": epsilon}, len(models))
    coefficient = ratio * scale
    if coefficient == 0 or density <= 0:
        return unchanged_base(base, ctx)
    taus = task_vectors(models, base, ctx)
    if density < 1:
        della_drop_(taus, ctx, density, epsilon, rescale)
    return apply_to_base(base, _combine(taus, election), coefficient)


# ---- Model Breadcrumbs --------------------------------------------------------------------------------


def breadcrumbs_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """(smallest dropped, largest dropped) of n entries: ⌊γ·n⌋ largest and as many smallest as leave
    ⌊density·n⌋; when γ leaves fewer than that, fewer largest are dropped and no smallest (mergekit's rule)."""
    kept = int(density * n)
    largest = int(gamma * n)
    smallest = n - kept - largest
    if smallest < 0:
        largest += smallest
        smallest = 0
    return smallest, largest


def breadcrumbs_prune_(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Zero the largest γ fraction of |τ| and the smallest ones so that the density fraction remains, per
    tensor, in place. The cuts are the (smallest + 1)-th and the (n − largest)-th smallest magnitudes, found
    by selection; entries equal to a cut are kept (a few more than ⌊density·n⌋ can remain on ties)."""
    n = tau.numel()
    if density >= 1:
        return tau
    if int(density * n) <= 0:
        return tau.zero_()
    smallest, largest = breadcrumbs_counts(n, density, gamma)
    magnitude = tau.abs()
    drop = None
    if smallest > 0:
        drop = magnitude < kth_smallest(magnitude, smallest + 1)
    if largest > 0:
        too_large = magnitude > kth_smallest(magnitude, n - largest)
        drop = too_large if drop is None else drop.logical_or_(too_large)
    return tau if drop is None else tau.masked_fill_(drop, 0)


BREADCRUMBS_PARAMS = (
    Param("density", float, 0.9, "fraction of each task vector kept after both cuts (1 keeps all, 0 keeps "
                                  "nothing: the base)", minimum=0.0, maximum=1.0),
    Param("gamma", float, 0.01, "fraction of each task vector dropped from the top: its largest magnitudes "
                                "(outliers)", minimum=0.0, maximum=1.0),
)


def _untouched(params) -> bool:
    return params["density"] >= 1  # nothing is cut: the method is elementwise


@merge_method(
    "breadcrumbs_ties",
    summary="Model Breadcrumbs, then the TIES sign election and disjoint mean",
    params=(*BREADCRUMBS_PARAMS, Param("election", str, "mass", ELECTION_HELP, choices=ELECTION), SCALE),
    base="required",
    chunking=Chunking(split_rows=_untouched),
    variants=(
        Variant("breadcrumbs", summary="Model Breadcrumbs: drop the largest γ and the smallest entries of each task "
                                       "vector, then add them", fixed={"election": None}),
    ),
)
def breadcrumbs_ties(models, base, ratio, ctx: KeyContext, density, gamma, election, scale):
    coefficient = ratio * scale
    if coefficient == 0:
        return unchanged_base(base, ctx)
    taus = task_vectors(models, base, ctx)
    for tau in taus:
        breadcrumbs_prune_(tau, density, gamma)
    return apply_to_base(base, _combine(taus, election), coefficient)


# ---- SCE ---------------------------------------------------------------------------------------------


def variance_selection(taus: list[torch.Tensor], fraction: float) -> torch.Tensor | None:
    """Positions whose variance across the task vectors is among the top ⌊fraction·(non-zero variances)⌋
    (ties at the cut kept); None when that count is 0."""
    n = len(taus)
    mean = taus[0].clone()
    for tau in taus[1:]:
        mean.add_(tau)
    mean.div_(n)
    variance, scratch = torch.zeros_like(mean), torch.empty_like(mean)
    for tau in taus:
        torch.sub(tau, mean, out=scratch)
        variance.add_(scratch.mul_(scratch))
    variance.div_(n)
    count = int(int(torch.count_nonzero(variance)) * fraction)
    if count == 0:
        return None
    return variance >= kth_smallest(variance, variance.numel() - count + 1)


def square_sums(taus: list[torch.Tensor]) -> torch.Tensor:
    """Σ τᵢ² per task vector (float64, CPU): additive over chunks of rows."""
    return torch.stack([torch.sum(torch.square(tau.to(torch.float64))).cpu() for tau in taus])


def sce_statistics(models, base, ctx: KeyContext, select_topk, scale):
    return {"square_sums": square_sums(task_vectors(models, base, ctx))}


@merge_method(
    "sce",
    summary="SCE: select positions by variance, weight each task vector by its mean square, TIES sign erase",
    params=(
        Param("select_topk", float, 1.0, "fraction of positions kept, those whose task-vector entries vary most "
                                         "across the models (1 keeps all)", minimum=0.0, maximum=1.0),
        SCALE,
    ),
    base="required",
    chunking=Chunking(split_rows=lambda params: params["select_topk"] >= 1),
    statistics=Statistics(sce_statistics),
)
def sce(models, base, ratio, ctx: KeyContext, select_topk, scale):
    """τ* = Σ cᵢ·mᵢ·τᵢ / Σ cᵢ·mᵢ with cᵢ = ‖τᵢ‖² / Σⱼ‖τⱼ‖² (the normalised mean squares of the selected task
    vectors: one weight per model and tensor), mᵢ = 1 where sgn τᵢ agrees with sgn Σⱼ τⱼ; 0 where none agrees."""
    coefficient = ratio * scale
    if coefficient == 0 or select_topk <= 0:
        return unchanged_base(base, ctx)
    taus = task_vectors(models, base, ctx)
    if select_topk < 1:
        selected = variance_selection(taus, select_topk)
        if selected is None:
            return unchanged_base(base, ctx)
        for tau in taus:
            tau.mul_(selected)
    stats = ctx.stats or {}
    sums = stats["square_sums"] if "square_sums" in stats else square_sums(taus)
    total = float(sums.sum())
    weights = [float(s) / total for s in sums] if total > 0 else [1.0 / len(taus)] * len(taus)
    votes = taus[0].clone()
    for tau in taus[1:]:
        votes.add_(tau)
    sign = votes.sign_()
    merged, mass, agrees = torch.zeros_like(sign), torch.zeros_like(sign), torch.empty_like(sign)
    for weight, tau in zip(weights, taus):
        torch.sign(tau, out=agrees).eq_(sign).mul_(weight)  # cᵢ where τᵢ agrees with the elected sign
        mass.add_(agrees)
        merged.add_(tau.mul_(agrees))
    merged.div_(mass.masked_fill_(mass == 0, 1.0))
    return apply_to_base(base, merged, coefficient)
