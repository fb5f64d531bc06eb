"""Hand-computed values for every task-vector method on small tensors, and the defined edge cases."""

import math

import pytest
import torch

import merge_lab_methods as methods
from tests.helpers import reference_mask

M = methods
ctx_for = M.KeyContext


# sd-mecha's 4×4 "sudoku" test inputs (tests/merge_methods/test_ties.py), used as task vectors.
SUDOKU_A = torch.tensor([[-1., 2., 3., 4.], [4., -3., 2., 1.], [3., 4., 1., -2.], [2., 1., -4., 3.]])
SUDOKU_B = torch.tensor([[3., 4., 1., -2.], [2., 1., -4., 3.], [-1., 2., 3., 4.], [4., -3., 2., 1.]])
# k = 0.5 keeps |x| >= 2 in both (the 8th smallest magnitude of 16 is 2; ties at the threshold are kept).
SUDOKU_COUNT = torch.tensor([[3., 3., 3., 0.], [3., -3., 0., 3.], [3., 3., 3., 0.], [3., -3., 0., 3.]])
SUDOKU_MASS = torch.tensor([[3., 3., 3., 4.], [3., -3., -4., 3.], [3., 3., 3., 4.], [3., -3., -4., 3.]])


# ---- task arithmetic --------------------------------------------------------------------------------

def test_task_arithmetic_golden(call):
    base = torch.tensor([1., 2.])
    m1, m2 = torch.tensor([2., 1.]), torch.tensor([3., 2.5])  # τ = [1, −1], [2, 0.5]
    assert torch.equal(call("task_arithmetic", [m1, m2], base, 0.5, scale=2.0), torch.tensor([4., 1.5]))
    negated = call("task_arithmetic", [m1, m2], base, 1.0, ctx_for(weights=(1.0, -1.0)))
    assert torch.equal(negated, torch.tensor([0., 0.5]))  # τ1 − τ2 = [−1, −1.5]
    assert torch.equal(call("task_arithmetic", [m1, m2], base, 0.0), base)


# ---- TIES family ------------------------------------------------------------------------------------

@pytest.mark.parametrize("base_value", [0.0, 1.5])
def test_sudoku_golden_rows(call, base_value):
    base = torch.full((4, 4), base_value)
    models = [base + SUDOKU_A, base + SUDOKU_B]
    count = call("ties_soup", models, base, k=0.5)
    mass = call("ties", models, base, k=0.5)
    assert count[0].tolist() == [base_value + v for v in (3, 3, 3, 0)]  # count vote [3,3,3,0]
    assert mass[0].tolist() == [base_value + v for v in (3, 3, 3, 4)]  # mass vote [3,3,3,4]
    assert torch.equal(count, base + SUDOKU_COUNT)
    assert torch.equal(mass, base + SUDOKU_MASS)
    assert torch.equal(call("ties", models, base, k=0.5, election="count"), count)
    # α_b and λ multiply the merged task vector
    assert torch.equal(call("ties", models, base, 0.25, k=0.5, scale=2.0), base + SUDOKU_MASS * 0.5)


def test_ties_trim_election_and_weights_by_hand(call):
    base = torch.zeros(4)
    t1, t2 = torch.tensor([3., -1., 0.5, 2.]), torch.tensor([-2., -2., 1., 0.])
    # k = 0.5, n = 4: threshold = 2nd smallest magnitude: t1 keeps |x| >= 1 -> [3, −1, 0, 2]; t2 keeps
    # |x| >= 1 -> [−2, −2, 1, 0]. Mass votes sgn[1, −3, 1, 2]; count votes sgn[0, −2, 1, 1].
    assert call("ties", [t1, t2], base, k=0.5).tolist() == [3.0, -1.5, 1.0, 2.0]
    assert call("ties", [t1, t2], base, k=0.5, election="count").tolist() == [0.0, -1.5, 1.0, 2.0]
    # weights (1, −1) negate the second task: [2, 2, −1, 0]; k = 1, mass votes sgn[5, 1, −0.5, 2]
    weighted = call("ties", [t1, t2], base, ctx=ctx_for(weights=(1.0, -1.0)), k=1.0)
    assert weighted.tolist() == [2.5, 2.0, -1.0, 2.0]


