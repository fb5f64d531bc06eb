"""`merge-lab lora bake` with kohya LoRA / LoCon files on SD1, SD2 and SDXL checkpoints: every baked key is
the reference formula (float32, cast back to the key's dtype, bit for bit), every other key is the model's.

The module names are written out here as kohya sd-scripts writes them (SD1 / SD2: the diffusers module
paths; SDXL: the LDM ones), each beside the checkpoint key it means, so the mapping is checked against
facts, not against itself.
"""

from __future__ import annotations

import json

import pytest
import torch

from merge_lab.io.header import read_header

from .helpers import lora_factors, read_all, reference_lora_delta, save_lora, shapes_of

U = "model.diffusion_model."
SD1_TE = "cond_stage_model.transformer.text_model."
# kohya module name (SD1: diffusers paths) -> the LDM key, and whether the file gives an alpha
SD1_MODULES = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": U + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "lora_unet_down_blocks_0_attentions_1_proj_in": U + "input_blocks.2.1.proj_in.weight",  # 1×1 conv
    "lora_unet_down_blocks_1_resnets_0_conv1": U + "input_blocks.4.0.in_layers.2.weight",  # 3×3 LoCon
    "lora_unet_down_blocks_0_downsamplers_0_conv": U + "input_blocks.3.0.op.weight",
    "lora_unet_down_blocks_3_resnets_1_time_emb_proj": U + "input_blocks.11.0.emb_layers.1.weight",
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k": U + "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
    "lora_unet_mid_block_resnets_1_conv2": U + "middle_block.2.out_layers.3.weight",
    "lora_unet_up_blocks_0_upsamplers_0_conv": U + "output_blocks.2.1.conv.weight",  # no attention at level 0
    "lora_unet_up_blocks_1_attentions_2_proj_out": U + "output_blocks.5.1.proj_out.weight",
    "lora_unet_up_blocks_2_upsamplers_0_conv": U + "output_blocks.8.2.conv.weight",
    "lora_unet_up_blocks_3_resnets_2_conv_shortcut": U + "output_blocks.11.0.skip_connection.weight",
    "lora_unet_up_blocks_3_attentions_0_transformer_blocks_0_ff_net_0_proj": U + "output_blocks.9.1.transformer_blocks.0.ff.net.0.proj.weight",
    "lora_unet_conv_in": U + "input_blocks.0.0.weight",
    "lora_unet_time_embedding_linear_1": U + "time_embed.0.weight",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": SD1_TE + "encoder.layers.0.self_attn.q_proj.weight",
    "lora_te_text_model_encoder_layers_1_mlp_fc2": SD1_TE + "encoder.layers.1.mlp.fc2.weight",
}


def build_kohya(modules: dict[str, str], shapes, path, *, rank=2, alphas=True, seed=0):
    tensors, factors = {}, {}
    for i, (name, key) in enumerate(modules.items()):
        up, down = lora_factors(shapes[key], rank, seed + i)
        tensors[f"{name}.lora_up.weight"] = up.half()
        tensors[f"{name}.lora_down.weight"] = down.half()
        alpha = None
        if alphas and i % 3:  # some modules without alpha: alpha = rank
            alpha = float(1 + i % 4)
            tensors[f"{name}.alpha"] = torch.tensor(alpha)
        factors[key] = (up.half(), down.half(), alpha)
    save_lora(tensors, path)
    return factors


def check_baked(model, out, factors, strength, *, dtype=torch.float16):
    before, after = read_all(model), read_all(out)
    assert set(after) == set(before)
    for key, value in before.items():
        if key in factors:
            up, down, alpha = factors[key]
            delta = reference_lora_delta(up, down, alpha, strength).reshape(value.shape)
            expected = (value.float() + delta).to(value.dtype)
            assert torch.equal(after[key], expected), key
            assert not torch.equal(after[key], value), key
        else:
            assert torch.equal(after[key], value), key


def test_sd1_kohya_lora_with_diffusers_names_bakes_every_layer_type(sd1_family, tmp_path, run_cli):
    model = sd1_family[0]
    lora = tmp_path / "style.safetensors"
    factors = build_kohya(SD1_MODULES, shapes_of(model), lora)
    out = tmp_path / "baked.safetensors"
    code, _stdout, err = run_cli("lora", "bake", "--model", model, "--lora", f"{lora}:0.7", "--out", out,
                                "--no-progress")
    assert code == 0, err
    check_baked(model, out, factors, 0.7)
    meta = read_header(out).metadata
    record = json.loads(meta["sd_merge_recipe"])
    assert record["method"] == "passthrough"
    [entry] = record["loras"]
    import hashlib

    assert entry == {"name": "style.safetensors", "strength": 0.7, "modules": len(SD1_MODULES),
                     "sha256": hashlib.sha256(lora.read_bytes()).hexdigest()}
    models = json.loads(meta["sd_merge_models"])
    assert {m["name"] for m in models.values()} == {model.name, "style.safetensors"}


