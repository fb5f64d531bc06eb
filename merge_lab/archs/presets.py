"""Block-weight presets by name: each architecture names its table (a TSV beside this module, in one of the
value orders it takes; the LDM UNets share presets.tsv in the 26-value SD order)."""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

from merge_lab.archs.blocks import to_arch_values
from merge_lab.archs.registry import get, specs
from merge_lab.errors import RecipeError

PRESET_DIR = Path(__file__).parent


def presets(arch: str | None = None) -> dict[str, tuple[float, ...]]:
    """{name: values} of `arch`'s table; without `arch`, every table's presets (the first of a name wins)."""
    if arch is not None:
        table = get(arch).preset_table
        return dict(_read_table(table)) if table else {}
    out: dict[str, tuple[float, ...]] = {}
    for spec in specs():
        if spec.preset_table:
            for name, values in _read_table(spec.preset_table).items():
                out.setdefault(name, values)
    return out


@cache
def _read_table(file_name: str) -> dict[str, tuple[float, ...]]:
    table = {}
    for line in (PRESET_DIR / file_name).read_text(encoding="utf-8").splitlines():
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
    table = presets(arch)
    key = name.strip()
    match = table.get(key) or next((v for k, v in table.items() if k.upper() == key.upper()), None)
    if match is None:
        raise RecipeError(f"unknown block preset {name!r} (valid: {', '.join(table) or f'none for {arch}'})")
    return to_arch_values(list(match), arch)
