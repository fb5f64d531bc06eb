"""The tab's form as data: which fields it has, and how its values become a Recipe (and back).

Every entry point builds the same :class:`merge_lab.engine.recipe.Recipe`; the tab's form is one more way to fill
it. Method parameters are not hard-coded: the widgets are derived from the methods' declared ``Param``s,
one widget per distinct (name, kind, choices), shown only for the methods that declare it.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import merge_lab_methods as methods
from merge_lab import archs
from merge_lab.archs.blocks import all_blocks, extra_blocks, main_blocks, parse_values
from merge_lab.engine.recipe import (
    DTYPE_CHOICES,
    MISSING_CHOICES,
    NONFINITE_CHOICES,
    PRECISION_CHOICES,
    Recipe,
    adjust_values,
)
from merge_lab.errors import RecipeError

AUTO = "auto"
NO_BASE = "(none)"
NO_VAE = "(the merge's own)"
DEFAULT_ARCH = "sd1"  # the sliders shown before any model is chosen


def block_field(block: str) -> str:
    return f"block_{block}"


def slider_columns() -> tuple[list[str], list[str], list[str]]:
    """The tab's three columns of block sliders: every registered architecture's main blocks (SD1's 26 hold
    SDXL's 20), each architecture showing only its own."""
    columns: tuple[list[str], list[str], list[str]] = ([], [], [])
    for spec in archs.specs():
        for column, blocks in zip(columns, spec.columns):
            _merge_in_order(column, blocks)
    return columns


def _merge_in_order(out: list[str], blocks) -> None:
    """Add `blocks` to `out` keeping each architecture's own order: a new block goes right after the block
    before it (SD3.5 Large's JB24..JB37 after SD3 Medium's JB23, not after FINAL)."""
    at = None
    for block in blocks:
        if block in out:
            at = out.index(block)
            continue
        at = len(out) if at is None else at + 1
        out.insert(at, block)


def slider_blocks() -> list[str]:
    """Every block that has a slider, in the registry's order of main blocks (SD1's 26 first), each
    architecture's blocks in its own order."""
    out: list[str] = []
    for spec in archs.specs():
        _merge_in_order(out, spec.main_blocks)
    return out


def block_fields() -> list[str]:
    return [block_field(b) for b in slider_blocks()]


def known_arch(arch: str | None) -> str:
    return arch if arch in archs.names() else DEFAULT_ARCH


@dataclass(frozen=True)
class ParamWidget:
    """One widget for a declared method parameter; `defaults` holds each declaring method's default."""

    key: str
    name: str
    kind: type
    choices: tuple | None
    minimum: float | None
    maximum: float | None
    help: str
    defaults: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    helps: dict[str, str] = field(default_factory=dict, compare=False, hash=False)  # per method

    def label(self, method: str | None = None) -> str:
        text = self.helps.get(method, self.help) if method else self.help
        return f"{self.name} — {text}" if text else self.name

    @property
    def field(self) -> str:
        return f"param_{self.key}"

    def to_value(self, raw: Any) -> Any:
        """The widget's value as the parameter's kind (gradio Numbers give floats)."""
        if raw is None:
            return None
        if self.kind is int and isinstance(raw, float) and raw.is_integer():
            return int(raw)
        return raw


def param_widgets() -> list[ParamWidget]:
    """The union of every registered method's parameters, one entry per (name, kind, choices)."""
    M = methods
    found: dict[tuple, dict[str, Any]] = {}
    helps: dict[tuple, dict[str, str]] = {}
    info: dict[tuple, Any] = {}
    for method_name in M.method_names():
        method = M.get_method(method_name)
        for p in method.params:
            signature = (p.name, p.kind, p.choices)
            found.setdefault(signature, {})[method.name] = p.default
            helps.setdefault(signature, {})[method.name] = p.help
            info.setdefault(signature, p)
    by_name: dict[str, int] = {}
    for name, _, _ in found:
        by_name[name] = by_name.get(name, 0) + 1
    widgets = []
    for signature, defaults in found.items():
        name, kind, choices = signature
        p = info[signature]
        key = name if by_name[name] == 1 else f"{name}_{kind.__name__}{len(widgets)}"
        widgets.append(ParamWidget(key, name, kind, choices, p.minimum, p.maximum, p.help, dict(defaults),
                                   helps[signature]))
    return widgets


def base_mode(method_name: str) -> str:
    """'never' | 'optional' | 'required': whether the method takes a base model."""
    return methods.get_method(method_name).base


def default_alpha(method_name: str) -> float:
    """The global ratio α that reproduces the method as published (1 for task-vector methods and Model
    Stock, 0.5 for the interpolations): what the slider starts at, and what a recipe without α uses."""
    return float(methods.get_method(method_name).default_ratio)


# --------------------------------------------------------------------------------------------------
# block ratios
# --------------------------------------------------------------------------------------------------

def visible_blocks(arch: str | None) -> list[str]:
    return main_blocks(known_arch(arch))


def values_text(values: list[float]) -> str:
    """`0.5,1,0.25` — the MBW string users paste between tools (no trailing zeros)."""
    return ",".join(_short(v) for v in values)


def _short(v: float) -> str:
    """The shortest text that reads back as the same float (1 not 1.0, 0.0833333333 stays exact)."""
    v = float(v)
    if v == 0:
        return "0"
    return str(int(v)) if v.is_integer() else repr(v)


def slider_values_from_text(text: str, arch: str | None, alpha: float) -> dict[str, float]:
    """{block: ratio} for the arch's main blocks from a 26/20 (or 25/19 without BASE) value string."""
    from merge_lab.archs.blocks import resolve_ratios

    arch = known_arch(arch)
    values = parse_values(text)
    ratios = resolve_ratios(arch, alpha, values)
    return {b: ratios[b] for b in main_blocks(arch)}


def preset_slider_values(name: str, arch: str | None) -> dict[str, float]:
    from merge_lab.archs.presets import preset_values

    arch = known_arch(arch)
    values = preset_values(name, arch)
    return dict(zip(main_blocks(arch), values))


def parse_named_blocks(text: str, arch: str | None) -> dict[str, float]:
    """'TIME=0.3, VAE=0' -> {'TIME': 0.3, 'VAE': 0.0}; names checked against the arch's blocks."""
    arch = known_arch(arch)
    out: dict[str, float] = {}
    for part in (text or "").replace("\n", ",").split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, value = part.partition("=")
        name = name.strip().upper()
        if not sep:
            raise RecipeError(f"block setting {part!r} is not NAME=VALUE (e.g. VAE=0)")
        if name not in all_blocks(arch):
            raise RecipeError(f"unknown block {name!r} for {arch} (valid: {', '.join(all_blocks(arch))})")
        try:
            out[name] = float(value)
        except ValueError:
            raise RecipeError(f"block {name}: {value.strip()!r} is not a number") from None
    return out


def named_blocks_text(named: Mapping[str, float]) -> str:
    return ", ".join(f"{k}={_short(float(v))}" for k, v in named.items())


# --------------------------------------------------------------------------------------------------
# form <-> recipe
# --------------------------------------------------------------------------------------------------

def _number(form: Mapping[str, Any], name: str, what: str) -> float:
    value = form.get(name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecipeError(f"{what} must be a number, got {value!r}")
    return float(value)


def _weights(text: str | None) -> list[float] | None:
    text = (text or "").strip()
    if not text:
        return None
    try:
        return [float(w) for w in text.replace(";", ",").split(",") if w.strip()]
    except ValueError:
        raise RecipeError(f"weights {text!r} are not comma-separated numbers") from None


_SUPERMERGER_ENTRY = re.compile(r"^[^:,]+:[-+0-9.eE]+(?::[A-Za-z][\w.]*)?$")


def parse_lora_text(text: str | None) -> list[dict[str, Any]]:
    """The tab's LoRA field: one LoRA a line, `NAME[:STRENGTH[:BLOCKS]]` (BLOCKS: a preset or a block
    string), or SuperMerger's one-line `NAME:STRENGTH[:PRESET],NAME:STRENGTH…`. Names, not yet paths."""
    entries = []
    for line in (text or "").splitlines():
        line = line.strip()
        if not line:
            continue
        pieces = [p.strip() for p in line.split(",")]
        parts = pieces if len(pieces) > 1 and all(_SUPERMERGER_ENTRY.match(p) for p in pieces) else [line]
        for part in parts:
            name, _, rest = part.partition(":")
            strength_text, _, blocks = rest.partition(":")
            try:
                strength = float(strength_text) if strength_text.strip() else 1.0
            except ValueError:
                raise RecipeError(f"LoRA {part!r}: the strength {strength_text!r} is not a number "
                                  "(NAME:STRENGTH[:BLOCKS])") from None
            if not math.isfinite(strength):
                raise RecipeError(f"LoRA {part!r}: the strength must be finite")
            entry: dict[str, Any] = {"path": name.strip(), "strength": strength}
            if blocks.strip():
                entry["blocks"] = blocks.strip()
            entries.append(entry)
    return entries


def lora_text(entries: list[Mapping[str, Any]], name_of: Callable[[str], str] = os.path.basename) -> str:
    lines = []
    for e in entries or []:
        line = f"{name_of(str(e.get('path') or e.get('name')))}:{_short(float(e.get('strength', 1.0)))}"
        blocks = e.get("blocks")
        if blocks not in (None, "", []):
            line += ":" + (blocks if isinstance(blocks, str) else ",".join(_short(float(v)) for v in blocks))
        lines.append(line)
    return "\n".join(lines)


def parse_key_ratios(text: str | None) -> dict[str, float]:
    """The tab's per-key field: `REGEX=RATIO` a line (split at the last '='), in order (the last match wins)."""
    out: dict[str, float] = {}
    for line in (text or "").splitlines():
        line = line.strip()
        if not line:
            continue
        pattern, sep, value = line.rpartition("=")
        if not sep or not pattern.strip():
            raise RecipeError(f"per-key ratio {line!r}: expected REGEX=RATIO")
        try:
            ratio = float(value)
        except ValueError:
            raise RecipeError(f"per-key ratio {line!r}: {value.strip()!r} is not a number") from None
        out.pop(pattern.strip(), None)
        out[pattern.strip()] = ratio
    return out


def key_ratios_text(key: Mapping[str, float] | None) -> str:
    return "\n".join(f"{p}={_short(float(v))}" for p, v in (key or {}).items())


def parse_patterns(text: str | None) -> list[str]:
    """Key regexes, one a line (the discard field); blank lines skipped. Checked by the recipe."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def parse_adjust_text(text: str | None) -> list[float] | None:
    """The Adjust field: blank or all zeros is none (no change, nothing recorded), else exactly 8 numbers
    (SuperMerger's IN,OUT,OUT2,Contrast,Brightness,COL1,COL2,COL3); a one-line RecipeError otherwise."""
    if not (text or "").strip():
        return None
    values = adjust_values(text)
    return values if any(v != 0 for v in values) else None


def adjust_text(values) -> str:
    """A record's `adjust` as the field's text ("" when none or not 8 numbers)."""
    try:
        numbers = adjust_values(values) if values is not None else None
    except RecipeError:
        return ""
    return ",".join(_short(v) for v in numbers) if numbers and any(numbers) else ""


def recipe_from_form(form: Mapping[str, Any], resolve: Callable[[str], str],
                     widgets: list[ParamWidget] | None = None,
                     resolve_lora: Callable[[str], str] | None = None,
                     resolve_vae: Callable[[str], str] | None = None) -> Recipe:
    """The Recipe the form describes; model names are turned into paths by `resolve` (which refuses
    anything outside the model folders), LoRA names by `resolve_lora`. Raises a one-line RecipeError on
    bad input."""
    M = methods
    method_name = form.get("method") or "weighted_sum"
    try:
        method = M.get_method(method_name)
    except ValueError as e:
        raise RecipeError(str(e)) from None
    names = form.get("models") or []
    if isinstance(names, str):
        names = [names]
    if not names:
        raise RecipeError("choose the models to merge")
    models = [resolve(n) for n in names]
    base_name = form.get("base")
    base = None
    if method.base != "never" and base_name and base_name != NO_BASE:
        base = resolve(base_name)
    arch = known_arch(form.get("arch"))
    # no α at all (a caller that builds the form itself): the method's default, as in a recipe file
    alpha = None if form.get("alpha") is None else _number(form, "alpha", "the global ratio α")
    blocks = None
    if form.get("use_blocks"):
        values = []
        for b in main_blocks(arch):
            values.append(_number(form, block_field(b), f"block {b}"))
        blocks = values_text(values)
    named = parse_named_blocks(form.get("extra_blocks") or "", arch)
    params = {}
    for w in widgets if widgets is not None else param_widgets():
        if method.name in w.defaults:
            value = w.to_value(form.get(w.field))
            if value is not None and value != "":
                params[w.name] = value
    seed = form.get("seed", 0)
    if isinstance(seed, float) and seed.is_integer():
        seed = int(seed)
    dtype = form.get("dtype") or AUTO
    memory = (form.get("memory_budget") or "").strip() or None
    recipe = Recipe(
        models=models,
        method=method.name,
        base=base,
        alpha=alpha,
        blocks=blocks,
        block=named,
        key=parse_key_ratios(form.get("key_ratios")),
        params=params,
        weights=_weights(form.get("weights")),
        seed=seed,
        dtype=None if dtype == AUTO else dtype,
        precision=form.get("precision") or "float32",
        device=form.get("device") or "cpu",
        missing=form.get("missing") or "error",
        nonfinite=form.get("nonfinite") or "error",
        memory_budget=memory,
        prune=bool(form.get("prune")),
        discard=parse_patterns(form.get("discard")),
        adjust=parse_adjust_text(form.get("adjust")),
        beta_blocks=(form.get("beta_blocks") or "").strip() or None,
    )
    vae = form.get("vae")
    if vae and vae != NO_VAE:
        if resolve_vae is None:
            raise RecipeError("VAE files cannot be looked up here (no VAE folder)")
        recipe.vae = resolve_vae(vae)
    loras = parse_lora_text(form.get("loras"))
    if loras:
        if resolve_lora is None:
            raise RecipeError("LoRAs cannot be looked up here (no LoRA folder)")
        recipe.loras = [{**e, "path": resolve_lora(e["path"])} for e in loras]
    return recipe


def recipe_json(recipe: Recipe, names: Callable[[list[str]], list[str]] | None = None) -> str:
    """The recipe as the JSON body of the HTTP route / a recipe file (models by their listed names)."""
    data = recipe.to_dict()
    if names is not None:
        data["models"] = names(list(recipe.models))
        if recipe.base:
            data["base"] = names([recipe.base])[0]
    if data.get("loras"):  # by name in the LoRA folder, as the route resolves them
        data["loras"] = [{**e, "path": os.path.basename(e["path"])} for e in data["loras"]]
    for local in ("device", "threads", "memory_budget"):
        data.pop(local, None)
    if recipe.out:
        data["out"] = os.path.basename(recipe.out)  # the route saves a plain name into the model folder
    return json.dumps(data, indent=2)


CHOICES = {
    "dtype": (AUTO, *DTYPE_CHOICES),
    "precision": PRECISION_CHOICES,
    "missing": MISSING_CHOICES,
    "nonfinite": NONFINITE_CHOICES,
}


def form_from_record(record: Mapping[str, Any], model_name: Callable[[str], str | None],
                     merged_models: Mapping[str, Any] | None = None,
                     vae_name: Callable[[str], str | None] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Form values from a `sd_merge_recipe` record (ours, or the web UI's own merger's, whose models are
    named in `sd_merge_models` by hash); returns the values and notes for the user (models not found in
    the folders, fields that could not be used)."""
    notes: list[str] = []
    if not isinstance(record, Mapping):
        raise RecipeError("sd_merge_recipe is not a JSON object")
    kind = record.get("type")
    if kind == "webui":
        record = _from_webui_record(record, merged_models or {}, notes)
    elif kind not in (None, "merge-lab"):
        raise RecipeError(f"the recipe was written by {kind!r}, not by Merge Lab or the web UI's merger")
    M = methods
    try:
        method = M.get_method(record.get("method", "weighted_sum"))
    except ValueError as e:
        raise RecipeError(str(e)) from None
    values: dict[str, Any] = {"method": method.name}
    models = []
    for name in record.get("models") or []:
        found = model_name(name)
        if found is None:
            notes.append(f"model {name} is not in the model folders")
        else:
            models.append(found)
    values["models"] = models
    if record.get("base"):
        found = model_name(record["base"])
        if found is None:
            notes.append(f"base model {record['base']} is not in the model folders")
        values["base"] = found or NO_BASE
    else:
        values["base"] = NO_BASE
    # a record without α gets the method's default, as a recipe file without one does (not 0.5 for all)
    alpha = record.get("alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                              or not math.isfinite(alpha)):
        notes.append(f"alpha {alpha!r} is not a number: the method's default is used")
        alpha = None
    values["alpha"] = float(method.default_ratio if alpha is None else alpha)
    ratios = record.get("ratios") or {}
    arch = record.get("arch") if record.get("arch") in archs.names() else _arch_of_ratios(ratios)
    if arch:
        values["arch"] = arch
    blocks_given = record.get("blocks") not in (None, "")
    values["use_blocks"] = bool(blocks_given)
    if blocks_given and arch:
        for b in main_blocks(arch):
            if b in ratios:
                values[block_field(b)] = float(ratios[b])
        values["mbw_text"] = values_text([float(ratios[b]) for b in main_blocks(arch) if b in ratios])
    named = dict(record.get("block") or {})
    if arch:
        extras = set(extra_blocks(arch))
        named = {k: v for k, v in named.items() if k.upper() in set(all_blocks(arch)) | extras}
    values["extra_blocks"] = named_blocks_text(named)
    key = record.get("key") if isinstance(record.get("key"), Mapping) else {}
    values["key_ratios"] = key_ratios_text({k: v for k, v in key.items() if isinstance(v, (int, float))})
    params = record.get("params") or {}
    widgets = {w.name: w for w in param_widgets() if method.name in w.defaults}
    for name, value in params.items():
        w = widgets.get(name)
        if w is None:
            notes.append(f"parameter {name} is not a parameter of {method.name}")
            continue
        values[w.field] = value
    weights = record.get("weights")
    values["weights"] = ",".join(_short(float(w)) for w in weights) if weights else ""
    values["loras"] = lora_text([e for e in record.get("loras") or [] if isinstance(e, Mapping)])
    values["seed"] = int(record.get("seed", 0))
    values["dtype"] = record.get("dtype") if record.get("dtype") in DTYPE_CHOICES else AUTO
    for name in ("precision", "missing", "nonfinite"):
        if record.get(name) in CHOICES[name]:
            values[name] = record[name]
    values["prune"] = bool(record.get("prune"))
    values["discard"] = "\n".join(p for p in record.get("discard") or [] if isinstance(p, str))
    values["adjust"] = adjust_text(record.get("adjust"))
    beta_blocks = record.get("beta_blocks")
    values["beta_blocks"] = (beta_blocks if isinstance(beta_blocks, str) else
                             values_text([float(v) for v in beta_blocks]) if isinstance(beta_blocks, list) else "")
    vae = record.get("vae") if isinstance(record.get("vae"), Mapping) else None
    found = vae_name(vae.get("name", "")) if vae and vae_name is not None else None
    if vae and found is None:
        notes.append(f"VAE {vae.get('name')} is not in the VAE folders")
    values["vae"] = found or NO_VAE
    return values, notes


def _arch_of_ratios(ratios: Mapping[str, Any]) -> str | None:
    """The architecture whose blocks a record's ratios are: the first that has them all and whose main
    blocks they all set (SD1's 26 ratios: sd1; SDXL's 20 and TE1/TE2: sdxl), else the smallest that has them."""
    if not ratios:
        return None
    names = {str(k).upper() for k in ratios}
    fits = [s for s in archs.specs() if names <= set(s.all_blocks)]
    full = [s for s in fits if set(s.main_blocks) <= names]
    if full:
        return full[0].name
    return min(fits, key=lambda s: len(s.all_blocks)).name if fits else None


_WEBUI_METHODS = {"Weighted sum": "weighted_sum", "Add difference": "add_difference"}


def _from_webui_record(record: Mapping[str, Any], merged_models: Mapping[str, Any], notes: list[str]
                       ) -> dict[str, Any]:
    """The web UI's own checkpoint merger writes {type: webui, primary_model_hash, interp_method, multiplier…}
    and names the models by sha256 in sd_merge_models."""
    method = _WEBUI_METHODS.get(record.get("interp_method"))
    if method is None:
        raise RecipeError(f"the web UI merger's method {record.get('interp_method')!r} has no Merge Lab equivalent")
    names = []
    for key in ("primary_model_hash", "secondary_model_hash", "tertiary_model_hash"):
        sha = record.get(key)
        if sha:
            entry = merged_models.get(sha)
            names.append(entry.get("name") if isinstance(entry, Mapping) and entry.get("name") else sha[:10])
    if method == "weighted_sum":
        names = names[:2]
    notes.append("recipe from the web UI's own merger: method, models and ratio taken over")
    out: dict[str, Any] = {"method": method, "models": names}
    if record.get("multiplier") is not None:  # what the web UI merged with; without it, the method's default
        out["alpha"] = float(record["multiplier"])
    return out
