"""The tab's event handlers as plain Python: form values in, {field: value or update} out.

Kept apart from the gradio layout (ui.py) so that every handler can be called directly in tests on each
gradio version, and so that the host adapter and the standalone app share them unchanged.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from collections.abc import Callable, Mapping
from typing import Any

import merge_lab_methods as methods
from merge_lab import archs
from merge_lab.archs import current_key_name
from merge_lab.archs.detect import detect
from merge_lab.engine import Recipe, merge_to_file
from merge_lab.errors import MergeCancelled, MergeLabError, RecipeError
from merge_lab.io.checkpoints import read_header_any

from . import analysis_view
from .backend import Backend, PreviewSettings
from .compat import update
from .form import (
    DEFAULT_ARCH,
    NO_BASE,
    block_field,
    default_alpha,
    form_from_record,
    param_widgets,
    preset_slider_values,
    recipe_from_form,
    recipe_json,
    slider_blocks,
    slider_values_from_text,
    values_text,
    visible_blocks,
)
from .model_catalog import recipe_sources

GuiProgress = Callable[..., Any]  # gr.Progress-like: progress(fraction, desc=...)

# The form fields every recipe-building handler reads, in this order: these, the block sliders of every
# registered architecture after "use_blocks", then the method parameters (TabController.recipe_fields).
RECIPE_FIELDS = ["models", "base", "method", "alpha", "use_blocks", "extra_blocks", "key_ratios", "arch",
                 "loras", "weights", "seed", "dtype", "precision", "device", "memory_budget", "missing", "nonfinite",
                 "vae", "discard", "prune", "adjust", "beta_blocks"]
SAVE_FIELDS = ["out_name", "recipe_metadata", "overwrite"]
PREVIEW_FIELDS = ["prompt", "negative_prompt", "preview_seed", "steps", "cfg_scale", "width", "height", "sampler"]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


class TabController:
    def __init__(self, backend: Backend):
        self.backend = backend
        self.widgets = param_widgets()
        self.param_fields = [w.field for w in self.widgets]
        # the sliders of the architectures registered when the tab is built
        self.slider_blocks = slider_blocks()
        self.block_fields = [block_field(b) for b in self.slider_blocks]

    # ---- helpers -------------------------------------------------------------------------------------
    @property
    def recipe_fields(self) -> list[str]:
        cut = RECIPE_FIELDS.index("use_blocks") + 1
        return [*RECIPE_FIELDS[:cut], *self.block_fields, *RECIPE_FIELDS[cut:], *self.param_fields]

    def method_names(self) -> list[str]:
        return methods.method_names()

    def recipe(self, form: Mapping[str, Any]) -> Recipe:
        return recipe_from_form(form, self.backend.resolve_model, self.widgets, self.backend.resolve_lora,
                                self.backend.resolve_vae)

    def lora_picked(self, name: str | None, text: str | None) -> dict[str, Any]:
        """A LoRA chosen in the list goes into the LoRA field at strength 1 (once)."""
        if not name:
            return {}
        lines = [line for line in (text or "").splitlines() if line.strip()]
        if any(line.split(":", 1)[0].strip() == name for line in lines):
            return {"lora_pick": update(value=None), "status": f"{name} is already in the list"}
        return {"loras": "\n".join([*lines, f"{name}:1"]), "lora_pick": update(value=None),
                "status": f"added {name} at strength 1"}

    def listed_names(self, paths: list[str]) -> list[str]:
        listed = {os.path.normpath(self.backend.resolve_model(n)): n for n in self.backend.model_names()}
        return [listed.get(os.path.normpath(p), os.path.basename(p)) for p in paths]

    def _recipe_text(self, recipe: Recipe) -> str:
        try:
            return recipe_json(recipe, self.listed_names)
        except MergeLabError:
            return recipe_json(recipe)

    def job(self, name: str):
        return self.backend.jobs.job(name)

    @staticmethod
    def _progress_adapter(progress: GuiProgress | None, label: str):
        if progress is None:
            return None
        last = [0.0]

        def report(done: int, total: int, key: str) -> None:
            now = time.monotonic()
            if done < total and now - last[0] < 0.1:  # the browser needs no more than ~10 updates a second
                return
            last[0] = now
            with contextlib.suppress(Exception):  # a closed browser tab must not fail the merge
                progress(done / total if total else 1.0, desc=f"{label}: {key}")

        return report

    # ---- model list, method, architecture --------------------------------------------------------------
    def refresh_models(self, models: list[str] | None = None, base: str | None = None,
                       source: str | None = None) -> dict[str, Any]:
        names = self.backend.model_names(refresh=True)
        keep = [m for m in (models or []) if m in names]
        return {
            "models": update(choices=names, value=keep),
            "base": update(choices=[NO_BASE, *names], value=base if base in names else NO_BASE),
            "recipe_source": update(choices=names, value=source if source in names else None),
            "status": f"{len(names)} model(s) in the model folder(s)",
        }

    def method_changed(self, method_name: str) -> dict[str, Any]:
        M = methods
        try:
            method = M.get_method(method_name)
        except ValueError as e:
            return {"status": _one_line(e)}
        out: dict[str, Any] = {}
        for w in self.widgets:
            applies = method.name in w.defaults
            out[w.field] = update(visible=applies, value=w.defaults[method.name], label=w.label(method.name)) \
                if applies else update(visible=False)
        inputs = f"{method.min_models}+" if method.max_models is None else (
            str(method.min_models) if method.min_models == method.max_models else
            f"{method.min_models}–{method.max_models}")
        base_note = {"required": "needs a base model", "optional": "takes an optional base model",
                     "never": "takes no base model"}[method.base]
        out["method_info"] = f"**{method.name}**: {method.summary}. Models: {inputs}; {base_note}."
        out["base"] = update(visible=method.base != "never")
        # α follows the method: its published default (1 for task-vector methods, 0.5 for interpolations)
        alpha = default_alpha(method.name)
        out["alpha"] = alpha
        out["status"] = f"α set to {values_text([alpha])} ({method.name} default)"
        return out

    def models_changed(self, models: list[str] | None, use_blocks: bool, *slider_values: float) -> dict[str, Any]:
        """Detect the architecture of the first model and show its blocks."""
        arch, label = DEFAULT_ARCH, "architecture: choose models"
        if models:
            try:
                path = self.backend.resolve_model(models[0])
                header = read_header_any(path, current_key_name)
                detected = detect(header.tensors, header.metadata, path)
                arch = detected.arch
                label = f"architecture: {archs.get(arch).title}" + (
                    f" ({', '.join(detected.variants)})" if detected.variants else "")
            except MergeLabError as e:
                label = f"architecture: unknown ({_one_line(e)})"
        out: dict[str, Any] = {"arch": arch, "arch_info": label}
        shown = set(visible_blocks(arch))
        for b in self.slider_blocks:
            out[block_field(b)] = update(visible=b in shown)
        values = dict(zip(self.slider_blocks, slider_values))
        out["mbw_text"] = values_text([float(values[b]) for b in visible_blocks(arch)]) if values else ""
        return out

    # ---- block ratios: presets, the MBW string and the sliders, kept in sync -----------------------------
    def preset_chosen(self, preset: str | None, arch: str) -> dict[str, Any]:
        if not preset:
            return {}
        try:
            values = preset_slider_values(preset, arch)
        except MergeLabError as e:
            return {"status": _one_line(e)}
        out: dict[str, Any] = {block_field(b): v for b, v in values.items()}
        out["mbw_text"] = values_text(list(values.values()))
        out["use_blocks"] = True
        out["status"] = f"preset {preset} applied to the {len(values)} blocks"
        return out

    def mbw_text_edited(self, text: str, arch: str, alpha: float) -> dict[str, Any]:
        if not (text or "").strip():
            return {}
        try:
            values = slider_values_from_text(text, arch, float(alpha))
        except MergeLabError as e:
            return {"status": _one_line(e)}
        out: dict[str, Any] = {block_field(b): v for b, v in values.items()}
        out["mbw_text"] = values_text(list(values.values()))
        out["use_blocks"] = True
        out["preset"] = None
        return out

    def sliders_moved(self, arch: str, *slider_values: float) -> dict[str, Any]:
        values = dict(zip(self.slider_blocks, slider_values))
        return {"mbw_text": values_text([float(values[b]) for b in visible_blocks(arch)])}

    # ---- analysis -----------------------------------------------------------------------------------------
    def analyze(self, form: Mapping[str, Any], progress: GuiProgress | None = None) -> dict[str, Any]:
        try:
            recipe = self.recipe(form)
            with self.job("an analysis") as cancel:
                report = analysis_view.analyze(recipe, progress=self._progress_adapter(progress, "analyzing"),
                                               cancel=cancel)
        except MergeCancelled:
            return {"status": "analysis cancelled"}
        except MergeLabError as e:
            return {"status": f"error: {_one_line(e)}"}
        return {
            "theta_table": report.table_html,
            "heatmap": report.heatmap,
            "status": report.summary,
        }

    # ---- merging ------------------------------------------------------------------------------------------
    def merge(self, form: Mapping[str, Any], progress: GuiProgress | None = None) -> dict[str, Any]:
        try:
            recipe = self.recipe(form)
            recipe.out = self.backend.output_path(form.get("out_name") or "")
            recipe.validate()
            if os.path.exists(recipe.out) and not form.get("overwrite"):
                raise RecipeError("exists; tick 'Overwrite' to replace it", path=recipe.out)
            with self.job("a merge") as cancel:
                result = merge_to_file(recipe, progress=self._progress_adapter(progress, "merging"), cancel=cancel,
                                       recipe_metadata=bool(form.get("recipe_metadata", True)),
                                       overwrite=bool(form.get("overwrite")))
            self.backend.after_save(result.out, recipe_sources(recipe))
        except MergeCancelled:
            return {"status": "merge cancelled; nothing was written"}
        except MergeLabError as e:
            return {"status": f"error: {_one_line(e)}"}
        except Exception as e:  # a bug, not bad input: keep the tab alive and say where to look
            traceback.print_exc()
            return {"status": f"internal error ({type(e).__name__}: {_one_line(e)}); see the console"}
        status = (f"saved {os.path.basename(result.out)} in {result.seconds:.1f} s — {result.arch} {result.method}, "
                  f"{result.keys} keys; sha256 {result.sha256}; AutoV2 {result.autov2}; recipe hash "
                  f"{result.fingerprint}")
        return {"status": status, "recipe_json": self._recipe_text(recipe)}

    def cancel(self) -> dict[str, Any]:
        running = self.backend.jobs.cancel()
        if running is None:
            return {"status": "nothing to cancel"}
        self.backend.interrupt()
        return {"status": f"cancelling {running}…"}

    def merge_and_preview(self, form: Mapping[str, Any], progress: GuiProgress | None = None) -> dict[str, Any]:
        reason = self.backend.preview_available()
        if reason:
            return {"status": f"preview unavailable: {reason}"}
        try:
            recipe = self.recipe(form)
            recipe.validate()
            settings = self.preview_settings(form)
            with self.job("a merge for the preview") as cancel:
                result = self.backend.preview(recipe, settings, progress=self._progress_adapter(progress, "merging"),
                                              cancel=cancel)
        except MergeCancelled:
            return {"status": "merge cancelled"}
        except MergeLabError as e:
            return {"status": f"error: {_one_line(e)}"}
        except Exception as e:
            traceback.print_exc()
            return {"status": f"internal error ({type(e).__name__}: {_one_line(e)}); see the console"}
        if not result.images:
            return {"status": f"{result.model_name} is loaded, but no image came back (the preview was interrupted)"}
        image = result.images[0]
        notes = f" ({'; '.join(result.notes)})" if result.notes else ""
        return {
            "preview_image": image,
            "preview_info": result.infotext,
            "status": f"preview of {result.model_name} (recipe hash {result.recipe_hash}) in {result.seconds:.1f} s"
                      f"{notes}",
            "recipe_json": self._recipe_text(recipe),
        }

    @staticmethod
    def preview_settings(form: Mapping[str, Any]) -> PreviewSettings:
        def number(name, kind, lo, hi):
            value = form.get(name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RecipeError(f"{name.replace('_', ' ')} must be a number, got {value!r}")
            if not lo <= value <= hi:
                raise RecipeError(f"{name.replace('_', ' ')} = {value} is outside [{lo}, {hi}]")
            return kind(value)

        return PreviewSettings(
            prompt=str(form.get("prompt") or ""),
            negative_prompt=str(form.get("negative_prompt") or ""),
            seed=number("preview_seed", int, 0, 2**32 - 1),
            steps=number("steps", int, 1, 150),
            cfg_scale=number("cfg_scale", float, 0, 30),
            width=number("width", int, 64, 2048) // 8 * 8,
            height=number("height", int, 64, 2048) // 8 * 8,
            sampler=str(form.get("sampler") or ""),
        )

    # ---- recipes: show, load back from a merged file, hand to the X/Y/Z plot -------------------------------
    def show_recipe(self, form: Mapping[str, Any]) -> dict[str, Any]:
        try:
            recipe = self.recipe(form)
            recipe.validate()
        except MergeLabError as e:
            return {"status": f"error: {_one_line(e)}"}
        return {"recipe_json": self._recipe_text(recipe), "status": "recipe checked"}

    def load_recipe(self, source: str | None) -> dict[str, Any]:
        if not source:
            return {"status": "choose a merged model to read its recipe from"}
        try:
            path = self.backend.resolve_model(source)
            header = read_header_any(path, current_key_name)
            raw = header.metadata.get("sd_merge_recipe")
            if not raw:
                raise RecipeError("has no sd_merge_recipe metadata (not a merge, or saved without it)", path=source)
            try:
                record = json.loads(raw)
                merged_models = json.loads(header.metadata.get("sd_merge_models") or "{}")
            except ValueError:
                raise RecipeError("sd_merge_recipe is not valid JSON", path=source) from None
            values, notes = form_from_record(record, self._find_listed, merged_models, self._find_vae)
        except MergeLabError as e:
            return {"status": f"error: {_one_line(e)}"}
        method = methods.get_method(values["method"])
        out: dict[str, Any] = dict(values)
        for w in self.widgets:  # parameter values from the record win over the method's defaults
            applies = method.name in w.defaults
            out[w.field] = update(visible=applies, value=values.get(w.field, w.defaults.get(method.name)),
                                  label=w.label(method.name)) if applies else update(visible=False)
        out["base"] = update(value=values["base"], visible=method.base != "never")
        out["method_info"] = self.method_changed(method.name)["method_info"]
        arch = values.get("arch", DEFAULT_ARCH)
        shown = set(visible_blocks(arch))
        for b in self.slider_blocks:
            field = block_field(b)
            out[field] = update(visible=b in shown, **({"value": values[field]} if field in values else {}))
        out["status"] = f"recipe loaded from {source}" + (f" — {'; '.join(notes)}" if notes else "")
        return out

    def _find_listed(self, name: str) -> str | None:
        names = self.backend.model_names()
        if name in names:
            return name
        base = os.path.basename(name)
        return next((n for n in names if os.path.basename(n) == base), None)

    def _find_vae(self, name: str) -> str | None:
        names = self.backend.vae_names()
        base = os.path.basename(name)
        return name if name in names else next((n for n in names if os.path.basename(n) == base), None)

    def use_for_xyz(self, form: Mapping[str, Any]) -> dict[str, Any]:
        try:
            recipe = self.recipe(form)
            recipe.validate()
            self.backend.remember_xyz_recipe(recipe)
        except MergeLabError as e:
            return {"status": f"error: {_one_line(e)}"}
        return {"status": "the X/Y/Z plot's [Merge Lab] axes now vary this recipe", "recipe_json":
                self._recipe_text(recipe)}
