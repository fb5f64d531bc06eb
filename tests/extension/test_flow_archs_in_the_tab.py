"""Flux.1, Chroma and SD3.x in the web-UI side: the tab shows their blocks' sliders (and only theirs) when
their files are chosen, builds their value strings, the X/Y/Z plot offers their blocks as axes, and the HTTP
route merges them per block."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merge_lab import archs
from merge_lab.demo.models import base_state_dict, finetune_state_dict

pytest.importorskip("gradio")

P = "model.diffusion_model."


def _files(folder, arch):
    base = base_state_dict(archs.layout_for(arch, width=8, vocab=64), 0, torch.float32)
    names = []
    for i in (1, 2):
        name = f"{arch}-{i}.safetensors"
        save_file(finetune_state_dict(base, i, 0), str(folder / name))
        names.append(name)
    return names


@pytest.mark.parametrize("arch", ["flux-dev", "chroma", "sd35-large"])
def test_the_tab_shows_the_architectures_sliders_and_string(arch, tmp_path):
    from merge_lab_extension.backend import FolderBackend
    from merge_lab_extension.controller import TabController
    from merge_lab_extension.ui import build_tab

    names = _files(tmp_path, arch)
    spec = archs.get(arch)
    controller = TabController(FolderBackend([tmp_path]))
    out = controller.models_changed(names, True, *[0.5] * len(controller.slider_blocks))
    assert out["arch"] == arch and spec.title in out["arch_info"]
    shown = [b for b in controller.slider_blocks if out[f"block_{b}"]["visible"]]
    assert shown == list(spec.main_blocks)  # 61 for Flux, 60 for Chroma, 44 for SD3.5 Large
    assert out["mbw_text"] == ",".join(["0.5"] * len(spec.main_blocks))
    values = [round(i / len(spec.main_blocks), 4) for i in range(len(spec.main_blocks))]
    form = {"models": names, "method": "weighted_sum", "alpha": 0.5, "use_blocks": True, "arch": arch,
            **{f"block_{b}": v for b, v in zip(spec.main_blocks, values)}}
    assert controller.recipe(form).blocks == ",".join(f"{v:g}" for v in values)
    tab = build_tab(controller.backend, controller=controller)
    assert {f"block_{b}" for b in spec.main_blocks} <= set(tab.components)


def test_the_xyz_plot_offers_the_new_blocks():
    from merge_lab_extension.xyz_axes import AXIS_PREFIX, xyz_axes

    class AxisOption:
        def __init__(self, label, type, apply, **kw):
            self.label = label

    labels = {a.label for a in xyz_axes(None, AxisOption)}
    for block in ("D00", "D18", "S37", "T5", "DGL", "JB00", "JB37", "X_EMB", "CLIP_G", "FINAL"):
        assert f"{AXIS_PREFIX}block ratio {block}" in labels


def test_the_http_route_merges_flux_per_block(tmp_path):
    from merge_lab_extension.api import merge_request
    from merge_lab_extension.backend import FolderBackend

    names = _files(tmp_path, "flux-dev")
    blocks = ["0"] * 61
    blocks[3] = "1"  # D00
    answer = merge_request({"models": names, "method": "weighted_sum", "alpha": 0.5, "blocks": ",".join(blocks),
                            "out": "merged"}, FolderBackend([tmp_path]))
    assert answer["action"] == "saved" and answer["arch"] == "flux-dev"
    with safe_open(str(tmp_path / "merged.safetensors"), "pt") as merged, \
            safe_open(str(tmp_path / names[0]), "pt") as a, safe_open(str(tmp_path / names[1]), "pt") as b:
        key = f"{P}double_blocks.0.img_attn.qkv.weight"
        assert torch.equal(merged.get_tensor(key), b.get_tensor(key))  # D00 at 1: all of B
        key = f"{P}double_blocks.1.img_attn.qkv.weight"
        assert torch.equal(merged.get_tensor(key), a.get_tensor(key))  # D01 at 0: all of A
