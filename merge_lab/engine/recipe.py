"""Recipes are data: the same object whether built by the CLI, the UI, the X/Y/Z plot or the HTTP API,
and the same fields in a YAML / JSON recipe file."""

from __future__ import annotations

import contextlib
import copy
import glob
import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

import merge_lab_methods as methods
from merge_lab import archs
from merge_lab.archs.blocks import accepted_lengths, parse_values
from merge_lab.archs.presets import names_preset, presets
from merge_lab.errors import RecipeError, show
from merge_lab_methods.adjust import VALUE_NAMES as ADJUST_NAMES
from merge_lab_methods.adjust import parse_adjust

DTYPE_CHOICES = ("fp16", "bf16", "fp32", "fp8_e4m3", "fp8_e5m2")
PRECISION_CHOICES = ("float32", "float64")
MISSING_CHOICES = ("error", "take-first")
LORA_UNMATCHED_CHOICES = ("error", "warn")
LORA_FIELDS = {"path", "strength", "blocks"}
NONFINITE_CHOICES = ("error", "take-first", "zero")
# Block ratios beyond this range are almost surely typos; scaling further is what λ parameters are for.
RATIO_RANGE = (-1.0, 2.0)
DEFAULT_MEMORY_BUDGET = 1 << 30
# A recipe is a few hundred bytes; a bigger file is a mistake (or an attack on the YAML parser).
MAX_RECIPE_BYTES = 1 << 20


