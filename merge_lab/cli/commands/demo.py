"""`merge-lab demo`: build tiny checkpoints with the real SD1.5 and SDXL key sets, merge them with every
method, write the θ-per-block report (text, JSON, heatmap) of the fine-tunes, render a preview of a merge
and an X/Y/Z grid of merge ratios."""

from __future__ import annotations

import json
import time
from pathlib import Path

from merge_lab.analysis import analyze
from merge_lab.archs import layout_for
from merge_lab.archs.blocks import main_blocks
from merge_lab.archs.layouts import TINY_WIDTH
from merge_lab.cli.progress import TqdmProgress
from merge_lab.cli.tables import format_report, format_table
from merge_lab.demo.models import base_state_dict, make_family, save_state_dict
from merge_lab.engine import Recipe, merge_to_file
from merge_lab.plot.heatmap import render_heatmap


def add_parser(sub):
    p = sub.add_parser("demo", help="build small demo checkpoints (real key sets), merge them with every method, "
                                    "write the θ-per-block report, render a preview and an X/Y/Z grid")
    p.add_argument("--dir", default="demo-output", help="where models and outputs go")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--skip-previews", action="store_true", help="only build, merge and analyze (no images)")
    return p


def demo_recipes(arch: str, base: Path, fts: list[Path], out_dir: Path) -> list[tuple[str, Recipe]]:
    a, b, c = (str(p) for p in fts)
    base = str(base)
    # BASE and M00 0.5, the input blocks 0.2, the output blocks 0.8
    mbw = ",".join("0.2" if b.startswith("IN") else "0.8" if b.startswith("OUT") else "0.5" for b in main_blocks(arch))

    def out(name: str) -> str:
        return str(out_dir / f"{arch}-{name}.safetensors")

    three = dict(models=[a, b, c], base=base)
    return [
        ("weighted_sum", Recipe(models=[a, b], method="weighted_sum", alpha=0.5, out=out("weighted_sum"))),
        ("weighted_sum (per block)", Recipe(models=[a, b], method="weighted_sum", blocks=mbw, block={"VAE": 0},
                                            out=out("weighted_sum-mbw"))),
        ("add_difference", Recipe(models=[a, b, base], method="add_difference", alpha=1.0,
                                  out=out("add_difference"))),
        ("slerp", Recipe(models=[a, c], method="slerp", alpha=0.5, out=out("slerp"))),
        ("task_arithmetic", Recipe(**three, method="task_arithmetic", alpha=0.4, out=out("task_arithmetic"))),
        ("ties (k=0.2, mass)", Recipe(**three, method="ties", alpha=1.0, out=out("ties"))),
        ("ties_soup", Recipe(**three, method="ties_soup", alpha=1.0, out=out("ties_soup"))),
        ("dare (p=0.5, sum)", Recipe(**three, method="dare", params={"p": 0.5}, alpha=0.4, seed=1,
                                     out=out("dare"))),
        ("tsd (stock)", Recipe(**three, method="tsd", params={"stock": True}, alpha=1.0, seed=1, out=out("tsd"))),
        ("model_stock (per block)", Recipe(**three, method="model_stock", params={"granularity": "block"},
                                           alpha=1.0, out=out("model_stock-block"))),
        ("expo", Recipe(models=[a], base=base, method="expo", alpha=0.5, out=out("expo"))),
        ("della (ties)", Recipe(**three, method="della", alpha=1.0, seed=1, out=out("della"))),
        ("della_linear", Recipe(**three, method="della_linear", alpha=0.5, seed=1, out=out("della_linear"))),
        ("breadcrumbs", Recipe(**three, method="breadcrumbs", alpha=0.5, out=out("breadcrumbs"))),
        ("breadcrumbs_ties", Recipe(**three, method="breadcrumbs_ties", alpha=1.0, out=out("breadcrumbs_ties"))),
        ("sce", Recipe(**three, method="sce", alpha=1.0, out=out("sce"))),
        ("multislerp (task vectors)", Recipe(**three, method="multislerp", alpha=1.0, out=out("multislerp"))),
        ("karcher", Recipe(models=[a, b, c], method="karcher", alpha=1.0, out=out("karcher"))),
        ("nuslerp", Recipe(models=[a, c], method="nuslerp", alpha=0.5, out=out("nuslerp"))),
        ("nearswap", Recipe(models=[a], base=base, method="nearswap", alpha=1.0, out=out("nearswap"))),
        ("geometric_median", Recipe(models=[a, b, c], method="geometric_median", alpha=1.0,
                                    out=out("geometric_median"))),
        ("iso_c", Recipe(**three, method="iso_c", alpha=0.5, out=out("iso_c"))),
        ("tsv_merge", Recipe(**three, method="tsv_merge", alpha=1.0, out=out("tsv_merge"))),
        # SuperMerger's calc modes (A + mode(B, C): C the base)
        ("train_difference", Recipe(models=[a, b], base=base, method="train_difference", alpha=1.0,
                                    out=out("train_difference"))),
        ("smooth_add", Recipe(models=[a, b], base=base, method="smooth_add", alpha=1.0, out=out("smooth_add"))),
        ("cosine_a", Recipe(models=[a, c], method="cosine_a", alpha=0.5, out=out("cosine_a"))),
        ("cosine_b", Recipe(models=[a, c], method="cosine_b", alpha=0.5, out=out("cosine_b"))),
        ("tensor_swap", Recipe(models=[a, c], method="tensor_swap", alpha=0.5, out=out("tensor_swap"))),
        ("tensor_swap2", Recipe(models=[a, c], method="tensor_swap2", alpha=0.5, out=out("tensor_swap2"))),
        ("extract (similar)", Recipe(models=[a, b], base=base, method="extract", alpha=0.5, out=out("extract"))),
        ("add_opposite", Recipe(models=[a, b], base=base, method="add_opposite", alpha=1.0,
                                out=out("add_opposite"))),
        ("add_strict_opposite", Recipe(models=[a, b], base=base, method="add_strict_opposite", alpha=1.0,
                                       out=out("add_strict_opposite"))),
        ("triple_sum", Recipe(models=[a, b, c], method="triple_sum", alpha=0.5, out=out("triple_sum"))),
        ("sum_twice", Recipe(models=[a, b, c], method="sum_twice", alpha=0.5, out=out("sum_twice"))),
    ]


