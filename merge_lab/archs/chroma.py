"""Chroma (lodestones/Chroma): a Flux.1-schnell-derived transformer, 19 double + 38 single blocks at Flux's
widths, without the per-block modulation layers (``*_mod.lin``, ``modulation.lin``,
``final_layer.adaLN_modulation``) and without time_in / vector_in / guidance_in: one
``distilled_guidance_layer`` (an approximator: in_proj 64 -> 5120, 5 MLP layers with RMS norms, out_proj ->
3072) computes every modulation. T5-XXL is its only text encoder (no CLIP-L); the VAE is Flux's. Key names
are ComfyUI's (comfy/ldm/chroma/model.py, layers.py; model_detection.py probes
``distilled_guidance_layer.norms.0.scale``), bare or under ``model.diffusion_model.`` (renamed on load to the
prefixed form, as for Flux: merge_lab/archs/flux.py).

Blocks: Flux's 61-value order minus what Chroma lacks: ``T5, IN, D00..D18, S00..S37, OUT`` (60 values); a
61-value Flux string is taken too, its CLIP value dropped. IN is img_in / txt_in; the approximator is the
named extra block ``DGL`` following IN (it stands where Flux's time_in / vector_in / guidance_in stand);
``VAE`` follows ``T5``, the first value, as the VAE follows the first value on Flux.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from merge_lab.archs.flux import (
    APPROXIMATOR_KEY,
    FLOW_SCHEDULER,
    FLUX_VAE,
    GUIDANCE_KEY,
    IMG_IN_KEY,
    LDM_KEY,
    N_DOUBLE,
    N_SINGLE,
    NEVER_MERGED,
    NO_IMAGE_ENCODER,
    PREFIX,
    PROBE_KEYS,
    REAL_T5,
    REAL_VAE,
    T5_PREFIX,
    VAE_PREFIX,
    VECTOR_KEY,
    FluxConfig,
    FluxLayout,
    describe_unmatched,
    signature,
    tiny_parts,
    transformer_block_prefixes,
)
from merge_lab.archs.registry import ArchSpec, PreviewSupport, PreviewVariant, register

CHROMA_MODULES = ("img_in.", "txt_in.", "distilled_guidance_layer.", "double_blocks.", "single_blocks.",
                  "final_layer.")
APPROXIMATOR = (64, 5120, 5)  # ComfyUI's model_detection: in_dim, hidden_dim, n_layers (out_dim: hidden)


def _config(**kw) -> FluxConfig:
    return FluxConfig(vec_dim=None, guidance=False, modulation=False, final_modulation=False, **kw)


def layout(width: int | None = None, vocab: int = 49408) -> FluxLayout:
    if width:
        hidden, _, t5, vae = tiny_parts(width, vocab)
        cfg = _config(hidden=hidden, heads=2, context_dim=t5.d_model, approximator=(16, 2 * width, APPROXIMATOR[2]))
        return FluxLayout("chroma", cfg, vae, None, t5)
    return FluxLayout("chroma", _config(approximator=APPROXIMATOR), REAL_VAE, None, REAL_T5)


def matches(tensors: Mapping[str, Any]) -> bool:
    return (APPROXIMATOR_KEY in tensors and IMG_IN_KEY in tensors and VECTOR_KEY not in tensors
            and GUIDANCE_KEY not in tensors and LDM_KEY not in tensors and signature(tensors) == (N_DOUBLE, N_SINGLE))


MAIN_BLOCKS = ("T5", "IN", *(f"D{i:02d}" for i in range(N_DOUBLE)), *(f"S{i:02d}" for i in range(N_SINGLE)), "OUT")
FLUX_ORDER = (None, *MAIN_BLOCKS)  # a 61-value Flux string: its CLIP value is dropped

SPEC = register(ArchSpec(
    name="chroma",
    title="Chroma",
    short="Chroma",
    modelspec="chroma",  # kohya-ss sd-scripts' ARCH_FLUX_1_CHROMA
    probe_keys=PROBE_KEYS,
    matches=matches,
    components=(("transformer", PREFIX), ("vae", VAE_PREFIX), ("text_encoder", T5_PREFIX)),
    layout=layout,
    block_prefixes=(*transformer_block_prefixes(("img_in.", "txt_in.")),
                    (f"{PREFIX}distilled_guidance_layer.", "DGL"), ("text_encoders.t5xxl.", "T5"),
                    (VAE_PREFIX, "VAE")),
    main_blocks=MAIN_BLOCKS,
    family="chroma",
    extra_blocks={"DGL": "IN", "VAE": "T5"},
    string_orders={61: FLUX_ORDER},
    preset_table="presets-flux.tsv",  # Flux's 61-value table, its CLIP value dropped
    slider_columns=(MAIN_BLOCKS[2:2 + N_DOUBLE], ("T5", "IN", "OUT"), MAIN_BLOCKS[2 + N_DOUBLE:-1]),
    key_aliases={m: PREFIX + m for m in CHROMA_MODULES},
    describe_unmatched=describe_unmatched,
    # lodestones/Chroma1-HD's pipeline: Flux's VAE and dynamic-shift scheduler, 512-token T5 prompts, real CFG.
    preview=PreviewSupport(
        pipeline="ChromaPipeline", pipeline_options=NO_IMAGE_ENCODER,
        variants=(PreviewVariant("chroma", "chroma", "Chroma", 1024, "flow", FLOW_SCHEDULER, **FLUX_VAE,
                                 flow_shift=3.0, dynamic_shift=True, max_sequence_length=512),),
        default_variant="chroma", text_encoder_projection=(False,), converter="chroma"),
    **NEVER_MERGED,
))
