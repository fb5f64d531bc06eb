"""The previews' renderer: each architecture's diffusers pipeline, built once without weights, the cache that
keeps it between renders, and the entry points :func:`render` (a state dict or a checkpoint file) and
:func:`render_merge` (an engine :class:`~merge_lab.engine.executor.MergeResult`).

Loading is exact (``load_state_dict(strict=True, assign=True)``: a key the converter did not produce, or one the
model does not have, is an error here, never the silent random weights that diffusers' ``from_single_file``
gives on a mismatch without accelerate) and fast (no file is written or re-read, tensors already in the render
dtype are used in place, and rendering a second merge only swaps the weights: see :class:`PipelineCache`).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import threading
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from merge_lab import archs
from merge_lab.archs.layouts import UNET_PREFIX
from merge_lab.errors import MergeLabError
from merge_lab.preview.components import with_components
from merge_lab.preview.convert import (
    _quiet_imports,
    component_names,
    convert_state_dict,
    is_flow,
    text_encoder_names,
    used_keys,
)
from merge_lab.preview.diffusers_configs import load_shipped, pipeline_configs
from merge_lab.preview.identify import ModelKind, identify
from merge_lab.preview.infotext import infotext, merged_model_name
from merge_lab.preview.settings import (
    SAMPLERS,
    PreviewSettings,
    Sampler,
    find_sampler,
    render_dtype,
    torch_device,
)

# ----------------------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------------------

# Flow-matching models (Flux, Chroma, SD3) sample with diffusers' flow-matching schedulers: Euler, its
# stochastic form (noise re-injected each step, as ComfyUI's euler_ancestral does on flow models) and Heun.
FLOW_SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "euler_a": ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}),
    "heun": ("FlowMatchHeunDiscreteScheduler", {}),
}

def _empty_weights():
    from accelerate import init_empty_weights

    # Parameters on the meta device (no memory, no random init); buffers such as CLIP's position_ids are
    # real, since load_state_dict does not carry non-persistent buffers.
    return init_empty_weights(include_buffers=False)


class PreviewPipeline:
    """One architecture's diffusers pipeline, built once without weights, then loaded with any state dict."""

    def __init__(self, kind: ModelKind, dtype: torch.dtype, device: torch.device):
        diffusers, transformers = _quiet_imports()
        from merge_lab.preview.tokenizer import clip_tokenizer

        self.layout = kind.layout
        self.arch = kind.arch.arch
        self.dtype = dtype
        self.device = device
        self.variant = kind.variant
        self.weights_id: str | None = None
        # Real sizes use the shipped config folders (what users can pass to from_single_file); tiny models
        # the same generator's output for their layout.
        self.configs = load_shipped(kind.variant.name) if kind.is_real_size else \
            pipeline_configs(kind.layout, kind.variant)
        cfg = self.configs

        def plain(config):
            return {k: v for k, v in config.items() if not k.startswith("_")}

        if is_flow(self.layout):
            self._build_flow(diffusers, transformers, plain)
            return
        with _empty_weights():
            unet = diffusers.UNet2DConditionModel.from_config(plain(cfg["unet/config.json"]))
            vae = diffusers.AutoencoderKL.from_config(plain(cfg["vae/config.json"]))
            encoders = {}
            for name in component_names(self.layout)[2:]:
                te_cfg = dict(cfg[f"{name}/config.json"])
                cls = getattr(transformers, te_cfg["architectures"][0])
                encoders[name] = cls(transformers.CLIPTextConfig.from_dict(te_cfg))
        tokenizers = {}
        for name in ("tokenizer", "tokenizer_2")[: len(encoders)]:
            tok_cfg = cfg[f"{name}/tokenizer_config.json"]
            tokenizers[name] = clip_tokenizer(tok_cfg["pad_token"], tok_cfg["model_max_length"])
        self.modules = {"unet": unet, "vae": vae, **encoders}
        for module in self.modules.values():
            module.eval().requires_grad_(False)
        scheduler = self._scheduler(SAMPLERS["euler"])
        support = archs.get(self.arch).preview
        self.pipe = getattr(diffusers, support.pipeline)(vae=vae, unet=unet, scheduler=scheduler, **encoders,
                                                         **tokenizers, **support.pipeline_options)
        self.pipe.set_progress_bar_config(disable=True)

    def _build_flow(self, diffusers, transformers, plain) -> None:
        """Flux / Chroma / SD3: a transformer, the 16-channel VAE, CLIP and / or T5 text encoders."""
        from merge_lab.preview.t5_tokenizer import t5_tokenizer
        from merge_lab.preview.tokenizer import clip_tokenizer

        cfg = self.configs
        encoders, tokenizers = {}, {}
        with _empty_weights():
            t_cfg = cfg["transformer/config.json"]
            transformer = getattr(diffusers, t_cfg["_class_name"]).from_config(plain(t_cfg))
            vae = diffusers.AutoencoderKL.from_config(plain(cfg["vae/config.json"]))
            for name in text_encoder_names(self.layout):
                te_cfg = dict(cfg[f"{name}/config.json"])
                cls = te_cfg["architectures"][0]
                config_cls = transformers.T5Config if cls == "T5EncoderModel" else transformers.CLIPTextConfig
                encoders[name] = getattr(transformers, cls)(config_cls.from_dict(te_cfg))
        for name in text_encoder_names(self.layout):
            tok_name = name.replace("text_encoder", "tokenizer")
            tok_cfg = cfg[f"{tok_name}/tokenizer_config.json"]
            tokenizers[tok_name] = t5_tokenizer(tok_cfg["model_max_length"]) \
                if tok_cfg["tokenizer_class"] == "T5Tokenizer" else \
                clip_tokenizer(tok_cfg["pad_token"], tok_cfg["model_max_length"])
        self.modules = {"transformer": transformer, "vae": vae, **encoders}
        for module in self.modules.values():
            module.eval().requires_grad_(False)
        support = archs.get(self.arch).preview
        self.pipe = getattr(diffusers, support.pipeline)(transformer=transformer, vae=vae,
                                                         scheduler=self._scheduler(SAMPLERS["euler"]), **encoders,
                                                         **tokenizers, **support.pipeline_options)
        self.pipe.set_progress_bar_config(disable=True)

    # -- weights ------------------------------------------------------------------------------------------
    def load(self, state_dict: MutableMapping[str, torch.Tensor], *, weights_id: str | None = None,
             consume: bool = False) -> None:
        """Load an LDM state dict (exactly: every model key must come from it). With `consume`, the used
        tensors are popped from `state_dict` as they are cast, so the weights are never held twice."""
        self.release_weights()
        cast: dict[str, torch.Tensor] = {}
        for key in used_keys(self.layout):
            tensor = state_dict.pop(key) if consume else state_dict[key]
            cast[key] = tensor.to(device=self.device, dtype=self.dtype) if tensor.is_floating_point() else tensor
            del tensor
        converted = convert_state_dict(cast, self.layout, self.configs, self.modules)
        del cast
        for name, tensors in converted.items():
            module = self.modules[name]
            own = module.state_dict()
            expected = set(own)
            for key in expected - set(tensors):
                if key.endswith("position_ids"):  # a persistent buffer in older transformers: keep the model's
                    tensors[key] = own[key]
            missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            if missing or unexpected:
                raise MergeLabError(f"{name}: the converted weights do not match the diffusers model "
                                    f"(missing {missing[:3]}, unexpected {unexpected[:3]}): not rendering with "
                                    "partly random weights")
            module.load_state_dict(tensors, strict=True, assign=True)
            module.to(self.device)
        self.weights_id = weights_id

    def release_weights(self) -> None:
        """Drop the loaded weights (the modules keep their structure on the meta device)."""
        if self.weights_id is None and not self._has_weights():
            return
        for module in self.modules.values():
            for sub in module.modules():
                for name, param in list(sub._parameters.items()):
                    if param is not None and param.device.type != "meta":
                        sub._parameters[name] = torch.nn.Parameter(torch.empty_like(param, device="meta"),
                                                                   requires_grad=False)
        self.weights_id = None

    def _has_weights(self) -> bool:
        main = self.modules.get("unet") or self.modules["transformer"]
        return any(p.device.type != "meta" for p in main.parameters())

    def guess_v_prediction(self) -> bool:
        """The web UI's test for SD2 checkpoints that do not say: a v-prediction UNet maps a constant input
        at t=999 far below it (mean(out - x) < -1)."""
        unet = self.modules["unet"]
        x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=self.dtype, device=self.device)
        context = torch.full((1, 77, unet.config.cross_attention_dim), 0.5, dtype=self.dtype, device=self.device)
        with torch.inference_mode():
            out = unet(x, torch.tensor([999], device=self.device), encoder_hidden_states=context).sample
        return float((out.float() - x.float()).mean()) < -1

    # -- rendering ----------------------------------------------------------------------------------------
    def _scheduler(self, sampler: Sampler):
        import diffusers

        base = {k: v for k, v in self.configs["scheduler/scheduler_config.json"].items() if not k.startswith("_")}
        if self.variant.prediction_type == "flow":
            if sampler.name not in FLOW_SAMPLERS:
                raise MergeLabError(f"preview: sampler {sampler.label} does not sample flow-matching models "
                                    f"({self.variant.title}); use one of: "
                                    f"{', '.join(SAMPLERS[n].label for n in FLOW_SAMPLERS)}")
            cls_name, options = FLOW_SAMPLERS[sampler.name]
            return getattr(diffusers, cls_name).from_config(base, **options)
        base["prediction_type"] = self.variant.prediction_type
        cls = getattr(diffusers, sampler.scheduler)
        return cls.from_config(base, **dict(sampler.options))

    def size(self, settings: PreviewSettings) -> tuple[int, int]:
        native = self.variant.image_size
        return settings.width or native, settings.height or native

    def render(self, settings: PreviewSettings) -> list:
        """Images for `settings` (seed, seed+1, … for a batch) with the loaded weights."""
        if not self._has_weights():
            raise MergeLabError("preview: no weights loaded")
        settings.validate()
        width, height = self.size(settings)
        self.pipe.scheduler = self._scheduler(find_sampler(settings.sampler))
        generators = [torch.Generator("cpu").manual_seed(settings.seed + i) for i in range(settings.batch_size)]
        options: dict[str, Any] = {}
        if self.variant.prediction_type == "flow":
            options["max_sequence_length"] = self.variant.max_sequence_length
        # Flux.1 is guidance-distilled: the value is the model's guidance input, there is no negative pass
        # (Forge's "Distilled CFG Scale"); Chroma and SD3 run real CFG with the negative prompt.
        negative = None if archs.get(self.arch).preview.converter == "flux" else settings.negative_prompt or None
        if negative is not None or archs.get(self.arch).preview.converter != "flux":
            options["negative_prompt"] = negative
        with torch.inference_mode():
            result = self.pipe(prompt=settings.prompt, num_inference_steps=settings.steps,
                               guidance_scale=float(settings.cfg_scale), width=width, height=height,
                               generator=generators, num_images_per_prompt=settings.batch_size, output_type="pil",
                               **options)
        return list(result.images)


