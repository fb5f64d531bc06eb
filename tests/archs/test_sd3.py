"""SD3 Medium, SD3.5 Medium and SD3.5 Large (merge_lab/archs/sd3.py): tiny files with the real key names,
transformer-only and all-in-one, are detected as their release, every key has a role, a value string in
ComfyUI's ModelMergeSD3_2B / ModelMergeSD35_Large order gives each key its block's ratio, and the
multi-model methods run.

Until merge_lab/archs/__init__.py imports merge_lab.archs.sd3, this file registers the records itself, for
its own tests only (a module fixture), so the rest of the suite sees the registry it expects."""

from __future__ import annotations

import importlib
from math import prod

import pytest
import torch
from safetensors import safe_open

from merge_lab import archs
from merge_lab.archs.blocks import block_of, key_role, resolve_ratios
from merge_lab.archs.detect import detect
from merge_lab.demo.models import base_state_dict, finetune_state_dict, save_state_dict
from merge_lab.engine import Recipe, merge_to_file
from merge_lab.errors import CheckpointError
from merge_lab.io.checkpoints import read_header_any
from merge_lab.io.header import TensorInfo

ARCHS = ("sd3-medium", "sd35-medium", "sd35-large")
WIDTH, VOCAB = 8, 64
P = "model.diffusion_model."
CLIP_L, CLIP_G, T5 = (f"text_encoders.{n}.transformer." for n in ("clip_l", "clip_g", "t5xxl"))

# Key counts and parameters (billions; the MMDiT's include pos_embed) at real size: diffusers' transformer
# configs give 2.03B + 0.06B pos_embed (SD3 Medium), 2.24B + 0.23B (SD3.5 Medium), 8.09B + 0.09B (Large).
REAL = {
    "sd3-medium": (491, 2.085),
    "sd35-medium": (665, 2.47),
    "sd35-large": (923, 8.146),
}


@pytest.fixture(autouse=True, scope="module")
def sd3_records():
    """Register the three records (importing merge_lab.archs.sd3 does) and remove, after this file, only
    those this fixture added."""
    before = set(archs.names())
    module = importlib.import_module("merge_lab.archs.sd3")
    for spec in module.SPECS:
        if spec.name not in archs.names():
            archs.register(spec)  # a second run in the same process: the module was imported already
    added = set(archs.names()) - before
    yield module
    for name in added:
        archs.unregister(name)


def _header(shapes):
    return {k: TensorInfo(k, "F32", tuple(s), 0, 0) for k, s in shapes.items()}


def _state(arch, part="all", seed=0):
    state = base_state_dict(archs.layout_for(arch, width=WIDTH, vocab=VOCAB), seed, torch.float32)
    if part == "transformer":
        state = {k: v for k, v in state.items() if k.startswith(P)}
    return state


def test_the_records_are_registered_with_comfyuis_block_order():
    for arch, depth in zip(ARCHS, (24, 24, 38)):
        spec = archs.get(arch)
        assert spec.family == "sd3" and spec.preview.pipeline == "StableDiffusion3Pipeline"
        assert spec.main_blocks == ("POS", "X_EMB", "CTX_EMB", "Y_EMB", "T_EMB",
                                    *(f"JB{i:02d}" for i in range(depth)), "FINAL")
        assert set(spec.extra_blocks) == {"CLIP_L", "CLIP_G", "T5", "VAE"}
    assert [archs.get(a).modelspec for a in ARCHS] == [
        "stable-diffusion-v3-medium", "stable-diffusion-v3.5-medium", "stable-diffusion-v3.5-large"]


