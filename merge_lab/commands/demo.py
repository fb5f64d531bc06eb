"""`merge-lab demo`: build tiny checkpoints with the real SD1.5 and SDXL key sets and merge them."""

from __future__ import annotations

from pathlib import Path

from ..demo_models import make_family
from ..engine import merge_to_file
from ..progress import TqdmProgress
from ..recipe import Recipe
from .batch import format_table


def add_parser(sub):
    p = sub.add_parser("demo", help="build small demo checkpoints (real key sets) and merge them")
    p.add_argument("--dir", default="demo-output", help="where models and outputs go")
    p.add_argument("--no-progress", action="store_true")
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
    return 0
