"""`merge-lab bench`: the I/O floor, ours and sd-mecha on full-size synthetic checkpoints, in one run."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

from merge_lab.benchmarks.io_floor import BenchResult, Run, bench_dir, ensure_checkpoints, run_measured
from merge_lab.cli.tables import format_table

DEFAULT_METHODS = ["weighted_sum", "model_stock", "ties_soup", "tsd"]
# Flux files are 11.9 GB each: weighted sum of two and Model Stock of base + 2 (issue 19's recipe)
ARCH_DEFAULTS = {"flux": {"methods": "weighted_sum,model_stock", "models": 2, "reps": 2}}


def add_parser(sub):
    p = sub.add_parser("bench", help="benchmark: I/O floor vs ours vs sd-mecha on full-size synthetic models")
    p.add_argument("--arch", choices=["sd15", "sdxl", "flux"], default="sd15")
    p.add_argument("--models", type=int, default=None, help="fine-tunes for the base + N methods (default 3; "
                                                             "flux: 2)")
    p.add_argument("--methods", default=None, help="comma-separated (default: " + ",".join(DEFAULT_METHODS)
                                                   + "; flux: weighted_sum,model_stock)")
    p.add_argument("--reps", type=int, default=None, help="repetitions, variants alternating within each "
                                                          "(default 3; flux: 2)")
    p.add_argument("--width", type=int, default=None, help="base width of the synthetic models (default: full "
                                                           "size; small widths are for trying the bench out)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="our worker threads")
    p.add_argument("--no-mecha", action="store_true", help="skip sd-mecha")
    p.add_argument("--no-floor", action="store_true", help="skip the I/O floor")
    p.add_argument("--rss-models", default="", help="also run ours with these model counts, e.g. 2,4,8 "
                                                    "(peak RSS and time, model_stock and ties_soup)")
    p.add_argument("--many", default="", help="instead: many-model merges with these model counts, e.g. "
                                              "4,16,64 (ours only; peak RSS and time against bytes read)")
    p.add_argument("--many-width", type=int, default=64, help="base width of the --many models (SDXL key set; "
                                                             "64: 266 MB each in fp16)")
    p.add_argument("--many-methods", default="ties_soup,tsd", help="methods of the --many runs")
    p.add_argument("--memory-budget", default=None, help="our --memory-budget in the --many runs")
    p.add_argument("--lora", action="store_true", help="instead: bake a rank-32 LoRA against a plain copy of the "
                                                       "checkpoint, and extract a LoRA (--extract-rank)")
    p.add_argument("--extract-rank", dest="extract_rank", type=int, default=64,
                   help="with --lora: the rank extracted from base + fine-tune (0: skip)")
    p.add_argument("--dir", help="where the synthetic checkpoints are kept (default: the cache folder)")
    p.add_argument("--out-dir", help="where merge outputs go while measured (default: a temp folder beside the "
                                     "checkpoints)")
    p.add_argument("--json", help="write the results as JSON to this file")
    return p


def _spec(method: str, base: Path, fts: list[Path], n: int, args) -> dict:
    if method == "weighted_sum":
        spec = {"method": method, "models": [str(fts[0]), str(fts[1])], "alpha": 0.5}
    else:
        spec = {"method": method, "models": [str(p) for p in fts[:n]], "base": str(base), "alpha": 1.0}
    spec["device"] = args.device
    if args.threads:
        spec["threads"] = args.threads
    return spec


def _measure(variant: str, spec: dict, out: Path, env: dict) -> Run:
    argv = [sys.executable, "-m", "merge_lab.benchmarks.io_floor", variant, json.dumps(spec), str(out),
            spec.get("base", "-"), *spec["models"]]
    seconds, rss, code, tail = run_measured(argv, env)
    out.unlink(missing_ok=True)
    last_line = (tail.strip().splitlines() or [f"exit code {code}"])[-1]
    return Run(variant, spec["method"], seconds, rss, code == 0, "" if code == 0 else last_line)


def run_many(args) -> int:
    """Peak RSS and time of ours for N models (same key set and sizes), to show both flat / linear in N."""
    counts = [int(x) for x in args.many.split(",") if x.strip()]
    methods = [m.strip() for m in args.many_methods.split(",") if m.strip()]
    base, fts = ensure_checkpoints("sdxl", max(counts), Path(args.dir) if args.dir else None, width=args.many_width)
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="out-", dir=base.parent))
    env = dict(os.environ, MERGE_LAB_CACHE=str(bench_dir() / "hash-cache"), PYTHONUNBUFFERED="1")
    os.environ["MERGE_LAB_CACHE"] = env["MERGE_LAB_CACHE"]
    from merge_lab.io.hashing import sha256_file

    for p in [base, *fts]:
        sha256_file(p)
    rows, records = [], []
    for rep in range(args.reps):
        for n in counts:
            for method in methods:
                spec = {"method": method, "models": [str(p) for p in fts[:n]], "base": str(base), "alpha": 1.0,
                        "device": args.device}
                if args.memory_budget:
                    spec["memory_budget"] = args.memory_budget
                if args.threads:
                    spec["threads"] = args.threads
                r = _measure("ours", spec, out_dir / f"many-{n}-{method}.safetensors", env)
                read_gb = sum(p.stat().st_size for p in [base, *fts[:n]]) / 1e9
                records.append({"rep": rep, "models": n, "method": method, "seconds": r.seconds,
                                "peak_rss_mb": r.peak_rss_mb, "read_gb": read_gb, "ok": r.ok, "error": r.error})
                print(f"rep {rep + 1} N={n:3d} {method:10s} {r.seconds:8.2f} s {read_gb:7.2f} GB read "
                      f"{read_gb / r.seconds:6.2f} GB/s {r.peak_rss_mb:7.0f} MB{'' if r.ok else '  FAILED ' + r.error}",
                      file=sys.stderr, flush=True)
    import statistics

    for n in counts:
        for method in methods:
            rs = [r for r in records if r["models"] == n and r["method"] == method and r["ok"]]
            if not rs:
                rows.append((n, method, "-", "-", "-", "FAILED"))
                continue
            secs = statistics.median(r["seconds"] for r in rs)
            rows.append((n, method, f"{rs[0]['read_gb']:.2f}", f"{secs:.2f}", f"{rs[0]['read_gb'] / secs:.2f}",
                         f"{max(r['peak_rss_mb'] for r in rs):.0f}"))
    print(f"\nmany models: SDXL key set at width {args.many_width}, base + N, budget "
          f"{args.memory_budget or 'default'}, {args.reps} repetition(s), median\n")
    print(format_table(("models", "method", "GB read", "seconds", "GB/s", "peak RSS MB"), rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"many": records, "width": args.many_width}, indent=2))
    return 0 if all(r["ok"] for r in records) else 1


def _apply_arch_defaults(args) -> None:
    defaults = {"methods": ",".join(DEFAULT_METHODS), "models": 3, "reps": 3, **ARCH_DEFAULTS.get(args.arch, {})}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _check_free_disk(folder: Path | None, arch: str, n_models: int, width: int | None) -> None:
    """Say how much the checkpoints and one output need, against what the disk has, before writing any."""
    import shutil

    from merge_lab.benchmarks.io_floor import checkpoint_paths, model_bytes

    paths = checkpoint_paths(arch, n_models, folder, width)
    size = model_bytes(arch, width)
    missing = sum(1 for p in paths if not p.exists())
    paths[0].parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(paths[0].parent).free
    need = (missing + 1) * size  # the missing checkpoints and one output at a time
    print(f"bench {arch}: {size / 1e9:.2f} GB per model, {missing} of {len(paths)} to generate; needs "
          f"{need / 1e9:.1f} GB, {free / 1e9:.1f} GB free in {paths[0].parent}", file=sys.stderr, flush=True)
    if need > free:
        raise SystemExit(f"merge-lab bench: not enough free disk in {paths[0].parent}: needs {need / 1e9:.1f} GB, "
                         f"{free / 1e9:.1f} GB free (--dir elsewhere)")


def run(args) -> int:
    _apply_arch_defaults(args)
    if args.many:
        return run_many(args)
    if args.lora:
        from merge_lab.benchmarks.lora import run_lora_bench

        folder = Path(args.dir) if args.dir else None
        _check_free_disk(folder, args.arch, 1, args.width)
        env = dict(os.environ, MERGE_LAB_CACHE=str(bench_dir() / "hash-cache"), PYTHONUNBUFFERED="1")
        return run_lora_bench(args.arch, args.reps, args.extract_rank, folder, args.json, env, args.width,
                              format_table=format_table)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    rss_counts = [int(x) for x in args.rss_models.split(",") if x.strip()]
    need = max([args.models, 2, *rss_counts])
    folder = Path(args.dir) if args.dir else None
    _check_free_disk(folder, args.arch, need, args.width)
    base, fts = ensure_checkpoints(args.arch, need, folder, width=args.width)
    out_dir = Path(args.out_dir or tempfile.mkdtemp(prefix="out-", dir=base.parent))
    out_dir.mkdir(parents=True, exist_ok=True)
    # Our input hashes are cached like the web UI's: warm the cache once, report its cold cost separately.
    env = dict(os.environ, MERGE_LAB_CACHE=str(bench_dir() / "hash-cache"), PYTHONUNBUFFERED="1")
    from merge_lab.io.hashing import sha256_file

    os.environ["MERGE_LAB_CACHE"] = env["MERGE_LAB_CACHE"]
    for p in [base, *fts]:
        sha256_file(p)

    variants = [v for v, skip in (("floor", args.no_floor), ("ours", False), ("sd-mecha", args.no_mecha)) if not skip]
    result = BenchResult(args.arch)
    for rep in range(args.reps):
        for method in methods:
            spec = _spec(method, base, fts, args.models, args)
            order = variants if rep % 2 == 0 else list(reversed(variants))
            for variant in order:
                r = _measure(variant, spec, out_dir / f"{variant}-{method}.safetensors", env)
                result.runs.append(r)
                status = "" if r.ok else f"  FAILED: {r.error}"
                print(f"rep {rep + 1} {method:13s} {variant:9s} {r.seconds:8.2f} s  {r.peak_rss_mb:8.0f} MB{status}",
                      file=sys.stderr, flush=True)

    rss_rows = []
    for n in rss_counts:
        for method in ("model_stock", "ties_soup"):
            if method not in methods:
                continue
            spec = _spec(method, base, fts, n, args)
            r = _measure("ours", spec, out_dir / f"rss-{n}-{method}.safetensors", env)
            rss_rows.append({"models": n, "method": method, "seconds": r.seconds, "peak_rss_mb": r.peak_rss_mb,
                             "ok": r.ok})
            print(f"N={n:3d} {method:13s} ours {r.seconds:8.2f} s  {r.peak_rss_mb:8.0f} MB", file=sys.stderr, flush=True)

    summary = result.summary()
    rows = []
    def cell(row, variant):
        v = row.get(variant)
        return f"{v['median_s']:.2f} s ({v['min_s']:.2f}–{v['max_s']:.2f}), {v['peak_rss_mb']:.0f} MB" if v else "-"

    for row in summary:
        rows.append((row["method"], cell(row, "floor"), cell(row, "ours"), cell(row, "sd-mecha"),
                     f"{row['ours_over_floor']:.2f}×" if "ours_over_floor" in row else "-",
                     f"{row['mecha_over_ours']:.2f}×" if "mecha_over_ours" in row else "-"))
    print(f"\n{args.arch}, {args.models} fine-tunes (+ base), {args.reps} repetitions, device {args.device}; "
          "median (min–max), peak RSS\n")
    print(format_table(("method", "I/O floor", "ours", "sd-mecha", "ours / floor", "sd-mecha / ours"), rows))
    if rss_rows:
        print()
        print(format_table(("models", "method", "ours seconds", "peak RSS MB"),
                           [(r["models"], r["method"], f"{r['seconds']:.2f}", f"{r['peak_rss_mb']:.0f}")
                            for r in rss_rows]))
    if args.json:
        Path(args.json).write_text(json.dumps({"arch": args.arch, "models": args.models, "reps": args.reps,
                                               "device": args.device, "summary": summary, "rss": rss_rows,
                                               "runs": [r.__dict__ for r in result.runs]}, indent=2))
    return 0 if all(r.ok for r in result.runs) else 1