@dataclass
class Recipe:
    models: list[str] = field(default_factory=list)
    method: str = "weighted_sum"
    base: str | None = None
    alpha: float | None = None  # None: the method's own default (method.default_ratio)
    blocks: str | list[float] | None = None  # "v1,v2,…" (26 SD1/SD2, 20 SDXL) or a preset name
    # β per block, for a method with a `beta` parameter (SuperMerger's triple sum, sum twice, tensor, extract:
    # its "weights B"): the same forms as `blocks`; a block the string does not set takes the `beta` param
    beta_blocks: str | list[float] | None = None
    block: dict[str, float] = field(default_factory=dict)  # named ratios: IN04, TIME, VAE, TE1, …
    # elemental ratios: {regex: ratio} over the checkpoint key names, on top of the block ratios; in order,
    # the last pattern that matches a key wins (A1111 / SuperMerger users' "per-key" control)
    key: dict[str, float] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)
    weights: list[float] | None = None  # per-model weights (N-model sums, task negation)
    seed: int = 0
    dtype: str | None = None  # output dtype of every float key; default: each key keeps the first model's
    prune: bool = False  # drop training leftovers (EMA copies, DDPM buffers, a VAE's training loss)
    precision: str = "float32"  # compute dtype
    device: str = "cpu"
    threads: int | None = None
    missing: str = "error"
    nonfinite: str = "error"
    memory_budget: int | str | None = None
    # LoRAs baked into the result in the same pass: [{path, strength, blocks}] (merge_lab.lora)
    loras: list[dict[str, Any]] = field(default_factory=list)
    lora_unmatched: str = "error"  # a LoRA module that matches no layer: "error" or "warn"
    # a standalone VAE file (LDM or diffusers naming) written in place of the result's VAE
    vae: str | None = None
    # keys left out of the output: those a `discard` regex matches (A1111's "Discard weights with matching
    # name"), and with `keep`, every key that no `keep` regex matches
    discard: list[str] = field(default_factory=list)
    keep: list[str] = field(default_factory=list)
    # SuperMerger's Adjust: 8 values (IN, OUT, OUT2, contrast, brightness, cyan-red, magenta-green, yellow-blue)
    # scaling / shifting the UNet's first and last layers after the merge (merge_methods/adjust.py); all
    # zeros: no change. A recipe file may give them as one comma-separated string.
    adjust: list[float] | None = None
    out: str | None = None

    # ---- construction -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str | None = None, base_dir: str | None = None
                  ) -> Recipe:
        if not isinstance(data, Mapping):
            raise RecipeError("a recipe must be a mapping of fields", path=source)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(f"unknown recipe field(s) {', '.join(unknown)} (valid: {', '.join(sorted(known))})",
                              path=source)
        data = dict(data)
        for name in ("models", "discard", "keep"):
            if isinstance(data.get(name), str):
                data[name] = [data[name]]
        if isinstance(data.get("adjust"), str):
            data["adjust"] = adjust_values(data["adjust"], source)
        _check_types(data, source)
        recipe = cls(**copy.deepcopy(data))
        if base_dir is not None:
            recipe.models = [_relative_to(m, base_dir) for m in recipe.models]
            if recipe.base:
                recipe.base = _relative_to(recipe.base, base_dir)
            if recipe.out:
                recipe.out = _relative_to(recipe.out, base_dir)
            if recipe.vae:
                recipe.vae = _relative_to(recipe.vae, base_dir)
            recipe.loras = [{**entry, "path": _relative_to(entry["path"], base_dir)} for entry in recipe.loras]
        return recipe

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        path = Path(path)
        try:
            if not path.is_file():
                raise RecipeError("recipe file not found" if not path.exists() else "recipe is not a file",
                                  path=path)
            with open(path, "rb") as f:
                raw = f.read(MAX_RECIPE_BYTES + 1)
        except OSError as e:
            raise RecipeError(f"cannot read recipe: {e.strerror or e}", path=path) from None
        if len(raw) > MAX_RECIPE_BYTES:
            raise RecipeError(f"recipe file is larger than {MAX_RECIPE_BYTES} bytes", path=path)
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        try:
            text = raw.decode("utf-8")
            data = json.loads(text) if kind == "JSON" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError, RecursionError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise RecipeError(f"recipe is not valid {kind}: {first[:200]}", path=path) from None
        return cls.from_dict(data or {}, source=str(path), base_dir=str(path.parent))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: v for k, v in data.items() if v not in (None, {}, [])}

    def dump(self, path: str | os.PathLike) -> None:
        path = Path(path)
        data = self.to_dict()
        text = json.dumps(data, indent=2) if path.suffix.lower() == ".json" else yaml.safe_dump(data, sort_keys=False)
        path.write_text(text, encoding="utf-8")

    def effective_alpha(self) -> float:
        """α as given, else the default that reproduces the method as published."""
        if self.alpha is not None:
            return float(self.alpha)
        try:
            return float(methods.get_method(self.method).default_ratio)
        except ValueError as e:
            raise RecipeError(str(e)) from None

    def replace(self, **changes) -> Recipe:
        data = copy.deepcopy(asdict(self))
        data.update(changes)
        return Recipe(**data)

    # ---- validation ---------------------------------------------------------------------------------
    def expanded_models(self) -> list[str]:
        """Model paths with globs and folders expanded (sorted), in the order given."""
        out: list[str] = []
        for entry in self.models:
            entry = os.fspath(entry)
            if os.path.isfile(entry):  # a literal name first: "model [v2].safetensors" is not a pattern
                out.append(entry)
            elif os.path.isdir(entry):
                found = sorted(str(p) for p in Path(entry).iterdir() if p.suffix.lower() == ".safetensors")
                if not found:
                    raise RecipeError("folder holds no .safetensors models", path=entry)
                out.extend(found)
            elif glob.has_magic(entry):
                found = sorted(glob.glob(entry))
                if not found:
                    raise RecipeError("pattern matches no file", path=entry)
                out.extend(found)
            else:
                out.append(entry)
        return out

    def validate(self) -> None:
        """Check everything that does not need the models' headers. Raises RecipeError."""
        _check_types({f.name: getattr(self, f.name) for f in fields(self)}, None)
        M = methods
        try:
            method = M.get_method(self.method)
        except ValueError as e:
            raise RecipeError(str(e)) from None
        if not self.models:
            raise RecipeError("no models given")
        models = self.expanded_models()
        try:
            method.check_inputs(len(models), self.base is not None, self.weights is not None)
            method.check_params(method.normalize_params(self.params), len(models))
        except ValueError as e:
            raise RecipeError(str(e)) from None
        if self.beta_blocks not in (None, "") and "beta" not in {p.name for p in method.params}:
            raise RecipeError(f"beta_blocks: method {method.name} has no beta parameter (methods with one: "
                              f"{', '.join(m for m in methods.method_names() if _has_beta(m))})")
        for p in [*models, *([self.base] if self.base else [])]:
            if not os.path.isfile(p):
                raise RecipeError("model file not found", path=p)
        if self.alpha is not None:
            _check_ratio("alpha", self.alpha)
        check_block_spec(self.blocks)
        check_block_spec(self.beta_blocks)
        known = known_block_names()
        for name, value in (self.block or {}).items():
            if name.upper() not in known:
                raise RecipeError(f"unknown block {show(name)} (valid: {', '.join(known)})")
            _check_ratio(f"block {name}", value)
        for pattern, value in (self.key or {}).items():
            compile_key_pattern(pattern)
            _check_ratio(f"key {pattern}", value)
        if self.weights is not None:
            if len(self.weights) != len(models):
                raise RecipeError(f"{len(self.weights)} weights given for {len(models)} models")
            for w in self.weights:
                if not _finite_number(w):
                    raise RecipeError(f"weight {show(w)} is not a finite number")
            try:
                method.check_weights(self.weights)
            except ValueError as e:
                raise RecipeError(str(e)) from None
        if type(self.seed) is not int or self.seed < 0:
            raise RecipeError(f"seed must be a non-negative integer, got {show(self.seed)}")
        for name, value, choices in (("dtype", self.dtype, DTYPE_CHOICES), ("precision", self.precision,
                                     PRECISION_CHOICES), ("missing", self.missing, MISSING_CHOICES),
                                     ("nonfinite", self.nonfinite, NONFINITE_CHOICES)):
            if value is not None and value not in choices:
                raise RecipeError(f"{name} must be one of {', '.join(choices)}, got {show(value)}")
        if self.device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", str(self.device)):
            raise RecipeError(f"device must be cpu or cuda[:N], got {show(self.device)}")
        if self.threads is not None and (type(self.threads) is not int or not 1 <= self.threads <= 256):
            raise RecipeError(f"threads must be an integer from 1 to 256, got {show(self.threads)}")
        parse_size(self.memory_budget)
        for entry in self.loras:
            if not os.path.isfile(entry["path"]):
                raise RecipeError("LoRA file not found", path=entry["path"])
        if self.vae and not os.path.isfile(self.vae):
            raise RecipeError("VAE file not found", path=self.vae)
        for pattern in [*self.discard, *self.keep]:
            compile_key_pattern(pattern)
        if self.adjust is not None:
            adjust_values(self.adjust)
        if self.lora_unmatched not in LORA_UNMATCHED_CHOICES:
            raise RecipeError(f"lora_unmatched must be one of {', '.join(LORA_UNMATCHED_CHOICES)}, got "
                              f"{show(self.lora_unmatched)}")
        if self.out:
            inputs = [*models, *([self.base] if self.base else []), *(e["path"] for e in self.loras),
                      *([self.vae] if self.vae else [])]
            check_output_path(self.out, inputs)


