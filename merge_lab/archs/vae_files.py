"""Standalone VAE files, as users download them, in a checkpoint's own (LDM) key names.

Two formats are in use (facts from A1111's modules/sd_vae.py, which loads the first into a checkpoint as is,
diffusers' single-file `convert_ldm_vae_checkpoint` and ComfyUI's comfy/diffusers_convert.py, which map
between them):

* LDM: ``encoder.down.N.block.M…``, ``decoder.up.N…``, ``quant_conv`` — stabilityai's sd-vae-ft-mse-original
  and sdxl_vae.safetensors, and most VAEs on model sites. Sometimes with a checkpoint's prefix left on
  (``first_stage_model.``, ``vae.``) when cut out of one. Training files carry a ``loss.`` discriminator
  and ``model_ema.`` copies (not weights of the VAE: dropped, and said).
* diffusers: ``encoder.down_blocks.N.resnets.M…``, ``decoder.up_blocks.N…`` (in the reverse order of the
  LDM levels), ``mid_block.attentions.0.to_q`` (older releases: ``query`` / ``key`` / ``value`` /
  ``proj_attn``) with Linear [C, C] weights where LDM has 1×1 convolutions [C, C, 1, 1].

`ldm_names` renames a file's keys to LDM names and tells which weights need the 1×1 reshape; anything it
does not recognise is an error naming the key (a UNet or text-encoder file given as a VAE, say).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# checkpoint prefixes a VAE cut out of a checkpoint may still carry
CHECKPOINT_PREFIXES = ("first_stage_model.", "vae.")
# not weights of the autoencoder: a training run's discriminator / perceptual loss and EMA copies
TRAINING_PREFIXES = ("loss.", "model_ema.")

_LDM = re.compile(r"^(encoder|decoder)\.(conv_in|conv_out|norm_out|down\.\d+\.|up\.\d+\.|mid\.)"
                  r"|^(post_)?quant_conv\.")
_DIFFUSERS = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks|mid_block|conv_norm_out)\.")
# inside a resnet, the attention block and the top level: diffusers' name -> LDM's
_RESNET_PARTS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
                 "conv_shortcut": "nin_shortcut"}
_ATTENTION_PARTS = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                    "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}


class VaeFileError(ValueError):
    """A key of a VAE file that is neither LDM nor diffusers VAE naming (carries the key)."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class VaeKeys:
    format: str  # "ldm" or "diffusers"
    names: Mapping[str, str]  # LDM name (no prefix) -> the file's key
    conv_1x1: frozenset[str]  # LDM names whose weight is a Linear [C, C] in the file (reshape to [C, C, 1, 1])
    dropped: tuple[str, ...]  # the file's training leftovers, not baked


def ldm_names(keys: Iterable[str]) -> VaeKeys:
    """The LDM name of every VAE key of a file (see the module docstring), or a VaeFileError."""
    keys = list(keys)
    dropped = tuple(k for k in keys if k.startswith(TRAINING_PREFIXES))
    weights = [k for k in keys if not k.startswith(TRAINING_PREFIXES)]
    stripped = {}
    for k in weights:
        short = next((k[len(p):] for p in CHECKPOINT_PREFIXES if k.startswith(p)), k)
        stripped[k] = short
    diffusers = any(_DIFFUSERS.match(s) for s in stripped.values())
    if not weights:
        raise VaeFileError("holds no VAE weights", key=keys[0] if keys else "")
    if not diffusers:
        for k, s in stripped.items():
            if not _LDM.match(s):
                raise VaeFileError("is not a VAE key (neither the LDM nor the diffusers naming)", key=k)
        return VaeKeys("ldm", {s: k for k, s in stripped.items()}, frozenset(), dropped)
    up_levels = 1 + max((int(m.group(1)) for s in stripped.values()
                         if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", s))), default=-1)
    names, conv_1x1 = {}, set()
    for k, s in stripped.items():
        ldm = _diffusers_to_ldm(s, up_levels)
        if ldm is None:
            raise VaeFileError("is not a VAE key (neither the LDM nor the diffusers naming)", key=k)
        names[ldm] = k
        if ".attn_1." in ldm and ldm.endswith(".weight") and not ldm.endswith(".norm.weight"):
            conv_1x1.add(ldm)
    return VaeKeys("diffusers", names, frozenset(conv_1x1), dropped)


def _diffusers_to_ldm(name: str, up_levels: int) -> str | None:
    """One diffusers VAE key in LDM naming; None when it is not one."""
    if re.match(r"^(post_)?quant_conv\.(weight|bias)$", name):
        return name
    m = re.match(r"^(encoder|decoder)\.(.+)\.(weight|bias)$", name)
    if not m:
        return None
    side, path, leaf = m.groups()
    if path in _TOP:
        return f"{side}.{_TOP[path]}.{leaf}"
    if (m := re.fullmatch(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", path)) and side == "encoder":
        part = _RESNET_PARTS.get(m.group(3))
        return part and f"encoder.down.{m.group(1)}.block.{m.group(2)}.{part}.{leaf}"
    if (m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", path)) and side == "encoder":
        return f"encoder.down.{m.group(1)}.downsample.conv.{leaf}"
    if (m := re.fullmatch(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", path)) and side == "decoder":
        part = _RESNET_PARTS.get(m.group(3))
        return part and f"decoder.up.{up_levels - 1 - int(m.group(1))}.block.{m.group(2)}.{part}.{leaf}"
    if (m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", path)) and side == "decoder":
        return f"decoder.up.{up_levels - 1 - int(m.group(1))}.upsample.conv.{leaf}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)", path):
        part = _RESNET_PARTS.get(m.group(2))
        return part and f"{side}.mid.block_{int(m.group(1)) + 1}.{part}.{leaf}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", path):
        part = _ATTENTION_PARTS.get(m.group(1))
        return part and f"{side}.mid.attn_1.{part}.{leaf}"
    return None
