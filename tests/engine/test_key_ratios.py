"""Elemental ratios (`--key REGEX=RATIO`, a recipe's `key:`): on top of the block ratios, the last matching
pattern wins, a pattern that matches nothing or is no regex is a one-line error, and the recipe records them."""

from __future__ import annotations

import json
import re

import torch

from merge_lab.io.header import read_header

from ..lora.helpers import read_all

U = "model.diffusion_model."
TE = "cond_stage_model."


def _merged(a, b, ratio):
    return torch.lerp(a.float(), b.float(), ratio).to(a.dtype)


def test_text_encoder_from_a_and_the_last_match_wins(sd1_family, tmp_path, run_cli):
    _, fts = sd1_family
    out = tmp_path / "m.safetensors"
    code, _, err = run_cli("merge", "--models", fts[0], fts[1], "--alpha", "0.5", "--key", f"^{TE}=0",
                           "--key", "attn=1", "--key", r"attn2\.to_k=0.25", "--out", out, "--no-progress")
    assert code == 0, err
    a, b, m = read_all(fts[0]), read_all(fts[1]), read_all(out)
    checked = {0.0: 0, 1.0: 0, 0.25: 0, 0.5: 0}
    for key, value in m.items():
        if not value.is_floating_point() or key.endswith("position_ids") or not key.startswith((TE, U)):
            continue
        ratio = 0.5
        for pattern, r in ((f"^{TE}", 0.0), ("attn", 1.0), (r"attn2\.to_k", 0.25)):  # in order: the last wins
            if re.search(pattern, key):
                ratio = r
        want = a[key] if ratio == 0 else b[key] if ratio == 1 else _merged(a[key], b[key], ratio)
        assert torch.equal(value, want), (key, ratio)
        checked[ratio] += 1
    assert all(checked.values()), checked
    record = json.loads(read_header(out).metadata["sd_merge_recipe"])
    assert list(record["key"]) == [f"^{TE}", "attn", r"attn2\.to_k"]


def test_key_ratios_sit_on_top_of_block_ratios_and_change_the_recipe_hash(sd1_family, tmp_path, run_cli):
    _, fts = sd1_family
    hashes = []
    for name, extra in (("plain", []), ("keyed", ["--key", r"input_blocks\.4\.=0.9"])):
        out = tmp_path / f"{name}.safetensors"
        code, _, err = run_cli("merge", "--models", fts[0], fts[1], "--blocks", ",".join(["0.2"] * 26), *extra,
                               "--out", out, "--no-progress")
        assert code == 0, err
        hashes.append(json.loads(read_header(out).metadata["sd_merge_recipe"])["recipe_hash"])
    a, b, keyed = read_all(fts[0]), read_all(fts[1]), read_all(tmp_path / "keyed.safetensors")
    plain = read_all(tmp_path / "plain.safetensors")
    key4 = U + "input_blocks.4.1.proj_in.weight"
    key5 = U + "input_blocks.5.1.proj_in.weight"
    assert torch.equal(keyed[key4], _merged(a[key4], b[key4], 0.9))
    assert torch.equal(keyed[key5], plain[key5]) and torch.equal(plain[key5], _merged(a[key5], b[key5], 0.2))
    assert hashes[0] != hashes[1]


def test_a_recipe_file_takes_key_and_bad_patterns_are_one_line_errors(sd1_family, tmp_path, run_cli):
    _, fts = sd1_family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models: [{fts[0]}, {fts[1]}]\nkey:\n  'cond_stage_model': 0\n"
                      f"out: {tmp_path / 'r.safetensors'}\n")
    code, _, err = run_cli("merge", "--recipe", recipe, "--no-progress")
    assert code == 0, err
    a, m = read_all(fts[0]), read_all(tmp_path / "r.safetensors")
    assert all(torch.equal(m[k], a[k]) for k in a if k.startswith(TE))
    for pattern, message in (("attn(=1", "not a valid regex"), ("no_such_layer=0.5", "match no merged key")):
        out = tmp_path / "bad.safetensors"
        code, _, err = run_cli("merge", "--models", fts[0], fts[1], "--key", pattern, "--out", out, "--no-progress")
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1 and not out.exists(), err
    code, _, err = run_cli("merge", "--models", fts[0], fts[1], "--key", "attn=7", "--out", tmp_path / "x.safetensors")
    assert code == 2 and "key attn" in err