def test_ties_k_edges_and_zero_vectors(call):
    base = torch.tensor([1., -1., 2.])
    models = [base + torch.tensor([1., 2., -3.]), base + torch.tensor([1., -2., -1.])]
    assert torch.equal(call("ties", models, base, k=0.0), base)  # k = 0 keeps nothing: the base
    untrimmed = call("ties", models, base, k=1.0)  # mass votes [2, 0, −4]: a 0 vote gives 0
    assert untrimmed.tolist() == [2.0, -1.0, 0.0]
    assert torch.equal(call("ties", [base.clone(), base.clone()], base, k=0.3), base)  # zero task vectors


def test_ties_scalars_and_vectors(call):
    zero = torch.tensor(0.0)
    assert float(call("ties", [torch.tensor(2.0), torch.tensor(-1.0)], zero, k=0.5)) == 2.0  # mass: sgn 1
    assert float(call("ties_soup", [torch.tensor(2.0), torch.tensor(-1.0)], zero, k=0.5)) == 0.0  # tie: 0
    # n = 2, k = 0.5: m = max(⌊1⌋, 1) = 1, nothing trimmed; mass votes sgn[6, 0]: the second entry is 0
    one_d = call("ties", [torch.tensor([4., -1.]), torch.tensor([2., 1.])], torch.zeros(2), k=0.5)
    assert one_d.tolist() == [3.0, 0.0]


def test_trim_threshold_matches_kthvalue_on_big_tensors():
    tau = torch.randn(1 << 19, generator=torch.Generator().manual_seed(3))
    tau[::7] = tau[3]  # many ties at one magnitude
    for k in (0.01, 0.2, 0.5, 0.93):
        m = max(int((1 - k) * tau.numel()), 1)
        expected = tau.abs().kthvalue(m).values
        assert M.task_vectors.kth_smallest(tau.abs(), m) == expected
        kept = M.task_vectors.trim_(tau.clone(), k)
        assert torch.equal(kept, torch.where(tau.abs() >= expected, tau, 0.0))


# ---- DARE and TSD ---------------------------------------------------------------------------------

def test_dare_golden_from_the_documented_mask_scheme(call):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 5, generator=g)
    taus = [torch.randn(3, 5, generator=g) for _ in range(2)]
    ctx = ctx_for(key="model.x.weight", seed=11, shape=(3, 5))
    masks = [reference_mask(11, "model.x.weight", i, 15, 0.4).view(3, 5) for i in range(2)]
    expected = base + 0.5 * (taus[0] * masks[0] / 0.6 + taus[1] * masks[1] / 0.6)
    got = call("dare", [base + t for t in taus], base, 0.5, ctx, p=0.4)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    no_rescale = call("dare", [base + t for t in taus], base, 0.5, ctx, p=0.4, rescale=False)
    torch.testing.assert_close(no_rescale, base + 0.5 * (taus[0] * masks[0] + taus[1] * masks[1]),
                               rtol=1e-6, atol=1e-6)


def test_dare_p_edges(call):
    base = torch.tensor([1., 2., 3.])
    models = [base + torch.tensor([1., -1., 2.]), base + torch.tensor([0.5, 0.5, -1.])]
    ctx = ctx_for(key="k", shape=(3,))
    assert torch.equal(call("dare", models, base, 0.7, ctx, p=0.0),
                       call("task_arithmetic", models, base, 0.7, ctx))  # nothing dropped, nothing rescaled
    assert torch.equal(call("dare", models, base, 0.7, ctx, p=1.0), base)  # everything dropped: the base
    assert torch.equal(call("dare", models, base, 0.7, ctx, p=0.0, combine="ties"),
                       call("ties", models, base, 0.7, ctx, k=1.0))


