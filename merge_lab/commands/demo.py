"""`merge-lab demo`: build tiny checkpoints with the real SD1.5 and SDXL key sets, merge them, render a preview
of a merge and an X/Y/Z grid of merge ratios."""

from __future__ import annotations

import time
from pathlib import Path

from ..demo_models import base_state_dict, make_family, save_state_dict
from ..engine import merge_to_file
from ..layouts import layout_for
from ..progress import TqdmProgress
from ..recipe import Recipe
from .batch import format_table


def add_parser(sub):
    p = sub.add_parser("demo", help="build small demo checkpoints (real key sets), merge them, render a preview and an X/Y/Z grid")
    p.add_argument("--dir", default="demo-output", help="where models and outputs go")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--skip-previews", action="store_true", help="only build and merge (no images)")
    return p


def demo_recipes(arch: str, base: Path, fts: list[Path], out_dir: Path) -> list[tuple[str, Recipe]]:
    a, b, c = (str(p) for p in fts)
    mbw = "0.5" + ",0.2" * (12 if arch != "sdxl" else 9) + ",0.5" + ",0.8" * (12 if arch != "sdxl" else 9)
    return [
        ("weighted_sum", Recipe(models=[a, b], method="weighted_sum", alpha=0.5,
                                out=str(out_dir / f"{arch}-weighted_sum.safetensors"))),
        ("weighted_sum (per block)", Recipe(models=[a, b], method="weighted_sum", blocks=mbw, block={"VAE": 0},
                                            out=str(out_dir / f"{arch}-weighted_sum-mbw.safetensors"))),
        ("add_difference", Recipe(models=[a, b, str(base)], method="add_difference", alpha=1.0,
                                  out=str(out_dir / f"{arch}-add_difference.safetensors"))),
        ("slerp", Recipe(models=[a, c], method="slerp", alpha=0.5, out=str(out_dir / f"{arch}-slerp.safetensors"))),
    ]


def run(args) -> int:
    root = Path(args.dir)
    models_dir, out_dir = root / "models", root / "merged"
    rows = []
    for arch in ("sd1", "sdxl"):
        print(f"building tiny {arch} checkpoints (real key set) in {models_dir}")
        base, fts = make_family(arch, models_dir, prefix=f"demo-{arch}")
        for label, recipe in demo_recipes(arch, base, fts, out_dir):
            with TqdmProgress(Path(recipe.out).name, disable=args.no_progress, leave=False) as progress:
                result = merge_to_file(recipe, progress=progress)
            rows.append((arch, label, result.out, result.autov2, f"{result.seconds:.2f}"))
    print()
    print(format_table(("arch", "method", "output", "AutoV2", "seconds"), rows))
    print(f"\nmodels: {models_dir}/  merged: {out_dir}/  (inspect one with `merge-lab info FILE`)")
    if not args.skip_previews:
        demo_previews(root, models_dir, out_dir, progress=not args.no_progress)
    return 0


def demo_previews(root: Path, models_dir: Path, out_dir: Path, *, progress: bool) -> None:
    """A preview of one merged demo model and an X/Y/Z grid (alpha x image seed) of a merge in memory.

    The demo models are untrained, so the images are abstract patterns; what they show is that the
    pipeline renders the merged weights and how the image moves with the ratio."""
    from ..preview import PreviewSettings
    from ..tokenizer import vocabulary_files
    from ..xyz import parse_axis, run_xyz
    from .preview import save_previews

    vocabulary_files()  # a clear one-line error (how to build it) before any work
    start = time.perf_counter()
    print("\npreview of sd1-weighted_sum (rendered from the merged file):")
    settings = PreviewSettings(prompt="a lighthouse on a cliff at sunset", steps=4, width=128, height=128,
                               seed=7)
    save_previews(str(out_dir / "sd1-weighted_sum.safetensors"), settings, root / "previews")

    # An unrelated second model (another seed), so that the sweep from one to the other is visible.
    other = models_dir / "demo-sd1-other.safetensors"
    if not other.exists():
        save_state_dict(base_state_dict(layout_for("sd1", width=32), seed=1), other)
    recipe = Recipe(models=[str(models_dir / "demo-sd1-ft1.safetensors"), str(other)], method="weighted_sum")
    result = run_xyz(recipe, PreviewSettings(prompt=settings.prompt, steps=4, width=64, height=64),
                     root / "xyz", x=parse_axis("alpha=0,0.5,1"), y=parse_axis("seed=1,2"), progress=progress)
    print(f"X/Y/Z grid: {len(result.cells)} cells, {result.merges} merges, {result.cache_hits} cache hits")
    for grid in result.grids:
        print(f"  {grid}")
    print(f"  {result.json_path}  {result.csv_path}")
    print(f"previews took {time.perf_counter() - start:.1f} s")
