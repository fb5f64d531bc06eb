"""`merge-lab demo` merges with every method and writes the θ report (run here on small sd1 models)."""

import json

from PIL import Image
from safetensors import safe_open

import merge_lab_methods as methods
from merge_lab.cli.commands.demo import run_demo


def test_demo_merges_with_every_method_and_writes_the_theta_report(tmp_path):
    rows = run_demo(tmp_path, archs=("sd1",), width=8, vocab=256, progress=False)
    merged = sorted((tmp_path / "merged").glob("*.safetensors"))
    used = set()
    for path in merged:
        with safe_open(path, "pt") as f:
            used.add(json.loads(f.metadata()["sd_merge_recipe"])["method"])
    assert used == set(methods.method_names())  # every registered method
    assert len(rows) == len(merged) + 1
    text = (tmp_path / "analysis" / "sd1-theta.txt").read_text()
    assert "θ 1·2" in text and "| M00 " in text and "| ALL " in text
    report = json.loads((tmp_path / "analysis" / "sd1-theta.json").read_text())
    assert report["architecture"] == "sd1" and len(report["blocks"]) == 30
    assert all(a is not None for b in report["blocks"] for a in b["angles"])
    assert Image.open(tmp_path / "analysis" / "sd1-theta.png").size[0] > 300
