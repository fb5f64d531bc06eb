"""`merge-lab merge`: one recipe, from flags and/or a recipe file, to a .safetensors file."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from merge_lab.cli.args import (
    add_recipe_arguments,
    add_render_arguments,
    recipe_from_args,
    settings_from_args,
)
from merge_lab.cli.commands.preview import save_previews
from merge_lab.cli.progress import TqdmProgress, print_written
from merge_lab.engine import MergePlan, build_metadata, merge_to_file, merge_to_state_dict, prepare
from merge_lab.engine.recipe import (
    Recipe,
    check_output_path,
)
from merge_lab.errors import CheckpointError, MergeLabError, RecipeError
from merge_lab.io.hashing import autov2, remember_sha256
from merge_lab.io.resume import resumable_path_for
from merge_lab.io.writer import EXISTS_MESSAGE, SafetensorsWriter


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
    print_written(result, f"{result.arch} {result.method}, {result.keys} keys, {result.seconds:.2f} s, "
                          f"recipe hash {result.fingerprint}")


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
    save_previews(result, settings, Path(args.preview_dir) if args.preview_dir else default_dir, args.preview_with)
    return 0
