"""What the LDM-UNet architectures (SD1, SD2, SDXL, the SDXL refiner) share: the single-file (LDM / A1111)
UNet's block scheme, its structural signature, its variants and the keys that are never merged.

Main blocks, in the order of the value strings users already have (SuperMerger's order):
``BASE, IN00..IN<n-1>, M00, OUT00..OUT<n-1>``. Where the peers disagree we use named extra blocks that
*follow* a main block unless set themselves, so a value string gives SuperMerger's result while each can
still be set on its own: ``TIME`` (``time_embed.*``, SDXL ``label_emb.*``) follows IN00 (SuperMerger,
sd-meh); ``OUT`` (the final ``out.0`` / ``out.2``) follows the last OUT block; ``VAE`` follows BASE
(SuperMerger merges the VAE at BASE); SDXL's two text encoders are ``TE1`` / ``TE2`` following BASE.

Keys never merged are of two kinds, both copied from the first model that has them: *kept* keys
(``position_ids``, ``logit_scale``, the ``v_pred`` / ``ztsnr`` markers, ``denoiser.sigmas``) and *training
leftovers* (EMA copies ``model_ema.*``, DDPM schedule buffers, a VAE's training loss), which ``--prune`` drops.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from merge_lab.archs.layouts import UNET_PREFIX, VAE_PREFIX, ModelLayout
from merge_lab.archs.registry import ArchSpec

NEVER_MERGED_SUFFIXES = ("position_ids", "logit_scale")
# Markers and buffers hosts read, kept as they are (even with --prune): NoobAI-style v-prediction SDXL
# files carry empty `v_pred` / `ztsnr` tensors that the web UIs test for; sgm's denoiser keeps its sigmas.
KEPT_KEYS = ("v_pred", "ztsnr", "denoiser.sigmas")
# What training leaves in a checkpoint and no host needs: the EMA copy (LDM names it model_ema.<name without
# dots>), the DDPM schedule buffers (the hosts build their own), a VAE's training loss (LPIPS, discriminator).
DDPM_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                "posterior_mean_coef1", "posterior_mean_coef2", "lvlb_weights", "logvar")
LEFTOVER_PREFIXES = ("model_ema.", VAE_PREFIX + "loss.")

FIRST_CONV = f"{UNET_PREFIX}input_blocks.0.0.weight"
LABEL_EMB = f"{UNET_PREFIX}label_emb.0.0.weight"
PROBE_KEYS = (FIRST_CONV,)



def main_blocks(n: int) -> tuple[str, ...]:
    return ("BASE", *(f"IN{i:02d}" for i in range(n)), "M00", *(f"OUT{i:02d}" for i in range(n)))


def extra_blocks(n: int, text_encoders: tuple[str, ...] = ()) -> dict[str, str]:
    return {"TIME": "IN00", "OUT": f"OUT{n - 1:02d}", "VAE": "BASE", **dict.fromkeys(text_encoders, "BASE")}


def slider_columns(n: int) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    return (tuple(f"IN{i:02d}" for i in range(n)), ("BASE", "M00"), tuple(f"OUT{i:02d}" for i in range(n)))


def block_prefixes(n: int, text_encoders: Mapping[str, str], *, label_emb: bool = False
                   ) -> tuple[tuple[str, str], ...]:
    """The UNet's n input and n output blocks, its middle block, time (and label) embedding and final layers,
    the VAE, and each text encoder prefix -> its block."""
    u = UNET_PREFIX
    out = [(f"{u}input_blocks.{i}.", f"IN{i:02d}") for i in range(n)]
    out += [(f"{u}middle_block.", "M00")]
    out += [(f"{u}output_blocks.{i}.", f"OUT{i:02d}") for i in range(n)]
    out += [(f"{u}time_embed.", "TIME"), (f"{u}out.", "OUT"), (VAE_PREFIX, "VAE")]
    if label_emb:
        out.append((f"{u}label_emb.", "TIME"))
    out += [(prefix, block) for prefix, block in text_encoders.items()]
    return tuple(out)


def signature(tensors: Mapping[str, Any]) -> tuple[int, bool, bool | None]:
    """(number of input blocks, whether it has SDXL's label embedding, whether the transformer projections
    are 1×1 convs (SD1) rather than Linear (SD2, SDXL); None without attention)."""
    start = len(UNET_PREFIX) + len("input_blocks.")
    inputs = {int(k[start:].split(".", 1)[0]) for k in tensors
              if k.startswith(UNET_PREFIX + "input_blocks.") and k[start:].split(".", 1)[0].isdigit()}
    proj = next((t for k, t in tensors.items() if k.startswith(UNET_PREFIX) and k.endswith(".proj_in.weight")),
                None)
    return max(inputs) + 1 if inputs else 0, LABEL_EMB in tensors, None if proj is None else len(proj.shape) == 4


def matcher(count: int, label_emb: bool, conv_proj: bool | None = None):
    """The `matches` test of a record: its input-block count, label embedding and (SD1/SD2) projection kind."""

    def matches(tensors: Mapping[str, Any]) -> bool:
        if FIRST_CONV not in tensors:
            return False
        n, label, conv = signature(tensors)
        return n == count and label == label_emb and (conv_proj is None or conv == conv_proj)

    return matches


def describe_unmatched(tensors: Mapping[str, Any]) -> str | None:
    """The UNet layout we found when no record took it ("12 input blocks, with label_emb")."""
    ldm_parts = tuple(UNET_PREFIX + part for part in ("input_blocks.", "middle_block.", "output_blocks."))
    if not any(k.startswith(ldm_parts) for k in tensors):
        return None  # not an LDM UNet (another family's record, if any, describes it)
    if FIRST_CONV not in tensors:
        return f"unknown UNet layout (no {FIRST_CONV})"
    n, label, _ = signature(tensors)
    return f"unknown UNet layout ({n} input blocks{', with label_emb' if label else ''})"


def variants(tensors: Mapping[str, Any], metadata: Mapping[str, str]) -> tuple[str, ...]:
    """inpaint (9 input channels), instruct-pix2pix (8), v-prediction (a `v_pred` key or the metadata)."""
    out = []
    first = tensors.get(FIRST_CONV)
    if first is not None and len(first.shape) == 4:
        if first.shape[1] == 9:
            out.append("inpaint")
        elif first.shape[1] == 8:
            out.append("instruct-pix2pix")
    prediction = metadata.get("modelspec.prediction_type", "").lower()
    if "v_pred" in tensors or prediction in ("v", "v-prediction", "v_prediction"):
        out.append("v-prediction")
    return tuple(out)


def spec(*, name: str, title: str, short: str, modelspec: str, layout: Callable[..., ModelLayout], n_blocks: int,
         label_emb: bool, conv_proj: bool | None = None, text_encoders: Mapping[str, tuple[str, str]],
         **fields: Any) -> ArchSpec:
    """An LDM-UNet record from what sets it apart: its n input / n output blocks, label embedding and
    projection kind (its structural test), and its text encoders (key prefix -> (component, block)); the
    block scheme, value order, presets, variants and never-merged keys are the family's. `fields` are
    the record's other ArchSpec fields (string_orders, key_aliases, preview, …)."""
    te_blocks = tuple(dict.fromkeys(block for _, block in text_encoders.values() if block != "BASE"))
    return ArchSpec(
        name=name, title=title, short=short, modelspec=modelspec,
        probe_keys=PROBE_KEYS,
        matches=matcher(n_blocks, label_emb=label_emb, conv_proj=conv_proj),
        components=(("unet", UNET_PREFIX), ("vae", VAE_PREFIX),
                    *((component, prefix) for prefix, (component, _) in text_encoders.items())),
        layout=layout,
        block_prefixes=block_prefixes(n_blocks, {p: b for p, (_, b) in text_encoders.items()}, label_emb=label_emb),
        main_blocks=main_blocks(n_blocks),
        extra_blocks=extra_blocks(n_blocks, te_blocks),
        preset_table="presets.tsv",
        slider_columns=slider_columns(n_blocks),
        # text encoders, time embedding, IN.., M00, OUT.., the final layers, VAE
        analysis_order=("BASE", *te_blocks, "TIME", *main_blocks(n_blocks)[1:], "OUT", "VAE"),
        variants=variants,
        describe_unmatched=describe_unmatched,
        never_merged_suffixes=NEVER_MERGED_SUFFIXES, kept_keys=KEPT_KEYS,
        leftover_prefixes=LEFTOVER_PREFIXES, leftover_keys=DDPM_BUFFERS,
        **fields,
    )
