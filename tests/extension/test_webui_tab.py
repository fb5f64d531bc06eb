"""The tab builder and its event handlers, without a browser. Runs on every gradio the hosts use: the main venv
(newest gradio), .venv-gradio3 (3.41.2, AUTOMATIC1111) and .venv-gradio4 (4.40.0, Forge) — see
test_gradio_versions.py."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil

import gradio as gr
import pytest
import torch
from safetensors import safe_open

import merge_lab_methods as methods
from merge_lab import archs
from merge_lab.archs.presets import preset_values
from merge_lab.engine import Recipe, merge_to_state_dict
from merge_lab_extension.backend import FolderBackend
from merge_lab_extension.compat import is_update, update_value
from merge_lab_extension.form import block_field, default_alpha, form_from_record, slider_blocks
from merge_lab_extension.ui import build_tab
from tests.extension.test_gradio_versions import VENVS as GRADIO_VENVS

SD1_FIELDS = [block_field(b) for b in archs.get("sd1").main_blocks]  # SD1's 26 sliders, in order

@pytest.fixture
def models_dir(tmp_path, sd1_family, sdxl_family):
    folder = tmp_path / "models"
    (folder / "xl").mkdir(parents=True)
    base, fts = sd1_family
    for f in (base, *fts[:2]):
        shutil.copy(f, folder / f.name)
    shutil.copy(sdxl_family[1][0], folder / "xl" / sdxl_family[1][0].name)
    return folder


@pytest.fixture
def tab(models_dir):
    return build_tab(FolderBackend([models_dir]))


def form(tab, **changes):
    values = tab.values()
    values.update(changes)
    return values


def test_runs_on_the_expected_gradio():
    """test_gradio_versions.py runs this file in each host's venv and says which gradio must be there; without
    it, this is the main venv: the newest gradio (newer than every host's pin) and the preview extra."""
    installed = importlib.metadata.version("gradio")
    assert gr.__version__ == installed  # the gradio imported is the one installed in this venv
    expected = os.environ.get("MERGE_LAB_EXPECT_GRADIO")
    if expected is not None:
        assert installed == expected
    else:
        host_majors = {int(version.split(".")[0]) for version, _ in GRADIO_VENVS.values()}
        assert int(installed.split(".")[0]) > max(host_majors), installed
        assert importlib.util.find_spec("diffusers") is not None  # the host venvs have no preview extra


def test_builds_a_blocks_with_the_folder_models(tab):
    assert isinstance(tab.blocks, gr.Blocks)
    assert tab.components["models"].choices in (
        ["sd1-base.safetensors", "sd1-ft1.safetensors", "sd1-ft2.safetensors", "xl/sdxl-ft1.safetensors"],
        [(n, n) for n in ["sd1-base.safetensors", "sd1-ft1.safetensors", "sd1-ft2.safetensors",
                          "xl/sdxl-ft1.safetensors"]])  # gradio 4+ stores (label, value) pairs
    for name in ("merge", "cancel", "analyze", "preview", "load_recipe", "refresh"):
        assert name in tab.events
    # a slider per main block of every registered architecture; before any model is chosen, SD1's 26 show
    sliders = [f for f in tab.components if f.startswith("block_")]
    assert sorted(sliders) == sorted(block_field(b) for b in slider_blocks()) and set(SD1_FIELDS) <= set(sliders)


def test_merge_through_the_event_handler(tab, models_dir):
    values = form(tab, models=["sd1-ft1.safetensors", "sd1-ft2.safetensors"], alpha=0.3, out_name="ab",
                  dtype="fp32")
    progress = []
    out = tab.run("merge", values, progress=lambda f, desc=None: progress.append(f))
    assert out["status"].startswith("saved ab.safetensors"), out["status"]
    assert progress and progress[-1] == pytest.approx(1.0)
    expected = merge_to_state_dict(Recipe(models=[str(models_dir / "sd1-ft1.safetensors"),
                                                  str(models_dir / "sd1-ft2.safetensors")], alpha=0.3, dtype="fp32"))
    with safe_open(models_dir / "ab.safetensors", "pt") as f:
        for key in ("model.diffusion_model.input_blocks.4.1.proj_in.weight", "first_stage_model.decoder.conv_in.bias"):
            assert f.get_tensor(key).equal(expected.state_dict[key])
        recipe = json.loads(f.metadata()["sd_merge_recipe"])
    assert recipe["alpha"] == 0.3 and recipe["models"] == ["sd1-ft1.safetensors", "sd1-ft2.safetensors"]
    assert json.loads(out["recipe_json"])["models"] == ["sd1-ft1.safetensors", "sd1-ft2.safetensors"]

    again = tab.run("merge", values)
    assert "exists" in again["status"] and "Overwrite" in again["status"]


def test_block_ratios_presets_text_and_sliders_stay_in_sync(tab, models_dir):
    values = form(tab, models=["sd1-ft1.safetensors", "sd1-ft2.safetensors"])
    arch = tab.run("models", values)
    assert arch["arch"] == "sd1" and "Stable Diffusion 1.x" in arch["arch_info"]

    out = tab.run("preset", form(tab, preset="GRAD_V", arch="sd1"))
    grad_v = preset_values("GRAD_V", "sd1")
    assert [update_value(out[f]) for f in SD1_FIELDS] == pytest.approx(grad_v)
    assert update_value(out["use_blocks"]) is True
    assert out["mbw_text"].split(",")[:3] == ["0", "1", "0.9166666667"]

    text = ",".join(["0.25"] * 26)
    out = tab.run("mbw_text_submit", form(tab, mbw_text=text, arch="sd1", alpha=0.5))
    assert [update_value(out[f]) for f in SD1_FIELDS] == [0.25] * 26

    sliders = {f: 0.5 for f in SD1_FIELDS}
    sliders["block_IN04"] = 1.0
    out = tab.run("slider_IN04", form(tab, arch="sd1", **sliders))
    assert out["mbw_text"].split(",")[5] == "1"

    bad = tab.run("mbw_text_submit", form(tab, mbw_text="1,2,x", arch="sd1", alpha=0.5))
    assert "not a number" in bad["status"]

    # the merge uses the sliders: IN04 at 1 takes B's weights there, the rest is the 0.5 mix
    merged = tab.run("merge", form(tab, models=["sd1-ft1.safetensors", "sd1-ft2.safetensors"], use_blocks=True,
                                   arch="sd1", out_name="blocks", **sliders))
    assert merged["status"].startswith("saved"), merged["status"]
    key = "model.diffusion_model.input_blocks.4.1.proj_in.weight"
    with safe_open(models_dir / "blocks.safetensors", "pt") as f, \
            safe_open(models_dir / "sd1-ft2.safetensors", "pt") as b:
        assert f.get_tensor(key).equal(b.get_tensor(key))
        other = "model.diffusion_model.input_blocks.5.1.proj_in.weight"
        assert not f.get_tensor(other).equal(b.get_tensor(other))


def test_sdxl_models_show_twenty_blocks(tab):
    out = tab.run("models", form(tab, models=["xl/sdxl-ft1.safetensors"]))
    assert out["arch"] == "sdxl"
    visible = [b for b in slider_blocks() if out[f"block_{b}"]["visible"]]
    assert len(visible) == 20 and "IN09" not in visible and "OUT11" not in visible
    assert len(out["mbw_text"].split(",")) == 20


def test_method_change_shows_only_its_parameters(tab):
    controller = tab.controller
    for method in controller.method_names():
        out = tab.run("method", form(tab, method=method))
        declared = {p.name for p in controller.widgets if method in p.defaults}
        shown = {w.name for w in controller.widgets if out[w.field]["visible"]}
        assert shown == declared, method
        assert method in out["method_info"]
        for w in controller.widgets:
            if w.name in declared and out[w.field]["visible"]:
                assert out[w.field]["label"] == f"{w.name} — {methods.get_method(method).param(w.name).help}"
    add_diff = tab.run("method", form(tab, method="add_difference"))
    assert add_diff["base"]["visible"] is True
    assert tab.run("method", form(tab, method="weighted_sum"))["base"]["visible"] is False


def applied(values, out):
    """The form after an event: its outputs' values (plain, or an update's `value`) replace the fields'."""
    values = dict(values)
    for name, result in out.items():
        if not is_update(result) or "value" in result:
            values[name] = update_value(result)
    return values


def test_alpha_slider_starts_at_and_follows_the_methods_published_default(tab):
    """α used to start at 0.5 whatever the method: ties then gave base + ½·τ* instead of ties."""
    assert default_alpha("ties") == 1.0 and default_alpha("weighted_sum") == 0.5
    assert tab.components["method"].value == "weighted_sum"
    assert tab.components["alpha"].value == 0.5
    assert "alpha" in tab.events["method"].outputs
    for method in tab.controller.method_names():
        out = tab.run("method", form(tab, method=method, alpha=0.37))
        assert out["alpha"] == methods.get_method(method).default_ratio, method
    ties = tab.run("method", form(tab, method="ties", alpha=0.3))
    assert ties["alpha"] == 1.0 and ties["status"] == "α set to 1 (ties default)"
    back = tab.run("method", form(tab, method="weighted_sum", alpha=1.0))
    assert back["alpha"] == 0.5 and back["status"] == "α set to 0.5 (weighted_sum default)"
    assert tab.run("method", form(tab, method="nope"))["status"].startswith("unknown method")


def test_alpha_slider_starts_at_the_default_methods_alpha(models_dir):
    from merge_lab_extension.controller import TabController

    class TiesFirst(TabController):  # a method list without weighted_sum: the tab opens on its first, ties
        def method_names(self):
            return ["ties", *[m for m in super().method_names() if m not in ("ties", "weighted_sum")]]

    backend = FolderBackend([models_dir])
    tab = build_tab(backend, controller=TiesFirst(backend))
    assert tab.components["method"].value == "ties"
    assert tab.components["alpha"].value == 1.0


def test_ties_merged_from_the_tab_is_ties_as_published(tab, models_dir):
    names = ["sd1-ft1.safetensors", "sd1-ft2.safetensors"]
    values = form(tab, models=names, base="sd1-base.safetensors", out_name="ties-tab", dtype="fp32", method="ties")
    values = applied(values, tab.run("method", values))  # what choosing ties in the dropdown does
    assert values["method"] == "ties" and values["alpha"] == 1.0
    out = tab.run("merge", values)
    assert out["status"].startswith("saved ties-tab.safetensors"), out["status"]
    assert json.loads(out["recipe_json"])["alpha"] == 1.0
    # the recipe without α (the method's default) is the same merge, in the file's tensors and its record
    expected = merge_to_state_dict(Recipe(models=[str(models_dir / n) for n in names], method="ties",
                                          base=str(models_dir / "sd1-base.safetensors"), dtype="fp32"))
    with safe_open(models_dir / "ties-tab.safetensors", "pt") as f:
        for key in ("model.diffusion_model.input_blocks.4.1.proj_in.weight", "first_stage_model.decoder.conv_in.bias"):
            assert f.get_tensor(key).equal(expected.state_dict[key])
        recipe = json.loads(f.metadata()["sd_merge_recipe"])
    assert recipe["alpha"] == 1.0 and recipe["method"] == "ties"
    assert recipe["recipe_hash"] == expected.fingerprint


def test_a_form_without_alpha_takes_the_methods_default(tab, models_dir):
    values = form(tab, models=["sd1-ft1.safetensors", "sd1-ft2.safetensors"], base="sd1-base.safetensors",
                  method="ties")
    del values["alpha"]
    recipe = tab.controller.recipe(values)
    assert recipe.alpha is None and recipe.effective_alpha() == 1.0
    assert "must be a number" in tab.run("check", {**values, "alpha": "x"})["status"]


def _with_record(folder, name, record):
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "sd1-ft1.safetensors")
    save_file(tensors, folder / name, metadata={"format": "pt", "sd_merge_recipe": json.dumps(record)})
    return name


