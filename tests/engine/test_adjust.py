"""SuperMerger's Adjust (merge_methods/adjust.py) through the engine, the CLI, recipes, the HTTP route's body and
the X/Y/Z axis: golden against SuperMerger's formula (scripts/mergers/mergers.py `fineman` / `colorcalc` at
hako-mikan/sd-webui-supermerger 0b1c4915), every other key untouched, zeros a no-op, refusals in one line."""

from __future__ import annotations

import json

import pytest
import torch

from merge_lab import archs
from merge_lab.demo.models import base_state_dict, finetune_state_dict, save_state_dict
from merge_lab.engine import Recipe, merge_to_state_dict, prepare
from merge_lab.errors import MergeLabError, RecipeError
from merge_lab.io.header import read_header

from ..lora.helpers import read_all

U = "model.diffusion_model."
VALUES = [2.0, -1.5, 3.0, 4.0, -2.5, 1.0, -3.0, 5.0]

# SuperMerger's tables, transcribed for the reference: the colour direction (latent channels 1..3) of
# brightness, cyan-red, magenta-green, yellow-blue
SD_COLS = [[-1, 1 / 3, 2 / 3], [1, 1, 0], [0, -1, -1], [1, 0, 1]]
XL_COLS = [[0, 0, 1], [1, 0, 0], [-1, -1, 0], [-1, 1, 0]]


def reference(state: dict[str, torch.Tensor], v: list[float], xl: bool) -> dict[str, torch.Tensor]:
    """What SuperMerger's merge loop does to the six keys, in float64: keys 0..4 times a factor, the conv_out
    bias plus [contrast, colours] (its `fineman`: 1 - 0.01 d / 1 + 0.02 d; `colorcalc`: 0.02 Σ col_i · C_i)."""
    cols = XL_COLS if xl else SD_COLS
    colour = [sum(0.02 * v[4 + i] * cols[i][c] for i in range(4)) for c in range(3)]
    factors = {
        "input_blocks.0.0.weight": 1 - 0.01 * v[0],
        "input_blocks.0.0.bias": 1 + 0.02 * v[0],
        "out.0.weight": 1 - 0.01 * v[1],
        "out.0.bias": 1 + 0.02 * v[1],
        "out.2.weight": 1 - 0.01 * v[2],
    }
    out = {U + k: state[U + k].double() * f for k, f in factors.items()}
    out[U + "out.2.bias"] = state[U + "out.2.bias"].double() + torch.tensor([0.02 * v[3], *colour],
                                                                             dtype=torch.float64)
    return out


@pytest.fixture(scope="module")
def families(tmp_path_factory):
    """Two fp16 fine-tunes per architecture (sd1, sdxl) and a Flux file, width 8."""
    folder = tmp_path_factory.mktemp("adjust")
    files = {}
    for arch, vocab in (("sd1", 256), ("sdxl", 256), ("flux-dev", 64)):
        base = base_state_dict(archs.layout_for(arch, width=8, vocab=vocab))
        for i in range(2):
            path = folder / f"{arch}-ft{i}.safetensors"
            save_state_dict(finetune_state_dict(base, i), path)
            files.setdefault(arch, []).append(str(path))
    return files


def _merge(files, **changes):
    recipe = Recipe(models=list(files), alpha=0.3, dtype="fp32", **changes)
    return merge_to_state_dict(recipe)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_golden_against_supermergers_formula_and_every_other_key_unchanged(families, arch):
    plain = _merge(families[arch])
    adjusted = _merge(families[arch], adjust=VALUES)
    want = reference(plain.state_dict, VALUES, xl=arch == "sdxl")
    assert set(adjusted.state_dict) == set(plain.state_dict)
    for key, value in adjusted.state_dict.items():
        if key in want:
            assert value.dtype == torch.float32
            torch.testing.assert_close(value.double(), want[key], rtol=1e-6, atol=1e-7, msg=key)
            assert not torch.equal(value, plain.state_dict[key]), key
        else:
            assert torch.equal(value, plain.state_dict[key]), key
    assert adjusted.recipe_record["adjust"] == VALUES
    assert adjusted.fingerprint != plain.fingerprint


