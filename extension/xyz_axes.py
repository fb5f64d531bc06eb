"""The X/Y/Z axes: ``[Merge Lab] alpha``, ``block ratio <block>``, ``method``, ``key ratio``, ``LoRA strength``,
``preset``, ``adjust`` and ``parameter`` for the host's built-in X/Y/Z plot script, the overrides they leave on each cell, and the cell's
recipe made from them.

Host facts this relies on (read from the hosts' own sources):

- ``modules.scripts.scripts_data`` holds ``ScriptClassData(script_class, path, basedir, module)``; the built-in
  X/Y/Z script's class has ``__module__ == "xyz_grid.py"`` and its module an ``axis_options`` list of
  ``AxisOption(label, type, apply, format_value=, confirm=, cost=, choices=)``. The script copies that list when
  its UI is built, so axes are added in ``on_before_ui``; axis indices are never assumed.
- Each X/Y/Z cell runs ``process_images(pc)`` on a shallow copy of ``p``; ``process_images`` first calls the
  always-visible scripts' ``before_process(p)`` (where we merge), then applies ``p.override_settings`` (where
  ``sd_model_checkpoint`` names our virtual checkpoint, so the host does not reload the dropdown's model), and
  restores the settings afterwards.
"""

from __future__ import annotations

from typing import Any, Protocol

import merge_lab_methods as methods
from merge_lab import archs
from merge_lab.archs.presets import presets
from merge_lab.engine import prepare
from merge_lab.engine.recipe import RATIO_RANGE, Recipe, adjust_values
from merge_lab.errors import RecipeError

from .host_detect import host_module

AXIS_PREFIX = "[Merge Lab] "
XYZ_MODULE = "xyz_grid.py"
OVERRIDES_ATTR = "merge_lab_overrides"  # what our X/Y/Z axes store on each cell's processing object


class XyzRecipes(Protocol):
    """What the axes ask of the backend (host_backend.HostBackend): the recipe of a cell from its overrides."""

    def xyz_recipe_for(self, overrides: dict[str, Any]) -> Recipe: ...


def apply_overrides(base: Recipe, overrides: dict[str, Any]) -> Recipe:
    """The X/Y/Z cell's recipe. α None (a recipe from the HTTP route) stays None: each method's default. A
    method axis without an α axis moves α with the method, as the tab's method dropdown does, unless the
    base recipe's α was set away from its method's default (then it is kept for every method)."""
    recipe = base.replace()
    if "method" in overrides:
        method = methods.get_method(overrides["method"])
        declared = {p.name for p in method.params}
        if "alpha" not in overrides and recipe.alpha is not None and \
                recipe.alpha == _default_ratio(base.method):
            recipe.alpha = None  # the old method's default: the new method gets its own
        recipe.method = method.name
        recipe.params = {k: v for k, v in recipe.params.items() if k in declared}
    if "alpha" in overrides:
        recipe.alpha = float(overrides["alpha"])
    if "preset" in overrides:
        recipe.blocks = overrides["preset"]
    if "block" in overrides:
        recipe.block = {**recipe.block, **overrides["block"]}
    if "key" in overrides:  # the axis's pattern moves last, so it wins
        key = {k: v for k, v in recipe.key.items() if k not in overrides["key"]}
        recipe.key = {**key, **overrides["key"]}
    if "lora_strength" in overrides:
        if not recipe.loras:
            raise RecipeError("the LoRA strength axis needs a recipe with a LoRA (the tab's LoRA field)")
        recipe.loras = [{**e, "strength": float(overrides["lora_strength"])} for e in recipe.loras]
    if "param" in overrides:  # after the method axis, which keeps only the new method's parameters
        recipe.params = {**recipe.params, **overrides["param"]}
    if "adjust" in overrides:  # SuperMerger's 8 Adjust values in place of the recipe's
        recipe.adjust = list(overrides["adjust"])
    return recipe


def _default_ratio(method_name: str) -> float | None:
    try:
        return methods.get_method(method_name).default_ratio
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------------
# X/Y/Z axes
# --------------------------------------------------------------------------------------------------

def find_xyz_module(scripts_module):
    for data in getattr(scripts_module, "scripts_data", []):
        if getattr(data.script_class, "__module__", None) == XYZ_MODULE:
            return data.module
    return None


def _with_override(p, key: str, value: Any) -> None:
    old = getattr(p, OVERRIDES_ATTR, None) or {}
    if key in ("block", "key", "param"):
        value = {**old.get(key, {}), **value}
    setattr(p, OVERRIDES_ATTR, {**old, key: value})


