"""Invariants of the issue-8 methods on random small tensors (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import merge_lab_methods as methods

M = methods
# derandomize: the same cases on every run and in CI (no flaky first sighting of a case there)
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None)


@st.composite
def tensors(draw, count=1, min_dims=1, max_dims=3):
    dims = draw(st.integers(min_dims, max_dims))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=dims, max_size=dims)))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    return [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(count)]


def close(a, b, tol=1e-7):
    torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@SETTINGS
@given(tensors(4), st.floats(0.0, 1.0), st.sampled_from(["della", "della_linear", "breadcrumbs",
                                                          "breadcrumbs_ties", "sce"]))
def test_sparse_methods_at_ratio_0_and_without_sparsity(call, ts, ratio, name):
    base, models = ts[0], ts[1:]
    close(call(name, models, base, 0.0), base)
    keep_all = {"della": {"density": 1.0}, "della_linear": {"density": 1.0}, "breadcrumbs": {"density": 1.0},
                "breadcrumbs_ties": {"density": 1.0}, "sce": {"select_topk": 1.0}}[name]
    got = call(name, models, base, ratio, **keep_all)
    if name in ("della_linear", "breadcrumbs"):  # nothing dropped: task arithmetic
        close(got, call("task_arithmetic", models, base, ratio))
    elif name != "sce":  # nothing dropped: TIES without trimming
        close(got, call("ties", models, base, ratio, k=1.0, election="mass"))
    else:  # every entry of τ* lies between the smallest and the largest agreeing τᵢ (at ratio 1: dividing
        # (got − base) by a tiny ratio would only measure rounding)
        taus = torch.stack([m - base for m in models])
        lo, hi = taus.min(0).values.clamp(max=0), taus.max(0).values.clamp(min=0)
        delta = call(name, models, base, 1.0, **keep_all) - base
        assert bool(((delta >= lo - 1e-9) & (delta <= hi + 1e-9)).all())
        close(got, base + ratio * delta)


@SETTINGS
@given(tensors(3), st.integers(0, 1000), st.floats(0.05, 0.95))
def test_della_keeps_only_entries_of_the_task_vectors(call, ts, seed, density):
    base, models = ts[0], ts[1:]
    epsilon = min(density, 1 - density) / 2
    got = call("della_linear", [models[0]], base, 1.0, seed=seed, density=density, epsilon=epsilon, rescale=False)
    tau = models[0] - base
    kept = got - base
    assert bool(((kept == 0) | torch.isclose(kept, tau)).all())


@SETTINGS
@given(tensors(3), st.floats(0.0, 1.0), st.sampled_from(["multislerp", "karcher"]))
def test_sphere_methods_of_identical_models_return_them(call, ts, ratio, name):
    x = ts[0]
    close(call(name, [x.clone(), x.clone(), x.clone()], None, ratio), x, 1e-6)


@SETTINGS
@given(tensors(3), st.sampled_from(["multislerp", "karcher"]), st.lists(st.floats(0.1, 3.0), min_size=3,
                                                                        max_size=3))
def test_sphere_methods_keep_the_weighted_mean_norm(call, ts, name, weights):
    # Each tensor is turned into the half-space of the first (<xᵢ, x₁> >= 0), so the directions never
    # cancel out: the weighted mean direction is at least as long as its projection on x₁/‖x₁‖, which is
    # >= w₁ >= 0.1 / 6.1.
    ts = [t if float((t * ts[0]).sum()) >= 0 else -t for t in ts]
    got = call(name, ts, None, 1.0, weights=tuple(weights))
    w = torch.tensor(weights, dtype=torch.float64) / sum(weights)
    norms = torch.stack([t.norm() for t in ts])
    mean_direction = sum(wi * t / t.norm() for wi, t in zip(w, ts))
    assert float(mean_direction.norm()) >= float(w[0]) - 1e-12
    close(got.norm(), (w * norms).sum(), 1e-6)


@SETTINGS
@given(tensors(3), st.sampled_from(["tensor", "row", "column"]))
def test_nuslerp_endpoints_and_symmetry(call, ts, granularity):
    a, b, base = ts
    for with_base in (None, base):
        close(call("nuslerp", [a, b], with_base, 0.0, granularity=granularity), a)
        close(call("nuslerp", [a, b], with_base, 1.0, granularity=granularity), b)
        close(call("nuslerp", [a, b], with_base, 0.3, granularity=granularity),
              call("nuslerp", [b, a], with_base, 0.7, granularity=granularity), 1e-6)


@SETTINGS
@given(tensors(2), st.floats(0.0, 1.0))
def test_nearswap_limits(call, ts, ratio):
    base, other = ts
    close(call("nearswap", [other], base, ratio, t=0.0), base)  # nothing is near: the base
    close(call("nearswap", [other], base, ratio, t=1e9), base + ratio * (other - base))  # all near: lerp
    got = call("nearswap", [other], base, 1.0, t=0.5)
    assert bool(((got - base).abs() <= torch.minimum((other - base).abs(), torch.tensor(0.5)) + 1e-9).all())


@SETTINGS
@given(tensors(4))
def test_geometric_median_is_symmetric_and_not_worse_than_the_mean(call, ts):
    got = call("geometric_median", ts, None, 1.0)
    close(call("geometric_median", ts[::-1], None, 1.0), got, 1e-6)
    mean = torch.stack(ts).mean(0)

    def objective(m):
        return sum(float((t - m).norm()) for t in ts)

    assert objective(got) <= objective(mean) + 1e-9
