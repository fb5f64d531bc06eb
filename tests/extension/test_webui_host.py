"""The host adapter against the stand-in web UI, once per host (AUTOMATIC1111, reForge, Forge): callbacks, the
tab, the X/Y/Z axes, in-memory models under a virtual checkpoint, previews through the host's txt2img, the HTTP
route. test_gradio_versions.py runs this file on each host's own gradio; test_webui_host_checks.py has the
host-independent checks."""

from __future__ import annotations

import os

import pytest
from safetensors.torch import load_file

from tests.extension.webui_host import (
    client_for,
    digest_of,
    expected_digest,
    recipe_of,
    run_xyz,
    start_webui,
    stop_webui,
    tab_of,
)

# Which hosts to play (test_gradio_versions.py pairs each with the gradio it ships: A1111 and reForge 3.41,
# Forge 4.40); all three by default.
FLAVOURS = os.environ.get("MERGE_LAB_HOST_FLAVOURS", "a1111,reforge,forge").split(",")


@pytest.fixture(params=FLAVOURS)
def webui(request, tmp_path, sd1_family, monkeypatch):
    base, fts = sd1_family
    ui = start_webui(tmp_path, request.param, [base, *fts[:2]], monkeypatch)
    yield ui
    stop_webui()


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
    recipe = recipe_of(webui, alpha=0.3)
    from merge_lab_extension.backend import PreviewSettings

    result = backend.preview(recipe, PreviewSettings(prompt="a cat", seed=7, steps=3, sampler="Euler a"))
    model = m.shared.sd_model
    info = model.sd_checkpoint_info
    # the weights of the running model are exactly the merge; its name and hash are the recipe's
    assert model.digest == expected_digest(recipe)
    assert result.images[0].info["weights_digest"] == model.digest
    assert info.merge_lab_fingerprint == result.recipe_hash
    assert f"Model hash: {result.recipe_hash[:10]}" in result.infotext
    assert f"Model: merged-weighted_sum-{result.recipe_hash[:10]}" in result.infotext
    assert backend.stats["merges"] == 1
    if webui.flavour == "a1111":  # through the host's own switch: weights loaded in place, never from a file
        assert ("load_weights_in_place", info.title) in m.sd_models.events
        assert not any(e[0] == "load_file" and "merged-" in e[1] for e in m.sd_models.events)
        assert model.hijacked and m.sd_models.model_data.loaded_sd_models == [model]
        assert not m.sd_models.checkpoints_loaded  # the cache is off (0): the merge is not kept twice
    elif webui.flavour == "reforge":
        assert ("load_state_dict", info.title) in m.sd_models.events
        assert not any(e[0] == "load_file" and "merged-" in e[1] for e in m.sd_models.events)
    else:
        loaded = [e for e in m.sd_models.events if e[0] == "load_file" and "merged-" in e[1]]
        assert len(loaded) == 1 and not loaded[0][1].startswith(str(webui.models_dir) + os.sep)
        assert loaded[0][1].startswith(backend.temp_folder())
        m.sd_models.list_models()  # the temporary file is not listed as a checkpoint
        assert not any("merged-" in t for t in m.sd_models.checkpoints_list)
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
    assert out["status"].startswith("preview of merged-weighted_sum-"), out["status"]
    assert out["preview_image"].info["weights_digest"] == expected_digest(recipe_of(webui, alpha=0.25))
    assert "Steps: 4" in out["preview_info"]
    # the tab's recipe became the X/Y/Z base recipe
    assert backend.xyz_recipe.alpha == 0.25


# ---- X/Y/Z ---------------------------------------------------------------------------------------------------

def test_xyz_alpha_by_seed_merges_each_recipe_once_and_restores_the_model(webui):
    backend, _ = tab_of(webui)
    m = webui.modules
    original = m.shared.sd_model.digest
    backend.remember_xyz_recipe(recipe_of(webui))
    # alpha on X (cost 1) is the outer loop; the seed axis reuses each merge
    result = run_xyz(webui, "Seed", "1, 2, 3", "[Merge Lab] alpha", "0.2, 0.8")
    assert backend.stats["merges"] == 2
    assert result.labels[1] == ["α=0.2", "α=0.8"]
    for (ix, iy, _), processed in result.cells.items():
        alpha = [0.2, 0.8][iy]
        image = processed.images[0]
        assert image.info["weights_digest"] == expected_digest(recipe_of(webui, alpha=alpha))
        assert "Merge Lab recipe: " in processed.infotexts[0]
        assert f"Seed: {[1, 2, 3][ix]}" in processed.infotexts[0]
    hashes = {p.infotexts[0].split("Model hash: ")[1].split(",")[0] for p in result.cells.values()}
    assert len(hashes) == 2
    # the setting was never changed to a merge: after the grid, the dropdown's model is what runs
    assert not m.shared.opts.data["sd_model_checkpoint"].startswith("merged-")
    plain = m.processing.process_images(webui.txt2img(prompt="x", seed=1))
    assert plain.images[0].info["weights_digest"] == original


