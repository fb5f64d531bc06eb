"""Stable Diffusion 3 Medium, 3.5 Medium and 3.5 Large: the MMDiT of Stability's sd3 reference (ComfyUI's
``comfy/ldm/modules/diffusionmodules/mmdit.py``), saved as ComfyUI / Stability single files.

One generator (:class:`MMDiTConfig`) serves the three records; they differ in depth, qk RMSNorm, the
``x_block.attn2`` (dual attention) layers and the positional-embedding table:

=================  =====  ======  =======  ==================  ===============
release            depth  hidden  qk norm  x_block.attn2       pos_embed
=================  =====  ======  =======  ==================  ===============
SD3 Medium (2B)    24     1536    no       none                192² = 36864
SD3.5 Medium       24     1536    RMS      layers 0..12        384² = 147456
SD3.5 Large        38     2432    RMS      none                192² = 36864
=================  =====  ======  =======  ==================  ===============

hidden = 64·depth, one 64-wide head per depth (ComfyUI's model_detection reads depth as
``x_embedder.proj.weight`` rows / 64). The last joint block's ``context_block`` is *pre_only*: its attention
has no ``proj``, it has no MLP and its adaLN makes 2 modulations (6 elsewhere, 9 with ``attn2``).

Keys: ``model.diffusion_model.`` + ``joint_blocks.N.{context_block,x_block}.{attn.{qkv,proj,ln_q,ln_k},
attn2.…, mlp.fc1, mlp.fc2, adaLN_modulation.1}``, ``x_embedder.proj`` (2×2 patch conv from the 16 latent
channels), ``pos_embed``, ``t_embedder.mlp.{0,2}``, ``y_embedder.mlp.{0,2}`` (pooled CLIP-L+G, 2048),
``context_embedder`` (T5 width, 4096), ``final_layer.{linear,adaLN_modulation.1}``. All-in-one files add
``text_encoders.{clip_l,clip_g,t5xxl}.transformer.…`` and ``first_stage_model.…`` (the 16-channel VAE,
without quant_conv / post_quant_conv).

The block scheme is ComfyUI's ModelMergeSD3_2B / ModelMergeSD35_Large, in their input order:
``POS`` (pos_embed), ``X_EMB`` (x_embedder), ``CTX_EMB`` (context_embedder), ``Y_EMB`` (y_embedder),
``T_EMB`` (t_embedder), ``JB00..JB<depth-1>`` (joint_blocks.N), ``FINAL`` (final_layer): 30 values for
the Mediums, 44 for Large. The text encoders (``CLIP_L``, ``CLIP_G``, ``T5``) follow ``CTX_EMB`` (they feed
the text path) and the ``VAE`` follows ``X_EMB`` (the latent input) unless set themselves; ComfyUI's nodes
merge the diffusion model only.

Sources: ComfyUI comfy/model_detection.py (SD3 detection), comfy/ldm/modules/diffusionmodules/mmdit.py,
comfy_extras/nodes_model_merging_model_specific.py; diffusers loaders/single_file_utils.py
(convert_sd3_transformer_checkpoint_to_diffusers, CHECKPOINT_KEY_NAMES "sd3" / "sd35_large"); Stability's
sd3-ref (sd3_impls.py / mmditx.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from merge_lab.archs.layouts import (
    UNET_PREFIX,
    VAE_PREFIX,
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

PREFIX = UNET_PREFIX  # ComfyUI / Stability save the MMDiT under model.diffusion_model.
CLIP_L_PREFIX = "text_encoders.clip_l.transformer."
CLIP_G_PREFIX = "text_encoders.clip_g.transformer."
T5_PREFIX = "text_encoders.t5xxl.transformer."

# diffusers' CHECKPOINT_KEY_NAMES "sd3" / "sd35_large" (and the bare form of a transformer-only file is
# what ComfyUI saves under model.diffusion_model. too).
PROBE_KEYS = (f"{PREFIX}joint_blocks.0.context_block.adaLN_modulation.1.bias",
              f"{PREFIX}x_embedder.proj.weight")



def preview_support(name: str, title: str) -> PreviewSupport:
    """stabilityai's SD3 / SD3.5 pipelines: two CLIPs with projection and T5 (256-token prompts), the
    16-channel VAE (scale 1.5305, shift 0.0609), a flow-matching Euler schedule shifted by 3."""
    variant = PreviewVariant(name, name, title, 1024, "flow", "FlowMatchEulerDiscreteScheduler", 1.5305,
                             vae_shift_factor=0.0609, flow_shift=3.0, max_sequence_length=256)
    return PreviewSupport(pipeline="StableDiffusion3Pipeline",
                          pipeline_options={"image_encoder": None, "feature_extractor": None}, variants=(variant,),
                          default_variant=name, text_encoder_projection=(True, True, False), converter="sd3")


@dataclass(frozen=True)
class MMDiTConfig:
    depth: int
    hidden: int | None = None  # 64·depth when None
    heads: int | None = None  # depth when None (64-wide heads)
    qk_norm: bool = False  # RMSNorm on q and k (ln_q / ln_k, one weight per head width)
    attn2_layers: tuple[int, ...] = ()  # x_block.attn2 (SD3.5 Medium's dual attention)
    pos_embed_max_size: int = 192
    context_dim: int = 4096  # T5-XXL width
    adm_in_channels: int = 2048  # pooled CLIP-L (768) + CLIP-G (1280)
    in_channels: int = 16
    patch_size: int = 2
    frequency_embedding: int = 256  # t_embedder's sinusoidal input
    mlp_ratio: int = 4

    @property
    def width(self) -> int:
        return self.hidden or 64 * self.depth

    @property
    def head_dim(self) -> int:
        return self.width // (self.heads or self.depth)


@dataclass(frozen=True)
class SD3Layout:
    arch: str
    mmdit: MMDiTConfig
    vae: VAEConfig | None = None
    text_encoders: tuple = field(default_factory=tuple)

    def shapes(self) -> dict[str, Shape]:
        out = mmdit_shapes(self.mmdit)
        for te in self.text_encoders:
            out.update(t5_shapes(te) if isinstance(te, T5Config) else clip_shapes(te))
        if self.vae is not None:
            out.update(vae_shapes(self.vae))
        return out


def _attention(out, name, h, head_dim, qk_norm, pre_only=False):
    _linear(out, f"{name}.qkv", h, 3 * h)
    if qk_norm:
        out[f"{name}.ln_q.weight"] = (head_dim,)
        out[f"{name}.ln_k.weight"] = (head_dim,)
    if not pre_only:
        _linear(out, f"{name}.proj", h, h)


def mmdit_shapes(cfg: MMDiTConfig, prefix: str = PREFIX) -> dict[str, Shape]:
    out: dict[str, Shape] = {}
    h, p = cfg.width, prefix
    out[f"{p}x_embedder.proj.weight"] = (h, cfg.in_channels, cfg.patch_size, cfg.patch_size)
    out[f"{p}x_embedder.proj.bias"] = (h,)
    out[f"{p}pos_embed"] = (1, cfg.pos_embed_max_size ** 2, h)
    _linear(out, f"{p}t_embedder.mlp.0", cfg.frequency_embedding, h)
    _linear(out, f"{p}t_embedder.mlp.2", h, h)
    _linear(out, f"{p}y_embedder.mlp.0", cfg.adm_in_channels, h)
    _linear(out, f"{p}y_embedder.mlp.2", h, h)
    _linear(out, f"{p}context_embedder", cfg.context_dim, h)
    for i in range(cfg.depth):
        for stream in ("context_block", "x_block"):
            blk = f"{p}joint_blocks.{i}.{stream}"
            pre_only = stream == "context_block" and i == cfg.depth - 1
            attn2 = stream == "x_block" and i in cfg.attn2_layers
            _attention(out, f"{blk}.attn", h, cfg.head_dim, cfg.qk_norm, pre_only)
            if attn2:
                _attention(out, f"{blk}.attn2", h, cfg.head_dim, cfg.qk_norm)
            if not pre_only:
                _linear(out, f"{blk}.mlp.fc1", h, cfg.mlp_ratio * h)
                _linear(out, f"{blk}.mlp.fc2", cfg.mlp_ratio * h, h)
            _linear(out, f"{blk}.adaLN_modulation.1", h, (9 if attn2 else 2 if pre_only else 6) * h)
    _linear(out, f"{p}final_layer.linear", h, cfg.patch_size ** 2 * cfg.in_channels)
    _linear(out, f"{p}final_layer.adaLN_modulation.1", h, 2 * h)
    return out


# The three releases at real size (diffusers' transformer configs; model_detection's reading of a file).
SD3_MEDIUM = MMDiTConfig(depth=24)
SD35_MEDIUM = MMDiTConfig(depth=24, qk_norm=True, attn2_layers=tuple(range(13)), pos_embed_max_size=384)
SD35_LARGE = MMDiTConfig(depth=38, qk_norm=True)


def _layout_fn(name: str, real: MMDiTConfig):
    def layout(width: int | None = None, vocab: int = 49408) -> SD3Layout:
        if width:
            # Same key set, tiny widths: hidden = width with 2 heads, every block and attn2 layer kept.
            # The text widths keep SD3's relation (CLIP-L + CLIP-G = pooled input, both padded into T5's
            # width), the timestep embedding its fixed 256 channels.
            mmdit = MMDiTConfig(depth=real.depth, hidden=width, heads=2, qk_norm=real.qk_norm,
                                attn2_layers=real.attn2_layers, pos_embed_max_size=4, context_dim=4 * width,
                                adm_in_channels=3 * width, in_channels=real.in_channels)
            return SD3Layout(name, mmdit, VAEConfig(ch=width, z_channels=16, quant_conv=False), (
                CLIPConfig(CLIP_L_PREFIX, hidden=width, intermediate=2 * width, vocab=vocab, heads=2,
                           position_ids=False, text_projection=True),
                CLIPConfig(CLIP_G_PREFIX, hidden=2 * width, layers=32, intermediate=4 * width, vocab=vocab,
                           heads=2, position_ids=False, text_projection=True, hidden_act="gelu"),
                T5Config(T5_PREFIX, d_model=4 * width, heads=2, d_kv=width, d_ff=3 * width,
                         vocab=32128 if vocab == 49408 else 128),
            ))
        return SD3Layout(name, real, VAEConfig(z_channels=16, quant_conv=False), (
            CLIPConfig(CLIP_L_PREFIX, hidden=768, intermediate=3072, vocab=vocab, heads=12, position_ids=False,
                       text_projection=True),
            CLIPConfig(CLIP_G_PREFIX, hidden=1280, layers=32, intermediate=5120, vocab=vocab, heads=20,
                       position_ids=False, text_projection=True, hidden_act="gelu"),
            # 219 keys, without embed_tokens, as in ComfyUI's / Stability's files (sd-mecha's sd3-comfyui.yaml).
            T5Config(T5_PREFIX),
        ))

    return layout


# ---- detection -------------------------------------------------------------------------------------------
_JB = f"{PREFIX}joint_blocks."


def signature(tensors: Mapping[str, Any]) -> tuple[int, bool, tuple[int, ...]]:
    """(number of joint blocks, qk RMSNorm, x_block.attn2 layers), as ComfyUI's model_detection reads them."""
    depth, attn2 = set(), set()
    for k in tensors:
        if k.startswith(_JB):
            n = k[len(_JB):].split(".", 1)[0]
            if n.isdigit():
                depth.add(int(n))
                if k.endswith(".x_block.attn2.qkv.weight"):
                    attn2.add(int(n))
    qk = f"{_JB}0.context_block.attn.ln_q.weight" in tensors
    return (max(depth) + 1 if depth else 0), qk, tuple(sorted(attn2))


