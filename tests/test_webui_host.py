"""The host adapter against the stand-in web UI (AUTOMATIC1111 and Forge flavours): callbacks, the tab, the
X/Y/Z axes, in-memory models under a virtual checkpoint, previews through the host's txt2img, the HTTP route."""

from __future__ import annotations

import hashlib
import os

import pytest
import torch
from safetensors.torch import load_file

from merge_lab.engine import merge_to_state_dict
from merge_lab.recipe import Recipe

from .webui_host import start_webui, stop_webui

# Which hosts to play (test_gradio_versions.py pairs each with the gradio it ships: A1111 and reForge 3.41,
# Forge 4.40); all three by default.
FLAVOURS = os.environ.get("MERGE_LAB_HOST_FLAVOURS", "a1111,reforge,forge").split(",")


def digest_of(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].float().numpy().tobytes())
    return h.hexdigest()


_expected: dict[str, str] = {}


def expected_digest(recipe: Recipe) -> str:
    key = repr(sorted(recipe.to_dict().items()))
    if key not in _expected:
        _expected[key] = digest_of(merge_to_state_dict(recipe).state_dict)
    return _expected[key]


@pytest.fixture(params=FLAVOURS)
def webui(request, tmp_path, sd1_family, monkeypatch):
    base, fts = sd1_family
    ui = start_webui(tmp_path, request.param, [base, *fts[:2]], monkeypatch)
    yield ui
    stop_webui()


@pytest.fixture
def a1111(tmp_path, sd1_family, monkeypatch):
    base, fts = sd1_family
    ui = start_webui(tmp_path, "a1111", [base, *fts[:2]], monkeypatch)
    yield ui
    stop_webui()


def tab_of(ui):
    assert len(ui.tabs) == 1
    blocks, title, elem_id = ui.tabs[0]
    assert (title, elem_id) == ("Merge Lab", "merge_lab")
    return ui.backend, blocks


def _recipe(ui, alpha=0.5, **kw) -> Recipe:
    d = ui.models_dir
    return Recipe(models=[str(d / "sd1-ft1.safetensors"), str(d / "sd1-ft2.safetensors")], alpha=alpha, **kw)


# ---- loading as an extension ---------------------------------------------------------------------------------

def test_entry_script_registers_callbacks_script_and_axes(webui):
    m = webui.modules
    assert not m.scripts.errors
    kinds = {k: [c.name for c in v] for k, v in m.script_callbacks.callback_map.items()}
    assert kinds["callbacks_ui_tabs"] == ["on_ui_tabs"]
    assert kinds["callbacks_app_started"] == ["on_app_started"]
    assert kinds["callbacks_before_ui"] == ["on_before_ui"]
    titles = [s.title() for s in m.scripts.scripts_txt2img.alwayson_scripts]
    assert titles == ["Merge Lab"]
    labels = [o.label for o in webui.xyz.current_axis_options]
    # appended after the host's own axes, found by label (never by a fixed index)
    assert labels[:5] == ["Nothing", "Seed", "Steps", "Prompt S/R", "Checkpoint name"]
    for label in ("[Merge Lab] alpha", "[Merge Lab] block ratio IN04", "[Merge Lab] block ratio TE1",
                  "[Merge Lab] method", "[Merge Lab] preset"):
        assert label in labels
    assert labels.count("[Merge Lab] alpha") == 1


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

    from .webui_host import ROOT, STANDIN

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


def test_tab_lists_the_hosts_models(webui):
    backend, _ = tab_of(webui)
    assert backend.model_names() == ["sd1-base.safetensors", "sd1-ft1.safetensors", "sd1-ft2.safetensors"]
    assert backend.resolve_model("sd1-ft1") == str(webui.models_dir / "sd1-ft1.safetensors")  # name_for_extra
    with pytest.raises(Exception, match="outside the model folders"):
        backend.resolve_model("/etc/passwd")
    with pytest.raises(Exception, match=r"'\.\.'"):
        backend.resolve_model("../Stable-diffusion/sd1-ft1.safetensors")


# ---- previews: merged weights in memory, rendered by the host ----------------------------------------------