@pytest.mark.parametrize("arch", ARCHS)
def test_real_layout_matches_the_sources(arch):
    shapes = archs.layout_for(arch).shapes()
    mmdit = [k for k in shapes if k.startswith(P)]
    assert (len(mmdit), round(sum(prod(shapes[k]) for k in mmdit) / 1e9, 3)) == REAL[arch]
    counts = {pre: sum(k.startswith(pre) for k in shapes) for pre in
              ("first_stage_model.", CLIP_L, CLIP_G, T5)}
    # 16-channel VAE without quant convs (244, as Forge counts Flux's ae too); CLIP-L/G with text_projection;
    # T5-XXL without embed_tokens (219), as ComfyUI / Stability save it (tests/archs/test_key_sets_of_real_files.py)
    assert list(counts.values()) == [244, 197, 517, 219]
    assert round(sum(prod(shapes[k]) for k in shapes if k.startswith(T5)) / 1e9, 2) == 4.76
    cfg = archs.get(arch).layout().mmdit
    h = shapes[f"{P}x_embedder.proj.weight"]
    assert h == (cfg.width, 16, 2, 2) and h[0] // 64 == cfg.depth  # ComfyUI: depth = rows / 64
    assert shapes[f"{P}pos_embed"] == (1, cfg.pos_embed_max_size ** 2, cfg.width)
    assert shapes[f"{P}context_embedder.weight"] == (cfg.width, 4096)
    assert shapes[f"{P}y_embedder.mlp.0.weight"] == (cfg.width, 2048)
    last = f"{P}joint_blocks.{cfg.depth - 1}.context_block."
    assert shapes[last + "adaLN_modulation.1.weight"] == (2 * cfg.width, cfg.width)  # pre_only
    assert not any(k.startswith((last + "mlp.", last + "attn.proj.")) for k in shapes)
    assert set(archs.layout_for(arch, width=WIDTH).shapes()) == set(shapes)  # the tiny layout keeps every key


def test_sd35_medium_has_dual_attention_on_layers_0_to_12_and_qk_norm():
    shapes = archs.layout_for("sd35-medium").shapes()
    attn2 = sorted({int(k[len(P):].split(".")[1]) for k in shapes if ".x_block.attn2." in k})
    assert attn2 == list(range(13))
    assert shapes[f"{P}joint_blocks.0.x_block.adaLN_modulation.1.weight"] == (9 * 1536, 1536)
    assert shapes[f"{P}joint_blocks.13.x_block.adaLN_modulation.1.weight"] == (6 * 1536, 1536)
    assert shapes[f"{P}joint_blocks.0.x_block.attn2.ln_q.weight"] == (64,)
    assert f"{P}joint_blocks.0.context_block.attn.ln_q.weight" not in archs.layout_for("sd3-medium").shapes()
    assert f"{P}joint_blocks.0.context_block.attn.ln_q.weight" in archs.layout_for("sd35-large").shapes()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("width", [None, WIDTH])
def test_each_release_is_told_apart(arch, width):
    tensors = _header(archs.layout_for(arch, width=width).shapes())
    assert detect(tensors).arch == arch
    assert [a for a in ARCHS if archs.get(a).matches(tensors)] == [arch]
    transformer_only = {k: t for k, t in tensors.items() if k.startswith(P)}
    assert detect(transformer_only).arch == arch


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("part", ["transformer", "all"])
def test_tiny_files_are_detected(arch, part, tmp_path):
    path = save_state_dict(_state(arch, part), tmp_path / f"{arch}-{part}.safetensors")
    header = read_header_any(path, archs.current_key_name)
    assert detect(header.tensors).arch == arch
    assert any(k.startswith(T5) for k in header.tensors) == (part == "all")


def test_a_file_with_the_clips_and_no_t5_is_taken():
    """Stability's sd3_medium_incl_clips.safetensors: CLIP-L and CLIP-G, no T5."""
    shapes = {k: s for k, s in archs.layout_for("sd3-medium", width=WIDTH).shapes().items() if not k.startswith(T5)}
    assert detect(_header(shapes)).arch == "sd3-medium"


