"""Import our sibling packages under unique names.

The web UI puts every extension's root folder on ``sys.path``; a generic top-level name such as
``merge_methods`` or ``extension`` could then resolve to another extension's folder (or shadow it).
Installed wheels and editable installs map the folders ``merge_methods/`` and ``extension/`` to the
unique names ``merge_lab_methods`` and ``merge_lab_extension`` (pyproject.toml); when running from a
plain copy of the repository (the web UI's extensions folder) we load the folder under that name here.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent


def own_package(alias: str, folder: str) -> ModuleType:
    module = sys.modules.get(alias)
    if module is not None:
        return module
    init = ROOT / folder / "__init__.py"
    if not init.is_file():  # installed as a wheel: the folder lives under its unique name
        return importlib.import_module(alias)
    spec = importlib.util.spec_from_file_location(alias, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[alias]
        raise
    return module


def methods() -> ModuleType:
    return own_package("merge_lab_methods", "merge_methods")