def test_preview_loads_the_merge_in_memory_and_renders_with_the_hosts_txt2img(webui):
    backend, _ = tab_of(webui)
    m = webui.modules
    recipe = _recipe(webui, alpha=0.3)
    from merge_lab_extension.backend import PreviewSettings

    result = backend.preview(recipe, PreviewSettings(prompt="a cat", seed=7, steps=3, sampler="Euler a"))
    model = m.shared.sd_model
    info = model.sd_checkpoint_info
    # the weights of the running model are exactly the merge; its name and hash are the recipe's
    assert model.digest == expected_digest(recipe)
    assert result.images[0].info["weights_digest"] == model.digest
    assert info.merge_lab_fingerprint == result.recipe_hash
    assert f"Model hash: {result.recipe_hash[:10]}" in result.infotext
    assert f"Model: merge-lab-weighted_sum-{result.recipe_hash[:10]}" in result.infotext
    assert backend.stats["merges"] == 1
    if webui.flavour == "a1111":  # through the host's own switch: weights loaded in place, never from a file
        assert ("load_weights_in_place", info.title) in m.sd_models.events
        assert not any(e[0] == "load_file" and "merge-lab" in e[1] for e in m.sd_models.events)
        assert model.hijacked and m.sd_models.model_data.loaded_sd_models == [model]
        assert not m.sd_models.checkpoints_loaded  # the cache is off (0): the merge is not kept twice
    elif webui.flavour == "reforge":
        assert ("load_state_dict", info.title) in m.sd_models.events
        assert not any(e[0] == "load_file" and "merge-lab" in e[1] for e in m.sd_models.events)
    else:
        loaded = [e for e in m.sd_models.events if e[0] == "load_file" and "merge-lab" in e[1]]
        assert len(loaded) == 1 and not loaded[0][1].startswith(str(webui.models_dir) + os.sep)
        assert loaded[0][1].startswith(backend.temp_folder())
        m.sd_models.list_models()  # the temporary file is not listed as a checkpoint
        assert not any("merge-lab" in t for t in m.sd_models.checkpoints_list)
    assert m.shared.state.begun >= 1 and m.shared.state.job == ""

    # the merge stays the current model: an ordinary generation afterwards does not reload the dropdown's model
    before = len(m.sd_models.events)
    plain = m.processing.process_images(webui.txt2img(prompt="x", seed=1))
    assert plain.images[0].info["weights_digest"] == expected_digest(recipe)
    assert len(m.sd_models.events) == before

    # the same recipe again: no second merge
    backend.preview(recipe, PreviewSettings(prompt="a dog", seed=8, steps=3))
    assert backend.stats["merges"] == 1

    # choosing a real model afterwards loads it (our virtual file name is not model A's)
    m.shared.opts.data["sd_model_checkpoint"] = "sd1-ft1.safetensors"
    if webui.flavour == "forge":
        import modules_forge.main_entry as main_entry

        main_entry.refresh_model_loading_parameters()
    again = m.processing.process_images(webui.txt2img(prompt="x", seed=1))
    assert again.images[0].info["weights_digest"] == digest_of(load_file(webui.models_dir / "sd1-ft1.safetensors"))


def test_tab_merge_and_preview_button(webui):
    backend, _ = tab_of(webui)
    from merge_lab_extension.ui import build_tab

    tab = build_tab(backend)
    values = tab.values()
    values.update(models=["sd1-ft1.safetensors", "sd1-ft2.safetensors"], alpha=0.25, prompt="a cat", steps=4)
    out = tab.run("preview", values)
    assert out["status"].startswith("preview of merge-lab-weighted_sum-"), out["status"]
    assert out["preview_image"].info["weights_digest"] == expected_digest(_recipe(webui, alpha=0.25))
    assert "Steps: 4" in out["preview_info"]
    # the tab's recipe became the X/Y/Z base recipe
    assert backend.xyz_recipe.alpha == 0.25


# ---- X/Y/Z ---------------------------------------------------------------------------------------------------

def run_xyz(ui, x_label, x_values, y_label="Nothing", y_values="", z_label="Nothing", z_values=""):
    p = ui.txt2img(prompt="a cat", seed=5, steps=2)
    xyz = ui.xyz
    return xyz.run(p, ui.axis_index(x_label), x_values, [], ui.axis_index(y_label), y_values, [],
                   ui.axis_index(z_label), z_values, [])