def test_a_mix_with_sdxl_keys_is_refused_in_one_line():
    sd3_keys = archs.layout_for("sd3-medium", width=WIDTH).shapes()
    sdxl_keys = archs.layout_for("sdxl", width=WIDTH).shapes()
    for extra in (sdxl_keys,  # both models' keys
                  {k: s for k, s in sdxl_keys.items() if k.startswith("conditioner.")}):  # SDXL's encoders
        with pytest.raises(CheckpointError) as err:
            detect(_header({**sd3_keys, **extra}))
        assert "\n" not in str(err.value)
    bad = {k: s for k, s in sd3_keys.items() if ".joint_blocks.23." not in k}  # 23 blocks: no record's
    with pytest.raises(CheckpointError) as err:
        detect(_header(bad))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_key_has_a_role_and_every_block_a_key(arch):
    spec = archs.get(arch)
    for width in (None, WIDTH):
        shapes = archs.layout_for(arch, width=width).shapes()
        roles = {k: key_role(k, arch) for k in shapes}
        assert set(roles.values()) <= {"merge", "kept"}, [k for k, r in roles.items() if r not in ("merge", "kept")]
        assert {block_of(k, arch) for k in shapes} - {None} == set(spec.all_blocks)
    assert block_of(f"{P}joint_blocks.1.x_block.attn.qkv.weight", arch) == "JB01"
    assert block_of(f"{P}joint_blocks.10.x_block.attn.qkv.weight", arch) == "JB10"  # longest prefix first
    assert block_of(f"{P}pos_embed", arch) == "POS"
    assert block_of(f"{P}final_layer.linear.weight", arch) == "FINAL"
    assert block_of(T5 + "shared.weight", arch) == "T5"
    assert block_of("first_stage_model.decoder.conv_in.weight", arch) == "VAE"
    for kept in ("text_encoders.clip_g.logit_scale", "text_encoders.t5xxl.logit_scale", CLIP_L + "x.position_ids"):
        assert key_role(kept, arch) == "kept"
    assert key_role(f"{P}joint_blocks.{len(spec.main_blocks) - 6}.x_block.attn.qkv.weight", arch) == "unknown"


@pytest.mark.parametrize("arch", ARCHS)
def test_a_value_string_in_comfyuis_order_gives_each_key_its_blocks_ratio(arch, tmp_path):
    spec = archs.get(arch)
    a, b = _state(arch, seed=1), _state(arch, seed=2)
    pa = save_state_dict(a, tmp_path / "a.safetensors")
    pb = save_state_dict(b, tmp_path / "b.safetensors")
    values = [round((i % 11) / 10, 2) for i in range(len(spec.main_blocks))]
    out = tmp_path / "merged.safetensors"
    merge_to_file(Recipe(models=[str(pa), str(pb)], method="weighted_sum", alpha=0.5,
                         blocks=",".join(map(str, values)), block={"T5": 0.9}, out=str(out)))
    ratios = resolve_ratios(arch, 0.5, values, {"T5": 0.9})
    assert ratios["CLIP_L"] == ratios["CTX_EMB"] == values[2] and ratios["VAE"] == ratios["X_EMB"] == values[1]
    with safe_open(str(out), "pt") as f:
        merged = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    assert set(merged) == set(a)
    for key in a:
        r = ratios[block_of(key, arch)]
        torch.testing.assert_close(merged[key], a[key] * (1 - r) + b[key] * r, rtol=0, atol=1e-6, msg=key)
    assert meta["modelspec.architecture"] == spec.modelspec


@pytest.mark.parametrize("method", ["ties", "model_stock"])
@pytest.mark.parametrize("arch", ["sd3-medium", "sd35-large"])
def test_ties_and_model_stock_run(arch, method, tmp_path):
    base = _state(arch, seed=3)
    pbase = save_state_dict(base, tmp_path / "base.safetensors")
    fts = [str(save_state_dict(finetune_state_dict(base, i, seed=3), tmp_path / f"ft{i}.safetensors"))
           for i in (1, 2)]
    out = tmp_path / "merged.safetensors"
    merge_to_file(Recipe(models=fts, base=str(pbase), method=method, alpha=1.0, out=str(out)))
    with safe_open(str(out), "pt") as f:
        assert set(f.keys()) == set(base)
        key = f"{P}joint_blocks.3.x_block.attn.qkv.weight"
        t = f.get_tensor(key)
        assert torch.isfinite(t).all() and not torch.equal(t, base[key])