def matcher(cfg: MMDiTConfig):
    def matches(tensors: Mapping[str, Any]) -> bool:
        if f"{PREFIX}x_embedder.proj.weight" not in tensors:
            return False
        return signature(tensors) == (cfg.depth, cfg.qk_norm, cfg.attn2_layers)

    return matches


def describe_unmatched(tensors: Mapping[str, Any]) -> str | None:
    if not any(k.startswith(_JB) for k in tensors):
        return None
    depth, qk, attn2 = signature(tensors)
    what = f"{depth} joint blocks, {'with' if qk else 'without'} qk norm"
    if attn2:
        what += f", x_block.attn2 on layers {attn2[0]}..{attn2[-1]}" if attn2 == tuple(
            range(attn2[0], attn2[-1] + 1)) else f", x_block.attn2 on layers {list(attn2)}"
    return f"unknown SD3 MMDiT layout ({what})"


# ---- the block scheme ------------------------------------------------------------------------------------
EMBEDDERS = (("pos_embed", "POS"), ("x_embedder.", "X_EMB"), ("context_embedder.", "CTX_EMB"),
             ("y_embedder.", "Y_EMB"), ("t_embedder.", "T_EMB"))  # ComfyUI's node inputs, in order
TEXT_ENCODERS = ((CLIP_L_PREFIX, "CLIP_L"), (CLIP_G_PREFIX, "CLIP_G"), (T5_PREFIX, "T5"))


