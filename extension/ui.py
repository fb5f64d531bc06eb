"""The "Merge Lab" tab: one gradio builder for gradio 3.41 (AUTOMATIC1111, reForge), 4.40 (Forge) and the
newest gradio (``merge-lab ui``). Layout only; the handlers live in controller.py.

Every event is wired through :meth:`Tab.wire`, which also records (handler, input names, output names), so
tests can run exactly what a click runs without a browser.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from merge_lab import archs
from merge_lab.archs.presets import presets
from merge_lab.engine.recipe import RATIO_RANGE

from . import compat
from .backend import Backend
from .compat import component, update
from .controller import PREVIEW_FIELDS, SAVE_FIELDS, TabController
from .form import (
    AUTO,
    CHOICES,
    DEFAULT_ARCH,
    NO_BASE,
    NO_VAE,
    block_field,
    default_alpha,
    slider_columns,
    visible_blocks,
)

ELEM_PREFIX = "merge_lab_"
# The web UI loads the extension's style.css; `merge-lab ui` passes the same rules to gradio.
STYLE_FILE = Path(__file__).resolve().parent.parent / "style.css"  # absent in a wheel: gradio's defaults then
CSS = STYLE_FILE.read_text(encoding="utf-8") if STYLE_FILE.is_file() else ""


@dataclass
class Event:
    fn: Callable  # exactly what gradio calls
    inputs: list[str]
    outputs: list[str]


@dataclass
class Tab:
    blocks: Any  # gr.Blocks
    controller: TabController
    components: dict[str, Any] = field(default_factory=dict)
    events: dict[str, Event] = field(default_factory=dict)

    def add(self, name: str, comp):
        self.components[name] = comp
        return comp

    def wire(self, name: str, trigger, event: str, handler: Callable[..., dict[str, Any]], inputs: Sequence[str],
             outputs: Sequence[str], *, progress: bool = False, queue: bool = True, star_inputs: bool = False):
        """Attach `handler` to `trigger.<event>`. The handler takes the input values as one dict (or, with
        `star_inputs`, positionally) and returns {output name: value or update}; missing outputs stay as
        they are."""
        inputs, outputs = list(inputs), list(outputs)
        fn = _gradio_fn(handler, inputs, outputs, progress=progress, star_inputs=star_inputs)
        compat.on(trigger, event, fn, [self.components[n] for n in inputs], [self.components[n] for n in outputs],
                  queue=queue, show_progress="full" if progress else "minimal", api_name=None, show_api=False,
                  api_visibility="undocumented", trigger_mode="always_last" if event == "input" else None)
        self.events[name] = Event(fn, inputs, outputs)

    # ---- for tests: run an event's function with the components' values -------------------------------
    def values(self) -> dict[str, Any]:
        return {name: getattr(c, "value", None) for name, c in self.components.items()}

    def run(self, name: str, values: dict[str, Any], progress: Callable | None = None) -> dict[str, Any]:
        event = self.events[name]
        args = [values.get(n) for n in event.inputs]
        if progress is not None:
            args.append(progress)
        result = event.fn(*args)
        if len(event.outputs) == 1:
            result = (result,)
        return dict(zip(event.outputs, result))


def _gradio_fn(handler, inputs: list[str], outputs: list[str], *, progress: bool, star_inputs: bool):
    """A function with one positional parameter per input (gradio maps inputs by position, and finds a
    gr.Progress default among the positional parameters) that returns one value per output."""

    def fn(*args):
        values = list(args[: len(inputs)])
        kwargs = {}
        if progress:
            kwargs["progress"] = args[len(inputs)] if len(args) > len(inputs) else None
        result = handler(*values, **kwargs) if star_inputs else handler(dict(zip(inputs, values)), **kwargs)
        result = result or {}
        unknown = set(result) - set(outputs)
        if unknown:
            raise RuntimeError(f"handler {getattr(handler, '__name__', handler)} set {sorted(unknown)} "
                               "which are not outputs of its event")
        out = tuple(result[n] if n in result else update() for n in outputs)
        return out[0] if len(out) == 1 else out

    params = [inspect.Parameter(f"in_{i}_{name}", inspect.Parameter.POSITIONAL_OR_KEYWORD)
              for i, name in enumerate(inputs)]
    if progress:
        params.append(inspect.Parameter("progress", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                        default=compat.progress_tracker()))
    fn.__signature__ = inspect.Signature(params)
    fn.__name__ = f"merge_lab_{getattr(handler, '__name__', 'handler')}"
    return fn


def _ratio_slider(label: str, value: float, name: str, visible: bool = True, **extra):
    lo, hi = RATIO_RANGE
    return component(gr.Slider, minimum=lo, maximum=hi, step=0.01, value=value, label=label,
                     elem_id=ELEM_PREFIX + name, visible=visible, **extra)


def build_tab(backend: Backend, *, controller: TabController | None = None) -> Tab:
    """Build the tab's gr.Blocks (not launched: the host renders it, `merge-lab ui` launches it)."""
    controller = controller or TabController(backend)
    names = backend.model_names()
    method_names = controller.method_names()
    default_method = "weighted_sum" if "weighted_sum" in method_names else method_names[0]
    defaults = backend.preview_defaults()
    import merge_lab_methods

    default_base_mode = merge_lab_methods.get_method(default_method).base

    blocks = component(gr.Blocks, analytics_enabled=False, title="Merge Lab", css=CSS)
    tab = Tab(blocks, controller)
    add = tab.add
    with blocks:
        # ---- models and method ------------------------------------------------------------------------
        with gr.Row():
            add("models", component(gr.Dropdown, choices=names, value=[], multiselect=True,
                                    label="Models (in order: A, B, …)", elem_id=ELEM_PREFIX + "models", scale=4))
            add("refresh", component(gr.Button, value="Refresh models", elem_id=ELEM_PREFIX + "refresh",
                                     scale=0, min_width=120))
        with gr.Row():
            add("method", component(gr.Dropdown, choices=method_names, value=default_method, label="Method",
                                    elem_id=ELEM_PREFIX + "method"))
            add("base", component(gr.Dropdown, choices=[NO_BASE, *names], value=NO_BASE, label="Base model",
                                  elem_id=ELEM_PREFIX + "base", visible=default_base_mode != "never"))
            add("arch_info", component(gr.Markdown, value="architecture: choose models",
                                       elem_id=ELEM_PREFIX + "arch_info"))
        add("method_info", component(gr.Markdown, value=controller.method_changed(default_method)["method_info"],
                                     elem_id=ELEM_PREFIX + "method_info"))
        with gr.Row():
            for w in controller.widgets:
                add(w.field, _param_widget(w, default_method))
        # starts at the default method's published α; the method event moves it with the method
        add("alpha", _ratio_slider("Global ratio α", default_alpha(default_method), "alpha"))
        add("arch", gr.State(DEFAULT_ARCH))

        # ---- block ratios ---------------------------------------------------------------------------------
        with component(gr.Accordion, label="Block ratios (MBW)", open=False, elem_id=ELEM_PREFIX + "blocks"):
            with gr.Row():
                add("use_blocks", component(gr.Checkbox, value=False, label="Use block ratios",
                                            elem_id=ELEM_PREFIX + "use_blocks"))
                add("preset", component(gr.Dropdown, choices=list(presets()), value=None, label="Preset",
                                        elem_id=ELEM_PREFIX + "preset"))
            add("mbw_text", component(gr.Textbox, value="", label=f"Block ratios as text ({_value_counts()})",
                                      elem_id=ELEM_PREFIX + "mbw_text", lines=1))
            shown = set(visible_blocks(DEFAULT_ARCH))
            left, middle, right = slider_columns()
            with gr.Row():
                with gr.Column():
                    for b in left:
                        add(block_field(b), _ratio_slider(b, 0.5, block_field(b), visible=b in shown))
                with gr.Column():
                    for b in middle:
                        add(block_field(b), _ratio_slider(b, 0.5, block_field(b), visible=b in shown))
                    add("extra_blocks", component(
                        gr.Textbox, value="", label="Other blocks (NAME=ratio; each follows its main block when "
                        "not set, e.g. VAE follows BASE)", placeholder=_extra_blocks_example(),
                        elem_id=ELEM_PREFIX + "extra_blocks"))
                with gr.Column():
                    for b in right:
                        add(block_field(b), _ratio_slider(b, 0.5, block_field(b), visible=b in shown))
            add("key_ratios", component(gr.Textbox, value="", lines=2, label="Per-key ratios",
                                        info="REGEX=ratio, one a line, on top of the block ratios (the last match "
                                             "wins): e.g. cond_stage_model=0 keeps A's text encoder",
                                        placeholder="cond_stage_model=0", elem_id=ELEM_PREFIX + "key_ratios"))
            add("beta_blocks", component(gr.Textbox, value="", lines=1, label="β block ratios",
                                         info="β per block for a method with a beta parameter (triple_sum, "
                                              "sum_twice, tensor_swap, extract: SuperMerger's weights B): "
                                              "values as the block ratios above, or a preset; blank: beta",
                                         elem_id=ELEM_PREFIX + "beta_blocks"))

        # ---- LoRAs -------------------------------------------------------------------------------------
        with component(gr.Accordion, label="LoRAs (baked into the result)", open=False,
                       elem_id=ELEM_PREFIX + "lora_box"), gr.Row():
            add("lora_pick", component(gr.Dropdown, choices=backend.lora_names(), value=None,
                                       label="Add a LoRA", elem_id=ELEM_PREFIX + "lora_pick", scale=1))
            add("loras", component(gr.Textbox, value="", lines=2, label="LoRAs",
                                   info="one a line: NAME:STRENGTH[:BLOCKS] (BLOCKS: a preset such as INS or "
                                        "OUTALL, or a 17 / 12-value LoRA Block Weight or our block string)",
                                   placeholder="my-style.safetensors:0.7", elem_id=ELEM_PREFIX + "loras",
                                   scale=3))

        # ---- the output's keys: a VAE baked in, keys left out (also one model's convert job) ---------------
        with component(gr.Accordion, label="VAE and keys of the output", open=False,
                       elem_id=ELEM_PREFIX + "output_keys"), gr.Row():
            add("vae", component(gr.Dropdown, choices=[NO_VAE, *backend.vae_names()], value=NO_VAE,
                                 label="Bake a VAE", info="a standalone VAE file (LDM or diffusers names) in place "
                                 "of the result's own", elem_id=ELEM_PREFIX + "vae", scale=1))
            add("discard", component(gr.Textbox, value="", lines=2, label="Discard keys",
                                     info="REGEX, one a line: matching keys are left out", placeholder="^model_ema\\.",
                                     elem_id=ELEM_PREFIX + "discard", scale=2))
            add("prune", component(gr.Checkbox, value=False, label="Prune",
                                   info="drop EMA copies and training leftovers", elem_id=ELEM_PREFIX + "prune",
                                   scale=1))
        # ---- SuperMerger's Adjust: the UNet's first and last layers scaled / shifted after the merge ---------
        with component(gr.Accordion, label="Adjust (SuperMerger's detail / colour)", open=False,
                       elem_id=ELEM_PREFIX + "adjust_accordion"):
            add("adjust", component(gr.Textbox, value="", lines=1, label="Adjust",
                                    info="IN,OUT,OUT2,Contrast,Brightness,Cyan-Red,Magenta-Green,Yellow-Blue: 8 "
                                    "values, SD1/SD2/SDXL only (detail -6..6, the others -10..10); blank or all 0: "
                                    "no change", placeholder="0,0,0,0,0,0,0,0", elem_id=ELEM_PREFIX + "adjust"))

        # ---- advanced -----------------------------------------------------------------------------------
        with component(gr.Accordion, label="Advanced", open=False, elem_id=ELEM_PREFIX + "advanced"):
            with gr.Row():
                add("weights", component(gr.Textbox, value="", label="Per-model weights (comma-separated)",
                                         elem_id=ELEM_PREFIX + "weights"))
                add("seed", component(gr.Number, value=0, precision=0, label="Seed (drop masks)",
                                      elem_id=ELEM_PREFIX + "seed", minimum=0))
                add("precision", component(gr.Dropdown, choices=list(CHOICES["precision"]), value="float32",
                                           label="Compute precision", elem_id=ELEM_PREFIX + "precision"))
            with gr.Row():
                add("device", component(gr.Dropdown, choices=_devices(), value="cpu", label="Merge on",
                                        elem_id=ELEM_PREFIX + "device"))
                add("memory_budget", component(gr.Textbox, value="", label="Memory budget (e.g. 2GB; empty: 1GB)",
                                               elem_id=ELEM_PREFIX + "memory_budget"))
                add("missing", component(gr.Dropdown, choices=list(CHOICES["missing"]), value="error",
                                         label="Key missing in a model", elem_id=ELEM_PREFIX + "missing"))
                add("nonfinite", component(gr.Dropdown, choices=list(CHOICES["nonfinite"]), value="error",
                                           label="NaN / inf in a model", elem_id=ELEM_PREFIX + "nonfinite"))

        # ---- analyze --------------------------------------------------------------------------------------
        with gr.Row():
            add("analyze", component(gr.Button, value="Analyze (θ per block)", elem_id=ELEM_PREFIX + "analyze"))
            add("check", component(gr.Button, value="Show recipe", elem_id=ELEM_PREFIX + "check"))
        with gr.Row():
            add("theta_table", component(gr.HTML, value="", elem_id=ELEM_PREFIX + "theta_table"))
            add("heatmap", component(gr.Image, value=None, type="pil", label="θ heatmap", interactive=False,
                                     elem_id=ELEM_PREFIX + "heatmap"))

        # ---- save -----------------------------------------------------------------------------------------
        with gr.Row():
            add("out_name", component(gr.Textbox, value="", label="Output name (saved in the model folder)",
                                      placeholder="my-merge.safetensors", elem_id=ELEM_PREFIX + "out_name",
                                      scale=3))
            add("dtype", component(gr.Dropdown, choices=list(CHOICES["dtype"]), value=AUTO, label="Output dtype",
                                   elem_id=ELEM_PREFIX + "dtype", scale=1))
            add("recipe_metadata", component(gr.Checkbox, value=True, label="Write the recipe into the metadata",
                                             elem_id=ELEM_PREFIX + "recipe_metadata", scale=1))
            add("overwrite", component(gr.Checkbox, value=False, label="Overwrite", elem_id=ELEM_PREFIX + "overwrite",
                                       scale=1))
        with gr.Row():
            add("merge", component(gr.Button, value="Merge", variant="primary", elem_id=ELEM_PREFIX + "merge"))
            add("cancel", component(gr.Button, value="Cancel", variant="stop", elem_id=ELEM_PREFIX + "cancel"))
        add("status", component(gr.Textbox, value="", label="Status", interactive=False, lines=2,
                                elem_id=ELEM_PREFIX + "status"))

        # ---- preview --------------------------------------------------------------------------------------
        with component(gr.Accordion, label="Merge & preview", open=True, elem_id=ELEM_PREFIX + "preview_box"), \
                gr.Row():
                with gr.Column(scale=2):
                    add("prompt", component(gr.Textbox, value=defaults.prompt, label="Prompt", lines=2,
                                            elem_id=ELEM_PREFIX + "prompt"))
                    add("negative_prompt", component(gr.Textbox, value=defaults.negative_prompt,
                                                     label="Negative prompt", elem_id=ELEM_PREFIX + "negative_prompt"))
                    with gr.Row():
                        add("preview_seed", component(gr.Number, value=defaults.seed, precision=0, label="Seed",
                                                      elem_id=ELEM_PREFIX + "preview_seed"))
                        add("steps", component(gr.Number, value=defaults.steps, precision=0, label="Steps",
                                               elem_id=ELEM_PREFIX + "steps"))
                        add("cfg_scale", component(gr.Number, value=defaults.cfg_scale, label="CFG scale",
                                                   elem_id=ELEM_PREFIX + "cfg_scale"))
                    with gr.Row():
                        add("width", component(gr.Number, value=defaults.width, precision=0, label="Width",
                                               elem_id=ELEM_PREFIX + "width"))
                        add("height", component(gr.Number, value=defaults.height, precision=0, label="Height",
                                                elem_id=ELEM_PREFIX + "height"))
                        samplers = backend.sampler_names()
                        add("sampler", component(gr.Dropdown, choices=samplers, value=defaults.sampler or
                                                 (samplers[0] if samplers else None), label="Sampler",
                                                 elem_id=ELEM_PREFIX + "sampler"))
                    add("preview", component(gr.Button, value="Merge & preview", variant="primary",
                                             elem_id=ELEM_PREFIX + "preview"))
                with gr.Column(scale=2):
                    add("preview_image", component(gr.Image, value=None, type="pil", label="Preview",
                                                   interactive=False, elem_id=ELEM_PREFIX + "preview_image"))
                    add("preview_info", component(gr.Textbox, value="", label="Generation parameters",
                                                  interactive=False, lines=3, elem_id=ELEM_PREFIX + "preview_info"))

        # ---- recipes --------------------------------------------------------------------------------------
        with gr.Row():
            add("recipe_source", component(gr.Dropdown, choices=names, value=None,
                                           label="Load the recipe stored in a merged model",
                                           elem_id=ELEM_PREFIX + "recipe_source", scale=3))
            add("load_recipe", component(gr.Button, value="Load recipe", elem_id=ELEM_PREFIX + "load_recipe",
                                         scale=1))
            if backend.supports_xyz:
                add("use_for_xyz", component(gr.Button, value="Use this recipe in the X/Y/Z plot",
                                             elem_id=ELEM_PREFIX + "use_for_xyz", scale=1))
        add("recipe_json", component(gr.Textbox, value="", label="Recipe (the JSON body of POST /merge-lab/v1/merge)",
                                     interactive=False, lines=6, elem_id=ELEM_PREFIX + "recipe_json"))

        _wire(tab, controller, backend)
    return tab


