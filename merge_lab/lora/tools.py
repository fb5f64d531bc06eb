"""LoRAs merged into one LoRA, and a LoRA extracted from two checkpoints.

- merge: exact (the ranks concatenated: up = [s₁·α₁/r₁·up₁ | s₂·α₂/r₂·up₂ …], down = [down₁; down₂ …],
  alpha = the summed rank, so ΔW = Σ sᵢ·ΔWᵢ to float rounding), or with a rank: the summed ΔW of every
  layer truncated by SVD (any LoRA type but DoRA, whose ΔW depends on the base weight).
- extract: ΔW = FT − BASE per layer, truncated by SVD to the rank (3×3 convolutions to `conv_rank`, kohya's
  `--conv_dim`), written in kohya's format (`lora_unet_…` / `lora_te…_…` + `.lora_down.weight`,
  `.lora_up.weight`, `.alpha` = rank, so scale 1) with the module names kohya writes for the architecture,
  which A1111, Forge and ComfyUI load. Unlike kohya's extract_lora_from_models.py the factors are not
  clamped to the 99th percentile (which adds an error the report could not state). The inputs are read one
  layer at a time; the LoRA being written (a few hundred MB at rank 64 on SDXL) is held until it is
  written in one go, so that no partial file is ever left.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field

import torch

import merge_lab_methods.lora as lora_math
from merge_lab import __version__, archs
from merge_lab.archs import current_key_name
from merge_lab.archs.detect import detect
from merge_lab.errors import CheckpointError, RecipeError
from merge_lab.io.checkpoints import open_checkpoint
from merge_lab.io.hashing import sha256_file
from merge_lab.io.writer import EXISTS_MESSAGE, OutputEntry, SafetensorsWriter
from merge_lab.lora.files import LoraFile, open_lora
from merge_lab.lora.patches import LoraSpec, architecture_hint, delta_shape
from merge_lab.lora.targets import UNET, lora_targets

LORA_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ST_DTYPE = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
# layers a LoRA loader does not patch (A1111's networks refuse an Embedding; T5's relative bias is one)
_NOT_ADAPTED = ("embeddings.", "embed_tokens", "shared.weight", "relative_attention_bias", "token_embedding",
                "positional_embedding")


@dataclass
class LoraReport:
    out: str
    modules: int
    rank: str
    seconds: float
    sha256: str
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"wrote {self.out}", f"  {self.modules} modules, rank {self.rank}, {self.seconds:.2f} s",
                 f"  sha256 {self.sha256}"]
        return "\n".join(lines + [f"  {n}" for n in self.notes])


def _write(out: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str], overwrite: bool) -> str:
    entries = [OutputEntry(k, _ST_DTYPE[t.dtype], tuple(t.shape)) for k, t in tensors.items()]
    with SafetensorsWriter(out, entries, metadata, overwrite=overwrite) as writer:
        for key, t in tensors.items():
            writer.write(key, t.contiguous())
        return writer.finish()


def _refuse_existing(out: str, overwrite: bool) -> None:
    if not overwrite and os.path.lexists(out):
        raise CheckpointError(EXISTS_MESSAGE, path=out)


def _factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """(up, down, relative error, largest singular value) of ΔW (a layer's shape) truncated to `rank`:
    up · down is the best rank-r approximation (Eckart–Young); the error is ‖ΔW − up·down‖ / ‖ΔW‖."""
    mat = delta.reshape(delta.shape[0], -1).to(torch.float32)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    r = max(1, min(rank, s.numel()))
    total = float(s.square().sum())
    error = math.sqrt(max(0.0, float(s[r:].square().sum())) / total) if total > 0 else 0.0
    up, down = u[:, :r] * s[:r], vh[:r]
    if delta.dim() == 4:
        down = down.reshape(r, *delta.shape[1:])
        up = up[:, :, None, None]
    return up, down, error, float(s[0]) if s.numel() else 0.0


def _put(tensors: dict, name: str, up: torch.Tensor, down: torch.Tensor, alpha: float, dtype) -> None:
    tensors[f"{name}.lora_down.weight"] = down.to(dtype)
    tensors[f"{name}.lora_up.weight"] = up.to(dtype)
    tensors[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=dtype)


# ---- merge ---------------------------------------------------------------------------------------------
def merge_loras(specs: list[LoraSpec], out: str, *, rank: int | None = None, dtype: str | None = None,
                overwrite: bool = False) -> LoraReport:
    """Merge LoRA files (each at its strength) into one LoRA file. Without `rank`, exact; with it, every
    layer's summed ΔW re-ranked by SVD."""
    if not specs:
        raise RecipeError("no --lora given")
    if rank is not None and rank < 1:
        raise RecipeError(f"--rank must be at least 1, got {rank}")
    _refuse_existing(out, overwrite)
    started = time.perf_counter()
    files: list[LoraFile] = []
    try:
        for spec in specs:
            files.append(open_lora(spec.path))
        hints = {architecture_hint(f.modules) for f in files} - {None}
        if len(hints) > 1:
            raise CheckpointError(f"the LoRAs are for different architectures ({', '.join(sorted(hints))}): "
                                  "they cannot be merged", path=files[-1].path)
        out_dtype = LORA_DTYPES[dtype] if dtype else _dominant_dtype(files[0])
        names: dict[str, list[int]] = {}
        for i, f in enumerate(files):
            for name in f.modules:
                names.setdefault(name, []).append(i)
        tensors: dict[str, torch.Tensor] = {}
        worst = 0.0
        ranks = set()
        for name, holders in names.items():
            if rank is None:
                up, down = _concatenated(name, [(files[i], specs[i].strength) for i in holders])
                _put(tensors, name, up, down, down.shape[0], out_dtype)
                ranks.add(down.shape[0])
            else:
                delta = _summed_delta(name, [(files[i], specs[i].strength) for i in holders])
                up, down, error, _ = _factors(delta, rank)
                worst = max(worst, error)
                _put(tensors, name, up, down, down.shape[0], out_dtype)
                ranks.add(down.shape[0])
        hashes = [sha256_file(f.path) for f in files]
        record = {"type": "lora-merge", "merge_lab": __version__, "rank": rank if rank is not None else "exact",
                  "loras": [{"name": os.path.basename(s.path), "strength": s.strength, "sha256": h}
                            for s, h in zip(specs, hashes)]}
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(max(ranks)),
                    "ss_network_alpha": str(max(ranks)), "sd_merge_recipe": json.dumps(record, sort_keys=True),
                    "sd_merge_models": json.dumps({h: {"name": os.path.basename(s.path), "strength": s.strength}
                                                   for s, h in zip(specs, hashes)}, sort_keys=True)}
        base_version = next((f.metadata["ss_base_model_version"] for f in files
                             if "ss_base_model_version" in f.metadata), None)
        if base_version:
            metadata["ss_base_model_version"] = base_version
        sha = _write(out, tensors, metadata, overwrite)
    finally:
        for f in files:
            f.close()
    notes = [f"largest SVD truncation error ‖ΔW − ΔW_r‖ / ‖ΔW‖ = {worst:.4g}"] if rank is not None else [
        "exact: the ranks concatenated"]
    shown = "exact" if rank is None else str(rank)
    if len(ranks) > 1 or rank is None:
        shown += f" ({min(ranks)}..{max(ranks)})" if len(ranks) > 1 else f" ({max(ranks)})"
    return LoraReport(out, len(names), shown, time.perf_counter() - started, sha, notes)