def test_loaded_recipe_keeps_its_alpha_and_one_without_gets_the_methods_default(tab, models_dir):
    models = ["sd1-ft1.safetensors", "sd1-ft2.safetensors"]
    cases = [
        ({"type": "merge-lab", "method": "ties", "models": models, "base": "sd1-base.safetensors"}, "ties", 1.0),
        ({"type": "merge-lab", "method": "ties", "models": models, "base": "sd1-base.safetensors", "alpha": 0.4},
         "ties", 0.4),
        ({"method": "weighted_sum", "models": models}, "weighted_sum", 0.5),
        ({"method": "slerp", "models": models, "alpha": 0.8}, "slerp", 0.8),
        # the web UI's own merger: what it stored; without a multiplier, the method's default
        ({"type": "webui", "interp_method": "Add difference", "multiplier": 0.3}, "add_difference", 0.3),
        ({"type": "webui", "interp_method": "Weighted sum", "multiplier": 0.75}, "weighted_sum", 0.75),
        ({"type": "webui", "interp_method": "Add difference"}, "add_difference", 1.0),
    ]
    for i, (record, method, alpha) in enumerate(cases):
        name = _with_record(models_dir, f"record-{i}.safetensors", record)
        out = tab.run("load_recipe", form(tab, recipe_source=name))
        assert out["status"].startswith(f"recipe loaded from {name}"), (record, out["status"])
        assert update_value(out["method"]) == method and out["alpha"] == alpha, record
    values, notes = form_from_record({"method": "ties", "alpha": "high"}, lambda n: n)
    assert values["alpha"] == 1.0 and any("alpha 'high' is not a number" in n for n in notes)


