"""The compiled kernels (merge_methods/kernels.py): their conversions are torch's, their Model Stock is the
torch form's bits for the same Gram matrix, and the engine uses them, errors included."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file, save_file

import merge_lab_methods as M
from merge_lab.engine import Recipe, merge_to_state_dict
from merge_lab.errors import MergeLabError
from merge_lab_methods import kernels
from merge_lab_methods.model_stock import gram, model_stock, model_stock_raw_merge, pairwise_cosines
from merge_lab_methods.registry import KeyContext

FORMATS = [torch.float16, torch.bfloat16, torch.float32]


def test_the_kernels_are_available_and_convert_as_torch_does():
    # numba is a dependency: a machine where the kernels are off runs every merge the slow way, so this
    # fails rather than skips
    module = kernels.compiled()
    assert module is not None
    assert kernels._self_test(module) is None  # every fp16 and bf16 pattern, and fp32 values back


def test_the_switch_turns_them_off(monkeypatch):
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    assert kernels.compiled() is None
    assert model_stock_raw_merge([torch.zeros(4)] * 2, torch.zeros(4), torch.empty(4), 1.0,
                                 KeyContext(shape=(4,)), "tensor") is None


def family(n_models, numel, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=g)
    base[:5] = torch.tensor([0.0, -0.0, 1e-7, -3e-6, 6e-5])  # zeros and fp16 subnormals
    shared = torch.randn(numel, generator=g) * 0.02
    models = [(base + shared + 0.01 * torch.randn(numel, generator=g)).to(dtype) for _ in range(n_models)]
    return models, base.to(dtype)


@pytest.mark.parametrize("n_models", [2, 3, 5])
@pytest.mark.parametrize("in_dtype", FORMATS)
@pytest.mark.parametrize("out_dtype", FORMATS)
def test_compiled_model_stock_is_the_torch_forms_bits(n_models, in_dtype, out_dtype):
    numel = 3 * 2048 + 77  # blocks of the Gram kernel and a remainder
    models, base = family(n_models, numel, in_dtype)
    taus = [m.float() - base.float() for m in models]
    stats = {"gram": gram(taus)}
    ctx = KeyContext(shape=(numel,), stats=stats)
    for ratio in (1.0, 0.37, -0.5):
        want = model_stock([m.float() for m in models], base.float(), ratio, ctx, granularity="tensor")
        got = torch.empty(numel, dtype=out_dtype)
        assert model_stock_raw_merge(models, base, got, ratio, ctx, "tensor") is True
        assert torch.equal(got, want.to(out_dtype)), (ratio, (got.float() != want.to(out_dtype).float()).sum())


def test_compiled_gram_gives_the_cosines_within_1e_6():
    models, base = family(4, 100_003, torch.float16, seed=3)
    got = torch.zeros(4, 4, dtype=torch.float64)
    kernels.compiled().gram(*kernels.raw_views(models, base)[:2], got.numpy())
    exact = gram([m.double() - base.double() for m in models])
    assert torch.equal(got, got.T)
    torch.testing.assert_close(pairwise_cosines(got), pairwise_cosines(exact), rtol=0, atol=1e-6)
    torch.testing.assert_close(got.diagonal(), exact.diagonal(), rtol=1e-5, atol=0)
    # NaN or inf in an input shows in the diagonal (the engine's cue to check the inputs)
    models[1][10] = float("inf")
    nan = torch.zeros(4, 4, dtype=torch.float64)
    kernels.compiled().gram(*kernels.raw_views(models, base)[:2], nan.numpy())
    assert not torch.isfinite(nan[1, 1])


def test_declines_what_it_does_not_cover():
    models, base = family(2, 100, torch.float16)
    ctx = KeyContext(shape=(100,))
    out = torch.empty(100, dtype=torch.float16)
    assert model_stock_raw_merge(models, base, out, 1.0, ctx, "block") is None
    assert model_stock_raw_merge([models[0], models[1].float()], base, out, 1.0, ctx, "tensor") is None  # a mix
    assert model_stock_raw_merge(models, base, out.to(torch.float64), 1.0, ctx, "tensor") is None
    assert model_stock_raw_merge(models, base, out, 0.0, ctx, "tensor") is None  # the base: the torch form


def counting(monkeypatch, name, field):
    """Count the calls of the method's compiled `field` ("statistics" or "merge") that did not decline."""
    method = M.registry.REGISTRY[name]
    calls = []
    original = getattr(method.compiled, field)

    def counted(*args, **kwargs):
        result = original(*args, **kwargs)
        calls.append(result is not None)
        return result

    compiled = dataclasses.replace(method.compiled, **{field: counted})
    monkeypatch.setitem(M.registry.REGISTRY, name, dataclasses.replace(method, compiled=compiled))
    return calls