class PipelineCache:
    """Keeps the last built pipeline(s) so that repeated renders do not rebuild anything, and knows which
    weights each holds (by weights id: a recipe hash or a file identity). Capacity 1 by default: switching
    architecture, size or dtype frees the previous pipeline (and its weights)."""

    def __init__(self, capacity: int = 1):
        self.capacity = capacity
        self._pipelines: dict[tuple, PreviewPipeline] = {}
        self.lock = threading.RLock()  # one render at a time per cache (the web UI serves threads)
        self.builds = 0
        self.loads = 0

    def get(self, kind: ModelKind, dtype: torch.dtype, device: torch.device) -> PreviewPipeline:
        key = (kind.layout, dtype, str(device))
        pipe = self._pipelines.pop(key, None)
        if pipe is None:
            while len(self._pipelines) >= self.capacity:
                oldest = next(iter(self._pipelines))
                self._pipelines.pop(oldest).release_weights()
            pipe = PreviewPipeline(kind, dtype, device)
            self.builds += 1
        self._pipelines[key] = pipe  # most recent last
        pipe.variant = kind.variant
        return pipe

    def holding(self, weights_id: str | None) -> PreviewPipeline | None:
        """The cached pipeline whose loaded weights are `weights_id`, if any."""
        if weights_id is None:
            return None
        return next((p for p in self._pipelines.values() if p.weights_id == weights_id), None)

    def release_weights(self) -> None:
        for pipe in self._pipelines.values():
            pipe.release_weights()

    def clear(self) -> None:
        for pipe in self._pipelines.values():
            pipe.release_weights()
        self._pipelines.clear()
        gc.collect()


