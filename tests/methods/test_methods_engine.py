"""Task-vector methods through the engine: every method end to end, chunking, threads, seeds, block
statistics, non-float keys, and the clear errors."""

import itertools
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import merge_lab_methods as methods
from merge_lab.engine import Recipe, merge_to_file, merge_to_state_dict, prepare
from merge_lab.errors import MergeLabError, RecipeError
from tests.helpers import expected_block, mergeable

M = methods

# (method, params, models used: 1 or 3) — every task-vector method and its main options
CASES = [
    ("task_arithmetic", {}, 3),
    ("ties", {}, 3),
    ("ties", {"k": 1.0, "election": "count"}, 3),
    ("ties_soup", {}, 3),
    ("dare", {}, 3),
    ("dare", {"combine": "ties", "k": 0.5, "rescale": False}, 3),
    ("tsd", {}, 3),
    ("tsd", {"stock": True}, 3),
    ("model_stock", {}, 3),
    ("model_stock", {"granularity": "row"}, 3),
    ("model_stock", {"granularity": "block"}, 3),
    ("expo", {}, 1),
]


def recipe_for(family, method, params, n, **extra):
    base, fts = family
    return Recipe(models=[str(p) for p in fts[:n]], base=str(base), method=method, params=params,
                  alpha=extra.pop("alpha", 0.7), **extra)


@pytest.mark.parametrize("method, params, n", CASES, ids=[f"{m}-{'-'.join(map(str, p.values()))}" for m, p, _ in CASES])
def test_every_method_chunked_equals_unchunked(sd1_family, method, params, n):
    whole = merge_to_state_dict(recipe_for(sd1_family, method, params, n)).state_dict
    recipe = recipe_for(sd1_family, method, params, n, memory_budget="1MB", threads=8)
    with prepare(recipe, hash_inputs=False) as plan:
        assert plan.method.chunkable(plan.params)  # every one, TIES trimming included
        assert max(len(t.chunks) for t in plan.tasks if t.action == "merge") > 1
        trims = plan.params.get("k", 1.0) < 1 and plan.params.get("combine", "ties") == "ties"
        if trims:  # the whole-tensor thresholds come from a radix select over the chunks
            assert any(t.needs_stats for t in plan.tasks)
        chunked = merge_to_state_dict(recipe, plan=plan).state_dict
    statistics = bool(params.get("stock")) or (method == "model_stock" and
                                               params.get("granularity", "tensor") == "tensor")
    assert set(whole) == set(chunked)
    base, fts = sd1_family
    first, B = load_file(fts[0]), load_file(base)
    changed = 0
    for key, tensor in first.items():  # non-float and never-merged keys are copied from the first model
        if not mergeable(key, tensor, "sd1"):
            assert torch.equal(whole[key], tensor) and whole[key].dtype == tensor.dtype, key
        elif not torch.equal(whole[key], B[key]):
            changed += 1
    assert changed > 1000  # and the merge changed (almost) every other key
    for key in whole:
        if statistics:
            torch.testing.assert_close(chunked[key].float(), whole[key].float(), rtol=2e-3, atol=1e-6)
        else:
            assert torch.equal(chunked[key], whole[key]), key


def test_task_arithmetic_and_ties_match_a_direct_computation(sd1_fp32_family):
    base, fts = sd1_fp32_family
    B, T = load_file(base), [load_file(p) for p in fts]
    out = merge_to_state_dict(Recipe(models=[str(p) for p in fts], base=str(base), method="task_arithmetic",
                                     alpha=1.0, blocks="FLAT_25", weights=[1.0, -0.5])).state_dict
    soup = merge_to_state_dict(Recipe(models=[str(p) for p in fts], base=str(base), method="ties_soup",
                                      alpha=1.0, params={"scale": 0.5})).state_dict
    for key, b in B.items():
        if not mergeable(key, b, "sd1"):
            continue
        ratio = 0.0 if expected_block(key, "sd1") in ("BASE", "VAE") else 0.25
        tau = (T[0][key].double() - b.double()) - 0.5 * (T[1][key].double() - b.double())
        torch.testing.assert_close(out[key].double(), b.double() + ratio * tau, rtol=1e-5, atol=1e-6)
        taus = torch.stack([t[key].double() - b.double() for t in T])
        sign = taus.sign().sum(0).sign()
        agree = (taus.sign() == sign) & (sign != 0)
        expected = b.double() + 0.5 * (taus * agree).sum(0) / agree.sum(0).clamp(min=1)
        torch.testing.assert_close(soup[key].double(), expected, rtol=1e-5, atol=1e-6)


