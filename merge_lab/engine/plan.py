"""The plan of a merge: the recipe checked against the models' headers, and for every key whether it is merged
(with its block's ratio, through merge_lab.archs), copied from one model or refused, and in which units of rows.
`prepare` reads no tensor data but the text encoders' position ids (77 integers each, checked for the known
corruption).
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

import merge_lab_methods as methods
from merge_lab import __version__, archs
from merge_lab.archs import current_key_name
from merge_lab.archs.blocks import block_of, key_role, parse_values, resolve_ratios
from merge_lab.archs.detect import Architecture, detect
from merge_lab.archs.presets import names_preset, preset_values
from merge_lab.engine.chunking import _assign_chunks
from merge_lab.engine.metadata import _hash_inputs, fingerprint
from merge_lab.engine.recipe import Recipe, compile_key_pattern, parse_size
from merge_lab.errors import MergeLabError, RecipeError
from merge_lab.io.checkpoints import open_checkpoint
from merge_lab.io.writer import OutputEntry
from merge_lab_methods.adjust import ARCH_COLOURS as ADJUST_ARCHS
from merge_lab_methods.adjust import adjust_operations
from merge_lab_methods.adjust import is_identity as adjust_is_identity

DTYPE_FLAGS = {"fp16": "F16", "bf16": "BF16", "fp32": "F32", "fp8_e4m3": "F8_E4M3", "fp8_e5m2": "F8_E5M2"}
# An output dtype per key: the first model's dtype of that key (files mix an fp32 VAE with an fp16 UNet).
PER_KEY_DTYPE = "per-key"
COMPUTE_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Input:
    path: str
    reader: Any
    role: str  # "model" | "base"
    index: int  # position among the models (the base: -1)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)


@dataclass
class KeyTask:
    key: str
    shape: tuple[int, ...]
    out_dtype: str
    action: str  # "merge" | "copy"
    block: str | None = None
    ratio: float = 0.0
    beta: float | None = None  # the block's β (recipe beta_blocks), passed as the method's `beta` parameter
    source: int = 0  # input to copy from
    chunks: list[tuple[int, int] | None] = field(default_factory=lambda: [None])
    needs_stats: bool = False
    # An inpainting / instruct-pix2pix model A merged with normal models: only the first `channels` input
    # channels (dim 1) of this key are merged, `shape` is theirs; the output has A's `full_shape`, the other
    # channels A's values (A1111's run_modelmerger does the same).
    channels: int | None = None
    full_shape: tuple[int, ...] | None = None
    # action "vae": the key of the plan's VAE file written here (reshaped to `shape`, a diffusers Linear to
    # LDM's 1×1 convolution); action "position_ids": 0..N-1 written as int64 in place of the stored ids
    source_key: str | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.full_shape or self.shape


@dataclass
class MergePlan:
    recipe: Recipe
    arch: Architecture
    models: list[Input]
    base: Input | None
    method: Any
    params: dict[str, Any]
    ratios: dict[str, float]
    tasks: list[KeyTask]
    out_dtype: str
    compute_dtype: torch.dtype
    device: torch.device
    threads: int
    budget: int
    hashes: dict[str, str] = field(default_factory=dict)  # input path -> sha256
    fingerprint: str = ""
    loras: Any = None  # merge_lab.lora.LoraPlan: LoRAs baked into the result, or None
    vae: Input | None = None  # the recipe's VAE file, written in place of the result's VAE
    vae_format: str = ""  # its key naming: "ldm" or "diffusers"
    # SuperMerger's Adjust (merge_methods/adjust.py): the recipe's 8 values, when not all 0, and the operation
    # of each key it changes; applied to the whole key after the merge and the LoRAs
    adjust_values: list[float] | None = None
    adjust: dict[str, Any] | None = None
    # β of every block (recipe beta_blocks), or None: the method's `beta` parameter for every key
    beta_ratios: dict[str, float] | None = None

    def params_for(self, task: KeyTask) -> dict[str, Any]:
        """The method's parameters for one key: the plan's, with the key's block β when beta_blocks is set."""
        return self.params if task.beta is None else {**self.params, "beta": task.beta}

    @property
    def inputs(self) -> list[Input]:
        return [*self.models, *([self.base] if self.base else [])]

    def close(self) -> None:
        for inp in [*self.inputs, *([self.vae] if self.vae else [])]:
            inp.reader.close()
        if self.loras is not None:
            self.loras.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def output_entries(self) -> list[OutputEntry]:
        return [OutputEntry(t.key, t.out_dtype, t.out_shape) for t in self.tasks]

    def recipe_record(self) -> dict[str, Any]:
        """The recipe as stored in the output's `sd_merge_recipe` metadata (names, not local paths)."""
        r = self.recipe
        record = {
            "type": "merge-lab",
            "version": __version__,
            "method": self.method.name,
            "models": [m.name for m in self.models],
            "base": self.base.name if self.base else None,
            "alpha": r.effective_alpha(),
            "blocks": r.blocks,
            "block": dict(r.block or {}),
            "key": dict(r.key) if r.key else None,
            "ratios": self.ratios,
            "beta_blocks": r.beta_blocks,
            "beta_ratios": self.beta_ratios,
            "params": self.params,
            "weights": r.weights,
            "seed": r.seed,
            "dtype": _dtype_flag(self.out_dtype),
            "prune": r.prune or None,
            "precision": r.precision,
            "missing": r.missing,
            "nonfinite": r.nonfinite,
            "loras": self.loras.records() if self.loras is not None else None,
            "vae": ({"name": self.vae.name, "sha256": self.hashes.get(self.vae.path), "format": self.vae_format}
                    if self.vae else None),
            "discard": list(r.discard) or None,
            "keep": list(r.keep) or None,
            "adjust": list(self.adjust_values) if self.adjust_values else None,
            "recipe_hash": self.fingerprint,
        }
        return {k: v for k, v in record.items() if v is not None}


