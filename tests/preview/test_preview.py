"""Previews: offline configs and tokenizer, exact weights, rendering, PNG metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from merge_lab import archs
from merge_lab.archs import layout_for
from merge_lab.archs.detect import Architecture
from merge_lab.engine import Recipe, merge_to_state_dict
from merge_lab.errors import MergeLabError
from merge_lab.preview.convert import component_names, convert_state_dict, ignored_keys
from merge_lab.preview.diffusers_configs import (
    load_shipped,
    pipeline_configs,
    real_configs,
    write_config_folder,
)
from merge_lab.preview.identify import ModelKind, identify
from merge_lab.preview.infotext import infotext, parse_infotext, read_png_metadata, save_png
from merge_lab.preview.pipeline import PipelineCache, PreviewPipeline, prepare, render, render_merge
from merge_lab.preview.settings import PreviewSettings, render_dtype
from merge_lab.preview.tokenizer import (
    TokenizerMissing,
    clip_tokenizer,
    load_vocabulary,
    tokenizer_dir,
    vocabulary_from_bpe,
)
from tests.helpers import pixels

VARIANTS = archs.preview_variants()

SMALL = dict(steps=2, width=64, height=64, dtype="fp32", device="cpu")


# ---------------------------------------------------------------------------------------------------
# offline tokenizer and configs
# ---------------------------------------------------------------------------------------------------

def test_tokenizer_is_clips_real_bpe():
    tok = clip_tokenizer()
    # Token ids of the released CLIP vocabulary (the same in every SD text encoder).
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok("A photo of a DOG, highly detailed!!").input_ids == \
        [49406, 320, 1125, 539, 320, 1929, 267, 5302, 12609, 748, 49407]
    assert len(tok) == 49408
    padded = clip_tokenizer("!")("a cat", padding="max_length", max_length=8).input_ids
    assert padded == [49406, 320, 2368, 49407, 0, 0, 0, 0]  # OpenCLIP pads with "!" (id 0)


def test_tokenizer_build_is_deterministic(tmp_path):
    """Rebuilding from the merges text gives the shipped vocabulary byte for byte (order matters)."""
    vocab, merges = load_vocabulary(str(tokenizer_dir()))
    text = "header line\n" + "\n".join(" ".join(m) for m in merges) + "\n"
    rebuilt, rebuilt_merges = vocabulary_from_bpe(text)
    assert rebuilt == vocab and [tuple(m.split()) for m in rebuilt_merges] == merges


def test_missing_tokenizer_says_how_to_build_it(tmp_path, monkeypatch, render_sd1_family):
    monkeypatch.setenv("MERGE_LAB_TOKENIZER_DIR", str(tmp_path / "none"))
    with pytest.raises(TokenizerMissing) as err:
        render(render_sd1_family[0], settings=PreviewSettings(**SMALL), cache=PipelineCache())
    message = str(err.value)
    assert "\n" not in message and "merge-lab setup-tokenizer" in message and str(tmp_path / "none") in message


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_shipped_configs_are_the_generated_ones(name):
    assert load_shipped(name) == real_configs(name)


def test_shipped_configs_state_the_released_architectures():
    """Published facts of the released diffusers configs, written here independently of the generator."""
    sd15, sd2, sd2v, xl = (load_shipped(n) for n in ("sd15", "sd2-base", "sd2-768-v", "sdxl-base"))
    u = sd15["unet/config.json"]
    assert (u["attention_head_dim"], u["block_out_channels"], u["cross_attention_dim"], u["sample_size"],
            u["use_linear_projection"]) == (8, [320, 640, 1280, 1280], 768, 64, False)
    assert sd15["text_encoder/config.json"]["num_hidden_layers"] == 12
    assert sd15["text_encoder/config.json"]["hidden_act"] == "quick_gelu"
    assert sd15["vae/config.json"]["scaling_factor"] == 0.18215
    assert sd15["scheduler/scheduler_config.json"]["_class_name"] == "PNDMScheduler"
    for cfg, size, pred in ((sd2, 64, "epsilon"), (sd2v, 96, "v_prediction")):
        u = cfg["unet/config.json"]
        assert (u["attention_head_dim"], u["cross_attention_dim"], u["sample_size"], u["use_linear_projection"]) \
            == ([5, 10, 20, 20], 1024, size, True)
        te = cfg["text_encoder/config.json"]
        assert (te["hidden_size"], te["num_hidden_layers"], te["hidden_act"]) == (1024, 23, "gelu")
        assert cfg["scheduler/scheduler_config.json"]["prediction_type"] == pred
        assert cfg["tokenizer/tokenizer_config.json"]["pad_token"] == "!"
    assert sd2v["unet/config.json"]["upcast_attention"] is True
    u = xl["unet/config.json"]
    assert (u["attention_head_dim"], u["block_out_channels"], u["transformer_layers_per_block"],
            u["cross_attention_dim"], u["addition_time_embed_dim"], u["projection_class_embeddings_input_dim"],
            u["sample_size"], u["down_block_types"][0]) == \
        ([5, 10, 20], [320, 640, 1280], [1, 2, 10], 2048, 256, 2816, 128, "DownBlock2D")
    te2 = xl["text_encoder_2/config.json"]
    assert (te2["hidden_size"], te2["num_hidden_layers"], te2["intermediate_size"], te2["projection_dim"]) == \
        (1280, 32, 5120, 1280)
    assert (xl["vae/config.json"]["scaling_factor"], xl["vae/config.json"]["force_upcast"]) == (0.13025, True)
    assert xl["tokenizer_2/tokenizer_config.json"]["pad_token"] == "!"
    assert xl["tokenizer/tokenizer_config.json"]["pad_token"] == "<|endoftext|>"


@pytest.mark.parametrize("name", ["sd15", "sd2-768-v", "sdxl-base"])
def test_shipped_configs_build_exactly_the_real_key_layout(name):
    """The real-size models built from the shipped configs (empty weights) take exactly the converted real
    key set with the same shapes: every real-size checkpoint key lands in a parameter of the right shape."""
    variant = VARIANTS[name]
    layout = layout_for(variant.arch)
    kind = ModelKind(Architecture(variant.arch), layout, variant, True)
    assert kind.is_real_size
    pipe = PreviewPipeline(kind, torch.float32, torch.device("cpu"))
    fake = {k: torch.empty(s, device="meta") for k, s in layout.shapes().items()}
    converted = convert_state_dict(fake, layout, pipe.configs, pipe.modules)
    for component, tensors in converted.items():
        params = pipe.modules[component].state_dict()
        assert set(params) == set(tensors), component
        assert all(tuple(params[k].shape) == tuple(t.shape) for k, t in tensors.items()), component


# ---------------------------------------------------------------------------------------------------
# exact weights
# ---------------------------------------------------------------------------------------------------

def _sum_squares(tensors) -> float:
    return sum(float(t.double().square().sum()) for t in tensors)


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_preview_uses_exactly_the_merged_weights(arch, request):
    base, fts = request.getfixturevalue(f"render_{arch}_family")
    result = merge_to_state_dict(Recipe(models=[str(base), str(fts[0])], alpha=0.3, block={"IN04": 0.9}))
    merged = dict(result.state_dict)
    cache = PipelineCache()
    images = render_merge(result, PreviewSettings(**SMALL, prediction="epsilon"), cache=cache)
    pipe = cache.holding(f"recipe:{result.fingerprint}")
    assert pipe is not None and images[0].size == (64, 64)
    assert pixels(images[0]).std() > 1  # an image, not a constant

    # 1. every tensor of every module equals diffusers' conversion of the merged state dict
    converted = convert_state_dict(merged, pipe.layout, pipe.configs, pipe.modules)
    assert set(converted) == set(component_names(pipe.layout))
    for name, tensors in converted.items():
        state = pipe.modules[name].state_dict()
        assert set(state) == set(tensors), name
        for key, tensor in tensors.items():
            assert torch.equal(state[key], tensor.float()), (name, key)

    # 2. nothing of the merge is left out (independent of the converter): per component, the modules hold
    # the same sum of squares as the merged LDM tensors they come from (conversion only renames, splits
    # and transposes); random data makes a dropped or duplicated key show.
    ignored = set(ignored_keys(pipe.layout))
    prefixes = {"unet": ["model.diffusion_model."], "vae": ["first_stage_model."],
                "text_encoder": [pipe.layout.text_encoders[0].prefix]}
    if arch == "sdxl":
        prefixes["text_encoder_2"] = [pipe.layout.text_encoders[1].prefix]
    for name, pre in prefixes.items():
        ldm = [t for k, t in merged.items() if k.startswith(tuple(pre)) and k not in ignored]
        held = list(pipe.modules[name].state_dict().values())
        assert sum(t.numel() for t in held) == sum(t.numel() for t in ldm), name
        assert _sum_squares(held) == pytest.approx(_sum_squares(ldm), rel=1e-9), name

    # 3. a few mappings spelled out by hand
    unet, vae, te = pipe.modules["unet"], pipe.modules["vae"], pipe.modules["text_encoder"]
    assert torch.equal(unet.conv_in.weight, merged["model.diffusion_model.input_blocks.0.0.weight"].float())
    assert torch.equal(vae.decoder.conv_out.weight, merged["first_stage_model.decoder.conv_out.weight"].float())
    token = pipe.layout.text_encoders[0].prefix + ("token_embedding.weight" if arch == "sd2" else
                                                   "text_model.embeddings.token_embedding.weight")
    assert torch.equal(te.get_input_embeddings().weight, merged[token].float())
    if arch == "sdxl":
        proj = merged["conditioner.embedders.1.model.text_projection"].float()
        assert torch.equal(pipe.modules["text_encoder_2"].text_projection.weight, proj.T)


def test_diffusers_from_single_file_with_our_config_folder_agrees(render_sd1_family, tmp_path):
    """diffusers' own loader, offline with a config folder we write, loads the same tensors as we do."""
    import diffusers

    path = render_sd1_family[1][0]
    folder = write_config_folder(tmp_path / "cfg", layout_for("sd1", width=32), "sd15")
    reference = diffusers.StableDiffusionPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True, torch_dtype=torch.float32)
    cache = PipelineCache()
    pipe, _ = prepare(path, PreviewSettings(**SMALL), cache=cache)
    for name, module in pipe.modules.items():
        ours, theirs = module.state_dict(), getattr(reference, name).state_dict()
        assert set(ours) == set(theirs), name
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), name