def test_the_engine_merges_model_stock_with_the_kernels(sd1_family, monkeypatch):
    from merge_lab.engine import chunking

    base, fts = sd1_family
    recipe = Recipe(models=[str(p) for p in fts], base=str(base), method="model_stock", alpha=0.8)
    monkeypatch.setattr(chunking, "SLICE_ELEMENTS", 300)  # keys of several slices: statistics first
    monkeypatch.setattr(chunking, "MIN_SLICE_ELEMENTS", 1)
    merges = counting(monkeypatch, "model_stock", "merge")
    statistics = counting(monkeypatch, "model_stock", "statistics")
    compiled = merge_to_state_dict(recipe).state_dict
    assert sum(merges) > 100 and sum(statistics) > 100
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    reference = merge_to_state_dict(recipe).state_dict
    assert set(compiled) == set(reference)
    same = total = 0
    for key, want in reference.items():
        got = compiled[key]
        assert got.dtype == want.dtype
        # t comes from the compiled Gram matrix (shorter float32 blocks): an fp16 ulp apart at most
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-3, atol=1e-6)
        same += int((got == want).sum())
        total += want.numel()
    assert same / total > 0.99


def test_an_fp16_overflow_in_the_kernel_is_the_one_line_error(sd1_family, tmp_path, monkeypatch):
    base, fts = sd1_family
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    paths = []
    for index, (path, value) in enumerate([(base, 64000.0), *zip(fts, (65000.0, 65100.0, 65200.0))]):
        tensors = load_file(path)
        tensors[key] = torch.full_like(tensors[key], value)
        tensors[key].view(-1)[0] -= 64 * index  # not all equal: a defined cosine
        paths.append(tmp_path / f"m{index}.safetensors")
        save_file(tensors, paths[-1])
    merges = counting(monkeypatch, "model_stock", "merge")
    recipe = Recipe(models=[str(p) for p in paths[1:]], base=str(paths[0]), method="model_stock", alpha=2.0)
    with pytest.raises(MergeLabError, match="the merged value is NaN or inf") as info:
        merge_to_state_dict(recipe)
    assert key in str(info.value) and "\n" not in str(info.value)
    assert any(merges)


TIES_CASES = [
    ("ties_soup", {}),
    ("ties_soup", {"election": "mass", "scale": 0.7}),
    ("ties", {"k": 1.0}),
    ("tsd", {}),
    ("tsd", {"p": 0.5, "election": "mass"}),
    ("tsd", {"p": 0.0}),
]


