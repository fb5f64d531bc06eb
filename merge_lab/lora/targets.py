"""Which checkpoint key (and which rows of it) every LoRA module name means, per architecture.

We go forward, as ComfyUI (comfy/lora.py model_lora_keys_*) and A1111 (extensions-builtin/Lora) do: from each
weight of the checkpoint we spell every name a trainer gives that layer, and look the LoRA's modules up.
The names:
- UNet (SD1 / SD2 / SDXL): kohya's `lora_unet_` + the module path with `.` → `_`, in the LDM spelling
  (SDXL LoRAs) and in the diffusers one (SD1 / SD2 LoRAs: down_blocks / mid_block / up_blocks, resnets,
  attentions); diffusers / PEFT `unet.` + the diffusers path; ComfyUI's `diffusion_model.` + the LDM path.
- Text encoders: `lora_te_` (SD1 / SD2), `lora_te1_` / `lora_te2_` (SDXL, SD3, Flux's CLIP-L), `lora_te3_`
  (T5) + the Hugging Face module path; PEFT `text_encoder.` / `text_encoder_2.` / `text_encoder_3.`.
  OpenCLIP encoders (SD2, SDXL's second) hold q / k / v stacked in `attn.in_proj_weight`: each of q_proj /
  k_proj / v_proj is a third of its rows.
- Flux: kohya's `lora_unet_` + BFL's names (`double_blocks_0_img_attn_qkv`), and diffusers' transformer
  names (`transformer.` and `lora_transformer_`), whose separate to_q / to_k / to_v (and proj_mlp) are row
  ranges of the fused qkv and linear1, and whose norm_out holds final_layer's shift and scale swapped.
- SD3: kohya's `lora_unet_` + the SD3 (MMDiT) names, ComfyUI's `diffusion_model.`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

UNET = "model.diffusion_model."


@dataclass(frozen=True)
class Target:
    key: str  # the checkpoint key
    rows: tuple[int, int] | None = None  # the rows of `key` this module's ΔW is (None: all of it)
    swap_halves: bool = False  # diffusers' norm_out: (scale, shift) where BFL has (shift, scale)


# ---- UNet: LDM <-> diffusers module paths ----------------------------------------------------------
_RESNET = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
           "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
        "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
LAYERS_PER_BLOCK = 2  # every SD1 / SD2 / SDXL UNet (diffusers' layers_per_block)


def _inner(rest: str, resnet: bool) -> str:
    if not resnet:
        return rest
    for ldm, diffusers in _RESNET.items():
        if rest == ldm or rest.startswith(ldm + "."):
            return diffusers + rest[len(ldm):]
    return rest


def unet_diffusers_path(path: str, attention_at: Mapping[str, bool]) -> str | None:
    """The diffusers module path of an LDM UNet module path (no `model.diffusion_model.`), or None.
    `attention_at[f"output_blocks.{n}"]`: whether that output block has an attention (its upsampler then
    sits at .2, else at .1)."""
    for ldm, diffusers in _TOP.items():
        if path == ldm or path.startswith(ldm + "."):
            return diffusers + path[len(ldm):]
    step = LAYERS_PER_BLOCK + 1
    m = re.match(r"^input_blocks\.(\d+)\.(\d+)(?:\.(.*))?$", path)
    if m:
        n, part, rest = int(m[1]), int(m[2]), m[3] or ""
        level, j = (n - 1) // step, (n - 1) % step
        if j == LAYERS_PER_BLOCK:
            return f"down_blocks.{level}.downsamplers.0.conv" if rest == "op" else None
        where = "resnets" if part == 0 else "attentions"
        return f"down_blocks.{level}.{where}.{j}" + ("." + _inner(rest, part == 0) if rest else "")
    m = re.match(r"^middle_block\.(\d+)(?:\.(.*))?$", path)
    if m:
        part, rest = int(m[1]), m[2] or ""
        where = "attentions.0" if part == 1 else f"resnets.{part // 2}"
        return f"mid_block.{where}" + ("." + _inner(rest, part != 1) if rest else "")
    m = re.match(r"^output_blocks\.(\d+)\.(\d+)(?:\.(.*))?$", path)
    if m:
        n, part, rest = int(m[1]), int(m[2]), m[3] or ""
        level, j = n // step, n % step
        has_attention = attention_at.get(f"output_blocks.{n}", False)
        if part == 0:
            return f"up_blocks.{level}.resnets.{j}" + ("." + _inner(rest, True) if rest else "")
        if part == 1 and has_attention:
            return f"up_blocks.{level}.attentions.{j}" + ("." + rest if rest else "")
        if rest == "conv":
            return f"up_blocks.{level}.upsamplers.0.conv"
    return None


# ---- text encoders ----------------------------------------------------------------------------------
_OPENCLIP_LAYER = {"attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                   "ln_1": "layer_norm1", "ln_2": "layer_norm2"}


def _text_encoders(arch: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """(checkpoint prefix, kind 'hf' | 'openclip', LoRA prefixes) of each text encoder of `arch`."""
    te = {"sd1": [("cond_stage_model.transformer.", "hf", ("lora_te_", "text_encoder."))],
          "sd2": [("cond_stage_model.model.", "openclip", ("lora_te_", "text_encoder."))],
          "sdxl": [("conditioner.embedders.0.transformer.", "hf", ("lora_te1_", "text_encoder.")),
                   ("conditioner.embedders.1.model.", "openclip", ("lora_te2_", "text_encoder_2."))],
          "sdxl-refiner": [("conditioner.embedders.0.model.", "openclip", ("lora_te2_", "text_encoder_2."))]}
    flow_clip_l = ("text_encoders.clip_l.transformer.", "hf", ("lora_te1_", "text_encoder."))
    t5 = ("text_encoders.t5xxl.transformer.", "hf", ("lora_te3_", "text_encoder_3."))
    if arch in te:
        return te[arch]
    if arch.startswith("flux"):  # kohya: lora_te1 CLIP-L, lora_te3 T5; diffusers' FluxPipeline: text_encoder_2 T5
        return [flow_clip_l, ("text_encoders.t5xxl.transformer.", "hf", ("lora_te3_", "text_encoder_2."))]
    if arch == "chroma":
        return [("text_encoders.t5xxl.transformer.", "hf", ("lora_te3_", "text_encoder."))]
    if arch.startswith("sd3"):
        return [flow_clip_l, ("text_encoders.clip_g.transformer.", "hf", ("lora_te2_", "text_encoder_2.")), t5]
    return []


def _names(prefixes: tuple[str, ...], path: str) -> list[str]:
    """Every spelling of `path` under each LoRA prefix (kohya's with `_`, PEFT's with `.`)."""
    out = []
    for prefix in prefixes:
        out.append(prefix + (path.replace(".", "_") if prefix.endswith("_") else path))
    return out


def _add_text_encoders(arch: str, shapes: Mapping[str, tuple[int, ...]], out: dict[str, Target]) -> None:
    for ckpt_prefix, kind, prefixes in _text_encoders(arch):
        for key, shape in shapes.items():
            if not key.startswith(ckpt_prefix):
                continue
            rest = key[len(ckpt_prefix):]
            if kind == "hf":
                if rest.endswith(".weight") and len(shape) >= 2:
                    for name in _names(prefixes, rest[: -len(".weight")]):
                        out[name] = Target(key)
                continue
            m = re.match(r"^transformer\.resblocks\.(\d+)\.(.+)$", rest)
            if not m:
                continue
            layer, inner = m[1], m[2]
            hf = f"text_model.encoder.layers.{layer}."
            if inner == "attn.in_proj_weight":
                width = shape[0] // 3
                for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                    for name in _names(prefixes, hf + "self_attn." + proj):
                        out[name] = Target(key, (i * width, (i + 1) * width))
            elif inner.endswith(".weight") and len(shape) >= 2:
                module = inner[: -len(".weight")]
                for name in _names(prefixes, hf + _OPENCLIP_LAYER.get(module, module)):
                    out[name] = Target(key)


# ---- Flux: diffusers transformer names ----------------------------------------------------------------
def _flux_diffusers(path: str, hidden: int, mlp: int) -> list[tuple[str, tuple[int, int] | None, bool]]:
    """(diffusers module path, rows, swap_halves) for each diffusers module that is (a part of) the BFL module
    `path`."""
    m = re.match(r"^double_blocks\.(\d+)\.(img|txt)_(attn\.qkv|attn\.proj|mlp\.0|mlp\.2|mod\.lin)$", path)
    if m:
        i, side, what = m[1], m[2], m[3]
        b = f"transformer_blocks.{i}."
        if what == "attn.qkv":
            names = ("attn.to_q", "attn.to_k", "attn.to_v") if side == "img" else (
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")
            return [(b + n, (j * hidden, (j + 1) * hidden), False) for j, n in enumerate(names)]
        single = {("img", "attn.proj"): "attn.to_out.0", ("txt", "attn.proj"): "attn.to_add_out",
                  ("img", "mlp.0"): "ff.net.0.proj", ("img", "mlp.2"): "ff.net.2",
                  ("txt", "mlp.0"): "ff_context.net.0.proj", ("txt", "mlp.2"): "ff_context.net.2",
                  ("img", "mod.lin"): "norm1.linear", ("txt", "mod.lin"): "norm1_context.linear"}
        return [(b + single[(side, what)], None, False)]
    m = re.match(r"^single_blocks\.(\d+)\.(linear1|linear2|modulation\.lin)$", path)
    if m:
        b = f"single_transformer_blocks.{m[1]}."
        if m[2] == "linear1":
            return [(b + n, (j * hidden, (j + 1) * hidden), False) for j, n in
                    enumerate(("attn.to_q", "attn.to_k", "attn.to_v"))] + [
                (b + "proj_mlp", (3 * hidden, 3 * hidden + mlp), False)]
        return [(b + {"linear2": "proj_out", "modulation.lin": "norm.linear"}[m[2]], None, False)]
    top = {"img_in": "x_embedder", "txt_in": "context_embedder",
           "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
           "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
           "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
           "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
           "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
           "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
           "final_layer.linear": "proj_out"}
    if path in top:
        return [(top[path], None, False)]
    if path == "final_layer.adaLN_modulation.1":
        return [("norm_out.linear", None, True)]
    return []


# ---- the map ------------------------------------------------------------------------------------------------
def lora_targets(arch: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Target]:
    """Every LoRA module name (each spelling) that means a layer of this checkpoint -> that layer."""
    out: dict[str, Target] = {}
    unet_weights = {k: s for k, s in shapes.items() if k.startswith(UNET) and k.endswith(".weight") and len(s) >= 2}
    flux_like = arch.startswith("flux") or arch == "chroma"
    attention_at = {}
    for key in shapes:
        m = re.match(r"^model\.diffusion_model\.(output_blocks\.\d+)\.1\.(?:transformer_blocks|proj_in)", key)
        if m:
            attention_at[m[1]] = True
    hidden = mlp = 0
    if flux_like:
        img_in = shapes.get(UNET + "img_in.weight")
        hidden = img_in[0] if img_in else 0
        linear1 = next((s for k, s in shapes.items() if k.endswith("single_blocks.0.linear1.weight")), None)
        mlp = linear1[0] - 3 * hidden if linear1 else 0
    for key in unet_weights:
        path = key[len(UNET): -len(".weight")]
        for name in ("lora_unet_" + path.replace(".", "_"), "diffusion_model." + path, "unet." + path):
            out[name] = Target(key)
        if flux_like:
            for dpath, rows, swap in _flux_diffusers(path, hidden, mlp):
                for name in ("transformer." + dpath, "lora_transformer_" + dpath.replace(".", "_"),
                             "lora_unet_" + dpath.replace(".", "_")):
                    out[name] = Target(key, rows, swap)
        elif arch in ("sd1", "sd2", "sdxl", "sdxl-refiner"):
            dpath = unet_diffusers_path(path, attention_at)
            if dpath is not None:
                # ComfyUI's diffusers_lora_prefix ["", "unet."]: older diffusers files name the bare path
                for name in ("lora_unet_" + dpath.replace(".", "_"), "unet." + dpath, dpath):
                    out.setdefault(name, Target(key))
    _add_text_encoders(arch, shapes, out)
    return out
