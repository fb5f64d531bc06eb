"""The X/Y/Z plot: axes, merge-once grouping, labelled grids, JSON / CSV, bounded memory."""

from __future__ import annotations

import csv
import json
import weakref

import numpy as np
import pytest
from PIL import Image

from merge_lab.engine import Recipe, merge_to_state_dict
from merge_lab.errors import MergeLabError
from merge_lab.plot.grid import draw_grid
from merge_lab.plot.xyz import parse_axis, run_xyz
from merge_lab.preview.infotext import read_png_metadata
from merge_lab.preview.pipeline import PipelineCache, render_merge
from merge_lab.preview.settings import PreviewSettings
from tests.helpers import pixels

SMALL = dict(steps=2, width=64, height=64, dtype="fp32", device="cpu", prompt="a red house")
FLAT_25 = "0," + ",".join(["0.25"] * 25)  # the FLAT_25 preset written out


class CountingMerge:
    """merge_to_state_dict that counts merges and checks that no earlier merged model is still alive (and no
    weights are still loaded) when the next merge starts: memory stays bounded by one model."""

    def __init__(self, cache):
        self.cache = cache
        self.calls = 0
        self.results: list[weakref.ref] = []

    def __call__(self, recipe):
        import gc

        gc.collect()
        assert all(ref() is None for ref in self.results), "an earlier merged model is still alive"
        assert not any(p._has_weights() for p in self.cache._pipelines.values()), "old weights still loaded"
        self.calls += 1
        result = merge_to_state_dict(recipe)
        self.results.append(weakref.ref(result))
        return result


def _run(family, tmp_path, x, y=None, z=None, **settings):
    _, (ft1, ft2) = family
    cache = PipelineCache()
    counting = CountingMerge(cache)
    result = run_xyz(Recipe(models=[str(ft1), str(ft2)]), PreviewSettings(**{**SMALL, **settings}), tmp_path,
                     x=parse_axis(x), y=parse_axis(y) if y else None, z=parse_axis(z) if z else None,
                     progress=False, cache=cache, merge=counting)
    return result, counting


def test_parse_axis():
    a = parse_axis("alpha=0.2,0.5,0.8")
    assert (a.kind, a.values, a.changes_merge) == ("alpha", [0.2, 0.5, 0.8], True)
    assert parse_axis("block:in04=0-1[3]").values == [0.0, 0.5, 1.0] and parse_axis("block:in04=0").name == "IN04"
    assert parse_axis("alpha=0.2-1(+0.2)").values == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert parse_axis("seed=1-4").values == [1, 2, 3, 4] and not parse_axis("seed=1").changes_merge
    assert parse_axis("blocks=GRAD_V|" + FLAT_25).values == ["GRAD_V", FLAT_25]
    assert parse_axis("models=a.safetensors,b.safetensors|a.safetensors,c.safetensors").values == \
        [["a.safetensors", "b.safetensors"], ["a.safetensors", "c.safetensors"]]
    assert parse_axis("models=a.safetensors,b.safetensors").header(["x/a.safetensors", "b.safetensors"]) == \
        "models: a + b"
    assert parse_axis("prompt=a cat, photo|a dog").values == ["a cat, photo", "a dog"]
    assert parse_axis("prompt=a cat,a dog").values == ["a cat", "a dog"]
    assert parse_axis("sampler=Euler a,dpmpp_2m").values == ["euler_a", "dpmpp_2m"]
    assert parse_axis("param:density=0.2,0.5").name == "density"
    assert parse_axis("method=weighted_sum,slerp").header("slerp") == "method: slerp"
    for bad, message in (("alpha", "NAME=VALUES"), ("colour=1", "unknown axis"), ("block=1", "needs a name"),
                         ("alpha=x", "not a number"), ("seed=1.5", "integer"), ("alpha=", "no values"),
                         ("alpha=0-1(+0)", "step"), ("seed:x=1", "takes no name")):
        with pytest.raises(MergeLabError, match=message):
            parse_axis(bad)


