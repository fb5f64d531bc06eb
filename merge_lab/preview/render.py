"""Preview images from merged weights with diffusers: from an in-memory state dict (no need to save) or a file.

How the weights get into diffusers: we build each architecture's pipeline ONCE, with empty (meta) weights,
from config files (``merge_lab/configs/<variant>/`` for the real SD1.5 / SD2.x / SDXL sizes, generated from
the layouts for the tiny demo models), then convert our single-file (LDM) state dict with diffusers' own
LDM→diffusers converters and load it with ``load_state_dict(strict=True, assign=True)``:

- exact: a key the converter did not produce, or one the model does not have, is an error here, never the
  silent random weights that diffusers' ``from_single_file`` gives on a mismatch without accelerate;
- fast: no file is written or re-read, tensors already in the render dtype are used in place (no copy),
  and the pipeline is reused: rendering a second merge only swaps the weights (see :class:`PipelineCache`).

The public API (used by the CLI, the X/Y/Z plot and the web-UI tab):

- :class:`PreviewSettings` — prompt, negative prompt, seed, steps, size, sampler, CFG scale, dtype, device;
- :func:`render` ``(state_dict_or_path, arch=None, settings) -> list[PIL.Image]`` and :func:`render_merge`
  for an engine :class:`~merge_lab.engine.executor.MergeResult`; each image carries its web-UI "parameters" text and
  the recipe JSON in ``image.info``;
- :func:`save_png` writes them as PNG text chunks; :func:`read_png_metadata` / :func:`parse_infotext` read
  them back.

Memory: weights are held once, in the render dtype. On CPU, ``dtype="auto"`` renders in float32 unless the
float32 weights would exceed :data:`FP32_CPU_LIMIT` (8 GiB), then in bfloat16 (a real SDXL: 3.47 B
parameters = 6.9 GB in bf16 instead of 13.9 GB in fp32); CUDA renders in float16.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import random
import re
import threading
from collections.abc import Mapping, MutableMapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from merge_lab import __version__
from merge_lab.archs.detect import Architecture, detect
from merge_lab.archs.layouts import UNET_PREFIX, CLIPConfig, ModelLayout, layout_for
from merge_lab.errors import MergeLabError
from merge_lab.io.safetensors import TensorInfo
from merge_lab.preview.diffusers_configs import (
    DEFAULT_VARIANT,
    VARIANTS,
    Variant,
    load_shipped,
    pipeline_configs,
)

# ----------------------------------------------------------------------------------------------------
# samplers
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampler:
    name: str  # our option value
    label: str  # the web UI's name (what the infotext says)
    scheduler: str  # diffusers class
    options: tuple[tuple[str, Any], ...] = ()


SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("euler", "Euler", "EulerDiscreteScheduler"),
        Sampler("euler_a", "Euler a", "EulerAncestralDiscreteScheduler"),
        Sampler("heun", "Heun", "HeunDiscreteScheduler"),
        Sampler("dpmpp_2m", "DPM++ 2M", "DPMSolverMultistepScheduler", (("algorithm_type", "dpmsolver++"),)),
        Sampler("dpmpp_2m_karras", "DPM++ 2M Karras", "DPMSolverMultistepScheduler",
                (("algorithm_type", "dpmsolver++"), ("use_karras_sigmas", True))),
        Sampler("dpmpp_2m_sde", "DPM++ 2M SDE", "DPMSolverMultistepScheduler",
                (("algorithm_type", "sde-dpmsolver++"),)),
        Sampler("dpm2", "DPM2", "KDPM2DiscreteScheduler"),
        Sampler("dpm2_a", "DPM2 a", "KDPM2AncestralDiscreteScheduler"),
        Sampler("lms", "LMS", "LMSDiscreteScheduler"),
        Sampler("ddim", "DDIM", "DDIMScheduler"),
        Sampler("pndm", "PLMS", "PNDMScheduler"),
        Sampler("unipc", "UniPC", "UniPCMultistepScheduler"),
    )
}


def find_sampler(name: str) -> Sampler:
    """By our name (euler_a) or the web UI's label (Euler a), case-insensitive."""
    key = name.strip().lower()
    for s in SAMPLERS.values():
        if key in (s.name, s.label.lower()):
            return s
    raise MergeLabError(f"unknown sampler {name!r} (valid: {', '.join(SAMPLERS)})")


