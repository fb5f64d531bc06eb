"""Hand-computed values for DELLA, Model Breadcrumbs, SCE, Multi-SLERP, the Karcher mean, NuSLERP, NearSwap,
the geometric median and TSD's geometric-median combine, on small tensors, and their defined edge cases."""

import math

import pytest
import torch

import merge_lab_methods as methods
from tests.helpers import reference_draws

M = methods
ctx_for = M.KeyContext


# ---- DELLA ---------------------------------------------------------------------------------------------

def test_della_keep_probabilities_are_ranked_per_row():
    rows = torch.tensor([[3., -1., 2.], [1., -1., 1.]])  # second row: equal magnitudes ranked by position
    q = M.sparse.della_keep_probabilities(rows, density=0.5, epsilon=0.2)
    torch.testing.assert_close(q, torch.tensor([[0.7, 0.3, 0.5], [0.3, 0.5, 0.7]]), rtol=0, atol=1e-7)
    # a row of one entry: the middle of the range
    assert M.sparse.della_keep_probabilities(torch.tensor([[5.]]), 0.6, 0.1).item() == pytest.approx(0.6)


def test_della_golden_from_the_documented_draws(call):
    base = torch.tensor([[1., 1., 1.], [0., 0., 0.]])
    taus = [torch.tensor([[3., -1., 2.], [0.5, 4., -2.]]), torch.tensor([[-1., 2., 2.], [1., -3., 0.25]])]
    ctx = ctx_for(key="model.x.weight", seed=4, shape=(2, 3))
    expected_taus = []
    for index, tau in enumerate(taus):
        # ranks per row of |τ|, q = 0.3 + 0.4·rank/2
        order = tau.abs().argsort(dim=1, stable=True).argsort(dim=1).float()
        q = 0.3 + 0.4 * order / 2
        u = reference_draws(4, "model.x.weight", index, 6).view(2, 3)
        kept = u >= 1 - q
        assert 0 < int(kept.sum()) < 6  # the seed drops some and keeps some of each
        expected_taus.append(torch.where(kept, tau / q, 0.0))
    linear = call("della_linear", [base + t for t in taus], base, 0.5, ctx, density=0.5, epsilon=0.2)
    torch.testing.assert_close(linear, base + 0.5 * (expected_taus[0] + expected_taus[1]), rtol=1e-6, atol=1e-6)
    # della: the TIES election (mass) and disjoint mean of the same dropped, rescaled vectors
    ties = call("ties", [base + t for t in expected_taus], base, 0.5, ctx, k=1.0)
    got = call("della", [base + t for t in taus], base, 0.5, ctx, density=0.5, epsilon=0.2)
    torch.testing.assert_close(got, ties, rtol=1e-6, atol=1e-6)
    # without rescale the kept entries stay as they are
    plain = call("della_linear", [base + t for t in taus], base, 1.0, ctx, density=0.5, epsilon=0.2, rescale=False)
    unscaled = [torch.where(e != 0, t, 0.0) for e, t in zip(expected_taus, taus)]
    torch.testing.assert_close(plain, base + unscaled[0] + unscaled[1], rtol=1e-6, atol=1e-6)


def test_della_with_epsilon_0_is_dare_bit_for_bit(call):
    g = torch.Generator().manual_seed(5)
    base = torch.randn(7, 9, generator=g)
    models = [base + torch.randn(7, 9, generator=g) for _ in range(3)]
    ctx = ctx_for(key="k", seed=2, shape=(7, 9))
    for density in (0.25, 0.5, 0.75):
        p = 1 - density
        assert torch.equal(call("della_linear", models, base, 0.6, ctx, density=density, epsilon=0.0),
                           call("dare", models, base, 0.6, ctx, p=p))
        assert torch.equal(call("della", models, base, 0.6, ctx, density=density, epsilon=0.0),
                           call("dare", models, base, 0.6, ctx, p=p, combine="ties"))


def test_della_edges_and_errors(call):
    base = torch.tensor([1., 2., 3.])
    models = [base + torch.tensor([1., -1., 2.]), base + torch.tensor([0.5, 0.5, -1.])]
    ctx = ctx_for(key="k", shape=(3,))
    assert torch.equal(call("della_linear", models, base, 0.7, ctx, density=1.0),
                       call("task_arithmetic", models, base, 0.7, ctx))  # density 1: nothing dropped
    assert torch.equal(call("della", models, base, 0.7, ctx, density=1.0, epsilon=0.3),
                       call("ties", models, base, 0.7, ctx, k=1.0))  # epsilon is moot at density 1
    assert torch.equal(call("della", models, base, 0.7, ctx, density=0.0, epsilon=0.0), base)
    with pytest.raises(ValueError, match=r"epsilon must be at most min\(density, 1 − density\) = 0.2"):
        call("della", models, base, 1.0, ctx, density=0.8, epsilon=0.25)


