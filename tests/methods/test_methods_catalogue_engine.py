"""The issue-8 methods end to end: `merge-lab merge` on tiny checkpoints, each output checked against the
method applied directly to the whole tensors; chunked merges equal whole ones; task negation."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import merge_lab_methods as methods
from merge_lab.engine import Recipe, merge_to_state_dict
from tests.helpers import mergeable

M = methods

# (method, params, models used, with --base, weights)
CASES = [
    ("della", {"density": 0.6, "epsilon": 0.2}, 3, True, None),
    ("della_linear", {"density": 0.5, "epsilon": 0.1, "rescale": False}, 3, True, None),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.05}, 3, True, None),
    ("breadcrumbs_ties", {"density": 0.8, "gamma": 0.05, "election": "count"}, 3, True, None),
    ("sce", {"select_topk": 0.5}, 3, True, None),
    ("sce", {}, 3, True, None),
    ("multislerp", {}, 3, False, [1.0, 2.0, 1.0]),
    ("multislerp", {}, 3, True, None),
    ("karcher", {"max_iter": 20}, 3, False, None),
    ("nuslerp", {"granularity": "tensor"}, 2, False, None),
    ("nuslerp", {"granularity": "row"}, 2, True, None),
    ("nuslerp", {"granularity": "column"}, 2, False, None),
    ("nearswap", {"t": 0.01}, 1, True, None),
    ("geometric_median", {}, 3, False, None),
    ("geometric_median", {"max_iter": 50}, 3, True, [1.0, 1.0, 2.0]),
    ("tsd", {"combine": "geometric_median", "p": 0.2}, 3, True, None),
    ("tsd", {"combine": "geometric_median", "p": 0.2, "k": 0.5}, 3, True, None),  # trims: whole tensors
    ("task_arithmetic", {}, 2, True, [1.0, -1.0]),
    ("ties", {"k": 0.5}, 2, True, [-1.0, 0.5]),
    ("iso_c", {}, 3, True, None),
    ("iso_c", {}, 2, True, [1.0, 0.5]),
    ("tsv_merge", {}, 3, True, None),
    # SuperMerger's modes and sd-mecha's add-opposite merges (merge_methods/supermerger.py)
    ("train_difference", {}, 3, False, None),
    ("train_difference", {}, 2, True, None),
    ("smooth_add", {}, 3, False, None),
    ("add_opposite", {}, 3, False, None),
    ("add_strict_opposite", {}, 2, True, None),
    ("triple_sum", {"beta": 0.2}, 3, False, None),
    ("sum_twice", {}, 2, True, None),
    ("cosine_a", {}, 2, False, None),
    ("cosine_b", {"sim_range": "params", "sim_min": 0.2, "sim_max": 0.99}, 2, False, None),
    ("tensor_swap", {"beta": 0.1}, 2, False, None),
    ("tensor_swap2", {"beta": 0.0}, 2, False, None),
    ("extract", {}, 3, False, None),
    ("extract", {"beta": 1.0, "gamma": 2.0}, 2, True, None),
]
IDS = [f"{m}-{'-'.join(f'{k}={v}' for k, v in p.items()) or 'defaults'}{'-base' if b else ''}"
       for m, p, _, b, _ in CASES]


def direct(method, params, models, base, ratio, key, seed, weights, model_wide=None):
    """The method on whole float32 tensors, as the engine's plan would call it (no chunks, no statistics but
    a model-wide one, given)."""
    ctx = M.KeyContext(key=key, seed=seed, shape=tuple(models[0].shape),
                       weights=tuple(weights) if weights is not None else None,
                       stats=None if model_wide is None else {"model_wide": model_wide})
    full = {p.name: p.default for p in M.get_method(method).params} | params
    return M.get_method(method)(models, base, ratio, ctx, **full)


@pytest.mark.parametrize("method, params, n, with_base, weights", CASES, ids=IDS)
def test_merge_command_end_to_end(sd1_family, tmp_path, run_cli, method, params, n, with_base, weights):
    base, fts = sd1_family
    out = tmp_path / "out.safetensors"
    argv = ["merge", "--models", *fts[:n], "--method", method, "--alpha", "0.7", "--seed", "3",
            "--out", out, "--no-progress"]
    if with_base:
        argv += ["--base", base]
    if weights is not None:
        argv += ["--weights", ",".join(f"{w:g}" for w in weights)]
    for name, value in params.items():
        argv += ["--param", f"{name}={str(value).lower() if isinstance(value, bool) else value}"]
    code, _, err = run_cli(*argv)
    assert code == 0, err
    with safe_open(out, "pt") as f:
        recipe = json.loads(f.metadata()["sd_merge_recipe"])
    assert recipe["method"] == method and all(recipe["params"][k] == v for k, v in params.items())
    merged, B, T = load_file(out), load_file(base), [load_file(p) for p in fts[:n]]
    assert set(merged) == set(T[0])
    # Every merged key of every rank (0-d, 1-D biases, 2-D, 4-D convolutions) against the method applied
    # directly to the whole float32 tensors; outputs are fp16 like the inputs.
    checked = changed = 0
    model_wide = None
    found = M.get_method(method)
    full = {p.name: p.default for p in found.params} | params
    if found.uses_model_wide_statistics(full):  # from every merged key of the inputs, as the engine's first pass
        pairs = (([t[key].float() for t in T], B[key].float() if with_base else None)
                 for key, first in T[0].items() if mergeable(key, first, "sd1"))
        model_wide = found.statistics.model_wide(pairs, **full)
    for key, first in T[0].items():
        if not mergeable(key, first, "sd1"):
            assert torch.equal(merged[key], first), key
            continue
        expected = direct(method, params, [t[key].float() for t in T], B[key].float() if with_base else None,
                          0.7, key, 3, weights, model_wide)
        torch.testing.assert_close(merged[key].float(), expected.half().float(), rtol=2e-3, atol=2e-3,
                                   msg=lambda m, key=key: f"{key}: {m}")
        checked += 1
        changed += not torch.equal(merged[key], (B if with_base else T[0])[key])
    assert checked > 1000 and changed > checked // 2


# the cases that stream with statistics, keep 1-D tensors whole, or draw seeded masks
CHUNKED = [i for i, case in enumerate(CASES) if case[0] not in ("nearswap", "task_arithmetic", "ties", "breadcrumbs")]


@pytest.mark.parametrize("method, params, n, with_base, weights", [CASES[i] for i in CHUNKED],
                         ids=[IDS[i] for i in CHUNKED])
def test_chunked_merge_equals_whole(sd1_family, method, params, n, with_base, weights):
    base, fts = sd1_family

    def recipe(**extra):
        return Recipe(models=[str(p) for p in fts[:n]], base=str(base) if with_base else None, method=method,
                      params=params, alpha=0.7, seed=3, weights=weights, **extra)

    whole = merge_to_state_dict(recipe()).state_dict
    chunked = merge_to_state_dict(recipe(memory_budget="1MB", threads=4)).state_dict
    for key in whole:  # statistics summed over chunks of rows differ from whole-tensor ones by rounding
        torch.testing.assert_close(chunked[key].float(), whole[key].float(), rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("method, params", [("task_arithmetic", {}), ("ties", {"k": 1.0}), ("ties_soup", {}),
                                            ("dare", {"p": 0.0}), ("della_linear", {"density": 1.0}),
                                            ("breadcrumbs", {"density": 1.0})])
def test_task_negation_removes_a_models_change(sd1_fp32_family, method, params):
    """Negation: with --weights -1 the merge subtracts the fine-tune's change (base − τ), and adding the
    fine-tune back with weight 1 to a model that was built from it removes its change exactly."""
    base, (ft, _) = sd1_fp32_family
    B, F = load_file(base), load_file(ft)
    negated = merge_to_state_dict(Recipe(models=[str(ft)], base=str(base), method=method, params=params,
                                         alpha=1.0, weights=[-1.0])).state_dict
    for key, b in B.items():
        if mergeable(key, b, "sd1"):
            torch.testing.assert_close(negated[key], 2 * b - F[key], rtol=1e-5, atol=1e-6)
    # base + τ − τ: the fine-tune, then its own change taken away again, is the base
    removed = merge_to_state_dict(Recipe(models=[str(ft), str(ft)], base=str(base), method="task_arithmetic",
                                         alpha=1.0, weights=[1.0, -1.0])).state_dict
    for key, b in B.items():
        if mergeable(key, b, "sd1"):
            torch.testing.assert_close(removed[key], b, rtol=0, atol=1e-6)


def test_negative_weights_on_the_command_line(sd1_fp32_family, tmp_path, run_cli):
    base, (a, b) = sd1_fp32_family
    out = tmp_path / "negated.safetensors"
    code, _, err = run_cli("merge", "--models", a, b, "--base", base, "--method", "task_arithmetic",
                           "--weights", "-1,1", "--alpha", "1", "--out", out, "--no-progress")
    assert code == 0, err
    merged, B, A, Bm = load_file(out), load_file(base), load_file(a), load_file(b)
    for key, t in B.items():
        if mergeable(key, t, "sd1"):
            torch.testing.assert_close(merged[key], t - (A[key] - t) + (Bm[key] - t), rtol=1e-5, atol=1e-6)
    # barycentric methods refuse negative weights with a one-line error
    code, _, err = run_cli("merge", "--models", a, b, "--method", "multislerp", "--weights", "-1,1",
                           "--out", tmp_path / "x.safetensors", "--no-progress")
    assert code == 2 and "negative" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.safetensors").exists()
