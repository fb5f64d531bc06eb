"""Stable Diffusion 2.x: LDM UNet with 12 input blocks and Linear transformer projections, OpenCLIP ViT-H
text encoder (conditioning on its penultimate layer), the 26-value block order; 512-base (epsilon) and
768-v (v-prediction) releases share the layout."""

from __future__ import annotations

from collections.abc import Mapping

from merge_lab.archs import ldm
from merge_lab.archs.layouts import (
    ModelLayout,
    OpenCLIPConfig,
    UNetConfig,
    VAEConfig,
)
from merge_lab.archs.registry import PreviewSupport, PreviewVariant, register

TE_PREFIX = "cond_stage_model.model."


def layout(width: int | None = None, vocab: int = 49408) -> ModelLayout:
    if width:
        return ModelLayout(
            "sd2",
            UNetConfig(model_channels=width, context_dim=width, use_linear_proj=True, head_channels=8),
            VAEConfig(ch=width),
            (OpenCLIPConfig(TE_PREFIX, width=width, layers=24, vocab=vocab, heads=4, projection_dim=width),),
        )
    return ModelLayout(
        "sd2",
        UNetConfig(context_dim=1024, use_linear_proj=True),
        VAEConfig(),
        (OpenCLIPConfig(TE_PREFIX, vocab=vocab),),
    )


def pick_variant(prediction: str, variants: tuple[str, ...], metadata: Mapping[str, str]) -> tuple[str, bool]:
    """512-base or 768-v: the user's setting, then the file's own marker or metadata; otherwise 768-v until
    a test render decides (the web UI's own test, modules/sd_models_config.py)."""
    if prediction == "epsilon":
        return "sd2-base", True
    if prediction == "v_prediction" or "v-prediction" in variants:
        return "sd2-768-v", True
    stated = metadata.get("modelspec.prediction_type", "").lower()
    if stated in ("epsilon", "eps"):
        return "sd2-base", True
    return "sd2-768-v", bool(stated)


SPEC = register(ldm.spec(
    name="sd2",
    title="Stable Diffusion 2.x",
    short="SD2.x",
    modelspec="stable-diffusion-v2",
    layout=layout,
    n_blocks=12,
    label_emb=False,
    conv_proj=False,
    text_encoders={TE_PREFIX: ("text_encoder", "BASE")},
    preview=PreviewSupport(
        pipeline="StableDiffusionPipeline",
        pipeline_options={"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
        variants=(
            PreviewVariant("sd2-base", "sd2", "Stable Diffusion 2.x base (512, epsilon)", 512, "epsilon",
                           "PNDMScheduler", 0.18215),
            PreviewVariant("sd2-768-v", "sd2", "Stable Diffusion 2.x 768-v (v-prediction)", 768, "v_prediction",
                           "DDIMScheduler", 0.18215, upcast_attention=True),
        ),
        default_variant="sd2-768-v",
        penultimate_text_layer=True,
        pick_variant=pick_variant,
        guess_by_test=("sd2-768-v", "sd2-base"),
    ),
))
