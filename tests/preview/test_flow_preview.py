"""Flux.1, Chroma and SD3.x previews: offline configs and T5 tokenizer, the Flux transformer converter checked
against diffusers' own at real size, exact loading, tiny renders of every release, components from other
files (a transformer-only download with ComfyUI's text-encoder files and BFL's VAE), and a merge rendered."""

from __future__ import annotations

import re
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from merge_lab import archs
from merge_lab.demo.models import base_state_dict, finetune_state_dict
from merge_lab.engine import Recipe, merge_to_state_dict
from merge_lab.errors import MergeLabError
from merge_lab.preview.convert import convert_state_dict, flux_transformer_to_diffusers, used_keys
from merge_lab.preview.diffusers_configs import load_shipped
from merge_lab.preview.identify import identify
from merge_lab.preview.pipeline import PipelineCache, prepare, render, render_merge
from merge_lab.preview.settings import PreviewSettings
from merge_lab.preview.t5_tokenizer import build as build_t5
from merge_lab.preview.t5_tokenizer import t5_tokenizer
from tests.helpers import pixels

P = "model.diffusion_model."
WIDTH = 32  # GroupNorm(32) in the VAE; the real CLIP / T5 vocabularies (the real tokenizers run)
FLOW = ("flux-dev", "flux-schnell", "chroma", "sd3-medium", "sd35-medium", "sd35-large")
SMALL = dict(steps=2, width=64, height=64, dtype="fp32", device="cpu", sampler="euler")


@pytest.fixture(scope="module")
def states():
    return {arch: base_state_dict(archs.layout_for(arch, width=WIDTH), 0, torch.float32) for arch in FLOW}


def _settings(**kw):
    return PreviewSettings(**{**SMALL, **kw})


# ---------------------------------------------------------------------------------------------------
# tokenizer and configs
# ---------------------------------------------------------------------------------------------------

def test_t5_tokenizer_is_t5s():
    tok = t5_tokenizer()
    assert len(tok) == 32100
    assert tok("a photo of a cat").input_ids == [3, 9, 1202, 13, 3, 9, 1712, 1]
    assert tok("a cat", padding="max_length", max_length=6).input_ids == [3, 9, 1712, 1, 0, 0]


def test_t5_tokenizer_refuses_a_tokenizer_that_is_not_t5s(tmp_path):
    from merge_lab.preview.tokenizer import tokenizer_dir

    wrong = tmp_path / "tokenizer.json"
    wrong.write_text('{"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}')
    with pytest.raises(MergeLabError) as err:
        build_t5(wrong, dest=tmp_path / "out")
    assert str(wrong) in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "out" / "tokenizer.json").exists()
    with pytest.raises(MergeLabError, match=r"no tokenizer\.json"):
        build_t5(tokenizer_dir(), dest=tmp_path / "out2")  # CLIP's folder: not T5's


def test_missing_t5_tokenizer_says_how_to_set_it_up(tmp_path, monkeypatch, states):
    monkeypatch.setenv("MERGE_LAB_T5_TOKENIZER_DIR", str(tmp_path / "none"))
    with pytest.raises(MergeLabError) as err:
        render(states["chroma"], settings=_settings(), cache=PipelineCache())
    assert "merge-lab setup-tokenizer" in str(err.value) and "--t5-from" in str(err.value)


