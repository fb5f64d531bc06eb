"""The host backend: merges loaded into the running web UI in memory, under a virtual checkpoint, and previews
through the host's own txt2img (AUTOMATIC1111 1.10, Forge of the gradio 4 line, reForge).

Host facts this relies on (read from the hosts' own sources):

- AUTOMATIC1111 / reForge: ``sd_models.load_model(checkpoint_info, already_loaded_state_dict=sd)`` builds the
  model from a state dict in memory; its ``load_model_weights`` writes ``opts.sd_model_checkpoint`` unless inside
  ``SkipWritingToConfig()``; ``CheckpointInfo.calculate_shorthash()`` hashes ``filename`` (ours does not exist, so
  our subclass returns the recipe hash).
- Forge: ``sd_models.load_model`` is a stub; ``forge_model_reload()`` loads ``checkpoint_info.filename`` through
  its own backend (``forge_loader`` takes a file path, not a state dict), selected by
  ``modules_forge.main_entry.checkpoint_change(title)``. So on Forge the merge goes to a temporary file outside
  the model folders (deleted when no longer used) that the virtual checkpoint points at. Forge runs generation
  on its main thread (``modules_forge.main_thread.run_and_wait_result``).
- Generation from a UI or API handler holds ``call_queue.queue_lock`` and wraps the work in
  ``shared.state.begin()`` / ``end()``, like the host's own txt2img.
- An X/Y/Z cell's ``process_images`` calls our script's ``before_process(p)`` (there
  :meth:`HostBackend.before_process` merges) before it applies ``p.override_settings`` (where
  ``sd_model_checkpoint`` names our virtual checkpoint, so the host does not reload the dropdown's model).
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import importlib
import json
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

from merge_lab import archs
from merge_lab.engine import MergePlan, Recipe, merge_to_file, merge_to_state_dict, prepare
from merge_lab.errors import RecipeError

from .backend import Backend, HostLoadError, PreviewResult, PreviewSettings, ProgressFn
from .host_detect import host_module, is_forge, manages_loaded_models
from .model_catalog import output_file, place_config_beside, recipe_sources, resolve_in_folders
from .xyz_axes import OVERRIDES_ATTR, apply_overrides

TEMP_FILES_KEPT = 2  # Forge: merged files on disk, the current one and the one before


# --------------------------------------------------------------------------------------------------
# virtual checkpoints: how an unsaved merge is named in the web UI
# --------------------------------------------------------------------------------------------------

_virtual_classes: dict[type, type] = {}


def virtual_checkpoint_class(sd_models) -> type:
    base = sd_models.CheckpointInfo
    cls = _virtual_classes.get(base)
    if cls is not None:
        return cls

    class MergeLabCheckpointInfo(base):
        """A checkpoint entry for merged weights that exist in memory (or in Forge's temporary file): its name
        and hash are the recipe's, so the infotext and the dropdown say which recipe made an image."""

        merge_lab_virtual = True

        def __init__(self, filename: str, stem: str, fingerprint: str, recipe_record: dict[str, Any]):
            # The host's __init__ reads and hashes `filename`; an in-memory merge has no file to read.
            self.filename = filename
            self.is_safetensors = True
            self.name = f"{stem}.safetensors"
            self.name_for_extra = stem
            self.model_name = stem
            self.hash = fingerprint[:8]
            self.sha256 = fingerprint
            self.shorthash = fingerprint[:10]
            self.title = f"{self.name} [{self.shorthash}]"
            self.short_title = f"{stem} [{self.shorthash}]"
            self.ids = [self.hash, self.model_name, self.title, self.name, self.name_for_extra,
                        f"{self.name} [{self.hash}]", self.shorthash, self.sha256,
                        f"{self.name_for_extra} [{self.shorthash}]"]
            self.metadata = {"sd_merge_recipe": json.dumps(recipe_record)}
            self.modelspec_thumbnail = None
            self.merge_lab_fingerprint = fingerprint

        def calculate_shorthash(self):
            return self.shorthash

    _virtual_classes[base] = MergeLabCheckpointInfo
    return MergeLabCheckpointInfo


def is_virtual(info) -> bool:
    return bool(getattr(info, "merge_lab_virtual", False))


def virtual_stem(method: str, fingerprint: str) -> str:
    """How an unsaved merge is named: the same as in `merge-lab preview`'s infotexts
    (merge_lab.preview.render.merged_model_name), so an image names its recipe the same way wherever it was made."""
    return f"merged-{method}-{fingerprint[:10]}"


# --------------------------------------------------------------------------------------------------
# running work the way the host runs generation
# --------------------------------------------------------------------------------------------------

def run_on_host_thread(fn: Callable[[], Any]) -> Any:
    """Forge runs model loading and sampling on its main thread; elsewhere, run here."""
    try:
        main_thread = importlib.import_module("modules_forge.main_thread")
    except ImportError:
        return fn()
    runner = getattr(main_thread, "run_and_wait_result", None)
    if runner is None:
        return fn()
    box: dict[str, Any] = {}

    def work():
        try:
            box["value"] = fn()
        except BaseException as e:  # Forge's runner swallows exceptions: carry them back ourselves
            box["error"] = e
        return True

    runner(work)
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _supported_fields(cls: type, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keep the keywords the host's processing class accepts (its fields differ between hosts)."""
    if dataclasses.is_dataclass(cls):
        names = {f.name for f in dataclasses.fields(cls) if f.init}
    else:
        import inspect

        names = set(inspect.signature(cls.__init__).parameters)
    return {k: v for k, v in kwargs.items() if k in names}


# --------------------------------------------------------------------------------------------------
# the backend the tab talks to
# --------------------------------------------------------------------------------------------------

class HostBackend(Backend):
    """The tab, the HTTP route and the X/Y/Z axes inside a running web UI."""

    kind = "webui"
    supports_xyz = True

    def __init__(self):
        self.sd_models = host_module("sd_models")
        self.shared = host_module("shared")
        self.forge = is_forge(self.sd_models)
        self.virtual: dict[str, Any] = {}  # fingerprint -> registered virtual checkpoint info
        self.xyz_recipe: Recipe | None = None
        self.stats = {"merges": 0, "loads": 0}
        self._temp_dir: str | None = None
        self._temp_files: dict[str, str] = {}  # fingerprint -> merged file (Forge)
        self._rendering = False  # our preview is the job running in the web UI

    # ---- models --------------------------------------------------------------------------------------
    def model_folders(self) -> list[str]:
        folders = [self.sd_models.model_path]
        ckpt_dir = getattr(getattr(self.shared, "cmd_opts", None), "ckpt_dir", None)
        if ckpt_dir:
            folders.append(os.path.abspath(ckpt_dir))
        return folders

    def _listed(self) -> dict[str, Any]:
        return {info.name: info for info in self.sd_models.checkpoints_list.values() if not is_virtual(info)}

    def model_names(self, refresh: bool = False) -> list[str]:
        if refresh:
            self.sd_models.list_models()
            self._reregister_virtual()
        return sorted(self._listed(), key=str.casefold)

    def resolve_model(self, name: str) -> str:
        info = self.sd_models.checkpoint_aliases.get(str(name).strip())
        if info is not None and not is_virtual(info):
            return os.path.abspath(info.filename)
        listed = {n: os.path.abspath(i.filename) for n, i in self._listed().items()}
        return resolve_in_folders(name, self.model_folders(), listed)

    def output_path(self, name: str) -> str:
        return output_file(name, self.sd_models.model_path)

    def lora_folders(self) -> list[str]:
        """The host's LoRA folder: `--lora-dir` (A1111's built-in Lora extension and Forge declare it),
        else models/Lora beside models/Stable-diffusion, as both default to."""
        lora_dir = getattr(getattr(self.shared, "cmd_opts", None), "lora_dir", None)
        folders = [os.path.abspath(lora_dir)] if lora_dir else []
        default = os.path.join(os.path.dirname(os.path.abspath(self.sd_models.model_path)), "Lora")
        if default not in folders:
            folders.append(default)
        return folders

    def vae_folders(self) -> list[str]:
        """The host's VAE folder: `--vae-dir` (A1111, Forge), else models/VAE beside models/Stable-diffusion,
        as modules/sd_vae.py looks there."""
        vae_dir = getattr(getattr(self.shared, "cmd_opts", None), "vae_dir", None)
        folders = [os.path.abspath(vae_dir)] if vae_dir else []
        default = os.path.join(os.path.dirname(os.path.abspath(self.sd_models.model_path)), "VAE")
        if default not in folders:
            folders.append(default)
        return folders

    def after_save(self, path: str, sources=()) -> None:
        place_config_beside(path, sources)
        self.model_names(refresh=True)

    # ---- previews ------------------------------------------------------------------------------------
    def sampler_names(self) -> list[str]:
        samplers = host_module("sd_samplers")
        visible = getattr(samplers, "visible_samplers", None)
        entries = visible() if callable(visible) else getattr(samplers, "all_samplers", [])
        return [s.name for s in entries]

    def preview_defaults(self) -> PreviewSettings:
        names = self.sampler_names()
        return PreviewSettings(sampler="Euler a" if "Euler a" in names else (names[0] if names else ""))

    def preview(self, recipe: Recipe, settings: PreviewSettings, *, progress: ProgressFn | None = None,
                cancel: threading.Event | None = None) -> PreviewResult:
        start = time.perf_counter()
        info = self.load(recipe, as_current=True, progress=progress, cancel=cancel)
        self.xyz_recipe = recipe  # the recipe last previewed is what the X/Y/Z axes vary
        images, infotext = self.render(info, settings)
        return PreviewResult(images, infotext, info.name_for_extra, info.merge_lab_fingerprint,
                             time.perf_counter() - start)

    def interrupt(self) -> None:
        """Cancel pressed during our preview's sampling (never someone else's generation)."""
        if self._rendering:
            self.shared.state.interrupt()

    def remember_xyz_recipe(self, recipe: Recipe) -> None:
        self.xyz_recipe = recipe

    # ---- merged weights into the running model -------------------------------------------------------
    def loaded_fingerprint(self) -> str | None:
        model = getattr(self.sd_models.model_data, "sd_model", None)
        info = getattr(model, "sd_checkpoint_info", None)
        return getattr(info, "merge_lab_fingerprint", None)

    def load(self, recipe: Recipe, *, as_current: bool, progress: ProgressFn | None = None,
             cancel: threading.Event | None = None, lock: bool = True):
        """Merge `recipe` (unless the running model already is that merge) and make it the running model.

        `as_current`: the merge becomes the web UI's selected model (the tab's preview, the HTTP route);
        otherwise the setting is left alone and the caller names the model in `p.override_settings`
        (X/Y/Z cells). `lock`: take the host's queue lock (not from inside a generation, which holds it).
        """
        plan = prepare(recipe)
        try:
            self._check_host_loads(plan)
            fingerprint = plan.fingerprint
            if self.loaded_fingerprint() == fingerprint:
                info = self.virtual[fingerprint]
                self._register(info)
                if as_current:
                    self._select(info, lock=lock)
                return info
            if self.forge:
                path = self._temp_files.get(fingerprint)
                if path is None or not os.path.exists(path):
                    path = self._merge_to_temp_file(recipe, plan, progress, cancel)
                info = self._virtual_info(plan, path)
                payload = None
            else:
                info = self._virtual_info(plan, self._virtual_filename(plan))
                payload = merge_to_state_dict(recipe, plan=plan, progress=progress, cancel=cancel).state_dict
                self.stats["merges"] += 1
            # The host builds the model from the .yaml beside its file, when there is one: the merge's is
            # its first model's (a v-prediction or tiny model would otherwise be built as a plain SD1).
            place_config_beside(info.filename, recipe_sources(recipe))
        finally:
            plan.close()
        if as_current:  # the running model's recipe is what the X/Y/Z axes vary (tab preview, HTTP route)
            self.xyz_recipe = recipe
        previous = getattr(self.shared.opts, "data", {}).get("sd_model_checkpoint")
        self._register(info)
        try:
            self._activate(info, payload, as_current=as_current, lock=lock)
        except Exception as e:  # the host could not build its model from the merge; it keeps the old one
            self._unregister(info)
            self.virtual.pop(fingerprint, None)
            if previous is not None:
                self.shared.opts.data["sd_model_checkpoint"] = previous
            first = str(e).strip().splitlines()[:2]
            raise HostLoadError(f"the web UI could not load the merged weights: {type(e).__name__}: "
                                f"{' '.join(line.strip() for line in first)[:300]}") from None
        return info

    def _check_host_loads(self, plan: MergePlan) -> None:
        """AUTOMATIC1111 1.10 and reForge build LDM UNets only (their sd_models_config picks an SD1 / SD2 / SDXL
        config): a Flux / Chroma / SD3 merge is refused before any merging. Forge takes the merged file through
        its own loader (forge_loader recognises Flux.1), which reports what it does not recognise."""
        spec = archs.get(plan.arch.arch)
        if spec.family and not self.forge:
            raise HostLoadError(f"this web UI cannot load {spec.title} models (its loader builds SD1.x / SD2.x / "
                                "SDXL only): save the merge (Merge) and load it in Forge or ComfyUI, or preview it "
                                "with `merge-lab ui`")

    def _virtual_filename(self, plan: MergePlan) -> str:
        # Unique per recipe and never an existing file: reusing a real model's filename would make the host
        # treat a later choice of that model as already loaded.
        return os.path.join(tempfile.gettempdir(), "merge-lab-in-memory",
                            virtual_stem(plan.method.name, plan.fingerprint) + ".safetensors")

    def _virtual_info(self, plan: MergePlan, filename: str):
        cls = virtual_checkpoint_class(self.sd_models)
        info = cls(filename, virtual_stem(plan.method.name, plan.fingerprint), plan.fingerprint,
                   plan.recipe_record())
        self.virtual[plan.fingerprint] = info
        return info

    def temp_folder(self) -> str:
        """Forge's merged files: beside the model folder (same disk, room for SDXL; /tmp may be a small tmpfs),
        outside every folder the web UI lists; emptied at start (a crashed session's files) and at exit."""
        if self._temp_dir is None:
            folder = os.environ.get("MERGE_LAB_TEMP") or os.path.join(os.path.dirname(self.sd_models.model_path),
                                                                       "merge-lab-temp")
            os.makedirs(folder, exist_ok=True)
            for stale in os.listdir(folder):
                if stale.startswith("merged-") and stale.endswith((".safetensors", ".partial")):
                    with contextlib.suppress(OSError):
                        os.remove(os.path.join(folder, stale))
            atexit.register(shutil.rmtree, folder, True)
            self._temp_dir = folder
        return self._temp_dir

    def _merge_to_temp_file(self, recipe: Recipe, plan: MergePlan, progress, cancel) -> str:
        path = os.path.join(self.temp_folder(), virtual_stem(plan.method.name, plan.fingerprint) + ".safetensors")
        merge_to_file(recipe.replace(out=path), plan=plan, progress=progress, cancel=cancel, overwrite=True)
        self.stats["merges"] += 1
        self._temp_files[plan.fingerprint] = path
        for old in list(self._temp_files)[:-TEMP_FILES_KEPT]:
            with contextlib.suppress(OSError):
                os.remove(self._temp_files.pop(old))
        return path

    def _register(self, info) -> None:
        self.sd_models.checkpoints_list[info.title] = info
        for alias in info.ids:
            self.sd_models.checkpoint_aliases[alias] = info

    def _unregister(self, info) -> None:
        if self.sd_models.checkpoints_list.get(info.title) is info:
            del self.sd_models.checkpoints_list[info.title]
        for alias in info.ids:
            if self.sd_models.checkpoint_aliases.get(alias) is info:
                del self.sd_models.checkpoint_aliases[alias]

    def _reregister_virtual(self) -> None:
        """list_models() clears the registry; the running merge must stay selectable."""
        fingerprint = self.loaded_fingerprint()
        if fingerprint in self.virtual:
            self._register(self.virtual[fingerprint])

    def model_loaded(self, sd_model) -> None:
        """on_model_loaded: merges whose weights are gone (A1111 keeps no file) leave the model list."""
        fingerprint = getattr(getattr(sd_model, "sd_checkpoint_info", None), "merge_lab_fingerprint", None)
        for fp, info in list(self.virtual.items()):
            if fp == fingerprint or (self.forge and fp in self._temp_files):
                continue
            self._unregister(info)
            del self.virtual[fp]

    def _select(self, info, *, lock: bool) -> None:
        def select():
            if self.forge:
                host = importlib.import_module("modules_forge.main_entry")
                host.checkpoint_change(info.title, save=False, refresh=True)
            else:
                self.shared.opts.data["sd_model_checkpoint"] = info.title

        self._with_host(select, lock)

    def _activate(self, info, state_dict, *, as_current: bool, lock: bool) -> None:
        sd_models = self.sd_models

        def activate():
            if self.forge:
                if as_current:
                    host = importlib.import_module("modules_forge.main_entry")
                    host.checkpoint_change(info.title, save=False, refresh=True)
                    sd_models.forge_model_reload()
                    self.stats["loads"] += 1
                # else: the cell's override_settings select it and Forge loads the file itself
                return
            skip = contextlib.nullcontext() if as_current else sd_models.SkipWritingToConfig()
            if manages_loaded_models(sd_models):
                with skip:
                    sd_models.load_model(info, already_loaded_state_dict=state_dict)
            else:
                # A1111: the host's own model switch (it takes the running model out of its list of loaded
                # models, undoes and redoes the text-encoder hijack around load_model_weights, restores the
                # previous weights on failure), fed from its checkpoint cache. Calling load_model directly
                # would leave the replaced model, moved to the meta device, in that list.
                sd_models.checkpoints_loaded[info] = state_dict
                try:
                    with skip:
                        sd_models.reload_model_weights(info=info)
                finally:
                    if not getattr(self.shared.opts, "sd_checkpoint_cache", 0):
                        sd_models.checkpoints_loaded.pop(info, None)
            self.stats["loads"] += 1
            if as_current:  # reForge's load_model does not write the setting itself
                self.shared.opts.data["sd_model_checkpoint"] = info.title

        self._with_host(activate, lock)

    def _with_host(self, fn: Callable[[], Any], lock: bool) -> Any:
        if not lock:
            return fn()
        call_queue = host_module("call_queue")
        with call_queue.queue_lock:
            return run_on_host_thread(fn)

    def render(self, info, settings: PreviewSettings) -> tuple[list[Any], str]:
        """A txt2img with the host's own pipeline and settings, on the loaded merge."""
        processing = host_module("processing")

        def txt2img():
            state = self.shared.state
            state.begin(job="merge_lab_preview")
            self._rendering = True
            try:
                kwargs = _supported_fields(processing.StableDiffusionProcessingTxt2Img, dict(
                    sd_model=self.shared.sd_model, prompt=settings.prompt, negative_prompt=settings.negative_prompt,
                    seed=settings.seed, sampler_name=settings.sampler or None, batch_size=1, n_iter=1,
                    steps=settings.steps, cfg_scale=settings.cfg_scale, width=settings.width, height=settings.height,
                    do_not_save_samples=True, do_not_save_grid=True,
                    override_settings={"sd_model_checkpoint": info.title},
                    override_settings_restore_afterwards=True))
                p = processing.StableDiffusionProcessingTxt2Img(**kwargs)
                with contextlib.closing(p):
                    processed = processing.process_images(p)
            finally:
                self._rendering = False
                state.end()
            infotexts = getattr(processed, "infotexts", None) or [getattr(processed, "info", "")]
            return list(processed.images), infotexts[0]

        return self._with_host(txt2img, lock=True)

    # ---- X/Y/Z -----------------------------------------------------------------------------------------
    def xyz_recipe_for(self, overrides: dict[str, Any]) -> Recipe:
        if self.xyz_recipe is None:
            raise RecipeError("no Merge Lab recipe for the X/Y/Z plot: set one up in the Merge Lab tab and press "
                              "'Use this recipe in the X/Y/Z plot' (or run a preview)")
        return apply_overrides(self.xyz_recipe, overrides)

    def before_process(self, p) -> None:
        """Merge (once per recipe) and select the cell's recipe; called from our script's before_process."""
        overrides = getattr(p, OVERRIDES_ATTR, None)
        if not overrides:
            return
        try:
            recipe = self.xyz_recipe_for(overrides)
            info = self.load(recipe, as_current=False, lock=False)  # the generation holds the queue lock
        except Exception:
            # the host only logs exceptions from before_process; stop the grid instead of drawing cells
            # with the wrong model
            self.shared.state.interrupted = True
            raise
        # p is a shallow copy per cell: replace the dicts instead of changing the shared ones
        p.override_settings = {**(p.override_settings or {}), "sd_model_checkpoint": info.title}
        p.extra_generation_params = {**(getattr(p, "extra_generation_params", None) or {}),
                                     "Merge Lab recipe": info.merge_lab_fingerprint}