def test_colours_differ_between_sd_and_sdxl(families):
    """Brightness alone: SD moves latent channels 1..3 by 0.02·[-1, 1/3, 2/3], SDXL only channel 3 by 0.02."""
    only_brightness = [0, 0, 0, 0, 1, 0, 0, 0]
    for arch, shift in (("sd1", [0, -0.02, 0.02 / 3, 0.04 / 3]), ("sdxl", [0, 0, 0, 0.02])):
        plain = _merge(families[arch]).state_dict[U + "out.2.bias"]
        got = _merge(families[arch], adjust=only_brightness).state_dict[U + "out.2.bias"]
        torch.testing.assert_close(got - plain, torch.tensor(shift), rtol=0, atol=1e-6)


def test_zeros_change_nothing_and_are_not_recorded(families):
    plain = _merge(families["sd1"])
    zeros = _merge(families["sd1"], adjust=[0] * 8)
    assert all(torch.equal(zeros.state_dict[k], v) for k, v in plain.state_dict.items())
    assert "adjust" not in zeros.recipe_record and zeros.fingerprint == plain.fingerprint


def test_the_default_dtype_fp16_output(families):
    """Without --dtype the keys stay fp16: the adjusted value is computed in float32 and rounded once."""
    plain = merge_to_state_dict(Recipe(models=families["sd1"], alpha=0.5)).state_dict
    got = merge_to_state_dict(Recipe(models=families["sd1"], alpha=0.5, adjust=VALUES)).state_dict
    key = U + "input_blocks.0.0.weight"
    assert got[key].dtype == torch.float16
    assert torch.equal(got[key], (plain[key].float() * (1 - 0.01 * VALUES[0])).half())


def test_keys_cut_in_row_chunks_are_adjusted_whole(families, monkeypatch):
    import merge_lab.engine.chunking as chunking

    monkeypatch.setattr(chunking, "UNIT_MAX_ELEMENTS", 8)  # every key of more than 8 values in chunks
    plan = prepare(Recipe(models=families["sd1"], alpha=0.3, dtype="fp32", adjust=VALUES), hash_inputs=False)
    with plan:
        tasks = {t.key: t for t in plan.tasks}
        assert all(tasks[U + k].chunks == [None] for k in ("input_blocks.0.0.weight", "out.2.weight", "out.2.bias"))
        assert len(tasks[U + "input_blocks.1.0.in_layers.2.weight"].chunks) > 1
    plain = _merge(families["sd1"])
    adjusted = _merge(families["sd1"], adjust=VALUES)
    want = reference(plain.state_dict, VALUES, xl=False)
    for key in want:
        torch.testing.assert_close(adjusted.state_dict[key].double(), want[key], rtol=1e-6, atol=1e-7)


def test_refused_for_flux_in_one_line(families):
    with pytest.raises(RecipeError) as e:
        prepare(Recipe(models=families["flux-dev"], adjust=VALUES), hash_inputs=False)
    message = str(e.value)
    assert "adjust" in message and "Flux.1 dev" in message and "\n" not in message
    # all zeros is no Adjust at all: nothing to refuse
    prepare(Recipe(models=families["flux-dev"], adjust=[0] * 8), hash_inputs=False).close()


def test_refused_when_the_output_lacks_an_adjusted_key(families):
    with pytest.raises(MergeLabError, match=r"adjust changes this key, which the output lacks"):
        prepare(Recipe(models=families["sd1"], adjust=VALUES, discard=[r"\.out\.2\."]), hash_inputs=False)


@pytest.mark.parametrize("bad, message", [
    ([1] * 7, "adjust must be 8 numbers"),
    ([1] * 9, "adjust must be 8 numbers"),
    ([1, 2, 3, 4, 5, 6, 7, float("nan")], "adjust must be 8 numbers"),
    ("1,2,3,4,5,6,7", "adjust takes 8 numbers"),
    ("1,2,3,4,5,6,7,x", "'x' is not a number"),
    ("1,2,3,4,5,6,7,inf", "adjust yellow-blue must be a finite number"),
])
def test_bad_values_are_one_line_errors(families, bad, message):
    with pytest.raises(RecipeError) as e:
        Recipe.from_dict({"models": families["sd1"], "adjust": bad}).validate()
    assert message in str(e.value) and "\n" not in str(e.value)


