"""The single-file (LDM / A1111) key layouts, generated from explicit configs (each architecture's module
builds its own: merge_lab/archs/sd1.py, …).

One generator serves the real sizes (benchmarks) and tiny widths (tests, demo): only the widths change,
never the key set. The real configs reproduce the published key counts (SD1.5: 686 UNet + 248 VAE +
197 CLIP; SDXL: 1680 + 248 + 197 + 390) and the tiny ones keep every key, including each
``skip_connection``, by keeping the real 1:2:4:4 channel ratios.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Shape = tuple[int, ...]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


@dataclass(frozen=True)
class UNetConfig:
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)  # per level; 0 = no attention at that level
    middle_depth: int = 1
    context_dim: int = 768
    use_linear_proj: bool = False  # SD2 / SDXL use Linear proj_in / proj_out, SD1 uses 1x1 convs
    in_channels: int = 4
    out_channels: int = 4
    adm_in_channels: int | None = None  # SDXL's label_emb input (pooled text + size conditioning)
    # Attention heads, for the diffusers config only (shapes do not depend on them): SD1 has a fixed
    # number of heads per level (num_heads), SD2 / SDXL a fixed head width (head_channels).
    head_channels: int = 64
    num_heads: int | None = None


@dataclass(frozen=True)
class VAEConfig:
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    in_channels: int = 3
    quant_conv: bool = True  # quant_conv / post_quant_conv (the 16-channel Flux and SD3 VAEs have none)


@dataclass(frozen=True)
class CLIPConfig:
    """HF CLIPTextModel layout (SD1 text encoder, SDXL's first)."""

    prefix: str
    hidden: int = 768
    layers: int = 12
    intermediate: int = 3072
    vocab: int = 49408
    positions: int = 77
    heads: int = 12
    position_ids: bool = True
    text_projection: bool = False  # ComfyUI's CLIP-L / CLIP-G in Flux and SD3 files keep their projection
    hidden_act: str = "quick_gelu"  # OpenAI's CLIP-L; OpenCLIP's ViT-bigG (SD3's CLIP-G) uses "gelu" (no shapes)


@dataclass(frozen=True)
class OpenCLIPConfig:
    """open_clip text transformer layout (SD2 text encoder, SDXL's second)."""

    prefix: str
    width: int = 1024
    layers: int = 24
    mlp_ratio: int = 4
    vocab: int = 49408
    positions: int = 77
    heads: int = 16
    projection_dim: int = 1024


@dataclass(frozen=True)
class T5Config:
    """HF T5EncoderModel (T5 v1.1: gated-GELU feed-forward, no biases, relative attention bias in block 0), as
    Flux and SD3 files carry it (``shared`` + ``encoder``)."""

    prefix: str
    d_model: int = 4096
    d_kv: int = 64
    heads: int = 64
    d_ff: int = 10240
    layers: int = 24
    vocab: int = 32128
    buckets: int = 32
    embed_tokens: bool = False  # encoder.embed_tokens beside shared (tied; transformers saves both)


@dataclass(frozen=True)
class ModelLayout:
    arch: str  # the architecture's registry name
    unet: UNetConfig
    vae: VAEConfig
    text_encoders: tuple = field(default_factory=tuple)

    def shapes(self) -> dict[str, Shape]:
        out: dict[str, Shape] = {}
        out.update(unet_shapes(self.unet))
        for te in self.text_encoders:
            out.update(clip_shapes(te) if isinstance(te, CLIPConfig) else open_clip_shapes(te))
        out.update(vae_shapes(self.vae))
        return out


def _norm(out, name, ch):
    out[f"{name}.weight"] = (ch,)
    out[f"{name}.bias"] = (ch,)


def _linear(out, name, cin, cout, bias=True):
    out[f"{name}.weight"] = (cout, cin)
    if bias:
        out[f"{name}.bias"] = (cout,)


def _conv(out, name, cin, cout, k=3):
    out[f"{name}.weight"] = (cout, cin, k, k)
    out[f"{name}.bias"] = (cout,)


def _resblock(out, name, cin, cout, emb):
    _norm(out, f"{name}.in_layers.0", cin)
    _conv(out, f"{name}.in_layers.2", cin, cout)
    _linear(out, f"{name}.emb_layers.1", emb, cout)
    _norm(out, f"{name}.out_layers.0", cout)
    _conv(out, f"{name}.out_layers.3", cout, cout)
    if cin != cout:
        _conv(out, f"{name}.skip_connection", cin, cout, k=1)


def _transformer(out, name, ch, depth, context, linear):
    _norm(out, f"{name}.norm", ch)
    if linear:
        _linear(out, f"{name}.proj_in", ch, ch)
    else:
        _conv(out, f"{name}.proj_in", ch, ch, k=1)
    for d in range(depth):
        blk = f"{name}.transformer_blocks.{d}"
        for attn, kv_dim in (("attn1", ch), ("attn2", context)):
            _linear(out, f"{blk}.{attn}.to_q", ch, ch, bias=False)
            _linear(out, f"{blk}.{attn}.to_k", kv_dim, ch, bias=False)
            _linear(out, f"{blk}.{attn}.to_v", kv_dim, ch, bias=False)
            _linear(out, f"{blk}.{attn}.to_out.0", ch, ch)
        _linear(out, f"{blk}.ff.net.0.proj", ch, ch * 8)  # GEGLU: 2 x 4ch
        _linear(out, f"{blk}.ff.net.2", ch * 4, ch)
        for i in (1, 2, 3):
            _norm(out, f"{blk}.norm{i}", ch)
    if linear:
        _linear(out, f"{name}.proj_out", ch, ch)
    else:
        _conv(out, f"{name}.proj_out", ch, ch, k=1)


def unet_shapes(cfg: UNetConfig, prefix: str = UNET_PREFIX) -> dict[str, Shape]:
    out: dict[str, Shape] = {}
    mc = cfg.model_channels
    emb = 4 * mc
    _linear(out, f"{prefix}time_embed.0", mc, emb)
    _linear(out, f"{prefix}time_embed.2", emb, emb)
    if cfg.adm_in_channels:
        _linear(out, f"{prefix}label_emb.0.0", cfg.adm_in_channels, emb)
        _linear(out, f"{prefix}label_emb.0.2", emb, emb)

    _conv(out, f"{prefix}input_blocks.0.0", cfg.in_channels, mc)
    skip_channels = [mc]
    ch = mc
    idx = 1
    levels = len(cfg.channel_mult)
    for level, mult in enumerate(cfg.channel_mult):
        for _ in range(cfg.num_res_blocks):
            _resblock(out, f"{prefix}input_blocks.{idx}.0", ch, mc * mult, emb)
            ch = mc * mult
            if cfg.transformer_depth[level]:
                _transformer(out, f"{prefix}input_blocks.{idx}.1", ch, cfg.transformer_depth[level],
                             cfg.context_dim, cfg.use_linear_proj)
            skip_channels.append(ch)
            idx += 1
        if level != levels - 1:
            _conv(out, f"{prefix}input_blocks.{idx}.0.op", ch, ch)
            skip_channels.append(ch)
            idx += 1

    _resblock(out, f"{prefix}middle_block.0", ch, ch, emb)
    _transformer(out, f"{prefix}middle_block.1", ch, cfg.middle_depth, cfg.context_dim, cfg.use_linear_proj)
    _resblock(out, f"{prefix}middle_block.2", ch, ch, emb)

    idx = 0
    for level in reversed(range(levels)):
        mult = cfg.channel_mult[level]
        for i in range(cfg.num_res_blocks + 1):
            skip = skip_channels.pop()
            _resblock(out, f"{prefix}output_blocks.{idx}.0", ch + skip, mc * mult, emb)
            ch = mc * mult
            sub = 1
            if cfg.transformer_depth[level]:
                _transformer(out, f"{prefix}output_blocks.{idx}.1", ch, cfg.transformer_depth[level],
                             cfg.context_dim, cfg.use_linear_proj)
                sub = 2
            if level and i == cfg.num_res_blocks:
                _conv(out, f"{prefix}output_blocks.{idx}.{sub}.conv", ch, ch)
            idx += 1

    _norm(out, f"{prefix}out.0", ch)
    _conv(out, f"{prefix}out.2", ch, cfg.out_channels)
    return out


def _vae_resnet(out, name, cin, cout):
    _norm(out, f"{name}.norm1", cin)
    _conv(out, f"{name}.conv1", cin, cout)
    _norm(out, f"{name}.norm2", cout)
    _conv(out, f"{name}.conv2", cout, cout)
    if cin != cout:
        _conv(out, f"{name}.nin_shortcut", cin, cout, k=1)


def _vae_mid(out, name, ch):
    _vae_resnet(out, f"{name}.block_1", ch, ch)
    _norm(out, f"{name}.attn_1.norm", ch)
    for proj in ("q", "k", "v", "proj_out"):
        _conv(out, f"{name}.attn_1.{proj}", ch, ch, k=1)
    _vae_resnet(out, f"{name}.block_2", ch, ch)


def vae_shapes(cfg: VAEConfig, prefix: str = VAE_PREFIX) -> dict[str, Shape]:
    out: dict[str, Shape] = {}
    chs = [cfg.ch * m for m in cfg.ch_mult]
    e = f"{prefix}encoder"
    _conv(out, f"{e}.conv_in", cfg.in_channels, cfg.ch)
    ch = cfg.ch
    for level, cout in enumerate(chs):
        for b in range(cfg.num_res_blocks):
            _vae_resnet(out, f"{e}.down.{level}.block.{b}", ch, cout)
            ch = cout
        if level != len(chs) - 1:
            _conv(out, f"{e}.down.{level}.downsample.conv", ch, ch)
    _vae_mid(out, f"{e}.mid", ch)
    _norm(out, f"{e}.norm_out", ch)
    _conv(out, f"{e}.conv_out", ch, 2 * cfg.z_channels)

    d = f"{prefix}decoder"
    ch = chs[-1]
    _conv(out, f"{d}.conv_in", cfg.z_channels, ch)
    _vae_mid(out, f"{d}.mid", ch)
    for level in reversed(range(len(chs))):
        cout = chs[level]
        for b in range(cfg.num_res_blocks + 1):
            _vae_resnet(out, f"{d}.up.{level}.block.{b}", ch, cout)
            ch = cout
        if level != 0:
            _conv(out, f"{d}.up.{level}.upsample.conv", ch, ch)
    _norm(out, f"{d}.norm_out", ch)
    _conv(out, f"{d}.conv_out", ch, cfg.in_channels)

    if cfg.quant_conv:
        _conv(out, f"{prefix}quant_conv", 2 * cfg.z_channels, 2 * cfg.z_channels, k=1)
        _conv(out, f"{prefix}post_quant_conv", cfg.z_channels, cfg.z_channels, k=1)
    return out


def clip_shapes(cfg: CLIPConfig) -> dict[str, Shape]:
    out: dict[str, Shape] = {}
    p = f"{cfg.prefix}text_model."
    h = cfg.hidden
    out[f"{p}embeddings.token_embedding.weight"] = (cfg.vocab, h)
    out[f"{p}embeddings.position_embedding.weight"] = (cfg.positions, h)
    if cfg.position_ids:
        out[f"{p}embeddings.position_ids"] = (1, cfg.positions)  # int64, never merged
    for i in range(cfg.layers):
        layer = f"{p}encoder.layers.{i}"
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            _linear(out, f"{layer}.self_attn.{proj}", h, h)
        _norm(out, f"{layer}.layer_norm1", h)
        _linear(out, f"{layer}.mlp.fc1", h, cfg.intermediate)
        _linear(out, f"{layer}.mlp.fc2", cfg.intermediate, h)
        _norm(out, f"{layer}.layer_norm2", h)
    _norm(out, f"{p}final_layer_norm", h)
    if cfg.text_projection:
        out[f"{cfg.prefix}text_projection.weight"] = (h, h)
    return out


def open_clip_shapes(cfg: OpenCLIPConfig) -> dict[str, Shape]:
    out: dict[str, Shape] = {}
    p = cfg.prefix
    w = cfg.width
    out[f"{p}positional_embedding"] = (cfg.positions, w)
    out[f"{p}text_projection"] = (w, cfg.projection_dim)
    out[f"{p}token_embedding.weight"] = (cfg.vocab, w)
    out[f"{p}logit_scale"] = ()
    for i in range(cfg.layers):
        blk = f"{p}transformer.resblocks.{i}"
        out[f"{blk}.attn.in_proj_weight"] = (3 * w, w)
        out[f"{blk}.attn.in_proj_bias"] = (3 * w,)
        _linear(out, f"{blk}.attn.out_proj", w, w)
        _norm(out, f"{blk}.ln_1", w)
        _linear(out, f"{blk}.mlp.c_fc", w, w * cfg.mlp_ratio)
        _linear(out, f"{blk}.mlp.c_proj", w * cfg.mlp_ratio, w)
        _norm(out, f"{blk}.ln_2", w)
    _norm(out, f"{p}ln_final", w)
    return out


# Width of the demo / test models: 32 keeps GroupNorm(32) valid so they can be rendered.
TINY_WIDTH = 32


def t5_shapes(cfg: T5Config) -> dict[str, Shape]:
    out: dict[str, Shape] = {}
    p, d, inner = cfg.prefix, cfg.d_model, cfg.heads * cfg.d_kv
    out[f"{p}shared.weight"] = (cfg.vocab, d)
    if cfg.embed_tokens:
        out[f"{p}encoder.embed_tokens.weight"] = (cfg.vocab, d)
    for i in range(cfg.layers):
        blk = f"{p}encoder.block.{i}.layer"
        for proj in ("q", "k", "v"):
            out[f"{blk}.0.SelfAttention.{proj}.weight"] = (inner, d)
        out[f"{blk}.0.SelfAttention.o.weight"] = (d, inner)
        if i == 0:
            out[f"{blk}.0.SelfAttention.relative_attention_bias.weight"] = (cfg.buckets, cfg.heads)
        out[f"{blk}.0.layer_norm.weight"] = (d,)
        out[f"{blk}.1.DenseReluDense.wi_0.weight"] = (cfg.d_ff, d)
        out[f"{blk}.1.DenseReluDense.wi_1.weight"] = (cfg.d_ff, d)
        out[f"{blk}.1.DenseReluDense.wo.weight"] = (d, cfg.d_ff)
        out[f"{blk}.1.layer_norm.weight"] = (d,)
    out[f"{p}encoder.final_layer_norm.weight"] = (d,)
    return out
