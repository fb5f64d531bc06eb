"""`merge-lab xyz`: a labelled grid of previews over up to three axes of merge and render settings."""

from __future__ import annotations

import argparse

from merge_lab.errors import RecipeError


def add_parser(sub):
    from merge_lab.cli.args import add_recipe_arguments, add_render_arguments

    p = sub.add_parser(
        "xyz", help="X/Y/Z plot: a grid of previews over merge ratios, blocks, methods, seeds, prompts …",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Merge every distinct recipe of the grid once, render its cells, and draw one labelled grid "
                    "per Z value (plus xyz.json / xyz.csv of the cells).",
        epilog="axes (NAME=VALUES; values separated by ',' or by '|' when given, always '|' for blocks and "
               "models):\n"
               "  alpha=0.2,0.5,0.8        block:IN04=0,0.5,1      blocks=GRAD_V|FLAT_25\n"
               "  method=weighted_sum,slerp param:NAME=…          merge_seed=0,1\n"
               "  models=a.safetensors,b.safetensors|a.safetensors,c.safetensors\n"
               "  seed=1-4   prompt=a cat|a dog   negative_prompt=…   steps=10,20   cfg=5,7   sampler=euler,ddim\n"
               "ranges: 0-1[5] (5 values), 0.2-1(+0.2) (a step), 1-4 (integers)\n"
               "seed, prompt, negative_prompt, steps, cfg and sampler never re-merge.")
    p.add_argument("--x", required=True, metavar="AXIS=VALUES", help="columns")
    p.add_argument("--y", metavar="AXIS=VALUES", help="rows")
    p.add_argument("--z", metavar="AXIS=VALUES", help="one grid per value")
    p.add_argument("--out-dir", dest="out_dir", default="xyz-output", help="output folder (default: xyz-output)")
    p.add_argument("--min-cell", dest="min_cell", type=int, default=128,
                   help="small images are scaled up (nearest) to at least this many pixels in the grid")
    add_recipe_arguments(p, include_out=False)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_render_arguments(p, seed_axis_note=True)
    return p


def run(args) -> int:
    from merge_lab.cli.args import recipe_from_args, settings_from_args
    from merge_lab.plot.xyz import parse_axis, run_xyz

    axes = {name: parse_axis(getattr(args, name), f"--{name}") if getattr(args, name) else None
            for name in ("x", "y", "z")}
    if args.min_cell < 1 or args.min_cell > 2048:
        raise RecipeError(f"--min-cell must be from 1 to 2048, got {args.min_cell}")
    settings = settings_from_args(args)
    recipe = recipe_from_args(args)
    result = run_xyz(recipe, settings, args.out_dir, **axes, progress=not args.no_progress,
                     min_cell=args.min_cell, components=args.preview_with)
    print(f"{len(result.cells)} cells, {result.merges} merge(s), {result.cache_hits} cache hit(s), "
          f"{result.seconds:.1f} s")
    for grid in result.grids:
        print(f"  grid  {grid}")
    print(f"  cells {result.json_path}  {result.csv_path}")
    return 0
