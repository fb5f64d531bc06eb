"""Host detection: which web UI runs us (AUTOMATIC1111 1.10, Forge of the gradio 4 line, reForge) and its
modules.

Host facts this relies on (read from the hosts' own sources):

- The host's modules are importable as ``modules.<name>`` (Forge adds ``modules_forge.<name>``).
- Forge: ``sd_models.load_model`` is a stub and ``sd_models.forge_model_reload()`` loads models through its own
  backend.
- reForge: ``sd_models.load_model(…, forced_reload)`` keeps its own list of loaded models.
"""

from __future__ import annotations

import importlib


def host_module(name: str):
    return importlib.import_module(f"modules.{name}")


def manages_loaded_models(sd_models) -> bool:
    """reForge's load_model(…, forced_reload) keeps its own list of loaded models (limit, teardown) and reads
    no checkpoint cache: there an in-memory merge goes straight to load_model(already_loaded_state_dict=)."""
    import inspect

    try:
        return "forced_reload" in inspect.signature(sd_models.load_model).parameters
    except (TypeError, ValueError):
        return False


def is_forge(sd_models=None) -> bool:
    """Forge (gradio 4 line) loads models through its own backend; its sd_models has forge_model_reload."""
    sd_models = sd_models or host_module("sd_models")
    return callable(getattr(sd_models, "forge_model_reload", None))