def test_keep_fraction_and_rescaled_expectation(call):
    n = 1 << 21
    ctx = ctx_for(key="big", shape=(n,), seed=5)
    keep = M.drop.keep_mask(ctx, 0, n, 0.3)
    assert abs(float(keep.float().mean()) - 0.7) < 0.002
    positions = [0, 1, 2, 3, 65535, 65536, 131071, n // 2 + 1, n - 2, n - 1,
                 *torch.randint(0, n, (200,), generator=torch.Generator().manual_seed(0)).tolist()]
    assert torch.equal(keep[positions], reference_mask(5, "big", 0, n, 0.3, positions))
    assert not torch.equal(keep, M.drop.keep_mask(ctx, 1, n, 0.3))  # each model its own mask
    ones = torch.ones(n)
    dropped = call("dare", [ones + 1], ones, 1.0, ctx, p=0.3)  # τ = 1 everywhere
    assert abs(float((dropped - 1).mean()) - 1.0) < 0.005  # the rescale keeps the expected task vector


def test_tsd_golden_and_stock(call):
    base = torch.zeros(4, 4)
    models = [SUDOKU_A.clone(), SUDOKU_B.clone()]
    ctx = ctx_for(key="k", shape=(4, 4))
    assert torch.equal(call("tsd", models, base, ctx=ctx, p=0.0, k=0.5), SUDOKU_COUNT)
    # stock: τ1 = [1, 0], τ2 = [1, 1]: cos = 1/√2, t = 2c/(1+c) = 2(√2 − 1); ties_soup gives [1, 1]
    t = 2 * (math.sqrt(2) - 1)
    got = call("tsd", [torch.tensor([1., 0.]), torch.tensor([1., 1.])], torch.zeros(2),
               ctx=ctx_for(key="k", shape=(2,)), p=0.0, stock=True)
    torch.testing.assert_close(got, torch.tensor([t, t]), rtol=1e-6, atol=0)
    assert torch.equal(call("tsd", models, base, ctx=ctx, p=1.0), base)


def test_tsd_masks_then_ties_soup(call):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 4, generator=g)
    taus = [torch.randn(6, 4, generator=g) for _ in range(3)]
    ctx = ctx_for(key="k2", seed=3, shape=(6, 4))
    masked = [t * reference_mask(3, "k2", i, 24, 0.25).view(6, 4) for i, t in enumerate(taus)]
    expected = call("ties_soup", [base + t for t in masked], base, 0.8, ctx)
    torch.testing.assert_close(call("tsd", [base + t for t in taus], base, 0.8, ctx, p=0.25), expected,
                               rtol=1e-6, atol=1e-6)


# ---- Model Stock ------------------------------------------------------------------------------------

def test_model_stock_two_models_golden(call):
    t = 2 * (math.sqrt(2) - 1)  # cos = 1/√2
    base = torch.tensor([1., 1.])
    got = call("model_stock", [base + torch.tensor([1., 0.]), base + torch.tensor([1., 1.])], base)
    torch.testing.assert_close(got, base + t * torch.tensor([1., 0.5]), rtol=1e-6, atol=0)


def test_model_stock_averages_all_pairs_not_consecutive_ones(call):
    # cos12 = 0, cos13 = cos23 = 1/√2: all pairs c = √2/3 (consecutive pairs would give √2/4)
    taus = [torch.tensor([1., 0., 0.]), torch.tensor([0., 1., 0.]), torch.tensor([1., 1., 0.])]
    c = math.sqrt(2) / 3
    t = 3 * c / (1 + 2 * c)
    got = call("model_stock", taus, torch.zeros(3))
    torch.testing.assert_close(got, torch.tensor([2 / 3, 2 / 3, 0.]) * t, rtol=1e-6, atol=0)


def test_model_stock_row_granularity_and_negative_cosine(call):
    base = torch.zeros(2, 2)
    t1 = torch.tensor([[1., 0.], [1., 1.]])
    t2 = torch.tensor([[1., 1.], [-1., -1.]])  # row 0: cos 1/√2; row 1: cos −1 -> t = 0
    got = call("model_stock", [t1, t2], base, granularity="row")
    t = 2 * (math.sqrt(2) - 1)
    torch.testing.assert_close(got, torch.tensor([[t, 0.5 * t], [0., 0.]]), rtol=1e-6, atol=0)
    # tensor granularity: one cosine over all 4 entries: (1 + 0 − 1 − 1) / (√3·2) < 0 -> t = 0: the base
    assert torch.equal(call("model_stock", [t1, t2], base), base)


