"""Invariants of the methods, on random small tensors (hypothesis)."""

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import merge_lab_methods as methods

M = methods
SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def tensors(draw, count=1, min_dims=0, max_dims=3):
    dims = draw(st.integers(min_dims, max_dims))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=dims, max_size=dims)))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(count)]


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@SETTINGS
@given(tensors(2), st.sampled_from(["mass", "count"]), st.sampled_from(["ties", "ties_soup"]))
def test_ties_with_one_model_and_k_1_returns_it(call, pair, election, name):
    model, base = pair
    close(call(name, [model], base, k=1.0, election=election), model)


@SETTINGS
@given(tensors(4), st.sampled_from(["tensor", "row"]), st.integers(2, 3))
def test_model_stock_with_identical_fine_tunes_returns_them(call, ts, granularity, n):
    model, base = ts[0], ts[1]
    close(call("model_stock", [model.clone() for _ in range(n)], base, granularity=granularity), model)


@SETTINGS
@given(tensors(2), st.integers(2, 3))
def test_weighted_sum_ratio_0_and_1_return_an_input(call, pair, n):
    a, b = pair
    models = [a, b] + [b.clone() for _ in range(n - 2)]
    assert torch.equal(call("weighted_sum", models, a, 0.0), a)
    assert torch.equal(call("weighted_sum", [a, b], a, 1.0), b)


@SETTINGS
@given(tensors(4), st.floats(0, 1), st.sampled_from(["mass", "count"]), st.integers(0, 2**32))
def test_tsd_with_p_0_equals_ties_soup(call, ts, k, election, seed):
    *models, base = ts
    ctx = M.KeyContext(key="k", seed=seed, shape=tuple(base.shape))
    assert torch.equal(call("tsd", models, base, 0.6, ctx, p=0.0, k=k, election=election),
                       call("ties_soup", models, base, 0.6, ctx, k=k, election=election))


@SETTINGS
@given(tensors(3), st.integers(0, 2**32))
def test_dare_with_p_0_is_task_arithmetic(call, ts, seed):
    *models, base = ts
    ctx = M.KeyContext(key="k", seed=seed, shape=tuple(base.shape))
    assert torch.equal(call("dare", models, base, 0.8, ctx, p=0.0), call("task_arithmetic", models, base, 0.8, ctx))


@SETTINGS
@given(tensors(4), st.sampled_from(["task_arithmetic", "ties", "ties_soup", "dare", "tsd", "model_stock"]))
def test_ratio_0_leaves_the_base_untouched(call, ts, name):
    *models, base = ts
    assert torch.equal(call(name, models, base, 0.0), base)


@SETTINGS
@given(tensors(4), st.floats(0.05, 1), st.sampled_from(["mass", "count"]))
def test_ties_entries_lie_within_the_task_vectors(call, ts, k, election):
    *models, base = ts
    merged = call("ties", models, base, k=k, election=election) - base
    taus = torch.stack([m - base for m in models])
    low, high = taus.min(0).values.clamp(max=0), taus.max(0).values.clamp(min=0)
    assert bool(((merged >= low - 1e-5) & (merged <= high + 1e-5)).all())


@SETTINGS
@given(tensors(4), st.sampled_from(["mass", "count"]))
def test_untrimmed_ties_follows_the_elected_sign(call, ts, election):
    *models, base = ts
    merged = call("ties", models, base, k=1.0, election=election) - base
    taus = torch.stack([m - base for m in models])
    sign = (taus.sum(0) if election == "mass" else taus.sign().sum(0)).sign()
    agreeing = (taus.sign() == sign) & (sign != 0)
    expected = (taus * agreeing).sum(0) / agreeing.sum(0).clamp(min=1)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)
    assert bool(((merged == 0) | (merged.sign() == sign)).all())
    assert bool((merged[sign == 0] == 0).all())


@SETTINGS
@given(tensors(3), st.floats(0.05, 1))
def test_ties_is_symmetric_in_the_models(call, ts, k):
    a, b, base = ts
    close(call("ties", [a, b], base, k=k), call("ties", [b, a], base, k=k))


