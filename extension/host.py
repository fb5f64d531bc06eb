"""Registration with the host: the callbacks the web UI calls (the tab, the HTTP route, the X/Y/Z axes, model
changes), the always-visible script that merges for X/Y/Z cells, and the one :class:`HostBackend` they share.

Host facts this relies on (read from the hosts' own sources):

- ``modules.script_callbacks``: ``on_ui_tabs(fn)`` (fn returns ``[(blocks, title, elem_id)]``),
  ``on_app_started(fn(demo, app))``, ``on_before_ui(fn())``, ``on_model_loaded(fn(sd_model))``.
- The host finds ``scripts.Script`` subclasses in the namespace of each ``scripts/*.py`` module and calls an
  always-visible script's ``before_process(p)`` at the start of every ``process_images``.

The work lives elsewhere: host_detect (which web UI), host_backend (merges in memory, previews), xyz_axes (the
X/Y/Z axes), ui and api (the tab, the HTTP route).
"""

from __future__ import annotations

from .host_backend import HostBackend
from .host_detect import host_module
from .xyz_axes import add_xyz_axes

TAB_TITLE = "Merge Lab"
TAB_ID = "merge_lab"


# --------------------------------------------------------------------------------------------------
# the script that merges for X/Y/Z cells
# --------------------------------------------------------------------------------------------------

def make_script_class():
    """The always-visible script whose before_process merges for X/Y/Z cells (the host finds Script
    subclasses in the namespace of each scripts/*.py module)."""
    scripts = host_module("scripts")

    class MergeLabScript(scripts.Script):
        def title(self):
            return TAB_TITLE

        def show(self, is_img2img):
            return scripts.AlwaysVisible

        def ui(self, is_img2img):
            return []

        def before_process(self, p, *args):
            backend = current_backend()
            if backend is not None:
                backend.before_process(p)

    MergeLabScript.__module__ = "merge_lab_tab.py"
    return MergeLabScript


# --------------------------------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------------------------------

_backend: HostBackend | None = None


def current_backend() -> HostBackend | None:
    return _backend


def get_backend() -> HostBackend:
    global _backend
    if _backend is None:
        _backend = HostBackend()
    return _backend


def on_ui_tabs():
    from .ui import build_tab

    tab = build_tab(get_backend())
    return [(tab.blocks, TAB_TITLE, TAB_ID)]


def on_app_started(demo, app) -> None:
    from .api import mount

    mount(app, get_backend())


def on_before_ui() -> None:
    add_xyz_axes(get_backend())


def on_model_loaded(sd_model) -> None:
    if _backend is not None:
        _backend.model_loaded(sd_model)


def register() -> None:
    """Called once by scripts/merge_lab_tab.py while the host loads scripts."""
    callbacks = host_module("script_callbacks")
    callbacks.on_ui_tabs(on_ui_tabs)
    callbacks.on_app_started(on_app_started)
    callbacks.on_before_ui(on_before_ui)
    callbacks.on_model_loaded(on_model_loaded)


__all__ = ["HostBackend", "add_xyz_axes", "current_backend", "get_backend", "make_script_class", "register"]