def test_model_stock_guards(call):
    base = torch.zeros(2)
    # the singularity: three unit vectors 120° apart, c = −1/2, 1 + 2c = 0 -> t = 0
    s = math.sqrt(3) / 2
    taus = [torch.tensor([1., 0.]), torch.tensor([-0.5, s]), torch.tensor([-0.5, -s])]
    assert torch.equal(call("model_stock", taus, base), base)
    gram = M.model_stock.gram(taus)
    assert float(M.model_stock.model_stock_t(gram)) == 0.0
    # a zero task vector: its pairs count as cosine 0; with 2 models c = 0 -> t = 0
    assert torch.equal(call("model_stock", [torch.tensor([1., 2.]), torch.zeros(2)], base), base)
    # 3 models, one zero: c = (cos12 + 0 + 0) / 3 with cos12 = 1 -> c = 1/3, t = 1/(1 + 2/3) = 0.6
    got = call("model_stock", [torch.tensor([1., 2.]), torch.tensor([2., 4.]), torch.zeros(2)], base)
    torch.testing.assert_close(got, 0.6 * torch.tensor([1., 2.]), rtol=1e-6, atol=0)
    # 0-d tensors: cos = ±1
    assert float(call("model_stock", [torch.tensor(2.0), torch.tensor(3.0)], torch.tensor(0.0))) == 2.5


def test_model_stock_block_granularity_reads_the_block_gram(call):
    taus = [torch.tensor([1., 0.]), torch.tensor([0., 1.])]  # orthogonal in this key...
    block_gram = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=torch.float64)  # ...but c = 1/2 over the block
    got = call("model_stock", taus, torch.zeros(2), ctx=ctx_for(stats={"block_gram": block_gram}),
               granularity="block")
    torch.testing.assert_close(got, (2 * 0.5 / 1.5) * torch.tensor([0.5, 0.5]), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="block statistics"):
        call("model_stock", taus, torch.zeros(2), granularity="block")


def test_methods_needing_two_fine_tunes_refuse_one(call):
    with pytest.raises(ValueError, match="at least 2"):
        call("model_stock", [torch.ones(2)], torch.zeros(2))
    with pytest.raises(ValueError, match="at least 2"):
        call("tsd", [torch.ones(2)], torch.zeros(2), ctx=ctx_for(shape=(2,)), stock=True)


# ---- ExPO -------------------------------------------------------------------------------------------

def test_expo_golden_and_equal_to_add_difference(call):
    ft, base = torch.tensor([2., 4.]), torch.tensor([1., 1.])
    assert call("expo", [ft], base, 0.5).tolist() == [2.5, 5.5]
    assert torch.equal(call("expo", [ft], base, 0.0), ft)
    g = torch.Generator().manual_seed(2)
    ft, base = torch.randn(64, generator=g), torch.randn(64, generator=g)
    assert torch.equal(call("expo", [ft], base, 0.37), call("add_difference", [ft, ft], base, 0.37))


def test_inputs_untouched_unless_writable(call):
    base = torch.tensor([1., 2., 3.])
    models = [torch.tensor([2., 2., 2.]), torch.tensor([0., 4., 3.])]
    before = [m.clone() for m in models], base.clone()
    for name in ("task_arithmetic", "ties", "ties_soup", "dare", "tsd", "model_stock"):
        call(name, models, base, 0.5, ctx_for(key="k", shape=(3,)))
        assert all(torch.equal(a, b) for a, b in zip(models, before[0])) and torch.equal(base, before[1]), name


@pytest.mark.parametrize("p", [0.0, 1e-9, 0.1, 0.3, 1 / 3, 0.5, 0.9, 0.99999994, 0.99999999, 1.0])
def test_keep_mask_is_the_draws_compared_with_p(p):
    n = 3 * 2**17 + 5  # several pieces, an odd length
    ctx = ctx_for(key="model.k", seed=9, shape=(n,), offset=0)
    draws = M.drop.uniform_draws(ctx, 1, n)
    assert torch.equal(M.drop.keep_mask(ctx, 1, n, p), draws >= p)
    assert float(draws.min()) >= 0.0 and float(draws.max()) < 1.0
    assert abs(float(draws.mean()) - 0.5) < 0.003  # uniform: mean 1/2, variance 1/12
    assert abs(float(draws.var()) - 1 / 12) < 0.002