@SETTINGS
@given(tensors(5, min_dims=1), st.integers(2, 4))
def test_model_stock_t_is_between_0_and_1(ts, n):
    gram = M.model_stock.gram(ts[:n])
    t = float(M.model_stock.model_stock_t(gram))
    assert 0.0 <= t <= 1.0 + 1e-12


@SETTINGS
@given(st.integers(1, 3 * 2**16 + 17), st.data(), st.integers(0, 2**40), st.floats(0, 1))
def test_drop_mask_of_a_chunk_is_the_slice_of_the_whole(numel, data, seed, p):
    start = data.draw(st.integers(0, numel - 1))
    count = data.draw(st.integers(0, numel - start))
    whole_ctx = M.KeyContext(key="model.k", seed=seed, shape=(numel,))
    chunk_ctx = M.KeyContext(key="model.k", seed=seed, shape=(numel,), offset=start)
    # counter based: a chunk's mask is the same stretch of the whole tensor's mask, wherever the chunk starts
    lo = max(0, start - 3)
    region = M.drop.keep_mask(M.KeyContext(key="model.k", seed=seed, shape=(numel,), offset=lo), 2,
                              min(numel, start + count + 3) - lo, p)
    assert torch.equal(M.drop.keep_mask(chunk_ctx, 2, count, p), region[start - lo:start - lo + count])
    if numel <= 2**17:
        assert torch.equal(M.drop.keep_mask(whole_ctx, 2, numel, p)[start:start + count],
                           M.drop.keep_mask(chunk_ctx, 2, count, p))


def test_gram_for_cosines_gives_the_same_angles():
    g = torch.Generator().manual_seed(7)
    base = torch.randn(3 * 2**16 + 11, generator=g)
    shared = torch.randn(base.shape, generator=g)
    for n in (2, 3, 8, 9):  # pair by pair up to DOT_MAX_VECTORS, the exact product above
        vs = [0.5 * shared + torch.randn(base.shape, generator=g) * (i + 1) for i in range(n)]
        fast, exact = M.model_stock.gram_for_cosines(vs), M.model_stock.gram(vs)
        assert fast.dtype == torch.float64 and (n > M.model_stock.DOT_MAX_VECTORS or torch.equal(fast, fast.T))
        torch.testing.assert_close(fast, exact, rtol=1e-5, atol=0)
        torch.testing.assert_close(M.model_stock.pairwise_cosines(fast), M.model_stock.pairwise_cosines(exact),
                                   rtol=0, atol=1e-6)
        assert abs(float(M.model_stock.model_stock_t(fast)) - float(M.model_stock.model_stock_t(exact))) < 1e-6


@SETTINGS
@given(tensors(3, min_dims=1))
def test_gram_matches_float64(ts):
    gram = M.model_stock.gram(ts)
    flat = torch.stack([t.double().reshape(-1) for t in ts])
    torch.testing.assert_close(gram, flat @ flat.T, rtol=1e-6, atol=1e-9)
    cos = M.model_stock.pairwise_cosines(gram)
    assert all(-1.0 <= c <= 1.0 or math.isnan(c) for c in cos.tolist())


@SETTINGS
@given(st.integers(1, 2 * 2**14 + 9), st.integers(1, 40), st.data(), st.floats(0, 1))
def test_drop_of_many_models_at_once_is_each_models_own_mask(numel, n_models, data, p):
    # drop_ draws the masks of all models together, in pieces that shrink with the model count: each model
    # must still get exactly its own keep mask, for a chunk anywhere in the tensor
    offset = data.draw(st.integers(0, 2**20))
    ctx = M.KeyContext(key="model.k", seed=3, shape=(offset + numel,), offset=offset)
    g = torch.Generator().manual_seed(numel)
    taus = [torch.randn(numel, generator=g) for _ in range(n_models)]
    expected = [tau * M.drop.keep_mask(ctx, i, numel, p) for i, tau in enumerate(taus)]
    dropped = M.drop.drop_([tau.clone() for tau in taus], ctx, p, rescale=False)
    assert all(torch.equal(d, e) for d, e in zip(dropped, expected))
