"""`merge-lab analyze`: the cosine θ per block between models (task vectors against a base, or raw weights)."""

from __future__ import annotations

import json
import sys

from merge_lab.analysis import analyze
from merge_lab.cli.progress import TqdmProgress
from merge_lab.cli.tables import format_report


def add_parser(sub):
    p = sub.add_parser("analyze", help="θ per block between every pair of models (table, JSON, heatmap)")
    p.add_argument("--models", nargs="+", required=True, metavar="MODEL",
                   help="two or more checkpoints (globs and folders allowed)")
    p.add_argument("--base", help="the common base: angles between task vectors (model − base); "
                                  "without it, between the raw weights")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of the table")
    p.add_argument("--heatmap", metavar="OUT.png", help="also write a heatmap image (blocks × pairs)")
    p.add_argument("--threads", type=int, help="worker threads (default: cores, at most 4)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--memory-budget", dest="memory_budget", help="memory for tensors in flight, e.g. 2GB")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args) -> int:
    with TqdmProgress("analyze", disable=args.no_progress) as progress:
        report = analyze(args.models, args.base, threads=args.threads, device=args.device,
                         memory_budget=args.memory_budget, progress=progress)
    if args.json:
        print(json.dumps(report.as_dict(), indent=2, ensure_ascii=False))
    else:
        print(format_report(report))
    if args.heatmap:
        from merge_lab.plot.heatmap import render_heatmap

        render_heatmap(report, args.heatmap)
        print(f"heatmap: {args.heatmap}", file=sys.stderr if args.json else sys.stdout)
    return 0