def _value_counts() -> str:
    """"26 values for SD1.x/SD2.x/SDXL refiner, 20 for SDXL …": each registered architecture's string length."""
    counts: dict[int, list[str]] = {}
    for spec in archs.specs():
        counts.setdefault(len(spec.main_blocks), []).append(spec.short)
    return ", ".join(f"{n} values for {'/'.join(who)}" for n, who in sorted(counts.items(), reverse=True))


def _extra_blocks_example() -> str:
    """"TIME=0, OUT=0, VAE=0, TE1=0, …": the named extra blocks of the registered architectures."""
    names = list(dict.fromkeys(b for spec in archs.specs() for b in spec.extra_blocks))
    return ", ".join(f"{b}=0" for b in names[:6]) + (", …" if len(names) > 6 else "")


def _param_widget(w, default_method: str):
    visible = default_method in w.defaults
    value = w.defaults.get(default_method, next(iter(w.defaults.values())))
    common = {"label": w.label(default_method if visible else None), "visible": visible,
              "elem_id": ELEM_PREFIX + w.field}
    if w.kind is bool:
        return component(gr.Checkbox, value=bool(value), **common)
    if w.choices:
        return component(gr.Dropdown, choices=list(w.choices), value=value, **common)
    if w.kind in (int, float):
        if w.minimum is not None and w.maximum is not None:
            step = 1 if w.kind is int else 0.01
            return component(gr.Slider, minimum=w.minimum, maximum=w.maximum, step=step, value=value, **common)
        return component(gr.Number, value=value, precision=0 if w.kind is int else None, **common)
    return component(gr.Textbox, value=str(value), **common)


