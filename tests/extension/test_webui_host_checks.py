"""Host-independent checks of the web-UI side (played against the AUTOMATIC1111 stand-in): loading as an
extension from its folder alone, the name-clash guard, the X/Y/Z axes' values and validation, the HTTP
route's validation and analysis. test_webui_host.py covers what differs between the hosts."""

from __future__ import annotations

import pytest

import merge_lab_methods as methods
from tests.extension.webui_host import (
    client_for,
    expected_digest,
    recipe_of,
    run_xyz,
    start_webui,
    stop_webui,
    tab_of,
)


@pytest.fixture
def a1111(tmp_path, sd1_family, monkeypatch):
    base, fts = sd1_family
    ui = start_webui(tmp_path, "a1111", [base, *fts[:2]], monkeypatch)
    yield ui
    stop_webui()


LOAD_AS_EXTENSION = r"""
import site, sys
sys.path.append(SITE)  # site-packages without its .pth files: merge-lab's editable install is invisible
sys.path.insert(0, STANDIN)
import importlib
from modules import scripts, script_callbacks, sd_models
assert importlib.util.find_spec("merge_lab") is None
scripts.load_scripts([(ROOT, ROOT + "/scripts/merge_lab_tab.py")])
import merge_lab, merge_lab_extension
assert ROOT not in sys.path, "the extension root stays on sys.path"
assert merge_lab.__file__.startswith(ROOT) and merge_lab_extension.__file__.startswith(ROOT)
assert [d.script_class.__name__ for d in scripts.scripts_data] == ["MergeLabScript"]
assert len(script_callbacks.callback_map["callbacks_ui_tabs"]) == 1
from merge_lab_extension import api, ui, controller  # later, lazy imports still work
print("ok")
"""


NAME_CLASH = r"""
import sys
sys.path.append(SITE)
sys.path.insert(0, STANDIN)
sys.path.insert(0, OTHER)
import merge_lab  # another extension's package of the same name, loaded first
from modules import scripts, script_callbacks
scripts.load_scripts([(ROOT, ROOT + "/scripts/merge_lab_tab.py")])
assert not scripts.errors and not scripts.scripts_data
assert not script_callbacks.callback_map["callbacks_ui_tabs"]
print("ok")
"""