@pytest.mark.parametrize("name, params", TIES_CASES)
@pytest.mark.parametrize("in_dtype", FORMATS)
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("weights", [None, (1.0, -0.5, 2.0)])
def test_compiled_ties_soup_and_tsd_are_the_torch_forms_bits(name, params, in_dtype, out_dtype, weights):
    method = M.registry.get_method(name)
    full = method.normalize_params(params)
    numel = 2 * 2048 + 301
    models, base = family(3, numel, in_dtype, seed=7)
    models[2][:50] = base[:50]  # zero task-vector entries: ties of the vote
    for offset in (0, 4097):  # a slice of a bigger tensor: the masks of those elements
        ctx = KeyContext(key="k.weight", seed=11, shape=(numel + offset,), offset=offset, weights=weights)
        want = method.fn([m.float() for m in models], base.float(), 0.8, ctx, **full).to(out_dtype)
        got = torch.empty(numel, dtype=out_dtype)
        assert method.compiled.merge(models, base, got, 0.8, ctx, **full) is True
        assert torch.equal(got, want), (offset, int((got != want).sum()))


@pytest.mark.parametrize("name, params", [("ties", {}), ("ties_soup", {"k": 0.5}), ("tsd", {"rescale": True}),
                                          ("tsd", {"stock": True}), ("tsd", {"p": 1.0}),
                                          ("tsd", {"combine": "geometric_median"})])
def test_the_ties_kernels_decline_what_they_do_not_cover(name, params):
    method = M.registry.get_method(name)
    models, base = family(2, 100, torch.float16)
    out = torch.empty(100, dtype=torch.float16)
    ctx = KeyContext(shape=(100,))
    assert method.compiled.merge(models, base, out, 1.0, ctx, **method.normalize_params(params)) is None


@pytest.mark.parametrize("name", ["ties_soup", "tsd"])
def test_the_engine_merges_ties_soup_and_tsd_with_the_kernels_to_the_same_bits(name, sd1_family, monkeypatch):
    from merge_lab.engine import chunking

    base, fts = sd1_family
    recipe = Recipe(models=[str(p) for p in fts], base=str(base), method=name, alpha=0.8, seed=5)
    monkeypatch.setattr(chunking, "SLICE_ELEMENTS", 300)
    monkeypatch.setattr(chunking, "MIN_SLICE_ELEMENTS", 1)
    merges = counting(monkeypatch, name, "merge")
    compiled = merge_to_state_dict(recipe).state_dict
    assert sum(merges) > 100
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    reference = merge_to_state_dict(recipe).state_dict
    assert set(compiled) == set(reference)
    for key in reference:
        assert torch.equal(compiled[key], reference[key]), key


# ---- fp8 and the weighted sum ---------------------------------------------------------------------------
FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.dtype.itemsize])


def test_fp8_conversions_are_torchs():
    # every fp8 pattern to float32; float32 back as the engine's to_output_dtype (saturate, nearest even),
    # ties and values beyond the largest finite one included
    assert kernels._self_test_fp8(kernels.compiled()) is None
    values = torch.tensor([1000.0, -1000.0, float("inf"), 0.0, -0.0, 2.0 ** -10, 1.0625, 1.1875])
    for dtype in FP8:
        out = torch.empty(values.numel(), dtype=dtype)
        kernels.compiled().from_float32(values.numpy(), kernels.bits_view(out))
        limit = torch.finfo(dtype).max
        assert torch.equal(_bits(out), _bits(values.clamp(-limit, limit).to(dtype)))


@pytest.mark.parametrize("in_dtype", [*FORMATS, *FP8])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.float32, *FP8])
def test_compiled_weighted_sum_is_torch_lerps_bits(in_dtype, out_dtype):
    from merge_lab.engine.executor import to_output_dtype
    from merge_lab_methods.basic import _raw_weighted_sum, weighted_sum

    numel = 4099
    (a, b), _ = family(2, numel, in_dtype, seed=5)
    for ratio in (0.0, 0.25, 0.4999, 0.5, 0.8, 1.0, -0.3, 1.6):
        want = to_output_dtype(weighted_sum([a.float(), b.float()], None, ratio, KeyContext(shape=(numel,))),
                               out_dtype)
        got = torch.empty(numel, dtype=out_dtype)
        assert _raw_weighted_sum([a, b], None, got, ratio, KeyContext(shape=(numel,))) is True
        assert torch.equal(_bits(got), _bits(want)), (ratio, int((_bits(got) != _bits(want)).sum()))
    # N models and other weights: the torch form
    assert _raw_weighted_sum([a, b, a], None, got, 0.5, KeyContext()) is None
    assert _raw_weighted_sum([a, b], None, got, 0.5, KeyContext(weights=(1.0, 1.0))) is None


