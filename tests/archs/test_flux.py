"""The Flux.1 (dev, schnell) and Chroma records (merge_lab/archs/flux.py, chroma.py): tiny files with the real
key names, transformer-only and all-in-one, bare and under model.diffusion_model., are detected as
themselves, merged per block (SuperMerger's 61-value Flux order) and merged with model_stock / ties.

The records are registered by the fixture below, not at collection: until they are imported by
merge_lab/archs/__init__.py, other test files expect Flux files to be refused, so the fixture takes away
again what it added."""

from __future__ import annotations

import importlib

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merge_lab import archs
from merge_lab.archs.blocks import block_of, key_role, resolve_ratios
from merge_lab.archs.detect import detect
from merge_lab.demo.models import base_state_dict, finetune_state_dict
from merge_lab.engine import Recipe, merge_to_file
from merge_lab.errors import CheckpointError, MergeLabError
from merge_lab.io.checkpoints import read_header_any
from merge_lab.io.header import TensorInfo

P = "model.diffusion_model."
WIDTH, VOCAB = 8, 256
RECORDS = ("flux-dev", "flux-schnell", "chroma")


@pytest.fixture(scope="module")
def flux_archs():
    before = set(archs.names())
    flux = importlib.import_module("merge_lab.archs.flux")
    chroma = importlib.import_module("merge_lab.archs.chroma")
    for spec in (flux.DEV, flux.SCHNELL, chroma.SPEC):
        if spec.name not in archs.names():
            archs.register(spec)
    yield flux, chroma
    for name in RECORDS:
        if name not in before:
            archs.unregister(name)


def _state(arch, seed=0, *, transformer_only=False, bare=False, index=None, dtype=torch.float32):
    layout = archs.layout_for(arch, width=WIDTH, vocab=VOCAB)
    state = base_state_dict(layout, seed=seed, dtype=dtype)
    if index is not None:
        state = finetune_state_dict(state, index, seed)
    if transformer_only:
        state = {k: v for k, v in state.items() if k.startswith(P)}
    if bare:
        state = {k.removeprefix(P): v for k, v in state.items()}
    return state


def _write(state, path):
    save_file(state, str(path))
    return path


def _detect(path):
    return detect(read_header_any(path, archs.current_key_name).tensors).arch


def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


FILES = [(arch, only, bare) for arch in RECORDS for only, bare in ((False, False), (True, False), (True, True))]


@pytest.mark.parametrize(("arch", "transformer_only", "bare"), FILES)
def test_each_file_form_is_detected_as_itself(flux_archs, tmp_path, arch, transformer_only, bare):
    path = _write(_state(arch, transformer_only=transformer_only, bare=bare), tmp_path / "m.safetensors")
    assert _detect(path) == arch
    header = read_header_any(path, archs.current_key_name)
    assert all(k.startswith(P) for k in header.tensors if not k.startswith(("text_encoders.", "vae.")))


def test_real_sizes_are_the_published_ones(flux_archs):
    counts = {}
    for arch in RECORDS:
        layout = archs.layout_for(arch)
        transformer = layout.transformer_shapes()
        params = sum(torch.Size(s).numel() for s in transformer.values())
        counts[arch] = (len(transformer), round(params / 1e9, 2), len(layout.shapes()))
    # 780 keys / 11.9 B parameters (dev), schnell without guidance_in's 4, Chroma 8.9 B
    assert counts["flux-dev"] == (780, 11.9, 780 + 196 + 219 + 244)
    assert counts["flux-schnell"] == (776, 11.89, 776 + 196 + 219 + 244)
    assert counts["chroma"][1] == 8.9 and counts["chroma"][2] == counts["chroma"][0] + 219 + 244
    shapes = archs.layout_for("flux-dev").shapes()
    assert shapes[f"{P}img_in.weight"] == (3072, 64) and shapes[f"{P}txt_in.weight"] == (3072, 4096)
    assert shapes[f"{P}vector_in.in_layer.weight"] == (3072, 768)
    assert shapes[f"{P}single_blocks.0.linear1.weight"] == (21504, 3072)
    assert shapes[f"{P}double_blocks.18.img_attn.norm.key_norm.scale"] == (128,)
    assert shapes["text_encoders.t5xxl.transformer.shared.weight"] == (32128, 4096)
    assert "vae.quant_conv.weight" not in shapes and shapes["vae.decoder.conv_in.weight"] == (512, 16, 3, 3)
    chroma = archs.layout_for("chroma").shapes()
    assert chroma[f"{P}distilled_guidance_layer.in_proj.weight"] == (5120, 64)
    assert chroma[f"{P}distilled_guidance_layer.out_proj.weight"] == (3072, 5120)
    assert not any(".modulation." in k or "_mod." in k or "adaLN" in k for k in chroma)