def test_load_recipe_from_a_merged_files_metadata(tab, models_dir):
    values = form(tab, models=["sd1-ft2.safetensors", "sd1-ft1.safetensors"], alpha=0.7, use_blocks=True,
                  arch="sd1", extra_blocks="VAE=0", out_name="with-recipe",
                  **dict(zip(SD1_FIELDS, preset_values("GRAD_A", "sd1"))))
    assert tab.run("merge", values)["status"].startswith("saved")
    out = tab.run("load_recipe", form(tab, recipe_source="with-recipe.safetensors"))
    assert out["status"] == "recipe loaded from with-recipe.safetensors"
    assert out["models"] == ["sd1-ft2.safetensors", "sd1-ft1.safetensors"]
    assert out["alpha"] == 0.7 and out["use_blocks"] is True and out["extra_blocks"] == "VAE=0"
    assert [update_value(out[f]) for f in SD1_FIELDS] == pytest.approx(preset_values("GRAD_A", "sd1"))

    plain = tab.run("load_recipe", form(tab, recipe_source="sd1-ft1.safetensors"))
    assert "no sd_merge_recipe" in plain["status"]


def test_bad_input_gives_one_line_and_writes_nothing(tab, models_dir):
    before = sorted(p.name for p in models_dir.iterdir())
    cases = [
        (dict(models=[]), "choose the models"),
        (dict(models=["sd1-ft1.safetensors", "../x.safetensors"]), "'..'"),
        (dict(models=["sd1-ft1.safetensors", "/etc/hosts"]), "outside the model folders"),
        (dict(models=["sd1-ft1.safetensors", "sd1-ft2.safetensors"], out_name="sub/x"), "plain file name"),
        (dict(models=["sd1-ft1.safetensors", "sd1-ft2.safetensors"], out_name=""), "no output name"),
        (dict(models=["sd1-ft1.safetensors", "xl/sdxl-ft1.safetensors"], out_name="mixed"), "architectures"),
        (dict(models=["sd1-ft1.safetensors", "sd1-ft2.safetensors"], out_name="x", extra_blocks="NOPE=1"),
         "unknown block"),
        (dict(models=["sd1-ft1.safetensors", "sd1-ft2.safetensors"], out_name="x", weights="1,a"), "weights"),
    ]
    for changes, message in cases:
        status = tab.run("merge", form(tab, **changes))["status"]
        assert message in status and "\n" not in status, (changes, status)
    assert sorted(p.name for p in models_dir.iterdir()) == before


