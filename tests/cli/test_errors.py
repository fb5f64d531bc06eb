"""Every error is one line naming the file (and key), and leaves no output file behind."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from merge_lab.demo.models import save_state_dict
from merge_lab.engine import Recipe, merge_to_file
from merge_lab.errors import MergeLabError


def run_failing(recipe: Recipe, match: str) -> str:
    with pytest.raises(MergeLabError) as info:
        merge_to_file(recipe)
    message = str(info.value)
    assert "\n" not in message
    assert match in message, message
    out_dir = os.path.dirname(recipe.out)
    assert not os.path.exists(recipe.out)
    assert not [f for f in os.listdir(out_dir) if f.endswith(".partial")]
    return message


def test_truncated_file(sd1_family, tmp_path):
    _, (a, b, _) = sd1_family
    cut = tmp_path / "cut.safetensors"
    data = b.read_bytes()
    cut.write_bytes(data[: len(data) - 1000])
    msg = run_failing(Recipe(models=[str(a), str(cut)], out=str(tmp_path / "o.safetensors")), "truncated")
    assert str(cut) in msg and "key '" in msg


def test_unreadable_file(sd1_family, tmp_path):
    _, (a, _, _) = sd1_family
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{abc}")
    msg = run_failing(Recipe(models=[str(a), str(junk)], out=str(tmp_path / "o.safetensors")), "JSON")
    assert str(junk) in msg


def test_mixed_architectures(sd1_family, sdxl_family, tmp_path):
    _, (a, _, _) = sd1_family
    _, (x, _, _) = sdxl_family
    msg = run_failing(Recipe(models=[str(a), str(x)], out=str(tmp_path / "o.safetensors")),
                      "different architectures")
    assert str(x) in msg and "sdxl" in msg and "sd1" in msg


def test_missing_key_error_and_take_first(sd1_family, tmp_path):
    _, (a, b, _) = sd1_family
    state = load_file(b)
    gone = "model.diffusion_model.output_blocks.3.1.proj_out.weight"
    del state[gone]
    holey = save_state_dict(state, tmp_path / "holey.safetensors")
    out = tmp_path / "o.safetensors"
    msg = run_failing(Recipe(models=[str(a), str(holey)], out=str(out)), "is missing")
    assert str(holey) in msg and gone in msg and "--missing take-first" in msg
    merge_to_file(Recipe(models=[str(a), str(holey)], missing="take-first", out=str(out)))
    assert torch.equal(load_file(out)[gone], load_file(a)[gone])


def test_shape_mismatch(sd1_family, tmp_path):
    _, (a, b, _) = sd1_family
    state = load_file(b)
    key = "model.diffusion_model.input_blocks.0.0.weight"
    state[key] = torch.zeros(8, 9, 3, 3, dtype=torch.float16)  # an inpainting UNet's first conv
    other = save_state_dict(state, tmp_path / "inpaint.safetensors")
    msg = run_failing(Recipe(models=[str(a), str(other)], out=str(tmp_path / "o.safetensors")), "put it first")
    assert str(other) in msg and key in msg and "inpainting model" in msg
    state[key] = torch.zeros(8, 4, 5, 5, dtype=torch.float16)  # a shape no variant explains
    odd = save_state_dict(state, tmp_path / "odd.safetensors")
    msg = run_failing(Recipe(models=[str(a), str(odd)], out=str(tmp_path / "o.safetensors")), "differs from")
    assert str(odd) in msg and key in msg and "[8, 4, 5, 5]" in msg


def test_unknown_method_and_parameter(sd1_family, tmp_path):
    _, (a, b, _) = sd1_family
    msg = run_failing(Recipe(models=[str(a), str(b)], method="avg", out=str(tmp_path / "o.safetensors")),
                      "unknown method 'avg'")
    assert "weighted_sum" in msg and "slerp" in msg
    msg = run_failing(Recipe(models=[str(a), str(b)], params={"k": 1}, out=str(tmp_path / "o.safetensors")),
                      "no parameter 'k'")


def test_output_equal_to_an_input_is_refused(sd1_family, tmp_path):
    _, (a, b, _) = sd1_family
    copy = tmp_path / "a.safetensors"
    shutil.copy(a, copy)
    before = copy.read_bytes()
    with pytest.raises(MergeLabError, match="is one of the inputs"):
        merge_to_file(Recipe(models=[str(copy), str(b)], out=str(copy)))
    assert copy.read_bytes() == before


def test_missing_model_file_and_bad_values(sd1_family, tmp_path):
    _, (a, b, _) = sd1_family
    out = str(tmp_path / "o.safetensors")
    run_failing(Recipe(models=[str(a), str(tmp_path / "nope.safetensors")], out=out), "not found")
    run_failing(Recipe(models=[str(a), str(b)], alpha=7, out=out), "outside")
    run_failing(Recipe(models=[str(a), str(b)], block={"IN12": 0.5}, out=out), "unknown block")
    run_failing(Recipe(models=[str(a)], out=out), "at least 2 models")
    run_failing(Recipe(models=[str(a), str(b)], blocks="0.1,0.2", out=out), "26 block ratios")


def test_failure_mid_merge_leaves_nothing(sd1_family, tmp_path, monkeypatch):
    """An exception half-way through (here: a read error) removes the temporary file."""
    from merge_lab.io import reader as reader_io

    _, (a, b, _) = sd1_family
    calls = {"n": 0}
    real = reader_io.SafetensorsReader.read

    def flaky(self, key, rows=None):
        calls["n"] += 1
        if calls["n"] == 400:
            raise OSError(5, "Input/output error")
        return real(self, key, rows)

    monkeypatch.setattr(reader_io.SafetensorsReader, "read", flaky)
    out = tmp_path / "o.safetensors"
    with pytest.raises(OSError):
        merge_to_file(Recipe(models=[str(a), str(b)], out=str(out)))
    assert not out.exists() and not [f for f in os.listdir(tmp_path) if f.endswith(".partial")]
