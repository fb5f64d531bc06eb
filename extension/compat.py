"""Gradio feature tests: one tab builder for gradio 3.41 (AUTOMATIC1111, reForge), 4.40 (Forge) and the newest.

Constructor keywords come and go between gradio versions (``show_copy_button`` became ``buttons``, ``columns``
appeared in 3.x, …), so components are built through :func:`component`, which passes on only the keywords the
installed class accepts. Nothing here compares version numbers: every branch tests for the feature itself.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any

import gradio as gr


@functools.cache
def _accepted(cls: type) -> tuple[frozenset[str], bool]:
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return frozenset(params), takes_any


def supported_kwargs(cls: type, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    # gradio 3 components also take **kwargs but only warn about unknown ones: pass only named keywords
    names, _ = _accepted(cls)
    return {k: v for k, v in kwargs.items() if k in names}


def component(cls: type, *args, **kwargs):
    """`cls(*args, **kwargs)` without the keywords this gradio's `cls` does not know."""
    return cls(*args, **supported_kwargs(cls, kwargs))


def update(**changes) -> Any:
    """An update for an output component (gr.update exists in 3.x and in every later version)."""
    return gr.update(**changes)


def is_update(result: Any) -> bool:
    """gr.update() gives {"__type__": "update", …} ("generic_update" in gradio 3)."""
    return isinstance(result, Mapping) and result.get("__type__") in ("update", "generic_update")


def update_value(result: Any) -> Any:
    """The value an event handler's result sets (a plain value, or the `value` of an update dict)."""
    return result.get("value") if is_update(result) else result


def _signature_target(listener):
    # Forge wraps every event in an EventWrapper(*args, **kwargs) that hides the real signature; its
    # `replaced_event` is gradio's own listener.
    while hasattr(listener, "replaced_event"):
        listener = listener.replaced_event
    return listener


def on(component_obj, event: str, fn: Callable, inputs, outputs, **kwargs):
    """Attach `fn` to `component_obj.<event>`; keywords the event does not accept are dropped."""
    listener = getattr(component_obj, event)
    try:
        params = inspect.signature(_signature_target(listener)).parameters
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            kwargs = {k: v for k, v in kwargs.items() if k in params}
    except (TypeError, ValueError):
        pass
    while True:  # a listener whose signature still hides its keywords: drop the ones it refuses
        try:
            return listener(fn, inputs=inputs, outputs=outputs, **kwargs)
        except TypeError as e:
            refused = re.search(r"unexpected keyword argument '(\w+)'", str(e))
            if refused is None or refused.group(1) not in kwargs:
                raise
            kwargs.pop(refused.group(1))


def has_event(component_obj, event: str) -> bool:
    return callable(getattr(component_obj, event, None))


def user_edit_event(component_obj) -> str:
    """The event fired by a user's edit only (not by a programmatic update, which would loop between fields
    kept in sync): `input` (typing into a slider's number box fires it, `release` does not in gradio 6)."""
    for name in ("input", "change"):
        if has_event(component_obj, name):
            return name
    raise RuntimeError(f"{type(component_obj).__name__} has no change event")


def progress_tracker():
    """A gr.Progress to use as a handler default (exists in 3.41 and later)."""
    return gr.Progress()
