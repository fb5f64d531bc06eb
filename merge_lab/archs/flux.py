"""Flux.1 dev and schnell (Black Forest Labs): a 19 double-stream + 38 single-stream block transformer (hidden
3072, 24 heads of 128, MLP ratio 4), CLIP-L and T5-XXL text encoders and a 16-channel VAE. One record per
release, because each writes its own modelspec id ("flux-1-dev", "flux-1-schnell", kohya-ss sd-scripts'
library/sai_model_spec.py); dev has a guidance embedding (``guidance_in.*``), schnell does not.

Key names are BFL's original ones (black-forest-labs/flux src/flux/model.py, ComfyUI comfy/ldm/flux/): the
transformer under ``model.diffusion_model.`` (ComfyUI / Forge checkpoints), or bare (BFL's
flux1-dev.safetensors). All-in-one files (ComfyUI's "save checkpoint") add ``text_encoders.clip_l.transformer.``
(CLIP-L text model, HF names), ``text_encoders.t5xxl.transformer.`` (T5-XXL encoder, HF names) and ``vae.``
(the LDM-named autoencoder, without quant_conv / post_quant_conv).

Bare transformer names are renamed to the ``model.diffusion_model.`` form on load (``key_aliases``, one per
top-level module), so one record takes both forms and a merge of a bare file with a prefixed one lines up
key by key; merged files are written in the prefixed form, which ComfyUI, Forge and diffusers'
``from_single_file`` all read.

Blocks: SuperMerger's 61-value Flux order (scripts/mergers, BLOCKIDFLUX): ``CLIP, T5, IN, D00..D18,
S00..S37, OUT`` where IN is img_in / txt_in / time_in / vector_in / guidance_in and OUT is final_layer. The
named extra block ``VAE`` follows ``CLIP``, the first value of the string: SuperMerger merges a Flux VAE at
the base alpha (its key maps to no value of the string), and in our value strings the first value is the one
a string one shorter leaves at alpha (the role BASE plays on SD, where the VAE follows BASE too).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from merge_lab.archs.layouts import (
    UNET_PREFIX,
    CLIPConfig,
    Shape,
    T5Config,
    VAEConfig,
    _linear,
    clip_shapes,
    t5_shapes,
    vae_shapes,
)
from merge_lab.archs.registry import ArchSpec, PreviewSupport, PreviewVariant, register

PREFIX = UNET_PREFIX  # the transformer, as ComfyUI / Forge save it
CLIP_PREFIX = "text_encoders.clip_l.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."
VAE_PREFIX = "vae."

# The transformer's top-level modules (bare names, before the prefix).
FLUX_MODULES = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.", "double_blocks.",
                "single_blocks.", "final_layer.")
IN_MODULES = ("img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.")

N_DOUBLE = 19
N_SINGLE = 38


@dataclass(frozen=True)
class FluxConfig:
    """The transformer (BFL's FluxParams; ComfyUI's model_detection reads the same from a file)."""

    hidden: int = 3072
    heads: int = 24
    depth: int = N_DOUBLE
    depth_single: int = N_SINGLE
    mlp_ratio: int = 4
    in_channels: int = 64  # img_in's input: 16 latent channels × a 2×2 patch
    context_dim: int = 4096  # txt_in's input: T5-XXL's width
    vec_dim: int | None = 768  # vector_in's input: CLIP-L's pooled output (None: no vector_in, Chroma)
    guidance: bool = True  # guidance_in (dev; schnell has none)
    time_dim: int = 256  # the sinusoidal embedding time_in / guidance_in take
    modulation: bool = True  # per-block modulation layers (Chroma has none: its approximator makes them)
    final_modulation: bool = True  # final_layer.adaLN_modulation (Chroma has none)
    # Chroma's distilled_guidance_layer (in_dim, hidden_dim, n_layers), or None.
    approximator: tuple[int, int, int] | None = None
    qkv_bias: bool = True


def _mlp_embedder(out, name, cin, hidden):
    _linear(out, f"{name}.in_layer", cin, hidden)
    _linear(out, f"{name}.out_layer", hidden, hidden)


def _attention(out, name, dim, head_dim, qkv_bias):
    _linear(out, f"{name}.qkv", dim, 3 * dim, bias=qkv_bias)
    out[f"{name}.norm.query_norm.scale"] = (head_dim,)
    out[f"{name}.norm.key_norm.scale"] = (head_dim,)
    _linear(out, f"{name}.proj", dim, dim)


def transformer_shapes(cfg: FluxConfig, prefix: str = PREFIX) -> dict[str, Shape]:
    """Every key of a Flux / Chroma transformer (ComfyUI comfy/ldm/flux/layers.py, comfy/ldm/chroma/)."""
    out: dict[str, Shape] = {}
    h = cfg.hidden
    head_dim = h // cfg.heads
    mlp = h * cfg.mlp_ratio
    p = prefix
    _linear(out, f"{p}img_in", cfg.in_channels, h)
    if cfg.approximator is None:
        _mlp_embedder(out, f"{p}time_in", cfg.time_dim, h)
    if cfg.vec_dim is not None:
        _mlp_embedder(out, f"{p}vector_in", cfg.vec_dim, h)
    if cfg.guidance:
        _mlp_embedder(out, f"{p}guidance_in", cfg.time_dim, h)
    _linear(out, f"{p}txt_in", cfg.context_dim, h)
    if cfg.approximator is not None:
        in_dim, hidden, layers = cfg.approximator
        a = f"{p}distilled_guidance_layer"
        _linear(out, f"{a}.in_proj", in_dim, hidden)
        for i in range(layers):
            _mlp_embedder(out, f"{a}.layers.{i}", hidden, hidden)
        for i in range(layers):
            out[f"{a}.norms.{i}.scale"] = (hidden,)
        _linear(out, f"{a}.out_proj", hidden, h)
    for i in range(cfg.depth):
        blk = f"{p}double_blocks.{i}"
        for side in ("img", "txt"):
            if cfg.modulation:
                _linear(out, f"{blk}.{side}_mod.lin", h, 6 * h)
            _attention(out, f"{blk}.{side}_attn", h, head_dim, cfg.qkv_bias)
            _linear(out, f"{blk}.{side}_mlp.0", h, mlp)
            _linear(out, f"{blk}.{side}_mlp.2", mlp, h)
    for i in range(cfg.depth_single):
        blk = f"{p}single_blocks.{i}"
        _linear(out, f"{blk}.linear1", h, 3 * h + mlp)
        _linear(out, f"{blk}.linear2", h + mlp, h)
        out[f"{blk}.norm.query_norm.scale"] = (head_dim,)
        out[f"{blk}.norm.key_norm.scale"] = (head_dim,)
        if cfg.modulation:
            _linear(out, f"{blk}.modulation.lin", h, 3 * h)
    _linear(out, f"{p}final_layer.linear", h, cfg.in_channels)  # patch 1 × 1 over the packed 2×2 patches
    if cfg.final_modulation:
        _linear(out, f"{p}final_layer.adaLN_modulation.1", h, 2 * h)
    return out


@dataclass(frozen=True)
class FluxLayout:
    """An all-in-one Flux-family checkpoint: transformer, text encoders (CLIP-L, T5-XXL: either may be None)
    and VAE (None: transformer only)."""

    arch: str
    transformer: FluxConfig
    vae: VAEConfig | None
    clip: CLIPConfig | None
    t5: T5Config | None

    @property
    def text_encoders(self) -> tuple:
        return tuple(te for te in (self.clip, self.t5) if te is not None)

    def transformer_shapes(self) -> dict[str, Shape]:
        return transformer_shapes(self.transformer)

    def shapes(self) -> dict[str, Shape]:
        out = self.transformer_shapes()
        if self.clip is not None:
            out.update(clip_shapes(self.clip))
        if self.t5 is not None:
            out.update(t5_shapes(self.t5))
        if self.vae is not None:
            out.update(vae_shapes(self.vae, VAE_PREFIX))
        return out


def tiny_t5_vocab(vocab: int) -> int:
    """A tiny file's T5 vocabulary: T5's real 32128 tokens with CLIP's real vocabulary (a model a preview can
    tokenize for), else as small as the CLIP one asked for (at most 256)."""
    return 32128 if vocab == 49408 else min(vocab, 256)


def tiny_parts(width: int, vocab: int) -> tuple[int, CLIPConfig, T5Config, VAEConfig]:
    """(hidden, CLIP-L, T5, VAE) of a tiny Flux-family file: widths shrink, every count stays, and so do the
    sizes the model fixes (the 64 packed latent channels, the 256-wide timestep embedding)."""
    clip = CLIPConfig(CLIP_PREFIX, hidden=width, intermediate=2 * width, vocab=vocab, heads=4, position_ids=False,
                      text_projection=False)
    t5 = T5Config(T5_PREFIX, d_model=2 * width, d_kv=width // 2, heads=4, d_ff=4 * width, vocab=tiny_t5_vocab(vocab))
    return 2 * width, clip, t5, VAEConfig(ch=width, z_channels=16, quant_conv=False)


# ComfyUI's all-in-one Flux files carry CLIP-L's text model only (196 keys, no text_projection; sd-mecha's
# flux-flux.yaml, read off a real file, agrees) and T5's encoder without embed_tokens (219 keys).
REAL_CLIP = CLIPConfig(CLIP_PREFIX, position_ids=False)
REAL_T5 = T5Config(T5_PREFIX)
REAL_VAE = VAEConfig(z_channels=16, quant_conv=False)  # no quant convs


def flux_layout(arch: str, guidance: bool):
    def layout(width: int | None = None, vocab: int = 49408) -> FluxLayout:
        if width:
            hidden, clip, t5, vae = tiny_parts(width, vocab)
            cfg = FluxConfig(hidden=hidden, heads=2, context_dim=t5.d_model, vec_dim=clip.hidden, guidance=guidance)
            return FluxLayout(arch, cfg, vae, clip, t5)
        clip = CLIPConfig(CLIP_PREFIX, vocab=vocab, position_ids=False)
        return FluxLayout(arch, FluxConfig(guidance=guidance), REAL_VAE, clip, REAL_T5)

    return layout


# ---- detection -------------------------------------------------------------------------------------------

PROBE_KEYS = (f"{PREFIX}double_blocks.0.img_attn.norm.key_norm.scale",)  # ComfyUI's Flux / Chroma probe
GUIDANCE_KEY = f"{PREFIX}guidance_in.in_layer.weight"
VECTOR_KEY = f"{PREFIX}vector_in.in_layer.weight"
IMG_IN_KEY = f"{PREFIX}img_in.weight"
APPROXIMATOR_KEY = f"{PREFIX}distilled_guidance_layer.norms.0.scale"
LDM_KEY = f"{PREFIX}input_blocks.0.0.weight"


def count_blocks(tensors: Mapping[str, Any], name: str) -> int:
    start = len(PREFIX) + len(name) + 1
    found = {k[start:].split(".", 1)[0] for k in tensors if k.startswith(f"{PREFIX}{name}.")}
    numbers = {int(n) for n in found if n.isdigit()}
    return max(numbers) + 1 if numbers else 0


def signature(tensors: Mapping[str, Any]) -> tuple[int, int]:
    return count_blocks(tensors, "double_blocks"), count_blocks(tensors, "single_blocks")


def flux_matcher(guidance: bool):
    """Flux.1: img_in and vector_in, 19 + 38 blocks, no Chroma approximator, no LDM UNet keys; dev has
    guidance_in, schnell has not."""

    def matches(tensors: Mapping[str, Any]) -> bool:
        return (IMG_IN_KEY in tensors and VECTOR_KEY in tensors and APPROXIMATOR_KEY not in tensors
                and LDM_KEY not in tensors and signature(tensors) == (N_DOUBLE, N_SINGLE)
                and (GUIDANCE_KEY in tensors) == guidance)

    return matches


def variants(tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> tuple[str, ...]:
    """Flux.1 Fill (img_in takes 384 channels: latents, masked latents, mask) and Depth / Canny (128), as
    diffusers' infer_diffusers_model_type tells them apart."""
    img_in = tensors.get(IMG_IN_KEY)
    channels = img_in.shape[1] if img_in is not None and len(img_in.shape) == 2 else None
    return {384: ("fill",), 128: ("depth-or-canny",)}.get(channels, ())


