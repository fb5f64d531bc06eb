"""The streaming engine: exact results, block ratios on the right keys, copies, metadata, chunking."""

import hashlib
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from merge_lab.engine import Recipe, merge_to_file, merge_to_state_dict
from tests.helpers import expected_block, mergeable


def ws_reference(a, b, r):
    """(1−r)·A + r·B in float32, written as torch.lerp computes it, cast back to the input dtype."""
    return torch.lerp(a.float(), b.float(), r).to(a.dtype)


def test_weighted_sum_is_bit_exact(sd1_family, tmp_path):
    _, (a, b, _) = sd1_family
    out = tmp_path / "ws.safetensors"
    merge_to_file(Recipe(models=[str(a), str(b)], alpha=0.3, out=str(out)))
    A, B, O = load_file(a), load_file(b), load_file(out)
    assert set(O) == set(A)
    merged = 0
    for k, t in A.items():
        assert O[k].dtype == t.dtype and O[k].shape == t.shape, k
        if mergeable(k, t, "sd1"):
            assert torch.equal(O[k], ws_reference(t, B[k], 0.3)), k
            merged += 1
        else:
            assert torch.equal(O[k], t), k  # never-merged and integer keys copied unchanged
    assert merged == len(A) - 1  # all but position_ids
    assert O["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64


@pytest.mark.parametrize("arch_fixture, arch", [("sd1_family", "sd1"), ("sdxl_family", "sdxl")])
def test_block_ratios_reach_the_right_keys(arch_fixture, arch, request, tmp_path):
    _, (a, b, _) = request.getfixturevalue(arch_fixture)
    n = 26 if arch == "sd1" else 20
    values = [round((i + 1) / (n + 2), 4) for i in range(n)]
    named = {"TIME": 0.9, "VAE": 0.05} if arch == "sd1" else {"TE2": 0.95, "OUT": 0.0}
    out = tmp_path / "mbw.safetensors"
    merge_to_file(Recipe(models=[str(a), str(b)], blocks=",".join(map(str, values)), block=named, out=str(out)))
    names = (["BASE"] + [f"IN{i:02d}" for i in range(n // 2 - 1)] + ["M00"]
             + [f"OUT{i:02d}" for i in range(n // 2 - 1)])
    ratio = dict(zip(names, values))
    ratio.update({"TIME": ratio["IN00"], "OUT": ratio[names[-1]], "VAE": ratio["BASE"], "TE1": ratio["BASE"],
                  "TE2": ratio["BASE"]})
    ratio.update(named)
    A, B, O = load_file(a), load_file(b), load_file(out)
    counts = {}
    for k, t in A.items():
        block = expected_block(k, arch)
        if mergeable(k, t, arch):
            assert torch.equal(O[k], ws_reference(t, B[k], ratio[block])), (k, block)
            counts[block] = counts.get(block, 0) + 1
        else:
            assert torch.equal(O[k], t)
    assert len(counts) == len(ratio) - (1 if arch == "sdxl" else 2)  # sd1 has no TE1/TE2; sdxl no BASE keys


def test_add_difference_three_models_and_base_form(sd1_family, tmp_path):
    base, (a, b, _) = sd1_family
    out1, out2 = tmp_path / "ad1.safetensors", tmp_path / "ad2.safetensors"
    merge_to_file(Recipe(models=[str(a), str(b), str(base)], method="add_difference", alpha=0.7, out=str(out1)))
    merge_to_file(Recipe(models=[str(a), str(b)], base=str(base), method="add_difference", alpha=0.7,
                         out=str(out2)))
    A, B, C = load_file(a), load_file(b), load_file(base)
    O1, O2 = load_file(out1), load_file(out2)
    for k, t in A.items():
        if mergeable(k, t, "sd1"):
            expected = (t.float() + (B[k].float() - C[k].float()) * 0.7).half()
            assert torch.equal(O1[k], expected), k
        assert torch.equal(O1[k], O2[k])


def force_small_units(monkeypatch, unit=1500, slice_=300):
    """Tiny test tensors would fit one unit and one slice: make both small to exercise the splitting."""
    from merge_lab.engine import chunking

    monkeypatch.setattr(chunking, "UNIT_MAX_ELEMENTS", unit)
    monkeypatch.setattr(chunking, "SLICE_ELEMENTS", slice_)
    monkeypatch.setattr(chunking, "MIN_SLICE_ELEMENTS", 1)


def test_in_memory_merge_equals_file_and_chunking_changes_no_bit(sd1_family, tmp_path, monkeypatch):
    _, (a, b, c) = sd1_family
    for method, models in (("weighted_sum", [a, b]), ("slerp", [a, c]), ("add_difference", [a, b, c])):
        whole = tmp_path / f"{method}-whole.safetensors"
        merge_to_file(Recipe(models=[str(m) for m in models], method=method, alpha=0.4, out=str(whole)))
        with monkeypatch.context() as m:
            force_small_units(m)
            # 1 MB over 128 units in flight: keys above ~1400 elements are split into row chunks, so
            # slerp's whole-tensor statistics are gathered over chunks in a first pass
            chunked = merge_to_state_dict(Recipe(models=[str(m) for m in models], method=method, alpha=0.4,
                                                 threads=64, memory_budget="1MB"))
        W = load_file(whole)
        assert set(W) == set(chunked.state_dict)
        for k in W:
            if method == "slerp":  # whole-tensor dot products summed per chunk: fp32 rounding at most
                torch.testing.assert_close(chunked.state_dict[k].float(), W[k].float(), rtol=1e-3, atol=1e-4)
            else:
                assert torch.equal(chunked.state_dict[k], W[k]), k


def test_chunking_really_splits(sd1_family, monkeypatch):
    from merge_lab.engine import prepare

    _, (a, b, _) = sd1_family
    with prepare(Recipe(models=[str(a), str(b)])) as plan:
        assert max(len(t.chunks) for t in plan.tasks) == 1
    with prepare(Recipe(models=[str(a), str(b)], memory_budget="1MB", threads=64)) as plan:
        # 128 units in flight share 1 MB: 8 KB each, so every tensor above ~1400 elements is split
        assert max(len(t.chunks) for t in plan.tasks) > 1
    with prepare(Recipe(models=[str(a), str(b)], method="slerp", memory_budget="1MB", threads=64)) as plan:
        assert any(t.needs_stats for t in plan.tasks)
    force_small_units(monkeypatch)
    with prepare(Recipe(models=[str(a), str(b)], method="slerp")) as plan:
        assert not any(t.needs_stats for t in plan.tasks)  # whole keys fit the budget: one read each


def test_slerp_matches_an_independent_float64_computation(sd1_fp32_family, tmp_path):
    _, (a, b) = sd1_fp32_family
    out = tmp_path / "slerp.safetensors"
    merge_to_file(Recipe(models=[str(a), str(b)], method="slerp", alpha=0.35, out=str(out)))
    A, B, O = load_file(a), load_file(b), load_file(out)
    t = 0.35
    for k, x in A.items():
        if not mergeable(k, x, "sd1"):
            continue
        x64, y64 = x.double().flatten(), B[k].double().flatten()
        na, nb = x64.norm(), y64.norm()
        omega = torch.arccos((x64 @ y64 / (na * nb)).clamp(-1, 1))
        direction = (torch.sin((1 - t) * omega) * x64 / na + torch.sin(t * omega) * y64 / nb) / torch.sin(omega)
        expected = (direction * ((1 - t) * na + t * nb)).reshape(x.shape)
        torch.testing.assert_close(O[k].double(), expected, rtol=1e-5, atol=1e-6)


def test_dtype_option_and_default(sd1_family, tmp_path):
    _, (a, b, _) = sd1_family
    out = tmp_path / "bf16.safetensors"
    merge_to_file(Recipe(models=[str(a), str(b)], dtype="bf16", out=str(out)))
    O = load_file(out)
    A = load_file(a)
    for k, t in A.items():
        assert O[k].dtype == (torch.bfloat16 if mergeable(k, t, "sd1") else t.dtype), k
    out32 = tmp_path / "fp32.safetensors"
    merge_to_file(Recipe(models=[str(a), str(b)], dtype="fp32", precision="float64", out=str(out32)))
    O32 = load_file(out32)
    k = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    expected = torch.lerp(A[k].double(), load_file(b)[k].double(), 0.5).float()
    assert torch.equal(O32[k], expected)


def test_metadata_round_trip(sd1_family, tmp_path):
    _, (a, b, _) = sd1_family
    out = tmp_path / "meta.safetensors"
    result = merge_to_file(Recipe(models=[str(a), str(b)], alpha=0.25, block={"VAE": 0}, seed=7, out=str(out)))
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    recipe = json.loads(meta["sd_merge_recipe"])
    assert recipe["type"] == "merge-lab" and recipe["method"] == "weighted_sum"
    assert recipe["models"] == [os.path.basename(a), os.path.basename(b)]
    assert recipe["alpha"] == 0.25 and recipe["ratios"]["VAE"] == 0 and recipe["ratios"]["IN03"] == 0.25
    assert recipe["recipe_hash"] == result.fingerprint
    models = json.loads(meta["sd_merge_models"])
    for path in (a, b):
        data = path.read_bytes()
        sha = hashlib.sha256(data).hexdigest()
        assert models[sha]["name"] == os.path.basename(path)
        assert models[sha]["legacy_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    assert meta["modelspec.architecture"] == "stable-diffusion-v1"
    assert meta["modelspec.title"] == "meta"
    whole = out.read_bytes()
    assert result.sha256 == hashlib.sha256(whole).hexdigest() and result.autov2 == result.sha256[:10]
    # The recipe read back from the file is a valid recipe object again.
    again = Recipe(models=[str(a), str(b)], **{k: recipe[k] for k in ("method", "alpha", "block", "seed")})
    again.validate()


def test_same_recipe_same_fingerprint_and_bits(sd1_family, tmp_path):
    _, (a, b, _) = sd1_family
    r1 = merge_to_file(Recipe(models=[str(a), str(b)], alpha=0.5, out=str(tmp_path / "1.safetensors")))
    r2 = merge_to_file(Recipe(models=[str(a), str(b)], alpha=0.5, threads=1, out=str(tmp_path / "2.safetensors")))
    r3 = merge_to_file(Recipe(models=[str(a), str(b)], alpha=0.6, out=str(tmp_path / "3.safetensors")))
    assert r1.fingerprint == r2.fingerprint != r3.fingerprint
    o1, o2 = load_file(tmp_path / "1.safetensors"), load_file(tmp_path / "2.safetensors")
    assert all(torch.equal(o1[k], o2[k]) for k in o1)


def test_n_model_weighted_sum(sd1_fp32_family, sd1_family, tmp_path):
    _, (a, b, c) = sd1_family
    out = tmp_path / "n.safetensors"
    merge_to_file(Recipe(models=[str(a), str(b), str(c)], alpha=1.0, weights=[1, 1, 2], out=str(out)))
    A, B, C, O = load_file(a), load_file(b), load_file(c), load_file(out)
    k = "model.diffusion_model.middle_block.1.proj_in.weight"
    expected = (A[k].float() * 0.25 + B[k].float() * 0.25 + C[k].float() * 0.5).half()
    torch.testing.assert_close(O[k].float(), expected.float(), rtol=1e-3, atol=1e-3)


def test_sd2_and_sdxl_merge(sd2_family, sdxl_family, tmp_path):
    for family, arch in ((sd2_family, "sd2"), (sdxl_family, "sdxl")):
        _, (a, b, *_) = family
        out = tmp_path / f"{arch}.safetensors"
        result = merge_to_file(Recipe(models=[str(a), str(b)], alpha=0.5, out=str(out)))
        assert result.arch == arch
        assert len(load_file(out)) == result.keys


def test_preset_names_with_digits(sd1_family, tmp_path):
    """FLAT_25, WRAP08, … are preset names, not value strings (their names hold digits)."""
    from merge_lab.archs.presets import preset_values
    from merge_lab.engine import prepare

    _, (a, b, _) = sd1_family
    for name in ("FLAT_25", "WRAP08", "MID12_50", "GRAD_V"):
        with prepare(Recipe(models=[str(a), str(b)], blocks=name)) as plan:
            assert plan.ratios["IN01"] == preset_values(name, "sd1")[2]
    with prepare(Recipe(models=[str(a), str(b)], blocks="0," + ",".join(["0.25"] * 25))) as by_values, \
            prepare(Recipe(models=[str(a), str(b)], blocks="FLAT_25")) as by_name:
        assert by_values.fingerprint == by_name.fingerprint
