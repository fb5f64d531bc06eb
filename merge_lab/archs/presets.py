"""Block-weight presets by name (data/presets.tsv), for SD1/SD2 (26 values) and SDXL (20 values)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from merge_lab.archs.blocks import to_arch_values
from merge_lab.errors import RecipeError

PRESET_FILE = Path(__file__).with_name("presets.tsv")


@cache
def presets() -> dict[str, tuple[float, ...]]:
    table = {}
    for line in PRESET_FILE.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, values = line.split("\t")
        table[name] = tuple(float(v) for v in values.split(","))
    return table


def names_preset(spec) -> bool:
    """Whether a `blocks` value names a preset (FLAT_25, WRAP08, …) rather than listing ratios."""
    if not isinstance(spec, str):
        return False
    first = re.split(r"[,\n]", spec, maxsplit=1)[0]
    try:
        float(first)
    except ValueError:
        return True
    return False


def preset_values(name: str, arch: str) -> list[float]:
    table = presets()
    key = name.strip()
    match = table.get(key) or next((v for k, v in table.items() if k.upper() == key.upper()), None)
    if match is None:
        raise RecipeError(f"unknown block preset {name!r} (valid: {', '.join(table)})")
    return to_arch_values(list(match), arch)
