"""The command line, run in-process: info, merge (flags, recipe file, overrides), batch, methods, presets."""

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file


def test_info_json_reads_the_header(sdxl_family, run_cli):
    _, (a, _, _) = sdxl_family
    code, out, _ = run_cli("info", a, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["architecture"] == "sdxl" and report["keys"] == 2515
    assert report["components"] == {"unet": 1680, "text_encoder_2": 390, "vae": 248, "text_encoder": 197}
    assert report["blocks"]["TE2"] == 389 and report["blocks"]["(not merged)"] == 2
    assert report["dtypes"] == {"F16": 2514, "I64": 1}


def test_info_text_and_merge_metadata(sd1_family, tmp_path, run_cli):
    _, (a, b, _) = sd1_family
    out = tmp_path / "m.safetensors"
    code, text, _ = run_cli("merge", "--models", a, b, "--alpha", "0.25", "--block", "VAE=0",
                            "--out", out, "--no-progress")
    assert code == 0 and "sha256 " in text and "AutoV2 " in text
    code, text, _ = run_cli("info", out)
    assert "architecture: sd1" in text and "sd_merge_recipe" in text and '"VAE": 0.0' in text


def test_variant_detection(sd1_family, tmp_path, run_cli):
    from merge_lab.demo.models import save_state_dict

    _, (a, _, _) = sd1_family
    state = load_file(a)
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(8, 9, 3, 3, dtype=torch.float16)
    inpaint = save_state_dict(state, tmp_path / "inpaint.safetensors",
                              {"modelspec.prediction_type": "v"})
    _code, out, _ = run_cli("info", inpaint, "--json")
    assert json.loads(out)["variants"] == ["inpaint", "v-prediction"]


def test_recipe_file_with_flag_overrides(sd1_family, tmp_path, run_cli):
    _, (a, b, _) = sd1_family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"models": [str(a), str(b)], "method": "weighted_sum", "alpha": 0.9,
                                      "block": {"VAE": 0.0}, "out": "from-recipe.safetensors"}))
    code, _, err = run_cli("merge", "--recipe", recipe, "--alpha", "0.1", "--block", "M00=1",
                           "--no-progress")
    assert code == 0, err
    merged = load_file(tmp_path / "from-recipe.safetensors")  # relative to the recipe file
    A, B = load_file(a), load_file(b)
    k_in = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
    k_mid = "model.diffusion_model.middle_block.0.in_layers.2.weight"
    k_vae = "first_stage_model.decoder.conv_in.weight"
    assert torch.equal(merged[k_in], torch.lerp(A[k_in].float(), B[k_in].float(), 0.1).half())
    assert torch.equal(merged[k_mid], B[k_mid])
    assert torch.equal(merged[k_vae], A[k_vae])


def test_errors_are_one_line_with_exit_code_2(sd1_family, tmp_path, run_cli):
    _, (a, b, _) = sd1_family
    code, _, err = run_cli("merge", "--models", a, b, "--method", "nope", "--out",
                           tmp_path / "x.safetensors", "--no-progress")
    assert code == 2 and err.count("\n") == 1 and "unknown method 'nope'" in err
    code, _, err = run_cli("merge", "--models", a, b, "--param", "k=1", "--out",
                           tmp_path / "x.safetensors", "--no-progress")
    assert code == 2 and "no parameter 'k'" in err


def test_batch_runs_on_after_a_failure(sd1_family, tmp_path, run_cli):
    _, (a, b, c) = sd1_family
    folder = tmp_path / "recipes"
    folder.mkdir()
    (folder / "1-good.yaml").write_text(yaml.safe_dump({"models": [str(a), str(b)], "out": str(tmp_path / "g1.safetensors")}))
    (folder / "2-bad.yaml").write_text(yaml.safe_dump({"models": [str(a), str(tmp_path / "missing.safetensors")],
                                                      "out": str(tmp_path / "bad.safetensors")}))
    (folder / "3-good.json").write_text(json.dumps({"models": [str(a), str(c)], "method": "slerp",
                                                   "out": str(tmp_path / "g3.safetensors")}))
    code, out, _ = run_cli("batch", folder, "--no-progress")
    assert code == 1
    assert (tmp_path / "g1.safetensors").exists() and (tmp_path / "g3.safetensors").exists()
    assert not (tmp_path / "bad.safetensors").exists()
    assert "2 merged, 1 failed" in out and "FAILED" in out and "missing.safetensors" in out
    assert out.count("| ok") == 2


@pytest.mark.parametrize("command", ["methods", "presets"])
def test_listings(command, run_cli):
    _code, out, _ = run_cli(command, "--json")
    data = json.loads(out)
    if command == "methods":
        assert {"weighted_sum", "add_difference", "slerp"} <= {m["name"] for m in data}
    else:
        assert len(data["presets"]["GRAD_V"]) == 26
