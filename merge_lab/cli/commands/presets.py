"""`merge-lab presets`: the block-weight presets by name, with their values."""

from __future__ import annotations

import json

from merge_lab import archs
from merge_lab.archs.blocks import main_blocks
from merge_lab.archs.presets import preset_values, presets


def add_parser(sub):
    p = sub.add_parser("presets", help="list the block-weight presets (SD1/SD2: 26 values, SDXL: 20)")
    p.add_argument("--arch", choices=[s.name for s in archs.specs() if s.preset_table], default="sd1")
    p.add_argument("--json", action="store_true")
    return p


def run(args) -> int:
    table = {name: preset_values(name, args.arch) for name in presets(args.arch)}
    if args.json:
        print(json.dumps({"blocks": main_blocks(args.arch), "presets": table}, indent=2))
        return 0
    print("blocks: " + ",".join(main_blocks(args.arch)))
    width = max(map(len, table))
    for name, values in table.items():
        print(f"{name.ljust(width)}  " + ",".join(f"{v:.3g}" for v in values))
    return 0
