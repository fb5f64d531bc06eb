"""The HTTP route on the web UI: ``POST /merge-lab/v1/merge`` and ``POST /merge-lab/v1/analyze``.

The body is the recipe object itself, as in a recipe file (``{"models": ["a.safetensors", "b.safetensors"],
"method": "weighted_sum", "alpha": 0.3}``, or ``{"models": ["a.safetensors", "b.safetensors"], "base":
"base.safetensors", "method": "ties"}``). Without ``alpha`` the merge uses the method's own default, the value
that reproduces it as published (1 for task-vector methods and Model Stock, 0.5 for weighted_sum and the
spherical interpolations; ``GET /merge-lab/v1/methods`` lists it as ``default_alpha``), as a recipe file and the
tab do; the answer says which ``alpha`` was used. Models are named as the web UI lists them (file name, title,
hash) or by a path inside its model folders, nothing else; ``out`` is a plain file name saved into the model
folder. Without ``out`` the merge is loaded in memory as the current model.

The handlers are plain functions (dict in, dict out, ApiError for a 4xx answer) so they are tested without a
server; :func:`mount` adds them to the host's FastAPI app. No pydantic models: A1111 runs pydantic 1, Forge 2.
"""

from __future__ import annotations

import os
import time
from typing import Any

import merge_lab_methods as methods
from merge_lab.engine import Recipe, merge_to_file
from merge_lab.errors import MergeCancelled, MergeLabError

from . import analysis_view
from .backend import Backend, Busy, HostLoadError
from .model_catalog import recipe_sources

API_PREFIX = "/merge-lab/v1"


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def recipe_from_body(body: Any, backend: Backend, *, for_merge: bool = True) -> Recipe:
    """The recipe of a request body, models resolved inside the model folders (400 on anything else).
    An analysis reads only the models and the base: the method's rules do not apply to it."""
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object: a recipe")
    try:
        recipe = Recipe.from_dict(body, source="request body")
        if not recipe.models:
            raise ApiError(400, "request body: no models given")
        recipe.models = [backend.resolve_model(m) for m in recipe.models]
        if recipe.base:
            recipe.base = backend.resolve_model(recipe.base)
        # LoRAs by name (or a path) inside the host's LoRA folder, as models are inside the model folders
        recipe.loras = [{**e, "path": backend.resolve_lora(e["path"])} for e in recipe.loras]
        if recipe.out:
            if not for_merge:
                raise ApiError(400, "request body: an analysis writes no file ('out')")
            recipe.out = backend.output_path(recipe.out)
        if for_merge:
            recipe.validate()
    except MergeLabError as e:
        raise ApiError(400, str(e)) from None
    return recipe


def merge_request(body: Any, backend: Backend) -> dict[str, Any]:
    recipe = recipe_from_body(body, backend)
    start = time.perf_counter()
    try:
        with backend.jobs.job("a merge (HTTP)") as cancel:
            if recipe.out:
                if os.path.exists(recipe.out):
                    raise ApiError(409, f"{os.path.basename(recipe.out)} exists in the model folder; "
                                        "choose another name")
                result = merge_to_file(recipe, cancel=cancel)
                backend.after_save(result.out, recipe_sources(recipe))
                return {
                    "action": "saved",
                    "recipe_hash": result.fingerprint,
                    "output": {"name": os.path.basename(result.out), "path": result.out, "sha256": result.sha256,
                               "autov2": result.autov2},
                    "arch": result.arch,
                    "method": result.method,
                    "alpha": recipe.effective_alpha(),
                    "seconds": round(time.perf_counter() - start, 3),
                }
            load = getattr(backend, "load", None)
            if load is None:
                raise ApiError(400, "give an output name ('out'): there is no running model to load the merge into")
            info = load(recipe, as_current=True, cancel=cancel)
            return {
                "action": "loaded",
                "recipe_hash": info.merge_lab_fingerprint,
                "model": {"name": info.name_for_extra, "title": info.title, "hash": info.shorthash},
                "method": recipe.method,
                "alpha": recipe.effective_alpha(),
                "seconds": round(time.perf_counter() - start, 3),
            }
    except Busy as e:
        raise ApiError(409, str(e)) from None
    except MergeCancelled as e:
        raise ApiError(409, str(e)) from None
    except HostLoadError as e:
        raise ApiError(500, str(e)) from None
    except MergeLabError as e:
        raise ApiError(400, str(e)) from None


def analyze_request(body: Any, backend: Backend) -> dict[str, Any]:
    recipe = recipe_from_body(body, backend, for_merge=False)
    try:
        with backend.jobs.job("an analysis (HTTP)") as cancel:
            report = analysis_view.engine_report(recipe, cancel=cancel)
    except Busy as e:
        raise ApiError(409, str(e)) from None
    except MergeLabError as e:
        raise ApiError(400, str(e)) from None
    return report.as_dict()


def models_request(backend: Backend) -> dict[str, Any]:
    return {"models": backend.model_names(refresh=True)}


def methods_request() -> dict[str, Any]:
    M = methods
    out = []
    for name in M.method_names():
        m = M.get_method(name)
        out.append({"name": m.name, "summary": m.summary, "base": m.base, "min_models": m.min_models,
                    "max_models": m.max_models, "default_alpha": m.default_ratio,
                    "params": [{"name": p.name, "type": p.kind.__name__, "default": p.default, "help": p.help,
                                **({"choices": list(p.choices)} if p.choices else {})} for p in m.params]})
    return {"methods": out}


def mount(app, backend: Backend) -> None:
    """Add the routes to the host's FastAPI app (sync endpoints: FastAPI runs them on its thread pool)."""
    from fastapi import Body, HTTPException

    def answer(fn, *args):
        try:
            return fn(*args)
        except ApiError as e:
            raise HTTPException(status_code=e.status, detail=e.message) from None

    def merge(body: dict = Body(...)):  # noqa: B008 (FastAPI's way of declaring a JSON body)
        return answer(merge_request, body, backend)

    def analyze(body: dict = Body(...)):  # noqa: B008
        return answer(analyze_request, body, backend)

    def models():
        return answer(models_request, backend)

    def method_list():
        return answer(methods_request)

    app.add_api_route(f"{API_PREFIX}/merge", merge, methods=["POST"])
    app.add_api_route(f"{API_PREFIX}/analyze", analyze, methods=["POST"])
    app.add_api_route(f"{API_PREFIX}/models", models, methods=["GET"])
    app.add_api_route(f"{API_PREFIX}/methods", method_list, methods=["GET"])