def test_render_is_deterministic_and_follows_the_weights(render_sd1_family):
    _, (ft1, ft2) = render_sd1_family
    cache = PipelineCache()
    settings = PreviewSettings(**SMALL, seed=3)
    a1 = render(ft1, settings=settings, cache=cache)[0]
    a2 = render(ft1, settings=settings, cache=cache)[0]
    assert cache.loads == 1 and cache.builds == 1  # same file: the loaded weights are reused
    b = render(ft2, settings=settings, cache=cache)[0]
    assert cache.loads == 2 and cache.builds == 1  # same architecture: only the weights change
    assert np.array_equal(pixels(a1), pixels(a2))
    assert not np.array_equal(pixels(a1), pixels(b))
    other_seed = render(ft1, settings=PreviewSettings(**{**SMALL, "seed": 4}), cache=cache)[0]
    assert not np.array_equal(pixels(a1), pixels(other_seed))


def test_in_memory_and_file_renders_are_identical(render_sd1_family, tmp_path, capsys):
    """`merge --preview --out` renders from memory; `preview --model` the saved file: same pixels."""
    from PIL import Image

    from merge_lab.cli import main

    _, (ft1, ft2) = render_sd1_family
    out = tmp_path / "m.safetensors"
    opts = ["--width", "64", "--height", "64", "--steps", "2", "--image-seed", "11", "--preview-dtype", "fp32"]
    assert main(["merge", "--models", str(ft1), str(ft2), "--alpha", "0.7", "--out", str(out), "--preview",
                 "--no-progress", "--preview-dir", str(tmp_path / "mem"), *opts]) == 0
    assert main(["preview", "--model", str(out), "--preview-dir", str(tmp_path / "file"), *opts]) == 0
    text = capsys.readouterr().out
    mem, file = tmp_path / "mem" / "m-s11.png", tmp_path / "file" / "m-s11.png"
    assert str(mem) in text and str(file) in text
    assert np.array_equal(pixels(Image.open(mem)), pixels(Image.open(file)))
    meta_mem, meta_file = read_png_metadata(mem), read_png_metadata(file)
    autov2 = text.split("AutoV2 ")[1].split()[0]
    assert meta_mem["fields"]["Model hash"] == meta_file["fields"]["Model hash"] == autov2
    assert meta_mem["recipe"] == meta_file["recipe"]  # the file's stored recipe
    assert meta_mem["recipe"]["alpha"] == 0.7 and meta_mem["recipe"]["models"] == [ft1.name, ft2.name]
    assert load_file(out).keys() == load_file(ft1).keys()