def test_shipped_flow_configs_state_the_released_models():
    """Published facts of black-forest-labs/FLUX.1-dev / -schnell and stabilityai/stable-diffusion-3(.5)
    configs, written here independently of the generator."""
    dev, schnell = load_shipped("flux-dev"), load_shipped("flux-schnell")
    t = dev["transformer/config.json"]
    assert (t["num_layers"], t["num_single_layers"], t["attention_head_dim"], t["num_attention_heads"]) == \
        (19, 38, 128, 24)
    assert t["axes_dims_rope"] == [16, 56, 56] and t["guidance_embeds"] is True and t["in_channels"] == 64
    assert schnell["transformer/config.json"]["guidance_embeds"] is False
    vae = dev["vae/config.json"]
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"], vae["use_quant_conv"]) == \
        (16, 0.3611, 0.1159, False)
    assert dev["scheduler/scheduler_config.json"]["use_dynamic_shifting"] is True
    assert schnell["scheduler/scheduler_config.json"]["shift"] == 1.0
    assert dev["text_encoder_2/config.json"]["d_model"] == 4096 and dev["tokenizer_2/tokenizer_config.json"][
        "model_max_length"] == 512
    large, medium = load_shipped("sd35-large")["transformer/config.json"], load_shipped("sd35-medium")[
        "transformer/config.json"]
    assert (large["num_layers"], large["caption_projection_dim"], large["qk_norm"]) == (38, 2432, "rms_norm")
    assert medium["dual_attention_layers"] == list(range(13)) and medium["pos_embed_max_size"] == 384
    sd3 = load_shipped("sd3-medium")
    assert sd3["vae/config.json"]["scaling_factor"] == 1.5305 and sd3["vae/config.json"]["shift_factor"] == 0.0609
    assert sd3["text_encoder_2/config.json"]["hidden_act"] == "gelu"  # OpenCLIP ViT-bigG
    assert sd3["model_index.json"]["text_encoder_3"] == ["transformers", "T5EncoderModel"]


# ---------------------------------------------------------------------------------------------------
# conversion
# ---------------------------------------------------------------------------------------------------

def _row_coded(shapes):
    """Tensors whose every row says which key and row it is, expanded along the other dims (no memory)."""
    out = {}
    for i, (k, s) in enumerate(shapes.items()):
        rows = torch.arange(s[0], dtype=torch.float64) + 1e6 * i
        out[k] = rows.reshape(-1, *([1] * (len(s) - 1))).expand(*s) if len(s) > 1 else rows
    return out


@pytest.mark.parametrize("arch", ["flux-dev", "flux-schnell", "chroma"])
def test_flux_converter_is_diffusers_own_at_real_size(arch):
    """diffusers' converters fix the hidden size at 3072 (so they cannot convert tiny models); ours reads it
    from the layout. At real size both give the same keys and shapes (all 57 blocks, on the meta device) and
    the same tensors, row for row (with one block of each kind)."""
    from diffusers.loaders import single_file_utils as su

    theirs_fn = su.convert_chroma_transformer_checkpoint_to_diffusers if arch == "chroma" else \
        su.convert_flux_transformer_checkpoint_to_diffusers
    layout = archs.layout_for(arch)
    meta = {k: torch.empty(s, device="meta") for k, s in layout.transformer_shapes().items()}
    assert {k: v.shape for k, v in flux_transformer_to_diffusers(meta, layout).items()} == \
        {k: v.shape for k, v in theirs_fn(dict(meta)).items()}
    one = replace(layout, transformer=replace(layout.transformer, depth=1, depth_single=1))
    shapes = {k: s for k, s in layout.transformer_shapes().items()
              if not re.search(r"(double|single)_blocks\.([1-9]|\d\d)\.", k)}
    coded = _row_coded(shapes)
    ours, theirs = flux_transformer_to_diffusers(coded, one), theirs_fn(dict(coded))
    assert set(ours) == set(theirs)
    for key in ours:
        a, b = ours[key], theirs[key]
        assert a.shape == b.shape, key
        assert torch.equal(a.reshape(a.shape[0], -1)[:, 0], b.reshape(b.shape[0], -1)[:, 0]), key


@pytest.mark.parametrize("arch", FLOW)
def test_every_model_weight_comes_from_the_checkpoint(arch, states):
    """The pipeline's models take exactly the converted keys (strict), and the tensors are the checkpoint's."""
    pipe, _ = prepare(dict(states[arch]), _settings(), cache=PipelineCache())
    sd = states[arch]
    transformer = pipe.modules["transformer"]
    img_in = "x_embedder.weight" if arch.startswith(("flux", "chroma")) else "pos_embed.proj.weight"
    source = f"{P}img_in.weight" if arch.startswith(("flux", "chroma")) else f"{P}x_embedder.proj.weight"
    assert torch.equal(transformer.state_dict()[img_in], sd[source])
    t5 = pipe.modules["text_encoder" if arch == "chroma" else ("text_encoder_2" if arch.startswith("flux")
                                                                 else "text_encoder_3")]
    assert torch.equal(t5.state_dict()["shared.weight"], sd["text_encoders.t5xxl.transformer.shared.weight"])
    vae = pipe.modules["vae"].state_dict()
    vae_prefix = "vae." if arch.startswith(("flux", "chroma")) else "first_stage_model."
    assert torch.equal(vae["decoder.conv_out.weight"], sd[f"{vae_prefix}decoder.conv_out.weight"])
    layout = identify({k: tuple(v.shape) for k, v in sd.items()}).layout
    converted = convert_state_dict({k: sd[k] for k in used_keys(layout)}, layout, pipe.configs, pipe.modules)
    for name, tensors in converted.items():
        assert set(tensors) <= set(pipe.modules[name].state_dict()), name


