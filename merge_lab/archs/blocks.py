"""The block map (MBW): which block each key belongs to, and the ratio of every block, for any registered
architecture (merge_lab/archs/registry.py; the LDM UNets' scheme is described in merge_lab/archs/ldm.py).

A key's block is the block of the longest of its architecture's key prefixes it starts with (ComfyUI's
ModelMergeBlocks). Main blocks are set by value strings in the architecture's order (or in another order it
takes: a 26-value SD string on SDXL); named extra blocks follow a main block unless set themselves.

Keys that are never merged (block ``None``) are *kept* keys or *training leftovers* (``--prune`` drops them),
both copied from the first model that has them. Any other key is not part of the architecture as we know it:
``key_role`` says "unknown" and the merge refuses it rather than copy it unmerged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from merge_lab.archs.registry import get
from merge_lab.errors import RecipeError


def main_blocks(arch: str) -> list[str]:
    return list(get(arch).main_blocks)


def extra_blocks(arch: str) -> dict[str, str]:
    """Named extra blocks and the main block each follows when not set itself."""
    return dict(get(arch).extra_blocks)


def all_blocks(arch: str) -> list[str]:
    return list(get(arch).all_blocks)


_SCALED_FP8_SUFFIXES = (".scale_weight", ".scale_input")


def key_role(key: str, arch: str) -> str:
    """"merge" (a key of a block), "kept" (never merged, always kept), "leftover" (never merged, dropped by
    --prune) or "unknown" (not part of `arch` as we know it)."""
    if key == "scaled_fp8" or key.endswith(_SCALED_FP8_SUFFIXES):
        return "unknown"  # ComfyUI's scaled fp8: a weight is only right with its scale, which we do not apply
    spec = get(arch)
    if (spec.leftover_prefixes and key.startswith(spec.leftover_prefixes)) or key in spec.leftover_keys:
        return "leftover"
    if key in spec.kept_keys:
        return "kept"
    if spec.block_of(key) is not None:
        return "merge"
    if spec.never_merged_suffixes and key.endswith(spec.never_merged_suffixes) and \
            key.startswith(spec.text_encoder_prefixes):
        return "kept"
    return "unknown"


def block_of(key: str, arch: str) -> str | None:
    """The block of `key`, or None for keys that are never merged or not part of `arch` (see key_role)."""
    return get(arch).block_of(key)


def parse_values(text: str | Sequence[float]) -> list[float]:
    """'0,0.5,1' or [0, 0.5, 1] -> floats (whitespace and a trailing comma tolerated)."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.replace("\n", ",").split(",")]
        parts = [p for p in parts if p]
    else:
        parts = list(text)
    values = []
    for p in parts:
        try:
            v = float(p)
        except (TypeError, ValueError):
            raise RecipeError(f"block ratio {p!r} is not a number") from None
        if v != v or v in (float("inf"), float("-inf")):
            raise RecipeError(f"block ratio {p!r} is not finite")
        values.append(v)
    return values


def to_arch_values(values: list[float], arch: str) -> list[float]:
    """Values in another order the architecture takes (a 26-value SD string on SDXL keeps BASE, IN00..IN08,
    M00, OUT00..OUT08, as SuperMerger does) -> its own order; other lengths are returned unchanged."""
    spec = get(arch)
    order = spec.string_orders.get(len(values))
    if order is None:
        return values
    by_block = {block: v for block, v in zip(order, values) if block is not None}
    return [by_block[b] for b in spec.main_blocks]


def accepted_lengths(arch: str) -> list[int]:
    """Value-string lengths `arch` takes: each order, and each without its first value (BASE)."""
    return sorted({n for count in get(arch).value_orders() for n in (count, count - 1)}, reverse=True)


def resolve_ratios(arch: str, alpha: float, values: Sequence[float] | None = None,
                   named: Mapping[str, float] | None = None) -> dict[str, float]:
    """The ratio of every block (main and extra) of `arch`.

    `alpha` is the default; `values` (in the architecture's order, e.g. 26 for SD1/SD2, 20 for SDXL, or one
    fewer without BASE, which then takes `alpha`; or in another order it takes: a 26-value string on SDXL
    drops IN09-IN11 and OUT09-OUT11) set the main blocks, extra blocks follow their main block; `named` sets
    any block.
    """
    spec = get(arch)
    mains = list(spec.main_blocks)
    ratios = dict.fromkeys(mains, float(alpha))
    if values is not None:
        values = list(values)
        if len(values) + 1 in spec.value_orders():
            values = [float(alpha), *values]
        values = to_arch_values(values, arch)
        if len(values) != len(mains):
            raise RecipeError(
                f"{arch} takes {len(mains)} block ratios ({mains[0]}, {mains[1]}..{mains[-1]}) "
                f"or {len(mains) - 1} without BASE, got {len(values)}"
            )
        ratios.update(zip(mains, (float(v) for v in values)))
    extras = dict(spec.extra_blocks)
    for name, parent in extras.items():
        ratios[name] = ratios[parent]
    for name, value in (named or {}).items():
        upper = name.upper()
        if upper not in ratios:
            raise RecipeError(f"unknown block {name!r} for {arch} (valid: {', '.join(spec.all_blocks)})")
        ratios[upper] = float(value)
        if upper in mains:  # extras that follow a main block set by name follow it, unless set too
            for extra, parent in extras.items():
                if parent == upper and not any(n.upper() == extra for n in named):
                    ratios[extra] = float(value)
    return ratios