# ----------------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------------

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
PREDICTION_CHOICES = ("auto", "epsilon", "v_prediction")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Above this many bytes of float32 weights, CPU previews use bfloat16 (a real SDXL is 13.9 GB in fp32, which
# does not fit a 24 GB machine next to a merge; SD1.x / SD2.x are 4.3 / 5.2 GB and stay in fp32).
FP32_CPU_LIMIT = 8 << 30
MAX_SEED = 2**32 - 1


@dataclass
class PreviewSettings:
    """What to render. Sizes default to the model's native resolution (512, SD2 768-v 768, SDXL 1024)."""

    prompt: str = "a photo of a cat"
    negative_prompt: str = ""
    seed: int = 0  # -1: a random seed (resolved once, see resolved())
    steps: int = 20
    width: int | None = None
    height: int | None = None
    sampler: str = "euler_a"
    cfg_scale: float = 7.0
    batch_size: int = 1  # images per render; image i uses seed + i
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16
    device: str = "auto"  # auto (cuda when available) | cpu | cuda[:N]
    # auto: the checkpoint's metadata, else the release's (SD2 without metadata: the web UI's test)
    prediction: str = "auto"  # auto | epsilon | v_prediction

    def validate(self) -> None:
        def bad(msg):
            raise MergeLabError(f"preview: {msg}")

        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            bad("prompt and negative prompt must be text")
        if type(self.seed) is not int or not -1 <= self.seed <= MAX_SEED:
            bad(f"seed must be an integer from 0 to {MAX_SEED} (or -1 for random), got {self.seed!r}")
        if type(self.steps) is not int or not 1 <= self.steps <= 500:
            bad(f"steps must be an integer from 1 to 500, got {self.steps!r}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (type(v) is not int or v < 8 or v % 8 or v > 4096):
                bad(f"{name} must be a multiple of 8 from 8 to 4096, got {v!r}")
        find_sampler(self.sampler)
        if isinstance(self.cfg_scale, bool) or not isinstance(self.cfg_scale, (int, float)) or \
                not 0 <= self.cfg_scale <= 50:
            bad(f"CFG scale must be a number from 0 to 50, got {self.cfg_scale!r}")
        if type(self.batch_size) is not int or not 1 <= self.batch_size <= 64:
            bad(f"batch size must be an integer from 1 to 64, got {self.batch_size!r}")
        if self.dtype not in DTYPE_CHOICES:
            bad(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", str(self.device)):
            bad(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.prediction not in PREDICTION_CHOICES:
            bad(f"prediction must be one of {', '.join(PREDICTION_CHOICES)}, got {self.prediction!r}")

    def resolved(self) -> PreviewSettings:
        """A copy with a concrete seed (-1 → a random one), validated."""
        self.validate()
        if self.seed == -1:
            return replace(self, seed=random.randint(0, MAX_SEED - 64))
        return replace(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def torch_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MergeLabError("preview: device cuda requested but torch sees no CUDA device")
    return device


def render_dtype(name: str, device: torch.device, n_params: int) -> torch.dtype:
    if name != "auto":
        return TORCH_DTYPES[name]
    if device.type == "cuda":
        return torch.float16
    return torch.float32 if 4 * n_params <= FP32_CPU_LIMIT else torch.bfloat16


# ----------------------------------------------------------------------------------------------------
# identifying a checkpoint
# ----------------------------------------------------------------------------------------------------

NOT_USED_SUFFIXES = ("position_ids", "logit_scale")  # buffers / training-only values, never rendered with


@dataclass(frozen=True)
class ModelKind:
    """What a checkpoint is, for rendering: its architecture, exact layout and release variant."""

    arch: Architecture
    layout: ModelLayout
    variant: Variant
    prediction_known: bool  # False: an SD2 checkpoint that does not say (decided by a test run)

    @property
    def is_real_size(self) -> bool:
        return self.layout == layout_for(self.arch.arch, vocab=self.layout.text_encoders[0].vocab)

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for s in self.layout.shapes().values())


def _infos(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, TensorInfo]:
    return {k: TensorInfo(k, "F32", tuple(s), 0, 0) for k, s in shapes.items()}


def identify(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str] | None = None,
             prediction: str = "auto", path: str | None = None) -> ModelKind:
    """Architecture, layout and variant of a checkpoint from its key shapes (and metadata), or a clear error."""
    arch = detect(_infos(shapes), dict(metadata or {}), path)
    if arch.arch == "sdxl-refiner":
        raise MergeLabError("SDXL refiner checkpoints cannot be previewed (a refiner only refines a base model's "
                            "latents; there is no text-to-image pipeline for it here)", path=path)
    for variant in ("inpaint", "instruct-pix2pix"):
        if variant in arch.variants:
            raise MergeLabError(f"{variant} checkpoints cannot be previewed (text-to-image only)", path=path)
    real = layout_for(arch.arch)
    first = f"{UNET_PREFIX}input_blocks.0.0.weight"
    if first not in shapes:
        raise MergeLabError("has no UNet input layer: cannot be previewed", path=path, key=first)
    te_prefix = real.text_encoders[0].prefix
    token_key = (f"{te_prefix}text_model.embeddings.token_embedding.weight"
                 if isinstance(real.text_encoders[0], CLIPConfig) else f"{te_prefix}token_embedding.weight")
    if token_key not in shapes:
        raise MergeLabError("has no text encoder: previews need the full checkpoint (UNet, VAE and text "
                            "encoders)", path=path, key=token_key)
    width = shapes[first][0]
    vocab = shapes[token_key][0]
    layout = layout_for(arch.arch, vocab=vocab) if width == real.unet.model_channels else \
        layout_for(arch.arch, width=width, vocab=vocab)
    for key, shape in layout.shapes().items():
        if key not in shapes:
            if key.endswith(NOT_USED_SUFFIXES):
                continue
            raise MergeLabError(f"is missing from this {arch.arch} checkpoint: it cannot be previewed", path=path,
                                key=key)
        if tuple(shapes[key]) != tuple(shape):
            raise MergeLabError(f"shape {list(shapes[key])} differs from the {arch.arch} layout's {list(shape)}: "
                                "previews support the standard SD1.x / SD2.x / SDXL shapes", path=path, key=key)
    if vocab != 49408:
        raise MergeLabError(f"has a {vocab}-token vocabulary: previews need CLIP's 49408 tokens", path=path,
                            key=token_key)

    known = True
    if arch.arch == "sd2":
        if prediction == "epsilon":
            name = "sd2-base"
        elif prediction == "v_prediction" or "v-prediction" in arch.variants:
            name = "sd2-768-v"
        else:
            stated = (metadata or {}).get("modelspec.prediction_type", "").lower()
            name = "sd2-base" if stated in ("epsilon", "eps") else DEFAULT_VARIANT["sd2"]
            known = bool(stated)
        return ModelKind(arch, layout, VARIANTS[name], known)
    variant = VARIANTS[DEFAULT_VARIANT[arch.arch]]
    if prediction == "v_prediction" or (prediction == "auto" and "v-prediction" in arch.variants):
        variant = replace(variant, prediction_type="v_prediction")  # e.g. v-prediction SDXL fine-tunes
    return ModelKind(arch, layout, variant, True)


# ----------------------------------------------------------------------------------------------------
# LDM -> diffusers conversion
# ----------------------------------------------------------------------------------------------------

def _quiet_imports():
    """Import diffusers / transformers with their import-time chatter (torchvision fallbacks) silenced; the
    host's logging levels are restored afterwards."""
    import transformers

    previous = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        import diffusers

        # diffusers imports lazily: touching the pipelines is the import that warns
        _ = diffusers.StableDiffusionPipeline, diffusers.StableDiffusionXLPipeline
    finally:
        transformers.utils.logging.set_verbosity(previous)
    return diffusers, transformers


def component_names(layout: ModelLayout) -> list[str]:
    return ["unet", "vae", *(["text_encoder", "text_encoder_2"][: len(layout.text_encoders)])]


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], layout: ModelLayout,
                       configs: Mapping[str, Mapping[str, Any]], modules: Mapping[str, Any] | None = None
                       ) -> dict[str, dict[str, torch.Tensor]]:
    """The LDM state dict as diffusers / transformers state dicts per component, with diffusers' converters.

    Tensors are not copied where the mapping is a rename (q/k/v splits and the VAE attention reshape are
    the exceptions). `modules` (the built models) tells the CLIP layout of the installed transformers:
    transformers >= 5.6 dropped the `text_model.` level of CLIPTextModel (not of ...WithProjection).
    """
    _quiet_imports()
    from diffusers.loaders import single_file_utils as su

    out = {
        "unet": su.convert_ldm_unet_checkpoint(state_dict, dict(configs["unet/config.json"])),
        "vae": su.convert_ldm_vae_checkpoint(state_dict, dict(configs["vae/config.json"])),
    }
    for i, te in enumerate(layout.text_encoders):
        name = ["text_encoder", "text_encoder_2"][i]
        module = (modules or {}).get(name)
        if isinstance(te, CLIPConfig):
            converted = {k: v for k, v in su.convert_ldm_clip_checkpoint(state_dict).items()
                         if not k.endswith("position_ids")}
        else:
            if module is None:
                raise ValueError("converting an OpenCLIP text encoder needs the built module")
            converted = su.convert_open_clip_checkpoint(module, state_dict, prefix=te.prefix)
            if layout.arch == "sd2":
                converted.pop("text_projection.weight", None)  # CLIPTextModel has no projection
        has_wrapper = module is None or hasattr(module, "text_model")
        if not has_wrapper:
            converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
        out[name] = converted
    return out


def used_keys(layout: ModelLayout) -> list[str]:
    """The LDM keys a preview reads (everything of the layout but the never-used buffers)."""
    return [k for k in layout.shapes() if not k.endswith(NOT_USED_SUFFIXES)]


def ignored_keys(layout: ModelLayout) -> list[str]:
    """Layout keys the diffusers models do not use: buffers, and SD2's last text layer and projection (SD2
    conditions on the penultimate layer, so diffusers' text encoder ends one layer earlier)."""
    out = [k for k in layout.shapes() if k.endswith(NOT_USED_SUFFIXES)]
    if layout.arch == "sd2":
        te = layout.text_encoders[0]
        last = f"{te.prefix}transformer.resblocks.{te.layers - 1}."
        out += [k for k in layout.shapes() if k.startswith(last) or k == f"{te.prefix}text_projection"]
    return out


# ----------------------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------------------

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
        if self.arch == "sdxl":
            self.pipe = diffusers.StableDiffusionXLPipeline(
                vae=vae, text_encoder=encoders["text_encoder"], text_encoder_2=encoders["text_encoder_2"],
                tokenizer=tokenizers["tokenizer"], tokenizer_2=tokenizers["tokenizer_2"], unet=unet,
                scheduler=scheduler, force_zeros_for_empty_prompt=True, add_watermarker=False)
        else:
            self.pipe = diffusers.StableDiffusionPipeline(
                vae=vae, text_encoder=encoders["text_encoder"], tokenizer=tokenizers["tokenizer"], unet=unet,
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
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
        return any(p.device.type != "meta" for p in self.modules["unet"].parameters())

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
        with torch.inference_mode():
            result = self.pipe(prompt=settings.prompt, negative_prompt=settings.negative_prompt or None,
                               num_inference_steps=settings.steps, guidance_scale=float(settings.cfg_scale),
                               width=width, height=height, generator=generators,
                               num_images_per_prompt=settings.batch_size, output_type="pil")
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


def _file_source(path: str | os.PathLike) -> Source:
    from merge_lab.archs.layouts import current_key_name
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


def _read_file_weights(path: str, keys: list[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read only the keys a preview uses, each cast to the render dtype as it is read."""
    from merge_lab.archs.layouts import current_key_name
    from merge_lab.io.checkpoints import open_checkpoint

    reader = open_checkpoint(path, current_key_name)
    try:
        out = {}
        for key in keys:
            t = reader.read(key)
            out[key] = t.to(dtype) if t.is_floating_point() else t
        return out
    finally:
        reader.close()


def prepare(source: Mapping[str, torch.Tensor] | str | os.PathLike, settings: PreviewSettings, *,
            arch: str | None = None, weights_id: str | None = None, consume: bool = False,
            metadata: Mapping[str, str] | None = None, cache: PipelineCache | None = None
            ) -> tuple[PreviewPipeline, Source]:
    """The cached pipeline for `source`, holding its weights (loaded unless `weights_id` is already loaded)."""
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
    weights = src.state_dict if src.state_dict is not None else \
        _read_file_weights(src.path, used_keys(kind.layout), dtype)
    pipe.load(weights, weights_id=src.weights_id, consume=consume or src.state_dict is None)
    cache.loads += 1
    if kind.arch.arch == "sd2" and not kind.prediction_known and settings.prediction == "auto":
        pipe.variant = VARIANTS["sd2-768-v" if pipe.guess_v_prediction() else "sd2-base"]
    return pipe, src


def render(source: Mapping[str, torch.Tensor] | str | os.PathLike, arch: str | None = None,
           settings: PreviewSettings | None = None, *, model_name: str | None = None,
           model_hash: str | None = None, recipe: Mapping[str, Any] | None = None, weights_id: str | None = None,
           consume: bool = False, metadata: Mapping[str, str] | None = None,
           cache: PipelineCache | None = None) -> list:
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
                            cache=cache)
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


def merged_model_name(result) -> str:
    """How an in-memory merge is named in infotexts: the output file's stem, else method + recipe hash."""
    if getattr(result, "out", None):
        return Path(result.out).stem
    return f"merged-{result.method}-{result.fingerprint[:10]}"


def render_merge(result, settings: PreviewSettings | None = None, *, consume: bool = False,
                 cache: PipelineCache | None = None) -> list:
    """Render an engine MergeResult (from merge_to_state_dict): named by its output file or recipe hash, hashed
    by its AutoV2 (when saved) or recipe hash, carrying its recipe; cached by its recipe hash."""
    if result.state_dict is None and result.out:
        return render(result.out, settings=settings, model_name=merged_model_name(result),
                      recipe=result.recipe_record, cache=cache)
    if result.state_dict is None:
        raise MergeLabError("preview: the merge result holds no weights (merge with merge_to_state_dict)")
    metadata = {"modelspec.prediction_type": "v"} if "v-prediction" in result.arch else None
    return render(result.state_dict, settings=settings, model_name=merged_model_name(result),
                  model_hash=result.autov2 or result.fingerprint[:10], recipe=result.recipe_record,
                  weights_id=f"recipe:{result.fingerprint}", consume=consume, metadata=metadata, cache=cache)


# ----------------------------------------------------------------------------------------------------
# PNG metadata: the web UI's infotext ("parameters") and the recipe
# ----------------------------------------------------------------------------------------------------

def _quote(value: Any) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _number(value: float) -> str:
    return f"{value:g}"


def infotext(settings: PreviewSettings, model_name: str | None, model_hash: str | None,
             recipe: Mapping[str, Any] | None = None) -> str:
    """The web UI's generation-parameters text (what its PNG Info tab and 'send to txt2img' read)."""
    width = settings.width or 0
    height = settings.height or 0
    fields: list[tuple[str, Any]] = [
        ("Steps", settings.steps),
        ("Sampler", find_sampler(settings.sampler).label),
        ("CFG scale", _number(float(settings.cfg_scale))),
        ("Seed", settings.seed),
        ("Size", f"{width}x{height}"),
        ("Model hash", model_hash),
        ("Model", model_name),
    ]
    if recipe is not None and recipe.get("recipe_hash"):
        fields.append(("Merge recipe hash", recipe["recipe_hash"]))
    fields.append(("Version", f"merge-lab {__version__}"))
    params = ", ".join(f"{k}: {_quote(v)}" for k, v in fields if v not in (None, ""))
    lines = [settings.prompt]
    if settings.negative_prompt:
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    lines.append(params)
    return "\n".join(lines)


_PARAM = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, str]:
    """Read an infotext back: {"Prompt", "Negative prompt", "Steps", "Sampler", …} (values as text)."""
    lines = text.strip().split("\n")
    params_line = lines[-1] if len(lines) > 1 or _PARAM.match(lines[-1] or "") else ""
    body = lines[:-1] if params_line else lines
    prompt, negative, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(params_line):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        out[key.strip()] = value
    return out


PNG_TEXT_KEYS = ("parameters", "merge_lab_recipe")


def save_png(image, path: str | os.PathLike) -> Path:
    """Save with the "parameters" (infotext) and "merge_lab_recipe" text chunks from ``image.info``."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for key in PNG_TEXT_KEYS:
        value = image.info.get(key)
        if isinstance(value, str):
            info.add_text(key, value)  # tEXt when latin-1, else iTXt (UTF-8)
    tmp = path.with_name(f".{path.name}.partial")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    return path


def read_png_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """{"parameters": infotext, "fields": parsed infotext, "recipe": recipe dict or None} of a preview PNG."""
    from PIL import Image

    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}) or {})
    params = text.get("parameters", "")
    recipe = None
    if "merge_lab_recipe" in text:
        with contextlib.suppress(ValueError):
            recipe = json.loads(text["merge_lab_recipe"])
    return {"parameters": params, "fields": parse_infotext(params) if params else {}, "recipe": recipe}


def image_file_name(model_name: str, seed: int, suffix: str = "") -> str:
    safe = re.sub(r"[^\w.+-]+", "_", model_name).strip("_") or "preview"
    return f"{safe}-s{seed}{suffix}.png"