@pytest.mark.parametrize("arch", RECORDS)
def test_every_layout_key_has_a_block_at_real_and_tiny_size(flux_archs, arch):
    spec = archs.get(arch)
    for width in (None, WIDTH):
        shapes = spec.layout(width=width, vocab=VOCAB).shapes()
        tensors = {k: TensorInfo(k, "F32", tuple(s), 0, 0) for k, s in shapes.items()}
        assert detect(tensors).arch == arch
        assert {key_role(k, arch) for k in shapes} == {"merge"}
        assert {block_of(k, arch) for k in shapes} == set(spec.all_blocks)
    assert spec.family == ("chroma" if arch == "chroma" else "flux")
    assert spec.preview.pipeline == ("ChromaPipeline" if arch == "chroma" else "FluxPipeline")


def test_dev_and_schnell_are_told_apart_by_guidance_in(flux_archs, tmp_path):
    dev = _state("flux-dev", transformer_only=True)
    assert any(k.startswith(f"{P}guidance_in.") for k in dev)
    schnell = {k: v for k, v in dev.items() if not k.startswith(f"{P}guidance_in.")}
    assert _detect(_write(schnell, tmp_path / "s.safetensors")) == "flux-schnell"
    assert _detect(_write(dev, tmp_path / "d.safetensors")) == "flux-dev"
    fill = {**dev, f"{P}img_in.weight": torch.zeros(16, 384)}
    header = read_header_any(_write(fill, tmp_path / "f.safetensors"), archs.current_key_name)
    assert detect(header.tensors).label == "flux-dev+fill"
    assert detect(read_header_any(tmp_path / "d.safetensors").tensors).variants == ()
    assert archs.get("flux-dev").modelspec == "flux-1-dev"
    assert archs.get("flux-schnell").modelspec == "flux-1-schnell" and archs.get("chroma").modelspec == "chroma"


def test_near_misses_and_mixes_are_refused_in_one_line(flux_archs, tmp_path):
    sdxl = base_state_dict(archs.layout_for("sdxl", width=WIDTH, vocab=VOCAB), dtype=torch.float32)
    mixed = {**sdxl, **_state("flux-dev", transformer_only=True)}
    a = _write(mixed, tmp_path / "mix.safetensors")
    with pytest.raises(MergeLabError) as err:
        merge_to_file(Recipe(models=[str(a), str(a)], out=str(tmp_path / "out.safetensors")))
    assert "\n" not in str(err.value) and "double_blocks" in str(err.value)
    assert not (tmp_path / "out.safetensors").exists()

    short = {k: v for k, v in _state("flux-dev", transformer_only=True).items()
             if not k.startswith(f"{P}single_blocks.37.")}
    with pytest.raises(CheckpointError) as err:
        _detect(_write(short, tmp_path / "short.safetensors"))
    assert "\n" not in str(err.value) and "this merger takes" in str(err.value)
    # What the Flux records say of it (detection asks the LDM records' describe_unmatched first, which
    # answers "unknown UNet layout" for any model.diffusion_model. key: see the module's report)
    tensors = read_header_any(tmp_path / "short.safetensors").tensors
    assert "19 double and 37 single blocks" in archs.get("flux-dev").describe_unmatched(tensors)

    # A Chroma transformer with CLIP-L: not Chroma's text encoders
    chroma = {**_state("chroma"), **{k: v for k, v in _state("flux-dev").items() if k.startswith("text_encoders.clip_l.")}}
    with pytest.raises(CheckpointError, match="text encoder keys"):
        _detect(_write(chroma, tmp_path / "chroma-clip.safetensors"))


def _flux_values():
    return [round(0.01 + i / 64, 6) for i in range(61)]