def test_recipe_yaml_and_json_round_trip(tmp_path, families):
    recipe = Recipe(models=families["sd1"], adjust=VALUES)
    for name in ("r.yaml", "r.json"):
        recipe.dump(tmp_path / name)
        assert Recipe.load(tmp_path / name).adjust == VALUES
    (tmp_path / "s.yaml").write_text("models: [a.safetensors]\nadjust: '1, 0, 0, 0, 0, 0, 0, -2'\n")
    assert Recipe.load(tmp_path / "s.yaml").adjust == [1, 0, 0, 0, 0, 0, 0, -2]


def test_cli_merge_and_convert_end_to_end(families, tmp_path, run_cli):
    plain, out = tmp_path / "plain.safetensors", tmp_path / "adjusted.safetensors"
    text = ",".join(f"{v:g}" for v in VALUES)
    for path, extra in ((plain, []), (out, [f"--adjust={text}"])):
        code, _, err = run_cli("merge", "--models", *families["sd1"], "--alpha", "0.3", "--dtype", "fp32",
                               *extra, "--out", path, "--no-progress")
        assert code == 0, err
    got, want_from = read_all(out), read_all(plain)
    want = reference(want_from, VALUES, xl=False)
    for key, value in got.items():
        if key in want:
            torch.testing.assert_close(value.double(), want[key], rtol=1e-6, atol=1e-7)
        else:
            assert torch.equal(value, want_from[key]), key
    record = json.loads(read_header(out).metadata["sd_merge_recipe"])
    assert record["adjust"] == VALUES
    assert "adjust" not in json.loads(read_header(plain).metadata["sd_merge_recipe"])

    converted = tmp_path / "converted.safetensors"
    code, _, err = run_cli("convert", families["sd1"][0], "--dtype", "fp32", "--adjust", "0,0,0,0,0,0,0,1",
                           "--out", converted, "--no-progress")
    assert code == 0, err
    source, result = read_all(families["sd1"][0]), read_all(converted)
    shift = result[U + "out.2.bias"] - source[U + "out.2.bias"].float()
    torch.testing.assert_close(shift, torch.tensor([0, 0.02, 0, 0.02]), rtol=0, atol=1e-3)  # fp16 input

    bad = tmp_path / "bad.safetensors"
    code, _, err = run_cli("merge", "--models", *families["sd1"], "--adjust", "1,2", "--out", bad, "--no-progress")
    assert code != 0 and "adjust takes 8 numbers" in err and len(err.strip().splitlines()) == 1
    assert not bad.exists()
    code, _, err = run_cli("merge", "--models", *families["flux-dev"], "--adjust=1,0,0,0,0,0,0,0", "--out", bad,
                           "--no-progress")
    assert code != 0 and "Flux.1 dev" in err and len(err.strip().splitlines()) == 1
    assert not bad.exists()


def test_http_body_and_xyz_axis(families, tmp_path):
    import os
    import shutil

    from merge_lab_extension.api import merge_request
    from merge_lab_extension.backend import FolderBackend
    from merge_lab_extension.xyz_axes import AXIS_PREFIX, apply_overrides, xyz_axes

    folder = tmp_path / "models"
    folder.mkdir()
    for f in families["sd1"]:
        shutil.copy(f, folder)
    names = [os.path.basename(f) for f in families["sd1"]]
    backend = FolderBackend([folder])
    answer = merge_request({"models": names, "alpha": 0.3, "adjust": "1,0,0,0,0,0,0,0", "out": "api"}, backend)
    assert answer["action"] == "saved"
    record = json.loads(read_header(folder / "api.safetensors").metadata["sd_merge_recipe"])
    assert record["adjust"] == [1, 0, 0, 0, 0, 0, 0, 0]

    class Axis:
        def __init__(self, label, kind, apply, **kw):
            self.label, self.apply, self.kw = label, apply, kw

    axis = next(a for a in xyz_axes(None, Axis) if a.label == AXIS_PREFIX + "adjust (8 values)")

    class Cell:
        pass

    cell = Cell()
    axis.apply(cell, "2 0 0 0 0 0 0 -1", [])
    assert axis.kw["format_value"](cell, axis, "2 0 0 0 0 0 0 -1") == "adjust 2,0,0,0,0,0,0,-1"
    recipe = apply_overrides(Recipe(models=families["sd1"], adjust=VALUES), cell.merge_lab_overrides)
    assert recipe.adjust == [2, 0, 0, 0, 0, 0, 0, -1]
    with pytest.raises(RecipeError, match="adjust takes 8 numbers"):
        axis.apply(cell, "2,0", [])
