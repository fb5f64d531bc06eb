"""`merge-lab preview`: render images from a checkpoint file (--model) or from a recipe merged in memory."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from merge_lab.cli.args import add_render_arguments, settings_from_args
from merge_lab.cli.progress import TqdmProgress
from merge_lab.errors import RecipeError


def save_previews(source, settings, folder: Path, components=()) -> list[Path]:
    """Render `source` (a MergeResult or a checkpoint path) and save PNGs with their metadata into `folder`;
    `components`: files giving a Flux / Chroma / SD3 model's text encoders or VAE (--with)."""
    from merge_lab.preview.infotext import image_file_name, parse_infotext, save_png
    from merge_lab.preview.pipeline import render, render_merge

    start = time.perf_counter()
    if isinstance(source, (str, Path)):
        images = render(source, settings=settings, components=components)
    else:
        images = render_merge(source, settings, consume=True, components=components)
    seconds = time.perf_counter() - start
    paths = []
    for image in images:
        fields = parse_infotext(image.info["parameters"])
        name = image_file_name(fields.get("Model") or "preview", int(fields["Seed"]))
        paths.append(save_png(image, folder / name))
    w, h = images[0].size
    print(f"rendered {len(images)} image(s) {w}x{h}, {settings.steps} steps {settings.sampler}, "
          f"CFG {settings.cfg_scale:g} in {seconds:.2f} s")
    for path in paths:
        print(f"  {path}")
    return paths


def add_parser(sub):
    from merge_lab.cli.args import add_recipe_arguments

    p = sub.add_parser("preview", help="render preview images from a checkpoint or a recipe merged in memory",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Render from a checkpoint file (--model FILE), or merge a recipe (flags and/or "
                                   "--recipe, as for `merge`) in memory and render from the merged weights; "
                                   "nothing but the images is written.")
    p.add_argument("--model", help="a checkpoint file to render from (instead of a recipe)")
    add_recipe_arguments(p, include_out=False)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_render_arguments(p)
    return p


def run(args) -> int:
    from merge_lab.cli.args import recipe_from_args
    from merge_lab.engine import merge_to_state_dict

    settings = settings_from_args(args)
    folder = Path(args.preview_dir or "previews")
    if args.model:
        if args.recipe or args.models:
            raise RecipeError("give either --model FILE or a recipe (--models / --recipe), not both")
        save_previews(args.model, settings, folder, args.preview_with)
        return 0
    recipe = recipe_from_args(args)
    recipe.out = None  # previews never save the merged model: use `merge --preview --out` for that
    with TqdmProgress("merge (in memory)", disable=args.no_progress) as bar:
        result = merge_to_state_dict(recipe, progress=bar)
    print(f"merged in memory: {result.arch} {result.method}, {result.keys} keys, {result.seconds:.2f} s, "
          f"recipe hash {result.fingerprint}")
    save_previews(result, settings, folder, args.preview_with)
    return 0