def test_preview_command_merges_in_memory_without_saving(render_sd1_family, tmp_path, capsys, monkeypatch):
    from merge_lab.cli import main

    _, (ft1, ft2) = render_sd1_family
    monkeypatch.chdir(tmp_path)
    assert main(["preview", "--models", str(ft1), str(ft2), "--alpha", "0.4", "--width", "64", "--height", "64",
                 "--steps", "2", "--batch-size", "2", "--image-seed", "5", "--sampler", "DPM++ 2M Karras",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    files = sorted(p.name for p in (tmp_path / "previews").iterdir())
    assert len(files) == 2 and files[0].endswith("-s5.png") and files[1].endswith("-s6.png")
    assert not list(tmp_path.glob("*.safetensors"))
    meta = read_png_metadata(tmp_path / "previews" / files[1])
    assert meta["fields"]["Seed"] == "6" and meta["fields"]["Sampler"] == "DPM++ 2M Karras"
    assert meta["fields"]["Model"].startswith("merged-weighted_sum-") and "recipe hash" in out


# Each sampler's diffusers scheduler, its web-UI name, and the options that make it that sampler (written here
# independently of merge_lab.preview.settings.SAMPLERS).
SAMPLER_SCHEDULERS = {
    "euler": ("Euler", "EulerDiscreteScheduler", {"use_karras_sigmas": False}),
    "euler_a": ("Euler a", "EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPM++ 2M", "DPMSolverMultistepScheduler",
                 {"algorithm_type": "dpmsolver++", "use_karras_sigmas": False}),
    "ddim": ("DDIM", "DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
    "pndm": ("PLMS", "PNDMScheduler", {"skip_prk_steps": True}),
    "unipc": ("UniPC", "UniPCMultistepScheduler", {}),
    "heun": ("Heun", "HeunDiscreteScheduler", {}),
    "lms": ("LMS", "LMSDiscreteScheduler", {}),
}
# SD 1.5's released schedule (its scheduler_config.json), which every sampler keeps.
SD15_SCHEDULE = {"prediction_type": "epsilon", "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "num_train_timesteps": 1000, "timestep_spacing": "leading",
                 "steps_offset": 1}


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m", "ddim", "pndm", "unipc", "heun", "lms"])
def test_samplers_render(render_sd1_family, sampler):
    settings = PreviewSettings(**SMALL, sampler=sampler)
    image = render(render_sd1_family[1][0], settings=settings)[0]
    assert pixels(image).std() > 1
    label, class_name, options = SAMPLER_SCHEDULERS[sampler]
    assert f"Sampler: {label}," in image.info["parameters"]
    pipe, _ = prepare(render_sd1_family[1][0], settings)  # the cached pipeline that rendered it
    scheduler = pipe.pipe.scheduler
    assert type(scheduler).__name__ == class_name
    config = dict(scheduler.config)
    assert {k: config.get(k) for k in (*SD15_SCHEDULE, *options)} == {**SD15_SCHEDULE, **options}
    # the steps asked for, "leading" from 1000 (the last training step 999 would be "trailing")
    timesteps = sorted({int(t) for t in scheduler.timesteps})
    assert len(timesteps) == SMALL["steps"] and timesteps[-1] < 999 and timesteps[0] >= 1


def test_sdxl_renders_in_bf16(render_sdxl_family):
    settings = PreviewSettings(**{**SMALL, "dtype": "bf16", "width": 32, "height": 32})  # bf16 is slow on CPU
    image = render(render_sdxl_family[1][0], settings=settings, cache=PipelineCache())[0]
    assert image.size == (32, 32) and pixels(image).std() > 1


def test_auto_dtype_keeps_real_sdxl_within_memory():
    cpu = torch.device("cpu")
    n_sdxl = ModelKind(Architecture("sdxl"), layout_for("sdxl"), VARIANTS["sdxl-base"], True).n_params
    n_sd1 = ModelKind(Architecture("sd1"), layout_for("sd1"), VARIANTS["sd15"], True).n_params
    assert 3.4e9 < n_sdxl < 3.5e9 and 1.0e9 < n_sd1 < 1.1e9
    assert render_dtype("auto", cpu, n_sdxl) == torch.bfloat16  # 6.9 GB instead of 13.9 GB
    assert render_dtype("auto", cpu, n_sd1) == torch.float32
    assert render_dtype("auto", torch.device("cuda"), n_sd1) == torch.float16
    assert render_dtype("fp32", cpu, n_sdxl) == torch.float32


def test_sd2_prediction_follows_metadata_else_the_web_ui_test(render_sd2_family, monkeypatch):
    path = render_sd2_family[1][0]
    shapes = {k: tuple(v.shape) for k, v in load_file(path).items()}
    assert identify(shapes, {"modelspec.prediction_type": "v"}).variant.name == "sd2-768-v"
    assert identify(shapes, {"modelspec.prediction_type": "epsilon"}).variant.name == "sd2-base"
    assert identify(shapes, {}, "epsilon").variant.name == "sd2-base"
    assert not identify(shapes, {}).prediction_known
    calls = []
    monkeypatch.setattr(PreviewPipeline, "guess_v_prediction", lambda self: calls.append(1) or False)
    cache = PipelineCache()
    pipe, _ = prepare(path, PreviewSettings(**SMALL), cache=cache)
    assert calls == [1] and pipe.variant.name == "sd2-base"


def test_v_prediction_of_other_architectures(render_sdxl_family):
    shapes = {k: tuple(v.shape) for k, v in load_file(render_sdxl_family[0]).items()}
    assert identify(shapes, {}).variant.prediction_type == "epsilon"
    assert identify(shapes, {"modelspec.prediction_type": "v"}).variant.prediction_type == "v_prediction"
    assert identify(shapes, {}, "v_prediction").variant.prediction_type == "v_prediction"


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------

def test_unrenderable_models_are_refused_clearly(sd1_family, render_sd1_family, tmp_path):
    # The merge tests' models have a 256-token vocabulary.
    with pytest.raises(MergeLabError, match="49408") as err:
        render(sd1_family[0], settings=PreviewSettings(**SMALL))
    assert "\n" not in str(err.value) and str(sd1_family[0]) in str(err.value)
    state = load_file(render_sd1_family[0])
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(32, 9, 3, 3, dtype=torch.float16)
    with pytest.raises(MergeLabError, match="inpaint"):
        render(state, settings=PreviewSettings(**SMALL))
    state = load_file(render_sd1_family[0])
    del state["first_stage_model.decoder.conv_out.weight"]
    with pytest.raises(MergeLabError, match=r"decoder\.conv_out\.weight"):
        render(state, settings=PreviewSettings(**SMALL))


@pytest.mark.parametrize("change, message", [
    ({"width": 65}, "multiple of 8"), ({"steps": 0}, "steps"), ({"sampler": "nope"}, "unknown sampler"),
    ({"cfg_scale": -1}, "CFG"), ({"seed": -2}, "seed"), ({"dtype": "int8"}, "dtype"),
    ({"device": "tpu"}, "device"), ({"prediction": "x"}, "prediction")])
def test_bad_settings(change, message):
    with pytest.raises(MergeLabError, match=message):
        PreviewSettings(**change).validate()


def test_render_with_consumed_state_dict_needs_loaded_weights(render_sd1_family):
    result = merge_to_state_dict(Recipe(models=[str(p) for p in render_sd1_family[1]], alpha=0.5))
    cache = PipelineCache()
    render_merge(result, PreviewSettings(**SMALL), consume=True, cache=cache)
    assert not any(k.startswith("model.diffusion_model.") for k in result.state_dict)  # consumed
    render_merge(result, PreviewSettings(**SMALL, seed=9), cache=cache)  # served by the loaded weights
    cache.release_weights()
    with pytest.raises(MergeLabError, match="consumed"):
        render_merge(result, PreviewSettings(**SMALL), cache=cache)


# ---------------------------------------------------------------------------------------------------
# PNG metadata
# ---------------------------------------------------------------------------------------------------

def test_png_metadata_round_trip(render_sd1_family, tmp_path):
    result = merge_to_state_dict(Recipe(models=[str(p) for p in render_sd1_family[1]], alpha=0.25,
                                        block={"M00": 1.0}))
    settings = PreviewSettings(**SMALL, seed=42, prompt="a cat, sitting: on a mat\nsecond line 東京",
                               negative_prompt="blurry, lowres", cfg_scale=5.5, sampler="dpmpp_2m")
    image = render_merge(result, settings, cache=PipelineCache())[0]
    path = save_png(image, tmp_path / "x.png")
    meta = read_png_metadata(path)
    assert meta["parameters"] == image.info["parameters"]
    f = meta["fields"]
    assert f["Prompt"] == settings.prompt and f["Negative prompt"] == "blurry, lowres"
    assert (f["Steps"], f["Sampler"], f["CFG scale"], f["Seed"], f["Size"]) == ("2", "DPM++ 2M", "5.5", "42", "64x64")
    assert f["Model hash"] == result.fingerprint[:10]
    assert f["Model"] == f"merged-weighted_sum-{result.fingerprint[:10]}"
    assert f["Merge recipe hash"] == result.fingerprint
    assert meta["recipe"] == json.loads(json.dumps(result.recipe_record))
    assert meta["recipe"]["ratios"]["M00"] == 1.0
    # The web UI's infotext layout: prompt lines, "Negative prompt: …", then the parameters line.
    lines = meta["parameters"].split("\n")
    assert lines[2] == "Negative prompt: blurry, lowres" and lines[3].startswith("Steps: 2, Sampler: DPM++ 2M, ")


def test_infotext_quotes_values_with_commas():
    text = infotext(PreviewSettings(width=64, height=64), "name, with comma", "abc")
    assert 'Model: "name, with comma"' in text
    assert parse_infotext(text)["Model"] == "name, with comma"


def test_pipeline_configs_of_tiny_models_come_from_the_layout():
    layout = layout_for("sdxl", width=32)
    cfg = pipeline_configs(layout, "sdxl-base")
    u = cfg["unet/config.json"]
    assert u["block_out_channels"] == [32, 64, 128]
    assert u["projection_class_embeddings_input_dim"] == layout.unet.adm_in_channels
    assert u["addition_time_embed_dim"] * 6 + layout.text_encoders[1].projection_dim == layout.unet.adm_in_channels
    assert cfg["text_encoder_2/config.json"]["hidden_size"] == layout.text_encoders[1].width
