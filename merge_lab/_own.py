"""How our three top-level folders are imported, the same way everywhere (code, tests, the web UI).

The web UI puts every extension's root folder on ``sys.path``, so generic names such as ``merge_methods`` or
``extension`` could resolve to another extension's folder. Our folders are therefore only ever imported
under unique names::

    merge_lab            -> merge_lab/      (the engine)
    merge_lab_methods    -> merge_methods/  (pure method math)
    merge_lab_extension  -> extension/      (the web-UI side)

An installed or editable copy maps the folders to these names itself (``package-dir`` in pyproject.toml).
A plain copy of the repository (the web UI's extensions folder) has no such mapping: importing
``merge_lab`` then installs :class:`OwnFolders`, a finder placed *last* on ``sys.meta_path`` that answers for
exactly those two names from the folders beside ``merge_lab/``. Once ``merge_lab`` is imported, write
``import merge_lab_methods`` / ``from merge_lab_extension import host`` and nothing else.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = {"merge_lab_methods": "merge_methods", "merge_lab_extension": "extension"}


class OwnFolders(importlib.abc.MetaPathFinder):
    """Finds ``merge_lab_methods`` / ``merge_lab_extension`` in the repository's folders; their submodules are
    then found through the package's ``__path__`` as usual."""

    def find_spec(self, name, path=None, target=None):
        folder = FOLDERS.get(name)
        if folder is None:
            return None
        init = ROOT / folder / "__init__.py"
        if not init.is_file():
            return None
        return importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])


def install() -> None:
    """Add the finder once, after every other finder (an installed copy is found first)."""
    if not any(isinstance(f, OwnFolders) for f in sys.meta_path):
        sys.meta_path.append(OwnFolders())