# ---------------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", FLOW)
def test_tiny_render_of_every_release(arch, states):
    cache = PipelineCache()
    a = render(dict(states[arch]), settings=_settings(seed=1), cache=cache)[0]
    b = render(dict(states[arch]), settings=_settings(seed=1), cache=cache)[0]
    c = render(dict(states[arch]), settings=_settings(seed=2), cache=cache)[0]
    assert a.size == (64, 64) and cache.builds == 1
    assert np.array_equal(pixels(a), pixels(b)) and not np.array_equal(pixels(a), pixels(c))
    assert pixels(a).std() > 0
    assert "Sampler: Euler" in a.info["parameters"] and "Seed: 1" in a.info["parameters"]


def test_flow_samplers_and_a_clear_refusal(states):
    cache = PipelineCache()
    for sampler in ("euler_a", "heun"):
        assert render(dict(states["sd3-medium"]), settings=_settings(sampler=sampler), cache=cache)[0].size == (64, 64)
    with pytest.raises(MergeLabError) as err:
        render(dict(states["sd3-medium"]), settings=_settings(sampler="dpmpp_2m"), cache=cache)
    assert "flow-matching" in str(err.value) and "Euler" in str(err.value) and "\n" not in str(err.value)


def test_weights_change_the_image(states):
    cache = PipelineCache()
    base = states["flux-dev"]
    other = finetune_state_dict(base, 1, 0)
    a = render(dict(base), settings=_settings(), cache=cache)[0]
    b = render(dict(other), settings=_settings(), cache=cache)[0]
    assert not np.array_equal(pixels(a), pixels(b)) and cache.builds == 1


def test_fill_models_are_refused(states):
    shapes = {k: tuple(v.shape) for k, v in states["flux-dev"].items()}
    shapes[f"{P}img_in.weight"] = (shapes[f"{P}img_in.weight"][0], 384)
    with pytest.raises(MergeLabError, match="fill checkpoints cannot be previewed"):
        identify(shapes)


# ---------------------------------------------------------------------------------------------------
# components from other files
# ---------------------------------------------------------------------------------------------------

def _component_files(state, folder):
    """A Flux download as users have it: the transformer alone (BFL's bare names), ComfyUI's clip_l and
    t5xxl files (HF names, no prefix) and BFL's ae.safetensors (LDM names, no prefix)."""
    parts = {
        "flux1-dev.safetensors": {k[len(P):]: v for k, v in state.items() if k.startswith(P)},
        # ComfyUI's clip_l.safetensors keeps the projection and logit scale Flux does not use
        "clip_l.safetensors": {**{k[len("text_encoders.clip_l.transformer."):]: v for k, v in state.items()
                                  if k.startswith("text_encoders.clip_l.transformer.")},
                               "text_projection.weight": torch.eye(WIDTH), "logit_scale": torch.tensor(4.6)},
        "t5xxl_fp16.safetensors": {k[len("text_encoders.t5xxl.transformer."):]: v.half() for k, v in state.items()
                                   if k.startswith("text_encoders.t5xxl.transformer.")},
        "ae.safetensors": {k[len("vae."):]: v for k, v in state.items() if k.startswith("vae.")},
    }
    paths = {}
    for name, tensors in parts.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / name))
        paths[name] = folder / name
    return paths


def test_a_transformer_only_file_renders_with_the_component_files(states, tmp_path):
    state = states["flux-dev"]
    paths = _component_files(state, tmp_path)
    cache = PipelineCache()
    with pytest.raises(MergeLabError) as err:
        render(paths["flux1-dev.safetensors"], settings=_settings(), cache=cache)
    message = str(err.value)
    assert "--with" in message and "flux1-dev.safetensors" in message and "\n" not in message
    extras = [paths["clip_l.safetensors"], paths["t5xxl_fp16.safetensors"], paths["ae.safetensors"]]
    split = render(paths["flux1-dev.safetensors"], settings=_settings(), cache=cache, components=extras)[0]
    # The same weights in one all-in-one dict (T5 through fp16, as its file): the same image.
    whole = {k: (v.half().float() if k.startswith("text_encoders.t5xxl.") else v) for k, v in state.items()}
    together = render(whole, settings=_settings(), cache=PipelineCache())[0]
    assert np.array_equal(pixels(split), pixels(together))