# ---- Model Breadcrumbs -----------------------------------------------------------------------------------

BREAD = torch.tensor([0.1, -5., 2., -0.3, 1., 0.2, 3., -0.05, 0.7, 4.])


def test_breadcrumbs_drops_the_largest_and_the_smallest(call):
    # n = 10, density 0.5, γ 0.2: keep 5, drop the 2 largest (5, 4) and the 3 smallest (0.05, 0.1, 0.2)
    got = call("breadcrumbs", [BREAD.clone()], torch.zeros(10), density=0.5, gamma=0.2)
    assert torch.equal(got, torch.tensor([0., 0., 2., -0.3, 1., 0., 3., 0., 0.7, 0.]))
    # γ above 1 − density: only the (1 − density) largest go, no smallest
    got = call("breadcrumbs", [BREAD.clone()], torch.zeros(10), density=0.5, gamma=0.6)
    assert torch.equal(got, torch.tensor([0.1, 0., 0., -0.3, 0., 0.2, 0., -0.05, 0.7, 0.]))
    # density 1 keeps everything whatever γ; γ 0 is magnitude pruning to exactly ⌊density·n⌋ entries
    assert torch.equal(call("breadcrumbs", [BREAD.clone()], torch.zeros(10), density=1.0, gamma=0.3), BREAD)
    assert int((call("breadcrumbs", [BREAD.clone()], torch.zeros(10), density=0.3, gamma=0.0) != 0).sum()) == 3
    assert M.sparse.breadcrumbs_counts(10, 0.5, 0.2) == (3, 2)
    assert M.sparse.breadcrumbs_counts(10, 0.5, 0.6) == (0, 5)


def test_breadcrumbs_ties_and_the_ratio(call):
    base = torch.ones(10)
    other = torch.tensor([-0.2, 5., -2., 0.4, 1., -0.1, 3., 0.05, -0.9, 4.])
    # other keeps |x| in [0.4, 3]: [0, 0, −2, 0.4, 1, 0, 3, 0, −0.9, 0]; BREAD keeps [0, 0, 2, −0.3, 1, 0, 3, 0, 0.7, 0]
    # mass votes: [0, 0, 0, 0.1, 2, 0, 6, 0, −0.2, 0] -> disjoint means [0, 0, 0, 0.4, 1, 0, 3, 0, −0.9, 0]
    got = call("breadcrumbs_ties", [base + BREAD, base + other], base, 0.5, density=0.5, gamma=0.2)
    expected = base + 0.5 * torch.tensor([0., 0., 0., 0.4, 1., 0., 3., 0., -0.9, 0.])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    summed = call("breadcrumbs", [base + BREAD, base + other], base, 0.5, density=0.5, gamma=0.2)
    expected = base + 0.5 * torch.tensor([0., 0., 0., 0.1, 2., 0., 6., 0., -0.2, 0.])
    torch.testing.assert_close(summed, expected, rtol=1e-6, atol=1e-6)


# ---- SCE ---------------------------------------------------------------------------------------------------

def test_sce_golden(call):
    base = torch.zeros(4)
    t1, t2 = torch.tensor([1., 2., -1., 0.]), torch.tensor([2., -1., 3., 2.])
    # mean squares 6/4 and 18/4 -> weights 0.25, 0.75; mass votes all positive
    # entry 0: (0.25·1 + 0.75·2) / 1 = 1.75; entry 1: only t1 agrees -> 2; entry 2, 3: only t2 -> 3, 2
    assert call("sce", [t1, t2], base).tolist() == [1.75, 2.0, 3.0, 2.0]
    # select_topk 0.5: variances 0.25, 2.25, 4, 1 -> entries 1, 2 stay; weights 5/4, 10/4 -> 1/3, 2/3;
    # votes [0, 1, 2, 0]: entry 1 -> t1's 2, entry 2 -> t2's 3
    assert call("sce", [t1, t2], base, select_topk=0.5).tolist() == [0.0, 2.0, 3.0, 0.0]
    assert torch.equal(call("sce", [t1, t2], base, select_topk=0.0), base)
    assert torch.equal(call("sce", [t1, t2], base, 0.0), base)
    # the ratio and λ scale τ*; a vote of exactly 0 gives 0
    assert call("sce", [t1 + 1, t2 + 1], base + 1, 0.5, scale=2.0).tolist() == [2.75, 3.0, 4.0, 3.0]
    assert call("sce", [torch.tensor([1., 2.]), torch.tensor([-1., 1.])], torch.zeros(2)).tolist()[0] == 0.0