def _run_isolated(tmp_path, code: str, **names):
    import subprocess
    import sys
    import sysconfig

    from tests.extension.webui_host import ROOT, STANDIN

    names = {"SITE": sysconfig.get_paths()["purelib"], "STANDIN": str(STANDIN), "ROOT": str(ROOT), **names}
    prelude = "".join(f"{k} = {v!r}\n" for k, v in names.items())
    env = {"STANDIN_MODELS": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run([sys.executable, "-S", "-c", prelude + code], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)


def test_loads_from_the_extension_folder_alone(tmp_path):
    """As in the web UI: nothing installed, the root on sys.path only while scripts/merge_lab_tab.py runs."""
    run = _run_isolated(tmp_path, LOAD_AS_EXTENSION)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


def test_stays_off_when_another_merge_lab_is_loaded(tmp_path):
    other = tmp_path / "other"
    (other / "merge_lab").mkdir(parents=True)
    (other / "merge_lab" / "__init__.py").write_text("")
    run = _run_isolated(tmp_path, NAME_CLASH, OTHER=str(other))
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
    assert f"[Merge Lab] not loaded: ImportError: another package named merge_lab is loaded from {other}" \
        in run.stderr


def test_xyz_block_method_and_preset_axes(a1111):
    webui = a1111  # the axes do not depend on how the host loads models
    backend, _ = tab_of(webui)
    backend.remember_xyz_recipe(recipe_of(webui, alpha=0.5))
    # axes with choices (preset, method) take the dropdown's values
    p = webui.txt2img(prompt="a cat", seed=5, steps=2)
    result = webui.xyz.run(p, webui.axis_index("[Merge Lab] block ratio IN04"), "0, 1", [],
                           webui.axis_index("[Merge Lab] method"), "", ["weighted_sum", "slerp"],
                           webui.axis_index("[Merge Lab] preset"), "", ["GRAD_V"])
    assert len(result.cells) == 4
    assert backend.stats["merges"] == 4
    assert result.labels == (["IN04=0", "IN04=1"], ["weighted_sum", "slerp"], ["GRAD_V"])
    for (ix, iy, _), processed in result.cells.items():
        recipe = recipe_of(webui, alpha=0.5, blocks="GRAD_V", block={"IN04": [0.0, 1.0][ix]},
                         method=["weighted_sum", "slerp"][iy])
        assert processed.images[0].info["weights_digest"] == expected_digest(recipe)


def test_xyz_confirms_values_before_the_grid_starts(a1111):
    webui = a1111
    backend, _ = tab_of(webui)
    with pytest.raises(Exception, match="no Merge Lab recipe for the X/Y/Z plot"):
        run_xyz(webui, "[Merge Lab] alpha", "0.5")
    backend.remember_xyz_recipe(recipe_of(webui))
    with pytest.raises(Exception, match="outside"):
        run_xyz(webui, "[Merge Lab] alpha", "0.5, 7")
    with pytest.raises(Exception, match="unknown method"):
        p = webui.txt2img(prompt="a cat", seed=5, steps=2)
        webui.xyz.run(p, webui.axis_index("[Merge Lab] method"), "", ["nope"], 0, "", [], 0, "", [])
    assert backend.stats["merges"] == 0


@pytest.mark.parametrize("body, message", [
    ({"models": ["/etc/hosts", "sd1-ft1.safetensors"]}, "outside the model folders"),
    ({"models": ["../../x.safetensors", "sd1-ft1.safetensors"]}, "'..'"),
    ({"models": ["nope.safetensors", "sd1-ft1.safetensors"]}, "unknown model"),
    ({"models": ["sd1-ft1.safetensors", "sd1-ft2.safetensors"], "bogus": 1}, "unknown recipe field"),
    ({"models": ["sd1-ft1.safetensors", "sd1-ft2.safetensors"], "alpha": 9}, "outside"),
    ({"models": ["sd1-ft1.safetensors", "sd1-ft2.safetensors"], "out": "../evil"}, "plain file name"),
    ({"models": ["sd1-ft1.safetensors", "sd1-ft2.safetensors"], "method": "nope"}, "unknown method"),
])
def test_api_refuses_bad_requests_with_one_line(a1111, body, message):
    r = client_for(a1111).post("/merge-lab/v1/merge", json=body)
    assert r.status_code == 400
    detail = r.json()["detail"]
    assert message in detail and "\n" not in detail


def test_api_lists_methods(a1111):
    response = client_for(a1111).get("/merge-lab/v1/methods")
    assert response.status_code == 200
    entries = response.json()["methods"]
    assert [m["name"] for m in entries] == methods.method_names()  # every registered method, once, in order
    for entry in entries:
        method = methods.get_method(entry["name"])
        fields = ("summary", "base", "min_models", "max_models", "default_alpha")
        assert tuple(entry[f] for f in fields) == (method.summary, method.base, method.min_models,
                                                   method.max_models, method.default_ratio), entry["name"]
        assert [p["name"] for p in entry["params"]] == [p.name for p in method.params], entry["name"]
        for listed_param, p in zip(entry["params"], method.params):
            assert listed_param == {"name": p.name, "type": p.kind.__name__, "default": p.default, "help": p.help,
                                    **({"choices": list(p.choices)} if p.choices else {})}, entry["name"]
    listed = {m["name"]: m for m in entries}
    # published facts, independently of the registry: the α a body without "alpha" is merged with …
    assert {n: listed[n]["default_alpha"] for n in ("weighted_sum", "slerp", "ties", "task_arithmetic",
                                                   "model_stock")} == \
        {"weighted_sum": 0.5, "slerp": 0.5, "ties": 1.0, "task_arithmetic": 1.0, "model_stock": 1.0}
    # … and TIES' parameters as the tab and the CLI show them
    assert [(p["name"], p["type"], p["default"]) for p in listed["ties"]["params"]] == \
        [("k", "float", 0.2), ("scale", "float", 1.0), ("election", "str", "mass")]
    assert listed["ties"]["params"][2]["choices"] == ["mass", "count"] and listed["ties"]["base"] == "required"
    assert tuple(listed["slerp"][f] for f in ("base", "min_models", "max_models")) == ("never", 2, 2)


def test_xyz_axes_with_a_recipe_without_alpha(a1111):
    """A recipe from the HTTP route has no α (the method's default): the method axis gives each method its
    own default, the α axis sets it."""
    webui = a1111
    backend, _ = tab_of(webui)
    base = str(webui.models_dir / "sd1-base.safetensors")
    backend.remember_xyz_recipe(recipe_of(webui, alpha=None, base=base, method="ties"))
    p = webui.txt2img(prompt="a cat", seed=5, steps=2)
    methods_ = ["multislerp", "ties"]
    result = webui.xyz.run(p, webui.axis_index("[Merge Lab] method"), "", methods_, 0, "", [], 0, "", [])
    assert len(result.cells) == 2 and backend.stats["merges"] == 2
    for (ix, _, _), processed in result.cells.items():
        expected = recipe_of(webui, alpha={"multislerp": 0.5, "ties": 1.0}[methods_[ix]], base=base,
                             method=methods_[ix])
        assert processed.images[0].info["weights_digest"] == expected_digest(expected)
    result = run_xyz(webui, "[Merge Lab] alpha", "0.25, 1")
    assert result.labels[0] == ["α=0.25", "α=1"]
    for (ix, _, _), processed in result.cells.items():
        expected = recipe_of(webui, alpha=[0.25, 1.0][ix], base=base, method="ties")
        assert processed.images[0].info["weights_digest"] == expected_digest(expected)


def test_xyz_method_axis_moves_alpha_with_the_method_unless_it_was_set():
    from merge_lab.engine.recipe import Recipe
    from merge_lab_extension.xyz_axes import apply_overrides

    tab_default = Recipe(models=["a", "b"], base="c", method="multislerp", alpha=0.5)  # the slider's default
    assert apply_overrides(tab_default, {"method": "ties"}).effective_alpha() == 1.0
    assert apply_overrides(tab_default, {"method": "nuslerp"}).effective_alpha() == 0.5
    assert apply_overrides(tab_default, {}).alpha == 0.5
    chosen = tab_default.replace(alpha=0.3)  # set by the user: kept for every method
    assert apply_overrides(chosen, {"method": "ties"}).alpha == 0.3
    assert apply_overrides(tab_default, {"method": "ties", "alpha": 0.7}).alpha == 0.7
    unset = tab_default.replace(alpha=None)
    assert apply_overrides(unset, {"method": "ties"}).alpha is None
    assert apply_overrides(unset, {"alpha": 0.2}).alpha == 0.2


def test_api_analyze_answers_the_engines_numbers(a1111):
    from merge_lab.analysis import analyze

    body = {"models": ["sd1-ft1.safetensors", "sd1-ft2.safetensors"], "base": "sd1-base.safetensors"}
    r = client_for(a1111).post("/merge-lab/v1/analyze", json=body)
    assert r.status_code == 200, r.text
    d = a1111.models_dir
    expected = analyze([str(d / "sd1-ft1.safetensors"), str(d / "sd1-ft2.safetensors")],
                       str(d / "sd1-base.safetensors")).as_dict()
    assert r.json()["blocks"] == expected["blocks"]
    assert client_for(a1111).post("/merge-lab/v1/analyze", json={**body, "out": "x"}).status_code == 400


def test_xyz_parameter_axis_sets_a_method_parameter_per_cell(tmp_path):
    """`[Merge Lab] parameter (NAME=VALUE)`: β of SuperMerger's triple sum per cell (after a method axis, which
    keeps only the new method's parameters); a name the method lacks is refused before the grid starts."""
    import torch
    from safetensors.torch import load_file

    from merge_lab.archs import layout_for
    from merge_lab.demo.models import base_state_dict, finetune_state_dict, save_state_dict
    from merge_lab.engine import merge_to_state_dict
    from merge_lab.engine.recipe import Recipe
    from merge_lab.errors import RecipeError
    from merge_lab_extension.xyz_axes import AXIS_PREFIX, apply_overrides, xyz_axes

    base = base_state_dict(layout_for("sd1", width=8, vocab=256), seed=1, dtype=torch.float32)
    paths = [str(save_state_dict(s, tmp_path / f"m{i}.safetensors"))
             for i, s in enumerate((base, finetune_state_dict(base, 1, 0), finetune_state_dict(base, 2, 0)))]

    class Axis:
        def __init__(self, label, kind, apply, **kw):
            self.label, self.apply, self.kw = label, apply, kw

    axes = {a.label: a for a in xyz_axes(None, Axis)}
    axis = axes[AXIS_PREFIX + "parameter (NAME=VALUE)"]

    class Cell:
        pass

    cell = Cell()
    axes[AXIS_PREFIX + "method"].apply(cell, "triple_sum", [])
    axis.apply(cell, "beta=0.4", [])
    recipe = apply_overrides(Recipe(models=paths, method="ties", params={"k": 0.3}, alpha=0.5),
                             cell.merge_lab_overrides)
    assert recipe.method == "triple_sum" and recipe.params == {"beta": "0.4"}
    merged = merge_to_state_dict(recipe).state_dict
    a, b, c = (load_file(p) for p in paths)
    key = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    torch.testing.assert_close(merged[key], 0.1 * a[key] + 0.5 * b[key] + 0.4 * c[key])
    with pytest.raises(RecipeError, match="NAME=VALUE"):
        axis.apply(cell, "beta", [])
    bad = Cell()
    axis.apply(bad, "gamma=2", [])
    with pytest.raises((RecipeError, ValueError), match="gamma"):
        apply_overrides(Recipe(models=paths, method="triple_sum"), bad.merge_lab_overrides).validate()
