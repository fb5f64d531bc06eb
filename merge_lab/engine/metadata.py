"""What the output says about how it was made: the inputs' hashes, the recipe hash (fingerprint) and the
safetensors metadata (`sd_merge_recipe`, `sd_merge_models`, modelspec). The recipe record itself is
MergePlan.recipe_record.

The plan's types are named here for annotations only: the plan imports this module, not the reverse.
"""

from __future__ import annotations

import contextlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from merge_lab import __version__, archs
from merge_lab.errors import CheckpointError
from merge_lab.io.hashing import legacy_hash, sha256_file

if TYPE_CHECKING:
    from merge_lab.engine.plan import Input, MergePlan


def _hash_inputs(inputs: list[Input]) -> dict[str, str]:
    paths = sorted({inp.path for inp in inputs})

    def one(path: str) -> str:
        try:
            return sha256_file(path)
        except OSError as e:
            raise CheckpointError(f"cannot read: {e.strerror or e}", path=path) from None

    with ThreadPoolExecutor(min(len(paths), os.cpu_count() or 1)) as pool:
        return dict(zip(paths, pool.map(one, paths)))


def fingerprint(plan: MergePlan) -> str:
    """A hash of everything that determines the merged weights (inputs by content when hashed)."""
    def ident(inp: Input) -> str:
        return plan.hashes.get(inp.path) or os.path.realpath(inp.path)

    r = plan.recipe
    data = {
        "method": plan.method.name,
        "models": [ident(m) for m in plan.models],
        "base": ident(plan.base) if plan.base else None,
        "ratios": plan.ratios,
        "key": plan.recipe.key or None,  # in order: the last match wins
        "params": plan.params,
        "weights": r.weights,
        "seed": r.seed if plan.method.randomized else None,
        # the drop-mask scheme: the same seed draws other masks than the torch.Generator blocks before it
        "masks": "splitmix64-bytes" if plan.method.randomized else None,
        "dtype": plan.out_dtype,
        "prune": r.prune,
        "precision": r.precision,
        "missing": r.missing,
        "nonfinite": r.nonfinite,
    }
    if plan.vae is not None:
        data["vae"] = ident(plan.vae)
    if r.discard or r.keep:
        data["discard"], data["keep"] = list(r.discard), list(r.keep)
    if plan.adjust_values:  # all zeros change nothing: the same hash as no adjust
        data["adjust"] = list(plan.adjust_values)
    if plan.loras is not None:  # by content when hashed; the strengths and block weights as applied
        data["loras"] = [{"file": sha or os.path.realpath(spec.path), "strength": spec.strength,
                          "blocks": spec.blocks}
                         for spec, sha in zip(plan.loras.specs, plan.loras.hashes or [None] * len(plan.loras.specs))]
        data["lora_unmatched"] = r.lora_unmatched
    import hashlib

    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def build_metadata(plan: MergePlan, title: str) -> dict[str, str]:
    models: dict[str, dict[str, Any]] = {}
    for inp in plan.inputs:
        sha = plan.hashes.get(inp.path)
        if not sha:
            continue
        try:
            entry: dict[str, Any] = {"name": inp.name, "legacy_hash": legacy_hash(inp.path)}
        except OSError as e:
            raise CheckpointError(f"cannot read: {e.strerror or e}", path=inp.path) from None
        own = inp.reader.metadata.get("sd_merge_recipe")
        if own:
            with contextlib.suppress(ValueError):
                entry["sd_merge_recipe"] = json.loads(own)
        models[sha] = entry
    if plan.loras is not None:
        for spec, f, sha in zip(plan.loras.specs, plan.loras.files, plan.loras.hashes):
            entry = {"name": os.path.basename(spec.path), "type": "lora", "strength": spec.strength}
            if f.metadata.get("ss_output_name"):
                entry["ss_output_name"] = f.metadata["ss_output_name"]
            models.setdefault(sha, entry)
    if plan.vae is not None and plan.hashes.get(plan.vae.path):
        models.setdefault(plan.hashes[plan.vae.path], {"name": plan.vae.name, "type": "vae"})
    meta = {
        "format": "pt",
        "sd_merge_recipe": json.dumps(plan.recipe_record()),
        "sd_merge_models": json.dumps(models),
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": archs.get(plan.arch.arch).modelspec + ("/inpaint" if "inpaint" in plan.arch.variants
                                                                     else ""),
        "modelspec.title": title,
        "modelspec.date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "modelspec.description": f"Merged by Merge Lab {__version__}: {plan.method.name}"
                                  + (f" + {len(plan.loras.specs)} LoRA(s)" if plan.loras is not None else ""),
        "merge_lab.version": __version__,
    }
    if "v-prediction" in plan.arch.variants:
        meta["modelspec.prediction_type"] = "v"
    return meta


# Metadata that describes how a file was made; a user sharing a model may leave it out.
RECIPE_METADATA_KEYS = ("sd_merge_recipe", "sd_merge_models")
