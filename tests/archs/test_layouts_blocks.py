"""The key layouts match the real checkpoints, and every real key lands in the right block."""

import pytest

from merge_lab.archs import layout_for
from merge_lab.archs.blocks import all_blocks, block_of, main_blocks, resolve_ratios
from merge_lab.errors import RecipeError
from tests.helpers import expected_block

REAL_COUNTS = {  # the released checkpoints' key counts: unet, vae, text encoders, all
    "sd1": (686, 248, 197, 1131),
    "sdxl": (1680, 248, 197 + 390, 2515),
}


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("width", [None, 32, 8])
def test_key_counts_match_real_checkpoints(arch, width):
    shapes = layout_for(arch, width=width).shapes()
    unet = sum(k.startswith("model.diffusion_model.") for k in shapes)
    vae = sum(k.startswith("first_stage_model.") for k in shapes)
    assert (unet, vae, len(shapes) - unet - vae, len(shapes)) == REAL_COUNTS[arch]


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_tiny_layouts_keep_the_real_key_set(arch):
    assert set(layout_for(arch, width=8).shapes()) == set(layout_for(arch).shapes())


def test_real_parameter_counts():
    from math import prod

    assert round(sum(prod(s) for s in layout_for("sd1").shapes().values()) / 1e9, 3) == 1.066
    assert round(sum(prod(s) for s in layout_for("sdxl").shapes().values()) / 1e9, 3) == 3.469


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_every_real_key_has_its_block(arch):
    shapes = layout_for(arch).shapes()
    seen = set()
    for key in shapes:
        got = block_of(key, arch)
        assert got == expected_block(key, arch), key
        seen.add(got)
    # every block of the architecture holds at least one key (SDXL's BASE is split into TE1 / TE2)
    expected = set(all_blocks(arch)) - ({"BASE"} if arch == "sdxl" else set())
    assert seen - {None} == expected


def test_block_examples():
    assert block_of("model.diffusion_model.input_blocks.4.1.proj_in.weight", "sd1") == "IN04"
    assert block_of("model.diffusion_model.output_blocks.11.0.skip_connection.weight", "sd1") == "OUT11"
    assert block_of("model.diffusion_model.out.2.weight", "sdxl") == "OUT"
    assert block_of("model.diffusion_model.label_emb.0.0.weight", "sdxl") == "TIME"
    assert block_of("cond_stage_model.transformer.text_model.embeddings.position_ids", "sd1") is None
    assert block_of("conditioner.embedders.1.model.logit_scale", "sdxl") is None
    for never in ("model_ema.decay", "alphas_cumprod", "betas", "model_ema.diffusion_modelinput_blocks00weight"):
        assert block_of(never, "sd1") is None


def test_main_block_lists():
    assert len(main_blocks("sd1")) == 26 and len(main_blocks("sdxl")) == 20
    assert main_blocks("sdxl")[:2] == ["BASE", "IN00"] and main_blocks("sdxl")[-1] == "OUT08"


def test_ratio_resolution_extras_follow_their_block():
    values = [i / 100 for i in range(26)]
    r = resolve_ratios("sd1", 0.5, values)
    assert r["BASE"] == 0.0 and r["IN00"] == 0.01 and r["M00"] == 0.13 and r["OUT11"] == 0.25
    assert r["TIME"] == r["IN00"] and r["OUT"] == r["OUT11"] and r["VAE"] == r["BASE"]
    r = resolve_ratios("sdxl", 0.3, None, {"BASE": 0.9, "TE2": 0.1, "VAE": 0})
    assert r["TE1"] == 0.9 and r["TE2"] == 0.1 and r["VAE"] == 0 and r["IN04"] == 0.3
    # 25 values (no BASE): BASE takes alpha
    r = resolve_ratios("sd1", 0.7, [0.1] * 25)
    assert r["BASE"] == 0.7 and r["IN05"] == 0.1


def test_ratio_resolution_errors():
    with pytest.raises(RecipeError, match="26 block ratios"):
        resolve_ratios("sd1", 0.5, [0.1] * 20)
    with pytest.raises(RecipeError, match="unknown block 'IN11'"):
        resolve_ratios("sdxl", 0.5, None, {"IN11": 0.2})


def test_presets_by_name():
    from merge_lab.archs.presets import preset_values, presets

    assert len(presets("sd1")) == 38 and set(presets("sd1")) <= set(presets())  # the union of every table
    grad_v = preset_values("GRAD_V", "sd1")
    assert len(grad_v) == 26 and grad_v[0] == 0 and grad_v[1] == 1 and grad_v[13] == 0 and grad_v[25] == 1
    xl = preset_values("grad_v", "sdxl")  # names are case-insensitive
    assert len(xl) == 20 and xl[:10] == grad_v[:10] and xl[10] == grad_v[13] and xl[11:] == grad_v[14:23]
    assert preset_values("ALL_B", "sdxl") == [1.0] * 20
    with pytest.raises(RecipeError, match=r"unknown block preset 'NOPE'.*GRAD_V"):
        preset_values("NOPE", "sd1")


def test_26_values_on_sdxl_follow_supermerger():
    values = [i / 100 for i in range(26)]
    r = resolve_ratios("sdxl", 0.5, values)
    assert r["IN08"] == 0.09 and r["M00"] == 0.13 and r["OUT00"] == 0.14 and r["OUT08"] == 0.22
    assert r["OUT"] == r["OUT08"]
