"""The architecture registry: one record (:class:`ArchSpec`) per architecture, one module per record.

Everything that differs between architectures is data here (diffusers' explicit configs and
CHECKPOINT_KEY_NAMES, ComfyUI's ModelMergeBlocks prefixes and mergekit's registry are the models): how a
file is recognised, which key prefixes are which component, the key layout, the block scheme, the value
strings users paste, presets, variants and what a preview needs. Detection, the block map, recipes, the
tab's sliders, the X/Y/Z axes and previews read these records; no other code names an architecture.

Adding one: docs/adding-an-architecture.md.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from merge_lab.archs.layouts import ModelLayout

Tensors = Mapping[str, Any]  # key -> the header's TensorInfo (shape, dtype): detection reads no tensor


@dataclass(frozen=True)
class PreviewVariant:
    """A released model of an architecture, as a preview renders it (its configs are archs/configs/<name>/)."""

    name: str
    arch: str
    title: str
    image_size: int  # native resolution (the default preview size)
    prediction_type: str  # "epsilon" | "v_prediction"
    scheduler: str  # the release's default scheduler class
    vae_scaling_factor: float
    vae_force_upcast: bool = False  # SDXL's VAE overflows in fp16: diffusers decodes it in fp32
    upcast_attention: bool = False  # SD 2.1 768-v computes attention in fp32 (NaNs in fp16 otherwise)
    # Flow-matching releases (Flux, Chroma, SD3; prediction_type "flow"): the VAE's latent shift, the
    # scheduler's timestep shift (dynamic: resolution-dependent, as Flux dev and Chroma ship it), the
    # T5 prompt length, and whether the guidance value is an input of the model (Flux dev) rather than CFG.
    vae_shift_factor: float | None = None
    flow_shift: float = 1.0
    dynamic_shift: bool = False
    max_sequence_length: int = 256
    embedded_guidance: bool = False


@dataclass(frozen=True)
class PreviewSupport:
    """What rendering an architecture with diffusers takes."""

    pipeline: str  # the diffusers pipeline class
    # Its other constructor arguments (a None component is also None in model_index.json).
    pipeline_options: Mapping[str, Any]
    variants: tuple[PreviewVariant, ...]
    default_variant: str  # when neither the file nor the user says which release it is
    # Per text encoder: CLIPTextModelWithProjection (SDXL's second) rather than CLIPTextModel.
    text_encoder_projection: tuple[bool, ...] = (False,)
    # SD2 conditions on the penultimate text layer: diffusers' text encoder ends one layer earlier and has
    # no projection, so the checkpoint's last layer and projection are not loaded.
    penultimate_text_layer: bool = False
    # (prediction setting, detected variants, metadata) -> (variant name, whether the file said so); None:
    # the default variant, known.
    pick_variant: Callable[[str, tuple[str, ...], Mapping[str, str]], tuple[str, bool]] | None = None
    # When the file does not say: (v-prediction variant, epsilon variant), decided by a test render.
    guess_by_test: tuple[str, str] | None = None
    # How the checkpoint becomes the pipeline's models (merge_lab.preview.convert): "ldm" (a UNet, the
    # LDM converters), "flux" / "chroma" (a Flux-family transformer), "sd3" (an MMDiT).
    converter: str = "ldm"


@dataclass(frozen=True)
class ArchSpec:
    name: str  # the id recipes, the CLI and metadata use ("sd1")
    title: str  # "Stable Diffusion 1.x"
    short: str  # in "this merger takes …" messages ("SD1.x")
    modelspec: str  # modelspec.architecture
    # Keys only this family of files has (diffusers' CHECKPOINT_KEY_NAMES): a file with none is not a candidate.
    probe_keys: tuple[str, ...]
    # The structural test among the candidates (block counts, projections): exactly one record may accept a file.
    matches: Callable[[Tensors], bool]
    # (component, key prefix), as ComfyUI and A1111 name them: "unet", "vae", "text_encoder", "text_encoder_2".
    components: tuple[tuple[str, str], ...]
    # layout(width, vocab): every key and shape at real size (width None) or at a tiny width (tests, demo).
    layout: Callable[..., ModelLayout]
    # The block scheme: (key prefix, block), matched longest first (ComfyUI's ModelMergeBlocks).
    block_prefixes: tuple[tuple[str, str], ...]
    # Main blocks in the order of the value strings users paste (the sliders' blocks).
    main_blocks: tuple[str, ...]
    # The family detection names when no record of it is registered ("flux", "chroma", "sd3"): registering a
    # record of a family hands its files from the one-line refusal to the records.
    family: str = ""
    # Named extra blocks -> the main block each follows when not set itself.
    extra_blocks: Mapping[str, str] = field(default_factory=dict)
    # Other value-string orders this architecture takes (value count -> block for each value, None: dropped):
    # the 26-value SD order on SDXL drops IN09-IN11 and OUT09-OUT11, as SuperMerger does.
    string_orders: Mapping[int, tuple[str | None, ...]] = field(default_factory=dict)
    # Preset table (a file in merge_lab/archs/), read in one of the orders above.
    preset_table: str | None = None
    # The order the θ analysis lists blocks in (the model's own order); None: main blocks, then extra blocks.
    analysis_order: tuple[str, ...] | None = None
    # The tab lays the sliders out in three columns.
    slider_columns: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]] | None = None
    # Old key prefix -> current, renamed on load (A1111's checkpoint_dict_replacements).
    key_aliases: Mapping[str, str] = field(default_factory=dict)
    # Keys that are never merged: suffixes (copied, kept), exact names kept, training leftovers (--prune).
    never_merged_suffixes: tuple[str, ...] = ()
    kept_keys: tuple[str, ...] = ()
    leftover_prefixes: tuple[str, ...] = ()
    leftover_keys: tuple[str, ...] = ()
    # variants(tensors, metadata) -> ("inpaint", "v-prediction", …)
    variants: Callable[[Tensors, Mapping[str, str]], tuple[str, ...]] = lambda tensors, metadata: ()
    # Why a file of this architecture matched no record more precisely (a one-line description), or None.
    describe_unmatched: Callable[[Tensors], str | None] | None = None
    preview: PreviewSupport | None = None
    preview_refusal: str = "cannot be previewed"  # the message when `preview` is None

    @property
    def text_encoder_prefixes(self) -> tuple[str, ...]:
        return tuple(p for c, p in self.components if c.startswith("text_encoder"))

    @property
    def all_blocks(self) -> tuple[str, ...]:
        return (*self.main_blocks, *self.extra_blocks)

    @property
    def columns(self) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
        if self.slider_columns is not None:
            return self.slider_columns
        return (self.main_blocks[1:], self.main_blocks[:1], ())

    def display_order(self) -> tuple[str, ...]:
        """Every block once, in the analysis' order."""
        order = self.analysis_order or (*self.main_blocks, *self.extra_blocks)
        return tuple(dict.fromkeys([*order, *self.all_blocks]))

    def value_orders(self) -> dict[int, tuple[str | None, ...]]:
        """Every value-string order: its own (main blocks) and the others it takes."""
        return {len(self.main_blocks): self.main_blocks, **self.string_orders}

    def block_of(self, key: str) -> str | None:
        if self.never_merged_suffixes and key.endswith(self.never_merged_suffixes):
            return None
        for prefix, block in _longest_first(self):
            if key.startswith(prefix):
                return block
        return None


