"""Baking every LoRA format we read: LyCORIS LoHa / LoKr (plain, decomposed, Tucker), DoRA, diffusers / PEFT
names, Flux (kohya's fused names and diffusers' split q / k / v / mlp rows), fp8 checkpoints, LoRA Block
Weight strings and presets, and a LoRA in a merge recipe (one pass = merge, then bake).

The expected weights are the published formulas written out here (LyCORIS's einsum for Tucker cores,
torch.kron for LoKr, ComfyUI's weight_decompose for DoRA), independently of merge_lab's code."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from merge_lab import archs
from merge_lab.demo.models import base_state_dict
from merge_lab.io.header import read_header

from .helpers import gen, lora_factors, read_all, reference_dora, reference_lora_delta, save_lora, shapes_of

U = "model.diffusion_model."
Q = U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"  # SD1 IN01, linear
Q_NAME = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
CONV = U + "input_blocks.4.0.in_layers.2.weight"  # SD1 IN04, 3×3
CONV_NAME = "lora_unet_down_blocks_1_resnets_0_conv1"


def _bake(run_cli, model, lora, out, *extra):
    code, _, err = run_cli("lora", "bake", "--model", model, "--lora", lora, "--out", out, "--dtype", "fp32",
                                "--no-progress", *extra)
    assert code == 0, err
    return read_all(model), read_all(out)


def _check(before, after, expected: dict[str, torch.Tensor]):
    for key, value in before.items():
        if key in expected:
            torch.testing.assert_close(after[key], value.float() + expected[key], rtol=1e-5, atol=1e-6)
            assert not torch.equal(after[key], value.float()), key
        else:
            assert torch.equal(after[key], value.float()), key


def test_loha_plain_and_tucker(sd1_family, tmp_path, run_cli):
    model = sd1_family[0]
    shapes = shapes_of(model)
    g = gen(1)
    out_dim, in_dim = shapes[Q]
    r = 2
    t = {f"{Q_NAME}.hada_w1_a": torch.randn(out_dim, r, generator=g), f"{Q_NAME}.hada_w1_b": torch.randn(r, in_dim, generator=g),
         f"{Q_NAME}.hada_w2_a": torch.randn(out_dim, r, generator=g), f"{Q_NAME}.hada_w2_b": torch.randn(r, in_dim, generator=g),
         f"{Q_NAME}.alpha": torch.tensor(1.0)}
    co, ci, kh, kw = shapes[CONV]
    # LyCORIS loha.py with use_tucker: hada_t (r, r, k, k), hada_w_a (r, out), hada_w_b (r, in)
    for i in (1, 2):
        t[f"{CONV_NAME}.hada_t{i}"] = torch.randn(r, r, kh, kw, generator=g)
        t[f"{CONV_NAME}.hada_w{i}_a"] = torch.randn(r, co, generator=g)
        t[f"{CONV_NAME}.hada_w{i}_b"] = torch.randn(r, ci, generator=g)
    lora = save_lora(t, tmp_path / "loha.safetensors", {"ss_network_module": "lycoris.kohya"})
    before, after = _bake(run_cli, model, f"{lora}:0.5", tmp_path / "o.safetensors")
    plain = (t[f"{Q_NAME}.hada_w1_a"] @ t[f"{Q_NAME}.hada_w1_b"]) * (t[f"{Q_NAME}.hada_w2_a"] @ t[f"{Q_NAME}.hada_w2_b"])

    def rebuild(i):  # LyCORIS: einsum("i j k l, j r, i p -> p r k l", t, w_b, w_a)
        return torch.einsum("ijkl,jr,ip->prkl", t[f"{CONV_NAME}.hada_t{i}"], t[f"{CONV_NAME}.hada_w{i}_b"],
                            t[f"{CONV_NAME}.hada_w{i}_a"])

    _check(before, after, {Q: 0.5 * plain * (1.0 / r), CONV: 0.5 * rebuild(1) * rebuild(2)})


def test_lokr_whole_decomposed_and_conv(sd1_family, tmp_path, run_cli):
    model = sd1_family[0]
    shapes = shapes_of(model)
    g = gen(2)
    out_dim, in_dim = shapes[Q]
    k_name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"
    K = Q.replace("to_q", "to_k")
    co, ci, kh, kw = shapes[CONV]
    t = {
        # Q: w1 whole (2, 2), w2 = w2_a · w2_b with alpha 1 over rank 2
        f"{Q_NAME}.lokr_w1": torch.randn(2, 2, generator=g),
        f"{Q_NAME}.lokr_w2_a": torch.randn(out_dim // 2, 2, generator=g),
        f"{Q_NAME}.lokr_w2_b": torch.randn(2, in_dim // 2, generator=g),
        f"{Q_NAME}.alpha": torch.tensor(1.0),
        # K: both whole: alpha is ignored (LyCORIS / ComfyUI)
        f"{k_name}.lokr_w1": torch.randn(1, 2, generator=g),
        f"{k_name}.lokr_w2": torch.randn(out_dim, in_dim // 2, generator=g),
        f"{k_name}.alpha": torch.tensor(7.0),
        # 3×3 conv: w1 (a, b), w2 (c, d, k, k)
        f"{CONV_NAME}.lokr_w1": torch.randn(2, 1, generator=g),
        f"{CONV_NAME}.lokr_w2": torch.randn(co // 2, ci, kh, kw, generator=g),
    }
    lora = save_lora(t, tmp_path / "lokr.safetensors", {"ss_network_module": "lycoris.kohya"})
    before, after = _bake(run_cli, model, lora, tmp_path / "o.safetensors")
    q = torch.kron(t[f"{Q_NAME}.lokr_w1"], t[f"{Q_NAME}.lokr_w2_a"] @ t[f"{Q_NAME}.lokr_w2_b"]) * 0.5
    k = torch.kron(t[f"{k_name}.lokr_w1"], t[f"{k_name}.lokr_w2"])
    conv = torch.kron(t[f"{CONV_NAME}.lokr_w1"][:, :, None, None], t[f"{CONV_NAME}.lokr_w2"])
    _check(before, after, {Q: q, K: k, CONV: conv})


def test_dora_and_locon_tucker_mid(sd1_family, tmp_path, run_cli):
    model = sd1_family[0]
    shapes = shapes_of(model)
    up, down = lora_factors(shapes[Q], 2, 3)
    magnitude = torch.rand(shapes[Q][0], 1, generator=gen(4)) + 0.5  # LyCORIS wd_on_out: (out, 1)
    co, ci, kh, kw = shapes[CONV]
    g = gen(5)
    mid = torch.randn(2, 2, kh, kw, generator=g)
    cdown = torch.randn(2, ci, 1, 1, generator=g)
    cup = torch.randn(co, 2, 1, 1, generator=g)
    lora = save_lora({f"{Q_NAME}.lora_up.weight": up, f"{Q_NAME}.lora_down.weight": down,
                      f"{Q_NAME}.dora_scale": magnitude,
                      f"{CONV_NAME}.lora_up.weight": cup, f"{CONV_NAME}.lora_down.weight": cdown,
                      f"{CONV_NAME}.lora_mid.weight": mid, f"{CONV_NAME}.alpha": torch.tensor(1.0)},
                     tmp_path / "dora.safetensors")
    before, after = _bake(run_cli, model, f"{lora}:0.6", tmp_path / "o.safetensors")
    weight = before[Q].float()
    dora = reference_dora(weight, reference_lora_delta(up, down), magnitude, 0.6) - weight
    # LoCon's Tucker form (kohya / LyCORIS locon with lora_mid): einsum("i j k l, j r, p i -> p r k l")
    tucker = torch.einsum("ijkl,jr,pi->prkl", mid, cdown.flatten(1), cup.flatten(1)) * 0.5 * 0.6
    _check(before, after, {Q: dora, CONV: tucker})


def test_diffusers_and_peft_names(sd1_family, tmp_path, run_cli):
    model = sd1_family[0]
    shapes = shapes_of(model)
    te_key = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    v_key = Q.replace("attn1.to_q", "attn2.to_v")
    out_key = U + "output_blocks.3.1.transformer_blocks.0.attn1.to_out.0.weight"
    ups = {k: lora_factors(shapes[k], 2, i) for i, k in enumerate((Q, te_key, v_key, out_key))}
    tensors = {
        # PEFT (diffusers >= 0.24 save_lora_weights): lora_A = down, lora_B = up
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight": ups[Q][1],
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight": ups[Q][0],
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": ups[te_key][1],
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": ups[te_key][0],
        # older diffusers attention-processor LoRAs, bare module paths
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_v_lora.down.weight": ups[v_key][1],
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_v_lora.up.weight": ups[v_key][0],
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": ups[out_key][1],
        "up_blocks.1.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": ups[out_key][0],
    }
    lora = save_lora(tensors, tmp_path / "peft.safetensors", {"format": "pt"})
    before, after = _bake(run_cli, model, lora, tmp_path / "o.safetensors")
    _check(before, after, {k: reference_lora_delta(u, d) for k, (u, d) in ups.items()})


def test_lbw_strings_and_presets_weigh_the_blocks(sd1_family, tmp_path, run_cli):
    model = sd1_family[0]
    shapes = shapes_of(model)
    te_key = "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight"
    m00 = U + "middle_block.1.transformer_blocks.0.attn2.to_k.weight"
    out11 = U + "output_blocks.11.1.proj_out.weight"
    in04 = U + "input_blocks.4.1.proj_in.weight"
    names = {te_key: "lora_te_text_model_encoder_layers_1_mlp_fc2", Q: Q_NAME,
             m00: "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k",
             out11: "lora_unet_up_blocks_3_attentions_2_proj_out", in04: "lora_unet_down_blocks_1_attentions_0_proj_in"}
    factors = {k: lora_factors(shapes[k], 2, i) for i, k in enumerate(names)}
    tensors = {}
    for k, name in names.items():
        tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"] = factors[k]
    lora = save_lora(tensors, tmp_path / "l.safetensors")
    delta = {k: reference_lora_delta(*factors[k]).reshape(shapes[k]) for k in names}
    # LBW's 17 values: BASE IN01 IN02 IN04 IN05 IN07 IN08 M00 OUT03..OUT11
    lbw = "0.5,1,0,0.25,0,0,0,0,0,0,0,0,0,0,0,0,2"
    cases = [
        (lbw, {te_key: 0.5, Q: 1.0, in04: 0.25, out11: 2.0}),
        ("INS", {te_key: 1.0, Q: 1.0, in04: 1.0}),  # BASE, IN01, IN02, IN04
        ("MIDD", {te_key: 1.0, m00: 1.0}),  # BASE, IN05, IN07, IN08, M00, OUT03..OUT06
        ("OUTS", {te_key: 1.0, out11: 1.0}),
    ]
    for i, (spec, weights) in enumerate(cases):
        before, after = _bake(run_cli, model, lora, tmp_path / f"o{i}.safetensors", "--lora-blocks", spec)
        _check(before, after, {k: w * delta[k] for k, w in weights.items()})
        record = json.loads(read_header(tmp_path / f"o{i}.safetensors").metadata["sd_merge_recipe"])
        assert record["loras"][0]["blocks"] == spec


def test_lbw_12_values_on_sdxl(sdxl_family, tmp_path, run_cli):
    model = sdxl_family[0]
    shapes = shapes_of(model)
    in04 = U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    out05 = U + "output_blocks.5.1.transformer_blocks.0.attn1.to_q.weight"
    te = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.k_proj.weight"
    names = {in04: "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
             out05: "lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_q",
             te: "lora_te1_text_model_encoder_layers_0_self_attn_k_proj"}
    factors = {k: lora_factors(shapes[k], 2, i) for i, k in enumerate(names)}
    tensors = {}
    for k, name in names.items():
        tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"] = factors[k]
    lora = save_lora(tensors, tmp_path / "xl.safetensors")
    # BASE IN04 IN05 IN07 IN08 M00 OUT00..OUT05
    before, after = _bake(run_cli, model, f"{lora}:0.5", tmp_path / "o.safetensors", "--lora-blocks",
                          "0,0.5,0,0,0,0,0,0,0,0,0,1")
    _check(before, after, {in04: 0.25 * reference_lora_delta(*factors[in04]),
                           out05: 0.5 * reference_lora_delta(*factors[out05])})


# ---- Flux ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def flux_model(tmp_path_factory):
    state = base_state_dict(archs.layout_for("flux-dev", width=8, vocab=64), 0, torch.bfloat16)
    path = tmp_path_factory.mktemp("flux") / "flux.safetensors"
    save_file(state, str(path))
    return path


def test_flux_kohya_fused_and_diffusers_split_names(flux_model, tmp_path, run_cli):
    shapes = shapes_of(flux_model)
    qkv = U + "double_blocks.0.img_attn.qkv.weight"
    txt_qkv = U + "double_blocks.1.txt_attn.qkv.weight"
    linear1 = U + "single_blocks.0.linear1.weight"
    final = U + "final_layer.adaLN_modulation.1.weight"
    hidden = shapes[U + "img_in.weight"][0]
    mlp = shapes[linear1][0] - 3 * hidden
    f = {}
    tensors = {}

    def add(name, key_shape, seed, peft=False):
        up, down = lora_factors(key_shape, 2, seed)
        if peft:
            tensors[f"{name}.lora_A.weight"], tensors[f"{name}.lora_B.weight"] = down, up
        else:
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
        return reference_lora_delta(up, down)

    # kohya sd-scripts Flux LoRAs: BFL names, qkv fused
    f[qkv] = add("lora_unet_double_blocks_0_img_attn_qkv", shapes[qkv], 1)
    # diffusers: q / k / v (and proj_mlp) separately, rows of the fused tensors
    txt = torch.zeros(shapes[txt_qkv])
    for i, proj in enumerate(("add_q_proj", "add_v_proj")):
        j = (0, 2)[i]
        txt[j * hidden:(j + 1) * hidden] = add(f"transformer.transformer_blocks.1.attn.{proj}", (hidden, hidden),
                                               10 + i, peft=True)
    f[txt_qkv] = txt
    lin = torch.zeros(shapes[linear1])
    lin[hidden:2 * hidden] = add("transformer.single_transformer_blocks.0.attn.to_k", (hidden, hidden), 20, peft=True)
    lin[3 * hidden:] = add("transformer.single_transformer_blocks.0.proj_mlp", (mlp, hidden), 21, peft=True)
    f[linear1] = lin
    # diffusers' norm_out.linear is final_layer.adaLN_modulation.1 with its halves (scale, shift) swapped
    d = add("transformer.norm_out.linear", shapes[final], 30, peft=True)
    half = d.shape[0] // 2
    f[final] = torch.cat([d[half:], d[:half]])
    lora = save_lora(tensors, tmp_path / "flux-lora.safetensors")
    before, after = _bake(run_cli, flux_model, f"{lora}:0.8", tmp_path / "o.safetensors")
    _check(before, after, {k: 0.8 * v for k, v in f.items()})


def test_flux_lora_into_an_fp8_file_is_cast_back_to_fp8(flux_model, tmp_path, run_cli):
    state = read_all(flux_model)
    fp8 = {k: (v.to(torch.float8_e4m3fn) if v.dim() >= 2 and k.startswith(U) else v) for k, v in state.items()}
    model = tmp_path / "flux-fp8.safetensors"
    save_file(fp8, str(model))
    key = U + "single_blocks.1.linear2.weight"
    up, down = lora_factors(tuple(fp8[key].shape), 2, 5)
    lora = save_lora({"lora_unet_single_blocks_1_linear2.lora_up.weight": up * 4,
                      "lora_unet_single_blocks_1_linear2.lora_down.weight": down * 4}, tmp_path / "l.safetensors")
    out = tmp_path / "o.safetensors"
    code, _, err = run_cli("lora", "bake", "--model", model, "--lora", lora, "--out", out, "--no-progress")
    assert code == 0, err
    after = read_all(out)
    assert after[key].dtype == torch.float8_e4m3fn
    want = (fp8[key].float() + reference_lora_delta(up * 4, down * 4)).to(torch.float8_e4m3fn)
    assert torch.equal(after[key].view(torch.uint8), want.view(torch.uint8))
    assert not torch.equal(after[key].view(torch.uint8), fp8[key].view(torch.uint8))
    assert all(torch.equal(after[k].view(torch.uint8) if after[k].dtype == torch.float8_e4m3fn else after[k],
                           v.view(torch.uint8) if v.dtype == torch.float8_e4m3fn else v)
               for k, v in fp8.items() if k != key)


def test_an_sd_lora_on_flux_is_refused(flux_model, sd1_family, tmp_path, run_cli):
    up, down = lora_factors((8, 8), 2, 1)
    lora = save_lora({f"{Q_NAME}.lora_up.weight": up, f"{Q_NAME}.lora_down.weight": down}, tmp_path / "l.safetensors")
    code, _, err = run_cli("lora", "bake", "--model", flux_model, "--lora", lora, "--out", tmp_path / "o.safetensors")
    assert code == 2 and Q_NAME in err and "match no layer" in err
    flux_lora = save_lora({"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": up,
                           "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": down}, tmp_path / "f.safetensors")
    code, _, err = run_cli("lora", "bake", "--model", sd1_family[0], "--lora", flux_lora, "--out",
                           tmp_path / "o.safetensors")
    assert code == 2 and "is a LoRA for Flux.1 / Chroma" in err


# ---- in a recipe ---------------------------------------------------------------------------------------------
def test_merge_recipe_with_a_lora_is_merge_then_bake_in_one_pass(sd1_family, tmp_path, run_cli):
    base, fts = sd1_family
    shapes = shapes_of(base)
    up, down = lora_factors(shapes[Q], 2, 9)
    cup, cdown = lora_factors(shapes[CONV], 2, 10)
    lora = save_lora({f"{Q_NAME}.lora_up.weight": up, f"{Q_NAME}.lora_down.weight": down,
                      f"{CONV_NAME}.lora_up.weight": cup, f"{CONV_NAME}.lora_down.weight": cdown},
                     tmp_path / "l.safetensors")
    merged = tmp_path / "merged.safetensors"
    code, _, err = run_cli("merge", "--models", fts[0], fts[1], "--alpha", "0.3", "--out", merged, "--no-progress")
    assert code == 0, err
    two_step = tmp_path / "two.safetensors"
    code, _, err = run_cli("lora", "bake", "--model", merged, "--lora", f"{lora}:0.7", "--out", two_step,
                           "--no-progress")
    assert code == 0, err
    one_pass = tmp_path / "one.safetensors"
    code, _, err = run_cli("merge", "--models", fts[0], fts[1], "--alpha", "0.3", "--lora", f"{lora}:0.7", "--out", one_pass,
                           "--no-progress")
    assert code == 0, err
    recipe_file = tmp_path / "r.yaml"
    recipe_file.write_text(f"models: [{fts[0]}, {fts[1]}]\nmethod: weighted_sum\nalpha: 0.3\n"
                           f"loras:\n  - path: {lora.name}\n    strength: 0.7\nout: {tmp_path / 'rec.safetensors'}\n")
    code, _, err = run_cli("merge", "--recipe", recipe_file, "--no-progress")
    assert code == 0, err
    a, b, c, m = (read_all(p) for p in (two_step, one_pass, tmp_path / "rec.safetensors", merged))
    assert set(a) == set(b) == set(c)
    for k in a:
        assert torch.equal(a[k], b[k]) and torch.equal(b[k], c[k]), k
    assert not torch.equal(b[Q], m[Q]) and torch.equal(b[U + "out.2.weight"], m[U + "out.2.weight"])
    record = json.loads(read_header(one_pass).metadata["sd_merge_recipe"])
    assert record["method"] == "weighted_sum" and record["loras"][0]["strength"] == 0.7
