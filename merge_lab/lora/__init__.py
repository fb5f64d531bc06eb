"""LoRAs: read (kohya, LyCORIS, diffusers / PEFT, Flux formats), matched to a checkpoint's layers, baked
into it (alone or after a merge, in the same pass), merged with each other and extracted from two models."""

from merge_lab.lora.patches import LoraPlan, LoraSpec, plan_loras

__all__ = ["LoraPlan", "LoraSpec", "plan_loras"]
