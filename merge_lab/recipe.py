"""Recipes are data: the same object whether built by the CLI, the UI, the X/Y/Z plot or the HTTP API,
and the same fields in a YAML / JSON recipe file."""

from __future__ import annotations

import copy
import glob
import json
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from ._own import methods
from .errors import RecipeError

DTYPE_CHOICES = ("fp16", "bf16", "fp32")
PRECISION_CHOICES = ("float32", "float64")
MISSING_CHOICES = ("error", "take-first")
NONFINITE_CHOICES = ("error", "take-first", "zero")
# Block ratios beyond this range are almost surely typos; scaling further is what λ parameters are for.
RATIO_RANGE = (-1.0, 2.0)
DEFAULT_MEMORY_BUDGET = 1 << 30


@dataclass
class Recipe:
    models: list[str] = field(default_factory=list)
    method: str = "weighted_sum"
    base: str | None = None
    alpha: float = 0.5
    blocks: str | list[float] | None = None  # "v1,v2,…" (26 SD1/SD2, 20 SDXL) or a preset name
    block: dict[str, float] = field(default_factory=dict)  # named ratios: IN04, TIME, VAE, TE1, …
    params: dict[str, Any] = field(default_factory=dict)
    weights: list[float] | None = None  # per-model weights (N-model sums, task negation)
    seed: int = 0
    dtype: str | None = None  # output float dtype; default: the first model's
    precision: str = "float32"  # compute dtype
    device: str = "cpu"
    threads: int | None = None
    missing: str = "error"
    nonfinite: str = "error"
    memory_budget: int | str | None = None
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
        recipe = cls(**copy.deepcopy(dict(data)))
        if isinstance(recipe.models, str):
            recipe.models = [recipe.models]
        if base_dir is not None:
            recipe.models = [_relative_to(m, base_dir) for m in recipe.models]
            if recipe.base:
                recipe.base = _relative_to(recipe.base, base_dir)
            if recipe.out:
                recipe.out = _relative_to(recipe.out, base_dir)
        return recipe

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise RecipeError(f"cannot read recipe: {e.strerror or e}", path=path) from None
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as e:
            raise RecipeError(f"recipe is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: "
                              f"{str(e).splitlines()[0]}", path=path) from None
        return cls.from_dict(data or {}, source=str(path), base_dir=str(path.parent))

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        return {k: v for k, v in data.items() if v not in (None, {}, [])}

    def dump(self, path: str | os.PathLike) -> None:
        path = Path(path)
        data = self.to_dict()
        text = json.dumps(data, indent=2) if path.suffix.lower() == ".json" else yaml.safe_dump(data, sort_keys=False)
        path.write_text(text, encoding="utf-8")

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
            if os.path.isdir(entry):
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
        M = methods()
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
        for p in [*models, *([self.base] if self.base else [])]:
            if not os.path.isfile(p):
                raise RecipeError("model file not found", path=p)
        _check_ratio("alpha", self.alpha)
        for name, value in (self.block or {}).items():
            _check_ratio(f"block {name}", value)
        if self.weights is not None:
            if len(self.weights) != len(models):
                raise RecipeError(f"{len(self.weights)} weights given for {len(models)} models")
            for w in self.weights:
                if not _finite_number(w):
                    raise RecipeError(f"weight {w!r} is not a finite number")
            try:
                method.check_weights(self.weights)
            except ValueError as e:
                raise RecipeError(str(e)) from None
        if type(self.seed) is not int or self.seed < 0:
            raise RecipeError(f"seed must be a non-negative integer, got {self.seed!r}")
        for name, value, choices in (("dtype", self.dtype, DTYPE_CHOICES), ("precision", self.precision,
                                     PRECISION_CHOICES), ("missing", self.missing, MISSING_CHOICES),
                                     ("nonfinite", self.nonfinite, NONFINITE_CHOICES)):
            if value is not None and value not in choices:
                raise RecipeError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        if self.device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", str(self.device)):
            raise RecipeError(f"device must be cpu or cuda[:N], got {self.device!r}")
        if self.threads is not None and (type(self.threads) is not int or not 1 <= self.threads <= 256):
            raise RecipeError(f"threads must be an integer from 1 to 256, got {self.threads!r}")
        parse_size(self.memory_budget)
        if self.out:
            out = os.path.realpath(self.out)
            for p in [*models, *([self.base] if self.base else [])]:
                if os.path.realpath(p) == out:
                    raise RecipeError("the output path is one of the inputs; refusing to overwrite it", path=p)
            if not out.lower().endswith(".safetensors"):
                raise RecipeError("the output must be a .safetensors file", path=self.out)


def _relative_to(p: str, base_dir: str) -> str:
    p = os.path.expanduser(os.fspath(p))
    return p if os.path.isabs(p) else os.path.normpath(os.path.join(base_dir, p))


def _finite_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v == v and abs(v) != float("inf")


def _check_ratio(what: str, value) -> None:
    if not _finite_number(value):
        raise RecipeError(f"{what} must be a number, got {value!r}")
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
            raise RecipeError(f"memory budget {value!r} is not a size like 4GB or 512MB")
        number = int(float(m.group(1)) * _UNITS[(m.group(2) or "").lower()[:1]])
    if number < 1 << 20:
        raise RecipeError(f"memory budget {value!r} is below the 1MB minimum")
    return number
