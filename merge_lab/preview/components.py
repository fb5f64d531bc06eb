"""Components a Flux / Chroma / SD3 preview takes from other files: a transformer-only checkpoint (what most
Flux downloads are) renders with the text encoders and VAE users already have beside it, as ComfyUI loads
them: ``clip_l.safetensors`` (HF CLIPTextModel names, ``text_model.…``), ``clip_g.safetensors``,
``t5xxl_fp16.safetensors`` / ``t5xxl_fp8_e4m3fn.safetensors`` (HF T5EncoderModel names, ``shared`` +
``encoder.…``) and ``ae.safetensors`` (BFL's LDM-named autoencoder, ``encoder.…`` / ``decoder.…``), or any
all-in-one checkpoint of the same architecture.

Each file is recognised from its key names and shapes and its keys are given the checkpoint's prefixes; a
component a named file gives replaces the checkpoint's own. A file that is none of these (a diffusers-format
VAE, a CLIP of a width the model does not use) is refused in one line naming the file and key.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from merge_lab import archs
from merge_lab.archs.layouts import CLIPConfig, T5Config
from merge_lab.errors import MergeLabError

CLIP_TOKEN_KEY = "text_model.embeddings.token_embedding.weight"
T5_KEY = "encoder.block.0.layer.0.SelfAttention.q.weight"
LDM_VAE_KEY = "decoder.mid.block_1.conv1.weight"
DIFFUSERS_VAE_KEY = "decoder.mid_block.resnets.0.conv1.weight"


def component_prefix(arch: str, component: str) -> str:
    return next(p for c, p in archs.get(arch).components if c == component)


def map_component_file(shapes: Mapping[str, tuple[int, ...]], layout, path: str) -> dict[str, str]:
    """{the checkpoint's key: this file's key} for the component(s) the file holds."""
    arch = layout.arch
    spec = archs.get(arch)
    own_prefixes = tuple(p for _, p in spec.components)
    renamed = {archs.current_key_name(k): k for k in shapes}
    if all(k.startswith(own_prefixes) for k in renamed):  # already in the checkpoint's names
        return renamed
    if CLIP_TOKEN_KEY in shapes:
        width = shapes[CLIP_TOKEN_KEY][1]
        clips = [te for te in layout.text_encoders if isinstance(te, CLIPConfig)]
        match = next((te for te in clips if te.hidden == width), None)
        if match is None:
            widths = ", ".join(str(te.hidden) for te in clips) or "none"
            raise MergeLabError(f"is a {width}-wide CLIP text encoder; this {spec.short} model takes CLIP widths: "
                                f"{widths}", path=path, key=CLIP_TOKEN_KEY)
        return {match.prefix + k: k for k in shapes if not k.endswith("logit_scale")}
    if T5_KEY in shapes:
        t5 = next((te for te in layout.text_encoders if isinstance(te, T5Config)), None)
        if t5 is None:
            raise MergeLabError(f"is a T5 text encoder; {spec.short} has none", path=path, key=T5_KEY)
        return {t5.prefix + k: k for k in shapes}
    if DIFFUSERS_VAE_KEY in shapes:
        raise MergeLabError("is a diffusers-format VAE: name the single-file one (BFL's ae.safetensors, or the "
                            "checkpoint's own)", path=path, key=DIFFUSERS_VAE_KEY)
    vae_prefix = component_prefix(arch, "vae")
    for prefix in ("", "first_stage_model.", "vae."):
        if f"{prefix}{LDM_VAE_KEY}" in shapes:
            return {vae_prefix + k[len(prefix):]: k for k in shapes if k.startswith(prefix)}
    first = next(iter(shapes), "")
    raise MergeLabError(f"is not a CLIP, T5 or VAE file a {spec.short} preview can use", path=path, key=first)


def with_components(shapes: Mapping[str, tuple[int, ...]], layout, extra: Mapping[str, Mapping[str, tuple[int, ...]]]
                    ) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[str, str]]]:
    """(the combined shapes, {key: (file, file key)} of what the named files give). A component a file gives
    replaces the checkpoint's own (every key under its prefix)."""
    combined = dict(shapes)
    sources: dict[str, tuple[str, str]] = {}
    prefixes = sorted((p for _, p in archs.get(layout.arch).components), key=len, reverse=True)
    for path, file_shapes in extra.items():
        mapping = map_component_file(file_shapes, layout, os.fspath(path))
        given = {next((p for p in prefixes if k.startswith(p)), "") for k in mapping}
        for key in [k for k in combined if any(k.startswith(p) for p in given if p)]:
            combined.pop(key)
            sources.pop(key, None)
        for key, file_key in mapping.items():
            combined[key] = tuple(file_shapes[file_key])
            sources[key] = (os.fspath(path), file_key)
    return combined, sources
