"""Model names from a user (web UI, HTTP route) resolved only inside the configured model folders.

The CLI and recipe files take plain paths: whoever runs them can already read any file. A request from
a browser or over HTTP must not: it names a model, and this module turns that name into a file that is
inside one of the folders the host configured, or refuses with a one-line ``ModelPathError``.

API
---
``resolve_model(name, folders, suffixes=MODEL_SUFFIXES) -> Path``
    The real path (symlinks resolved) of the model called `name`. `name` may be

    - a file name: ``"anything-v5.safetensors"`` (searched in subfolders too when it is not directly in a
      folder; refused as ambiguous if two files carry it);
    - a title as the web UI lists it: ``"anything-v5.safetensors [abcdef1234]"`` or
      ``"sdxl/juggernaut.safetensors [1a2b3c4d]"`` (the ``[hash]`` tail is dropped, not verified);
    - a path relative to a model folder: ``"sdxl/juggernaut.safetensors"``;
    - the name without its suffix: ``"anything-v5"``;
    - an absolute path, only if it lies inside a model folder.

    Refused: an empty name, NUL or other control characters, a ``..`` component (even one that would
    land inside), an absolute path elsewhere, a file whose real path (after every symlink) is outside all
    the model folders, a suffix not in `suffixes`, anything that is not a regular file.

``resolve_output(name, folder) -> Path``
    The path a merge requested over HTTP / from the UI writes to: a file name (``"mix"`` or
    ``"mix.safetensors"``, ``.safetensors`` added when missing) or a relative path inside `folder`, with
    the same refusals (``..``, absolute paths, control characters, a parent that resolves outside
    `folder`); an existing symlink or folder of that name is refused too. The file need not exist.

``is_inside(path, folders) -> bool``
    Whether the real path of `path` lies inside the real path of one of `folders`.

Both resolvers take `folders` as the host knows them (strings or paths; symlinked folders are fine: the
comparison uses real paths on both sides). They raise ``ModelPathError`` (a ``RecipeError``), whose
message is one line and names what the user sent.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from .errors import RecipeError, show

MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")
MAX_NAME_CHARS = 1024

# A1111 / Forge list a checkpoint as "<path relative to the models folder> [<hash>]": the first 10 hex
# digits of its sha256, or 8 of the old "legacy" hash.
_TITLE_HASH = re.compile(r"^(?P<name>.*?\S)\s+\[[0-9a-fA-F]{8,10}\]$")


class ModelPathError(RecipeError):
    """A model or output name from the UI / HTTP route that does not name an allowed file."""


def _real_folders(folders: Iterable[str | os.PathLike]) -> list[Path]:
    real = [Path(os.path.realpath(os.fspath(f))) for f in folders]
    if not real:
        raise ModelPathError("no model folders are configured")
    return real


def _inside(real: Path, real_folders: Sequence[Path]) -> bool:
    return any(real == f or f in real.parents for f in real_folders)


def is_inside(path: str | os.PathLike, folders: Iterable[str | os.PathLike]) -> bool:
    return _inside(Path(os.path.realpath(os.fspath(path))), _real_folders(folders))


def _clean_name(name: object, what: str) -> str:
    if not isinstance(name, str):
        raise ModelPathError(f"{what} must be a string, got {show(name)}")
    text = name.strip()
    if not text:
        raise ModelPathError(f"empty {what}")
    if len(text) > MAX_NAME_CHARS:
        raise ModelPathError(f"{what} is longer than {MAX_NAME_CHARS} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise ModelPathError(f"{what} {show(text)} holds control characters")
    parts = re.split(r"[\\/]", text)
    if ".." in parts:
        raise ModelPathError(f"{what} {show(text)} contains '..': name a file inside the model folders")
    return text


def _title_name(text: str) -> str:
    m = _TITLE_HASH.match(text)
    return m.group("name") if m else text


def _candidates(text: str, suffixes: Sequence[str]) -> list[str]:
    """`text` as given, then with each suffix appended when it has none of them."""
    if text.lower().endswith(tuple(suffixes)):
        return [text]
    return [text, *(text + s for s in suffixes)]


def _check_file(path: Path, real_folders: Sequence[Path], suffixes: Sequence[str], shown: str) -> Path:
    real = Path(os.path.realpath(path))
    if not _inside(real, real_folders):
        raise ModelPathError(f"model {show(shown)} resolves to a file outside the model folders (a symlink?); "
                             "add its folder to the model folders to use it")
    if not real.name.lower().endswith(tuple(suffixes)):
        raise ModelPathError(f"model {show(shown)} is not a checkpoint ({', '.join(suffixes)})")
    if not real.is_file():
        raise ModelPathError(f"model {show(shown)} is not a file")
    return real


def resolve_model(name: str, folders: Iterable[str | os.PathLike],
                  suffixes: Sequence[str] = MODEL_SUFFIXES) -> Path:
    """The real path of the model `name` inside `folders` (see the module docstring)."""
    real_folders = _real_folders(folders)
    text = _clean_name(name, "model name")
    for candidate_text in dict.fromkeys([text, _title_name(text)]):  # as given first: "x [v2].ckpt" is a name
        if os.path.isabs(candidate_text) or re.match(r"^[A-Za-z]:", candidate_text):
            if not _inside(Path(os.path.realpath(candidate_text)), real_folders):
                raise ModelPathError(f"model {show(name)} is outside the model folders")
            return _check_file(Path(candidate_text), real_folders, suffixes, name)
        for candidate in _candidates(candidate_text, suffixes):
            for folder in real_folders:
                path = folder / candidate
                if os.path.lexists(path):
                    return _check_file(path, real_folders, suffixes, name)
        if not re.search(r"[\\/]", candidate_text):
            found = _search_subfolders(candidate_text, real_folders, suffixes)
            if len(found) == 1:
                return _check_file(found[0], real_folders, suffixes, name)
            if len(found) > 1:
                shown = ", ".join(str(p) for p in found[:5])
                raise ModelPathError(f"model name {show(name)} is ambiguous: {shown}; give its subfolder too")
    raise ModelPathError(f"no model {show(name)} in the model folders "
                         f"({', '.join(os.fspath(f) for f in real_folders)})")


def _search_subfolders(file_name: str, real_folders: Sequence[Path], suffixes: Sequence[str]) -> list[Path]:
    wanted = {c.lower() for c in _candidates(file_name, suffixes)}
    found: list[Path] = []
    for folder in real_folders:
        # Symlinked subfolders are not followed: a loop must not hang the search, and a file found
        # through one is re-checked against the model folders anyway.
        for root, _dirs, files in os.walk(folder):
            found += [Path(root) / f for f in files if f.lower() in wanted]
    return sorted(dict.fromkeys(found))


def resolve_output(name: str, folder: str | os.PathLike) -> Path:
    """Where a merge named `name` by the UI / HTTP route is written, inside `folder` (see the module
    docstring). The folder must exist; subfolders of it are created by the writer."""
    real_folder = _real_folders([folder])[0]
    if not real_folder.is_dir():
        raise ModelPathError("the output folder does not exist", path=folder)
    text = _clean_name(name, "output name")
    if os.path.isabs(text) or re.match(r"^[A-Za-z]:", text):
        raise ModelPathError(f"output name {show(name)} must be a file name inside the output folder, "
                             "not an absolute path")
    if not text.lower().endswith(".safetensors"):
        text += ".safetensors"
    target = real_folder / text
    # The deepest existing ancestor decides where the file really goes (a symlinked subfolder).
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not _inside(Path(os.path.realpath(parent)), [real_folder]):
        raise ModelPathError(f"output name {show(name)} leads outside the output folder")
    if target.is_symlink():
        raise ModelPathError(f"output {show(name)} exists as a symlink; refusing to write through it")
    if target.is_dir():
        raise ModelPathError(f"output {show(name)} is a folder")
    return target
