"""The method declarations: Params checked against the functions' signatures at registration, the engine hooks
grouped by concern, and method families (one definition registered under several names)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import merge_lab_methods as M
from merge_lab_methods.registry import (
    REGISTRY,
    Chunking,
    Compiled,
    KeyContext,
    MergeMethod,
    Param,
    Statistics,
    Variant,
    check_signatures,
    merge_method,
)


@pytest.fixture
def scratch_registry(monkeypatch):
    """REGISTRY as it is, restored after the test (the methods the test registers go away)."""
    monkeypatch.setattr(M.registry, "REGISTRY", dict(REGISTRY))
    return M.registry.REGISTRY


K = Param("k", float, 0.5, "a parameter")


def test_every_registered_method_matches_its_declaration():
    assert len({m.name for m in REGISTRY.values()}) >= 20
    for method in REGISTRY.values():
        check_signatures(method)
        assert isinstance(method.chunking, Chunking)
        assert isinstance(method.statistics, Statistics)
        assert isinstance(method.compiled, Compiled)


def test_a_declared_param_the_function_lacks_fails_at_registration(scratch_registry):
    with pytest.raises(TypeError, match=r"merge method 'bad': declared parameter 'k' is not a keyword parameter "
                                        r"of its fn .*bad\(models, base, ratio, ctx\)"):
        @merge_method("bad", summary="x", params=(K,))
        def bad(models, base, ratio, ctx):
            return models[0]
    assert "bad" not in scratch_registry


def test_a_function_parameter_without_a_param_fails_at_registration(scratch_registry):
    with pytest.raises(TypeError, match=r"merge method 'bad': its fn .*takes 'gamma', which no declared Param "
                                        r"gives"):
        @merge_method("bad", summary="x", params=(K,))
        def bad(models, base, ratio, ctx, k, gamma):
            return models[0]
    with pytest.raises(TypeError, match="takes 'gamma'"):  # a default does not excuse it: it could never be set
        @merge_method("bad", summary="x", params=(K,))
        def bad_default(models, base, ratio, ctx, k, gamma=1.0):
            return models[0]
    with pytest.raises(TypeError, match=r"fn .* must take \(models, base, ratio, ctx, \*\*params\)"):
        @merge_method("bad", summary="x")
        def too_few(models, base):
            return models[0]
    with pytest.raises(TypeError, match="parameter 'k' declared twice"):
        @merge_method("bad", summary="x", params=(K, K))
        def twice(models, base, ratio, ctx, k):
            return models[0]
    assert "bad" not in scratch_registry


def test_the_hooks_must_take_the_declared_params(scratch_registry):
    def fn(models, base, ratio, ctx, k):
        return models[0]

    def statistics(models, base, ctx):  # no k
        return {}

    with pytest.raises(TypeError, match=r"merge method 'bad': declared parameter 'k' is not a keyword parameter "
                                        r"of its statistics.fn"):
        merge_method("bad", summary="x", params=(K,), statistics=Statistics(statistics))(fn)

    def merge(models, base, out, ratio, ctx, k, extra):  # a parameter no Param gives
        return None

    with pytest.raises(TypeError, match=r"its compiled.merge .*takes 'extra'"):
        merge_method("bad", summary="x", params=(K,), compiled=Compiled(merge=merge))(fn)

    def from_partial(partial, base, ratio, ctx, **params):  # **params takes them all
        return partial

    def any_statistics(models, base, ctx, k, unused=None):  # an optional extra is harmless in a hook
        return {}

    merge_method("good", summary="x", params=(K,),
                 statistics=Statistics(any_statistics, merge_from_partial=from_partial))(fn)
    assert scratch_registry["good"].statistics.merge_from_partial is from_partial
    assert "bad" not in scratch_registry


def test_a_flat_hook_is_refused_with_its_group(scratch_registry):
    def fn(models, base, ratio, ctx):
        return models[0]

    with pytest.raises(TypeError, match=r"merge method 'bad': statistics= takes a Statistics\(\.\.\.\)"):
        merge_method("bad", summary="x", statistics=lambda models, base, ctx: {})(fn)
    with pytest.raises(TypeError, match="unexpected keyword argument 'raw_merge'"):
        merge_method("bad", summary="x", raw_merge=None)(fn)


def test_a_simple_method_declares_no_hooks():
    method = REGISTRY["add_difference"]
    assert method.chunking == Chunking() and method.statistics == Statistics() and method.compiled == Compiled()
    params = method.normalize_params({})
    assert method.chunkable(params) and not method.keeps_whole((3,)) and not method.needs_statistics(params, (3,))
    assert method.stages(params, torch.float32) == 1 and not method.uses_block_statistics(params)


def test_the_grouped_hooks_answer_the_engine():
    stock = REGISTRY["model_stock"]
    assert stock.statistics.reveal_nonfinite and stock.statistics.merge_from_partial is not None
    assert stock.compiled.statistics is not None and stock.compiled.merge is not None
    assert stock.uses_block_statistics({"granularity": "block"}) and not stock.uses_block_statistics(
        {"granularity": "tensor"})
    assert REGISTRY["della"].keeps_whole((7,)) and not REGISTRY["della"].keeps_whole((7, 2))
    ties = REGISTRY["ties"]
    assert ties.needs_statistics(ties.normalize_params({}), (1000,))
    assert ties.stages(ties.normalize_params({}), torch.float32) > 1
    breadcrumbs = REGISTRY["breadcrumbs"]
    assert not breadcrumbs.chunkable(breadcrumbs.normalize_params({}))
    assert breadcrumbs.chunkable(breadcrumbs.normalize_params({"density": 1.0}))


def declaration(method: MergeMethod) -> dict:
    """What the front ends read of a method, besides its functions."""
    return {f.name: getattr(method, f.name) for f in dataclasses.fields(method)
            if f.name not in ("fn", "check", "chunking", "statistics", "compiled")}


def test_ties_and_ties_soup_are_one_definition_with_two_sets_of_defaults():
    ties, soup = REGISTRY["ties"], REGISTRY["ties_soup"]
    assert ties.fn is soup.fn and ties.statistics == soup.statistics and ties.compiled == soup.compiled
    assert [(p.name, p.default) for p in ties.params] == [("k", 0.2), ("scale", 1.0), ("election", "mass")]
    assert [(p.name, p.default) for p in soup.params] == [("k", 1.0), ("scale", 1.0), ("election", "count")]
    assert [dataclasses.replace(p, default=None) for p in ties.params] == [
        dataclasses.replace(p, default=None) for p in soup.params]
    assert soup.summary.startswith("TIES-SOUP") and ties.summary.startswith("TIES:")
    generator = torch.Generator().manual_seed(0)
    models = [torch.randn(6, 5, generator=generator) for _ in range(3)]
    base = torch.randn(6, 5, generator=generator)
    ctx = KeyContext(shape=(6, 5))
    assert torch.equal(soup(models, base, 0.8, ctx), ties(models, base, 0.8, ctx, k=1.0, election="count"))


@pytest.mark.parametrize("full, reduced", [("della", "della_linear"), ("breadcrumbs_ties", "breadcrumbs")])
def test_the_sum_variants_are_their_ties_methods_with_no_election(full, reduced):
    a, b = REGISTRY[full], REGISTRY[reduced]
    assert [p for p in a.params if p.name != "election"] == list(b.params)
    assert declaration(a) | {"name": None, "summary": None, "params": None} == declaration(b) | {
        "name": None, "summary": None, "params": None}
    assert a.chunking.whole_1d == b.chunking.whole_1d
    params = b.normalize_params({"density": 0.6})
    assert a.chunkable({**params, "election": "mass"}) == b.chunkable(params)
    generator = torch.Generator().manual_seed(1)
    models = [torch.randn(6, 5, generator=generator) for _ in range(3)]
    base = torch.randn(6, 5, generator=generator)
    ctx = KeyContext(shape=(6, 5), seed=3)
    got = b(models, base, 0.7, ctx, density=0.6)
    assert torch.equal(got, a.fn([m.clone() for m in models], base, 0.7, ctx, **params, election=None))
    assert not torch.equal(got, a(models, base, 0.7, ctx, density=0.6))  # the election changes the result


def test_a_variant_names_only_declared_params(scratch_registry):
    def fn(models, base, ratio, ctx, k):
        return models[0]

    with pytest.raises(TypeError, match=r"merge method 'v': its defaults name 'q', which is not a parameter of "
                                        r"base \(k\)"):
        merge_method("base", summary="x", params=(K,), variants=(Variant("v", "y", defaults={"q": 1}),))(fn)
    with pytest.raises(TypeError, match=r"merge method 'v': default of k: k must be a number"):
        merge_method("base", summary="x", params=(K,), variants=(Variant("v", "y", defaults={"k": "a"}),))(fn)
    with pytest.raises(RuntimeError, match="merge method 'ties_soup' registered twice"):
        merge_method("base", summary="x", params=(K,), variants=(Variant("ties_soup", "y"),))(fn)
    assert "base" not in scratch_registry and "v" not in scratch_registry


def test_a_fixed_parameter_is_bound_and_seen_by_the_params_hooks(scratch_registry):
    seen = []

    def fn(models, base, ratio, ctx, k, mode):
        return models[0] * k + (1.0 if mode == "one" else 0.0)

    def check(params, n_models):
        seen.append(dict(params))

    merge_method("family", summary="x", params=(K, Param("mode", str, "one", choices=("one", "zero"))), check=check,
                 variants=(Variant("family_zero", "y", fixed={"mode": "zero"}),))(fn)
    zero = scratch_registry["family_zero"]
    assert [p.name for p in zero.params] == ["k"]
    assert zero.normalize_params({}) == {"k": 0.5}  # the recorded params: the variant's own
    zero.check_params(zero.normalize_params({}), 2)
    assert seen == [{"k": 0.5, "mode": "zero"}]
    x = torch.ones(2)
    assert torch.equal(zero([x, x]), x * 0.5)
    assert torch.equal(scratch_registry["family"]([x, x]), x * 0.5 + 1)
    with pytest.raises(ValueError, match="has no parameter 'mode'"):
        zero.normalize_params({"mode": "one"})
