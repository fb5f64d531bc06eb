"""`merge-lab lora merge` (exact concatenation, SVD re-rank) and `merge-lab lora extract` (truncated SVD of
FT − BASE in kohya's format): checked against the reference formulas and by baking the result back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from merge_lab.io.header import read_header

from .helpers import lora_factors, read_all, reference_lora_delta, save_lora, shapes_of
from .test_bake_kohya import SD1_MODULES, SDXL_MODULES, U, build_kohya


def _delta_of(tensors, name, shape):
    up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
    alpha = tensors.get(f"{name}.alpha")
    return reference_lora_delta(up, down, None if alpha is None else float(alpha)).reshape(shape)


def _two_loras(model, tmp_path, dtype=torch.float32):
    shapes = shapes_of(model)
    items = list(SD1_MODULES.items())
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    fa = build_kohya(dict(items[:6]), shapes, a, rank=2, seed=1)
    fb = build_kohya(dict(items[3:9]), shapes, b, rank=3, seed=50)
    for path in (a, b):  # fp32 factors: the merge's arithmetic is checked, not fp16 rounding
        save_lora({k: v.to(dtype) for k, v in read_all(path).items()}, path)
    return shapes, dict(items[:9]), fa, fb


def test_exact_merge_concatenates_the_ranks_and_sums_the_deltas(sd1_family, tmp_path, run_cli):
    model = sd1_family[0]
    shapes, modules, _fa, _fb = _two_loras(model, tmp_path)
    out = tmp_path / "ab.safetensors"
    code, stdout, err = run_cli("lora", "merge", "--lora", f"{tmp_path / 'a.safetensors'}:1",
                                "--lora", f"{tmp_path / 'b.safetensors'}:0.5", "--out", out)
    assert code == 0, err
    assert "exact" in stdout
    merged = read_all(out)
    a, b = read_all(tmp_path / "a.safetensors"), read_all(tmp_path / "b.safetensors")
    for name, key in modules.items():
        want = torch.zeros(shapes[key])
        ranks = 0
        for tensors, strength in ((a, 1.0), (b, 0.5)):
            if f"{name}.lora_up.weight" in tensors:
                want += strength * _delta_of(tensors, name, shapes[key])
                ranks += tensors[f"{name}.lora_down.weight"].shape[0]
        assert merged[f"{name}.lora_down.weight"].shape[0] == ranks
        assert float(merged[f"{name}.alpha"]) == ranks
        got = _delta_of(merged, name, shapes[key])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    meta = read_header(out).metadata
    record = json.loads(meta["sd_merge_recipe"])
    assert [(x["name"], x["strength"]) for x in record["loras"]] == [("a.safetensors", 1.0), ("b.safetensors", 0.5)]
    assert meta["ss_network_module"] == "networks.lora"

    # baking the merged LoRA = baking both
    run_cli("lora", "bake", "--model", model, "--lora", out, "--out", tmp_path / "m1.safetensors", "--dtype", "fp32",
            "--no-progress")
    run_cli("lora", "bake", "--model", model, "--lora", f"{tmp_path / 'a.safetensors'}:1", "--lora",
            f"{tmp_path / 'b.safetensors'}:0.5", "--out", tmp_path / "m2.safetensors", "--dtype", "fp32",
            "--no-progress")
    m1, m2 = read_all(tmp_path / "m1.safetensors"), read_all(tmp_path / "m2.safetensors")
    assert set(m1) == set(m2)
    for k in m1:
        torch.testing.assert_close(m1[k], m2[k], rtol=1e-5, atol=1e-5)


def test_rank_merge_is_the_truncated_svd_of_the_sum(sd1_family, tmp_path, run_cli):
    model = sd1_family[0]
    shapes, modules, _, _ = _two_loras(model, tmp_path)
    a, b = read_all(tmp_path / "a.safetensors"), read_all(tmp_path / "b.safetensors")
    for rank, exact in ((5, True), (1, False)):
        out = tmp_path / f"r{rank}.safetensors"
        code, stdout, err = run_cli("lora", "merge", "--lora", str(tmp_path / "a.safetensors"), "--lora",
                                    str(tmp_path / "b.safetensors"), "--rank", str(rank), "--out", out)
        assert code == 0, err
        merged = read_all(out)
        for name, key in modules.items():
            total = sum(_delta_of(t, name, shapes[key]) for t in (a, b) if f"{name}.lora_up.weight" in t)
            got = _delta_of(merged, name, shapes[key])
            mat = total.reshape(total.shape[0], -1)
            s = torch.linalg.svdvals(mat)
            r = min(rank, s.numel())
            assert merged[f"{name}.lora_down.weight"].shape[0] == r
            best = float(s[r:].square().sum().sqrt())  # Eckart–Young: the best rank-r error
            err_norm = float((got - total).reshape(mat.shape).norm())
            assert err_norm == pytest.approx(best, rel=1e-3, abs=1e-5)
            if exact:
                torch.testing.assert_close(got, total, rtol=1e-4, atol=1e-5)
        assert "truncation error" in stdout


def test_exact_merge_refuses_a_loha_module_and_rank_merge_takes_it(sd1_family, tmp_path, run_cli):
    model = sd1_family[0]
    key = U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    out_dim, in_dim = shapes_of(model)[key]
    g = torch.Generator().manual_seed(3)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    loha = save_lora({f"{name}.hada_w1_a": torch.randn(out_dim, 2, generator=g),
                      f"{name}.hada_w1_b": torch.randn(2, in_dim, generator=g),
                      f"{name}.hada_w2_a": torch.randn(out_dim, 2, generator=g),
                      f"{name}.hada_w2_b": torch.randn(2, in_dim, generator=g)}, tmp_path / "loha.safetensors")
    up, down = lora_factors((out_dim, in_dim), 2, 4)
    lora = save_lora({f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down}, tmp_path / "l.safetensors")
    out = tmp_path / "o.safetensors"
    code, _, err = run_cli("lora", "merge", "--lora", loha, "--lora", lora, "--out", out)
    assert code == 2 and "is loha" in err and "--rank" in err and name in err and not out.exists()
    code, _, err = run_cli("lora", "merge", "--lora", loha, "--lora", lora, "--rank", str(in_dim), "--out", out)
    assert code == 0, err
    t = read_all(loha)
    want = (t[f"{name}.hada_w1_a"] @ t[f"{name}.hada_w1_b"]) * (t[f"{name}.hada_w2_a"] @ t[f"{name}.hada_w2_b"])
    want += up @ down
    torch.testing.assert_close(_delta_of(read_all(out), name, (out_dim, in_dim)), want, rtol=1e-4, atol=1e-4)


def _fine_tune(base, path, changes):
    """A fine-tune of `base`: each key gets the ΔW `changes[key]` (float32 file)."""
    tensors = read_all(base)
    out = {k: v.float() for k, v in tensors.items()}
    for key, delta in changes.items():
        out[key] = out[key] + delta
    save_file(out, str(path))
    return path


def test_extract_then_bake_gives_the_difference_within_the_reported_error(sd1_fp32_family, tmp_path, run_cli):
    base = sd1_fp32_family[0]
    shapes = shapes_of(base)
    g = torch.Generator().manual_seed(11)
    low_rank = {
        U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight": None,  # linear
        U + "input_blocks.2.1.proj_in.weight": None,  # 1×1 convolution (SD1)
        U + "input_blocks.4.0.in_layers.2.weight": None,  # 3×3 convolution
        "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight": None,
    }
    changes = {}
    for key in low_rank:
        up, down = lora_factors(shapes[key], 2, int(torch.randint(0, 1000, (1,), generator=g)))
        changes[key] = reference_lora_delta(up, down).reshape(shapes[key])
    full_key = U + "output_blocks.3.1.transformer_blocks.0.attn2.to_v.weight"
    changes[full_key] = torch.randn(shapes[full_key], generator=g) * 0.05  # full rank: truncated
    ft = _fine_tune(base, tmp_path / "ft.safetensors", changes)
    out = tmp_path / "extracted.safetensors"
    code, stdout, err = run_cli("lora", "extract", "--model", ft, "--base", base, "--rank", "2", "--conv-rank", "2",
                                "--text-encoder", "--out", out, "--no-progress")
    assert code == 0, err
    lora = read_all(out)
    names = {k.rsplit(".lora_down.weight", 1)[0] for k in lora if k.endswith(".lora_down.weight")}
    # kohya's names for SD1: the diffusers module paths
    assert names == {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                     "lora_unet_down_blocks_0_attentions_1_proj_in", "lora_unet_down_blocks_1_resnets_0_conv1",
                     "lora_te_text_model_encoder_layers_0_mlp_fc1",
                     "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v"}
    assert lora["lora_unet_down_blocks_1_resnets_0_conv1.lora_down.weight"].shape[1:] == (shapes[
        U + "input_blocks.4.0.in_layers.2.weight"][1], 3, 3)
    assert lora["lora_unet_down_blocks_1_resnets_0_conv1.lora_up.weight"].shape[2:] == (1, 1)
    meta = read_header(out).metadata
    assert meta["ss_network_dim"] == "2" and meta["modelspec.architecture"].endswith("/lora")
    reported = float(stdout.split("largest ")[1].split()[0])
    assert "attn2_to_v" in stdout.split("largest ")[1]

    baked = tmp_path / "baked.safetensors"
    code, _, err = run_cli("lora", "bake", "--model", base, "--lora", out, "--out", baked, "--no-progress")
    assert code == 0, err
    b, f, before = read_all(baked), read_all(ft), read_all(base)
    for key in low_rank:
        torch.testing.assert_close(b[key], f[key], rtol=1e-4, atol=1e-5)
    full = changes[full_key]
    rel = float((b[full_key] - f[full_key]).norm() / full.norm())
    assert 0.05 < rel == pytest.approx(reported, rel=1e-3)
    s = torch.linalg.svdvals(full)
    assert reported == pytest.approx(float(s[2:].square().sum().sqrt() / s.square().sum().sqrt()), rel=1e-4)
    for key in before:
        if key not in changes:
            assert torch.equal(b[key], before[key]), key


def test_extract_without_conv_rank_skips_3x3_and_sdxl_uses_ldm_names(sdxl_family, tmp_path, run_cli):
    base = sdxl_family[0]
    shapes = shapes_of(base)
    changes = {}
    for i, (_name, key) in enumerate(SDXL_MODULES.items()):
        up, down = lora_factors(shapes[key], 1, 200 + i)
        changes[key] = reference_lora_delta(up, down).reshape(shapes[key])
    ft = _fine_tune(base, tmp_path / "ft.safetensors", changes)
    out = tmp_path / "x.safetensors"
    code, _stdout, err = run_cli("lora", "extract", "--model", ft, "--base", base, "--rank", "4", "--out", out,
                                "--text-encoder", "--no-progress")
    assert code == 0, err
    names = {k.rsplit(".lora_down.weight", 1)[0] for k in read_all(out) if k.endswith(".lora_down.weight")}
    conv3 = {n for n, k in SDXL_MODULES.items() if len(shapes[k]) == 4 and shapes[k][2:] != (1, 1)}
    assert conv3 and names == set(SDXL_MODULES) - conv3
    assert "3×3 convolutions not extracted (--conv-rank R2 extracts them)" in err


def test_extract_refuses_identical_models_and_other_architectures(sd1_family, sdxl_family, tmp_path, run_cli):
    base = sd1_family[0]
    out = tmp_path / "o.safetensors"
    code, _, err = run_cli("lora", "extract", "--model", base, "--base", base, "--rank", "4", "--out", out,
                           "--no-progress")
    assert code == 2 and "do not differ" in err and not out.exists()
    code, _, err = run_cli("lora", "extract", "--model", base, "--base", sdxl_family[0], "--rank", "4", "--out", out,
                           "--no-progress")
    assert code == 2 and "one architecture" in err and not out.exists()
