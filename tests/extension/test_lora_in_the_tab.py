"""LoRAs in the web-UI side: the tab's LoRA field (ours and SuperMerger's one-line form), a merge from the
tab with a LoRA baked in (the same bytes as the CLI's), the recipe loaded back into the field, the HTTP
route resolving LoRAs by name inside the LoRA folder, and the X/Y/Z plot's LoRA strength axis."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from merge_lab.errors import RecipeError
from merge_lab.io.header import read_header

from ..lora.helpers import lora_factors, read_all, save_lora, shapes_of

pytest.importorskip("gradio")

Q_NAME = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
Q = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"


@pytest.fixture
def folders(sd1_family, tmp_path):
    models, loras = tmp_path / "models", tmp_path / "Lora"
    models.mkdir()
    loras.mkdir()
    for p in (sd1_family[0], *sd1_family[1][:2]):
        shutil.copy(p, models / p.name)
    up, down = lora_factors(shapes_of(sd1_family[0])[Q], 2, 1)
    save_lora({f"{Q_NAME}.lora_up.weight": up, f"{Q_NAME}.lora_down.weight": down}, loras / "style.safetensors")
    return models, loras, [p.name for p in sd1_family[1][:2]]


def test_lora_field_parsing():
    from merge_lab_extension.form import lora_text, parse_lora_text

    assert parse_lora_text("a.safetensors:0.7\nsub/b:1:INS\n\nc") == [
        {"path": "a.safetensors", "strength": 0.7}, {"path": "sub/b", "strength": 1.0, "blocks": "INS"},
        {"path": "c", "strength": 1.0}]
    # SuperMerger's one-line list, and a block string with commas on its own line
    assert parse_lora_text("x:0.5,y:1:OUTALL") == [{"path": "x", "strength": 0.5},
                                                   {"path": "y", "strength": 1.0, "blocks": "OUTALL"}]
    assert parse_lora_text("x:0.5:1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1") == [
        {"path": "x", "strength": 0.5, "blocks": "1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1"}]
    with pytest.raises(RecipeError, match="not a number"):
        parse_lora_text("x:strong")
    assert lora_text([{"path": "/m/Lora/x.safetensors", "strength": 0.5, "blocks": "INS"}]) == "x.safetensors:0.5:INS"


def test_a_merge_from_the_tab_bakes_the_lora_and_loads_back(folders, run_cli):
    from merge_lab_extension.backend import FolderBackend
    from merge_lab_extension.controller import TabController

    models, loras, names = folders
    controller = TabController(FolderBackend([models], lora_folders=[loras]))
    assert controller.backend.lora_names() == ["style.safetensors"]
    picked = controller.lora_picked("style.safetensors", "")
    assert picked["loras"] == "style.safetensors:1"
    form = {"models": names, "method": "weighted_sum", "alpha": 0.5, "loras": "style.safetensors:0.6",
            "out_name": "tab-merge", "recipe_metadata": True, "overwrite": False}
    out = controller.merge(form)
    assert "error" not in out["status"], out["status"]
    saved = models / "tab-merge.safetensors"
    assert json.loads(out["recipe_json"])["loras"] == [{"path": "style.safetensors", "strength": 0.6}]
    # the CLI's merge + bake gives the same tensors
    cli_out = models.parent / "cli.safetensors"
    code, _, err = run_cli("merge", "--models", *[models / n for n in names], "--alpha", "0.5", "--lora",
                           f"{loras / 'style.safetensors'}:0.6", "--out", cli_out, "--no-progress")
    assert code == 0, err
    a, b = read_all(saved), read_all(cli_out)
    assert all(torch.equal(a[k], b[k]) for k in a)
    loaded = controller.load_recipe("tab-merge.safetensors")
    assert loaded["loras"] == "style.safetensors:0.6"
    # an unknown LoRA name is one line naming it
    out = controller.merge({**form, "loras": "nothing.safetensors:1", "out_name": "x"})
    assert out["status"].startswith("error:") and "nothing.safetensors" in out["status"]


def test_the_http_route_resolves_loras_in_the_lora_folder(folders):
    from merge_lab_extension.api import ApiError, merge_request
    from merge_lab_extension.backend import FolderBackend

    models, loras, names = folders
    backend = FolderBackend([models], lora_folders=[loras])
    answer = merge_request({"models": names, "method": "weighted_sum", "alpha": 0.5,
                            "loras": [{"path": "style.safetensors", "strength": 0.8, "blocks": "INS"}],
                            "out": "api-merge"}, backend)
    assert answer["action"] == "saved"
    record = json.loads(read_header(models / "api-merge.safetensors").metadata["sd_merge_recipe"])
    assert record["loras"][0]["name"] == "style.safetensors" and record["loras"][0]["blocks"] == "INS"
    with pytest.raises(ApiError) as e:
        merge_request({"models": names, "loras": [{"path": "/etc/passwd"}], "out": "y"}, backend)
    assert e.value.status == 400 and "outside" in e.value.message


def test_the_xyz_lora_strength_axis(folders):
    from merge_lab.engine import Recipe
    from merge_lab_extension.xyz_axes import AXIS_PREFIX, apply_overrides, xyz_axes

    class AxisOption:
        def __init__(self, label, type, apply, **kw):
            self.label = label

    assert f"{AXIS_PREFIX}LoRA strength" in {a.label for a in xyz_axes(None, AxisOption)}
    models, loras, names = folders
    base = Recipe(models=[str(models / n) for n in names], loras=[{"path": str(loras / "style.safetensors"),
                                                                   "strength": 1.0}])
    cell = apply_overrides(base, {"lora_strength": 0.25})
    assert cell.loras[0]["strength"] == 0.25 and base.loras[0]["strength"] == 1.0
    with pytest.raises(RecipeError, match="needs a recipe with a LoRA"):
        apply_overrides(Recipe(models=base.models), {"lora_strength": 0.5})


def test_per_key_ratios_in_the_tab_and_the_xyz_axis(folders):
    from merge_lab.engine import Recipe
    from merge_lab_extension.backend import FolderBackend
    from merge_lab_extension.controller import TabController
    from merge_lab_extension.form import key_ratios_text, parse_key_ratios
    from merge_lab_extension.xyz_axes import AXIS_PREFIX, apply_overrides, xyz_axes

    assert parse_key_ratios("cond_stage_model=0\n\nattn=a=1\nx=0.5\ncond_stage_model=0.2") == {
        "attn=a": 1.0, "x": 0.5, "cond_stage_model": 0.2}  # split at the last '='; given again: moves last
    with pytest.raises(RecipeError, match="not a number"):
        parse_key_ratios("attn=high")
    assert key_ratios_text({"a": 0.5, "b": 1.0}) == "a=0.5\nb=1"
    models, loras, names = folders
    controller = TabController(FolderBackend([models], lora_folders=[loras]))
    form = {"models": names, "method": "weighted_sum", "alpha": 0.5, "key_ratios": "cond_stage_model=0",
            "out_name": "keyed", "recipe_metadata": True, "overwrite": False}
    out = controller.merge(form)
    assert "error" not in out["status"], out["status"]
    a, m = read_all(models / names[0]), read_all(models / "keyed.safetensors")
    assert all(torch.equal(m[k], a[k]) for k in a if k.startswith("cond_stage_model."))
    assert controller.load_recipe("keyed.safetensors")["key_ratios"] == "cond_stage_model=0"

    class AxisOption:
        def __init__(self, label, type, apply, **kw):
            self.label, self.apply = label, apply

    axis = next(a for a in xyz_axes(None, AxisOption) if a.label == f"{AXIS_PREFIX}key ratio (REGEX=X)")

    class P:
        pass

    p = P()
    axis.apply(p, "attn=0.25", [])
    base = Recipe(models=[str(models / n) for n in names], key={"attn": 1.0, "ff": 0.3})
    cell = apply_overrides(base, p.merge_lab_overrides)
    assert list(cell.key.items()) == [("ff", 0.3), ("attn", 0.25)]
