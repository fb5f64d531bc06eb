"""Test helpers: an independent statement of the block map, and small utilities."""

from __future__ import annotations

import re

import torch


def expected_block(key: str, arch: str):
    """SPEC §2 and our extra-block rule, written independently of merge_lab.blocks."""
    if key.endswith(("position_ids", "logit_scale")):
        return None
    m = re.match(r"model\.diffusion_model\.(input|output)_blocks\.(\d+)\.", key)
    if m:
        return ("IN" if m.group(1) == "input" else "OUT") + f"{int(m.group(2)):02d}"
    if key.startswith("model.diffusion_model.middle_block."):
        return "M00"
    if re.match(r"model\.diffusion_model\.(time_embed|label_emb)\.", key):
        return "TIME"
    if re.match(r"model\.diffusion_model\.out\.[02]\.", key):
        return "OUT"
    if key.startswith("first_stage_model."):
        return "VAE"
    if key.startswith("conditioner.embedders."):
        return {"0": "TE1", "1": "TE2"}[key.split(".")[2]]
    if key.startswith("cond_stage_model."):
        return "BASE"
    return None


def mergeable(key: str, tensor: torch.Tensor, arch: str) -> bool:
    return tensor.is_floating_point() and expected_block(key, arch) is not None
