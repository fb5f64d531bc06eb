"""`merge-lab bench --lora`: baking a rank-32 LoRA into a full-size checkpoint against a plain copy of it, and
extracting a LoRA from two full-size checkpoints; every run a process of its own (its peak RSS its own).

The LoRA has kohya's module names for every layer our extract writes (UNet / transformer linears and 1×1
convolutions and the text encoders' linears: a kohya LoRA trained with the text encoder), rank 32, fp16
factors (what shared LoRAs hold), random values. The copy is the I/O floor with one input: every tensor read
and written once through the same reader and writer, no math.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

import torch

from merge_lab.benchmarks.io_floor import ensure_checkpoints, run_measured
from merge_lab.io.header import read_header


def ensure_lora(arch: str, model: Path, rank: int = 32) -> Path:
    """A kohya LoRA of `rank` for every layer of `model` a LoRA adapts (made once, reused)."""
    from merge_lab.archs import current_key_name
    from merge_lab.archs.detect import detect
    from merge_lab.io.checkpoints import open_checkpoint
    from merge_lab.lora.tools import _put, _write, kohya_module_names

    path = model.parent / f"{model.stem}-lora-r{rank}.safetensors"
    if path.exists():
        return path
    print(f"generating {path} ...", file=sys.stderr, flush=True)
    reader = open_checkpoint(model, current_key_name)
    try:
        spec = detect(reader.tensors, reader.metadata, str(model))
        shapes = {k: tuple(t.shape) for k, t in reader.tensors.items()}
    finally:
        reader.close()
    tensors: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(0)
    for name, key, rows in kohya_module_names(spec.arch, shapes, text_encoder=True):
        shape = shapes[key]
        if len(shape) == 4 and shape[2:] != (1, 1):
            continue  # kohya's default LoRA: no 3×3 convolutions
        out = (rows[1] - rows[0]) if rows else shape[0]
        cin = math.prod(shape[1:])
        r = min(rank, out, cin)
        up = torch.randn(out, r, generator=g) * 0.01
        down = torch.randn(r, cin, generator=g) / math.sqrt(cin)
        if len(shape) == 4:
            up, down = up[:, :, None, None], down.reshape(r, *shape[1:])
        _put(tensors, name, up, down, r, torch.float16)
    _write(str(path), tensors, {"ss_network_module": "networks.lora", "ss_network_dim": str(rank)}, overwrite=True)
    return path


def worker(variant: str, spec: dict, out: str) -> None:
    """A measured child's job: `copy`, `bake` or `extract`."""
    if variant == "copy":
        from merge_lab.benchmarks.io_floor import io_floor

        io_floor([spec["model"]], out)
    elif variant == "bake":
        from merge_lab.engine import Recipe, merge_to_file

        recipe = Recipe(models=[spec["model"]], method="passthrough",
                        loras=[{"path": spec["lora"], "strength": 0.8}], out=out)
        merge_to_file(recipe, overwrite=True)
    elif variant == "extract":
        from merge_lab.lora.tools import extract_lora

        report = extract_lora(spec["model"], spec["base"], out, rank=spec["rank"], text_encoder=True,
                              dtype="fp16", overwrite=True, progress=False)
        Path(out + ".report").write_text(str(report), encoding="utf-8")  # beside the output: the parent reads it
    else:
        raise SystemExit(f"unknown variant {variant}")


def run_lora_bench(arch: str, reps: int, extract_rank: int | None, folder: Path | None, json_out: str | None,
                   env: dict, width: int | None = None, *, format_table) -> int:
    """Run and print the LoRA bench; `format_table(headers, rows)` is the CLI's (benchmarks sit below it)."""
    base, (ft,) = ensure_checkpoints(arch, 1, folder, width=width)
    lora = ensure_lora(arch, base)
    out_dir = base.parent / "lora-out"
    out_dir.mkdir(exist_ok=True)
    lora_mb = lora.stat().st_size / 1e6
    modules = sum(1 for k in read_header(lora).tensors if k.endswith(".lora_down.weight"))
    runs: list[dict] = []

    def measure(variant: str, spec: dict, name: str) -> dict:
        out = out_dir / name
        argv = [sys.executable, "-m", "merge_lab.benchmarks.lora", variant, json.dumps(spec), str(out)]
        seconds, rss, code, tail = run_measured(argv, env)
        size = out.stat().st_size / 1e6 if out.exists() else 0
        out.unlink(missing_ok=True)
        run = {"variant": variant, "seconds": seconds, "peak_rss_mb": rss, "ok": code == 0, "out_mb": size,
               "error": "" if code == 0 else (tail.strip().splitlines() or ["?"])[-1]}
        print(f"{variant:8s} {seconds:8.2f} s {rss:8.0f} MB{'' if run['ok'] else '  FAILED: ' + run['error']}",
              file=sys.stderr, flush=True)
        report = Path(f"{out}.report")
        if report.exists():
            run["report"] = report.read_text(encoding="utf-8")
            report.unlink()
        runs.append(run)
        return run

    spec = {"model": str(base), "lora": str(lora)}
    for rep in range(reps):
        for variant in (("copy", "bake") if rep % 2 == 0 else ("bake", "copy")):
            measure(variant, spec, f"{variant}.safetensors")
    extract = None
    if extract_rank:
        extract = measure("extract", {"model": str(ft), "base": str(base), "rank": extract_rank},
                          f"extract-r{extract_rank}.safetensors")

    def stats(variant):
        rs = [r for r in runs if r["variant"] == variant and r["ok"]]
        return (statistics.median(r["seconds"] for r in rs), min(r["seconds"] for r in rs),
                max(r["seconds"] for r in rs), max(r["peak_rss_mb"] for r in rs)) if rs else None

    rows = []
    copy, bake = stats("copy"), stats("bake")
    for label, s in (("plain copy (read + write, no math)", copy), ("bake 1 LoRA, rank 32", bake)):
        rows.append((label, "-" if s is None else f"{s[0]:.2f} s ({s[1]:.2f}–{s[2]:.2f})",
                     "-" if s is None else f"{s[3]:.0f} MB"))
    print(f"\n{arch}: {base.stat().st_size / 1e9:.2f} GB checkpoint, LoRA {modules} modules rank 32 fp16 "
          f"({lora_mb:.0f} MB), {reps} repetition(s), median (min–max)\n")
    print(format_table(("job", "time", "peak RSS"), rows))
    if copy and bake:
        print(f"\nbake / copy: {bake[0] / copy[0]:.2f}×")
    if extract is not None:
        print(f"\nextract rank {extract_rank} (UNet + text encoders, fp16 factors): {extract['seconds']:.1f} s, "
              f"peak RSS {extract['peak_rss_mb']:.0f} MB, LoRA {extract['out_mb']:.0f} MB")
        if extract.get("report"):
            print("  " + extract["report"].replace("\n", "\n  "))
    if json_out:
        Path(json_out).write_text(json.dumps({"arch": arch, "lora_modules": modules, "lora_mb": lora_mb,
                                              "runs": runs}, indent=2))
    return 0 if all(r["ok"] for r in runs) else 1


if __name__ == "__main__":
    variant, spec, out = sys.argv[1:4]
    worker(variant, json.loads(spec), out)
    from merge_lab.benchmarks.io_floor import _report_peak_rss

    _report_peak_rss()
    sys.exit(0)
