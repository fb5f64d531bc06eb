"""diffusers / transformers configs for the previews, generated from the SAME layout objects as the key sets.

One generator serves the real architectures and the tiny demo / test models: the shapes come from
:mod:`merge_lab.archs.layouts` (so a config can never drift from the key layout the engine merges), and the few
facts that are not shapes (native image size, prediction type, default scheduler, VAE scaling factor) come
from the architecture's release record (:class:`merge_lab.archs.PreviewVariant`). The real configs are
shipped as JSON folders under ``merge_lab/archs/configs/<variant>/``
(no weights, a few KB); ``python -m merge_lab.preview.diffusers_configs`` rewrites them and a test checks that the
shipped files equal the generator's output. Tiny models' configs are generated on the fly.

A shipped folder plus the CLIP tokenizer files (built at set-up, see :mod:`merge_lab.preview.tokenizer`) is also a
valid ``config=`` folder for diffusers' ``from_single_file(..., local_files_only=True)``: see
:func:`write_config_folder`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from merge_lab import archs
from merge_lab.archs import layout_for
from merge_lab.archs.layouts import CLIPConfig, ModelLayout, OpenCLIPConfig, T5Config, UNetConfig, VAEConfig
from merge_lab.archs.registry import PreviewVariant

CONFIGS_DIR = Path(__file__).parent.parent / "archs" / "configs"

_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}




def unet_config(cfg: UNetConfig, variant: PreviewVariant, layout: ModelLayout) -> dict[str, Any]:
    channels = [cfg.model_channels * m for m in cfg.channel_mult]
    attention = [d > 0 for d in cfg.transformer_depth]
    # diffusers takes one transformer depth per level (levels without attention ignore theirs) and gives
    # the middle block the last level's depth.
    depths = [max(d, 1) for d in cfg.transformer_depth]
    if cfg.middle_depth != depths[-1]:
        raise ValueError(f"middle depth {cfg.middle_depth} != last level depth {depths[-1]}: not expressible "
                         "in a diffusers UNet2DConditionModel config")
    if cfg.num_heads is not None:
        heads: int | list[int] = cfg.num_heads  # diffusers' (misnamed) attention_head_dim = number of heads
    else:
        heads = [c // cfg.head_channels for c in channels]
    config: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": heads,
        "block_out_channels": channels,
        "center_input_sample": False,
        "cross_attention_dim": cfg.context_dim,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": cfg.in_channels,
        "layers_per_block": cfg.num_res_blocks,
        "mid_block_scale_factor": 1,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": cfg.out_channels,
        # in latent pixels: the VAE downsamples by 2 per level but the last
        "sample_size": variant.image_size // 2 ** (len(layout.vae.ch_mult) - 1),
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention)],
        "upcast_attention": variant.upcast_attention,
        "use_linear_projection": cfg.use_linear_proj,
    }
    if any(d != 1 for d in depths):
        config["transformer_layers_per_block"] = depths
    if cfg.adm_in_channels:
        # SDXL: label_emb takes the pooled text embedding plus 6 size / crop values, each embedded
        # sinusoidally with addition_time_embed_dim channels.
        pooled = layout.text_encoders[-1].projection_dim
        time_dim, rest = divmod(cfg.adm_in_channels - pooled, 6)
        if rest:
            raise ValueError(f"adm_in_channels {cfg.adm_in_channels} is not pooled {pooled} + 6 x time dim")
        config.update({
            "addition_embed_type": "text_time",
            "addition_embed_type_num_heads": 64,
            "addition_time_embed_dim": time_dim,
            "projection_class_embeddings_input_dim": cfg.adm_in_channels,
        })
    return dict(sorted(config.items()))


def vae_config(cfg: VAEConfig, variant: PreviewVariant) -> dict[str, Any]:
    levels = len(cfg.ch_mult)
    return {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "force_upcast": variant.vae_force_upcast,
        "in_channels": cfg.in_channels,
        "latent_channels": cfg.z_channels,
        "layers_per_block": cfg.num_res_blocks,
        "norm_num_groups": 32,
        "out_channels": cfg.in_channels,
        "sample_size": variant.image_size,
        "scaling_factor": variant.vae_scaling_factor,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
    }


def text_encoder_config(te: CLIPConfig | OpenCLIPConfig, *, with_projection: bool, penultimate: bool = False
                        ) -> dict[str, Any]:
    if isinstance(te, CLIPConfig):  # OpenAI CLIP ViT-L/14 text tower
        hidden, intermediate, layers, act, projection = te.hidden, te.intermediate, te.layers, te.hidden_act, te.hidden
    else:  # OpenCLIP ViT-H / ViT-bigG text tower
        hidden, intermediate, layers, act = te.width, te.width * te.mlp_ratio, te.layers, "gelu"
        projection = te.projection_dim
        if penultimate:
            # SD2 conditions on the penultimate layer: diffusers drops the last block (the converter skips
            # resblocks.<last>), so the text encoder has one layer fewer than the checkpoint.
            layers -= 1
    return {
        "architectures": ["CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"],
        "attention_dropout": 0.0,
        # The released configs keep CLIP's original token ids (bos 0, eos 2, pad 1): transformers then
        # pools at the highest token id, which is <|endoftext|> (49407) with the real vocabulary.
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": act,
        "hidden_size": hidden,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": te.positions,
        "model_type": "clip_text_model",
        "num_attention_heads": te.heads,
        "num_hidden_layers": layers,
        "pad_token_id": 1,
        "projection_dim": projection,
        "vocab_size": te.vocab,
    }


def tokenizer_config(pad_token: str) -> dict[str, Any]:
    return {
        "add_prefix_space": False,
        "bos_token": "<|startoftext|>",
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": "<|endoftext|>",
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": "<|endoftext|>",
    }


def scheduler_config(variant: PreviewVariant) -> dict[str, Any]:
    config: dict[str, Any] = {"_class_name": variant.scheduler, **_BETAS, "clip_sample": False,
                              "prediction_type": variant.prediction_type, "set_alpha_to_one": False,
                              "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
                              "trained_betas": None}
    if variant.scheduler == "EulerDiscreteScheduler":
        config.update({"interpolation_type": "linear", "sample_max_value": 1.0, "use_karras_sigmas": False})
    return dict(sorted(config.items()))


# The pad token of each tokenizer: OpenAI CLIP pads with <|endoftext|>, OpenCLIP with "!" (token id 0).
def _pad_token(te: CLIPConfig | OpenCLIPConfig) -> str:
    return "<|endoftext|>" if isinstance(te, CLIPConfig) else "!"


def pipeline_configs(layout, variant: PreviewVariant | str) -> dict[str, dict[str, Any]]:
    """Every config file of a diffusers pipeline folder for `layout`, keyed by its relative path."""
    variant = archs.preview_variants()[variant] if isinstance(variant, str) else variant
    if variant.arch != layout.arch:
        raise ValueError(f"variant {variant.name} is {variant.arch}, the layout is {layout.arch}")
    support = archs.get(layout.arch).preview
    if support.converter != "ldm":
        return flow_pipeline_configs(layout, variant)
    files: dict[str, dict[str, Any]] = {
        "unet/config.json": unet_config(layout.unet, variant, layout),
        "vae/config.json": vae_config(layout.vae, variant),
        "scheduler/scheduler_config.json": scheduler_config(variant),
    }
    te_names = ["text_encoder", "text_encoder_2"][: len(layout.text_encoders)]
    tok_names = ["tokenizer", "tokenizer_2"][: len(layout.text_encoders)]
    for i, (te, te_name, tok_name) in enumerate(zip(layout.text_encoders, te_names, tok_names)):
        files[f"{te_name}/config.json"] = text_encoder_config(te, with_projection=support.text_encoder_projection[i],
                                                              penultimate=support.penultimate_text_layer)
        tok = tokenizer_config(_pad_token(te))
        files[f"{tok_name}/tokenizer_config.json"] = tok
        files[f"{tok_name}/special_tokens_map.json"] = {k: tok[k] for k in
                                                        ("bos_token", "eos_token", "pad_token", "unk_token")}
    index: dict[str, Any] = {
        "_class_name": support.pipeline,
        "scheduler": ["diffusers", variant.scheduler],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    for i, (te_name, tok_name) in enumerate(zip(te_names, tok_names)):
        with_projection = support.text_encoder_projection[i]
        index[te_name] = ["transformers", "CLIPTextModelWithProjection" if with_projection else "CLIPTextModel"]
        index[tok_name] = ["transformers", "CLIPTokenizer"]
    index.update({k: [None, None] if v is None else v for k, v in support.pipeline_options.items()})
    files["model_index.json"] = dict(sorted(index.items()))
    return dict(sorted(files.items()))


# ----------------------------------------------------------------------------------------------------
# flow-matching transformers: Flux.1, Chroma, SD3.x
# ----------------------------------------------------------------------------------------------------

def rope_axes(head_dim: int) -> list[int]:
    """Flux's rotary axes (16, 56, 56) for 128-wide heads: the first an eighth of the head (at least 2), the
    two image axes equal, each even, summing to the head width (the same rule for tiny models)."""
    for first in range(max(2, head_dim // 8 // 2 * 2), head_dim, 2):
        if (head_dim - first) % 4 == 0:
            return [first, (head_dim - first) // 2, (head_dim - first) // 2]
    raise ValueError(f"no rotary axes for {head_dim}-wide heads")


def flux_transformer_config(layout) -> dict[str, Any]:
    cfg = layout.transformer
    head_dim = cfg.hidden // cfg.heads
    config: dict[str, Any] = {
        "attention_head_dim": head_dim,
        "axes_dims_rope": rope_axes(head_dim),
        "in_channels": cfg.in_channels,
        "joint_attention_dim": cfg.context_dim,
        "num_attention_heads": cfg.heads,
        "num_layers": cfg.depth,
        "num_single_layers": cfg.depth_single,
        "patch_size": 1,
    }
    if cfg.approximator is not None:  # Chroma
        in_dim, hidden, layers = cfg.approximator
        config.update({"_class_name": "ChromaTransformer2DModel", "approximator_hidden_dim": hidden,
                       "approximator_layers": layers, "approximator_num_channels": in_dim})
    else:
        config.update({"_class_name": "FluxTransformer2DModel", "guidance_embeds": cfg.guidance,
                       "pooled_projection_dim": cfg.vec_dim})
    return dict(sorted(config.items()))


def sd3_transformer_config(layout, variant: PreviewVariant) -> dict[str, Any]:
    cfg = layout.mmdit
    heads = cfg.width // cfg.head_dim
    return {
        "_class_name": "SD3Transformer2DModel",
        "attention_head_dim": cfg.head_dim,
        "caption_projection_dim": cfg.width,
        "dual_attention_layers": list(cfg.attn2_layers),
        "in_channels": cfg.in_channels,
        "joint_attention_dim": cfg.context_dim,
        "num_attention_heads": heads,
        "num_layers": cfg.depth,
        "out_channels": cfg.in_channels,
        "patch_size": cfg.patch_size,
        "pooled_projection_dim": cfg.adm_in_channels,
        "pos_embed_max_size": cfg.pos_embed_max_size,
        "qk_norm": "rms_norm" if cfg.qk_norm else None,
        "sample_size": variant.image_size // 2 ** (len(layout.vae.ch_mult) - 1),
    }


def t5_config(te: T5Config) -> dict[str, Any]:
    """T5 v1.1 encoder (google/t5-v1_1-xxl: gated GELU, no biases, untied head)."""
    return {
        "architectures": ["T5EncoderModel"],
        "d_ff": te.d_ff,
        "d_kv": te.d_kv,
        "d_model": te.d_model,
        "decoder_start_token_id": 0,
        "dense_act_fn": "gelu_new",
        "dropout_rate": 0.1,
        "eos_token_id": 1,
        "feed_forward_proj": "gated-gelu",
        "initializer_factor": 1.0,
        "is_encoder_decoder": True,
        "is_gated_act": True,
        "layer_norm_epsilon": 1e-06,
        "model_type": "t5",
        "num_decoder_layers": te.layers,
        "num_heads": te.heads,
        "num_layers": te.layers,
        "pad_token_id": 0,
        "relative_attention_max_distance": 128,
        "relative_attention_num_buckets": te.buckets,
        "tie_word_embeddings": False,
        "vocab_size": te.vocab,
    }


def t5_tokenizer_config(max_length: int) -> dict[str, Any]:
    return {"eos_token": "</s>", "extra_ids": 100, "model_max_length": max_length, "pad_token": "<pad>",
            "tokenizer_class": "T5Tokenizer", "unk_token": "<unk>"}


def flow_scheduler_config(variant: PreviewVariant) -> dict[str, Any]:
    return {"_class_name": variant.scheduler, "base_image_seq_len": 256, "base_shift": 0.5,
            "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": variant.flow_shift,
            "use_dynamic_shifting": variant.dynamic_shift}


def flow_vae_config(cfg: VAEConfig, variant: PreviewVariant) -> dict[str, Any]:
    config = vae_config(cfg, variant)
    config.update({"mid_block_add_attention": True, "shift_factor": variant.vae_shift_factor,
                   "use_post_quant_conv": cfg.quant_conv, "use_quant_conv": cfg.quant_conv})
    return dict(sorted(config.items()))


def flow_text_encoders(layout) -> list:
    """The layout's text encoders in the pipeline's order (text_encoder, text_encoder_2, ...)."""
    return list(layout.text_encoders)


def flow_pipeline_configs(layout, variant: PreviewVariant) -> dict[str, dict[str, Any]]:
    support = archs.get(layout.arch).preview
    transformer = sd3_transformer_config(layout, variant) if support.converter == "sd3" else \
        flux_transformer_config(layout)
    files: dict[str, dict[str, Any]] = {
        "transformer/config.json": transformer,
        "vae/config.json": flow_vae_config(layout.vae, variant),
        "scheduler/scheduler_config.json": flow_scheduler_config(variant),
    }
    index: dict[str, Any] = {"_class_name": support.pipeline, "scheduler": ["diffusers", variant.scheduler],
                             "transformer": ["diffusers", transformer["_class_name"]],
                             "vae": ["diffusers", "AutoencoderKL"]}
    for i, te in enumerate(flow_text_encoders(layout)):
        suffix = "" if i == 0 else f"_{i + 1}"
        if isinstance(te, T5Config):
            files[f"text_encoder{suffix}/config.json"] = t5_config(te)
            tok = t5_tokenizer_config(variant.max_sequence_length)
            index[f"text_encoder{suffix}"] = ["transformers", "T5EncoderModel"]
            index[f"tokenizer{suffix}"] = ["transformers", "T5TokenizerFast"]
        else:
            with_projection = support.text_encoder_projection[i]
            files[f"text_encoder{suffix}/config.json"] = text_encoder_config(te, with_projection=with_projection)
            # SD3's second CLIP (OpenCLIP ViT-bigG) pads with "!" as SDXL's does.
            tok = tokenizer_config("!" if te.hidden_act == "gelu" else "<|endoftext|>")
            index[f"text_encoder{suffix}"] = ["transformers", "CLIPTextModelWithProjection" if with_projection
                                              else "CLIPTextModel"]
            index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
        files[f"tokenizer{suffix}/tokenizer_config.json"] = tok
        files[f"tokenizer{suffix}/special_tokens_map.json"] = {k: tok[k] for k in tok if k.endswith("_token")}
    index.update({k: [None, None] if v is None else v for k, v in support.pipeline_options.items()})
    files["model_index.json"] = dict(sorted(index.items()))
    return dict(sorted(files.items()))


def real_configs(name: str) -> dict[str, dict[str, Any]]:
    """The generated configs of a released architecture (what merge_lab/archs/configs/<name>/ holds)."""
    variant = archs.preview_variants()[name]
    return pipeline_configs(layout_for(variant.arch), variant)


def load_shipped(name: str) -> dict[str, dict[str, Any]]:
    """The shipped config folder merge_lab/archs/configs/<name>/ as {relative path: config}."""
    folder = CONFIGS_DIR / name
    out = {}
    for path in sorted(folder.rglob("*.json")):
        out[path.relative_to(folder).as_posix()] = json.loads(path.read_text(encoding="utf-8"))
    return out


def _dump(config: dict[str, Any]) -> str:
    return json.dumps(config, indent=2) + "\n"


def write_config_folder(dest: str | os.PathLike, layout: ModelLayout, variant: PreviewVariant | str, *,
                        with_tokenizer: bool = True) -> Path:
    """Write a complete diffusers config folder (no weights) for `layout`; with the CLIP vocabulary files when
    `with_tokenizer` (they must have been built, see merge_lab.preview.tokenizer), so that diffusers'
    ``from_single_file(path, config=dest, local_files_only=True)`` can load a checkpoint with it."""
    dest = Path(dest)
    files = pipeline_configs(layout, variant)
    for rel, config in files.items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_dump(config), encoding="utf-8")
    if with_tokenizer:
        from merge_lab.preview.t5_tokenizer import t5_tokenizer_dir
        from merge_lab.preview.tokenizer import vocabulary_files

        for rel, config in files.items():
            if rel.endswith("/tokenizer_config.json"):
                folder = (dest / rel).parent
                if config["tokenizer_class"] == "T5Tokenizer":
                    t5_tokenizer = t5_tokenizer_dir() / "tokenizer.json"
                    (folder / "tokenizer.json").write_bytes(t5_tokenizer.read_bytes())
                else:
                    for source in vocabulary_files():
                        (folder / source.name).write_bytes(source.read_bytes())
    return dest


def write_shipped(root: str | os.PathLike = CONFIGS_DIR) -> list[Path]:
    """(Re)write merge_lab/archs/configs/<variant>/ for every released variant (configs only, no vocabulary)."""
    written = []
    for name, variant in archs.preview_variants().items():
        written.append(write_config_folder(Path(root) / name, layout_for(variant.arch), variant,
                                           with_tokenizer=False))
    return written


if __name__ == "__main__":
    for folder in write_shipped():
        print(f"wrote {folder}")