def _dtype_flag(dtype: str) -> str:
    return {v: k for k, v in DTYPE_FLAGS.items()}.get(dtype, dtype)


def prepare(recipe: Recipe, *, hash_inputs: bool = True, notify=None) -> MergePlan:
    """Validate the recipe against the models' headers and plan every key. Reads no tensor data.
    `notify` hears warnings (LoRA modules skipped under lora_unmatched=warn, LoRAs with no effect)."""
    recipe.validate()
    M = methods
    method = M.get_method(recipe.method)
    params = method.normalize_params(recipe.params)
    model_paths = recipe.expanded_models()

    inputs: list[Input] = []
    base = None
    try:
        for i, p in enumerate(model_paths):
            inputs.append(Input(p, open_checkpoint(p, current_key_name), "model", i))
        if recipe.base:
            base = Input(recipe.base, open_checkpoint(recipe.base, current_key_name), "base", -1)
        all_inputs = [*inputs, *([base] if base else [])]

        archs = [detect(inp.reader.tensors, inp.reader.metadata, inp.path) for inp in all_inputs]
        for inp, a in zip(all_inputs[1:], archs[1:]):
            if a.arch != archs[0].arch:
                raise RecipeError(f"is {a.arch} but {all_inputs[0].name} is {archs[0].arch}: "
                                  "models of different architectures cannot be merged", path=inp.path)
        arch = archs[0]
        values = _block_values(recipe, arch.arch)
        ratios = resolve_ratios(arch.arch, recipe.effective_alpha(), values, recipe.block)

        out_dtype = DTYPE_FLAGS[recipe.dtype] if recipe.dtype else PER_KEY_DTYPE
        if not recipe.dtype:
            _dominant_float_dtype(inputs[0])  # a file without any float tensor is refused here
        compute_dtype = COMPUTE_DTYPES[recipe.precision]
        device = torch.device(recipe.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RecipeError("device cuda requested but torch sees no CUDA device")
        threads = recipe.threads or min(4, os.cpu_count() or 1)
        budget = parse_size(recipe.memory_budget)

        plan = MergePlan(recipe, arch, inputs, base, method, params, ratios, [], out_dtype, compute_dtype,
                         device, threads, budget)
        beta_values = _block_values(recipe, arch.arch, recipe.beta_blocks)
        if beta_values is not None:  # SuperMerger's per-block β: the `beta` parameter is the default (BASE)
            plan.beta_ratios = resolve_ratios(arch.arch, float(params["beta"]), beta_values)
        plan.tasks = _plan_tasks(plan)
        if recipe.vae:
            _plan_vae(plan, notify)
        _plan_position_ids(plan, notify)
        if recipe.discard or recipe.keep:
            _filter_keys(plan, notify)
        if recipe.loras:
            _plan_loras(plan, hash_inputs, notify)
        if recipe.adjust is not None and not adjust_is_identity(recipe.adjust):
            _plan_adjust(plan)
        if hash_inputs:
            plan.hashes = _hash_inputs([*all_inputs, *([plan.vae] if plan.vae else [])])
        plan.fingerprint = fingerprint(plan)
        return plan
    except BaseException:
        for inp in [*inputs, *([base] if base else [])]:
            inp.reader.close()
        if "plan" in locals() and plan.loras is not None:
            plan.loras.close()
        if "plan" in locals() and plan.vae is not None:
            plan.vae.reader.close()
        raise


def _plan_vae(plan: MergePlan, notify) -> None:
    """The recipe's VAE file in place of every key of the result's VAE: the same key set and shapes (a VAE of
    another architecture, or a partial one, is refused naming the key), in LDM naming whatever the file's."""
    from merge_lab.archs.vae_files import VaeFileError, ldm_names

    path = plan.recipe.vae
    first = plan.models[0]
    prefix = dict(archs.get(plan.arch.arch).components).get("vae")
    targets = {t.key: i for i, t in enumerate(plan.tasks) if prefix and t.key.startswith(prefix)}
    if not targets:
        raise RecipeError(f"has no VAE ({prefix or 'first_stage_model.'}*) to replace with {os.path.basename(path)}",
                          path=first.path)
    plan.vae = Input(path, open_checkpoint(path), "vae", -2)
    tensors = plan.vae.reader.tensors
    try:
        names = ldm_names(tensors)
    except VaeFileError as e:
        raise MergeLabError(str(e), path=path, key=e.key) from None
    plan.vae_format = names.format
    for ldm, source in names.names.items():
        target = prefix + ldm
        info = tensors[source]
        if target not in targets:
            raise MergeLabError(f"has no counterpart {target} in {first.name} ({archs.get(plan.arch.arch).title}): "
                                "a VAE of another architecture?", path=path, key=source)
        task = plan.tasks[targets[target]]
        shape = (*info.shape, 1, 1) if ldm in names.conv_1x1 and len(info.shape) == 2 else info.shape
        if tuple(shape) != tuple(task.out_shape) or not info.is_float:
            what = f"dtype {info.dtype} is not floating point" if not info.is_float else \
                f"shape {list(info.shape)} does not fit {list(task.out_shape)} of {target} in {first.name}"
            raise MergeLabError(what + " (a VAE of another architecture?)", path=path, key=source)
        out_dtype = plan.out_dtype if plan.out_dtype != PER_KEY_DTYPE else info.dtype
        plan.tasks[targets[target]] = KeyTask(target, task.out_shape, out_dtype, "vae", task.block,
                                              source_key=source)
    missing = [k for k in targets if plan.tasks[targets[k]].action != "vae"]
    if missing:
        raise MergeLabError(f"lacks {len(missing)} key(s) of {first.name}'s VAE, e.g. {missing[0]}: not a whole VAE",
                            path=path)
    if notify is not None:
        dropped = f"; {len(names.dropped)} training key(s) (loss., model_ema.) left out" if names.dropped else ""
        notify(f"VAE: {plan.vae.name} ({names.format} naming, {len(names.names)} keys) in place of "
               f"{first.name}'s{dropped}")


POSITION_IDS_SUFFIX = "embeddings.position_ids"


def _plan_position_ids(plan: MergePlan, notify) -> None:
    """CLIP's position ids are 0..N-1. Files passed through some old mergers hold them as floats that are not
    (75.9998 for 76: a host that casts them to integers then reads position 75 twice): those, and any ids
    not stored as those int64 values, are written as 0..N-1 in int64; a corruption is said."""
    for i, task in enumerate(plan.tasks):
        if task.action != "copy" or not task.key.endswith(POSITION_IDS_SUFFIX) or not task.shape:
            continue
        inp = plan.inputs[task.source]
        stored = inp.reader.read(task.key)
        expected = torch.arange(task.shape[-1], dtype=torch.int64).expand(task.shape)
        if stored.dtype == torch.int64 and torch.equal(stored, expected):
            continue
        if stored.dtype == torch.bool or stored.is_complex():
            continue  # not ids at all: left to the layout checks
        off = float((stored.double() - expected.double()).abs().max()) if stored.numel() else 0.0
        if off != 0 and notify is not None:
            notify(f"{inp.name}: {task.key}: the position ids are not 0..{task.shape[-1] - 1} (off by up to "
                   f"{off:.2g}, a known corruption of merged files); written as 0..{task.shape[-1] - 1}")
        plan.tasks[i] = KeyTask(task.key, task.shape, "I64", "position_ids", task.block)


def _filter_keys(plan: MergePlan, notify) -> None:
    """Leave out the keys a `discard` regex matches, and with `keep`, those no `keep` regex matches. A pattern
    that matches no key is an error (a typo would otherwise leave everything in)."""
    r = plan.recipe
    discard = [(p, compile_key_pattern(p)) for p in r.discard]
    keep = [(p, compile_key_pattern(p)) for p in r.keep]
    matched: set[str] = set()
    kept = []
    for task in plan.tasks:
        hits = {p for p, rx in discard if rx.search(task.key)}
        keeps = {p for p, rx in keep if rx.search(task.key)}
        matched |= hits | {f"keep:{p}" for p in keeps}
        if not hits and (not keep or keeps):
            kept.append(task)
    unmatched = [p for p, _ in discard if p not in matched] + [p for p, _ in keep if f"keep:{p}" not in matched]
    if unmatched:
        raise RecipeError(f"key pattern(s) {', '.join(map(repr, unmatched))} match no key of {plan.models[0].name}",
                          path=plan.models[0].path)
    if not kept:
        raise RecipeError("the discard / keep patterns leave no key to write", path=plan.models[0].path)
    if notify is not None and len(kept) < len(plan.tasks):
        notify(f"{len(plan.tasks) - len(kept)} key(s) left out by the discard / keep patterns")
    plan.tasks = kept


def _plan_adjust(plan: MergePlan) -> None:
    """SuperMerger's Adjust on the six keys it changes (the UNet's conv_in, output GroupNorm and conv_out): an
    architecture without it is refused, and so is an output lacking one of those keys (left out by discard /
    keep, or not a whole UNet). Each is done in one unit: the bias shift is one value per latent channel."""
    arch = plan.arch.arch
    first = plan.models[0]
    if arch not in ADJUST_ARCHS:
        raise RecipeError(f"adjust (SuperMerger's) is defined for SD1 / SD2 / SDXL UNets only, not for "
                          f"{archs.get(arch).title}", path=first.path)
    values = [float(v) for v in plan.recipe.adjust]  # 1 and 1.0: the same record and recipe hash
    operations = adjust_operations(values, arch)
    tasks = {t.key: t for t in plan.tasks}
    for key, op in operations.items():
        task = tasks.get(key)
        if task is None:
            raise RecipeError("adjust changes this key, which the output lacks (left out by discard / keep?)",
                              path=first.path, key=key)
        if not task.out_dtype.startswith(("F", "BF")):
            raise MergeLabError(f"adjust changes this key, whose dtype {task.out_dtype} is not floating point",
                                path=first.path, key=key)
        if op.shift is not None and tuple(task.out_shape) != (len(op.shift),):
            raise MergeLabError(f"adjust shifts {len(op.shift)} latent channels; this key has shape "
                                f"{list(task.out_shape)}", path=first.path, key=key)
        task.chunks = [None]
        task.needs_stats = False
    plan.adjust_values = values
    plan.adjust = operations


def _plan_loras(plan: MergePlan, hash_files: bool, notify) -> None:
    """The recipe's LoRAs onto the output's keys: each patched key must be a float key we write, and is
    done in one unit (a DoRA norm is over whole columns, and ΔW of a whole layer has the same bits however
    the key would be cut)."""
    from merge_lab.lora import LoraSpec, plan_loras

    r = plan.recipe
    specs = [LoraSpec(e["path"], float(e.get("strength", 1.0)), e.get("blocks")) for e in r.loras]
    tasks = {t.key: t for t in plan.tasks}
    shapes = {k: t.out_shape for k, t in tasks.items()}
    plan.loras = plan_loras(plan.arch.arch, shapes, specs, unmatched=r.lora_unmatched,
                            model_path=plan.models[0].path, hash_files=hash_files, notify=notify)
    for key in plan.loras.patches:
        task = tasks[key]
        if not task.out_dtype.startswith(("F", "BF")):
            raise MergeLabError(f"a LoRA changes this key, whose dtype {task.out_dtype} is not floating point",
                                path=plan.models[0].path, key=key)
        if task.channels is not None:
            raise MergeLabError("a LoRA changes the first convolution of an inpainting / instruct-pix2pix merge; "
                                "bake it into the merged file in a second step", path=plan.models[0].path, key=key)
        task.chunks = [None]
        task.needs_stats = False


def _block_values(recipe: Recipe, arch: str, spec=...) -> list[float] | None:
    """The values of a block-ratio spec (the recipe's `blocks` unless another is given): None when unset."""
    spec = recipe.blocks if spec is ... else spec
    if spec is None or spec == "":
        return None
    if names_preset(spec):
        return preset_values(spec.strip(), arch)
    return parse_values(spec)


def _dominant_float_dtype(inp: Input) -> str:
    counts = Counter(t.dtype for k, t in inp.reader.tensors.items() if t.is_float and t.numel > 1)
    if not counts:
        raise RecipeError("has no floating-point tensors", path=inp.path)
    return counts.most_common(1)[0][0]


def _key_ratios(plan: MergePlan) -> list[tuple[str, re.Pattern, float]]:
    return [(p, compile_key_pattern(p), float(v)) for p, v in (plan.recipe.key or {}).items()]


def _plan_tasks(plan: MergePlan) -> list[KeyTask]:
    arch = plan.arch.arch
    key_ratios = _key_ratios(plan)
    matched: set[str] = set()
    merge_inputs = plan.inputs
    order: list[str] = list(plan.models[0].reader.tensors)
    seen = set(order)
    for inp in merge_inputs[1:]:
        for key in inp.reader.tensors:
            if key not in seen:
                seen.add(key)
                order.append(key)

    tasks = []
    for key in order:
        holders = [i for i, inp in enumerate(merge_inputs) if key in inp.reader.tensors]
        first = merge_inputs[holders[0]]
        info = first.reader.tensors[key]
        role = key_role(key, arch)
        if role == "unknown":
            raise MergeLabError(f"is not part of the {archs.get(arch).title} layout we know; refusing to copy it "
                                "unmerged (remove the key, or report the file's origin)", path=first.path, key=key)
        if role == "leftover" and plan.recipe.prune:
            continue
        out_dtype = plan.out_dtype if plan.out_dtype != PER_KEY_DTYPE and info.is_float else info.dtype
        block = block_of(key, arch)
        if role != "merge" or (plan.method.copies_first and info.is_float):
            tasks.append(KeyTask(key, info.shape, out_dtype, "copy", block, source=holders[0]))
            continue
        if not info.is_float:
            raise MergeLabError(f"dtype {info.dtype} of a weight is not floating point; refusing to copy it "
                                "unmerged", path=first.path, key=key)
        if len(holders) != len(merge_inputs):
            missing = next(inp for i, inp in enumerate(merge_inputs) if i not in holders)
            if plan.recipe.missing != "take-first":
                raise MergeLabError(f"is missing (present in {first.name}); use --missing take-first to copy it "
                                    "from the first model that has it", path=missing.path, key=key)
            tasks.append(KeyTask(key, info.shape, out_dtype, "copy", block, source=holders[0]))
            continue
        channels = None
        for inp in merge_inputs:
            other = inp.reader.tensors[key]
            if other.shape != info.shape:
                channels = _merged_channels(key, merge_inputs, plan)
            if not other.is_float:
                raise MergeLabError(f"dtype {other.dtype} is not floating point, {first.name} has {info.dtype}",
                                    path=inp.path, key=key)
        ratio = plan.ratios[block]
        for pattern, regex, value in key_ratios:  # the last match wins
            if regex.search(key):
                ratio = value
                matched.add(pattern)
        beta = plan.beta_ratios[block] if plan.beta_ratios is not None else None
        if channels is None:
            tasks.append(KeyTask(key, info.shape, out_dtype, "merge", block, ratio=ratio, beta=beta))
        else:
            narrow = (info.shape[0], channels, *info.shape[2:])
            tasks.append(KeyTask(key, narrow, out_dtype, "merge", block, ratio=ratio, beta=beta,
                                 channels=channels, full_shape=info.shape))
    unmatched = [p for p, _, _ in key_ratios if p not in matched]
    if unmatched:  # a typo would otherwise merge everything at the block ratios, silently
        raise RecipeError(f"key pattern(s) {', '.join(map(repr, unmatched))} match no merged key of "
                          f"{plan.models[0].name} ({archs.get(arch).title})", path=plan.models[0].path)

    _assign_chunks(plan, tasks)
    return tasks


# Input channels of the first UNet convolution: 4 latent channels, + 4 of the masked image and 1 of the mask
# (inpainting), + 4 of the original image's latent (instruct-pix2pix).
_VARIANT_CHANNELS = {9: "an inpainting model (9 input channels)", 8: "an instruct-pix2pix model (8 input channels)"}
FIRST_CONV = "model.diffusion_model.input_blocks.0.0.weight"
LATENT_CHANNELS = 4


def _merged_channels(key: str, inputs: list[Input], plan: MergePlan) -> int:
    """The inputs of `key` differ in shape: the number of leading input channels to merge when that is the
    inpainting / instruct-pix2pix case (A that model, every other input a normal one), else a one-line error."""
    first = inputs[0]
    shape = first.reader.tensors[key].shape
    shapes = [inp.reader.tensors[key].shape for inp in inputs]
    differ = next(inp for inp, s in zip(inputs, shapes) if s != shape)
    other = differ.reader.tensors[key].shape
    if key != FIRST_CONV or len(shape) != 4 or any(len(s) != 4 or s[:1] + s[2:] != shape[:1] + shape[2:]
                                                   for s in shapes):
        raise MergeLabError(f"shape {list(other)} differs from {list(shape)} in {first.name}", path=differ.path,
                            key=key)
    wide = next((inp for inp, s in zip(inputs, shapes) if s[1] in _VARIANT_CHANNELS and s[1] != shape[1]), None)
    if shape[1] == LATENT_CHANNELS and wide is not None:
        what = _VARIANT_CHANNELS[wide.reader.tensors[key].shape[1]]
        raise MergeLabError(f"is {what} and {first.name} is not: put it first, as model A (its extra input "
                            "channels are kept from A, as in A1111's merger)", path=wide.path, key=key)
    if shape[1] in _VARIANT_CHANNELS and all(s[1] == LATENT_CHANNELS for s in shapes[1:]):
        return LATENT_CHANNELS
    raise MergeLabError(f"shape {list(other)} differs from {list(shape)} in {first.name} (an inpainting or "
                        "instruct-pix2pix model A merges only with normal models)", path=differ.path, key=key)