@pytest.mark.parametrize("out_dtype", FP8)
def test_compiled_model_stock_on_fp8_is_the_torch_forms_bits(out_dtype):
    from merge_lab.engine.executor import to_output_dtype

    numel = 2 * 2048 + 13
    models, base = family(3, numel, torch.float8_e4m3fn, seed=2)
    ctx = KeyContext(shape=(numel,), stats={"gram": gram([m.float() - base.float() for m in models])})
    want = to_output_dtype(model_stock([m.float() for m in models], base.float(), 1.0, ctx, granularity="tensor"),
                           out_dtype)
    got = torch.empty(numel, dtype=out_dtype)
    assert model_stock_raw_merge(models, base, got, 1.0, ctx, "tensor") is True
    assert torch.equal(_bits(got), _bits(want))


@pytest.mark.parametrize("method", ["weighted_sum", "model_stock"])
def test_the_engine_merges_an_fp8_flux_file_with_the_kernels_to_the_torch_forms_bytes(method, tmp_path,
                                                                                       monkeypatch):
    from merge_lab import archs
    from merge_lab.demo.models import base_state_dict, finetune_state_dict

    base = base_state_dict(archs.layout_for("flux-dev", width=8, vocab=64), 0, torch.bfloat16)
    paths = []
    for i, state in enumerate((base, finetune_state_dict(base, 1, 0), finetune_state_dict(base, 2, 0))):
        fp8 = {k: v.to(torch.float8_e4m3fn) if v.dim() >= 2 and k.startswith("model.diffusion_model.") else v
               for k, v in state.items()}
        paths.append(tmp_path / f"f{i}.safetensors")
        save_file(fp8, str(paths[-1]))
    if method == "weighted_sum":
        recipe = Recipe(models=[str(paths[1]), str(paths[2])], method=method, alpha=0.3)
    else:
        recipe = Recipe(models=[str(paths[1]), str(paths[2])], base=str(paths[0]), method=method)
    merges = counting(monkeypatch, method, "merge")
    compiled = merge_to_state_dict(recipe).state_dict
    assert sum(merges) > 50
    monkeypatch.setenv(kernels.ENV_SWITCH, "0")
    reference = merge_to_state_dict(recipe).state_dict
    assert set(compiled) == set(reference)
    fp8_keys = 0
    for key, want in reference.items():
        assert compiled[key].dtype == want.dtype
        if method == "weighted_sum":
            assert torch.equal(_bits(compiled[key]), _bits(want)), key
        elif want.dtype != torch.float8_e4m3fn:
            # t from the compiled Gram matrix, whose vectorized sums round as the CPU's vector width orders
            # them (an AVX2 EPYC flipped one bf16 step of one VAE element): one step apart at most
            got = compiled[key]
            torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=0, msg=key)
            assert (_bits(got) != _bits(want)).float().mean() < 0.01, key
        else:  # the same, one fp8 step apart at most
            torch.testing.assert_close(compiled[key].float(), want.float(), rtol=0.13, atol=2 ** -9)
        fp8_keys += want.dtype == torch.float8_e4m3fn
    assert fp8_keys > 50


@pytest.mark.parametrize("dtype", FP8)
def test_fp8_finiteness_is_read_off_the_bytes_for_every_pattern(dtype):
    from merge_lab.engine.loader import _all_finite

    patterns = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype)
    for i in range(256):
        t = torch.zeros(300, dtype=dtype)
        t[137] = patterns[i]
        assert _all_finite(t) == bool(torch.isfinite(t.float()).all()), i
        assert kernels.fp8_all_finite(t) == _all_finite(t)
