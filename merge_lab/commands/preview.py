"""`merge-lab preview`: render images from a checkpoint file (--model) or from a recipe merged in memory."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from ..errors import RecipeError
from ..progress import TqdmProgress


def add_render_arguments(p: argparse.ArgumentParser, *, seed_axis_note: bool = False) -> None:
    """The image options shared by `preview`, `merge --preview` and `xyz` (defaults: PreviewSettings')."""
    from ..preview import DTYPE_CHOICES, PREDICTION_CHOICES, SAMPLERS, PreviewSettings

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


def settings_from_args(args):
    from ..preview import PreviewSettings

    settings = PreviewSettings(prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.image_seed,
                               steps=args.steps, width=args.width, height=args.height, sampler=args.sampler,
                               cfg_scale=args.cfg_scale, batch_size=args.batch_size, dtype=args.preview_dtype,
                               device=args.preview_device, prediction=args.prediction)
    return settings.resolved()


def save_previews(source, settings, folder: Path) -> list[Path]:
    """Render `source` (a MergeResult or a checkpoint path) and save PNGs with their metadata into `folder`."""
    from ..preview import image_file_name, parse_infotext, render, render_merge, save_png

    start = time.perf_counter()
    if isinstance(source, (str, Path)):
        images = render(source, settings=settings)
    else:
        images = render_merge(source, settings, consume=True)
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
    from .merge import add_recipe_arguments

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
    from ..engine import merge_to_state_dict
    from .merge import recipe_from_args

    settings = settings_from_args(args)
    folder = Path(args.preview_dir or "previews")
    if args.model:
        if args.recipe or args.models:
            raise RecipeError("give either --model FILE or a recipe (--models / --recipe), not both")
        save_previews(args.model, settings, folder)
        return 0
    recipe = recipe_from_args(args)
    recipe.out = None  # previews never save the merged model: use `merge --preview --out` for that
    with TqdmProgress("merge (in memory)", disable=args.no_progress) as bar:
        result = merge_to_state_dict(recipe, progress=bar)
    print(f"merged in memory: {result.arch} {result.method}, {result.keys} keys, {result.seconds:.2f} s, "
          f"recipe hash {result.fingerprint}")
    save_previews(result, settings, folder)
    return 0