@pytest.mark.parametrize("arch", ["sd3-medium", "sd35-large"])
def test_presets_in_comfyuis_order(arch, tmp_path):
    from safetensors.torch import load_file, save_file

    from merge_lab.archs.presets import presets
    from merge_lab.engine import Recipe, merge_to_file

    table = presets(arch)
    assert {"FLAT_25", "JOINT_ONLY", "EMBED_ONLY", "RAMP_UP"} <= set(table)
    assert all(len(v) == len(archs.get(arch).main_blocks) for v in table.values())
    sa, sb = _state(arch, seed=1), _state(arch, seed=2)
    save_file(sa, str(tmp_path / "a.safetensors"))
    save_file(sb, str(tmp_path / "b.safetensors"))
    out = tmp_path / "m.safetensors"
    merge_to_file(Recipe(models=[str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")], alpha=0.5,
                         blocks="JOINT_ONLY", out=str(out)))
    merged = load_file(str(out))
    joint, embed = f"{P}joint_blocks.2.x_block.mlp.fc1.weight", f"{P}x_embedder.proj.weight"
    assert torch.equal(merged[joint], sb[joint]) and torch.equal(merged[embed], sa[embed])


def test_comfyuis_extra_keys_are_kept_and_pruned_by_name(tmp_path):
    """ComfyUI's SD3 checkpoints also hold each text encoder's logit_scale and the sampling schedule
    (model.model_sampling.sigmas): copied from model A, never merged; --prune drops the schedule."""
    from safetensors.torch import load_file, save_file

    from merge_lab.engine import Recipe, merge_to_file

    paths = []
    for seed in (1, 2):
        state = _state("sd3-medium", seed=seed)
        state["model.model_sampling.sigmas"] = torch.linspace(0, 1, 1000) * seed
        for name in ("clip_l", "clip_g", "t5xxl"):
            state[f"text_encoders.{name}.logit_scale"] = torch.tensor(4.6 * seed)
        paths.append(tmp_path / f"{seed}.safetensors")
        save_file(state, str(paths[-1]))
    out = tmp_path / "m.safetensors"
    merge_to_file(Recipe(models=[str(p) for p in paths], alpha=0.5, out=str(out)))
    merged, a = load_file(str(out)), load_file(str(paths[0]))
    assert torch.equal(merged["model.model_sampling.sigmas"], a["model.model_sampling.sigmas"])
    assert torch.equal(merged["text_encoders.t5xxl.logit_scale"], a["text_encoders.t5xxl.logit_scale"])
    pruned = tmp_path / "p.safetensors"
    merge_to_file(Recipe(models=[str(p) for p in paths], alpha=0.5, out=str(pruned), prune=True))
    assert "model.model_sampling.sigmas" not in load_file(str(pruned))


def test_a_bare_transformer_file_is_read_under_the_prefix(tmp_path):
    """A transformer-only SD3.5 Large saved without model.diffusion_model. merges key by key with a prefixed one."""
    from safetensors.torch import load_file, save_file

    from merge_lab.engine import Recipe, merge_to_file
    from merge_lab.io.checkpoints import read_header_any

    a = _state("sd35-large", "transformer", seed=1)
    b = _state("sd35-large", "transformer", seed=2)
    save_file({k[len(P):]: v for k, v in a.items()}, str(tmp_path / "bare.safetensors"))
    save_file(b, str(tmp_path / "prefixed.safetensors"))
    header = read_header_any(tmp_path / "bare.safetensors", archs.current_key_name)
    assert detect(header.tensors).arch == "sd35-large"
    out = tmp_path / "m.safetensors"
    merge_to_file(Recipe(models=[str(tmp_path / "bare.safetensors"), str(tmp_path / "prefixed.safetensors")],
                         alpha=0.5, out=str(out)))
    merged = load_file(str(out))
    assert set(merged) == set(a)
    key = f"{P}pos_embed"
    assert torch.allclose(merged[key].float(), (a[key] + b[key]) / 2, atol=1e-3)