def test_cancel_stops_a_running_merge(tab, models_dir):
    controller = tab.controller
    seen = []

    def progress(fraction, desc=None):
        seen.append(fraction)
        if len(seen) == 1:
            assert tab.run("cancel", {})["status"].startswith("cancelling")

    out = tab.run("merge", form(tab, models=["sd1-ft1.safetensors", "sd1-ft2.safetensors"], out_name="cancelled",
                                memory_budget="1MB"), progress=progress)
    assert out["status"] == "merge cancelled; nothing was written"
    assert not (models_dir / "cancelled.safetensors").exists()
    assert not any(p.name.startswith(".") or p.suffix == ".partial" for p in models_dir.iterdir())
    assert tab.run("cancel", {})["status"] == "nothing to cancel"
    assert controller.backend.jobs.running is None


def test_refresh_picks_up_new_files(tab, models_dir):
    shutil.copy(models_dir / "sd1-ft1.safetensors", models_dir / "new.safetensors")
    out = tab.run("refresh", form(tab, models=["sd1-ft1.safetensors", "gone.safetensors"]))
    assert "new.safetensors" in out["models"]["choices"] or ("new.safetensors", "new.safetensors") in \
        out["models"]["choices"]
    assert out["models"]["value"] == ["sd1-ft1.safetensors"]


def test_analyze_shows_the_engines_theta_per_block(tab, models_dir):
    from merge_lab.analysis import analyze
    from merge_lab.cli.tables import format_angle

    names = ["sd1-ft1.safetensors", "sd1-ft2.safetensors"]
    out = tab.run("analyze", form(tab, models=names), progress=lambda f, desc=None: None)
    assert out["status"].startswith("θ per block for 2 models (1 pair(s))"), out["status"]
    expected = analyze([str(models_dir / n) for n in names])
    in04 = next(b for b in expected.blocks if b.block == "IN04")
    row = out["theta_table"].split("<th>IN04</th>")[1].split("</tr>")[0]
    assert f"{in04.angles[0]:.1f}°" in row and format_angle(in04.angles[0])
    assert out["heatmap"].size[0] > 100 and out["heatmap"].size[1] > 100