def test_2x2_grid_of_distinct_recipes(render_sd1_family, tmp_path):
    result, counting = _run(render_sd1_family, tmp_path, "alpha=0.2,0.8", "block:IN04=0,1", seed=5)
    assert (result.merges, result.cache_hits, counting.calls) == (4, 0, 4)
    assert len({c.fingerprint for c in result.cells}) == 4

    # JSON and CSV: labels, recipe hash and image of every cell
    record = json.loads(result.json_path.read_text())
    assert record["axes"]["x"]["values"] == ["0.2", "0.8"] and record["axes"]["y"]["values"] == ["0", "1"]
    assert record["axes"]["y"]["axis"] == "block:IN04" and record["axes"]["z"] is None
    assert (record["merges"], record["cache_hits"]) == (4, 0)
    cells = {(c["x"], c["y"]): c for c in record["cells"]}
    assert set(cells) == {("0.2", "0"), ("0.2", "1"), ("0.8", "0"), ("0.8", "1")}
    assert all(c["seed"] == 5 for c in record["cells"])  # one seed for every cell
    assert cells[("0.8", "0")]["recipe"]["alpha"] == 0.8
    assert cells[("0.8", "0")]["recipe"]["block"] == {"IN04": 0.0}
    with open(result.csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["x"], r["y"], r["image"]) for r in rows] == \
        [(c["x"], c["y"], c["image"]) for c in record["cells"]]
    assert {r["recipe_hash"] for r in rows} == {c.fingerprint for c in result.cells}

    # four distinct images; each equals a plain preview of the same recipe and seed
    images = {c.index: Image.open(tmp_path / c.image) for c in result.cells}
    arrays = [pixels(im) for im in images.values()]
    assert all(not np.array_equal(a, b) for i, a in enumerate(arrays) for b in arrays[i + 1:])
    cell = next(c for c in result.cells if c.index == (0, 1, 0))  # alpha 0.2, IN04 1
    direct = render_merge(merge_to_state_dict(cell.recipe), PreviewSettings(**SMALL, seed=5),
                          cache=PipelineCache())[0]
    assert np.array_equal(pixels(direct), pixels(images[(0, 1, 0)]))
    assert read_png_metadata(tmp_path / cell.image)["fields"]["Merge recipe hash"] == cell.fingerprint

    # the grid: its size, and each cell region shows the cell's image (scaled x2 to 128 px, nearest)
    grid = Image.open(result.grids[0])
    rows_ = [[images[(0, yi, xi)] for xi in range(2)] for yi in range(2)]
    expected, layout = draw_grid(rows_, ["alpha: 0.2", "alpha: 0.8"], ["IN04: 0", "IN04: 1"], "t",
                                 min_cell=128)
    assert layout.scale == 2 and layout.cell_size == (128, 128)
    assert grid.size[0] == expected.size[0]
    for (r, c), box in layout.boxes.items():
        offset = grid.size[1] - expected.size[1]  # the title band may wrap differently
        shifted = (box[0], box[1] + offset, box[2], box[3] + offset)
        scaled = images[(0, r, c)].resize((128, 128), Image.Resampling.NEAREST)
        assert np.array_equal(pixels(grid.crop(shifted)), pixels(scaled)), (r, c)
    # labels are drawn: the header band above the first cell and the label column are not blank
    left, top = layout.boxes[(0, 0)][0], layout.boxes[(0, 0)][1] + grid.size[1] - expected.size[1]
    assert pixels(grid.crop((left, top - 30, left + 128, top - 4))).min() < 128
    assert pixels(grid.crop((0, top, left - 4, top + 128))).min() < 128
    assert grid.text["parameters"].startswith("a red house\n")
    assert json.loads(grid.text["merge_lab_recipe"])["xyz"]["x"]["axis"] == "alpha"


