"""Entry point the web UI (AUTOMATIC1111, Forge, reForge) executes: registers the Merge Lab tab, the HTTP
route, the X/Y/Z axes and the script that merges for X/Y/Z cells. Everything else lives in the packages
``merge_lab`` (the engine) and ``merge_lab_extension`` (extension/, the web-UI side).

The web UI puts this extension's root on sys.path only while this file runs, so the imports happen here,
at module level. If another package named ``merge_lab`` is already loaded from elsewhere, the extension
stays off (one clear message) rather than mixing two versions or breaking the web UI.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    added = _ROOT not in sys.path
    if added:
        sys.path.insert(0, _ROOT)
    try:
        import merge_lab

        origin = os.path.dirname(os.path.dirname(os.path.abspath(merge_lab.__file__)))
        if os.path.normcase(os.path.realpath(origin)) != os.path.normcase(os.path.realpath(_ROOT)):
            raise ImportError(f"another package named merge_lab is loaded from {origin}")
        import merge_lab_extension  # found by merge_lab's own finder (merge_lab/_own.py)

        return merge_lab_extension
    finally:
        if added:
            sys.path.remove(_ROOT)


try:
    _extension = _load()
    from merge_lab_extension import host as _host

    _host.register()
    MergeLabScript = _host.make_script_class()
except Exception as _error:  # never break the web UI's start-up
    print(f"[Merge Lab] not loaded: {type(_error).__name__}: {_error}", file=sys.stderr)