def run_demo(root: Path, *, archs=("sd1", "sdxl"), width: int = TINY_WIDTH, vocab: int = 49408,
             progress: bool = True) -> list[tuple]:
    models_dir, out_dir, analysis_dir = root / "models", root / "merged", root / "analysis"
    analysis_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for arch in archs:
        print(f"building tiny {arch} checkpoints (real key set) in {models_dir}")
        base, fts = make_family(arch, models_dir, width=width, vocab=vocab, prefix=f"demo-{arch}")
        for label, recipe in demo_recipes(arch, base, fts, out_dir):
            with TqdmProgress(Path(recipe.out).name, disable=not progress, leave=False) as bar:
                result = merge_to_file(recipe, progress=bar, overwrite=True)  # the demo's own outputs
            rows.append((arch, label, result.out, result.autov2, f"{result.seconds:.2f}"))
        rows.append(_demo_lora(arch, base, fts, models_dir, out_dir, progress))
        report = analyze([str(p) for p in fts], str(base))
        stem = analysis_dir / f"{arch}-theta"
        Path(f"{stem}.txt").write_text(format_report(report) + "\n", encoding="utf-8")
        Path(f"{stem}.json").write_text(json.dumps(report.as_dict(), indent=2, ensure_ascii=False), encoding="utf-8")
        render_heatmap(report, f"{stem}.png")
        rows.append((arch, "θ per block (analyze)", f"{stem}.txt / .json / .png", "", f"{report.seconds:.2f}"))
    return rows


def _demo_lora(arch: str, base: Path, fts: list[Path], models_dir: Path, out_dir: Path, progress: bool) -> tuple:
    """A LoRA extracted from the second fine-tune (rank 4), baked into the first at 0.8 in a one-model recipe."""
    from merge_lab.lora.tools import extract_lora

    lora = models_dir / f"demo-{arch}-ft2-lora.safetensors"
    extract_lora(str(fts[1]), str(base), str(lora), rank=4, conv_rank=4, overwrite=True, progress=False)
    recipe = Recipe(models=[str(fts[0])], method="passthrough", loras=[{"path": str(lora), "strength": 0.8}],
                    out=str(out_dir / f"{arch}-lora-bake.safetensors"))
    with TqdmProgress(Path(recipe.out).name, disable=not progress, leave=False) as bar:
        result = merge_to_file(recipe, progress=bar, overwrite=True)
    return (arch, "passthrough + LoRA (ft2 − base, rank 4) at 0.8", result.out, result.autov2, f"{result.seconds:.2f}")


def run(args) -> int:
    root = Path(args.dir)
    rows = run_demo(root, progress=not args.no_progress)
    print()
    print(format_table(("arch", "method", "output", "AutoV2", "seconds"), rows))
    print(f"\nmodels: {root / 'models'}/  merged: {root / 'merged'}/  θ reports: {root / 'analysis'}/  "
          "(inspect a model with `merge-lab info FILE`)")
    if not args.skip_previews:
        demo_previews(root, root / "models", root / "merged", progress=not args.no_progress)
    return 0


def demo_previews(root: Path, models_dir: Path, out_dir: Path, *, progress: bool) -> None:
    """A preview of one merged demo model and an X/Y/Z grid (alpha x image seed) of a merge in memory.

    The demo models are untrained, so the images are abstract patterns; what they show is that the
    pipeline renders the merged weights and how the image moves with the ratio."""
    from merge_lab.cli.commands.preview import save_previews
    from merge_lab.plot.xyz import parse_axis, run_xyz
    from merge_lab.preview.settings import PreviewSettings
    from merge_lab.preview.tokenizer import vocabulary_files

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