def test_the_same_bake_gives_the_same_bytes_and_strength_changes_the_recipe_hash(sd1_family, tmp_path, run_cli):
    model = sd1_family[0]
    lora = tmp_path / "l.safetensors"
    build_kohya(dict(list(SD1_MODULES.items())[:3]), shapes_of(model), lora)
    hashes = []
    for name, strength in (("a", 0.5), ("b", 0.5), ("c", 0.6)):
        code, _, err = run_cli("lora", "bake", "--model", model, "--lora", f"{lora}:{strength}", "--out",
                               tmp_path / f"{name}.safetensors", "--no-progress")
        assert code == 0, err
        hashes.append(json.loads(read_header(tmp_path / f"{name}.safetensors").metadata["sd_merge_recipe"])
                      ["recipe_hash"])
    a, b = read_all(tmp_path / "a.safetensors"), read_all(tmp_path / "b.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert hashes[0] == hashes[1] != hashes[2]


SDXL_TE1 = "conditioner.embedders.0.transformer.text_model."
SDXL_TE2 = "conditioner.embedders.1.model.transformer.resblocks."
SDXL_MODULES = {  # kohya's SDXL LoRAs use the LDM names
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q": U + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
    "lora_unet_input_blocks_4_1_proj_in": U + "input_blocks.4.1.proj_in.weight",  # linear in SDXL
    "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_out_0": U + "middle_block.1.transformer_blocks.0.attn2.to_out.0.weight",
    "lora_unet_output_blocks_2_2_conv": U + "output_blocks.2.2.conv.weight",
    "lora_unet_output_blocks_0_0_in_layers_2": U + "output_blocks.0.0.in_layers.2.weight",
    "lora_unet_label_emb_0_0": U + "label_emb.0.0.weight",
    "lora_te1_text_model_encoder_layers_0_self_attn_k_proj": SDXL_TE1 + "encoder.layers.0.self_attn.k_proj.weight",
    "lora_te2_text_model_encoder_layers_0_self_attn_out_proj": SDXL_TE2 + "0.attn.out_proj.weight",
    "lora_te2_text_model_encoder_layers_1_mlp_fc1": SDXL_TE2 + "1.mlp.c_fc.weight",
}


def test_sdxl_kohya_lora_ldm_names_and_openclip_qkv_slices(sdxl_family, tmp_path, run_cli):
    model = sdxl_family[0]
    shapes = shapes_of(model)
    lora = tmp_path / "xl.safetensors"
    factors = build_kohya(SDXL_MODULES, shapes, lora)
    # q / k / v of the OpenCLIP encoder: thirds of in_proj_weight's rows
    in_proj = SDXL_TE2 + "0.attn.in_proj_weight"
    width = shapes[in_proj][1]
    tensors = dict(read_all(lora))
    thirds = {}
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        if proj == "k_proj":
            continue  # only q and v: the k rows stay as they are
        up, down = lora_factors((width, width), 2, 100 + i)
        name = f"lora_te2_text_model_encoder_layers_0_self_attn_{proj}"
        tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"] = up.half(), down.half()
        thirds[i] = (up.half(), down.half())
    save_lora(tensors, lora)
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli("lora", "bake", "--model", model, "--lora", lora, "--out", out, "--no-progress")
    assert code == 0, err
    before, after = read_all(model), read_all(out)
    expected = before[in_proj].float().clone()
    for i, (up, down) in thirds.items():
        expected[i * width:(i + 1) * width] += reference_lora_delta(up, down)
    assert torch.equal(after[in_proj], expected.to(torch.float16))
    assert torch.equal(after[in_proj][width:2 * width], before[in_proj][width:2 * width])
    del before[in_proj], after[in_proj]
    for key in factors:
        up, down, alpha = factors[key]
        want = (before[key].float() + reference_lora_delta(up, down, alpha).reshape(before[key].shape)).half()
        assert torch.equal(after[key], want), key
    assert all(torch.equal(after[k], v) for k, v in before.items() if k not in factors)


def test_sd2_lora_on_the_openclip_text_encoder(sd2_family, tmp_path, run_cli):
    model = sd2_family[0]
    shapes = shapes_of(model)
    key = "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight"
    width = shapes[key][1]
    up, down = lora_factors((width, width), 2, 7)
    proj_up, proj_down = lora_factors(shapes[U + "input_blocks.1.1.proj_in.weight"], 2, 8)
    lora = save_lora({"lora_te_text_model_encoder_layers_0_self_attn_v_proj.lora_up.weight": up,
                      "lora_te_text_model_encoder_layers_0_self_attn_v_proj.lora_down.weight": down,
                      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": proj_up,
                      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": proj_down},
                     tmp_path / "sd2.safetensors")
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli("lora", "bake", "--model", model, "--lora", f"{lora}:-0.5", "--out", out, "--no-progress")
    assert code == 0, err
    before, after = read_all(model), read_all(out)
    expected = before[key].float().clone()
    expected[2 * width:] += reference_lora_delta(up, down, None, -0.5)
    assert torch.equal(after[key], expected.half())


@pytest.mark.parametrize("unmatched", ["error", "warn"])
def test_a_module_that_matches_no_layer_is_an_error_listing_it(sd1_family, tmp_path, run_cli, unmatched):
    model = sd1_family[0]
    shapes = shapes_of(model)
    modules = dict(list(SD1_MODULES.items())[:2])
    lora = tmp_path / "l.safetensors"
    build_kohya(modules, shapes, lora)
    tensors = read_all(lora)
    tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn9_to_q.lora_up.weight"] = torch.zeros(8, 2)
    tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn9_to_q.lora_down.weight"] = torch.zeros(2, 8)
    save_lora(tensors, lora)
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli("lora", "bake", "--model", model, "--lora", lora, "--out", out, "--no-progress",
                           "--lora-unmatched", unmatched)
    assert "attn9_to_q" in err and "1 of 3 LoRA modules match no layer" in err
    if unmatched == "error":
        assert code == 2 and len(err.strip().splitlines()) == 1 and not out.exists()
    else:
        assert code == 0 and err.startswith("warning:") and out.exists()


def test_an_sdxl_lora_on_an_sd1_model_is_refused(sd1_family, sdxl_family, tmp_path, run_cli):
    lora = tmp_path / "xl.safetensors"
    build_kohya(SDXL_MODULES, shapes_of(sdxl_family[0]), lora)
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli("lora", "bake", "--model", sd1_family[0], "--lora", lora, "--out", out, "--no-progress")
    assert code == 2 and "is a LoRA for SDXL" in err and "Stable Diffusion 1.x" in err and not out.exists()


def test_a_lora_of_another_size_is_refused_naming_the_key(sd1_family, tmp_path, run_cli):
    model = sd1_family[0]
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    lora = save_lora({f"{name}.lora_up.weight": torch.zeros(320, 4), f"{name}.lora_down.weight": torch.zeros(4, 320)},
                     tmp_path / "big.safetensors")
    code, _, err = run_cli("lora", "bake", "--model", model, "--lora", lora, "--out", tmp_path / "o.safetensors")
    assert code == 2 and "[320, 320]" in err and "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in err


def test_zero_strength_says_so(sd1_family, tmp_path, run_cli):
    model = sd1_family[0]
    lora = tmp_path / "l.safetensors"
    build_kohya(dict(list(SD1_MODULES.items())[:2]), shapes_of(model), lora)
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli("lora", "bake", "--model", model, "--lora", f"{lora}:0", "--out", out, "--no-progress")
    assert code == 0 and "change nothing" in err
    before, after = read_all(model), read_all(out)
    assert all(torch.equal(after[k], v) for k, v in before.items())


def test_a_checkpoint_given_as_lora_is_refused(sd1_family, tmp_path, run_cli):
    code, _, err = run_cli("lora", "bake", "--model", sd1_family[0], "--lora", sd1_family[1][0], "--out",
                           tmp_path / "o.safetensors")
    assert code == 2 and "not a part of any LoRA" in err and len(err.strip().splitlines()) == 1


def test_nan_in_a_baked_key_of_the_model_is_named(sd1_family, tmp_path, run_cli):
    """The input of a key a LoRA changes is checked only when the baked result is not finite (one pass less):
    NaN there is still the model's NaN, named with the model and the key, and no output is written."""
    from safetensors.torch import save_file

    base, _ = sd1_family
    state = read_all(base)
    name, key = next(iter(SD1_MODULES.items()))
    state[key] = state[key].clone()
    state[key].view(-1)[3] = float("nan")
    broken = tmp_path / "broken.safetensors"
    save_file(state, broken)
    lora = tmp_path / "l.safetensors"
    build_kohya({name: key}, shapes_of(broken), lora)
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli("lora", "bake", "--model", broken, "--lora", f"{lora}:0.5", "--out", out, "--no-progress")
    assert code != 0 and "broken.safetensors" in err and key in err and "NaN" in err, err
    assert not out.exists()