def _dominant_dtype(f: LoraFile) -> torch.dtype:
    counts: dict[str, int] = {}
    for m in f.modules.values():
        key = m.parts.get("up") or next(iter(m.parts.values()))
        d = f.reader.tensors[key].dtype
        counts[d] = counts.get(d, 0) + 1
    return {"F16": torch.float16, "BF16": torch.bfloat16}.get(max(counts, key=counts.get), torch.float32)


def _concatenated(name: str, parts: list[tuple[LoraFile, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    ups, downs = [], []
    for f, strength in parts:
        m = f.modules[name]
        if m.kind != "lora" or {"mid", "dora_scale"} & set(m.parts):
            what = "DoRA" if "dora_scale" in m.parts else "Tucker (lora_mid)" if "mid" in m.parts else m.kind
            raise CheckpointError(f"module {name!r} is {what}: its ranks cannot be concatenated exactly; merge "
                                  "with --rank R (re-ranked by SVD)", path=f.path, key=next(iter(m.parts.values())))
        up = f.tensor(m, "up").to(torch.float32)
        down = f.tensor(m, "down").to(torch.float32)
        alpha = f.alpha(m)
        scale = 1.0 if alpha is None else alpha / down.shape[0]
        if downs and (down.shape[1:] != downs[0].shape[1:] or up.shape[0] != ups[0].shape[0]):
            raise CheckpointError(f"module {name!r} has lora_down {list(down.shape)} / lora_up {list(up.shape)}, "
                                  f"which do not stack with the other LoRAs' {list(downs[0].shape)} / "
                                  f"{list(ups[0].shape)}", path=f.path, key=m.parts["down"])
        ups.append(up * (float(strength) * scale))
        downs.append(down)
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def _summed_delta(name: str, parts: list[tuple[LoraFile, float]]) -> torch.Tensor:
    total = None
    for f, strength in parts:
        m = f.modules[name]
        key = next(iter(m.parts.values()))
        if "dora_scale" in m.parts:
            raise CheckpointError(f"module {name!r} is DoRA, whose change depends on the model's weight: it "
                                  "cannot be merged without one (bake it into the checkpoint instead)",
                                  path=f.path, key=key)
        if m.kind == "full":
            raise CheckpointError(f"module {name!r} is a full weight difference (diff), not a low-rank one",
                                  path=f.path, key=key)
        shape = tuple(delta_shape(f, m))
        read = f.tensor
        alpha = f.alpha(m)
        if m.kind == "lora":
            d = lora_math.lora_delta(read(m, "up"), read(m, "down"), alpha=alpha, mid=read(m, "mid"), shape=shape,
                                     strength=strength)
        elif m.kind == "loha":
            d = lora_math.loha_delta(read(m, "w1a"), read(m, "w1b"), read(m, "w2a"), read(m, "w2b"), alpha=alpha,
                                     t1=read(m, "t1"), t2=read(m, "t2"), shape=shape, strength=strength)
        else:
            d = lora_math.lokr_delta(**{p: read(m, p) for p in ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2")},
                                     alpha=alpha, shape=shape, strength=strength)
        if total is not None and total.shape != d.shape:
            if total.numel() == d.numel() and total.shape[0] == d.shape[0]:
                d = d.reshape(total.shape)  # a linear LoRA and a 1×1 LoCon of the same layer
            else:
                raise CheckpointError(f"module {name!r} makes a ΔW of shape {list(d.shape)}, the other LoRAs "
                                      f"{list(total.shape)}", path=f.path, key=key)
        total = d if total is None else total + d
    return total


# ---- extract ------------------------------------------------------------------------------------------
def kohya_module_names(arch: str, shapes: dict[str, tuple[int, ...]], *, text_encoder: bool
                       ) -> list[tuple[str, str, tuple[int, int] | None]]:
    """(kohya module name, checkpoint key, rows) for every layer a LoRA of `arch` adapts, in checkpoint
    order: SD1 / SD2 UNets in kohya's diffusers spelling, SDXL / Flux / SD3 in the LDM (BFL, MMDiT) one,
    OpenCLIP q / k / v as the thirds of in_proj_weight, as kohya's trainers name them."""
    targets = lora_targets(arch, shapes)
    by_layer: dict[tuple[str, tuple[int, int] | None], list[str]] = {}
    for name, t in targets.items():
        if name.startswith(("lora_unet_", "lora_te")) and not t.swap_halves:
            by_layer.setdefault((t.key, t.rows), []).append(name)
    diffusers_unet = arch in ("sd1", "sd2")
    out = []
    for key, shape in shapes.items():
        if len(shape) not in (2, 4) or not key.endswith(".weight"):
            continue
        unet = key.startswith(UNET)
        if not unet and (not text_encoder or any(m in key for m in _NOT_ADAPTED)):
            continue
        rows_options = [None] if unet else sorted({rows for (k, rows) in by_layer if k == key},
                                                  key=lambda r: (r is None, r))
        for rows in rows_options:
            names = by_layer.get((key, rows))
            if not names:
                continue
            if unet:
                ldm = "lora_unet_" + key[len(UNET): -len(".weight")].replace(".", "_")
                other = [n for n in names if n != ldm]
                name = other[0] if diffusers_unet and other else ldm if ldm in names else names[0]
            else:
                name = sorted(names)[0]
            out.append((name, key, rows))
    return out


def extract_lora(model: str, base: str, out: str, *, rank: int, conv_rank: int | None = None,
                 threshold: float = 0.0, text_encoder: bool = False, dtype: str | None = None,
                 overwrite: bool = False, notify=None, progress: bool = True) -> LoraReport:
    """A kohya LoRA of MODEL − BASE, layer by layer (truncated SVD)."""
    if rank < 1 or (conv_rank is not None and conv_rank < 1):
        raise RecipeError("--rank and --conv-rank must be at least 1")
    _refuse_existing(out, overwrite)
    out_dtype = LORA_DTYPES[dtype or "fp32"]
    started = time.perf_counter()
    readers = []
    try:
        for p in (model, base):
            readers.append(open_checkpoint(p, current_key_name))
        ft, bs = readers
        a_arch = detect(ft.tensors, ft.metadata, model)
        b_arch = detect(bs.tensors, bs.metadata, base)
        if a_arch.arch != b_arch.arch:
            raise RecipeError(f"is {b_arch.arch} but {os.path.basename(model)} is {a_arch.arch}: a LoRA is the "
                              "difference of two models of one architecture", path=base)
        arch = a_arch.arch
        shapes = {k: tuple(t.shape) for k, t in ft.tensors.items()}
        layers = kohya_module_names(arch, shapes, text_encoder=text_encoder)
        for _, key, _ in layers:
            if key not in bs.tensors or tuple(bs.tensors[key].shape) != shapes[key]:
                got = list(bs.tensors[key].shape) if key in bs.tensors else "missing"
                raise CheckpointError(f"is {got} in the base but {list(shapes[key])} in {os.path.basename(model)}",
                                      path=base, key=key)
        tensors: dict[str, torch.Tensor] = {}
        errors: list[tuple[float, str]] = []
        skipped_same = skipped_small = skipped_conv = 0
        from tqdm.auto import tqdm

        for name, key, rows in tqdm(layers, desc="extract", unit="layer", disable=not progress, leave=False):
            shape = shapes[key]
            conv3 = len(shape) == 4 and shape[2:] != (1, 1)
            r = conv_rank if conv3 else rank
            if r is None:
                skipped_conv += 1
                continue
            delta = ft.read(key, rows).to(torch.float32) - bs.read(key, rows).to(torch.float32)
            if not bool(delta.any()):
                skipped_same += 1
                continue
            up, down, error, top = _factors(delta, r)
            if top <= threshold:
                skipped_small += 1
                continue
            errors.append((error, name))
            _put(tensors, name, up, down, down.shape[0], out_dtype)
        if not tensors:
            raise RecipeError(f"{os.path.basename(model)} and {os.path.basename(base)} do not differ in any layer a "
                              "LoRA adapts" + (" above the threshold" if skipped_small else ""), path=model)
        spec = archs.get(arch)
        record = {"type": "lora-extract", "merge_lab": __version__, "rank": rank, "conv_rank": conv_rank,
                  "threshold": threshold, "text_encoder": text_encoder,
                  "model": {"name": os.path.basename(model), "sha256": sha256_file(model)},
                  "base": {"name": os.path.basename(base), "sha256": sha256_file(base)}}
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                    "ss_network_alpha": str(rank), "modelspec.architecture": spec.modelspec + "/lora",
                    "modelspec.title": os.path.splitext(os.path.basename(out))[0],
                    "sd_merge_recipe": json.dumps(record, sort_keys=True)}
        if conv_rank is not None:
            metadata.update({"ss_network_args": json.dumps({"conv_dim": str(conv_rank), "conv_alpha": str(conv_rank)})})
        sha = _write(out, tensors, metadata, overwrite)
    finally:
        for r in readers:
            r.close()
    worst, worst_name = max(errors)
    mean = sum(e for e, _ in errors) / len(errors)
    notes = [f"SVD truncation error ‖ΔW − ΔW_r‖ / ‖ΔW‖: mean {mean:.4g}, largest {worst:.4g} ({worst_name})"]
    if skipped_same:
        notes.append(f"{skipped_same} layers are the same in both models (no module written)")
    if skipped_small:
        notes.append(f"{skipped_small} layers' largest singular value is at most {threshold} (skipped)")
    if skipped_conv:
        notes.append(f"{skipped_conv} 3×3 convolutions not extracted (--conv-rank R2 extracts them)")
    if notify is not None:
        for n in notes[1:]:
            notify(n)
    ranks = f"{rank}" + (f", conv {conv_rank}" if conv_rank is not None else "")
    return LoraReport(out, len(errors), ranks, time.perf_counter() - started, sha, notes)
