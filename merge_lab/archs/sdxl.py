"""Stable Diffusion XL base (and Pony, Illustrious, NoobAI, which are SDXL): LDM UNet with 9 input blocks
and a label embedding, two text encoders (CLIP ViT-L as TE1, OpenCLIP ViT-bigG as TE2), the 20-value block
order; a 26-value SD string drops IN09-IN11 and OUT09-OUT11, as SuperMerger does."""

from __future__ import annotations

from merge_lab.archs import ldm
from merge_lab.archs.layouts import (
    CLIPConfig,
    ModelLayout,
    OpenCLIPConfig,
    UNetConfig,
    VAEConfig,
)
from merge_lab.archs.registry import PreviewSupport, PreviewVariant, register

TE1_PREFIX = "conditioner.embedders.0.transformer."
TE2_PREFIX = "conditioner.embedders.1.model."


def layout(width: int | None = None, vocab: int = 49408) -> ModelLayout:
    if width:
        te1, te2 = width, 2 * width
        return ModelLayout(
            "sdxl",
            UNetConfig(model_channels=width, channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10), middle_depth=10,
                       context_dim=te1 + te2, use_linear_proj=True, adm_in_channels=6 * 8 + te2,
                       head_channels=8),
            VAEConfig(ch=width),
            (CLIPConfig(TE1_PREFIX, hidden=te1, intermediate=2 * te1, vocab=vocab, heads=4),
             OpenCLIPConfig(TE2_PREFIX, width=te2, layers=32, vocab=vocab, heads=4, projection_dim=te2)),
        )
    return ModelLayout(
        "sdxl",
        UNetConfig(channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10), middle_depth=10, context_dim=2048,
                   use_linear_proj=True, adm_in_channels=2816),
        VAEConfig(),
        (CLIPConfig(TE1_PREFIX, hidden=768, intermediate=3072, vocab=vocab, heads=12),
         OpenCLIPConfig(TE2_PREFIX, width=1280, layers=32, vocab=vocab, heads=20, projection_dim=1280)),
    )


MAIN_BLOCKS = ldm.main_blocks(9)
# The 26-value SD order on SDXL: BASE, IN00..IN08 kept, IN09-IN11 dropped, M00, OUT00..OUT08, OUT09-OUT11 dropped.
SD_ORDER = (*MAIN_BLOCKS[:10], None, None, None, "M00", *MAIN_BLOCKS[11:], None, None, None)

SPEC = register(ldm.spec(
    name="sdxl",
    title="Stable Diffusion XL",
    short="SDXL (Pony, Illustrious, NoobAI)",
    modelspec="stable-diffusion-xl-v1-base",
    layout=layout,
    n_blocks=9,
    label_emb=True,
    text_encoders={TE1_PREFIX: ("text_encoder", "TE1"), TE2_PREFIX: ("text_encoder_2", "TE2")},
    string_orders={26: SD_ORDER},
    preview=PreviewSupport(
        pipeline="StableDiffusionXLPipeline",
        pipeline_options={"force_zeros_for_empty_prompt": True, "add_watermarker": False},
        variants=(PreviewVariant("sdxl-base", "sdxl", "Stable Diffusion XL base 1.0", 1024, "epsilon",
                                 "EulerDiscreteScheduler", 0.13025, vae_force_upcast=True),),
        default_variant="sdxl-base",
        text_encoder_projection=(False, True),
    ),
))
