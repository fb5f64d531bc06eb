"""`merge-lab bench`: the synthetic checkpoints it builds, and one tiny run of the Flux bench end to end.

The full-size runs are benchmarks (docs/PERFORMANCE.md), not tests; here the same code runs at a small width.
"""

from __future__ import annotations

import json

import torch

from merge_lab.archs import current_key_name
from merge_lab.archs.detect import detect
from merge_lab.benchmarks.io_floor import checkpoint_paths, ensure_checkpoints, model_bytes
from merge_lab.benchmarks.mecha import output_dtype
from merge_lab.cli import main
from merge_lab.io.checkpoints import read_header_any
from merge_lab.io.header import read_header
from merge_lab.io.reader import SafetensorsReader


def test_flux_bench_files_are_transformer_only_fp8_flux_dev(tmp_path):
    base, fts = ensure_checkpoints("flux", 2, tmp_path, width=16, verbose=False)
    assert [base, *fts] == checkpoint_paths("flux", 2, tmp_path, width=16)
    header = read_header(base)
    keys = set(header.tensors)
    # bare BFL names, transformer only, 19 double and 38 single blocks, dev's guidance_in
    assert not any(k.startswith(("model.", "text_encoders.", "vae.")) for k in keys)
    assert {f"double_blocks.{i}.img_attn.qkv.weight" for i in range(19)} <= keys
    assert {f"single_blocks.{i}.linear1.weight" for i in range(38)} <= keys
    assert "guidance_in.in_layer.weight" in keys
    for t in header.tensors.values():
        assert t.dtype == ("F8_E4M3" if len(t.shape) >= 2 else "BF16"), t.key
    assert base.stat().st_size >= model_bytes("flux", 16) > 0
    renamed = read_header_any(str(base), current_key_name)  # as every command reads it
    assert detect(renamed.tensors, renamed.metadata, str(base)).arch == "flux-dev"
    assert output_dtype(str(base)) == torch.float8_e4m3fn

    # the fine-tunes differ from the base after fp8 rounding, and from each other; generation is deterministic
    key = "single_blocks.3.linear1.weight"
    b, f1, f2 = (SafetensorsReader(p).read(key).float() for p in (base, *fts))
    assert (f1 != b).float().mean() > 0.5 and (f2 != f1).float().mean() > 0.5
    again = ensure_checkpoints("flux", 2, tmp_path / "again", width=16, verbose=False)[1][0]
    assert again.read_bytes() == fts[0].read_bytes()


def test_flux_bench_runs_floor_and_ours_and_reports_the_ratio(tmp_path, capsys):
    out = tmp_path / "flux.json"
    code = main(["bench", "--arch", "flux", "--width", "16", "--reps", "1", "--no-mecha", "--dir", str(tmp_path),
                 "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    # the Flux defaults: weighted sum of two and Model Stock of base + 2
    assert result["models"] == 2 and [row["method"] for row in result["summary"]] == ["weighted_sum", "model_stock"]
    for row in result["summary"]:
        assert row["ours_over_floor"] > 0 and row["ours"]["peak_rss_mb"] > 0
    assert all(r["ok"] for r in result["runs"])
    assert "ours / floor" in capsys.readouterr().out
    assert not list(tmp_path.glob("out-*/*.safetensors"))  # outputs removed after each measured run


def test_lora_bench_bakes_against_a_copy_and_extracts(tmp_path, capsys):
    out = tmp_path / "lora.json"
    code = main(["bench", "--arch", "sdxl", "--lora", "--width", "16", "--reps", "1", "--extract-rank", "4",
                 "--dir", str(tmp_path), "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert [r["variant"] for r in result["runs"]] == ["copy", "bake", "extract"]
    assert all(r["ok"] and r["peak_rss_mb"] > 0 for r in result["runs"])
    copy, bake, extract = result["runs"]
    assert abs(bake["out_mb"] - copy["out_mb"]) < 0.01 * copy["out_mb"]  # the same tensors, plus the recipe
    assert 0 < extract["out_mb"] < copy["out_mb"]
    assert "truncation error" in extract["report"] and result["lora_modules"] > 500
    text = capsys.readouterr().out
    assert "bake / copy:" in text and "extract rank 4" in text
    # the LoRA is kohya's: every module matches the checkpoint (a bake with unmatched modules fails)
    lora = next(tmp_path.glob("sdxl-w16/*-lora-r32.safetensors"))
    assert json.loads(read_header(lora).metadata["ss_network_dim"]) == 32
