"""Block weights of a baked LoRA: our block strings and presets, and the LoRA Block Weight extension's.

hako-mikan/sd-webui-lora-block-weight (scripts/lora_block_weight.py, read at b403cb7) takes 17 values for
an SD1 / SD2 LoRA (BASE, IN01, IN02, IN04, IN05, IN07, IN08, M00, OUT03..OUT11: the blocks with attention
layers), 12 for SDXL (BASE, IN04, IN05, IN07, IN08, M00, OUT00..OUT05), 26 / 20 for LyCORIS (every block,
our SD1 / SDXL orders) and 61 for Flux (our Flux order). A block the string does not list gets 0 (its
to26); a layer in none of the blocks (time embedding, conv_in's neighbours, the final conv: our TIME and OUT)
gets 1, as there. BASE is every text encoder. Its preset names (NONE, ALL, INS, IND, INALL, MIDD, OUTD,
OUTS, OUTALL, ALL0.5) are 17-value SD1 strings, accepted here for SD1 / SD2 / SDXL.
"""

from __future__ import annotations

from merge_lab import archs
from merge_lab.archs.blocks import accepted_lengths, parse_values, resolve_ratios
from merge_lab.archs.presets import names_preset, preset_values, presets
from merge_lab.errors import RecipeError

LBW17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06",
         "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")
LBW12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05")
LBW_ORDERS = {17: LBW17, 12: LBW12}
LBW_PRESETS = {
    "NONE": (0,) * 17,
    "ALL": (1,) * 17,
    "INS": (1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "IND": (1, 0, 0, 0, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "INALL": (1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
    "MIDD": (1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTD": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0),
    "OUTS": (1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1),
    "OUTALL": (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1),
    "ALL0.5": (0.5,) * 17,
}
# UNet layers outside LBW's 26 blocks: weight 1 whatever the string says
_OUTSIDE = ("TIME", "OUT")


def _lbw_ratios(arch: str, values: list[float], order: tuple[str, ...]) -> dict[str, float]:
    spec = archs.get(arch)
    listed = dict(zip(order, values))
    ratios = {b: listed.get(b, 0.0) for b in spec.main_blocks}
    for extra, parent in spec.extra_blocks.items():
        ratios[extra] = ratios.get(parent, 0.0)
    return ratios


def lora_block_ratios(arch: str, spec: str | list[float] | None) -> dict[str, float]:
    """The weight of every block of `arch` for a LoRA with block string or preset `spec` (None: all 1)."""
    names = archs.get(arch)
    if spec is None or spec == "" or spec == []:
        return dict.fromkeys(names.all_blocks, 1.0)
    sd_unet = arch in ("sd1", "sd2", "sdxl", "sdxl-refiner")
    if names_preset(spec):
        name = spec.strip()
        lbw = next((v for k, v in LBW_PRESETS.items() if k.upper() == name.upper()), None)
        if lbw is not None and sd_unet:
            ratios = _lbw_ratios(arch, list(lbw), LBW17)
        elif any(k.upper() == name.upper() for k in presets(arch)):
            ratios = resolve_ratios(arch, 1.0, preset_values(name, arch))
        else:
            known = [*presets(arch), *(LBW_PRESETS if sd_unet else {})]
            raise RecipeError(f"unknown LoRA block preset {name!r} for {arch} (valid: {', '.join(known)})")
    else:
        values = parse_values(spec)
        if sd_unet and len(values) in LBW_ORDERS and len(values) not in accepted_lengths(arch):
            ratios = _lbw_ratios(arch, values, LBW_ORDERS[len(values)])
        elif len(values) in accepted_lengths(arch):
            ratios = resolve_ratios(arch, 1.0, values)
        else:
            takes = sorted({*accepted_lengths(arch), *(LBW_ORDERS if sd_unet else ())}, reverse=True)
            raise RecipeError(f"LoRA blocks for {arch} take {', '.join(map(str, takes))} values, got {len(values)}")
    for name in _OUTSIDE:
        if name in ratios:
            ratios[name] = 1.0
    return ratios
