"""Architecture detection from a safetensors header alone (key names and shapes; no tensor is read).

Files of a known family we do not merge (Flux.1, Chroma, SD3.x, a LoRA, a ControlNet, diffusers folders'
files) are named and refused first. Then every registered architecture whose probe keys the file has is
asked whether its structure matches (merge_lab/archs/registry.py); exactly one must. A lone VAE or text
encoder, or a layout no record takes, is a one-line error naming what was found, never a fallback to SD1.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from merge_lab.archs.layouts import UNET_PREFIX, VAE_PREFIX
from merge_lab.archs.registry import get, specs, supported
from merge_lab.errors import CheckpointError


@dataclass(frozen=True)
class Architecture:
    """A detected file: its architecture's registry name and the variants it shows."""

    arch: str
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


def recognise_foreign(keys, known_families: set[str] | frozenset[str] = frozenset()) -> str | None:
    """What a file of an architecture we do not merge holds, by its own key names (diffusers'
    CHECKPOINT_KEY_NAMES and ComfyUI's model detection use the same probes), or None. Families with a
    registered record (`known_families`, ArchSpec.family) are left to their records."""
    def foreign(family: str) -> bool:
        return family not in known_families

    if foreign("chroma") and _has(keys, "distilled_guidance_layer."):
        return "Chroma transformer keys (distilled_guidance_layer.*, double_blocks.*)"
    if foreign("flux") and not _has(keys, "distilled_guidance_layer.") and _has(keys, "double_blocks.", "single_blocks."):
        return "Flux.1 transformer keys (double_blocks.*, single_blocks.*)"
    if foreign("sd3") and _has(keys, "joint_blocks."):
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
    return None


def recognise_partial(keys) -> str:
    """What a file no architecture took holds, when it is not a whole model: a lone VAE or text encoder."""
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        if any(k.startswith(("encoder.", "decoder.", VAE_PREFIX)) for k in keys):
            return "VAE keys only (encoder.*, decoder.*): a VAE, not a checkpoint"
        if any(k.startswith(("cond_stage_model.", "conditioner.", "text_model.", "text_encoders.")) for k in keys):
            return "text-encoder keys only"
        return "no UNet keys (model.diffusion_model.*)"
    return "keys of no architecture we know"


def detect(tensors, metadata: dict[str, str] | None = None, path: str | None = None) -> Architecture:
    """The architecture of a header's tensors ({key: TensorInfo}), or a one-line CheckpointError."""
    keys = tensors.keys()
    metadata = metadata or {}
    foreign = recognise_foreign(keys, {s.family for s in specs() if s.family})
    if foreign:
        raise CheckpointError(f"holds {foreign}; this merger takes {supported()}", path=path)
    candidates = [s for s in specs() if any(k in tensors for k in s.probe_keys)]
    found = [s for s in candidates if s.matches(tensors)]
    if len(found) > 1:
        raise CheckpointError(f"holds the keys of several architectures ({', '.join(s.title for s in found)}): "
                              "a mixed or damaged file", path=path)
    if not found:
        described = next((d for s in specs() if s.describe_unmatched
                          for d in [s.describe_unmatched(tensors)] if d), None)
        raise CheckpointError(f"{described or 'holds ' + recognise_partial(keys)}; this merger takes "
                              f"{supported()}", path=path)
    spec = found[0]
    all_te = {p for s in specs() for p in s.text_encoder_prefixes}
    present = {p for p in all_te if any(k.startswith(p) for k in keys)}
    # Text-encoder prefixes that are not the architecture's are another model's: refused. Some of its own may
    # be missing (a UNet-only file, SD3 "incl_clips" without T5): the merge's missing-key rule then applies.
    foreign_te = present - set(spec.text_encoder_prefixes)
    if foreign_te:
        names = ", ".join(sorted(p + "*" for p in foreign_te))
        raise CheckpointError(f"{spec.title} model with text encoder keys {names} that do not belong to it",
                              path=path)
    return Architecture(spec.name, tuple(spec.variants(tensors, metadata)))


def component_of(key: str, arch: str | None = None) -> str:
    """unet / vae / text_encoder / text_encoder_2 / other, by the key's prefix (of `arch`, or of any)."""
    for spec in [get(arch)] if arch else specs():
        for name, prefix in spec.components:
            if key.startswith(prefix):
                return name
    return "other"


def summarize_dtypes(tensors) -> dict[str, int]:
    return dict(Counter(t.dtype for t in tensors.values()).most_common())
