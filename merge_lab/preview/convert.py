"""Our single-file (LDM) state dict as the diffusers / transformers state dicts of each pipeline component,
with diffusers' own LDM→diffusers converters (renames, not copies, where the mapping allows), and which layout
keys a preview reads or leaves out. The pipeline loads through it; the tests check the mapping with it
directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from merge_lab import archs
from merge_lab.archs.layouts import CLIPConfig, ModelLayout
from merge_lab.preview.identify import NOT_USED_SUFFIXES


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
            if archs.get(layout.arch).preview.penultimate_text_layer:
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
    if archs.get(layout.arch).preview.penultimate_text_layer:
        te = layout.text_encoders[0]
        last = f"{te.prefix}transformer.resblocks.{te.layers - 1}."
        out += [k for k in layout.shapes() if k.startswith(last) or k == f"{te.prefix}text_projection"]
    return out
