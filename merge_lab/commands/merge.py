"""`merge-lab merge`: one recipe, from flags and/or a recipe file, to a .safetensors file."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ..engine import MergePlan, build_metadata, merge_to_file, merge_to_state_dict, prepare
from ..errors import CheckpointError, MergeLabError, RecipeError
from ..hashing import autov2, remember_sha256
from ..progress import TqdmProgress
from ..recipe import (
    DTYPE_CHOICES,
    MISSING_CHOICES,
    NONFINITE_CHOICES,
    PRECISION_CHOICES,
    Recipe,
    check_output_path,
)
from ..safetensors_io import EXISTS_MESSAGE, SafetensorsWriter, resumable_path_for
from .preview import add_render_arguments, save_previews, settings_from_args


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
    p.add_argument("--block", action="append", type=_name_value, metavar="NAME=X",
                   help="one block's ratio (IN04, M00, OUT11, TIME, OUT, VAE, TE1, TE2, BASE); repeatable")
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
    if include_out:
        p.add_argument("--out", help="output .safetensors file")


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    recipe = Recipe.load(args.recipe) if getattr(args, "recipe", None) else Recipe()
    simple = ("models", "base", "method", "alpha", "blocks", "seed", "dtype", "prune", "precision", "device",
              "threads", "memory_budget", "missing", "nonfinite", "out")
    for name in simple:
        value = getattr(args, name, None)
        if value is not None:
            setattr(recipe, name, value)
    if getattr(args, "block", None):
        recipe.block = {**recipe.block, **{k: _float(k, v) for k, v in args.block}}
    if getattr(args, "param", None):
        recipe.params = {**recipe.params, **dict(args.param)}
    if getattr(args, "weights", None):
        recipe.weights = [_float("weights", w) for w in args.weights.split(",") if w.strip()]
    return recipe


def _float(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise RecipeError(f"{name}: {value!r} is not a number") from None


def add_parser(sub):
    p = sub.add_parser("merge", help="merge checkpoints into a new .safetensors file",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_recipe_arguments(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace the output file if it exists (refused "
                                                             "otherwise, before anything is merged)")
    p.add_argument("--resume", action="store_true",
                   help="keep the partial output (.OUT.partial beside it) if the merge stops, and continue the "
                        "partial output of the same merge if there is one")
    p.add_argument("--preview", action="store_true",
                   help="merge in memory and render preview image(s) from the merged weights straight away "
                        "(the model is also saved when --out is given)")
    add_render_arguments(p)
    return p


def run(args) -> int:
    recipe = recipe_from_args(args)
    if args.preview:
        return _merge_and_preview(recipe, args)
    if not recipe.out:
        raise RecipeError("no output file given (--out)")
    with TqdmProgress(recipe.out, disable=args.no_progress) as progress:
        try:
            result = merge_to_file(recipe, progress=progress, resume=args.resume, overwrite=args.overwrite,
                                   notify=lambda note: print(note, file=sys.stderr))
        except (KeyboardInterrupt, MergeLabError) as e:
            partial = resumable_path_for(Path(recipe.out))
            if args.resume and partial.exists():
                e.partial_kept = str(partial)
                print(f"partial output kept: {partial}; run the same command with --resume to continue",
                      file=sys.stderr)
            raise
    _print_result(result)
    return 0


def _print_result(result) -> None:
    print(f"wrote {result.out}")
    print(f"  {result.arch} {result.method}, {result.keys} keys, {result.seconds:.2f} s, "
          f"recipe hash {result.fingerprint}")
    print(f"  sha256 {result.sha256}")
    print(f"  AutoV2 {result.autov2}")


def save_state_dict(plan: MergePlan, state: dict, out: str, *, overwrite: bool = False) -> str:
    """Write an in-memory merge with the same header and metadata as merge_to_file; returns its sha256."""
    writer = SafetensorsWriter(out, plan.output_entries(), build_metadata(plan, Path(out).stem), overwrite=overwrite)
    with writer:
        for task in plan.tasks:
            writer.write(task.key, state[task.key])
        sha = writer.finish()
    remember_sha256(out, sha)
    return sha


def _merge_and_preview(recipe: Recipe, args) -> int:
    settings = settings_from_args(args)  # bad preview options fail before the merge
    if recipe.out and not args.overwrite and os.path.lexists(recipe.out):
        check_output_path(recipe.out, [*recipe.expanded_models(), *([recipe.base] if recipe.base else [])])
        raise CheckpointError(EXISTS_MESSAGE, path=recipe.out)  # before the merge, not after it
    with prepare(recipe) as plan, TqdmProgress(recipe.out or "merge (in memory)", disable=args.no_progress) as bar:
        result = merge_to_state_dict(recipe, plan=plan, progress=bar)
        if recipe.out:
            result.sha256 = save_state_dict(plan, result.state_dict, recipe.out, overwrite=args.overwrite)
            result.autov2 = autov2(result.sha256)
            result.out = recipe.out
    if result.out:
        _print_result(result)
    else:
        print(f"merged in memory (not saved): {result.arch} {result.method}, {result.keys} keys, "
              f"{result.seconds:.2f} s, recipe hash {result.fingerprint}")
    default_dir = Path(result.out).parent / "previews" if result.out else Path("previews")
    save_previews(result, settings, Path(args.preview_dir) if args.preview_dir else default_dir)
    return 0
