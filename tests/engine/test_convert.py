"""`merge-lab convert` and the output options every job has (`--vae`, `--discard`, `--keep`), on tiny files with
the real key names: dtype casts, pruning, a VAE baked from LDM- and diffusers-named files, the CLIP position ids
repaired, a .ckpt imported, keys left out; every refusal is one line naming the file and key, with no output."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from merge_lab.io.header import read_header

from ..lora.helpers import read_all

VAE = "first_stage_model."
U = "model.diffusion_model."
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"


def _vae_of(path) -> dict[str, torch.Tensor]:
    return {k[len(VAE):]: v for k, v in read_all(path).items() if k.startswith(VAE)}


def _recipe(path) -> dict:
    return json.loads(read_header(path).metadata["sd_merge_recipe"])


def test_convert_casts_and_prunes(sd1_family, tmp_path, run_cli):
    base, _ = sd1_family
    state = read_all(base)
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(10, dtype=torch.int32)
    with_ema = tmp_path / "ema.safetensors"
    save_file(state, with_ema)
    out = tmp_path / "fp32.safetensors"
    code, stdout, err = run_cli("convert", with_ema, "--dtype", "fp32", "--prune", "--out", out, "--no-progress")
    assert code == 0, err
    converted = read_all(out)
    assert not any(k.startswith("model_ema.") for k in converted)
    assert set(converted) == set(state) - {"model_ema.decay", "model_ema.num_updates"}
    for key, value in converted.items():
        want = state[key].float() if state[key].is_floating_point() else state[key]
        assert value.dtype == want.dtype and torch.equal(value, want), key
    assert _recipe(out)["method"] == "passthrough" and _recipe(out)["dtype"] == "fp32"
    assert "wrote" in stdout


def test_bake_an_ldm_vae_into_a_merge(sd1_family, tmp_path, run_cli):
    _base, fts = sd1_family
    vae = {**_vae_of(fts[2]), "loss.logvar": torch.zeros(())}  # a training file's discriminator is not baked
    vae_file = tmp_path / "vae-ft-mse.safetensors"
    save_file(vae, vae_file)
    out = tmp_path / "m.safetensors"
    code, _, err = run_cli("merge", "--models", fts[0], fts[1], "--alpha", "0.5", "--vae", vae_file, "--out", out,
                           "--no-progress")
    assert code == 0, err
    assert "ldm naming, 248 keys" in err and "1 training key(s)" in err
    merged, a, b = read_all(out), read_all(fts[0]), read_all(fts[1])
    for key, value in merged.items():
        if key.startswith(VAE):
            assert torch.equal(value, vae[key[len(VAE):]]), key
        elif key.startswith(U) and value.is_floating_point():
            assert torch.equal(value, torch.lerp(a[key].float(), b[key].float(), 0.5).to(a[key].dtype)), key
    record = _recipe(out)
    assert record["vae"]["name"] == "vae-ft-mse.safetensors" and record["vae"]["format"] == "ldm"
    models = json.loads(read_header(out).metadata["sd_merge_models"])
    assert record["vae"]["sha256"] in models and models[record["vae"]["sha256"]]["type"] == "vae"
    # the VAE is part of the recipe hash
    other = tmp_path / "other.safetensors"
    run_cli("merge", "--models", fts[0], fts[1], "--alpha", "0.5", "--out", other, "--no-progress")
    assert _recipe(other)["recipe_hash"] != record["recipe_hash"]


def test_bake_a_vae_cut_out_of_a_checkpoint_keeps_its_prefix(sd1_family, tmp_path, run_cli):
    base, fts = sd1_family
    vae_file = tmp_path / "cut.safetensors"
    save_file({VAE + k: v for k, v in _vae_of(fts[0]).items()}, vae_file)
    out = tmp_path / "o.safetensors"
    assert run_cli("convert", base, "--vae", vae_file, "--out", out, "--no-progress")[0] == 0
    assert all(torch.equal(v, _vae_of(fts[0])[k]) for k, v in _vae_of(out).items())


def test_bake_a_diffusers_vae_is_the_ldm_one(sd1_family, tmp_path, run_cli):
    """A diffusers-named VAE (made from the LDM one by diffusers' own converter, attention as Linear weights)
    bakes to exactly the LDM tensors it came from."""
    su = pytest.importorskip("diffusers.loaders.single_file_utils")
    from merge_lab import archs
    from merge_lab.preview.diffusers_configs import vae_config

    base, fts = sd1_family
    layout = archs.layout_for("sd1", width=8, vocab=256)
    variant = archs.get("sd1").preview.variants[0]
    ldm = {VAE + k: v for k, v in _vae_of(fts[1]).items()}
    diffusers_vae = su.convert_ldm_vae_checkpoint(ldm, vae_config(layout.vae, variant))
    assert any(k.endswith("to_q.weight") for k in diffusers_vae)
    assert any(v.dim() == 2 for k, v in diffusers_vae.items() if "attentions" in k and k.endswith("to_q.weight"))
    vae_file = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_vae.items()}, vae_file)
    out = tmp_path / "o.safetensors"
    code, _, err = run_cli("convert", base, "--vae", vae_file, "--out", out, "--no-progress")
    assert code == 0, err
    assert "diffusers naming" in err
    baked = read_all(out)
    for key, value in ldm.items():
        assert baked[key].shape == value.shape and torch.equal(baked[key], value), key


def test_a_vae_that_does_not_fit_is_refused_naming_file_and_key(sd1_family, tmp_path, run_cli):
    base, fts = sd1_family
    vae = _vae_of(fts[0])
    cases = {
        "partial": ({k: v for k, v in vae.items() if "decoder.up.0" not in k}, ("lacks", "decoder.up.0")),
        "wrong-shape": ({**vae, "quant_conv.weight": torch.zeros(16, 16, 1, 1, dtype=torch.float16)},
                        ("'quant_conv.weight'", "shape [16, 16, 1, 1] does not fit")),
        "unet": ({**vae, U + "out.0.weight": torch.zeros(8)}, (f"'{U}out.0.weight'", "is not a VAE key")),
        "extra": ({**vae, "encoder.down.9.block.0.conv1.weight": torch.zeros(1)},
                  ("'encoder.down.9.block.0.conv1.weight'", "has no counterpart")),
    }
    for name, (state, fragments) in cases.items():
        vae_file = tmp_path / f"{name}.safetensors"
        save_file(state, vae_file)
        out = tmp_path / f"{name}-out.safetensors"
        code, _, err = run_cli("convert", base, "--vae", vae_file, "--out", out, "--no-progress")
        assert code != 0 and all(f in err for f in fragments) and f"{name}.safetensors" in err, (name, err)
        assert len(err.strip().splitlines()) == 1, err
        assert not out.exists()


def test_corrupted_position_ids_are_reset_with_a_warning(sd1_family, tmp_path, run_cli):
    base, fts = sd1_family
    state = read_all(fts[0])
    ids = torch.arange(77, dtype=torch.float32)[None]
    ids[0, 40:] -= 0.0002  # what some old mergers left: a host casting to int reads 39 twice
    state[POSITION_IDS] = ids
    bad = tmp_path / "bad-ids.safetensors"
    save_file(state, bad)
    for command in (("convert", bad), ("merge", "--models", bad, fts[1], "--alpha", "0.3")):
        out = tmp_path / f"{command[0]}.safetensors"
        code, _, err = run_cli(*command, "--out", out, "--no-progress")
        assert code == 0, err
        assert "position_ids: the position ids are not 0..76 (off by up to 0.0002" in err
        fixed = read_all(out)[POSITION_IDS]
        assert fixed.dtype == torch.int64 and torch.equal(fixed, torch.arange(77)[None])
    # good ids say nothing and keep their bytes
    code, _, err = run_cli("convert", base, "--out", tmp_path / "good.safetensors", "--no-progress")
    assert code == 0 and "position ids" not in err


def test_discard_and_keep(sd1_family, tmp_path, run_cli):
    base, _ = sd1_family
    state = read_all(base)
    out = tmp_path / "no-vae.safetensors"
    code, _, err = run_cli("convert", base, "--discard", r"^first_stage_model\.", "--out", out, "--no-progress")
    assert code == 0, err
    assert set(read_all(out)) == {k for k in state if not k.startswith(VAE)}
    assert "248 key(s) left out" in err
    assert _recipe(out)["discard"] == [r"^first_stage_model\."]
    unet = tmp_path / "unet.safetensors"
    code, _, err = run_cli("convert", base, "--keep", r"^model\.diffusion_model\.", "--discard", r"\.bias$",
                           "--out", unet, "--no-progress")
    assert code == 0, err
    assert set(read_all(unet)) == {k for k in state if k.startswith(U) and not k.endswith(".bias")}
    code, _, err = run_cli("convert", base, "--discard", "no_such_key", "--out", tmp_path / "x.safetensors",
                           "--no-progress")
    assert code != 0 and "'no_such_key' match no key" in err and not (tmp_path / "x.safetensors").exists()
    code, _, err = run_cli("convert", base, "--keep", "(", "--out", tmp_path / "y.safetensors", "--no-progress")
    assert code != 0 and "not a valid regex" in err


def test_import_a_ckpt(sd1_family, tmp_path, run_cli):
    base, _ = sd1_family
    state = read_all(base)
    ckpt = tmp_path / "old.ckpt"
    torch.save({"state_dict": state, "global_step": 470000}, ckpt)
    out = tmp_path / "old.safetensors"
    code, _, err = run_cli("convert", ckpt, "--out", out, "--no-progress")
    assert code == 0, err
    converted = read_all(out)
    assert set(converted) == set(state) and all(torch.equal(converted[k], state[k]) for k in state)
    # a pickle that would run code is refused by the weights-only loader, and nothing is written
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": state, "callback": print}, evil)
    code, _, err = run_cli("convert", evil, "--out", tmp_path / "evil.safetensors", "--no-progress")
    assert code != 0 and "evil.ckpt" in err and not (tmp_path / "evil.safetensors").exists()


def test_a_recipe_with_vae_and_discard(sd1_family, tmp_path):
    from merge_lab.engine import merge_to_file
    from merge_lab.engine.recipe import Recipe

    _base, fts = sd1_family
    vae_file = tmp_path / "v.safetensors"
    save_file(_vae_of(fts[0]), vae_file)
    (tmp_path / "r.yaml").write_text(f"models: [{fts[1]}]\nmethod: passthrough\nvae: v.safetensors\n"
                                     "discard: 'model_ema'\nout: r.safetensors\n")
    recipe = Recipe.load(tmp_path / "r.yaml")
    assert recipe.vae == str(vae_file) and recipe.discard == ["model_ema"]
    with pytest.raises(Exception, match="match no key"):
        merge_to_file(recipe)
    recipe.discard = [r"\.num_batches_tracked$|^model_ema"]
    with pytest.raises(Exception, match="match no key"):
        merge_to_file(recipe)
    recipe.discard = []
    result = merge_to_file(recipe)
    assert all(torch.equal(v, _vae_of(fts[0])[k]) for k, v in _vae_of(result.out).items())