def describe_unmatched(tensors: Mapping[str, Any]) -> str | None:
    """The Flux-family layout found when no record took it ("unknown Flux layout (2 double, 1 single blocks)")."""
    if not any(k.startswith((f"{PREFIX}double_blocks.", f"{PREFIX}single_blocks.")) for k in tensors):
        return None
    double, single = signature(tensors)
    return (f"unknown Flux-family transformer layout ({double} double and {single} single blocks; Flux.1 and "
            f"Chroma have {N_DOUBLE} and {N_SINGLE})")


# ---- blocks ----------------------------------------------------------------------------------------------

MAIN_BLOCKS = ("CLIP", "T5", "IN", *(f"D{i:02d}" for i in range(N_DOUBLE)), *(f"S{i:02d}" for i in range(N_SINGLE)),
               "OUT")


def transformer_block_prefixes(in_modules: tuple[str, ...]) -> list[tuple[str, str]]:
    out = [(f"{PREFIX}{m}", "IN") for m in in_modules]
    out += [(f"{PREFIX}double_blocks.{i}.", f"D{i:02d}") for i in range(N_DOUBLE)]
    out += [(f"{PREFIX}single_blocks.{i}.", f"S{i:02d}") for i in range(N_SINGLE)]
    out.append((f"{PREFIX}final_layer.", "OUT"))
    return out