_DEFAULT_CACHE = PipelineCache()


def default_cache() -> PipelineCache:
    return _DEFAULT_CACHE


# ----------------------------------------------------------------------------------------------------
# entry points
# ----------------------------------------------------------------------------------------------------

@dataclass
class Source:
    """Where weights come from, and how the images name them."""

    state_dict: MutableMapping[str, torch.Tensor] | None
    shapes: dict[str, tuple[int, ...]]
    metadata: dict[str, str] = field(default_factory=dict)
    model_name: str = "merged"
    model_hash: str | None = None
    recipe: dict[str, Any] | None = None
    weights_id: str | None = None
    path: str | None = None
    # key -> (file, its key there): the components other files give (merge_lab.preview.components)
    component_sources: dict[str, tuple[str, str]] = field(default_factory=dict)


def _file_source(path: str | os.PathLike) -> Source:
    from merge_lab.archs import current_key_name
    from merge_lab.io.checkpoints import open_checkpoint
    from merge_lab.io.hashing import autov2, sha256_file

    path = os.fspath(path)
    reader = open_checkpoint(path, current_key_name)
    try:
        shapes = {k: tuple(t.shape) for k, t in reader.tensors.items()}
        metadata = dict(reader.metadata)
    finally:
        reader.close()
    recipe = None
    with contextlib.suppress(ValueError, TypeError):
        recipe = json.loads(metadata["sd_merge_recipe"]) if "sd_merge_recipe" in metadata else None
    st = os.stat(path)
    return Source(None, shapes, metadata, Path(path).stem, autov2(sha256_file(path)), recipe,
                  f"file:{os.path.realpath(path)}:{st.st_size}:{st.st_mtime_ns}", path)


