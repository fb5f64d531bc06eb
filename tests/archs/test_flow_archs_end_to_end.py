"""Everything else works on Flux.1, Chroma and SD3.x files: every registered merge method, the θ-per-block
analysis and its heatmap, --resume, the modelspec metadata of the published models, and a transformer-only
file merged with an all-in-one one."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import merge_lab_methods as methods
from merge_lab import archs
from merge_lab.demo.models import base_state_dict, finetune_state_dict
from merge_lab.engine import Recipe, merge_to_file
from merge_lab.errors import MergeCancelled
from merge_lab.io import writer as writer_io

P = "model.diffusion_model."
ARCHS = ("flux-dev", "chroma", "sd3-medium", "sd35-large")


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """{arch: (base, [ft1, ft2])} tiny fp16 files with the real key sets."""
    out = {}
    for arch in ARCHS:
        folder = tmp_path_factory.mktemp(arch)
        base = base_state_dict(archs.layout_for(arch, width=8, vocab=64), 0, torch.float16)
        paths = []
        for i, state in enumerate((base, finetune_state_dict(base, 1, 0), finetune_state_dict(base, 2, 0))):
            paths.append(folder / f"{arch}-{i}.safetensors")
            save_file(state, str(paths[-1]))
        out[arch] = (paths[0], paths[1:])
    return out


def _read(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def _recipe(method, family, out, **extra):
    base, fts = family
    m = methods.get_method(method)
    n = max(m.min_models, 2) if m.max_models is None else min(max(m.min_models, 2), m.max_models)
    models = [str(p) for p in fts[:n]]
    if m.base == "required" or (m.base == "optional" and m.min_models < 3):
        return Recipe(models=models, base=str(base), method=method, out=str(out), **extra)
    return Recipe(models=models, method=method, out=str(out), **extra)


@pytest.mark.parametrize("arch", ["flux-dev", "sd3-medium"])
@pytest.mark.parametrize("method", methods.method_names())
def test_every_method_merges_them(families, tmp_path, arch, method):
    out = tmp_path / "m.safetensors"
    result = merge_to_file(_recipe(method, families[arch], out))
    merged, meta = _read(out)
    a, _ = _read(families[arch][1][0])
    assert set(merged) == set(a) and result.arch == arch
    assert all(torch.isfinite(t.float()).all() for t in merged.values())
    assert meta["modelspec.architecture"] == archs.get(arch).modelspec
    assert json.loads(meta["sd_merge_recipe"])["method"] == method


@pytest.mark.parametrize("arch", ARCHS)
def test_analysis_lists_the_architectures_blocks_and_draws_the_heatmap(families, tmp_path, run_cli, arch):
    base, fts = families[arch]
    heatmap = tmp_path / "theta.png"
    code, out, err = run_cli("analyze", "--models", *fts, "--base", base, "--json", "--heatmap", heatmap,
                             "--no-progress")
    assert code == 0, err
    report = json.loads(out)
    text = json.dumps(report)
    spec = archs.get(arch)
    for block in (spec.main_blocks[1], spec.main_blocks[-1], *spec.extra_blocks):
        assert f'"{block}"' in text, block
    assert heatmap.is_file() and heatmap.stat().st_size > 0


@pytest.mark.parametrize("arch", ["flux-dev", "sd35-large"])
def test_resume_continues_a_stopped_merge(families, tmp_path, monkeypatch, arch):
    monkeypatch.setattr(writer_io, "JOURNAL_INTERVAL_S", 0.0)
    reference = tmp_path / "reference.safetensors"
    merge_to_file(_recipe("ties", families[arch], reference, alpha=0.7))
    out = tmp_path / "m.safetensors"
    cancel = threading.Event()

    def progress(done, total, key):
        if done >= total // 2:
            cancel.set()

    with pytest.raises(MergeCancelled):
        merge_to_file(_recipe("ties", families[arch], out, alpha=0.7), progress=progress, cancel=cancel, resume=True)
    assert not out.exists()
    notes = []
    merge_to_file(_recipe("ties", families[arch], out, alpha=0.7), resume=True, notify=notes.append)
    assert notes and notes[0].startswith("resuming at tensor")
    got, want = _read(out)[0], _read(reference)[0]
    assert got.keys() == want.keys() and all(got[k].equal(want[k]) for k in want)


@pytest.mark.parametrize("arch", ["flux-schnell", "sd35-medium"])
def test_a_transformer_only_file_merges_with_an_all_in_one_file(tmp_path, arch):
    """The transformer is merged. The components only one file has (text encoders, VAE) are refused by
    default, naming the file, the key and the option; with --missing take-first they are copied from the
    all-in-one file."""
    from merge_lab.errors import MergeLabError

    whole = base_state_dict(archs.layout_for(arch, width=8, vocab=64), 0, torch.float32)
    only = {k: v for k, v in finetune_state_dict(whole, 1, 0).items() if k.startswith(P)}
    save_file(whole, str(tmp_path / "whole.safetensors"))
    save_file(only, str(tmp_path / "only.safetensors"))
    for order in (("whole", "only"), ("only", "whole")):
        out = tmp_path / f"{order[0]}-{order[1]}.safetensors"
        models = [str(tmp_path / f"{n}.safetensors") for n in order]
        with pytest.raises(MergeLabError) as err:
            merge_to_file(Recipe(models=models, alpha=0.5, out=str(out)))
        assert "only.safetensors" in str(err.value) and "--missing take-first" in str(err.value)
        assert not out.exists()
        merge_to_file(Recipe(models=models, alpha=0.5, out=str(out), missing="take-first"))
        merged, _ = _read(out)
        assert set(merged) == set(whole)
        key = next(k for k in only if k.endswith(".weight") and only[k].dim() == 2)
        assert torch.allclose(merged[key], (whole[key] + only[key]) / 2, atol=1e-6)
        other = next(k for k in whole if not k.startswith(P))
        assert torch.equal(merged[other], whole[other])
