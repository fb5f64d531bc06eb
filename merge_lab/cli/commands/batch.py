"""`merge-lab batch`: many recipes one after another; a failing recipe is reported, the others still run."""

from __future__ import annotations

import time
from pathlib import Path

from merge_lab.cli.progress import TqdmProgress
from merge_lab.cli.tables import format_table
from merge_lab.engine import Recipe, merge_to_file
from merge_lab.errors import MergeLabError, RecipeError

RECIPE_SUFFIXES = (".yaml", ".yml", ".json")


def collect(paths: list[str]) -> list[Path]:
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found.extend(sorted(q for q in p.iterdir() if q.suffix.lower() in RECIPE_SUFFIXES))
        else:
            found.append(p)
    return found


def add_parser(sub):
    p = sub.add_parser("batch", help="run many recipe files (or folders of them) one after another")
    p.add_argument("recipes", nargs="+", metavar="RECIPE", help="recipe files or folders of .yaml/.json")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist (refused otherwise)")
    return p


def run(args) -> int:
    files = collect(args.recipes)
    if not files:
        raise RecipeError("no recipe files found")
    rows = []
    for path in files:
        start = time.perf_counter()
        try:
            recipe = Recipe.load(path)
            if not recipe.out:
                raise RecipeError("recipe has no `out` field", path=path)
            with TqdmProgress(f"{path.name}", disable=args.no_progress) as progress:
                result = merge_to_file(recipe, progress=progress, overwrite=args.overwrite)
            rows.append((path.name, result.out, result.autov2, f"{result.seconds:.2f}", "ok"))
        except MergeLabError as e:
            rows.append((path.name, "-", "-", f"{time.perf_counter() - start:.2f}", f"FAILED: {e}"))
    print()
    print(format_table(("recipe", "output", "AutoV2", "seconds", "status"), rows))
    failed = sum(1 for r in rows if r[-1] != "ok")
    print(f"\n{len(rows) - failed} merged, {failed} failed")
    return 1 if failed else 0
