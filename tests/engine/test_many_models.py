"""Dozens of models in bounded memory: chunked merges equal unchunked ones, units respect the budget."""

import math

import pytest
import torch
from safetensors import safe_open

from merge_lab.archs import layout_for
from merge_lab.demo.models import save_state_dict
from merge_lab.engine import merge_to_state_dict, prepare
from merge_lab.engine.recipe import Recipe, parse_size
from merge_lab.io.header import ITEMSIZE

N_MODELS = 40


@pytest.fixture(scope="module")
def many_sdxl(tmp_path_factory):
    """A base and 40 tiny checkpoints with the real SDXL key set (width 8, 256-token vocabulary)."""
    folder = tmp_path_factory.mktemp("many")
    shapes = layout_for("sdxl", width=8, vocab=256).shapes()
    g = torch.Generator().manual_seed(0)
    base = {k: (torch.arange(s[-1]).reshape(s) if k.endswith("position_ids") else torch.randn(s, generator=g).half())
            for k, s in shapes.items()}
    base_path = save_state_dict(base, folder / "base.safetensors")
    paths = []
    for i in range(N_MODELS):
        g = torch.Generator().manual_seed(1000 + i)
        state = {k: v if not v.is_floating_point() else (v.float() + 0.05 * torch.randn(v.shape, generator=g)).half()
                 for k, v in base.items()}
        paths.append(save_state_dict(state, folder / f"m{i:02d}.safetensors"))
    return base_path, paths


def read_one(path, key):
    with safe_open(path, "pt") as f:
        return f.get_tensor(key)


def small_units(monkeypatch):
    from merge_lab.engine import chunking

    monkeypatch.setattr(chunking, "UNIT_MAX_ELEMENTS", 8192)  # the bigger tiny tensors split into several units
    monkeypatch.setattr(chunking, "SLICE_ELEMENTS", 2048)
    monkeypatch.setattr(chunking, "MIN_SLICE_ELEMENTS", 1)


# The methods of the published many-model recipes (TIES-SOUP, TSD, Model Stock) and the plain mean. (TIES
# with the mass election shares their chunked code; it runs at 40 models in the memory test below and
# chunked = whole for it is in test_methods_engine.py: 85 s saved on a 2-core machine.)
@pytest.mark.parametrize("method", ["weighted_sum", "ties_soup", "tsd", "model_stock"])
def test_forty_models_chunked_equals_unchunked(many_sdxl, method, monkeypatch):
    base, models = many_sdxl
    recipe = Recipe(models=[str(p) for p in models], method=method, alpha=1.0,
                    weights=[1.0] * N_MODELS if method == "weighted_sum" else None,
                    base=None if method == "weighted_sum" else str(base))
    whole = merge_to_state_dict(recipe).state_dict
    with monkeypatch.context() as m:
        small_units(m)
        chunked = merge_to_state_dict(recipe.replace(threads=3)).state_dict
    assert set(whole) == set(chunked)
    for k in whole:
        if method == "model_stock":  # its whole-tensor cosines are summed per chunk: float64 rounding
            torch.testing.assert_close(whole[k].float(), chunked[k].float(), atol=1e-3, rtol=0)
        else:
            assert torch.equal(whole[k], chunked[k]), k
    if method == "weighted_sum":  # and the mean of 40 is what it should be (a spot check on one key)
        key = "model.diffusion_model.middle_block.1.transformer_blocks.3.attn2.to_k.weight"
        expected = sum(read_one(p, key).float() for p in models) / N_MODELS
        torch.testing.assert_close(whole[key].float(), expected, atol=2e-3, rtol=2e-3)


def test_units_in_flight_stay_within_the_budget(many_sdxl):
    _, models = many_sdxl
    budget = "1MB"
    with prepare(Recipe(models=[str(p) for p in models], method="weighted_sum", memory_budget=budget,
                        threads=2)) as plan:
        share = parse_size(budget) // (2 * plan.threads)
        per_element = sum(ITEMSIZE["F16"] for _ in plan.inputs) + ITEMSIZE["F16"]
        for task in plan.tasks:
            if task.action != "merge":
                continue
            row = math.prod(task.shape[1:]) if task.shape else 1
            for rows in task.chunks:
                n = task.numel if rows is None else (rows[1] - rows[0]) * row
                # a unit holds at least one row; beyond that it stays within its share of the budget
                assert n * per_element <= max(share, row * per_element), (task.key, rows)


def test_forty_model_ties_stays_small(many_sdxl, tmp_path):
    """Peak memory of a 40-model TIES merge in its own process. Per-slice radix counts (40 × 65536 bins)
    once fragmented the heap into 14 GB on these tiny models and got CI killed; now it is a few hundred MB."""
    import json
    import subprocess
    import sys

    base, models = many_sdxl
    code = (
        "import json, sys\n"
        "from merge_lab.engine import Recipe, merge_to_file\n"
        "a = json.loads(sys.argv[1])\n"
        "merge_to_file(Recipe(models=a['models'], base=a['base'], method='ties', out=a['out']))\n"
        # VmHWM, not ru_maxrss: Linux carries the forking (pytest) process's high-water mark into ru_maxrss
        "print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM:')) // 1024)\n"
    )
    args = json.dumps({"models": [str(p) for p in models], "base": str(base), "out": str(tmp_path / "o.safetensors")})
    run = subprocess.run([sys.executable, "-c", code, args], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    peak_mb = int(run.stdout.split()[-1])
    assert peak_mb < 1500, f"peak RSS {peak_mb} MB"