# ---- the HTTP route --------------------------------------------------------------------------------------------

def test_api_merge_in_memory_and_to_a_file(webui):
    client = client_for(webui)
    m = webui.modules
    body = {"models": ["sd1-ft1.safetensors", "sd1-ft2"], "method": "weighted_sum", "alpha": 0.4}
    r = client.post("/merge-lab/v1/merge", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["action"] == "loaded"
    assert data["model"]["title"] == m.shared.sd_model.sd_checkpoint_info.title
    assert m.shared.sd_model.digest == expected_digest(recipe_of(webui, alpha=0.4))
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




def test_api_merge_without_alpha_uses_the_methods_default(webui):
    """A body without "alpha" merges the method as published (ties: α = 1), not at α = 0.5."""
    import json

    from safetensors import safe_open

    client = client_for(webui)
    m = webui.modules
    d = webui.models_dir
    body = {"models": ["sd1-ft1.safetensors", "sd1-ft2.safetensors"], "base": "sd1-base.safetensors",
            "method": "ties"}
    answers = {}
    for name, extra in (("ties-default", {}), ("ties-one", {"alpha": 1}), ("ties-half", {"alpha": 0.5})):
        r = client.post("/merge-lab/v1/merge", json={**body, **extra, "out": name})
        assert r.status_code == 200, r.text
        answers[name] = r.json()
    assert answers["ties-default"]["alpha"] == 1.0 and answers["ties-half"]["alpha"] == 0.5
    assert answers["ties-default"]["recipe_hash"] == answers["ties-one"]["recipe_hash"] != \
        answers["ties-half"]["recipe_hash"]
    records = {}
    for name in answers:
        with safe_open(d / f"{name}.safetensors", "pt") as f:
            records[name] = json.loads(f.metadata()["sd_merge_recipe"])
    assert records["ties-default"]["alpha"] == 1.0 and records["ties-default"]["method"] == "ties"
    assert {k: v for k, v in records["ties-default"].items() if k != "version"} == \
        {k: v for k, v in records["ties-one"].items() if k != "version"}
    default, one = load_file(d / "ties-default.safetensors"), load_file(d / "ties-one.safetensors")
    assert default.keys() == one.keys() and all(default[k].equal(one[k]) for k in default)
    assert digest_of(default) != digest_of(load_file(d / "ties-half.safetensors"))

    # loaded in memory: the same weights; the X/Y/Z axes then vary that recipe, α left to each method
    r = client.post("/merge-lab/v1/merge", json=body)
    assert r.status_code == 200, r.text
    assert r.json()["action"] == "loaded" and r.json()["alpha"] == 1.0
    expected = recipe_of(webui, alpha=1.0, method="ties", base=str(d / "sd1-base.safetensors"))
    assert m.shared.sd_model.digest == expected_digest(expected) == digest_of(default)
    backend, _ = tab_of(webui)
    assert backend.xyz_recipe.alpha is None and backend.xyz_recipe.effective_alpha() == 1.0


def test_flux_merges_load_only_where_the_host_loads_flux(tmp_path, sd1_family, monkeypatch):
    """AUTOMATIC1111 and reForge build LDM UNets only: a Flux merge is refused in one line before merging.
    Forge loads the merged file through its own loader (forge_loader), as it loads Flux downloads."""
    import torch
    from safetensors.torch import save_file

    from merge_lab import archs
    from merge_lab.demo.models import base_state_dict, finetune_state_dict
    from merge_lab.engine import Recipe
    from merge_lab_extension.backend import HostLoadError, PreviewSettings

    base = base_state_dict(archs.layout_for("flux-schnell", width=8, vocab=64), 0, torch.float16)
    flux_files = []
    for i in (1, 2):
        path = tmp_path / f"flux-{i}.safetensors"
        save_file(finetune_state_dict(base, i, 0), str(path))
        flux_files.append(path)
    for flavour in FLAVOURS:
        ui = start_webui(tmp_path / flavour, flavour, [sd1_family[0], *flux_files], monkeypatch)
        try:
            backend, _ = tab_of(ui)
            recipe = Recipe(models=[str(ui.models_dir / p.name) for p in flux_files], alpha=0.5)
            if flavour == "forge":
                backend.preview(recipe, PreviewSettings(prompt="a cat", seed=1, steps=2))
                loaded = [e for e in ui.modules.sd_models.events if e[0] == "load_file" and "merged-" in e[1]]
                assert len(loaded) == 1 and backend.stats["merges"] == 1
                assert ui.modules.shared.sd_model.digest == expected_digest(recipe)
            else:
                with pytest.raises(HostLoadError) as err:
                    backend.preview(recipe, PreviewSettings(prompt="a cat", seed=1, steps=2))
                message = str(err.value)
                assert "Flux.1 schnell" in message and "Forge" in message and "\n" not in message
                assert backend.stats["merges"] == 0
        finally:
            stop_webui()
