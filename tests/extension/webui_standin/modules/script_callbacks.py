"""Callback registry: on_*(fn) registers, *_callback() calls every registered fn (errors reported, not raised)."""
import traceback
from collections import namedtuple

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])
callback_map = {name: [] for name in ("callbacks_app_started", "callbacks_model_loaded", "callbacks_ui_tabs",
                                      "callbacks_before_ui", "callbacks_script_unloaded")}


def clear_callbacks():
    for callbacks in callback_map.values():
        callbacks.clear()


def _add(kind, fn, name=None):
    callback_map[kind].append(ScriptCallback("standin", fn, name or getattr(fn, "__name__", "")))


def on_app_started(callback, *, name=None):
    _add("callbacks_app_started", callback, name)


def on_model_loaded(callback, *, name=None):
    _add("callbacks_model_loaded", callback, name)


def on_ui_tabs(callback, *, name=None):
    _add("callbacks_ui_tabs", callback, name)


def on_before_ui(callback, *, name=None):
    _add("callbacks_before_ui", callback, name)


def _report(c):
    print(f"Error executing callback {c.name}")
    traceback.print_exc()


def app_started_callback(demo, app):
    for c in callback_map["callbacks_app_started"]:
        try:
            c.callback(demo, app)
        except Exception:
            _report(c)


def model_loaded_callback(sd_model):
    for c in callback_map["callbacks_model_loaded"]:
        try:
            c.callback(sd_model)
        except Exception:
            _report(c)


def ui_tabs_callback():
    res = []
    for c in callback_map["callbacks_ui_tabs"]:
        try:
            res += c.callback() or []
        except Exception:
            _report(c)
    return res


def before_ui_callback():
    for c in callback_map["callbacks_before_ui"]:
        try:
            c.callback()
        except Exception:
            _report(c)