_SORTED: dict[str, tuple[tuple[str, str], ...]] = {}


def _longest_first(spec: ArchSpec) -> tuple[tuple[str, str], ...]:
    cached = _SORTED.get(spec.name)
    if cached is None:
        cached = _SORTED[spec.name] = tuple(sorted(spec.block_prefixes, key=lambda pb: -len(pb[0])))
    return cached


_REGISTRY: dict[str, ArchSpec] = {}


def register(spec: ArchSpec) -> ArchSpec:
    """Add an architecture (its module calls this at import); a second record under a taken name is an error."""
    if spec.name in _REGISTRY:
        raise RuntimeError(f"architecture {spec.name!r} registered twice")
    names = {b.upper() for b in spec.all_blocks}
    if len(names) != len(spec.all_blocks):
        raise ValueError(f"architecture {spec.name}: a block name is listed twice")
    unknown = {b for _, b in spec.block_prefixes} - names
    if unknown:
        raise ValueError(f"architecture {spec.name}: block prefixes name blocks it does not list: {sorted(unknown)}")
    for count, order in spec.string_orders.items():
        if len(order) != count or not set(o for o in order if o) <= set(spec.main_blocks):
            raise ValueError(f"architecture {spec.name}: the {count}-value order is not {count} of its main blocks")
    _REGISTRY[spec.name] = spec
    _SORTED.pop(spec.name, None)
    return spec


def unregister(name: str) -> None:
    """Remove an architecture (tests register throw-away ones)."""
    _REGISTRY.pop(name, None)
    _SORTED.pop(name, None)


def get(name: str) -> ArchSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r} (known: {', '.join(_REGISTRY)})") from None


def names() -> list[str]:
    return list(_REGISTRY)


def specs() -> list[ArchSpec]:
    return list(_REGISTRY.values())


def supported() -> str:
    """"SD1.x, SD2.x and SDXL single-file checkpoints": what the error messages say we take."""
    shorts = [s.short for s in _REGISTRY.values()]
    listed = shorts[0] if len(shorts) == 1 else ", ".join(shorts[:-1]) + " and " + shorts[-1]
    return f"{listed} single-file checkpoints"


def layout_for(arch: str, width: int | None = None, vocab: int = 49408) -> ModelLayout:
    """The key layout of `arch` at real size (width None) or with base width `width` (same key set)."""
    return get(arch).layout(width=width, vocab=vocab)


def current_key_name(key: str) -> str:
    """`key` under its current name: every architecture's old-name aliases (A1111 renames them on load)."""
    for spec in _REGISTRY.values():
        for old, new in spec.key_aliases.items():
            if key.startswith(old):
                return new + key[len(old):]
    return key


def preview_variants() -> dict[str, PreviewVariant]:
    """Every release a preview knows, by name (the config folders archs/configs/<name>/)."""
    return {v.name: v for s in _REGISTRY.values() if s.preview for v in s.preview.variants}


def all_block_names() -> list[str]:
    """Every block name of every architecture, in registry order (recipes are checked against it first)."""
    out: list[str] = []
    for s in _REGISTRY.values():
        out += [b for b in s.all_blocks if b not in out]
    return out
