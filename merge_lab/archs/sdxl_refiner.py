"""The SDXL refiner: LDM UNet with four levels (12 input blocks, like SD1/SD2) and a label embedding,
conditioned on OpenCLIP-G alone (its one text encoder is BASE), the 26-value block order. Merged, never
previewed (it only refines a base model's latents)."""

from __future__ import annotations

from merge_lab.archs import ldm
from merge_lab.archs.layouts import (
    ModelLayout,
    OpenCLIPConfig,
    UNetConfig,
    VAEConfig,
)
from merge_lab.archs.registry import register

# The refiner conditions on OpenCLIP-G alone, as its first (and only weighted) embedder.
TE_PREFIX = "conditioner.embedders.0.model."


def layout(width: int | None = None, vocab: int = 49408) -> ModelLayout:
    """SDXL refiner 1.0 (sgm sd_xl_refiner.yaml): model_channels 384, four levels, attention (depth 4) at the
    middle two and in the middle block, context 1280 from OpenCLIP-G alone, adm input 2560 = pooled 1280 +
    5 size/crop/aesthetic-score embeddings of 256."""
    if width:
        te = 2 * width
        return ModelLayout(
            "sdxl-refiner",
            UNetConfig(model_channels=width, channel_mult=(1, 2, 4, 4), transformer_depth=(0, 4, 4, 0), middle_depth=4,
                       context_dim=te, use_linear_proj=True, adm_in_channels=5 * 8 + te, head_channels=8),
            VAEConfig(ch=width),
            (OpenCLIPConfig(TE_PREFIX, width=te, layers=32, vocab=vocab, heads=4, projection_dim=te),),
        )
    return ModelLayout(
        "sdxl-refiner",
        UNetConfig(model_channels=384, channel_mult=(1, 2, 4, 4), transformer_depth=(0, 4, 4, 0), middle_depth=4,
                   context_dim=1280, use_linear_proj=True, adm_in_channels=2560),
        VAEConfig(),
        (OpenCLIPConfig(TE_PREFIX, width=1280, layers=32, vocab=vocab, heads=20, projection_dim=1280),),
    )


SPEC = register(ldm.spec(
    name="sdxl-refiner",
    title="Stable Diffusion XL refiner",
    short="SDXL refiner",
    modelspec="stable-diffusion-xl-v1-refiner",
    layout=layout,
    n_blocks=12,
    label_emb=True,
    text_encoders={TE_PREFIX: ("text_encoder", "BASE")},
    preview_refusal="SDXL refiner checkpoints cannot be previewed (a refiner only refines a base model's latents; "
                    "there is no text-to-image pipeline for it here)",
))
