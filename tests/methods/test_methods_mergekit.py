"""Cross-check against mergekit where the definitions coincide, calling mergekit's merge methods directly on
tiny random tensors. mergekit is not a project dependency (it pulls transformers, datasets, pandas, …); this
file skips when it is not importable. How it was run: see the README, "Cross-check against mergekit"."""

import pytest
import torch

mergekit_registry = pytest.importorskip("mergekit.merge_methods.registry")
from mergekit.merge_methods.base import TensorGroup  # noqa: E402
from mergekit.merge_methods.karcher import karcher_merge_tensors  # noqa: E402

import merge_lab_methods as methods  # noqa: E402

M = methods


def ours(name, models, base, ratio=1.0, weights=None, seed=0, key="k", **params):
    ctx = M.KeyContext(key=key, seed=seed, shape=tuple(models[0].shape), weights=weights)
    full = {p.name: p.default for p in M.get_method(name).params} | params
    return M.get_method(name)([m.clone() for m in models], None if base is None else base.clone(), ratio, ctx,
                              **full)


def theirs(name, models, base=None, **parameters):
    tensors = ([base] if base is not None else []) + [m.clone() for m in models]
    names = (["base"] if base is not None else []) + list(range(1, len(models) + 1))  # models are 1, 2, …
    group = TensorGroup.from_tensors(tensors, ids=names, base_index=0 if base is not None else None)
    return mergekit_registry.get(name)([group], parameters=parameters)[0]


@pytest.fixture
def family():
    g = torch.Generator().manual_seed(11)
    base = torch.randn(6, 40, generator=g, dtype=torch.float64)
    return base, [base + 0.1 * torch.randn(6, 40, generator=g, dtype=torch.float64) for _ in range(3)]


def ids(n):
    return {i + 1: 1.0 for i in range(n)}


def test_task_arithmetic_with_a_negative_weight(family):
    base, models = family
    got = ours("task_arithmetic", models, base, weights=(1.0, -1.0, 0.5))
    expected = theirs("task_arithmetic", models, base, weight={1: 1.0, 2: -1.0, 3: 0.5})
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("density, gamma", [(0.8, 0.05), (0.5, 0.1), (0.3, 0.9)])
def test_breadcrumbs(family, density, gamma):
    base, models = family
    got = ours("breadcrumbs", models, base, density=density, gamma=gamma)
    expected = theirs("breadcrumbs", models, base, weight=ids(3), density=density, gamma=gamma)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # breadcrumbs_ties: mergekit's default normalize=false sums the agreeing entries; normalize=true is
    # the TIES disjoint mean, ours
    got = ours("breadcrumbs_ties", models, base, density=density, gamma=gamma)
    expected = theirs("breadcrumbs_ties", models, base, weight=ids(3), density=density, gamma=gamma, normalize=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name, normalize", [("della_linear", False), ("della", True)])
def test_della_with_the_same_draws(family, monkeypatch, name, normalize):
    """mergekit draws its masks with torch.bernoulli from the global RNG; we hand it our seeded draws
    (keep where u ≥ 1 − q) so the comparison covers everything else: the per-row ranks, the keep
    probabilities, the election and the mean. Without rescaling the results agree; with it they differ
    by design (mergekit rescales to the L1 norm of the task vector, we divide by q)."""
    base, models = family[0].float(), [t.float() for t in family[1]]
    density, epsilon = 0.5, 0.2
    ctx = M.KeyContext(key="k", seed=5, shape=tuple(base.shape))
    draws = [M.drop.uniform_draws(ctx, i, base.numel()).view(base.shape) for i in range(3)]
    seen = []

    def bernoulli(probs):
        ours_q = M.sparse.della_keep_probabilities(models[len(seen)] - base, density, epsilon)
        torch.testing.assert_close(probs, ours_q, rtol=0, atol=1e-6)
        keep = (draws[len(seen)] >= 1 - ours_q).to(probs.dtype)
        seen.append(probs)
        return keep

    monkeypatch.setattr(torch, "bernoulli", bernoulli)
    expected = theirs(name, models, base, weight=ids(3), density=density, epsilon=epsilon, rescale=False,
                      normalize=normalize)
    assert len(seen) == 3
    got = ours(name, models, base, seed=5, density=density, epsilon=epsilon, rescale=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1])
def test_sce(family, select_topk):
    base, models = family
    got = ours("sce", models, base, select_topk=select_topk)
    expected = theirs("sce", models, base, select_topk=select_topk)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp(family, with_base):
    base, models = family
    weights = (1.0, 2.0, 0.5)
    got = ours("multislerp", models, base if with_base else None, weights=weights)
    expected = theirs("multislerp", models, base if with_base else None,
                      weight={i + 1: w for i, w in enumerate(weights)})
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)  # mergekit adds eps = 1e-8 to the norms


@pytest.mark.parametrize("max_iter", [1, 10, 50])
def test_karcher(family, max_iter):
    _, models = family
    weights = (1.0, 2.0, 0.5)
    got = ours("karcher", models, None, weights=weights, max_iter=max_iter)
    total = sum(weights)
    expected = karcher_merge_tensors([m.clone() for m in models], [w / total for w in weights], max_iter=max_iter)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    if max_iter == 10:  # mergekit's registered method: equal weights
        torch.testing.assert_close(ours("karcher", models, None, weights=(1.0, 1.0, 1.0)),
                                   theirs("karcher", models), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("granularity, options", [("tensor", {}), ("row", {"nuslerp_flatten": False}),
                                                  ("column", {"nuslerp_flatten": False, "nuslerp_row_wise": True})])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp(family, granularity, options, with_base):
    """mergekit's t is w₂/(w₁ + w₂), ours α; its `nuslerp_row_wise` takes the vectors along the first
    dimension, i.e. one angle per column (our `column`), and flatten=false alone one per row of a 2-D tensor."""
    base, models = family
    got = ours("nuslerp", models[:2], base if with_base else None, 0.3, granularity=granularity)
    expected = theirs("nuslerp", models[:2], base if with_base else None, weight={1: 0.7, 2: 0.3}, **options)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("t", [1e-4, 0.01, 0.1])
def test_nearswap(family, t):
    base, models = family
    got = ours("nearswap", models[:1], base, t=t)
    expected = theirs("nearswap", models[:1], base, t=t)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