@pytest.mark.parametrize(("arch", "bare_b"), [("flux-dev", False), ("flux-schnell", True), ("chroma", False)])
def test_a_61_value_string_gives_each_key_its_blocks_ratio(flux_archs, tmp_path, arch, bare_b):
    """Key by key, as tests/archs/test_registry.py does: SuperMerger's 61-value Flux order (on Chroma its
    CLIP value is dropped); model B bare and transformer-only lines up with an all-in-one model A's keys."""
    a = _state(arch, 1)
    b = _state(arch, 2, transformer_only=bare_b, bare=bare_b)
    pa, pb = _write(a, tmp_path / "a.safetensors"), _write(b, tmp_path / "b.safetensors")
    if bare_b:  # B has no text encoders or VAE: take them from A's file
        b = {**{k: v for k, v in a.items() if not k.startswith(P)}, **{P + k: v for k, v in b.items()}}
        pb = _write(b, tmp_path / "b-full.safetensors")
        assert _detect(_write(_state(arch, 2, transformer_only=True, bare=True), tmp_path / "bare.safetensors")) == arch
    values = _flux_values()
    out = tmp_path / "merged.safetensors"
    merge_to_file(Recipe(models=[str(pa), str(pb)], method="weighted_sum", alpha=0.5,
                         blocks=",".join(map(str, values)), out=str(out)))
    merged, meta = _read(out)
    assert set(merged) == set(a)
    by_block = dict(zip(flux_archs[0].MAIN_BLOCKS, values))
    ratios = resolve_ratios(arch, 0.5, values)
    for block, r in ratios.items():
        if block in by_block:
            assert r == by_block[block], block
    assert ratios["VAE"] == ratios[archs.get(arch).main_blocks[0]]
    if arch == "chroma":
        assert ratios["DGL"] == ratios["IN"] == by_block["IN"]
    seen = set()
    for key in a:
        block = block_of(key, arch)
        seen.add(block)
        r = ratios[block]
        torch.testing.assert_close(merged[key], a[key] * (1 - r) + b[key] * r, rtol=0, atol=1e-6, msg=key)
    assert seen == set(archs.get(arch).all_blocks)
    assert meta["modelspec.architecture"] == archs.get(arch).modelspec


def test_a_bare_and_a_prefixed_transformer_merge_into_prefixed_names(flux_archs, tmp_path):
    a = _state("flux-dev", 1, transformer_only=True, bare=True)
    b = _state("flux-dev", 2, transformer_only=True)
    pa, pb = _write(a, tmp_path / "a.safetensors"), _write(b, tmp_path / "b.safetensors")
    out = tmp_path / "m.safetensors"
    merge_to_file(Recipe(models=[str(pa), str(pb)], alpha=0.25, out=str(out)))
    merged, _ = _read(out)
    assert set(merged) == set(b)
    for key in b:
        torch.testing.assert_close(merged[key], a[key.removeprefix(P)] * 0.75 + b[key] * 0.25, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", RECORDS)
@pytest.mark.parametrize("method", ["model_stock", "ties"])
def test_model_stock_and_ties_run(flux_archs, tmp_path, arch, method):
    base = _state(arch, 3, dtype=torch.float16)
    paths = [_write(base, tmp_path / "base.safetensors")]
    for i in (1, 2, 3):
        paths.append(_write(finetune_state_dict(base, i, 3), tmp_path / f"ft{i}.safetensors"))
    out = tmp_path / f"{method}.safetensors"
    merge_to_file(Recipe(models=[str(p) for p in paths[1:]], base=str(paths[0]), method=method, out=str(out)))
    merged, meta = _read(out)
    assert set(merged) == set(base) and meta["modelspec.architecture"] == archs.get(arch).modelspec
    assert all(torch.isfinite(t.float()).all() for t in merged.values())
    assert any(not torch.equal(merged[k], base[k]) for k in merged if k.startswith(f"{P}double_blocks.0."))


@pytest.mark.parametrize("arch", ["flux-dev", "chroma"])
def test_presets_name_the_transformers_parts(flux_archs, arch, tmp_path):
    """DOUBLE_ONLY takes model B's double-stream blocks and nothing else; FLAT_50 leaves the text encoders A's."""
    from merge_lab.archs.presets import presets

    assert {"FLAT_25", "FLAT_50", "DOUBLE_ONLY", "SINGLE_ONLY", "RAMP_UP", "TEXT_ONLY"} <= set(presets(arch))
    a, b = _write(_state(arch, 1), tmp_path / "a.safetensors"), _write(_state(arch, 2), tmp_path / "b.safetensors")
    for preset in ("DOUBLE_ONLY", "FLAT_50"):
        out = tmp_path / f"{preset}.safetensors"
        merge_to_file(Recipe(models=[str(a), str(b)], alpha=0.5, blocks=preset, out=str(out)))
        merged, _ = _read(out)
        sa, sb = _state(arch, 1), _state(arch, 2)
        double, single = f"{P}double_blocks.3.img_mlp.0.weight", f"{P}single_blocks.5.linear1.weight"
        t5 = "text_encoders.t5xxl.transformer.shared.weight"
        if preset == "DOUBLE_ONLY":
            assert torch.equal(merged[double], sb[double]) and torch.equal(merged[single], sa[single])
        else:
            assert torch.allclose(merged[single], (sa[single] + sb[single]) / 2, atol=1e-6)
            assert torch.equal(merged[t5], sa[t5])