def test_sce_uses_the_whole_tensor_weights_from_the_statistics(call):
    t1, t2 = torch.tensor([[1., 2., -1., 0.]]), torch.tensor([[2., -1., 3., 2.]])
    stats = {"square_sums": torch.tensor([1.0, 3.0], dtype=torch.float64)}  # as if the other rows weighed so
    got = call("sce", [t1, t2], torch.zeros(1, 4), ctx=ctx_for(key="k", shape=(1, 4), stats=stats))
    assert got.tolist() == [[1.75, 2.0, 3.0, 2.0]]  # weights 0.25, 0.75 again


# ---- Multi-SLERP, Karcher ---------------------------------------------------------------------------------

def test_multislerp_golden(call):
    a, b = torch.tensor([2., 0.]), torch.tensor([0., 1.])
    # α = 0.5: directions 45°, norm 0.5·2 + 0.5·1 = 1.5
    torch.testing.assert_close(call("multislerp", [a, b], None, 0.5), 1.5 / math.sqrt(2) * torch.ones(2))
    # α = 0.25: the normalised weighted mean of the directions, (0.75, 0.25)/‖·‖, norm 1.75 (not slerp's 22.5°)
    direction = torch.tensor([0.75, 0.25]) / math.hypot(0.75, 0.25)
    torch.testing.assert_close(call("multislerp", [a, b], None, 0.25), 1.75 * direction)
    assert torch.equal(call("multislerp", [a, b], None, 0.0), a)
    torch.testing.assert_close(call("multislerp", [a, b], None, 1.0), b)
    # with a base: the task vectors, the base added back
    base = torch.tensor([1., 1.])
    torch.testing.assert_close(call("multislerp", [base + a, base + b], base, 0.25), base + 1.75 * direction)
    # weights: three models, weights 1, 1, 2 at α = 1
    c = torch.tensor([0., -3.])
    got = call("multislerp", [a, b, c], None, 1.0, ctx_for(key="k", shape=(2,), weights=(1.0, 1.0, 2.0)))
    mean_direction = torch.tensor([0.25, 0.25 - 0.5])
    torch.testing.assert_close(got, (0.25 * 2 + 0.25 * 1 + 0.5 * 3) * mean_direction / mean_direction.norm())
    # opposite directions with equal weights: the linear mean
    torch.testing.assert_close(call("multislerp", [a, -a], None, 0.5), torch.zeros(2))


def test_karcher_golden_is_the_geodesic_mean(call):
    a, b = torch.tensor([2., 0.]), torch.tensor([0., 1.])
    # two directions: the weighted Karcher mean lies at the weighted angle (22.5° for α = 0.25), norm 1.75
    expected = 1.75 * torch.tensor([math.cos(math.pi / 8), math.sin(math.pi / 8)])
    torch.testing.assert_close(call("karcher", [a, b], None, 0.25, max_iter=50, tol=1e-12), expected)
    # = slerp with the norm interpolated linearly (our slerp)
    torch.testing.assert_close(call("slerp", [a, b], None, 0.25), expected)
    # three unit directions at 0°, 90°, 180° + weights 1, 1, 1 at α = 1: the mean direction is 90°
    c = torch.tensor([-1., 0.])
    got = call("karcher", [torch.tensor([1., 0.]), torch.tensor([0., 1.]), c], None, 1.0,
               ctx_for(key="k", shape=(2,), weights=(1.0, 1.0, 1.0)), max_iter=100, tol=1e-12)
    torch.testing.assert_close(got, torch.tensor([0., 1.]), rtol=1e-5, atol=1e-6)
    assert torch.equal(call("karcher", [a, b], None, 0.0), a)
    # a zero tensor has no direction: it only counts in the norm
    got = call("karcher", [a, torch.zeros(2)], None, 0.5)
    torch.testing.assert_close(got, torch.tensor([1., 0.]))


def test_barycentric_weights_are_checked(call):
    a, b = torch.tensor([2., 0.]), torch.tensor([0., 1.])
    for name in ("multislerp", "karcher", "geometric_median"):
        with pytest.raises(ValueError, match=r"barycentric|must not be negative"):
            call(name, [a, b], None, 1.0, ctx_for(key="k", shape=(2,), weights=(1.0, -1.0)))
        with pytest.raises(ValueError, match="barycentric weights: none negative"):
            M.get_method(name).check_weights([1.0, -1.0])
    M.get_method("ties").check_weights([1.0, -1.0])  # task negation is allowed there