def test_drop_masks_ignore_threads_chunking_and_key_order(sd1_family, tmp_path):
    results = []
    for threads, budget in ((1, None), (4, "1MB")):
        results.append(merge_to_state_dict(recipe_for(sd1_family, "dare", {"p": 0.5}, 3, seed=42, threads=threads,
                                                      memory_budget=budget)).state_dict)
    for other in results[1:]:
        assert all(torch.equal(results[0][k], other[k]) for k in results[0])
    torch.set_num_threads(1)
    try:
        one_thread = merge_to_state_dict(recipe_for(sd1_family, "tsd", {"p": 0.3}, 3, seed=42)).state_dict
    finally:
        torch.set_num_threads(2)
    again = merge_to_state_dict(recipe_for(sd1_family, "tsd", {"p": 0.3}, 3, seed=42, threads=3)).state_dict
    assert all(torch.equal(one_thread[k], again[k]) for k in again)
    # A mask is a function of (seed, key, model index, position) only, so key order cannot matter; the
    # seed, the key and the model index each change it.
    k = "model.diffusion_model.middle_block.1.proj_in.weight"
    mask = M.drop.keep_mask(M.KeyContext(key=k, seed=42, shape=(64, 64)), 1, 4096, 0.5)
    assert torch.equal(mask, M.drop.keep_mask(M.KeyContext(key=k, seed=42, shape=(64, 64)), 1, 4096, 0.5))
    for other in (M.KeyContext(key=k, seed=43, shape=(64, 64)), M.KeyContext(key=k + "x", seed=42, shape=(64, 64))):
        assert not torch.equal(mask, M.drop.keep_mask(other, 1, 4096, 0.5))
    assert not torch.equal(mask, M.drop.keep_mask(M.KeyContext(key=k, seed=42, shape=(64, 64)), 0, 4096, 0.5))


def test_seed_is_stored_and_part_of_the_fingerprint(sd1_family, tmp_path):
    out = tmp_path / "dare.safetensors"
    r1 = merge_to_file(recipe_for(sd1_family, "dare", {"p": 0.2}, 3, seed=7, out=str(out)))
    with safe_open(out, "pt") as f:
        recipe = json.loads(f.metadata()["sd_merge_recipe"])
    assert recipe["seed"] == 7 and recipe["method"] == "dare" and recipe["params"]["p"] == 0.2
    assert recipe["params"]["rescale"] is True and recipe["params"]["combine"] == "sum"
    r2 = merge_to_file(recipe_for(sd1_family, "dare", {"p": 0.2}, 3, seed=8, out=str(tmp_path / "8.safetensors")))
    assert r1.fingerprint != r2.fingerprint


def test_model_stock_block_uses_the_concatenated_block_vectors(sd1_fp32_family):
    base, fts = sd1_fp32_family
    out = merge_to_state_dict(Recipe(models=[str(p) for p in fts], base=str(base), method="model_stock",
                                     params={"granularity": "block"}, alpha=0.8, block={"VAE": 0.3})).state_dict
    B, T = load_file(base), [load_file(p) for p in fts]
    vectors: dict[str, list[list[torch.Tensor]]] = {}
    for key, b in B.items():
        if mergeable(key, b, "sd1"):
            vectors.setdefault(expected_block(key, "sd1"), [[], []])
            for i in range(2):
                vectors[expected_block(key, "sd1")][i].append((T[i][key].double() - b.double()).flatten())
    t_of = {}
    for block, (v1, v2) in vectors.items():
        a, c = torch.cat(v1), torch.cat(v2)
        cos = float(a @ c / (a.norm() * c.norm()))
        t_of[block] = 2 * cos / (1 + cos) if cos > 0 else 0.0
    assert len(t_of) == 29 and all(0.3 < t < 0.9 for t in t_of.values())
    for key, b in B.items():
        if mergeable(key, b, "sd1"):
            block = expected_block(key, "sd1")
            ratio = 0.3 if block == "VAE" else 0.8
            mean = (T[0][key].double() + T[1][key].double()) / 2 - b.double()
            expected = b.double() + ratio * t_of[block] * mean
            torch.testing.assert_close(out[key].double(), expected, rtol=1e-5, atol=1e-6)


def test_model_stock_tensor_matches_a_float64_computation(sd1_fp32_family):
    base, fts = sd1_fp32_family
    out = merge_to_state_dict(Recipe(models=[str(p) for p in fts], base=str(base), method="model_stock",
                                     alpha=1.0)).state_dict
    B, T = load_file(base), [load_file(p) for p in fts]
    for key, b in B.items():
        if mergeable(key, b, "sd1"):
            a, c = (T[i][key].double().flatten() - b.double().flatten() for i in range(2))
            cos = float(a @ c / (a.norm() * c.norm()))
            t = 2 * cos / (1 + cos) if cos > 0 else 0.0
            expected = b.double() + t * (T[0][key].double() + T[1][key].double() - 2 * b.double()) / 2
            torch.testing.assert_close(out[key].double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["sd1_family", "sd1_fp32_family"])