def test_a_component_file_replaces_the_checkpoints_own(states, tmp_path):
    state = states["flux-dev"]
    other_vae = {k[len("vae."):]: v + 0.05 for k, v in finetune_state_dict(state, 2, 0).items()
                 if k.startswith("vae.")}
    save_file({k: v.contiguous() for k, v in other_vae.items()}, str(tmp_path / "ae.safetensors"))
    cache = PipelineCache()
    own = render(dict(state), settings=_settings(), cache=cache)[0]
    swapped = render(dict(state), settings=_settings(), cache=cache, components=[tmp_path / "ae.safetensors"])[0]
    assert not np.array_equal(pixels(own), pixels(swapped))


def test_files_that_are_no_usable_component_are_refused(states, tmp_path):
    state = states["flux-dev"]
    diffusers_vae = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({"decoder.mid_block.resnets.0.conv1.weight": torch.zeros(4, 4, 3, 3)}, str(diffusers_vae))
    with pytest.raises(MergeLabError, match="diffusers-format VAE") as err:
        render(dict(state), settings=_settings(), cache=PipelineCache(), components=[diffusers_vae])
    assert str(diffusers_vae) in str(err.value)
    wrong_clip = tmp_path / "clip_g.safetensors"
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(49408, 1280)}, str(wrong_clip))
    with pytest.raises(MergeLabError, match="1280-wide CLIP"):
        render(dict(state), settings=_settings(), cache=PipelineCache(), components=[wrong_clip])
    with pytest.raises(MergeLabError, match="not sd1"):
        sd1 = base_state_dict(archs.layout_for("sd1", width=WIDTH), 0, torch.float32)
        render(sd1, settings=_settings(), cache=PipelineCache(), components=[wrong_clip])


# ---------------------------------------------------------------------------------------------------
# a merge, rendered
# ---------------------------------------------------------------------------------------------------

def test_a_chroma_merge_renders_from_memory_and_from_the_command_line(states, tmp_path, run_cli):
    base = states["chroma"]
    paths = []
    for i, state in enumerate((finetune_state_dict(base, 1, 0), finetune_state_dict(base, 2, 0))):
        path = tmp_path / f"chroma-{i}.safetensors"
        save_file({k: v.half().contiguous() for k, v in state.items()}, str(path))
        paths.append(path)
    result = merge_to_state_dict(Recipe(models=[str(p) for p in paths], method="weighted_sum", alpha=0.5))
    image = render_merge(result, _settings(), cache=PipelineCache())[0]
    assert image.size == (64, 64) and "merge_lab_recipe" in image.info
    code, _out, err = run_cli("preview", "--models", paths[0], paths[1], "--alpha", 0.5, "--steps", 2, "--width", 64,
                             "--height", 64, "--sampler", "euler", "--preview-dtype", "fp32", "--preview-device",
                             "cpu", "--preview-dir", tmp_path / "png")
    assert code == 0, err
    assert len(list((tmp_path / "png").glob("*.png"))) == 1


def test_preview_command_takes_component_files(states, tmp_path, run_cli):
    paths = _component_files(states["flux-schnell"], tmp_path)
    common = ("--steps", 2, "--width", 64, "--height", 64, "--sampler", "euler", "--preview-dtype", "fp32",
              "--preview-device", "cpu", "--preview-dir", tmp_path / "png")
    code, _out, err = run_cli("preview", "--model", paths["flux1-dev.safetensors"], *common)
    assert code != 0 and "--with" in err
    code, _out, err = run_cli("preview", "--model", paths["flux1-dev.safetensors"], "--with", paths["clip_l.safetensors"],
                             "--with", paths["t5xxl_fp16.safetensors"], "--with", paths["ae.safetensors"], *common)
    assert code == 0, err
    assert len(list((tmp_path / "png").glob("*.png"))) == 1