def _read_file_weights(path: str | None, keys: list[str], dtype: torch.dtype,
                       sources: Mapping[str, tuple[str, str]] | None = None) -> dict[str, torch.Tensor]:
    """Read only the keys a preview uses, each cast to the render dtype as it is read (from the component file
    that gives it, else from `path`)."""
    from merge_lab.archs import current_key_name
    from merge_lab.io.checkpoints import open_checkpoint

    sources = sources or {}
    readers = {}
    try:
        out = {}
        for key in keys:
            file, file_key = sources.get(key, (path, key))
            if file not in readers:
                readers[file] = open_checkpoint(file, current_key_name if file == path else None)
            t = readers[file].read(file_key)
            out[key] = t.to(dtype) if t.is_floating_point() else t
        return out
    finally:
        for reader in readers.values():
            reader.close()


def _with_component_files(src: Source, files) -> Source:
    """`src` with the components other files give (text encoders, VAE) for a Flux / Chroma / SD3 preview."""
    from merge_lab.archs.detect import detect
    from merge_lab.io.checkpoints import open_checkpoint
    from merge_lab.preview.identify import _flow_layout, _infos

    arch = detect(_infos(src.shapes), src.metadata, src.path)
    if archs.get(arch.arch).preview is None or archs.get(arch.arch).preview.converter == "ldm":
        raise MergeLabError(f"preview: --with files are for Flux / Chroma / SD3 checkpoints, not {arch.arch}",
                            path=src.path)
    layout = _flow_layout(arch.arch, src.shapes)
    extra, ids = {}, []
    for file in files:
        file = os.fspath(file)
        reader = open_checkpoint(file)
        try:
            extra[file] = {k: tuple(t.shape) for k, t in reader.tensors.items()}
        finally:
            reader.close()
        st = os.stat(file)
        ids.append(f"{os.path.realpath(file)}:{st.st_size}:{st.st_mtime_ns}")
    shapes, sources = with_components(src.shapes, layout, extra)
    weights_id = f"{src.weights_id}+with:{'|'.join(ids)}" if src.weights_id else None
    return replace(src, shapes=shapes, component_sources=sources, weights_id=weights_id)


