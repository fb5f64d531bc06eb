"""Architecture detection from a safetensors header alone (key names and shapes; no tensor is read).

Only layouts we know are accepted: a file whose keys we recognise as another architecture (Flux.1,
Chroma, SD3.x, a LoRA, a ControlNet, diffusers folders' files, a lone VAE or text encoder) or do not
recognise at all is a one-line error naming what was found, never a fallback to SD1.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from merge_lab.archs.layouts import (
    REFINER_TE_PREFIX,
    SD1_TE_PREFIX,
    SD2_TE_PREFIX,
    SDXL_TE1_PREFIX,
    SDXL_TE2_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
)
from merge_lab.errors import CheckpointError
from merge_lab.io.safetensors import TensorInfo

ARCH_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL",
              "sdxl-refiner": "Stable Diffusion XL refiner"}
MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2", "sdxl": "stable-diffusion-xl-v1-base",
                  "sdxl-refiner": "stable-diffusion-xl-v1-refiner"}
SUPPORTED = "SD1.x, SD2.x, SDXL (Pony, Illustrious, NoobAI) and SDXL refiner single-file checkpoints"


@dataclass(frozen=True)
class Architecture:
    arch: str  # "sd1" | "sd2" | "sdxl" | "sdxl-refiner"
    variants: tuple[str, ...] = field(default_factory=tuple)  # "inpaint", "instruct-pix2pix", "v-prediction"

    @property
    def label(self) -> str:
        return self.arch + "".join(f"+{v}" for v in self.variants)


def _has(keys, *parts: str) -> bool:
    """Whether a key starts with one of `parts`, bare or under the UNet prefix (ComfyUI / Forge save the
    transformers of Flux and SD3 under model.diffusion_model. too)."""
    prefixes = tuple(parts) + tuple(UNET_PREFIX + p for p in parts)
    return any(k.startswith(prefixes) for k in keys)


def _contains(keys, *parts: str) -> bool:
    return any(p in k for k in keys for p in parts)


def recognise_foreign(keys) -> str | None:
    """What a file we cannot merge holds, by its own key names (diffusers' CHECKPOINT_KEY_NAMES and
    ComfyUI's model detection use the same probes), or None when it looks like a UNet checkpoint."""
    if _has(keys, "distilled_guidance_layer."):
        return "Chroma transformer keys (distilled_guidance_layer.*, double_blocks.*)"
    if _has(keys, "double_blocks.", "single_blocks."):
        return "Flux.1 transformer keys (double_blocks.*, single_blocks.*)"
    if _has(keys, "joint_blocks."):
        return "SD3 / SD3.5 MMDiT keys (joint_blocks.*)"
    if _contains(keys, "lora_up.", "lora_down.", "lora_A.", "lora_B.", ".hada_w1", ".lokr_w1") or \
            any(k.startswith(("lora_unet_", "lora_te", "lora_transformer_")) for k in keys):
        return "LoRA / LyCORIS keys (lora_unet_*, *.lora_up / lora_down)"
    if any(k.startswith(("control_model.", "input_hint_block.")) for k in keys) or \
            _has(keys, "input_hint_block.", "zero_convs."):
        return "ControlNet keys (input_hint_block.*, zero_convs.*)"
    if _has(keys, "down_blocks.", "up_blocks.", "mid_block.", "transformer_blocks.") or \
            any(k.startswith(("unet.", "text_encoder.", "transformer.")) for k in keys):
        return "diffusers-format keys (down_blocks.*, transformer_blocks.*): not a single-file checkpoint"
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        if any(k.startswith(("encoder.", "decoder.", VAE_PREFIX)) for k in keys):
            return "VAE keys only (encoder.*, decoder.*): a VAE, not a checkpoint"
        if any(k.startswith(("cond_stage_model.", "conditioner.", "text_model.", "text_encoders.")) for k in keys):
            return "text-encoder keys only"
        return "no UNet keys (model.diffusion_model.*)"
    return None


def _unet_arch(tensors: dict[str, TensorInfo], path: str | None) -> str:
    """SD1 / SD2 / SDXL / refiner from the UNet's own structure: the number of input blocks, SDXL's label
    embedding and the kind of transformer projection (1×1 conv in SD1, Linear in SD2 and SDXL)."""
    keys = tensors.keys()
    if f"{UNET_PREFIX}input_blocks.0.0.weight" not in tensors:
        raise CheckpointError(f"unknown UNet layout (no {UNET_PREFIX}input_blocks.0.0.weight); this merger "
                              f"takes {SUPPORTED}", path=path)
    inputs = {int(k[len(UNET_PREFIX) + 13:].split(".", 1)[0]) for k in keys
              if k.startswith(UNET_PREFIX + "input_blocks.") and k[len(UNET_PREFIX) + 13:].split(".", 1)[0].isdigit()}
    count = max(inputs) + 1
    if f"{UNET_PREFIX}label_emb.0.0.weight" in tensors:
        if count == 9:
            return "sdxl"
        if count == 12:
            return "sdxl-refiner"
    elif count == 12:
        proj = next((t for k, t in tensors.items() if k.startswith(UNET_PREFIX) and k.endswith(".proj_in.weight")),
                    None)
        if proj is not None:
            return "sd1" if len(proj.shape) == 4 else "sd2"
    raise CheckpointError(f"unknown UNet layout ({count} input blocks"
                          f"{', with label_emb' if f'{UNET_PREFIX}label_emb.0.0.weight' in tensors else ''}); "
                          f"this merger takes {SUPPORTED}", path=path)


# The text encoders each architecture carries (a UNet-only file has none, and is accepted).
_TEXT_ENCODERS = {"sd1": (SD1_TE_PREFIX,), "sd2": (SD2_TE_PREFIX,), "sdxl": (SDXL_TE1_PREFIX, SDXL_TE2_PREFIX),
                  "sdxl-refiner": (REFINER_TE_PREFIX,)}
_ALL_TE_PREFIXES = tuple({p for ps in _TEXT_ENCODERS.values() for p in ps})


def detect(tensors: dict[str, TensorInfo], metadata: dict[str, str] | None = None, path: str | None = None
           ) -> Architecture:
    keys = tensors.keys()
    metadata = metadata or {}
    foreign = recognise_foreign(keys)
    if foreign:
        raise CheckpointError(f"holds {foreign}; this merger takes {SUPPORTED}", path=path)
    arch = _unet_arch(tensors, path)
    present = {p for p in _ALL_TE_PREFIXES if any(k.startswith(p) for k in keys)}
    # SD2's and the refiner's OpenCLIP prefixes are distinct from the others; SD1's CLIP prefix is a prefix
    # of nothing else, so the set comparison is exact.
    if present and present != set(_TEXT_ENCODERS[arch]):
        found = ", ".join(sorted(p + "*" for p in present))
        raise CheckpointError(f"{ARCH_NAMES[arch]} UNet with text encoder keys {found} that do not belong to it",
                              path=path)

    variants = []
    first = tensors.get(f"{UNET_PREFIX}input_blocks.0.0.weight")
    if first is not None and len(first.shape) == 4:
        if first.shape[1] == 9:
            variants.append("inpaint")
        elif first.shape[1] == 8:
            variants.append("instruct-pix2pix")
    prediction = metadata.get("modelspec.prediction_type", "").lower()
    if "v_pred" in tensors or prediction in ("v", "v-prediction", "v_prediction"):
        variants.append("v-prediction")
    return Architecture(arch, tuple(variants))


COMPONENT_PREFIXES = (
    ("unet", UNET_PREFIX),
    ("vae", VAE_PREFIX),
    ("text_encoder", SD1_TE_PREFIX),
    ("text_encoder", SD2_TE_PREFIX),
    ("text_encoder", SDXL_TE1_PREFIX),
    ("text_encoder_2", SDXL_TE2_PREFIX),
    ("text_encoder", REFINER_TE_PREFIX),
)


def component_of(key: str) -> str:
    for name, prefix in COMPONENT_PREFIXES:
        if key.startswith(prefix):
            return name
    return "other"


def summarize_dtypes(tensors: dict[str, TensorInfo]) -> dict[str, int]:
    return dict(Counter(t.dtype for t in tensors.values()).most_common())
