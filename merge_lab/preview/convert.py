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
from merge_lab.preview.identify import NOT_USED_SUFFIXES, flow_ignored_keys


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


def is_flow(layout) -> bool:
    """A flow-matching transformer (Flux, Chroma, SD3) rather than an LDM UNet."""
    return archs.get(layout.arch).preview.converter != "ldm"


def text_encoder_names(layout) -> list[str]:
    return ["text_encoder", *(f"text_encoder_{i + 2}" for i in range(len(layout.text_encoders) - 1))]


def component_names(layout) -> list[str]:
    return ["transformer" if is_flow(layout) else "unet", "vae", *text_encoder_names(layout)]


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

    if is_flow(layout):
        return convert_flow_state_dict(state_dict, layout, configs, modules)
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


def used_keys(layout) -> list[str]:
    """The checkpoint keys a preview reads (everything of the layout but what the models do not use)."""
    ignored = set(ignored_keys(layout))
    return [k for k in layout.shapes() if k not in ignored]


def ignored_keys(layout) -> list[str]:
    """Layout keys the diffusers models do not use: buffers, and SD2's last text layer and projection (SD2
    conditions on the penultimate layer, so diffusers' text encoder ends one layer earlier)."""
    out = [k for k in layout.shapes() if k.endswith(NOT_USED_SUFFIXES)]
    if is_flow(layout):
        return flow_ignored_keys(layout)
    if archs.get(layout.arch).preview.penultimate_text_layer:
        te = layout.text_encoders[0]
        last = f"{te.prefix}transformer.resblocks.{te.layers - 1}."
        out += [k for k in layout.shapes() if k.startswith(last) or k == f"{te.prefix}text_projection"]
    return out


# ----------------------------------------------------------------------------------------------------
# flow-matching transformers
# ----------------------------------------------------------------------------------------------------

def _embedder(out, sd, src: str, dst: str) -> None:
    """An MLPEmbedder (in_layer, out_layer) as diffusers' linear_1, linear_2."""
    for a, b in (("in_layer", "linear_1"), ("out_layer", "linear_2")):
        for p in ("weight", "bias"):
            out[f"{dst}.{b}.{p}"] = sd[f"{src}.{a}.{p}"]


def _linear(out, sd, src: str, dst: str) -> None:
    for p in ("weight", "bias"):
        out[f"{dst}.{p}"] = sd[f"{src}.{p}"]


def _split(out, sd, src: str, dsts: tuple[str, ...], sizes: tuple[int, ...]) -> None:
    """A fused projection (rows stacked) as separate ones: views of the fused tensor, no copies."""
    for p in ("weight", "bias"):
        for dst, part in zip(dsts, torch.split(sd[f"{src}.{p}"], list(sizes), dim=0)):
            out[f"{dst}.{p}"] = part