def test_xyz_alpha_by_seed_merges_each_recipe_once_and_restores_the_model(webui):
    backend, _ = tab_of(webui)
    m = webui.modules
    original = m.shared.sd_model.digest
    backend.remember_xyz_recipe(_recipe(webui))
    # alpha on X (cost 1) is the outer loop; the seed axis reuses each merge
    result = run_xyz(webui, "Seed", "1, 2, 3", "[Merge Lab] alpha", "0.2, 0.8")
    assert backend.stats["merges"] == 2
    assert result.labels[1] == ["α=0.2", "α=0.8"]
    for (ix, iy, _), processed in result.cells.items():
        alpha = [0.2, 0.8][iy]
        image = processed.images[0]
        assert image.info["weights_digest"] == expected_digest(_recipe(webui, alpha=alpha))
        assert "Merge Lab recipe: " in processed.infotexts[0]
        assert f"Seed: {[1, 2, 3][ix]}" in processed.infotexts[0]
    hashes = {p.infotexts[0].split("Model hash: ")[1].split(",")[0] for p in result.cells.values()}
    assert len(hashes) == 2
    # the setting was never changed to a merge: after the grid, the dropdown's model is what runs
    assert not m.shared.opts.data["sd_model_checkpoint"].startswith("merge-lab")
    plain = m.processing.process_images(webui.txt2img(prompt="x", seed=1))
    assert plain.images[0].info["weights_digest"] == original


def test_xyz_block_method_and_preset_axes(a1111):
    webui = a1111  # the axes do not depend on how the host loads models
    backend, _ = tab_of(webui)
    backend.remember_xyz_recipe(_recipe(webui, alpha=0.5))
    # axes with choices (preset, method) take the dropdown's values
    p = webui.txt2img(prompt="a cat", seed=5, steps=2)
    result = webui.xyz.run(p, webui.axis_index("[Merge Lab] block ratio IN04"), "0, 1", [],
                           webui.axis_index("[Merge Lab] method"), "", ["weighted_sum", "slerp"],
                           webui.axis_index("[Merge Lab] preset"), "", ["GRAD_V"])
    assert len(result.cells) == 4
    assert backend.stats["merges"] == 4
    assert result.labels == (["IN04=0", "IN04=1"], ["weighted_sum", "slerp"], ["GRAD_V"])
    for (ix, iy, _), processed in result.cells.items():
        recipe = _recipe(webui, alpha=0.5, blocks="GRAD_V", block={"IN04": [0.0, 1.0][ix]},
                         method=["weighted_sum", "slerp"][iy])
        assert processed.images[0].info["weights_digest"] == expected_digest(recipe)


def test_xyz_confirms_values_before_the_grid_starts(a1111):
    webui = a1111
    backend, _ = tab_of(webui)
    with pytest.raises(Exception, match="no Merge Lab recipe for the X/Y/Z plot"):
        run_xyz(webui, "[Merge Lab] alpha", "0.5")
    backend.remember_xyz_recipe(_recipe(webui))
    with pytest.raises(Exception, match="outside"):
        run_xyz(webui, "[Merge Lab] alpha", "0.5, 7")
    with pytest.raises(Exception, match="unknown method"):
        p = webui.txt2img(prompt="a cat", seed=5, steps=2)
        webui.xyz.run(p, webui.axis_index("[Merge Lab] method"), "", ["nope"], 0, "", [], 0, "", [])
    assert backend.stats["merges"] == 0


# ---- the HTTP route --------------------------------------------------------------------------------------------

def client_for(ui):
    """The route on the host's FastAPI app, added by our on_app_started callback."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    ui.modules.script_callbacks.app_started_callback(None, app)
    return TestClient(app)


def test_api_merge_in_memory_and_to_a_file(webui):
    client = client_for(webui)
    m = webui.modules
    body = {"models": ["sd1-ft1.safetensors", "sd1-ft2"], "method": "weighted_sum", "alpha": 0.4}
    r = client.post("/merge-lab/v1/merge", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["action"] == "loaded"
    assert data["model"]["title"] == m.shared.sd_model.sd_checkpoint_info.title
    assert m.shared.sd_model.digest == expected_digest(_recipe(webui, alpha=0.4))
    assert m.shared.opts.data["sd_model_checkpoint"] == data["model"]["title"]

    r = client.post("/merge-lab/v1/merge", json={**body, "out": "api-out"})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["action"] == "saved" and data["output"]["name"] == "api-out.safetensors"
    saved = webui.models_dir / "api-out.safetensors"
    assert saved.is_file()
    assert "api-out.safetensors" in client.get("/merge-lab/v1/models").json()["models"]
    r = client.post("/merge-lab/v1/merge", json={**body, "out": "api-out"})
    assert r.status_code == 409


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
    names = [m["name"] for m in client_for(a1111).get("/merge-lab/v1/methods").json()["methods"]]
    assert "weighted_sum" in names


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
