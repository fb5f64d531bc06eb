"""`merge-lab info FILE`: what a checkpoint is, from its header alone."""

from __future__ import annotations

import json
from collections import Counter

from merge_lab import archs
from merge_lab.archs import current_key_name
from merge_lab.archs.blocks import all_blocks, block_of
from merge_lab.archs.detect import component_of, detect, summarize_dtypes
from merge_lab.io.checkpoints import read_header_any


def describe(path: str) -> dict:
    header = read_header_any(path, current_key_name)
    arch = detect(header.tensors, header.metadata, path)
    components = Counter(component_of(k) for k in header.tensors)
    per_block = Counter(block_of(k, arch.arch) or "(not merged)" for k in header.tensors)
    order = [*all_blocks(arch.arch), "(not merged)"]
    merge_meta = {}
    for name in ("sd_merge_recipe", "sd_merge_models"):
        raw = header.metadata.get(name)
        if raw is not None:
            try:
                merge_meta[name] = json.loads(raw)
            except ValueError:
                merge_meta[name] = raw
    return {
        "file": path,
        "architecture": arch.arch,
        "architecture_name": archs.get(arch.arch).title,
        "variants": list(arch.variants),
        "keys": len(header.tensors),
        "parameters": sum(t.numel for t in header.tensors.values()),
        "components": dict(components.most_common()),
        "blocks": {b: per_block[b] for b in order if per_block.get(b)},
        "dtypes": summarize_dtypes(header.tensors),
        "metadata": {k: v for k, v in header.metadata.items() if k not in merge_meta},
        "merge": merge_meta,
    }


def add_parser(sub):
    p = sub.add_parser("info", help="architecture, keys per component and block, dtypes, merge metadata "
                                    "(header only)")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def run(args) -> int:
    reports = [describe(f) for f in args.files]
    if args.json:
        print(json.dumps(reports[0] if len(reports) == 1 else reports, indent=2))
        return 0
    for r in reports:
        variants = f" ({', '.join(r['variants'])})" if r["variants"] else ""
        print(f"{r['file']}")
        print(f"  architecture: {r['architecture']}{variants} - {r['architecture_name']}")
        print(f"  keys: {r['keys']}  parameters: {r['parameters'] / 1e9:.3f} B")
        print("  components: " + ", ".join(f"{k} {v}" for k, v in r["components"].items()))
        print("  dtypes: " + ", ".join(f"{k} {v}" for k, v in r["dtypes"].items()))
        print("  keys per block: " + ", ".join(f"{k} {v}" for k, v in r["blocks"].items()))
        for name, value in r["merge"].items():
            print(f"  {name}: {json.dumps(value)}")
        for name, value in r["metadata"].items():
            shown = value if len(value) <= 200 else value[:200] + "…"
            print(f"  metadata {name}: {shown}")
    return 0