def prepare(source: Mapping[str, torch.Tensor] | str | os.PathLike, settings: PreviewSettings, *,
            arch: str | None = None, weights_id: str | None = None, consume: bool = False,
            metadata: Mapping[str, str] | None = None, cache: PipelineCache | None = None,
            components=()) -> tuple[PreviewPipeline, Source]:
    """The cached pipeline for `source`, holding its weights (loaded unless `weights_id` is already loaded);
    `components`: files giving a Flux / Chroma / SD3 checkpoint's text encoders or VAE."""
    cache = cache or _DEFAULT_CACHE
    if isinstance(source, (str, os.PathLike)):
        src = _file_source(source)
    else:
        if not isinstance(source, Mapping):
            raise MergeLabError(f"preview: expected a state dict or a file path, got {type(source).__name__}")
        src = Source(source, {k: tuple(v.shape) for k, v in source.items()}, dict(metadata or {}),
                     weights_id=weights_id)
    if weights_id is not None:
        src.weights_id = weights_id
    if components:
        src = _with_component_files(src, components)
    held = cache.holding(src.weights_id)
    if held is not None:
        return held, src
    if src.state_dict is not None and not any(k.startswith(UNET_PREFIX) for k in src.shapes):
        raise MergeLabError("preview: the state dict holds no UNet weights (consumed by an earlier render, and "
                            "those weights are no longer loaded?)")
    kind = identify(src.shapes, src.metadata, settings.prediction, src.path)
    if arch is not None and kind.arch.arch != arch:
        raise MergeLabError(f"preview: the weights are {kind.arch.arch}, not {arch}", path=src.path)
    device = torch_device(settings.device)
    dtype = render_dtype(settings.dtype, device, kind.n_params)
    pipe = cache.get(kind, dtype, device)
    keys = used_keys(kind.layout)
    if src.state_dict is None:
        weights = _read_file_weights(src.path, keys, dtype, src.component_sources)
    elif src.component_sources:
        given = [k for k in keys if k in src.component_sources]
        weights = {k: src.state_dict[k] for k in keys if k not in src.component_sources}
        weights.update(_read_file_weights(None, given, dtype, src.component_sources))
        if consume:
            for key in weights:
                src.state_dict.pop(key, None)
    else:
        weights = src.state_dict
    pipe.load(weights, weights_id=src.weights_id,
              consume=consume or src.state_dict is None or bool(src.component_sources))
    cache.loads += 1
    guess = archs.get(kind.arch.arch).preview.guess_by_test
    if guess is not None and not kind.prediction_known and settings.prediction == "auto" and not is_flow(kind.layout):
        releases = {v.name: v for v in archs.get(kind.arch.arch).preview.variants}
        pipe.variant = releases[guess[0] if pipe.guess_v_prediction() else guess[1]]
    return pipe, src


def render(source: Mapping[str, torch.Tensor] | str | os.PathLike, arch: str | None = None,
           settings: PreviewSettings | None = None, *, model_name: str | None = None,
           model_hash: str | None = None, recipe: Mapping[str, Any] | None = None, weights_id: str | None = None,
           consume: bool = False, metadata: Mapping[str, str] | None = None,
           cache: PipelineCache | None = None, components=()) -> list:
    """Render `settings` with the weights of `source` (an LDM state dict, or a checkpoint file).

    `arch` (sd1 / sd2 / sdxl) is checked when given; the model is identified from its keys anyway.
    `model_name`, `model_hash` and `recipe` go into each image's metadata (a file gives its own stem, AutoV2
    hash and stored recipe). `weights_id` names the weights: a later call with the same id reuses the
    loaded pipeline without reloading. `consume` pops the tensors out of the state dict while loading
    (the caller's dict ends up without them; the weights are then held once).
    Returns PIL images; ``image.info`` holds "parameters" (web-UI infotext) and, with a recipe,
    "merge_lab_recipe" (JSON).
    """
    settings = (settings or PreviewSettings()).resolved()
    cache = cache or _DEFAULT_CACHE
    with cache.lock:
        pipe, src = prepare(source, settings, arch=arch, weights_id=weights_id, consume=consume, metadata=metadata,
                            cache=cache, components=components)
        images = pipe.render(settings)
        width, height = pipe.size(settings)
    name = model_name or src.model_name
    hash_ = model_hash or src.model_hash
    recipe = recipe if recipe is not None else src.recipe
    for i, image in enumerate(images):
        seeded = replace(settings, seed=settings.seed + i, width=width, height=height)
        image.info["parameters"] = infotext(seeded, name, hash_, recipe)
        if recipe is not None:
            image.info["merge_lab_recipe"] = json.dumps(recipe, sort_keys=True)
    return images


def render_merge(result, settings: PreviewSettings | None = None, *, consume: bool = False,
                 cache: PipelineCache | None = None, components=()) -> list:
    """Render an engine MergeResult (from merge_to_state_dict): named by its output file or recipe hash, hashed
    by its AutoV2 (when saved) or recipe hash, carrying its recipe; cached by its recipe hash."""
    if result.state_dict is None and result.out:
        return render(result.out, settings=settings, model_name=merged_model_name(result),
                      recipe=result.recipe_record, cache=cache, components=components)
    if result.state_dict is None:
        raise MergeLabError("preview: the merge result holds no weights (merge with merge_to_state_dict)")
    metadata = {"modelspec.prediction_type": "v"} if "v-prediction" in result.arch else None
    return render(result.state_dict, settings=settings, model_name=merged_model_name(result),
                  model_hash=result.autov2 or result.fingerprint[:10], recipe=result.recipe_record,
                  weights_id=f"recipe:{result.fingerprint}", consume=consume, metadata=metadata, cache=cache,
                  components=components)