def check_output_path(out: str | os.PathLike, inputs: Sequence[str | os.PathLike]) -> None:
    """Refuse an output that is not a .safetensors file name, is a folder, or is one of the inputs under
    any name: the same path, another relative spelling, a symlink to it or a hard link (same inode)."""
    out = os.fspath(out)
    if not out.lower().endswith(".safetensors"):
        raise RecipeError("the output must be a .safetensors file", path=out)
    if os.path.isdir(out):
        raise RecipeError("the output is a folder, not a file name", path=out)
    real_out = os.path.realpath(out)
    for p in inputs:
        same = os.path.realpath(p) == real_out
        if not same and os.path.exists(out):
            with contextlib.suppress(OSError):
                same = os.path.samefile(p, out)
        if same:
            raise RecipeError(f"the output {show(out)} is one of the inputs; refusing to overwrite it", path=p)


def _has_beta(name: str) -> bool:
    return any(p.name == "beta" for p in methods.get_method(name).params)


def adjust_values(value, source: str | None = None) -> list[float]:
    """Adjust's eight values from a text ("1,0,0,0,0,0,0,0") or a list, or a one-line RecipeError."""
    try:
        return list(parse_adjust(value))
    except ValueError as e:
        raise RecipeError(str(e), path=source) from None


def compile_key_pattern(pattern: str) -> re.Pattern:
    """An elemental-ratio pattern (a Python regex searched in each key name), or a one-line RecipeError."""
    if not isinstance(pattern, str) or not pattern:
        raise RecipeError(f"a key pattern must be a non-empty regex, got {show(pattern)}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise RecipeError(f"key pattern {pattern!r} is not a valid regex: {e}") from None


def known_block_names() -> list[str]:
    """Every block name of any architecture (a recipe is checked against its models' own list later)."""
    return archs.all_block_names()


def check_block_spec(spec) -> None:
    """`blocks`: None, a preset name, or ratios in a value order some architecture takes (26 for SD1/SD2,
    20 for SDXL, or one fewer without BASE), each in range."""
    if spec is None or spec == "":
        return
    if names_preset(spec):
        name = spec.strip()
        if not any(name.upper() == known.upper() for known in presets()):
            raise RecipeError(f"unknown block preset {name!r} (valid: {', '.join(presets())})")
        return
    values = parse_values(spec)
    if not any(len(values) in accepted_lengths(s.name) for s in archs.specs()):
        orders: dict[int, list[str]] = {}
        for s in archs.specs():
            orders.setdefault(len(s.main_blocks), []).append(s.short)
        listed = " or ".join(f"{n}{' block ratios' if i == 0 else ''} ({'/'.join(who)})"
                             for i, (n, who) in enumerate(orders.items()))  # in the registry's order
        raise RecipeError(f"blocks takes {listed}, or one fewer without BASE; got {len(values)}")
    for i, v in enumerate(values):
        _check_ratio(f"block ratio #{i + 1}", v)


_FIELD_TYPES: dict[str, tuple[str, Any]] = {
    "models": ("a list of file names", lambda v: isinstance(v, list) and all(isinstance(m, str) and m for m in v)),
    "method": ("a method name", lambda v: isinstance(v, str)),
    "base": ("a file name", lambda v: v is None or (isinstance(v, str) and v)),
    "alpha": ("a number", lambda v: v is None or _finite_number(v)),
    "blocks": ("a preset name or a list of ratios", lambda v: v is None or isinstance(v, str) or (
        isinstance(v, list) and all(_finite_number(x) or isinstance(x, str) for x in v))),
    "beta_blocks": ("a preset name or a list of ratios", lambda v: v is None or isinstance(v, str) or (
        isinstance(v, list) and all(_finite_number(x) or isinstance(x, str) for x in v))),
    "key": ("a mapping of key regexes to ratios", lambda v: v is None or (isinstance(v, Mapping) and all(
        isinstance(k, str) and _finite_number(x) for k, x in v.items()))),
    "block": ("a mapping of block names to ratios", lambda v: v is None or (isinstance(v, Mapping) and all(
        isinstance(k, str) and _finite_number(x) for k, x in v.items()))),
    "params": ("a mapping of parameter names to values", lambda v: v is None or (isinstance(v, Mapping) and all(
        isinstance(k, str) and (x is None or isinstance(x, (str, int, float, bool))) for k, x in v.items()))),
    "weights": ("a list of numbers", lambda v: v is None or (isinstance(v, list) and all(map(_finite_number, v)))),
    "seed": ("a non-negative integer", lambda v: type(v) is int and 0 <= v < 1 << 64),
    "dtype": ("one of " + ", ".join(DTYPE_CHOICES), lambda v: v is None or v in DTYPE_CHOICES),
    "prune": ("true or false", lambda v: isinstance(v, bool)),
    "precision": ("one of " + ", ".join(PRECISION_CHOICES), lambda v: v in PRECISION_CHOICES),
    "device": ("cpu or cuda[:N]", lambda v: isinstance(v, str)),
    "threads": ("an integer from 1 to 256", lambda v: v is None or (type(v) is int and 1 <= v <= 256)),
    "missing": ("one of " + ", ".join(MISSING_CHOICES), lambda v: v in MISSING_CHOICES),
    "nonfinite": ("one of " + ", ".join(NONFINITE_CHOICES), lambda v: v in NONFINITE_CHOICES),
    "memory_budget": ("a size like 2GB", lambda v: v is None or isinstance(v, str) or (
        type(v) is int and v > 0)),
    "loras": ("a list of {path, strength, blocks}", lambda v: isinstance(v, list) and all(map(_lora_entry, v))),
    "lora_unmatched": ("one of " + ", ".join(LORA_UNMATCHED_CHOICES), lambda v: v in LORA_UNMATCHED_CHOICES),
    "vae": ("a file name", lambda v: v is None or (isinstance(v, str) and v)),
    "discard": ("a list of key regexes", lambda v: isinstance(v, list) and all(isinstance(x, str) and x for x in v)),
    "keep": ("a list of key regexes", lambda v: isinstance(v, list) and all(isinstance(x, str) and x for x in v)),
    "adjust": (f"8 numbers ({','.join(ADJUST_NAMES)})", lambda v: v is None or (
        isinstance(v, list) and len(v) == len(ADJUST_NAMES) and all(map(_finite_number, v)))),
    "out": ("a file name", lambda v: v is None or (isinstance(v, str) and v)),
}


def _lora_entry(v) -> bool:
    return (isinstance(v, Mapping) and set(v) <= LORA_FIELDS and isinstance(v.get("path"), str) and bool(v["path"])
            and _finite_number(v.get("strength", 1.0)) and (v.get("blocks") is None or isinstance(v["blocks"], str)
                                                             or (isinstance(v["blocks"], list)
                                                                 and all(map(_finite_number, v["blocks"])))))


def _check_types(data: Mapping[str, Any], source: str | None) -> None:
    """Every field of a recipe from a file, the UI or an HTTP body has the right type before it is used."""
    for name, value in data.items():
        what, ok = _FIELD_TYPES[name]
        try:
            good = ok(value)
        except TypeError:  # e.g. an unhashable value tested against a tuple of choices
            good = False
        if not good:
            raise RecipeError(f"{name} must be {what}, got {show(value)}", path=source)


def _relative_to(p: str, base_dir: str) -> str:
    p = os.path.expanduser(os.fspath(p))
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p))


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _check_ratio(what: str, value) -> None:
    if not _finite_number(value):
        raise RecipeError(f"{what} must be a finite number, got {show(value)}")
    lo, hi = RATIO_RANGE
    if not lo <= value <= hi:
        raise RecipeError(f"{what} = {value} is outside [{lo}, {hi}]")


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(value: int | str | None, default: int = DEFAULT_MEMORY_BUDGET) -> int:
    """'4GB', '512M', 2147483648 -> bytes (binary units)."""
    if value is None:
        return default
    if isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        m = _SIZE.match(str(value))
        if not m:
            raise RecipeError(f"memory budget {show(value)} is not a size like 4GB or 512MB")
        number = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()[:1]])
    if number < 1 << 20:
        raise RecipeError(f"memory budget {show(value)} is below the 1MB minimum")
    return number