BLOCK_PREFIXES = (*transformer_block_prefixes(IN_MODULES), ("text_encoders.clip_l.", "CLIP"),
                  ("text_encoders.t5xxl.", "T5"), (VAE_PREFIX, "VAE"))

KEY_ALIASES = {m: PREFIX + m for m in FLUX_MODULES}

# Kept as they are, never merged: CLIP's position ids, a text encoder's logit scale (ComfyUI's text-encoder
# wrappers carry one), wherever a file has them.
# ComfyUI's "save checkpoint" also writes its sampling schedule (model.model_sampling.sigmas): a buffer,
# copied from model A, dropped by --prune, as the LDM files' DDPM buffers.
MODEL_SAMPLING = ("model.model_sampling.sigmas",)
NEVER_MERGED = dict(never_merged_suffixes=("position_ids", "logit_scale"),
                    kept_keys=("text_encoders.clip_l.logit_scale", "text_encoders.t5xxl.logit_scale"),
                    leftover_keys=MODEL_SAMPLING)

# The released pipelines (black-forest-labs/FLUX.1-dev and -schnell model_index / scheduler / vae configs):
# the 16-channel VAE's scale and shift, dev's resolution-dependent timestep shift and 512-token prompts,
# schnell's unshifted 4-step schedule and 256 tokens; dev takes the guidance value as a model input.
FLUX_VAE = dict(vae_scaling_factor=0.3611, vae_shift_factor=0.1159, vae_force_upcast=True)
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
RELEASES = {
    "dev": PreviewVariant("flux-dev", "flux-dev", "FLUX.1 [dev]", 1024, "flow", FLOW_SCHEDULER, **FLUX_VAE,
                          flow_shift=3.0, dynamic_shift=True, max_sequence_length=512, embedded_guidance=True),
    "schnell": PreviewVariant("flux-schnell", "flux-schnell", "FLUX.1 [schnell]", 1024, "flow", FLOW_SCHEDULER,
                              **FLUX_VAE, flow_shift=1.0, max_sequence_length=256),
}
NO_IMAGE_ENCODER = {"image_encoder": None, "feature_extractor": None}  # the IP-Adapter inputs, unused