def test_seed_axis_never_remerges_and_same_recipes_share_a_merge(render_sd1_family, tmp_path):
    """x = image seed, y = the same ratios written two ways (preset name, values): one merge for all."""
    result, counting = _run(render_sd1_family, tmp_path, "seed=1,2", "blocks=FLAT_25|" + FLAT_25)
    assert (result.merges, result.cache_hits, counting.calls) == (1, 3, 1)
    img = {c.index: pixels(Image.open(tmp_path / c.image)) for c in result.cells}
    assert np.array_equal(img[(0, 0, 0)], img[(0, 1, 0)])  # same seed, same weights: identical
    assert np.array_equal(img[(0, 0, 1)], img[(0, 1, 1)])
    assert not np.array_equal(img[(0, 0, 0)], img[(0, 0, 1)])  # another seed: another image


def test_merge_count_is_what_the_axes_imply(render_sd1_family, tmp_path):
    """3 alphas x 2 seeds x 2 prompts = 12 cells, 3 merges, 9 cache hits, one grid per prompt."""
    result, counting = _run(render_sd1_family, tmp_path, "alpha=0.1,0.5,0.9", "seed=1,2", "prompt=a cat|a dog")
    assert (len(result.cells), result.merges, result.cache_hits, counting.calls) == (12, 3, 9, 3)
    assert [g.name for g in result.grids] == ["xyz-grid-z0-a_cat.png", "xyz-grid-z1-a_dog.png"]
    record = json.loads(result.json_path.read_text())
    assert [g["z"] for g in record["grids"]] == ["a cat", "a dog"]
    img = {c.index: pixels(Image.open(tmp_path / c.image)) for c in result.cells}
    assert len({a.tobytes() for a in img.values()}) == 12
    assert {c.settings.prompt for c in result.cells if c.index[0] == 1} == {"a dog"}


def test_bad_cells_fail_before_any_merge(render_sd1_family, tmp_path):
    _, (ft1, ft2) = render_sd1_family
    calls = []
    with pytest.raises(MergeLabError, match=r"xyz cell \(alpha: 5\).*outside") as err:
        run_xyz(Recipe(models=[str(ft1), str(ft2)]), PreviewSettings(**SMALL), tmp_path,
                x=parse_axis("alpha=0.5,5"), progress=False, merge=lambda r: calls.append(r))
    assert calls == [] and "\n" not in str(err.value)
    with pytest.raises(MergeLabError, match="IN99"):
        run_xyz(Recipe(models=[str(ft1), str(ft2)]), PreviewSettings(**SMALL), tmp_path,
                x=parse_axis("block:IN99=0.5"), progress=False, merge=lambda r: calls.append(r))
    with pytest.raises(MergeLabError, match="steps"):
        run_xyz(Recipe(models=[str(ft1), str(ft2)]), PreviewSettings(**SMALL), tmp_path,
                x=parse_axis("steps=2,0"), progress=False, merge=lambda r: calls.append(r))
    assert calls == []


def test_xyz_command(render_sd1_family, tmp_path, capsys):
    from merge_lab.cli import main

    _, (ft1, ft2) = render_sd1_family
    recipe = tmp_path / "base.yaml"
    Recipe(models=[str(ft1), str(ft2)], method="weighted_sum").dump(recipe)
    code = main(["xyz", "--recipe", str(recipe), "--x", "method=weighted_sum,slerp", "--y", "alpha=0.3",
                 "--out-dir", str(tmp_path / "out"), "--width", "64", "--height", "64", "--steps", "2",
                 "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0 and "2 cells, 2 merge(s), 0 cache hit(s)" in out
    record = json.loads((tmp_path / "out" / "xyz.json").read_text())
    assert [c["x"] for c in record["cells"]] == ["weighted_sum", "slerp"]
    assert Image.open(tmp_path / "out" / "xyz-grid.png").size[0] > 2 * 128
    assert main(["xyz", "--recipe", str(recipe), "--x", "alpha=9", "--out-dir", str(tmp_path / "o2")]) == 2
