"""`merge-lab ui`: the same tab served on its own, with previews rendered by diffusers (merge_lab.preview)."""

from __future__ import annotations

import importlib
import inspect
import os
import threading
import time
from collections.abc import Sequence
from types import SimpleNamespace

from merge_lab.engine import Recipe, merge_to_state_dict
from merge_lab.errors import MergeLabError

from .backend import FolderBackend, PreviewResult, PreviewSettings, PreviewUnavailable, ProgressFn

LOCALHOST = "127.0.0.1"
ALL_INTERFACES = "0.0.0.0"


def _preview_module():
    """What the backend uses of merge_lab.preview (the `preview` extra: diffusers, transformers): PreviewSettings and
    SAMPLERS (.settings), render_merge (.pipeline), merged_model_name (.infotext); or a one-line reason it is
    missing."""
    try:
        settings, pipeline, infotext = (importlib.import_module(f"merge_lab.preview.{name}")
                                        for name in ("settings", "pipeline", "infotext"))
    except ModuleNotFoundError as e:
        if (e.name or "").startswith("merge_lab"):
            return None, f"this build of Merge Lab has no preview module ({e.name})"
        return None, f"previews need the preview extra (pip install 'merge-lab[preview]'): {e.name} is missing"
    if not callable(getattr(pipeline, "render_merge", None)):
        return None, "this build's merge_lab.preview.pipeline has no render_merge()"
    return SimpleNamespace(PreviewSettings=settings.PreviewSettings, SAMPLERS=settings.SAMPLERS,
                           render_merge=pipeline.render_merge, merged_model_name=infotext.merged_model_name), None


class StandaloneBackend(FolderBackend):
    kind = "standalone"

    def preview_available(self) -> str | None:
        return _preview_module()[1]

    def sampler_names(self) -> list[str]:
        module, _ = _preview_module()
        samplers = getattr(module, "SAMPLERS", None) if module else None
        return [s.label for s in samplers.values()] if samplers else []

    def preview_defaults(self) -> PreviewSettings:
        # tiny and real models alike: a small, quick first preview; the user raises steps and size
        names = self.sampler_names()
        return PreviewSettings(steps=20, width=512, height=512,
                               sampler="Euler a" if "Euler a" in names else (names[0] if names else ""))

    def preview(self, recipe: Recipe, settings: PreviewSettings, *, progress: ProgressFn | None = None,
                cancel: threading.Event | None = None) -> PreviewResult:
        module, reason = _preview_module()
        if module is None:
            raise PreviewUnavailable(reason)
        start = time.perf_counter()
        result = merge_to_state_dict(recipe, progress=progress, cancel=cancel)
        wanted = dict(prompt=settings.prompt, negative_prompt=settings.negative_prompt, seed=settings.seed,
                      steps=settings.steps, width=settings.width, height=settings.height, cfg_scale=settings.cfg_scale,
                      sampler=settings.sampler or "Euler a")
        accepted = set(inspect.signature(module.PreviewSettings).parameters)
        render_settings = module.PreviewSettings(**{k: v for k, v in wanted.items() if k in accepted})
        images = module.render_merge(result, render_settings, consume=True)
        name_of = getattr(module, "merged_model_name", None)
        name = name_of(result) if callable(name_of) else f"merged-{result.method}-{result.fingerprint[:10]}"
        infotext = images[0].info.get("parameters", "") if images else ""
        return PreviewResult(list(images), infotext, name, result.fingerprint, time.perf_counter() - start)


def launch_kwargs(launch, **wanted):
    """The keywords this gradio's launch() takes (css moved there in gradio 6, show_api went away)."""
    params = inspect.signature(launch).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return wanted
    return {k: v for k, v in wanted.items() if k in params}


def serve(folders: Sequence[str], *, listen: bool = False, port: int = 7870, block: bool = True,
          lora_folders: Sequence[str] | None = None):
    """Build and serve the tab; returns (blocks, url). Binds 127.0.0.1 unless `listen`."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from .ui import CSS, build_tab

    backend = StandaloneBackend(folders, lora_folders=lora_folders)
    for folder in [*backend.folders, *backend.lora_folders()]:
        if not os.path.isdir(folder):
            raise MergeLabError("model folder not found", path=folder)
    tab = build_tab(backend)
    blocks = tab.blocks
    blocks.queue()
    kwargs = launch_kwargs(blocks.launch, server_name=ALL_INTERFACES if listen else LOCALHOST, server_port=port,
                           prevent_thread_lock=not block, inbrowser=False, show_error=True, css=CSS,
                           show_api=False, footer_links=["gradio"])
    result = blocks.launch(**kwargs)
    url = result[1] if isinstance(result, tuple) and len(result) > 1 else None
    return tab, url