def test_events_behind_forges_wrapper_get_only_the_keywords_gradio_takes():
    """Forge wraps every gradio event in EventWrapper(*args, **kwargs), which hides the listener's signature;
    passing it a keyword of another gradio version (api_visibility) made the tab fail to build in Forge."""
    from merge_lab_extension import compat

    received = {}

    def gradio4_click(fn, inputs=None, outputs=None, queue=None, show_progress="full"):  # no **kwargs
        received.update(fn=fn, queue=queue, show_progress=show_progress)
        return "dependency"

    class EventWrapper:  # the shape of Forge's modules/gradio_extensions.EventWrapper
        def __init__(self, replaced_event):
            self.replaced_event = replaced_event

        def __call__(self, *args, **kwargs):
            return self.replaced_event(*args, **kwargs)

    class Button:
        click = EventWrapper(gradio4_click)

    class Opaque:  # forwards **kwargs with no trace of the real listener: refused keywords are dropped
        @staticmethod
        def click(*args, **kwargs):
            return gradio4_click(*args, **kwargs)

    for component in (Button(), Opaque()):
        received.clear()
        assert compat.on(component, "click", print, [], [], queue=False, api_visibility="undocumented",
                         show_api=False) == "dependency"
        assert received == {"fn": print, "queue": False, "show_progress": "full"}


def test_adjust_field_merges_records_and_loads_back(tab, models_dir):
    """SuperMerger's Adjust from the tab's field: the merge's conv_in is scaled, the record keeps the 8 values
    and reads back into the field; a bad field is a one-line status."""
    assert tab.values()["adjust"] == ""
    values = form(tab, models=["sd1-ft1.safetensors", "sd1-ft2.safetensors"], alpha=0.3, dtype="fp32",
                  out_name="adjusted", adjust="2, 0, 0, 0, 0, 0, 0, -1")
    assert tab.run("merge", values)["status"].startswith("saved adjusted.safetensors")
    plain = merge_to_state_dict(Recipe(models=[str(models_dir / "sd1-ft1.safetensors"),
                                               str(models_dir / "sd1-ft2.safetensors")], alpha=0.3, dtype="fp32"))
    key = "model.diffusion_model.input_blocks.0.0.weight"
    with safe_open(models_dir / "adjusted.safetensors", "pt") as f:
        assert torch.allclose(f.get_tensor(key), plain.state_dict[key] * 0.98)
        assert json.loads(f.metadata()["sd_merge_recipe"])["adjust"] == [2, 0, 0, 0, 0, 0, 0, -1]
    out = tab.run("load_recipe", form(tab, recipe_source="adjusted.safetensors"))
    assert update_value(out["adjust"]) == "2,0,0,0,0,0,0,-1"
    status = tab.run("merge", form(tab, **{**values, "adjust": "1,2,3", "out_name": "bad"}))["status"]
    assert "adjust takes 8 numbers" in status and "\n" not in status
    assert not (models_dir / "bad.safetensors").exists()


def test_beta_block_ratios_field_merges_records_and_loads_back(tab, models_dir):
    """The tab's β block ratios (SuperMerger's weights B) for triple_sum: OUT11's β from the 26-value text,
    recorded, read back into the field; for a method without β a one-line status and no file."""
    names = ["sd1-ft1.safetensors", "sd1-ft2.safetensors", "sd1-base.safetensors"]
    text = ",".join(["0.1"] * 25 + ["0.4"])
    values = form(tab, models=names, method="triple_sum", alpha=0.3, dtype="fp32", out_name="betas",
                  beta_blocks=text)
    assert tab.run("merge", values)["status"].startswith("saved betas.safetensors")
    key = "model.diffusion_model.output_blocks.11.0.in_layers.2.weight"
    a, b, c = (merge_to_state_dict(Recipe(models=[str(models_dir / n)], method="passthrough", dtype="fp32"))
               .state_dict[key] for n in names)
    with safe_open(models_dir / "betas.safetensors", "pt") as f:
        assert torch.allclose(f.get_tensor(key), 0.3 * a + 0.3 * b + 0.4 * c, atol=1e-6)
    out = tab.run("load_recipe", form(tab, recipe_source="betas.safetensors"))
    assert update_value(out["beta_blocks"]) == text
    status = tab.run("merge", form(tab, **{**values, "method": "weighted_sum", "models": names[:2],
                                           "out_name": "bad"}))["status"]
    assert "has no beta parameter" in status and "\n" not in status
    assert not (models_dir / "bad.safetensors").exists()