def test_model_stock_merges_from_the_kept_sum_with_the_same_bits(family, request, monkeypatch):
    """Keys of several slices merge from the Σ τᵢ their statistics pass kept (the fine-tunes are converted
    once); the result is the same bits as converting them again, fp16 (our copies) and fp32 inputs alike."""
    import dataclasses

    from merge_lab.engine import chunking

    monkeypatch.setenv("MERGE_LAB_KERNELS", "0")  # the torch form (the compiled one keeps no partial)
    registry = M.registry
    base, fts = request.getfixturevalue(family)
    recipe = Recipe(models=[str(p) for p in fts], base=str(base), method="model_stock", alpha=0.8)
    monkeypatch.setattr(chunking, "SLICE_ELEMENTS", 300)  # every key of more than 300 elements: several slices
    monkeypatch.setattr(chunking, "MIN_SLICE_ELEMENTS", 1)
    method = registry.REGISTRY["model_stock"]
    calls = []

    def counted(partial, *args, **kwargs):
        calls.append(partial.numel())
        return method.statistics.merge_from_partial(partial, *args, **kwargs)

    def merging_from_partial(merge_from_partial):
        statistics = dataclasses.replace(method.statistics, merge_from_partial=merge_from_partial)
        return dataclasses.replace(method, statistics=statistics)

    monkeypatch.setitem(registry.REGISTRY, "model_stock", merging_from_partial(counted))
    kept = merge_to_state_dict(recipe).state_dict
    assert len(calls) > 100  # one call per slice of the keys of several slices
    monkeypatch.setitem(registry.REGISTRY, "model_stock", merging_from_partial(None))
    again = merge_to_state_dict(recipe).state_dict
    assert set(kept) == set(again)
    for key in kept:
        assert torch.equal(kept[key], again[key]), key


def test_clear_errors(sd1_family, tmp_path):
    base, fts = sd1_family
    with pytest.raises(RecipeError, match="model_stock needs at least 2 fine-tuned models besides the base"):
        Recipe(models=[str(fts[0])], base=str(base), method="model_stock").validate()
    with pytest.raises(RecipeError, match="tsd with stock=true needs at least 2"):
        Recipe(models=[str(fts[0])], base=str(base), method="tsd", params={"stock": "true"}).validate()
    with pytest.raises(RecipeError, match="needs a base model"):
        Recipe(models=[str(p) for p in fts], method="ties").validate()
    with pytest.raises(RecipeError, match="takes no per-model weights"):
        Recipe(models=[str(p) for p in fts], base=str(base), method="model_stock", weights=[1, 1, 2]).validate()
    with pytest.raises(RecipeError, match="takes at most 1"):
        Recipe(models=[str(p) for p in fts], base=str(base), method="expo").validate()
    with pytest.raises(RecipeError, match="k must be <= 1"):
        Recipe(models=[str(p) for p in fts], base=str(base), method="ties", params={"k": 1.5}).validate()
    with pytest.raises(RecipeError, match="election must be one of mass, count"):
        Recipe(models=[str(p) for p in fts], base=str(base), method="ties", params={"election": "sum"}).validate()
    with pytest.raises(RecipeError, match="p must be <= 1"):
        Recipe(models=[str(p) for p in fts], base=str(base), method="dare", params={"p": 2}).validate()


def test_block_statistics_pass_reports_progress_and_is_cancellable(sd1_family):
    import threading

    seen = []
    merge_to_state_dict(recipe_for(sd1_family, "model_stock", {"granularity": "block"}, 2),
                        progress=lambda done, total, key: seen.append((done, total)))
    assert seen[-1][0] == seen[-1][1] and len({t for _, t in seen}) == 1
    assert all(a <= b for (a, _), (b, _) in itertools.pairwise(seen))
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(MergeLabError, match="cancelled"):
        merge_to_state_dict(recipe_for(sd1_family, "model_stock", {"granularity": "block"}, 2), cancel=cancel)


def test_sdxl_model_stock_per_block(sdxl_family):
    result = merge_to_state_dict(recipe_for(sdxl_family, "model_stock", {"granularity": "block"}, 3))
    base = load_file(sdxl_family[0])
    assert len(result.state_dict) == 2515
    k = "conditioner.embedders.1.model.transformer.resblocks.3.mlp.c_fc.weight"  # block TE2
    assert not torch.equal(result.state_dict[k], base[k])


def test_ties_trimming_in_chunks_is_exact_in_float64(sd1_family):
    """float64 thresholds take four radix passes of 16 bits; chunks still give the whole tensor's bits."""
    recipe = recipe_for(sd1_family, "ties", {"k": 0.3}, 3, precision="float64", dtype="fp32")
    whole = merge_to_state_dict(recipe).state_dict
    with prepare(recipe.replace(memory_budget="1MB", threads=8), hash_inputs=False) as plan:
        assert plan.method.stages(plan.params, plan.compute_dtype) == 4
        assert any(t.needs_stats for t in plan.tasks)
        chunked = merge_to_state_dict(plan.recipe, plan=plan).state_dict
    for key in whole:
        assert torch.equal(chunked[key], whole[key]), key
