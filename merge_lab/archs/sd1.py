"""Stable Diffusion 1.x (and its fine-tunes): LDM UNet with 12 input blocks and 1×1-conv transformer
projections, OpenAI CLIP ViT-L/14 text encoder, the 26-value block order."""

from __future__ import annotations

from merge_lab.archs import ldm
from merge_lab.archs.layouts import CLIPConfig, ModelLayout, UNetConfig, VAEConfig
from merge_lab.archs.registry import PreviewSupport, PreviewVariant, register

TE_PREFIX = "cond_stage_model.transformer."

# Old SD1 text-encoder names (transformers < 4.x, before CLIPTextModel had a `text_model`): A1111 renames
# them on load (modules/sd_models.py, checkpoint_dict_replacements_sd1); we read them under the current names.
KEY_ALIASES = {
    "cond_stage_model.transformer.embeddings.": "cond_stage_model.transformer.text_model.embeddings.",
    "cond_stage_model.transformer.encoder.": "cond_stage_model.transformer.text_model.encoder.",
    "cond_stage_model.transformer.final_layer_norm.": "cond_stage_model.transformer.text_model.final_layer_norm.",
}


def layout(width: int | None = None, vocab: int = 49408) -> ModelLayout:
    if width:
        return ModelLayout(
            "sd1",
            UNetConfig(model_channels=width, context_dim=width, num_heads=8),
            VAEConfig(ch=width),
            (CLIPConfig(TE_PREFIX, hidden=width, intermediate=2 * width, vocab=vocab, heads=4),),
        )
    return ModelLayout("sd1", UNetConfig(num_heads=8), VAEConfig(), (CLIPConfig(TE_PREFIX, vocab=vocab),))


SPEC = register(ldm.spec(
    name="sd1",
    title="Stable Diffusion 1.x",
    short="SD1.x",
    modelspec="stable-diffusion-v1",
    layout=layout,
    n_blocks=12,
    label_emb=False,
    conv_proj=True,
    text_encoders={TE_PREFIX: ("text_encoder", "BASE")},
    key_aliases=KEY_ALIASES,
    preview=PreviewSupport(
        pipeline="StableDiffusionPipeline",
        pipeline_options={"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
        variants=(PreviewVariant("sd15", "sd1", "Stable Diffusion 1.5", 512, "epsilon", "PNDMScheduler", 0.18215),),
        default_variant="sd15",
    ),
))