# ---- NuSLERP -----------------------------------------------------------------------------------------------

def test_nuslerp_golden(call):
    a, b = torch.tensor([1., 0.]), torch.tensor([0., 2.])
    # Ω = 90°: sin(45°)·a + sin(45°)·b on the raw vectors
    s = math.sin(math.pi / 4)
    torch.testing.assert_close(call("nuslerp", [a, b], None, 0.5), torch.tensor([s, 2 * s]))
    assert torch.equal(call("nuslerp", [a, b], None, 0.0), a) and torch.equal(call("nuslerp", [a, b], None, 1.0), b)
    # rows: row 0 as above, row 1 colinear -> the linear interpolation
    A, B = torch.tensor([[1., 0.], [1., 1.]]), torch.tensor([[0., 2.], [2., 2.]])
    torch.testing.assert_close(call("nuslerp", [A, B], None, 0.5, granularity="row"),
                               torch.tensor([[s, 2 * s], [1.5, 1.5]]))
    # columns: (1, 1) -> (0, 2) and (0, 1) -> (2, 2), both at 45°: each entry c·(A + B), c = sin(22.5°)/sin(45°)
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    torch.testing.assert_close(call("nuslerp", [A, B], None, 0.5, granularity="column"), c * (A + B))
    # a base: the task vectors
    base = torch.tensor([1., 1.])
    torch.testing.assert_close(call("nuslerp", [base + a, base + b], base, 0.5), base + torch.tensor([s, 2 * s]))
    # a zero vector: linear
    torch.testing.assert_close(call("nuslerp", [a, torch.zeros(2)], None, 0.25), torch.tensor([0.75, 0.]))


def test_nuslerp_column_uses_the_column_statistics(call):
    A, B = torch.tensor([[1., 0.]]), torch.tensor([[0., 2.]])  # one row of a taller tensor
    stats = M.sphere.pair_statistics(torch.tensor([[1., 0.], [1., 1.]]), torch.tensor([[0., 2.], [2., 2.]]),
                                     "column")
    got = call("nuslerp", [A, B], None, 0.5, ctx_for(key="k", shape=(2, 2), stats=stats), granularity="column")
    whole = call("nuslerp", [torch.tensor([[1., 0.], [1., 1.]]), torch.tensor([[0., 2.], [2., 2.]])], None, 0.5,
                 granularity="column")
    torch.testing.assert_close(got, whole[:1])


# ---- NearSwap ---------------------------------------------------------------------------------------------

def test_nearswap_golden(call):
    base, other = torch.zeros(4), torch.tensor([0.5, -2., 0., 10.])
    # |d| = 0.5, 2, 0, 10 with t = 1: weights 1, 0.5, 1, 0.1
    assert call("nearswap", [other], base, t=1.0).tolist() == pytest.approx([0.5, -1.0, 0.0, 1.0])
    assert call("nearswap", [other], base, 0.5, t=1.0).tolist() == pytest.approx([0.25, -0.5, 0.0, 0.5])
    assert torch.equal(call("nearswap", [other], base, 0.0, t=1.0), base)
    assert torch.equal(call("nearswap", [other], base, t=0.0), base)
    assert torch.equal(call("nearswap", [other], base, t=100.0), other)


# ---- geometric median -----------------------------------------------------------------------------------

def test_geometric_median_is_the_fermat_point(call):
    # the right isosceles triangle (0,0), (1,0), (0,1): the Fermat point (t, t), t = (3 − √3)/6
    points = [torch.tensor([0., 0.]), torch.tensor([1., 0.]), torch.tensor([0., 1.])]
    t = (3 - math.sqrt(3)) / 6
    got = call("geometric_median", points, None, 1.0, eps=1e-12, max_iter=1000, tol=0.0)
    torch.testing.assert_close(got, torch.tensor([t, t]), rtol=0, atol=1e-6)
    # robust to an outlier: three equal points and one far away -> the three
    same = torch.tensor([1., 2., 3.])
    got = call("geometric_median", [same, same, torch.tensor([100., -50., 7.]), same], None, 1.0)
    torch.testing.assert_close(got, same, rtol=0, atol=1e-4)