def _scale_shift(t: torch.Tensor) -> torch.Tensor:
    """BFL's final adaLN makes (shift, scale); diffusers' AdaLayerNormContinuous reads (scale, shift)."""
    shift, scale = t.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def flux_transformer_to_diffusers(state_dict: Mapping[str, torch.Tensor], layout) -> dict[str, torch.Tensor]:
    """A Flux / Chroma transformer (BFL names under model.diffusion_model.) as diffusers'
    FluxTransformer2DModel / ChromaTransformer2DModel state dict.

    The mapping is diffusers' own (convert_flux_transformer_checkpoint_to_diffusers and the Chroma one;
    tests/preview check key for key that both give the same tensors at real size). Those fix the hidden size
    at 3072 when splitting the single blocks' fused projection; here it comes from the layout, so tiny models
    convert too.
    """
    from merge_lab.archs.layouts import UNET_PREFIX

    cfg = layout.transformer
    h, mlp = cfg.hidden, cfg.hidden * cfg.mlp_ratio
    sd = {k[len(UNET_PREFIX):]: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)}
    out: dict[str, torch.Tensor] = {}
    if cfg.approximator is None:
        _embedder(out, sd, "time_in", "time_text_embed.timestep_embedder")
    if cfg.vec_dim is not None:
        _embedder(out, sd, "vector_in", "time_text_embed.text_embedder")
    if cfg.guidance:
        _embedder(out, sd, "guidance_in", "time_text_embed.guidance_embedder")
    if cfg.approximator is not None:
        a = "distilled_guidance_layer"
        _linear(out, sd, f"{a}.in_proj", f"{a}.in_proj")
        _linear(out, sd, f"{a}.out_proj", f"{a}.out_proj")
        for i in range(cfg.approximator[2]):
            _embedder(out, sd, f"{a}.layers.{i}", f"{a}.layers.{i}")
            out[f"{a}.norms.{i}.weight"] = sd[f"{a}.norms.{i}.scale"]
    _linear(out, sd, "txt_in", "context_embedder")
    _linear(out, sd, "img_in", "x_embedder")
    for i in range(cfg.depth):
        src, dst = f"double_blocks.{i}", f"transformer_blocks.{i}"
        if cfg.modulation:
            _linear(out, sd, f"{src}.img_mod.lin", f"{dst}.norm1.linear")
            _linear(out, sd, f"{src}.txt_mod.lin", f"{dst}.norm1_context.linear")
        _split(out, sd, f"{src}.img_attn.qkv", tuple(f"{dst}.attn.to_{x}" for x in "qkv"), (h, h, h))
        _split(out, sd, f"{src}.txt_attn.qkv", tuple(f"{dst}.attn.add_{x}_proj" for x in "qkv"), (h, h, h))
        for side, name in (("img", ""), ("txt", "added_")):
            out[f"{dst}.attn.norm_{name}q.weight"] = sd[f"{src}.{side}_attn.norm.query_norm.scale"]
            out[f"{dst}.attn.norm_{name}k.weight"] = sd[f"{src}.{side}_attn.norm.key_norm.scale"]
        _linear(out, sd, f"{src}.img_mlp.0", f"{dst}.ff.net.0.proj")
        _linear(out, sd, f"{src}.img_mlp.2", f"{dst}.ff.net.2")
        _linear(out, sd, f"{src}.txt_mlp.0", f"{dst}.ff_context.net.0.proj")
        _linear(out, sd, f"{src}.txt_mlp.2", f"{dst}.ff_context.net.2")
        _linear(out, sd, f"{src}.img_attn.proj", f"{dst}.attn.to_out.0")
        _linear(out, sd, f"{src}.txt_attn.proj", f"{dst}.attn.to_add_out")
    for i in range(cfg.depth_single):
        src, dst = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        if cfg.modulation:
            _linear(out, sd, f"{src}.modulation.lin", f"{dst}.norm.linear")
        _split(out, sd, f"{src}.linear1", (f"{dst}.attn.to_q", f"{dst}.attn.to_k", f"{dst}.attn.to_v",
                                           f"{dst}.proj_mlp"), (h, h, h, mlp))
        out[f"{dst}.attn.norm_q.weight"] = sd[f"{src}.norm.query_norm.scale"]
        out[f"{dst}.attn.norm_k.weight"] = sd[f"{src}.norm.key_norm.scale"]
        _linear(out, sd, f"{src}.linear2", f"{dst}.proj_out")
    _linear(out, sd, "final_layer.linear", "proj_out")
    if cfg.final_modulation:
        for p in ("weight", "bias"):
            out[f"norm_out.linear.{p}"] = _scale_shift(sd[f"final_layer.adaLN_modulation.1.{p}"])
    return out


def convert_flow_state_dict(state_dict: Mapping[str, torch.Tensor], layout, configs: Mapping[str, Mapping[str, Any]],
                            modules: Mapping[str, Any] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """A Flux / Chroma / SD3 checkpoint as the state dicts of its pipeline's models."""
    from diffusers.loaders import single_file_utils as su

    from merge_lab.archs.layouts import UNET_PREFIX, T5Config

    support = archs.get(layout.arch).preview
    if support.converter == "sd3":
        # diffusers' converter reads every size it needs from the tensors; it pops what it converts.
        transformer = su.convert_sd3_transformer_checkpoint_to_diffusers(
            {k: v for k, v in state_dict.items() if k.startswith(UNET_PREFIX)})
    else:
        transformer = flux_transformer_to_diffusers(state_dict, layout)
    vae_prefix = next(p for c, p in archs.get(layout.arch).components if c == "vae")
    vae = su.convert_ldm_vae_checkpoint({k: v for k, v in state_dict.items() if k.startswith(vae_prefix)},
                                        dict(configs["vae/config.json"]))
    out = {"transformer": transformer, "vae": vae}
    ignored = set(ignored_keys(layout))
    for name, te, with_projection in zip(text_encoder_names(layout), layout.text_encoders,
                                         support.text_encoder_projection):
        own = {k[len(te.prefix):]: v for k, v in state_dict.items() if k.startswith(te.prefix) and k not in ignored}
        module = (modules or {}).get(name)
        if isinstance(te, CLIPConfig) and not with_projection:
            own.pop("text_projection.weight", None)  # a CLIP-L file that keeps its projection (Flux: pooled output)
        if isinstance(te, T5Config):
            if "encoder.embed_tokens.weight" not in own:  # tied to shared: ComfyUI's files save only shared
                own["encoder.embed_tokens.weight"] = own["shared.weight"]
        elif module is not None and not hasattr(module, "text_model"):
            own = {k.removeprefix("text_model."): v for k, v in own.items()}
        out[name] = own
    return out
