"""The block map (MBW): which block each key belongs to, and the ratio of every block.

Main blocks, in the order of the 26 / 20-value strings users already have (SuperMerger's order):
SD1/SD2 ``BASE, IN00..IN11, M00, OUT00..OUT11``; SDXL ``BASE, IN00..IN08, M00, OUT00..OUT08``.

Where the peers disagree we use named extra blocks that *follow* a main block unless set themselves,
so a 26/20-value string gives SuperMerger's result while each can still be set on its own:

- ``TIME``  UNet ``time_embed.*`` (and SDXL ``label_emb.*``), follows IN00 (SuperMerger, sd-meh);
- ``OUT``   the final ``out.0`` / ``out.2`` layers, follows OUT11 (SDXL: OUT08);
- ``VAE``   ``first_stage_model.*``, follows BASE (SuperMerger merges the VAE at BASE);
- ``TE1`` / ``TE2``  SDXL's two text encoders, follow BASE (SD1/SD2 text encoders are BASE itself).

Keys that are never merged (block ``None``) are of two kinds, both copied from the first model that has them:
*kept* keys (``position_ids``, ``logit_scale``, the ``v_pred`` / ``ztsnr`` markers, ``denoiser.sigmas``) and
*training leftovers* (EMA copies ``model_ema.*``, DDPM schedule buffers, a VAE's training loss), which
``--prune`` drops. Any other key is not part of the architecture as we know it: ``key_role`` says
"unknown" and the merge refuses it rather than copy it unmerged.

The SDXL refiner (four UNet levels, like SD1/SD2) takes the 26-value order; its one text encoder
(OpenCLIP-G) is BASE.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from merge_lab.archs.layouts import (
    REFINER_TE_PREFIX,
    SD1_TE_PREFIX,
    SD2_TE_PREFIX,
    SDXL_TE1_PREFIX,
    SDXL_TE2_PREFIX,
    UNET_PREFIX,
    VAE_PREFIX,
)
from merge_lab.errors import RecipeError

_UNET_BLOCK_COUNT = {"sd1": 12, "sd2": 12, "sdxl": 9, "sdxl-refiner": 12}
_TEXT_ENCODER_PREFIXES = {"sd1": (SD1_TE_PREFIX,), "sd2": (SD2_TE_PREFIX,), "sdxl-refiner": (REFINER_TE_PREFIX,)}


def main_blocks(arch: str) -> list[str]:
    n = _UNET_BLOCK_COUNT[arch]
    return ["BASE", *(f"IN{i:02d}" for i in range(n)), "M00", *(f"OUT{i:02d}" for i in range(n))]


def extra_blocks(arch: str) -> dict[str, str]:
    """Named extra blocks and the main block each follows when not set itself."""
    last_out = f"OUT{_UNET_BLOCK_COUNT[arch] - 1:02d}"
    extras = {"TIME": "IN00", "OUT": last_out, "VAE": "BASE"}
    if arch == "sdxl":
        extras.update({"TE1": "BASE", "TE2": "BASE"})
    return extras


def all_blocks(arch: str) -> list[str]:
    return main_blocks(arch) + list(extra_blocks(arch))


_NEVER_MERGED_SUFFIXES = ("position_ids", "logit_scale")
# Markers and buffers hosts read, kept as they are (even with --prune): NoobAI-style v-prediction SDXL
# files carry empty `v_pred` / `ztsnr` tensors that the web UIs test for; sgm's denoiser keeps its sigmas.
KEPT_KEYS = ("v_pred", "ztsnr", "denoiser.sigmas")
# What training leaves in a checkpoint and no host needs: the EMA copy (LDM names it model_ema.<name without
# dots>), the DDPM schedule buffers (the hosts build their own), a VAE's training loss (LPIPS, discriminator).
_DDPM_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights", "logvar")
_LEFTOVER_PREFIXES = ("model_ema.", VAE_PREFIX + "loss.")
_SCALED_FP8_SUFFIXES = (".scale_weight", ".scale_input")


def key_role(key: str, arch: str) -> str:
    """"merge" (a key of a block), "kept" (never merged, always kept), "leftover" (never merged, dropped by
    --prune) or "unknown" (not part of `arch` as we know it)."""
    if key == "scaled_fp8" or key.endswith(_SCALED_FP8_SUFFIXES):
        return "unknown"  # ComfyUI's scaled fp8: a weight is only right with its scale, which we do not apply
    if key.startswith(_LEFTOVER_PREFIXES) or key in _DDPM_BUFFERS:
        return "leftover"
    if key in KEPT_KEYS:
        return "kept"
    if block_of(key, arch) is not None:
        return "merge"
    if key.endswith(_NEVER_MERGED_SUFFIXES) and _in_text_encoder(key, arch):
        return "kept"
    return "unknown"


def _in_text_encoder(key: str, arch: str) -> bool:
    if arch == "sdxl":
        return key.startswith((SDXL_TE1_PREFIX, SDXL_TE2_PREFIX))
    return key.startswith(_TEXT_ENCODER_PREFIXES[arch])
_INPUT = re.compile(r"^input_blocks\.(\d+)\.")
_OUTPUT = re.compile(r"^output_blocks\.(\d+)\.")


def block_of(key: str, arch: str) -> str | None:
    """The block of `key`, or None for keys that are never merged or not part of `arch` (see key_role)."""
    if key.endswith(_NEVER_MERGED_SUFFIXES):
        return None
    if key.startswith(UNET_PREFIX):
        rest = key[len(UNET_PREFIX):]
        m = _INPUT.match(rest)
        if m:
            return _checked_index("IN", int(m.group(1)), arch)
        m = _OUTPUT.match(rest)
        if m:
            return _checked_index("OUT", int(m.group(1)), arch)
        if rest.startswith("middle_block."):
            return "M00"
        if rest.startswith("time_embed.") or (rest.startswith("label_emb.") and arch in ("sdxl", "sdxl-refiner")):
            return "TIME"
        if rest.startswith("out."):
            return "OUT"
        return None
    if key.startswith(VAE_PREFIX):
        return "VAE"
    if arch == "sdxl":
        if key.startswith(SDXL_TE1_PREFIX):
            return "TE1"
        if key.startswith(SDXL_TE2_PREFIX):
            return "TE2"
        return None
    if key.startswith(_TEXT_ENCODER_PREFIXES[arch]):
        return "BASE"
    return None


def _checked_index(kind: str, index: int, arch: str) -> str | None:
    if index >= _UNET_BLOCK_COUNT[arch]:
        return None  # not part of this architecture's UNet: copied, never merged
    return f"{kind}{index:02d}"


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
    """A 26-value SD string used on SDXL keeps BASE, IN00..IN08, M00, OUT00..OUT08 (SuperMerger drops
    IN09-IN11 and OUT09-OUT11 the same way); other lengths are returned unchanged."""
    if arch == "sdxl" and len(values) == 26:
        return [*values[:10], values[13], *values[14:23]]
    return values


def resolve_ratios(arch: str, alpha: float, values: Sequence[float] | None = None,
                   named: Mapping[str, float] | None = None) -> dict[str, float]:
    """The ratio of every block (main and extra) of `arch`.

    `alpha` is the default; `values` (26 for SD1/SD2, 20 for SDXL, or 25 / 19 without BASE, which then
    takes `alpha`; a 26-value string on SDXL drops IN09-IN11 and OUT09-OUT11) set the main blocks, extra
    blocks follow their main block; `named` sets any block.
    """
    mains = main_blocks(arch)
    ratios = dict.fromkeys(mains, float(alpha))
    if values is not None:
        values = list(values)
        if len(values) in (len(mains) - 1, 25):
            values = [float(alpha), *values]
        values = to_arch_values(values, arch)
        if len(values) != len(mains):
            raise RecipeError(
                f"{arch} takes {len(mains)} block ratios ({mains[0]}, {mains[1]}..{mains[-1]}) "
                f"or {len(mains) - 1} without BASE, got {len(values)}"
            )
        ratios.update(zip(mains, (float(v) for v in values)))
    extras = extra_blocks(arch)
    for name, parent in extras.items():
        ratios[name] = ratios[parent]
    for name, value in (named or {}).items():
        upper = name.upper()
        if upper not in ratios:
            raise RecipeError(f"unknown block {name!r} for {arch} (valid: {', '.join(all_blocks(arch))})")
        ratios[upper] = float(value)
        if upper in mains:  # extras that follow a main block set by name follow it, unless set too
            for extra, parent in extras.items():
                if parent == upper and not any(n.upper() == extra for n in named):
                    ratios[extra] = float(value)
    return ratios