def xyz_axes(backend: XyzRecipes, AxisOption) -> list[Any]:
    """Our axes for the host's X/Y/Z script (cost 1: the script puts costly axes in the outer loops, so each
    recipe is merged once per grid; seed / prompt axes are inner and reuse the loaded merge)."""
    lo, hi = RATIO_RANGE

    def confirm_with(key: str, convert=lambda x: x):
        def confirm(p, xs):
            for x in xs:
                recipe = backend.xyz_recipe_for({key: convert(x)})
                recipe.validate()
                if key in ("block", "preset", "key", "adjust"):  # checked against the models' keys
                    plan = prepare(recipe, hash_inputs=False)
                    plan.close()
        return confirm

    def ratio_check(what: str, x: float) -> float:
        if not lo <= x <= hi:
            raise RecipeError(f"{what} = {x} is outside [{lo}, {hi}]")
        return x

    axes = [AxisOption(AXIS_PREFIX + "alpha", float, lambda p, x, xs: _with_override(p, "alpha", x),
                       format_value=lambda p, opt, x: f"α={x:g}",
                       confirm=confirm_with("alpha", lambda x: ratio_check("alpha", x)), cost=1.0)]
    names = archs.all_block_names()  # every registered architecture's blocks
    for block in names:
        axes.append(AxisOption(
            f"{AXIS_PREFIX}block ratio {block}", float,
            (lambda b: lambda p, x, xs: _with_override(p, "block", {b: x}))(block),
            format_value=(lambda b: lambda p, opt, x: f"{b}={x:g}")(block),
            confirm=confirm_with("block", (lambda b: lambda x: {b: ratio_check(b, x)})(block)), cost=1.0))
    axes.append(AxisOption(AXIS_PREFIX + "method", str, lambda p, x, xs: _with_override(p, "method", x),
                           format_value=lambda p, opt, x: x, confirm=confirm_with("method"), cost=1.0,
                           choices=lambda: methods.method_names()))
    def key_value(x: str) -> dict[str, float]:
        pattern, sep, value = str(x).rpartition("=")
        if not sep or not pattern.strip():
            raise RecipeError(f"a key ratio axis value is REGEX=RATIO, got {x!r}")
        try:
            return {pattern.strip(): ratio_check(pattern.strip(), float(value))}
        except ValueError:
            raise RecipeError(f"key ratio {x!r}: {value!r} is not a number") from None

    axes.append(AxisOption(AXIS_PREFIX + "key ratio (REGEX=X)", str,
                           lambda p, x, xs: _with_override(p, "key", key_value(x)),
                           format_value=lambda p, opt, x: str(x), confirm=confirm_with("key", key_value), cost=1.0))
    def param_value(x: str) -> dict[str, str]:
        name, sep, value = str(x).partition("=")
        if not sep or not name.strip() or not value.strip():
            raise RecipeError(f"a parameter axis value is NAME=VALUE (e.g. beta=0.3), got {x!r}")
        return {name.strip(): value.strip()}  # parsed and checked against the method by Recipe.validate

    # a method parameter (β of triple_sum / sum_twice / tensor_swap, TIES' k, DARE's p, …): NAME=VALUE
    axes.append(AxisOption(AXIS_PREFIX + "parameter (NAME=VALUE)", str,
                           lambda p, x, xs: _with_override(p, "param", param_value(x)),
                           format_value=lambda p, opt, x: str(x), confirm=confirm_with("param", param_value),
                           cost=1.0))
    # every LoRA of the recipe at this strength (one merge per value, as for α)
    axes.append(AxisOption(AXIS_PREFIX + "LoRA strength", float,
                           lambda p, x, xs: _with_override(p, "lora_strength", x),
                           format_value=lambda p, opt, x: f"LoRA {x:g}", confirm=confirm_with("lora_strength"),
                           cost=1.0))
    # SuperMerger's Adjust: one cell per 8-value set. The host splits the axis text at commas, so a value is
    # quoted ("1,0,0,0,0,0,0,0", "2,0,0,0,0,0,0,0") or written with spaces (1 0 0 0 0 0 0 0, 2 0 0 0 0 0 0 0)
    axes.append(AxisOption(AXIS_PREFIX + "adjust (8 values)", str,
                           lambda p, x, xs: _with_override(p, "adjust", adjust_values(x)),
                           format_value=lambda p, opt, x: "adjust " + ",".join(f"{v:g}" for v in adjust_values(x)),
                           confirm=confirm_with("adjust", adjust_values), cost=1.0))
    axes.append(AxisOption(AXIS_PREFIX + "preset", str, lambda p, x, xs: _with_override(p, "preset", x),
                           format_value=lambda p, opt, x: x, confirm=confirm_with("preset"), cost=1.0,
                           choices=lambda: list(presets())))
    return axes


def add_xyz_axes(backend: XyzRecipes) -> int:
    """Append our axes to the X/Y/Z script's list (once); returns how many were added."""
    xyz = find_xyz_module(host_module("scripts"))
    if xyz is None:
        print("[Merge Lab] the X/Y/Z plot script was not found; no [Merge Lab] axes")
        return 0
    present = {opt.label for opt in xyz.axis_options}
    new = [a for a in xyz_axes(backend, xyz.AxisOption) if a.label not in present]
    xyz.axis_options.extend(new)
    return len(new)