def test_geometric_median_ratio_base_and_weights(call):
    points = [torch.tensor([0., 0.]), torch.tensor([1., 0.]), torch.tensor([0., 1.])]
    median = call("geometric_median", points, None, 1.0)
    # without a base the first model anchors the ratio; with one the base does (the median is the same)
    torch.testing.assert_close(call("geometric_median", points, None, 0.25), 0.75 * points[0] + 0.25 * median)
    base = torch.tensor([5., -5.])
    torch.testing.assert_close(call("geometric_median", points, base, 1.0), median, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(call("geometric_median", points, base, 0.5), (base + median) / 2, rtol=1e-5,
                               atol=1e-6)
    assert torch.equal(call("geometric_median", points, base, 0.0), base)
    # a weight of 2 on (1, 0) (half the total): the median moves onto it
    got = call("geometric_median", points, None, 1.0, ctx_for(key="k", shape=(2,), weights=(1.0, 2.0, 1.0)),
               max_iter=2000, tol=0.0)
    torch.testing.assert_close(got, torch.tensor([1., 0.]), rtol=0, atol=1e-4)


def test_weiszfeld_stops_at_max_iter_and_starts_at_the_weighted_mean():
    g = M.model_stock.gram([torch.tensor([0., 0.]), torch.tensor([1., 0.]), torch.tensor([0., 1.])])
    assert M.median.weiszfeld_coefficients(g, [1.0, 1.0, 2.0], 1e-6, 0, 0.0).tolist() == [0.25, 0.25, 0.5]
    one = M.median.weiszfeld_coefficients(g, [1.0, 1.0, 1.0], 1e-6, 1, 0.0)
    d = torch.tensor([math.hypot(1 / 3, 1 / 3), math.hypot(2 / 3, 1 / 3), math.hypot(1 / 3, 2 / 3)])
    torch.testing.assert_close(one, (1 / d / (1 / d).sum()).double())


# ---- TSD with the geometric median (TGMD) ----------------------------------------------------------------

def test_tsd_geometric_median_of_the_sign_filtered_vectors(call):
    base = torch.zeros(2)
    taus = [torch.tensor([1., 1.]), torch.tensor([2., -1.]), torch.tensor([10., 1.]), torch.tensor([1.5, -3.])]
    # count votes: [4, 0] -> entry 1 elected 0: every τ loses it -> points (1, 0), (2, 0), (10, 0), (1.5, 0)
    got = call("tsd", taus, base, 1.0, ctx_for(key="k", shape=(2,)), p=0.0, combine="geometric_median",
               max_iter=1000, tol=0.0)
    # on a line the geometric median of 4 points is any point between the middle two: Weiszfeld from the mean
    # converges inside [1.5, 2]
    assert 1.5 - 1e-4 <= float(got[0]) <= 2 + 1e-4 and float(got[1]) == 0.0
    # the same as the geometric median of the filtered vectors, scaled by α and λ
    filtered = [torch.tensor([t[0].item(), 0.]) for t in taus]
    expected = call("geometric_median", filtered, base, 1.0, max_iter=1000, tol=0.0)
    torch.testing.assert_close(got, expected)
    half = call("tsd", taus, base, 0.5, ctx_for(key="k", shape=(2,)), p=0.0, combine="geometric_median",
                scale=2.0, max_iter=1000, tol=0.0)
    torch.testing.assert_close(half, expected)
    # combine=mean is the TSD of before
    assert torch.equal(call("tsd", taus, base, 1.0, ctx_for(key="k", shape=(2,)), p=0.0),
                       call("ties_soup", taus, base, 1.0))


def test_new_methods_leave_their_inputs_alone(call):
    base = torch.tensor([[1., 2., 3.], [0., -1., 4.]])
    models = [base + torch.tensor([[2., -2., 1.], [0.5, 0.1, -3.]]), base + torch.tensor([[-1., 1., 1.], [2., 0., 1.]])]
    before = [m.clone() for m in models], base.clone()
    cases = [("della", base, {}), ("della_linear", base, {}), ("breadcrumbs", base, {"density": 0.5}),
             ("breadcrumbs_ties", base, {"density": 0.5}), ("sce", base, {"select_topk": 0.5}),
             ("multislerp", None, {}), ("multislerp", base, {}), ("karcher", None, {}),
             ("nuslerp", None, {"granularity": "row"}), ("nuslerp", base, {}), ("geometric_median", None, {}),
             ("geometric_median", base, {}), ("tsd", base, {"combine": "geometric_median"})]
    for name, b, params in cases:
        call(name, models, b, 0.5, ctx_for(key="k", shape=(2, 3)), **params)
        assert all(torch.equal(x, y) for x, y in zip(models, before[0])) and torch.equal(base, before[1]), name
    call("nearswap", models[:1], base, 0.5, t=0.5)
    assert torch.equal(models[0], before[0][0]) and torch.equal(base, before[1])
