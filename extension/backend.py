"""What the tab needs from the place it runs in: the model list, where outputs go, and how to preview.

Two implementations: :class:`StandaloneBackend` (``merge-lab ui``: model folders given on the command line,
previews rendered with diffusers) and ``host_backend.HostBackend`` (inside AUTOMATIC1111 / Forge / reForge:
the host's model list, the merged weights loaded into the running model, previews from the host's own txt2img).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from merge_lab.engine.recipe import Recipe
from merge_lab.errors import MergeLabError, RecipeError

from .model_catalog import output_file, place_config_beside, resolve_in_folders, scan_folders

ProgressFn = Callable[[int, int, str], None]


@dataclass
class PreviewSettings:
    prompt: str = "a photo of a cat"
    negative_prompt: str = ""
    seed: int = 1
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    sampler: str = ""


@dataclass
class PreviewResult:
    images: list[Any]  # PIL images
    infotext: str  # the generation parameters, in the web UI's "parameters" format
    model_name: str  # the name the merged model runs under (identifies the recipe)
    recipe_hash: str
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)


class PreviewUnavailable(MergeLabError):
    """Previews cannot be rendered here (e.g. the preview extra is not installed)."""


class HostLoadError(MergeLabError):
    """The web UI refused the merged weights (its model could not be built from them); its previous model
    stays loaded."""


class Busy(RecipeError):
    """Another merge is running in this process."""


class JobGuard:
    """One merge at a time per process (each holds models' worth of memory), whichever entry point asks:
    the tab's buttons, the HTTP route. Each job gets a cancel event the Cancel button sets."""

    def __init__(self):
        self._lock = threading.Lock()
        self.running: str | None = None
        self.cancel_event = threading.Event()

    @contextlib.contextmanager
    def job(self, name: str):
        if not self._lock.acquire(blocking=False):
            raise Busy(f"{self.running} is running; wait for it or cancel it")
        self.running = name
        self.cancel_event.clear()
        try:
            yield self.cancel_event
        finally:
            self.running = None
            self._lock.release()

    def cancel(self) -> str | None:
        """Ask the running job to stop; returns its name (None when nothing runs)."""
        running = self.running
        if running is not None:
            self.cancel_event.set()
        return running


class Backend:
    """Defaults shared by every backend; subclasses say where models live and how previews are made."""

    kind = "base"
    title = "Merge Lab"
    supports_xyz = False  # the X/Y/Z plot axes exist only inside a web UI

    @property
    def jobs(self) -> JobGuard:
        guard = self.__dict__.get("_jobs")
        if guard is None:
            guard = self.__dict__["_jobs"] = JobGuard()
        return guard

    def model_names(self, refresh: bool = False) -> list[str]:
        raise NotImplementedError

    def resolve_model(self, name: str) -> str:
        raise NotImplementedError

    def output_path(self, name: str) -> str:
        raise NotImplementedError

    def lora_folders(self) -> list[str]:
        """Where the LoRAs a recipe names by name are looked up (the host's LoRA folder)."""
        return []

    def lora_names(self) -> list[str]:
        return list(scan_folders(self.lora_folders()))

    def resolve_lora(self, name: str) -> str:
        """The LoRA file a user-given name means: a listed name, or a path inside the LoRA folders."""
        folders = self.lora_folders()
        return resolve_in_folders(name, folders, scan_folders(folders), what="LoRA")

    def vae_folders(self) -> list[str]:
        """Where the standalone VAE files a recipe bakes are looked up (the host's VAE folder)."""
        return []

    def vae_names(self) -> list[str]:
        return list(scan_folders(self.vae_folders()))

    def resolve_vae(self, name: str) -> str:
        """The VAE file a user-given name means: a listed name, or a path inside the VAE folders."""
        folders = self.vae_folders()
        return resolve_in_folders(name, folders, scan_folders(folders), what="VAE")

    def after_save(self, path: str, sources: Sequence[str] = ()) -> None:
        """Called after a merge was written from `sources` (its input paths, first model first): the model's
        config goes beside it and the model list is refreshed."""

    def preview_available(self) -> str | None:
        """None when previews work here, else a one-line reason."""
        return None

    def sampler_names(self) -> list[str]:
        return []

    def preview_defaults(self) -> PreviewSettings:
        return PreviewSettings()

    def preview(self, recipe: Recipe, settings: PreviewSettings, *, progress: ProgressFn | None = None,
                cancel: threading.Event | None = None) -> PreviewResult:
        raise NotImplementedError

    def interrupt(self) -> None:
        """Stop a running preview render (the merge itself stops through its cancel event)."""

    def remember_xyz_recipe(self, recipe: Recipe) -> None:
        raise RecipeError("the X/Y/Z plot axes exist only inside the web UI")


class FolderBackend(Backend):
    """Models are the files inside the given folders; merges are saved into the first one."""

    def __init__(self, folders: Sequence[str | os.PathLike], output_folder: str | os.PathLike | None = None,
                 lora_folders: Sequence[str | os.PathLike] | None = None):
        self.folders = [os.path.abspath(os.fspath(f)) for f in folders]
        if not self.folders:
            raise RecipeError("no model folder given (--models-dir)")
        self.output_folder = os.path.abspath(os.fspath(output_folder or self.folders[0]))
        # LoRAs: the given folders, else the model folders (a LoRA beside the checkpoints)
        self._lora_folders = [os.path.abspath(os.fspath(f)) for f in lora_folders] if lora_folders else self.folders
        self._listed: dict[str, str] = {}

    def lora_folders(self) -> list[str]:
        return list(self._lora_folders)

    def vae_folders(self) -> list[str]:
        # the model folders' VAE subfolders (A1111's models/VAE beside models/Stable-diffusion), then the
        # model folders themselves
        return [*(os.path.join(os.path.dirname(f), "VAE") for f in self.folders), *self.folders]

    def model_names(self, refresh: bool = False) -> list[str]:
        if refresh or not self._listed:
            self._listed = scan_folders(self.folders)
        return list(self._listed)

    def resolve_model(self, name: str) -> str:
        if not self._listed:
            self.model_names(refresh=True)
        try:
            return resolve_in_folders(name, self.folders, self._listed)
        except RecipeError:
            self.model_names(refresh=True)  # a file added since the last listing
            return resolve_in_folders(name, self.folders, self._listed)

    def output_path(self, name: str) -> str:
        return output_file(name, self.output_folder)

    def after_save(self, path: str, sources: Sequence[str] = ()) -> None:
        place_config_beside(path, sources)
        self.model_names(refresh=True)
