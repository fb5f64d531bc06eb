"""`merge-lab convert`: one model's everyday jobs — cast the dtype, prune, bake a VAE, fix the CLIP position ids,
import a .ckpt, leave keys out — written as a new .safetensors file in one streamed pass.

It is the merge engine's `passthrough` of one model, so every check of a merge applies (unknown keys refused,
NaN / inf found, nothing overwritten unless asked) and the recipe is recorded in the output like any other.
"""

from __future__ import annotations

import argparse

from merge_lab.cli.args import add_output_arguments, recipe_from_args
from merge_lab.cli.progress import print_written, write_with_progress
from merge_lab.engine.recipe import DTYPE_CHOICES
from merge_lab.errors import RecipeError


def add_parser(sub):
    p = sub.add_parser("convert", help="one model: cast dtype, prune, bake a VAE, fix position ids, import a .ckpt, "
                                       "discard keys", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="the checkpoint (.safetensors, or a .ckpt / .pt read with torch's weights-only "
                                 "loader)")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="cast every float key (default: each key keeps its own; "
                                                           "fp8 saturates)")
    p.add_argument("--prune", action="store_const", const=True,
                   help="drop training leftovers: EMA copies (model_ema.*), DDPM schedule buffers, a VAE's "
                        "training loss (docs/methods.md, 'convert')")
    add_output_arguments(p)
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args) -> int:

    args.models, args.method = [args.model], "passthrough"
    recipe = recipe_from_args(args)
    if not recipe.out:
        raise RecipeError("no output file given (--out)")
    result = write_with_progress(recipe, no_progress=args.no_progress, overwrite=args.overwrite)
    print_written(result, f"{result.arch}: {result.keys} keys, {result.seconds:.2f} s")
    return 0
