"""Architecture detection from a safetensors header alone (key names and shapes; no tensor is read)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from .errors import CheckpointError
from .layouts import SD1_TE_PREFIX, SD2_TE_PREFIX, SDXL_TE1_PREFIX, SDXL_TE2_PREFIX, UNET_PREFIX, VAE_PREFIX
from .safetensors_io import TensorInfo

ARCH_NAMES = {"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x", "sdxl": "Stable Diffusion XL"}
MODELSPEC_ARCH = {"sd1": "stable-diffusion-v1", "sd2": "stable-diffusion-v2", "sdxl": "stable-diffusion-xl-v1-base"}


@dataclass(frozen=True)
class Architecture:
    arch: str  # "sd1" | "sd2" | "sdxl"
    variants: tuple[str, ...] = field(default_factory=tuple)  # "inpaint", "instruct-pix2pix", "v-prediction"

    @property
    def label(self) -> str:
        return self.arch + "".join(f"+{v}" for v in self.variants)


def detect(tensors: dict[str, TensorInfo], metadata: dict[str, str] | None = None, path: str | None = None
           ) -> Architecture:
    keys = tensors.keys()
    metadata = metadata or {}
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        if any(k.startswith(("down_blocks.", "unet.", "lora_", "lora_unet_")) for k in keys):
            raise CheckpointError("not a single-file (LDM) checkpoint: diffusers-format or LoRA keys", path=path)
        raise CheckpointError(f"no UNet keys ({UNET_PREFIX}*): not a Stable Diffusion checkpoint", path=path)

    if any(k.startswith(SDXL_TE2_PREFIX + "transformer.resblocks.") for k in keys) or \
            (f"{UNET_PREFIX}label_emb.0.0.weight" in tensors and not any(k.startswith("cond_stage_model.") for k in keys)):
        if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
            raise CheckpointError("SDXL refiner checkpoints are not supported", path=path)
        arch = "sdxl"
    elif any(k.startswith(SD2_TE_PREFIX) for k in keys):
        arch = "sd2"
    elif any(k.startswith(SD1_TE_PREFIX) for k in keys):
        arch = "sd1"
    else:  # UNet-only file: the cross-attention width tells SD1 (768) from SD2 (1024)
        probe = tensors.get(f"{UNET_PREFIX}input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight")
        arch = "sd2" if probe is not None and probe.shape[-1] == 1024 else "sd1"

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
)


def component_of(key: str) -> str:
    for name, prefix in COMPONENT_PREFIXES:
        if key.startswith(prefix):
            return name
    return "other"


def summarize_dtypes(tensors: dict[str, TensorInfo]) -> dict[str, int]:
    return dict(Counter(t.dtype for t in tensors.values()).most_common())