def _devices() -> list[str]:
    import torch

    return ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def _wire(tab: Tab, controller: TabController, backend: Backend) -> None:
    c = tab.components
    recipe_inputs = controller.recipe_fields
    param_outputs = controller.param_fields
    slider_fields = controller.block_fields

    tab.wire("refresh", c["refresh"], "click",
             lambda v: controller.refresh_models(v["models"], v["base"], v["recipe_source"]),
             ["models", "base", "recipe_source"], ["models", "base", "recipe_source", "status"])
    method_event = compat.user_edit_event(c["method"])
    tab.wire("method", c["method"], method_event, lambda v: controller.method_changed(v["method"]),
             ["method"], [*param_outputs, "method_info", "base", "alpha", "status"])
    tab.wire("models", c["models"], "change",
             lambda *vals: controller.models_changed(vals[0], vals[1], *vals[2:]),
             ["models", "use_blocks", *slider_fields], ["arch", "arch_info", *slider_fields, "mbw_text"],
             star_inputs=True)
    tab.wire("preset", c["preset"], compat.user_edit_event(c["preset"]),
             lambda v: controller.preset_chosen(v["preset"], v["arch"]),
             ["preset", "arch"], [*slider_fields, "mbw_text", "use_blocks", "status"])
    for event in ("submit", "blur"):
        if compat.has_event(c["mbw_text"], event):
            tab.wire(f"mbw_text_{event}", c["mbw_text"], event,
                     lambda v: controller.mbw_text_edited(v["mbw_text"], v["arch"], v["alpha"]),
                     ["mbw_text", "arch", "alpha"], [*slider_fields, "mbw_text", "use_blocks", "preset", "status"])
    for b in controller.slider_blocks:
        slider = c[block_field(b)]
        tab.wire(f"slider_{b}", slider, compat.user_edit_event(slider),
                 lambda *vals: controller.sliders_moved(vals[0], *vals[1:]),
                 ["arch", *slider_fields], ["mbw_text"], star_inputs=True)

    tab.wire("lora_pick", c["lora_pick"], compat.user_edit_event(c["lora_pick"]),
             lambda v: controller.lora_picked(v["lora_pick"], v["loras"]), ["lora_pick", "loras"],
             ["loras", "lora_pick", "status"])
    tab.wire("analyze", c["analyze"], "click", controller.analyze, recipe_inputs,
             ["theta_table", "heatmap", "status"], progress=True)
    tab.wire("check", c["check"], "click", controller.show_recipe, recipe_inputs, ["recipe_json", "status"])
    tab.wire("merge", c["merge"], "click", controller.merge, [*recipe_inputs, *SAVE_FIELDS],
             ["status", "recipe_json"], progress=True)
    tab.wire("cancel", c["cancel"], "click", lambda v: controller.cancel(), [], ["status"], queue=False)
    tab.wire("preview", c["preview"], "click", controller.merge_and_preview, [*recipe_inputs, *PREVIEW_FIELDS],
             ["preview_image", "preview_info", "status", "recipe_json"], progress=True)
    load_outputs = [*recipe_inputs, "method_info", "mbw_text", "status"]
    load_outputs = list(dict.fromkeys(load_outputs))
    tab.wire("load_recipe", c["load_recipe"], "click", lambda v: controller.load_recipe(v["recipe_source"]),
             ["recipe_source"], load_outputs)
    if "use_for_xyz" in c:
        tab.wire("use_for_xyz", c["use_for_xyz"], "click", controller.use_for_xyz, recipe_inputs,
                 ["status", "recipe_json"])

