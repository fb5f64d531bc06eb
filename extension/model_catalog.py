"""The models a user may name: files inside the configured model folders, and nothing else.

A model is named by its path relative to a model folder (``sub/model.safetensors``, as the web UI lists it),
or by a path that lies inside one of the folders. Paths with ``..`` parts and paths outside every folder are
refused, so a request to the UI or the HTTP route cannot read arbitrary files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePath

from merge_lab.errors import RecipeError

MODEL_SUFFIXES = (".safetensors", ".ckpt")


def _is_model_file(name: str) -> bool:
    lowered = name.lower()
    # VAE files sit in the same folders in some set-ups; the web UI leaves them out of its list too
    return lowered.endswith(MODEL_SUFFIXES) and not lowered.endswith((".vae.safetensors", ".vae.ckpt"))


def scan_folders(folders: Sequence[str | os.PathLike]) -> dict[str, str]:
    """{name relative to its folder (with /): absolute path} of every model file; the first folder wins."""
    found: dict[str, str] = {}
    for folder in folders:
        root = Path(folder)
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                if _is_model_file(filename):
                    path = Path(dirpath) / filename
                    found.setdefault(path.relative_to(root).as_posix(), str(path.absolute()))
    return dict(sorted(found.items(), key=lambda item: item[0].casefold()))


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.normpath(os.path.abspath(path)), os.path.normpath(os.path.abspath(folder))
    return os.path.commonpath([path, folder]) == folder and path != folder


def resolve_in_folders(name: str, folders: Sequence[str | os.PathLike], listed: dict[str, str] | None = None,
                       *, what: str = "model") -> str:
    """The file a user-given model name refers to, or a one-line RecipeError.

    Accepted: a name from `listed` (the models the host lists), or a path (relative to a folder, or absolute)
    that lies inside one of `folders` and is an existing file. Never a path with `..` parts.
    """
    text = str(name).strip()
    if not text:
        raise RecipeError(f"empty {what} name")
    if listed and text in listed:
        return listed[text]
    if ".." in PurePath(text.replace("\\", "/")).parts:
        raise RecipeError(f"{what} paths may not contain '..'", path=text)
    folder_list = [os.fspath(f) for f in folders]
    candidates = [text] if os.path.isabs(text) else [os.path.join(f, text) for f in folder_list]
    for candidate in candidates:
        if any(_inside(candidate, f) for f in folder_list) and os.path.isfile(candidate):
            return os.path.normpath(os.path.abspath(candidate))
    if os.path.isabs(text) and not any(_inside(text, f) for f in folder_list):
        raise RecipeError(f"{what} is outside the model folders ({', '.join(folder_list) or 'none configured'})",
                          path=text)
    raise RecipeError(f"unknown {what}: not listed and not a file inside the model folders "
                      f"({', '.join(folder_list) or 'none configured'})", path=text)


def output_file(name: str, folder: str | os.PathLike) -> str:
    """The path a merge saved under `name` gets: a plain file name inside `folder` (.safetensors added)."""
    text = str(name).strip()
    if not text:
        raise RecipeError("no output name given")
    if any(sep in text for sep in ("/", "\\")) or text in (".", "..") or text.startswith("."):
        raise RecipeError("the output name must be a plain file name (no folders, not hidden)", path=text)
    if not text.lower().endswith(".safetensors"):
        text += ".safetensors"
    return os.path.join(os.fspath(folder), text)


def names_for(paths: Iterable[str], listed: dict[str, str]) -> list[str]:
    """The listed names of `paths` (for showing a recipe loaded from metadata)."""
    by_path = {os.path.normpath(p): n for n, p in listed.items()}
    return [by_path.get(os.path.normpath(p), os.path.basename(p)) for p in paths]


def recipe_sources(recipe) -> list[str]:
    """The input paths of a recipe, its models first, then its base."""
    return [*recipe.models, *([recipe.base] if recipe.base else [])]


def config_beside(paths: Iterable[str | os.PathLike]) -> str | None:
    """The model config (``.yaml``) that sits beside the first of `paths` to have one.

    The web UI builds a model from the ``.yaml`` beside its file when there is one (SD2 v-prediction,
    inpainting, unusual sizes); a merge takes its config from its first model that has one, as the web UI's own
    checkpoint merger does ("copy config from A, B or C")."""
    for path in paths:
        candidate = Path(path).with_suffix(".yaml")
        if candidate.is_file():
            return str(candidate)
    return None


def place_config_beside(model_path: str | os.PathLike, sources: Iterable[str | os.PathLike]) -> str | None:
    """Copy the sources' config beside `model_path` (unless one is there already); returns its path."""
    import shutil

    config = config_beside(sources)
    target = Path(model_path).with_suffix(".yaml")
    if config is None or target.exists() or os.path.realpath(config) == os.path.realpath(target):
        return str(target) if target.exists() else None
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config, target)
    return str(target)
