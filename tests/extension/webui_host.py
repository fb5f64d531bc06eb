"""Bring up the stand-in web UI (tests/extension/webui_standin) with Merge Lab installed as an extension."""

from __future__ import annotations

import hashlib
import importlib
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from merge_lab.engine import Recipe, merge_to_state_dict

ROOT = Path(__file__).resolve().parents[2]
STANDIN = Path(__file__).resolve().parent / "webui_standin"


@dataclass
class StandinWebUI:
    flavour: str
    models_dir: Path
    modules: Any  # namespace of the stand-in's modules
    xyz: Any  # the X/Y/Z Script instance (UI built)
    tabs: list
    backend: Any

    def txt2img(self, **fields):
        processing = self.modules.processing
        p = processing.StableDiffusionProcessingTxt2Img(sd_model=self.modules.shared.sd_model, **fields)
        p.scripts = self.modules.scripts.scripts_txt2img
        p.script_args = tuple([None] * 8)
        return p

    def axis_index(self, label: str) -> int:
        return [o.label for o in self.xyz.current_axis_options].index(label)


def _purge_host_modules() -> None:
    for name in list(sys.modules):
        if name in ("modules", "modules_forge") or name.startswith(("modules.", "modules_forge.")):
            del sys.modules[name]


def start_webui(tmp_path: Path, flavour: str, model_files: list[Path], monkeypatch) -> StandinWebUI:
    models_root = tmp_path / "models"
    sd_dir = models_root / "Stable-diffusion"
    sd_dir.mkdir(parents=True)
    for f in model_files:
        shutil.copy(f, sd_dir / f.name)
    monkeypatch.setenv("STANDIN_FLAVOUR", flavour)
    monkeypatch.setenv("STANDIN_MODELS", str(models_root))
    monkeypatch.setenv("STANDIN_ROOT", str(STANDIN))
    _purge_host_modules()
    monkeypatch.syspath_prepend(str(STANDIN))
    names = ("shared", "sd_models", "processing", "scripts", "script_callbacks", "call_queue", "sd_samplers")
    mods = {n: importlib.import_module(f"modules.{n}") for n in names}
    sd_models = mods["sd_models"]
    sd_models.list_models()
    first = sorted(sd_models.checkpoints_list)[0]
    mods["shared"].opts.data["sd_model_checkpoint"] = first
    if flavour == "forge":
        main_entry = importlib.import_module("modules_forge.main_entry")
        main_entry.refresh_model_loading_parameters()
        sd_models.forge_model_reload()
    else:
        sd_models.load_model()

    from merge_lab_extension import host

    monkeypatch.setattr(host, "_backend", None)
    # the web UI loads every scripts/*.py: the built-in X/Y/Z script, then the extension's entry point
    mods["scripts"].load_scripts([(str(STANDIN), str(STANDIN / "scripts" / "xyz_grid.py")),
                                  (str(ROOT), str(ROOT / "scripts" / "merge_lab_tab.py"))])
    callbacks = mods["script_callbacks"]
    callbacks.before_ui_callback()
    runner = mods["scripts"].scripts_txt2img
    runner.initialize_scripts(False)
    runner.setup_ui(False)
    tabs = callbacks.ui_tabs_callback()
    ns = type("HostModules", (), mods)
    return StandinWebUI(flavour, sd_dir, ns, runner.script("X/Y/Z plot"), tabs, host.current_backend())


def stop_webui() -> None:
    _purge_host_modules()
    os.environ.pop("STANDIN_FLAVOUR", None)


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


def tab_of(ui):
    assert len(ui.tabs) == 1
    blocks, title, elem_id = ui.tabs[0]
    assert (title, elem_id) == ("Merge Lab", "merge_lab")
    return ui.backend, blocks


def recipe_of(ui, alpha=0.5, **kw) -> Recipe:
    d = ui.models_dir
    return Recipe(models=[str(d / "sd1-ft1.safetensors"), str(d / "sd1-ft2.safetensors")], alpha=alpha, **kw)


def run_xyz(ui, x_label, x_values, y_label="Nothing", y_values="", z_label="Nothing", z_values=""):
    p = ui.txt2img(prompt="a cat", seed=5, steps=2)
    xyz = ui.xyz
    return xyz.run(p, ui.axis_index(x_label), x_values, [], ui.axis_index(y_label), y_values, [],
                   ui.axis_index(z_label), z_values, [])


def client_for(ui):
    """The route on the host's FastAPI app, added by our on_app_started callback."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    app = FastAPI()
    ui.modules.script_callbacks.app_started_callback(None, app)
    return TestClient(app)
