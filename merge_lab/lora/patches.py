"""LoRAs planned onto a checkpoint's keys (from headers only), and their ΔW applied to a key's rows.

Every module of every LoRA is matched to a checkpoint layer (merge_lab.lora.targets) with a ΔW of that
layer's shape, or the bake is refused before anything is written: unmatched modules are listed
(`unmatched="warn"` names them and goes on), a LoRA whose names are another architecture's is refused.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

import merge_lab_methods.lora as lora_math
from merge_lab import archs
from merge_lab.archs.blocks import block_of
from merge_lab.errors import CheckpointError, RecipeError
from merge_lab.io.hashing import sha256_file
from merge_lab.lora.blocks import lora_block_ratios
from merge_lab.lora.files import LoraFile, LoraModule, open_lora
from merge_lab.lora.targets import Target, lora_targets

UNMATCHED_CHOICES = ("error", "warn")
LISTED = 8  # unmatched modules named in the one-line error


@dataclass(frozen=True)
class LoraSpec:
    """One LoRA of a recipe: `loras: [{path, strength, blocks}]`."""

    path: str
    strength: float = 1.0
    blocks: str | list[float] | None = None

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """`FILE[:STRENGTH]` as the CLI takes it (a Windows drive letter is not a strength)."""
        path, sep, tail = text.rpartition(":")
        if sep and path and not (len(path) == 1 and path.isalpha()):
            try:
                return cls(path, float(tail))
            except ValueError:
                pass
        return cls(text)

    def to_dict(self) -> dict:
        out = {"path": self.path, "strength": self.strength}
        if self.blocks not in (None, "", []):
            out["blocks"] = self.blocks
        return out


@dataclass
class Patch:
    lora: int  # index into LoraPlan.files
    module: LoraModule
    target: Target
    scale: float  # strength × the block's weight
    layer: tuple[int, ...] = ()  # the shape ΔW takes: the key's, or its rows' when the target is a row range
    part: str = "weight"  # "weight", or "bias" for a full module's diff_b

    @property
    def dora(self) -> bool:
        return "dora_scale" in self.module.parts


@dataclass
class LoraPlan:
    arch: str
    specs: list[LoraSpec]
    files: list[LoraFile]
    patches: dict[str, list[Patch]] = field(default_factory=dict)  # checkpoint key -> its patches, in order
    unmatched: dict[int, list[str]] = field(default_factory=dict)
    hashes: list[str] = field(default_factory=list)

    def close(self) -> None:
        for f in self.files:
            f.close()

    @property
    def no_effect(self) -> bool:
        return all(p.scale == 0 for ps in self.patches.values() for p in ps)

    def needs_whole(self, key: str) -> bool:
        """A DoRA patch normalises over whole columns: its key is merged in one unit."""
        return any(p.dora for p in self.patches.get(key, ()))

    def records(self) -> list[dict]:
        """What the output's metadata records of each LoRA."""
        out = []
        for spec, f, sha in zip(self.specs, self.files, self.hashes or [None] * len(self.files)):
            record = {"name": os.path.basename(spec.path), "strength": spec.strength, "sha256": sha,
                      "modules": len(f.modules)}
            if spec.blocks not in (None, "", []):
                record["blocks"] = spec.blocks
            out.append({k: v for k, v in record.items() if v is not None})
        return out

    # ---- applying -----------------------------------------------------------------------------------
    def apply(self, key: str, weight: torch.Tensor, rows: tuple[int, int] | None) -> torch.Tensor:
        """`weight` (rows `rows` of checkpoint key `key`, any dtype) with every patch of the key added, in
        float32 (a new tensor)."""
        out = weight.to(torch.float32, copy=True)
        first = rows[0] if rows is not None else 0
        stop = rows[1] if rows is not None else (out.shape[0] if out.dim() else 1)
        for patch in self.patches[key]:
            if patch.scale == 0:
                continue
            t0, t1 = patch.target.rows or (0, patch.layer[0] if patch.layer else 1)
            lo, hi = max(t0, first), min(t1, stop)  # the module's rows inside this unit
            if lo >= hi:
                continue
            local = None if (lo, hi) == (t0, t1) else (lo - t0, hi - t0)
            view = out[lo - first:hi - first] if out.dim() else out
            if patch.dora:  # ΔW at strength 1, the strength applied to the decomposed weight
                delta = self.delta(patch, local, 1.0).reshape(view.shape)
                magnitude = self.files[patch.lora].tensor(patch.module, "dora_scale")
                view.copy_(lora_math.apply_dora(view, delta, magnitude, patch.scale))
            else:
                view.add_(self.delta(patch, local, patch.scale).reshape(view.shape))
        return out

    def delta(self, patch: Patch, rows: tuple[int, int] | None = None, strength: float = 1.0) -> torch.Tensor:
        """strength · ΔW of `patch` in its layer's shape, rows `rows` of it (None: all), float32."""
        shape = patch.layer
        f = self.files[patch.lora]
        m = patch.module
        alpha = f.alpha(m)
        read = f.tensor
        if patch.part == "bias":
            d = float(strength) * read(m, "diff_b").to(torch.float32).reshape(shape)
            return d if rows is None else d[rows[0]:rows[1]]
        swap = patch.target.swap_halves
        if m.kind == "lora" and "mid" not in m.parts and not swap:
            up_key = m.parts["up"]
            up = f.reader.read(up_key, rows) if rows is not None else f.reader.read(up_key)
            row_shape = (up.shape[0], *shape[1:])
            return lora_math.lora_delta(up, read(m, "down"), alpha=alpha, shape=row_shape, strength=strength)
        if m.kind == "loha" and not ({"t1", "t2"} & set(m.parts)) and not swap:
            w1a, w2a = (f.reader.read(m.parts[p], rows) if rows is not None else read(m, p) for p in ("w1a", "w2a"))
            return lora_math.loha_delta(w1a, read(m, "w1b"), w2a, read(m, "w2b"), alpha=alpha,
                                        shape=(w1a.shape[0], *shape[1:]), strength=strength)
        if m.kind == "lora":
            whole = lora_math.lora_delta(read(m, "up"), read(m, "down"), alpha=alpha, mid=read(m, "mid"),
                                         shape=shape, strength=strength)
        elif m.kind == "loha":
            whole = lora_math.loha_delta(read(m, "w1a"), read(m, "w1b"), read(m, "w2a"), read(m, "w2b"),
                                         alpha=alpha, t1=read(m, "t1"), t2=read(m, "t2"), shape=shape,
                                         strength=strength)
        elif m.kind == "lokr":
            whole = lora_math.lokr_delta(**{p: read(m, p) for p in ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2")},
                                         alpha=alpha, shape=shape, strength=strength)
        else:  # full
            whole = float(strength) * read(m, "diff").to(torch.float32).reshape(shape)
        if swap:  # diffusers' (scale, shift) -> BFL's (shift, scale)
            half = whole.shape[0] // 2
            whole = torch.cat([whole[half:], whole[:half]])
        return whole if rows is None else whole[rows[0]:rows[1]]


# ---- planning -----------------------------------------------------------------------------------------------
def _shape(f: LoraFile, m: LoraModule, part: str) -> tuple[int, ...] | None:
    key = m.parts.get(part)
    return None if key is None else f.reader.tensors[key].shape


def delta_shape(f: LoraFile, m: LoraModule) -> tuple[int, ...]:
    """The shape ΔW of a module has before it is reshaped onto its layer (from the header)."""
    s = lambda part: _shape(f, m, part)  # noqa: E731
    if m.kind == "lora":
        up, down, mid = s("up"), s("down"), s("mid")
        if up is None or down is None or len(up) < 2 or len(down) < 2 or up[1] != down[0]:
            raise CheckpointError(f"module {m.name!r}: lora_up {list(up or ())} and lora_down {list(down or ())} "
                                  "do not multiply (ranks differ)", path=f.path, key=m.parts.get("up"))
        return (up[0], down[1], *(mid[2:] if mid else down[2:]))
    if m.kind == "loha":
        w1a, w1b, t1 = s("w1a"), s("w1b"), s("t1")
        if t1 is not None:
            return (w1a[1], w1b[1], *t1[2:])
        return (w1a[0], *w1b[1:])
    if m.kind == "lokr":
        w1 = s("w1") or (s("w1a")[0], s("w1b")[1])
        w2 = s("w2") or ((s("w2a")[1], s("w2b")[1], *s("t2")[2:]) if s("t2") else (s("w2a")[0], *s("w2b")[1:]))
        return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
    return s("diff") or s("diff_b")


def _fits(delta: tuple[int, ...], layer: tuple[int, ...]) -> bool:
    """ΔW fits a layer of this shape: the same rows and elements (a linear LoRA on a 1×1 convolution and
    back, or LoHa / LoKr factors that reshape onto a k×k kernel)."""
    return bool(delta) and delta[0] == layer[0] and math.prod(delta) == math.prod(layer)


_HINTS = (("flux", ("double_blocks", "single_blocks", "single_transformer_blocks")),
          ("sd3", ("joint_blocks",)),
          ("sdxl", ("lora_te1_", "lora_te2_", "text_encoder_2.")))


def architecture_hint(modules: Mapping[str, LoraModule]) -> str | None:
    """The family a LoRA's names say (flux, sd3, sdxl), or None when they say nothing beyond an LDM UNet."""
    for family, marks in _HINTS:
        if any(mark in name for name in modules for mark in marks):
            return family
    return None


def _family(arch: str) -> str:
    if arch.startswith("flux") or arch == "chroma":
        return "flux"
    if arch.startswith("sd3"):
        return "sd3"
    return "sdxl" if arch.startswith("sdxl") else "sd"


_FAMILY_TITLES = {"flux": "Flux.1 / Chroma", "sd3": "SD3.x", "sdxl": "SDXL", "sd": "SD1.x / SD2.x"}


def plan_loras(arch: str, shapes: Mapping[str, tuple[int, ...]], specs: list[LoraSpec], *,
               unmatched: str = "error", model_path: str | None = None, hash_files: bool = True,
               notify: Callable[[str], None] | None = None) -> LoraPlan:
    """Open the LoRAs and plan their patches onto a checkpoint of `arch` with keys `shapes`."""
    if unmatched not in UNMATCHED_CHOICES:
        raise RecipeError(f"lora_unmatched must be one of {', '.join(UNMATCHED_CHOICES)}, got {unmatched!r}")
    plan = LoraPlan(arch, list(specs), [])
    try:
        targets = lora_targets(arch, shapes)
        title = archs.get(arch).title
        for index, spec in enumerate(specs):
            f = open_lora(spec.path)
            plan.files.append(f)
            hint = architecture_hint(f.modules)
            family = _family(arch)
            if hint is not None and hint != family and not (hint == "sdxl" and family == "sd3"):
                raise CheckpointError(f"is a LoRA for {_FAMILY_TITLES[hint]} (its module names); the model is "
                                      f"{title}", path=f.path)
            ratios = lora_block_ratios(arch, spec.blocks)
            missing = []
            for name, module in f.modules.items():
                target = targets.get(name)
                if target is None:
                    missing.append(name)
                    continue
                layer = shapes[target.key]
                layer = (target.rows[1] - target.rows[0], *layer[1:]) if target.rows else layer
                if module.kind == "full" and "diff" not in module.parts:
                    parts = [("bias", "diff_b")]
                else:
                    parts = [("weight", None)] + ([("bias", "diff_b")] if "diff_b" in module.parts else [])
                for part, _ in parts:
                    key = target.key if part == "weight" else target.key[: -len("weight")] + "bias"
                    if part == "bias":
                        if key not in shapes:
                            raise CheckpointError(f"module {name!r} has a bias difference but {key} is not in the "
                                                  "model", path=f.path, key=module.parts["diff_b"])
                        got = _shape(f, module, "diff_b")
                        want = (target.rows[1] - target.rows[0],) if target.rows else shapes[key]
                    else:
                        got, want = delta_shape(f, module), layer
                    if not _fits(tuple(got), tuple(want)):
                        raise CheckpointError(f"module {name!r} makes a ΔW of shape {list(got)}, but {key} is "
                                              f"{list(want)} in the model: a LoRA for another architecture or "
                                              "size?", path=f.path, key=next(iter(module.parts.values())))
                    block = block_of(target.key, arch)
                    scale = spec.strength * ratios.get(block, 1.0) if block is not None else spec.strength
                    plan.patches.setdefault(key, []).append(Patch(index, module, target, scale, tuple(want),
                                                                  part))
            if missing:
                plan.unmatched[index] = missing
                shown = ", ".join(sorted(missing)[:LISTED]) + (f" and {len(missing) - LISTED} more"
                                                               if len(missing) > LISTED else "")
                message = (f"{len(missing)} of {len(f.modules)} LoRA modules match no layer of the model "
                           f"({title}{', ' + os.path.basename(model_path) if model_path else ''}): {shown}")
                if unmatched == "error" or len(missing) == len(f.modules):
                    raise CheckpointError(message + ("" if len(missing) == len(f.modules) else
                                                     " (--lora-unmatched warn bakes the others)"), path=f.path)
                if notify is not None:
                    notify(f"warning: {f.path}: {message}; baking the other {len(f.modules) - len(missing)}")
        if hash_files:
            plan.hashes = [sha256_file(f.path) for f in plan.files]
        if plan.no_effect and notify is not None:
            notify("warning: every LoRA strength (times its block weights) is 0: the LoRAs change nothing")
        return plan
    except BaseException:
        plan.close()
        raise