def main_blocks(depth: int) -> tuple[str, ...]:
    return (*(b for _, b in EMBEDDERS), *(f"JB{i:02d}" for i in range(depth)), "FINAL")


def block_prefixes(depth: int) -> tuple[tuple[str, str], ...]:
    out = [(PREFIX + p, b) for p, b in EMBEDDERS]
    out += [(f"{_JB}{i}.", f"JB{i:02d}") for i in range(depth)]
    out += [(f"{PREFIX}final_layer.", "FINAL"), *TEXT_ENCODERS, (VAE_PREFIX, "VAE")]
    return tuple(out)


EXTRA_BLOCKS = {"CLIP_L": "CTX_EMB", "CLIP_G": "CTX_EMB", "T5": "CTX_EMB", "VAE": "X_EMB"}
# A bare MMDiT (sd3-ref's / mmditx.py names without model.diffusion_model., as some transformer-only files are
# saved) is read under the prefix, as for Flux (merge_lab/archs/flux.py): one record takes both forms.
MMDIT_MODULES = ("joint_blocks.", "x_embedder.", "pos_embed", "t_embedder.", "y_embedder.", "context_embedder.",
                 "final_layer.")


def _spec(name: str, title: str, short: str, modelspec: str, cfg: MMDiTConfig) -> ArchSpec:
    mains = main_blocks(cfg.depth)
    return ArchSpec(
        name=name,
        title=title,
        short=short,
        modelspec=modelspec,
        probe_keys=PROBE_KEYS,
        matches=matcher(cfg),
        components=(("transformer", PREFIX), ("vae", VAE_PREFIX), ("text_encoder", CLIP_L_PREFIX),
                    ("text_encoder_2", CLIP_G_PREFIX), ("text_encoder_3", T5_PREFIX)),
        layout=_layout_fn(name, cfg),
        block_prefixes=block_prefixes(cfg.depth),
        main_blocks=mains,
        family="sd3",
        extra_blocks=EXTRA_BLOCKS,
        slider_columns=(mains[5:-1], mains[:5], ("FINAL",)),
        key_aliases={m: PREFIX + m for m in MMDIT_MODULES},
        never_merged_suffixes=("position_ids", "logit_scale"),
        # ComfyUI's text-encoder wrappers save a logit_scale beside each encoder (outside .transformer.)
        kept_keys=tuple(f"text_encoders.{n}.logit_scale" for n in ("clip_l", "clip_g", "t5xxl")),
        # ComfyUI's saved sampling schedule: a buffer, copied, dropped by --prune
        leftover_keys=("model.model_sampling.sigmas",),
        describe_unmatched=describe_unmatched,
        preset_table="presets-sd35-large.tsv" if cfg.depth == 38 else "presets-sd3-medium.tsv",
        preview=preview_support(name, title),
    )


SD3_MEDIUM_SPEC = register(_spec("sd3-medium", "Stable Diffusion 3 Medium", "SD3 Medium",
                                 "stable-diffusion-v3-medium", SD3_MEDIUM))
SD35_MEDIUM_SPEC = register(_spec("sd35-medium", "Stable Diffusion 3.5 Medium", "SD3.5 Medium",
                                  "stable-diffusion-v3.5-medium", SD35_MEDIUM))
SD35_LARGE_SPEC = register(_spec("sd35-large", "Stable Diffusion 3.5 Large", "SD3.5 Large",
                                 "stable-diffusion-v3.5-large", SD35_LARGE))
SPECS = (SD3_MEDIUM_SPEC, SD35_MEDIUM_SPEC, SD35_LARGE_SPEC)
