"""Which model a checkpoint is, for rendering: its architecture, exact layout and release variant (through
:mod:`merge_lab.archs`), from its key shapes and metadata alone, so that a checkpoint a preview cannot render is
refused with a clear error before any pipeline is built or any weight is read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

from merge_lab import archs
from merge_lab.archs import layout_for
from merge_lab.archs.detect import Architecture, detect
from merge_lab.archs.layouts import UNET_PREFIX, CLIPConfig, ModelLayout
from merge_lab.archs.registry import PreviewVariant
from merge_lab.errors import MergeLabError
from merge_lab.io.header import TensorInfo

NOT_USED_SUFFIXES = ("position_ids", "logit_scale")  # buffers / training-only values, never rendered with


@dataclass(frozen=True)
class ModelKind:
    """What a checkpoint is, for rendering: its architecture, exact layout and release variant."""

    arch: Architecture
    layout: ModelLayout
    variant: PreviewVariant
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
    support = archs.get(arch.arch).preview
    if support is None:
        raise MergeLabError(archs.get(arch.arch).preview_refusal, path=path)
    for variant in ("inpaint", "instruct-pix2pix", "fill", "depth-or-canny"):
        if variant in arch.variants:
            raise MergeLabError(f"{variant} checkpoints cannot be previewed (text-to-image only)", path=path)
    if support.converter != "ldm":
        return _identify_flow(arch, support, shapes, path)
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

    releases = {v.name: v for v in support.variants}
    if support.pick_variant is not None:
        name, known = support.pick_variant(prediction, arch.variants, dict(metadata or {}))
        return ModelKind(arch, layout, releases[name], known)
    variant = releases[support.default_variant]
    if prediction == "v_prediction" or (prediction == "auto" and "v-prediction" in arch.variants):
        variant = replace(variant, prediction_type="v_prediction")  # e.g. v-prediction SDXL fine-tunes
    return ModelKind(arch, layout, variant, True)


def flow_ignored_keys(layout) -> list[str]:
    """Keys of a Flux / Chroma / SD3 layout its pipeline's models do not have: buffers, and the projection of a
    CLIP text encoder the pipeline uses without one (Flux's CLIP-L: pooled output; ComfyUI's files keep it)."""
    shapes = layout.shapes()
    out = [k for k in shapes if k.endswith(NOT_USED_SUFFIXES)]
    projections = archs.get(layout.arch).preview.text_encoder_projection
    for te, with_projection in zip(layout.text_encoders, projections):
        if isinstance(te, CLIPConfig) and not with_projection and f"{te.prefix}text_projection.weight" in shapes:
            out.append(f"{te.prefix}text_projection.weight")
    return out


def _flow_layout(arch: str, shapes: Mapping[str, tuple[int, ...]]):
    """The real layout, or the tiny one whose transformer has the file's width (tests, demo)."""
    real = layout_for(arch)
    first = next(iter(real.shapes()))
    if tuple(shapes.get(first, ())) == tuple(real.shapes()[first]):
        return real
    clip = [te for te in real.text_encoders if isinstance(te, CLIPConfig)]
    token_key = f"{clip[0].prefix}text_model.embeddings.token_embedding.weight" if clip else None
    vocab = shapes[token_key][0] if token_key in shapes else 49408
    rows = shapes.get(first, (0,))[0]
    for width in (rows, rows // 2):
        if width < 1:
            continue
        candidate = layout_for(arch, width=width, vocab=vocab)
        if tuple(candidate.shapes().get(first, ())) == tuple(shapes.get(first, ())):
            return candidate
    return real


def _identify_flow(arch: Architecture, support, shapes: Mapping[str, tuple[int, ...]], path: str | None) -> ModelKind:
    """A Flux / Chroma / SD3 checkpoint (with the components other files gave, see preview.components)."""
    layout = _flow_layout(arch.arch, shapes)
    ignored = set(flow_ignored_keys(layout))
    spec = archs.get(arch.arch)
    for component, prefix in sorted(spec.components, key=lambda cp: -len(cp[1])):
        keys = [k for k in layout.shapes() if k.startswith(prefix) and k not in ignored]
        missing = [k for k in keys if k not in shapes]
        if missing and len(missing) == len(keys):
            what = "the transformer" if component == "transformer" else \
                f"its {'VAE' if component == 'vae' else _encoder_title(layout, prefix)}"
            raise MergeLabError(f"has no {what} ({prefix}*): a preview needs every component; name the file that "
                                "has it with --with (ComfyUI's clip_l / t5xxl / ae files do)", path=path,
                                key=missing[0])
    for key, shape in layout.shapes().items():
        if key in ignored:
            continue
        if key not in shapes:
            raise MergeLabError(f"is missing from this {arch.arch} checkpoint: it cannot be previewed", path=path,
                                key=key)
        if tuple(shapes[key]) != tuple(shape):
            raise MergeLabError(f"shape {list(shapes[key])} differs from the {arch.arch} layout's {list(shape)}: "
                                f"previews support the released {spec.short} shapes", path=path, key=key)
    return ModelKind(arch, layout, support.variants[0], True)


def _encoder_title(layout, prefix: str) -> str:
    name = prefix.split(".")[1] if prefix.startswith("text_encoders.") else prefix
    return {"clip_l": "CLIP-L text encoder", "clip_g": "CLIP-G text encoder", "t5xxl": "T5-XXL text encoder"}.get(
        name, "text encoder")
