"""The command-line options shared by several commands: a recipe from flags (merge, preview, xyz) and the
image options (preview, merge --preview, xyz)."""

from __future__ import annotations

import argparse

from merge_lab.engine.recipe import (
    DTYPE_CHOICES,
    LORA_UNMATCHED_CHOICES,
    MISSING_CHOICES,
    NONFINITE_CHOICES,
    PRECISION_CHOICES,
    Recipe,
    adjust_values,
)
from merge_lab.errors import RecipeError


def _pattern_value(text: str) -> tuple[str, str]:
    """REGEX=X, split at the last '=' (a regex may hold one)."""
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"expected REGEX=RATIO, got {text!r}")
    return pattern, value.strip()


def _name_value(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name.strip(), value.strip()



def add_recipe_arguments(p: argparse.ArgumentParser, *, include_out: bool = True) -> None:
    """The recipe flags; every default is None so that only the flags given override a recipe file."""
    p.add_argument("--recipe", help="recipe file (YAML or JSON, same fields); flags override it")
    p.add_argument("--models", nargs="+", metavar="MODEL", help="input checkpoints (globs and folders allowed)")
    p.add_argument("--base", help="base model for task-vector methods (or C of add_difference)")
    p.add_argument("--method", help="merge method (see `merge-lab methods`)")
    p.add_argument("--alpha", type=float, help="global ratio α (default: the method's own, as published: "
                                                     "1 for task-vector methods and Model Stock, 0.5 for "
                                                     "weighted_sum and slerp; see `merge-lab methods`)")
    p.add_argument("--blocks", help="26 (SD1/SD2) or 20 (SDXL) comma-separated block ratios "
                                    "(BASE, IN.., M00, OUT..), or a preset name")
    p.add_argument("--beta-blocks", dest="beta_blocks",
                   help="β per block for a method with a beta parameter (triple_sum, sum_twice, tensor_swap, "
                        "extract: SuperMerger's weights B), in the forms of --blocks; unset blocks: --param beta")
    p.add_argument("--block", action="append", type=_name_value, metavar="NAME=X",
                   help="one block's ratio (IN04, M00, OUT11, TIME, OUT, VAE, TE1, TE2, BASE); repeatable")
    p.add_argument("--key", action="append", type=_pattern_value, metavar="REGEX=X",
                   help="elemental ratio: every merged key whose name the regex matches gets ratio X, on top of the "
                        "block ratios (e.g. 'cond_stage_model=0': the text encoder from A); repeatable, the last "
                        "match wins")
    p.add_argument("--param", action="append", type=_name_value, metavar="NAME=VALUE",
                   help="method hyper-parameter; repeatable")
    p.add_argument("--weights", help="comma-separated per-model weights; in task-vector methods a negative "
                                     "weight subtracts that model's task vector (--weights 1,-1)")
    p.add_argument("--seed", type=int, help="seed of the drop masks (default 0)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="cast every float key to this dtype (default: each key "
                                                           "keeps the first model's dtype; fp8 saturates)")
    p.add_argument("--prune", action="store_const", const=True, help="drop training leftovers: EMA copies "
                   "(model_ema.*), DDPM schedule buffers, a VAE's training loss (kept by default, unmerged)")
    p.add_argument("--precision", choices=PRECISION_CHOICES, help="compute dtype (default float32)")
    p.add_argument("--device", help="cpu or cuda (default cpu)")
    p.add_argument("--threads", type=int, help="worker threads (default: cores, at most 4)")
    p.add_argument("--memory-budget", dest="memory_budget", help="memory for tensors in flight, e.g. 2GB")
    p.add_argument("--missing", choices=MISSING_CHOICES, help="a key missing in some model: error (default) "
                                                               "or copy it from the first model that has it")
    p.add_argument("--nonfinite", choices=NONFINITE_CHOICES, help="NaN/inf in an input: error (default), "
                                                                   "replace by the first model's value, or by 0")
    add_output_arguments(p)
    add_lora_arguments(p)
    if include_out:
        p.add_argument("--out", help="output .safetensors file")


def add_output_arguments(p: argparse.ArgumentParser) -> None:
    """What goes into the output besides the merged weights: a baked VAE, keys left out."""
    g = p.add_argument_group("the output's keys")
    g.add_argument("--vae", help="a standalone VAE file (LDM names as sd-vae-ft-mse / sdxl_vae ship, or diffusers "
                                 "names) written in place of the result's VAE")
    g.add_argument("--discard", action="append", metavar="REGEX",
                   help="leave out the keys this regex matches (A1111's 'Discard weights with matching name'); "
                        "repeatable")
    g.add_argument("--keep", action="append", metavar="REGEX",
                   help="write only the keys some --keep regex matches (e.g. '^model\\.diffusion_model\\.' for "
                        "the UNet alone); repeatable, --discard still applies")
    g.add_argument("--adjust", metavar="IN,OUT,OUT2,CONTRAST,BRIGHTNESS,COL1,COL2,COL3",
                   help="SuperMerger's Adjust (SD1/SD2/SDXL): 8 comma-separated values that scale / shift the "
                        "UNet's first and last layers after the merge: detail IN, OUT, OUT2 (-6..6), contrast, "
                        "brightness, cyan-red, magenta-green, yellow-blue (-10..10); all 0: no change")


def add_lora_arguments(p: argparse.ArgumentParser, *, required: bool = False) -> None:
    g = p.add_argument_group("LoRAs baked into the result (in the same pass)")
    g.add_argument("--lora", action="append", metavar="FILE[:STRENGTH]", required=required,
                   help="a LoRA / LyCORIS file and its strength (default 1); repeatable, applied in order")
    g.add_argument("--lora-blocks", dest="lora_blocks", action="append", metavar="SPEC",
                   help="block weights of the LoRAs: our 26 / 20 / 61-value strings, the LoRA Block Weight "
                        "extension's 17 (SD1/SD2) / 12 (SDXL)-value strings, or a preset name (theirs: ALL, "
                        "INS, IND, INALL, MIDD, OUTD, OUTS, OUTALL, NONE, ALL0.5); one for every LoRA, or one "
                        "per --lora in order")
    g.add_argument("--lora-unmatched", dest="lora_unmatched", choices=LORA_UNMATCHED_CHOICES,
                   help="a LoRA module that matches no layer of the model: error (default, listing them) or "
                        "warn (bake the others)")


def lora_entries(args: argparse.Namespace) -> list[dict]:
    """--lora / --lora-blocks as recipe `loras` entries."""
    from merge_lab.lora import LoraSpec

    files = getattr(args, "lora", None) or []
    blocks = getattr(args, "lora_blocks", None) or []
    if blocks and len(blocks) not in (1, len(files)):
        raise RecipeError(f"--lora-blocks given {len(blocks)} times for {len(files)} --lora: give one for all, "
                          "or one per --lora")
    entries = []
    for i, text in enumerate(files):
        spec = LoraSpec.parse(text)
        entry = {"path": spec.path, "strength": spec.strength}
        if blocks:
            entry["blocks"] = blocks[0] if len(blocks) == 1 else blocks[i]
        entries.append(entry)
    return entries



def recipe_from_args(args: argparse.Namespace) -> Recipe:
    recipe = Recipe.load(args.recipe) if getattr(args, "recipe", None) else Recipe()
    simple = ("models", "base", "method", "alpha", "blocks", "beta_blocks", "seed", "dtype", "prune", "precision", "device",
              "threads", "memory_budget", "missing", "nonfinite", "out")
    for name in simple:
        value = getattr(args, name, None)
        if value is not None:
            setattr(recipe, name, value)
    if getattr(args, "block", None):
        recipe.block = {**recipe.block, **{k: _float(k, v) for k, v in args.block}}
    if getattr(args, "key", None):
        key = dict(recipe.key)
        for pattern, value in args.key:
            key.pop(pattern, None)  # given again: it moves last, so it wins
            key[pattern] = _float(f"--key {pattern}", value)
        recipe.key = key
    if getattr(args, "param", None):
        recipe.params = {**recipe.params, **dict(args.param)}
    if getattr(args, "weights", None):
        recipe.weights = [_float("weights", w) for w in args.weights.split(",") if w.strip()]
    if getattr(args, "lora", None):
        recipe.loras = [*recipe.loras, *lora_entries(args)]
    elif getattr(args, "lora_blocks", None):
        raise RecipeError("--lora-blocks without --lora")
    if getattr(args, "lora_unmatched", None):
        recipe.lora_unmatched = args.lora_unmatched
    if getattr(args, "vae", None):
        recipe.vae = args.vae
    for name in ("discard", "keep"):
        if getattr(args, name, None):
            setattr(recipe, name, [*getattr(recipe, name), *getattr(args, name)])
    if getattr(args, "adjust", None) is not None:
        recipe.adjust = adjust_values(args.adjust)
    return recipe



def _float(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise RecipeError(f"{name}: {value!r} is not a number") from None



def add_render_arguments(p: argparse.ArgumentParser, *, seed_axis_note: bool = False) -> None:
    """The image options shared by `preview`, `merge --preview` and `xyz` (defaults: PreviewSettings')."""
    from merge_lab.preview.settings import DTYPE_CHOICES, PREDICTION_CHOICES, SAMPLERS, PreviewSettings

    d = PreviewSettings()
    g = p.add_argument_group("preview images")
    g.add_argument("--prompt", default=d.prompt, help="prompt")
    g.add_argument("--negative-prompt", dest="negative_prompt", default=d.negative_prompt, help="negative prompt")
    g.add_argument("--image-seed", dest="image_seed", type=int, default=d.seed,
                   help="image seed (-1: random)" + ("; every cell uses it unless seed is an axis"
                                                     if seed_axis_note else ""))
    g.add_argument("--steps", type=int, default=d.steps, help="sampling steps")
    g.add_argument("--width", type=int, help="image width (default: the model's native size)")
    g.add_argument("--height", type=int, help="image height (default: the model's native size)")
    g.add_argument("--sampler", default=d.sampler, help=f"sampler: {', '.join(SAMPLERS)} (or the web UI's names)")
    g.add_argument("--cfg-scale", dest="cfg_scale", type=float, default=d.cfg_scale, help="CFG scale")
    g.add_argument("--batch-size", dest="batch_size", type=int, default=d.batch_size,
                   help="images per render (seeds seed, seed+1, …)")
    g.add_argument("--preview-dtype", dest="preview_dtype", choices=DTYPE_CHOICES, default=d.dtype,
                   help="render dtype; auto: fp16 on CUDA, on CPU fp32 unless the fp32 weights exceed 8 GiB "
                        "(SDXL), then bf16")
    g.add_argument("--preview-device", dest="preview_device", default=d.device,
                   help="auto (CUDA when available), cpu or cuda[:N]")
    g.add_argument("--prediction", choices=PREDICTION_CHOICES, default=d.prediction,
                   help="what the UNet predicts; auto: the checkpoint's metadata, else the release's (SD2: "
                        "512-base epsilon or 768-v v_prediction by the web UI's test)")
    g.add_argument("--preview-dir", dest="preview_dir", help="where images go (default: previews/)")
    g.add_argument("--with", dest="preview_with", action="append", default=[], metavar="FILE",
                   help="Flux / Chroma / SD3: a file giving a component the checkpoint lacks or one to use "
                        "instead (ComfyUI's clip_l / clip_g / t5xxl text encoders, BFL's ae.safetensors VAE); "
                        "repeatable")



def settings_from_args(args):
    from merge_lab.preview.settings import PreviewSettings

    settings = PreviewSettings(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.image_seed,
                               steps=args.steps, width=args.width, height=args.height, sampler=args.sampler,
                               cfg_scale=args.cfg_scale, batch_size=args.batch_size, dtype=args.preview_dtype,
                               device=args.preview_device, prediction=args.prediction)
    return settings.resolved()
