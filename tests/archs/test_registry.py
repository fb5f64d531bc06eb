"""The architecture registry: a throw-away architecture registered here, and nowhere else, is detected,
merged per block, shown in the tab's sliders and offered as X/Y/Z axes (docs/adding-an-architecture.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from merge_lab import archs
from merge_lab.archs.blocks import block_of, key_role, resolve_ratios
from merge_lab.archs.detect import detect
from merge_lab.archs.presets import preset_values
from merge_lab.engine import Recipe, merge_to_file
from merge_lab.errors import CheckpointError, RecipeError
from merge_lab.io.checkpoints import read_header_any

TOY_KEYS = {
    "toy.embed.weight": (6, 4),
    "toy.blocks.0.weight": (6, 6), "toy.blocks.0.bias": (6,),
    "toy.blocks.1.weight": (6, 6), "toy.blocks.1.bias": (6,),
    "toy.blocks.10.weight": (6, 6),  # a prefix of blocks.1 as text: matched longest first
    "toy.head.weight": (3, 6),
    "toy.text.token_embedding.weight": (16, 4),
    "toy.text.position_ids": (1, 8),
}


@dataclass(frozen=True)
class ToyLayout:
    arch: str = "toy"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(TOY_KEYS)


def _toy_spec() -> archs.ArchSpec:
    return archs.ArchSpec(
        name="toy",
        title="Toy transformer",
        short="Toy",
        modelspec="toy-v1",
        probe_keys=("toy.embed.weight",),
        matches=lambda tensors: tensors["toy.embed.weight"].shape[1] == 4,
        components=(("transformer", "toy.blocks."), ("text_encoder", "toy.text.")),
        layout=lambda width=None, vocab=None: ToyLayout(),
        block_prefixes=(("toy.embed.", "T_IN"), ("toy.blocks.0.", "T00"), ("toy.blocks.1.", "T01"),
                        ("toy.blocks.10.", "T10"), ("toy.head.", "T_OUT"), ("toy.text.", "T_TEXT")),
        main_blocks=("T_IN", "T00", "T01", "T10"),
        extra_blocks={"T_OUT": "T10", "T_TEXT": "T_IN"},
        string_orders={3: ("T00", "T01", "T10")},
        never_merged_suffixes=("position_ids",),
    )


@pytest.fixture
def toy():
    spec = archs.register(_toy_spec())
    yield spec
    archs.unregister("toy")


def _toy_file(path, seed):
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(s, generator=g) for k, s in TOY_KEYS.items() if not k.endswith("position_ids")}
    tensors["toy.text.position_ids"] = torch.arange(8).reshape(1, 8)
    save_file(tensors, str(path))
    return tensors


def test_a_registered_architecture_is_detected_and_merged_per_block(toy, tmp_path):
    a, b = _toy_file(tmp_path / "a.safetensors", 1), _toy_file(tmp_path / "b.safetensors", 2)
    header = read_header_any(tmp_path / "a.safetensors", archs.current_key_name)
    assert detect(header.tensors).arch == "toy"
    assert "Toy" in archs.supported()
    assert block_of("toy.blocks.10.weight", "toy") == "T10" and block_of("toy.blocks.1.bias", "toy") == "T01"
    assert key_role("toy.text.position_ids", "toy") == "kept" and key_role("toy.other", "toy") == "unknown"

    ratios = {"T_IN": 0.0, "T00": 1.0, "T01": 0.25, "T10": 0.75}
    out = tmp_path / "merged.safetensors"
    recipe = Recipe(models=[str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")],
                    method="weighted_sum", alpha=0.5, blocks="0,1,0.25,0.75", block={"T_TEXT": 0.5}, out=str(out))
    merge_to_file(recipe)
    with safe_open(str(out), "pt") as f:
        merged = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        meta = f.metadata()
    follows = {"T_OUT": ratios["T10"], "T_TEXT": 0.5}
    for key in TOY_KEYS:
        if key.endswith("position_ids"):
            assert torch.equal(merged[key], a[key])
            continue
        r = {**ratios, **follows}[block_of(key, "toy")]
        expected = (a[key] * (1 - r) + b[key] * r)
        torch.testing.assert_close(merged[key], expected, rtol=0, atol=1e-6, msg=key)
    assert meta["modelspec.architecture"] == "toy-v1"
    assert json.loads(meta["sd_merge_recipe"])["ratios"]["T_OUT"] == 0.75

    # its other value order (3 values, no T_IN) and its blocks by name
    assert resolve_ratios("toy", 0.5, [0.1, 0.2, 0.3]) == {
        "T_IN": 0.5, "T00": 0.1, "T01": 0.2, "T10": 0.3, "T_OUT": 0.3, "T_TEXT": 0.5}
    with pytest.raises(RecipeError, match="toy takes 4 block ratios"):
        resolve_ratios("toy", 0.5, [0.1] * 26)
    with pytest.raises(RecipeError, match="none for toy"):
        preset_values("GRAD_V", "toy")


def test_a_file_no_record_takes_is_refused_and_the_toy_is_gone_after(toy, tmp_path):
    tensors = _toy_file(tmp_path / "a.safetensors", 1)
    tensors["toy.embed.weight"] = torch.zeros(6, 5)  # fails the toy's structural test
    save_file(tensors, str(tmp_path / "odd.safetensors"))
    header = read_header_any(tmp_path / "odd.safetensors")
    with pytest.raises(CheckpointError, match=r"this merger takes .*Toy single-file checkpoints"):
        detect(header.tensors)
    archs.unregister("toy")
    assert "toy" not in archs.names() and "T00" not in archs.all_block_names()
    archs.register(_toy_spec())  # the fixture unregisters it again


def test_the_tab_shows_its_sliders_and_the_host_offers_its_axes(toy, tmp_path):
    pytest.importorskip("gradio")
    from merge_lab_extension.backend import FolderBackend
    from merge_lab_extension.controller import TabController
    from merge_lab_extension.form import slider_blocks, slider_columns
    from merge_lab_extension.ui import build_tab
    from merge_lab_extension.xyz_axes import AXIS_PREFIX, xyz_axes

    _toy_file(tmp_path / "a.safetensors", 1)
    _toy_file(tmp_path / "b.safetensors", 2)
    assert slider_blocks()[:26] == list(archs.get("sd1").main_blocks)
    assert slider_blocks()[-4:] == ["T_IN", "T00", "T01", "T10"]
    assert slider_columns()[1][-1] == "T_IN" and slider_columns()[0][-3:] == ["T00", "T01", "T10"]

    backend = FolderBackend([tmp_path])
    controller = TabController(backend)
    assert "block_T00" in controller.recipe_fields
    out = controller.models_changed(["a.safetensors"], True, *[0.5] * len(controller.slider_blocks))
    assert out["arch"] == "toy" and out["arch_info"] == "architecture: Toy transformer"
    shown = [b for b in controller.slider_blocks if out[f"block_{b}"]["visible"]]
    assert shown == ["T_IN", "T00", "T01", "T10"]
    assert out["mbw_text"] == "0.5,0.5,0.5,0.5"
    form = {"models": ["a.safetensors", "b.safetensors"], "method": "weighted_sum", "alpha": 0.5,
            "use_blocks": True, "arch": "toy", "block_T_IN": 0, "block_T00": 1, "block_T01": 0.25,
            "block_T10": 0.75}
    assert controller.recipe(form).blocks == "0,1,0.25,0.75"

    tab = build_tab(backend, controller=controller)  # the gradio tab holds a slider per toy block
    assert {"block_T_IN", "block_T00", "block_T01", "block_T10"} <= set(tab.components)

    class AxisOption:  # the host's class, as far as registering an axis goes
        def __init__(self, label, type, apply, **kw):
            self.label = label

    labels = [a.label for a in xyz_axes(backend, AxisOption)]
    assert {f"{AXIS_PREFIX}block ratio {b}" for b in ("T00", "T01", "T10", "T_OUT", "T_TEXT")} <= set(labels)


@pytest.mark.parametrize("name", archs.names())
def test_every_registered_layout_is_detected_as_itself_and_every_key_has_a_role(name):
    """Each built-in record takes its own layout (and only it), and describes every key of it."""
    from merge_lab.io.header import TensorInfo

    spec = archs.get(name)
    for width in (None, 8):
        shapes = spec.layout(width=width, vocab=49408).shapes()
        tensors = {k: TensorInfo(k, "F32", tuple(s), 0, 0) for k, s in shapes.items()}
        assert detect(tensors).arch == name
        roles = {k: key_role(k, name) for k in shapes}
        assert {r for r in roles.values()} <= {"merge", "kept"}, [k for k, r in roles.items() if r not in ("merge", "kept")]
        blocks = {block_of(k, name) for k in shapes} - {None}
        assert blocks <= set(spec.all_blocks) and set(spec.main_blocks) - {"BASE"} <= blocks
