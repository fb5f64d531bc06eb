"""The cosine θ per block: numbers against a direct computation, undefined angles, the CLI, the heatmap."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from merge_lab import archs
from merge_lab.analysis import analyze
from merge_lab.archs.blocks import block_of
from merge_lab.cli.tables import format_report
from merge_lab.demo.models import save_state_dict
from merge_lab.plot.heatmap import colour, render_heatmap
from tests.helpers import expected_block, mergeable


def direct_angles(paths, base_path=None):
    """θ per block from the concatenated block vectors, float64, written independently of the engine."""
    states = [load_file(p) for p in paths]
    base = load_file(base_path) if base_path else None
    vectors = {}
    for key, tensor in states[0].items():
        if not mergeable(key, tensor, "sd1"):
            continue
        block = expected_block(key, "sd1")
        for i, s in enumerate(states):
            v = s[key].double() - (base[key].double() if base else 0)
            vectors.setdefault(block, [[] for _ in states])[i].append(v.flatten())
    vectors["ALL"] = [[v for b in list(vectors) for v in vectors[b][i]] for i in range(len(states))]
    out = {}
    for block, parts in vectors.items():
        vs = [torch.cat(p) for p in parts]
        angles = []
        for i in range(len(vs)):
            for j in range(i + 1, len(vs)):
                ni, nj = vs[i].norm(), vs[j].norm()
                angles.append(None if ni == 0 or nj == 0 else
                              math.degrees(math.acos(max(-1.0, min(1.0, float(vs[i] @ vs[j] / (ni * nj)))))))
        out[block] = angles
    return out


def test_theta_per_block_matches_the_concatenated_block_vectors(sd1_family):
    base, fts = sd1_family
    report = analyze([str(p) for p in fts], str(base))
    expected = direct_angles(fts, base)
    assert [b.block for b in report.blocks][:3] == ["BASE", "TIME", "IN00"] and report.blocks[-1].block == "ALL"
    assert {b.block for b in report.blocks} == set(expected)
    for b in report.blocks:
        assert b.angles == pytest.approx(expected[b.block], abs=1e-7), b.block
        cosines = [math.cos(math.radians(a)) for a in expected[b.block]]
        mean = sum(cosines) / 3
        assert b.mean_angle == pytest.approx(math.degrees(math.acos(mean)), abs=1e-7)
        assert b.model_stock_t == pytest.approx(3 * mean / (1 + 2 * mean), abs=1e-7)
        assert 40 < b.mean_angle < 90  # the demo family's task vectors are related
    assert sum(b.keys for b in report.blocks[:-1]) == report.blocks[-1].keys == 1130


def test_raw_weights_without_base_and_chunking(sd1_family):
    _, fts = sd1_family
    whole = analyze([str(p) for p in fts[:2]])
    chunked = analyze([str(p) for p in fts[:2]], memory_budget="1MB", threads=3)
    expected = direct_angles(fts[:2])
    for w, c in zip(whole.blocks, chunked.blocks):
        assert w.angles == pytest.approx(expected[w.block], abs=1e-7)
        assert c.angles == pytest.approx(w.angles, abs=1e-9)
        assert w.model_stock_t is None and 0 < w.angles[0] < 20  # raw weights of one family: small angles
    assert whole.base is None and "raw weights" in format_report(whole)


@pytest.fixture
def partly_untrained(sd1_family, tmp_path):
    """ft1 with its VAE and middle block equal to the base: a zero task vector in those blocks."""
    base, fts = sd1_family
    B, F = load_file(base), load_file(fts[0])
    for key in F:
        if key.startswith("first_stage_model.") or ".middle_block." in key:
            F[key] = B[key]
    return base, [save_state_dict(F, tmp_path / "ft1-partial.safetensors"), *fts[1:]]


def test_undefined_angles_are_reported_as_such(partly_untrained):
    base, fts = partly_untrained
    report = analyze([str(p) for p in fts], str(base))
    by_block = {b.block: b for b in report.blocks}
    vae = by_block["VAE"]
    assert vae.angles[:2] == [None, None] and vae.angles[2] is not None and vae.norms[0] == 0
    assert vae.mean_angle == pytest.approx(vae.angles[2])  # the mean of the defined pairs
    # Model Stock counts a zero-norm pair as cosine 0: c = cos23 / 3
    c = math.cos(math.radians(vae.angles[2])) / 3
    assert vae.model_stock_t == pytest.approx(3 * c / (1 + 2 * c))
    text = format_report(report)
    assert "| VAE " in text and "undefined" in text
    data = report.as_dict()
    vae_json = next(b for b in data["blocks"] if b["block"] == "VAE")
    assert vae_json["angles"][:2] == [None, None] and vae_json["cosines"][0] is None
    assert json.loads(json.dumps(data)) == data


def test_analyze_command_table_json_and_heatmap(partly_untrained, tmp_path, run_cli):
    base, fts = partly_untrained
    png = tmp_path / "theta.png"
    code, out, err = run_cli("analyze", "--models", *fts, "--base", base, "--heatmap", png, "--no-progress")
    assert code == 0, err
    assert "θ 1·2" in out and "| OUT11 " in out and "stock t" in out and "heatmap:" in out
    code, out, _ = run_cli("analyze", "--models", *fts, "--base", base, "--json", "--no-progress")
    data = json.loads(out)
    assert data["models"] == [p.name for p in fts] and data["pair_labels"] == ["1·2", "1·3", "2·3"]
    assert len(data["blocks"]) == 30 and data["unit"] == "degrees"
    image = Image.open(png)
    assert image.format == "PNG" and image.width > 300 and image.height > 30 * 26
    colours = {c for _, c in image.convert("RGB").getcolors(maxcolors=1 << 20)}
    assert (225, 225, 225) in colours  # undefined cells
    assert sum(1 for c in colours if c == colour(0.0) or c == colour(1.0)) >= 1  # the colour bar's ends


def test_analyze_needs_two_models(sd1_family, run_cli):
    base, fts = sd1_family
    code, _, err = run_cli("analyze", "--models", fts[0], "--base", base, "--no-progress")
    assert code == 2 and "at least 2 models besides the base" in err and err.count("\n") == 1


def _runs(mask) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a 1-D boolean array."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


_SCALE = np.array([colour(i / 2000) for i in range(2001)], dtype=np.int64)


def _fraction_of(rgb) -> float:
    """Where on the colour scale (0-1) an RGB colour lies: the nearest of colour() sampled finely."""
    distances = np.abs(_SCALE - np.asarray(rgb, dtype=np.int64)).sum(1)
    return float(np.argmin(distances)) / (len(_SCALE) - 1)


def test_heatmap_of_many_models(sd1_family, tmp_path):
    base, fts = sd1_family
    report = analyze([str(p) for p in fts] + [str(base)])  # 4 models, 6 pairs, raw weights
    path = render_heatmap(report, tmp_path / "many.png")
    image = Image.open(path)
    assert image.format == "PNG" and image.mode == "RGB"
    assert image.width > 7 * 78  # 6 pairs and the mean
    assert len(report.pair_labels) == 6 and len(report.blocks) == 30 and report.blocks[-1].block == "ALL"

    # The coloured (non-grey) pixels are the cells and the colour bar: text, grid and background are grey.
    rgb = np.asarray(image, dtype=np.int64)
    coloured = rgb.max(axis=2) != rgb.min(axis=2)
    columns = _runs(coloured.any(axis=0))
    assert len(columns) == len(report.pair_labels) + 1 + 1  # a column per pair, the mean, the colour bar
    *cell_columns, bar = columns
    assert len({end - start for start, end in cell_columns}) == 1  # equal widths
    assert cell_columns[-1][0] - cell_columns[-2][1] > cell_columns[1][0] - cell_columns[0][1]  # mean set apart
    rows = _runs(coloured[:, cell_columns[0][0]:cell_columns[-1][1]].any(axis=1))
    assert len(rows) == len(report.blocks)  # a row per block, the whole model last
    assert len({end - start for start, end in rows}) == 1
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(rows)]
    assert len(set(gaps[:-1])) == 1 and gaps[-1] > gaps[0]  # the whole-model row set apart
    assert image.height > rows[-1][1] and rows[0][0] > 0  # the title above, the legend below

    # Each cell's fill (its corner, clear of the printed number) shows its own angle on one linear scale.
    values, fractions, fills = [], [], []
    for block, (y0, _) in zip(report.blocks, rows):
        for value, (x0, _) in zip([*block.angles, block.mean_angle], cell_columns):
            fill = tuple(rgb[y0 + 1, x0 + 1])
            assert fill == tuple(rgb[y0 + 3, x0 + 2]), (block.block, fill)  # a filled cell, not text
            values.append(value)
            fills.append(fill)
            fractions.append(_fraction_of(fill))
    assert len(values) == 30 * 7 and None not in values
    slope, intercept = np.polyfit(values, fractions, 1)
    assert slope > 0 and np.abs(np.polyval([slope, intercept], values) - fractions).max() < 0.01
    assert min(fractions) >= 0 and max(fractions) <= 1 and max(fractions) - min(fractions) > 0.3
    spread = max(values) - min(values)
    for i in range(len(values)):
        for j in range(i):
            if abs(values[i] - values[j]) > spread / 50:  # distinct angles, distinct colours
                assert fills[i] != fills[j], (values[i], values[j])
    # the colour bar runs from the top of the scale to its bottom over the grid's height
    bar_x = (bar[0] + bar[1]) // 2
    bar_rows = _runs(coloured[:, bar_x])
    assert len(bar_rows) == 1 and bar_rows[0][0] >= rows[0][0] - 1 and bar_rows[0][1] <= rows[-1][1] + 1
    assert _fraction_of(rgb[bar_rows[0][0], bar_x]) > 0.98 and _fraction_of(rgb[bar_rows[0][1] - 1, bar_x]) < 0.02


@pytest.mark.parametrize("arch", archs.names())
def test_every_block_of_every_architecture_is_a_row_once(arch, tmp_path):
    """θ per block for each registered architecture: a row per block that holds keys, none twice, none lost."""
    shapes = archs.layout_for(arch, width=8, vocab=256).shapes()
    paths = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        path = tmp_path / f"{seed}.safetensors"
        save_file({k: torch.randn(s, generator=g) for k, s in shapes.items()}, str(path))
        paths.append(str(path))
    report = analyze(paths)
    rows = [b.block for b in report.blocks]
    assert rows[-1] == "ALL" and len(rows) == len(set(rows))
    holding = {block_of(k, arch) for k in shapes} - {None}
    assert set(rows[:-1]) == holding
    assert sum(b.keys for b in report.blocks[:-1]) == report.blocks[-1].keys == sum(
        1 for k in shapes if block_of(k, arch) is not None)