def preview_support(release: str) -> PreviewSupport:
    return PreviewSupport(pipeline="FluxPipeline", pipeline_options=NO_IMAGE_ENCODER, variants=(RELEASES[release],),
                          default_variant=RELEASES[release].name, text_encoder_projection=(False, False),
                          converter="flux")


def flux_spec(name: str, release: str, guidance: bool) -> ArchSpec:
    return ArchSpec(
        name=name,
        title=f"Flux.1 {release}",
        short=f"Flux.1 {release}",
        modelspec=f"flux-1-{release}",
        probe_keys=PROBE_KEYS,
        matches=flux_matcher(guidance),
        components=(("transformer", PREFIX), ("vae", VAE_PREFIX), ("text_encoder", CLIP_PREFIX),
                    ("text_encoder_2", T5_PREFIX)),
        layout=flux_layout(name, guidance),
        block_prefixes=BLOCK_PREFIXES,
        main_blocks=MAIN_BLOCKS,
        family="flux",
        extra_blocks={"VAE": "CLIP"},
        slider_columns=(MAIN_BLOCKS[3:3 + N_DOUBLE], ("CLIP", "T5", "IN", "OUT"), MAIN_BLOCKS[3 + N_DOUBLE:-1]),
        key_aliases=KEY_ALIASES,
        variants=variants,
        describe_unmatched=describe_unmatched,
        preset_table="presets-flux.tsv",
        preview=preview_support(release),
        **NEVER_MERGED,
    )


DEV = register(flux_spec("flux-dev", "dev", guidance=True))
SCHNELL = register(flux_spec("flux-schnell", "schnell", guidance=False))
