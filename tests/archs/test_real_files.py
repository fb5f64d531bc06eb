"""Files shaped like real downloads: each is merged right or refused in one line, never a silent wrong model.

fp8 files, other architectures (Flux.1, Chroma, SD3, LoRA, ControlNet, a lone VAE), unknown keys, the
per-method default α, existing outputs, inpainting / instruct-pix2pix recipes, old SD1 text-encoder names,
per-component dtypes, EMA copies and --prune, the SDXL refiner, the v-prediction markers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from merge_lab.demo.models import make_family, save_state_dict
from merge_lab.engine import Recipe, merge_to_file, merge_to_state_dict
from merge_lab.engine.executor import to_output_dtype
from merge_lab.errors import MergeLabError
from tests.conftest import TEST_VOCAB, TEST_WIDTH

FIRST_CONV = "model.diffusion_model.input_blocks.0.0.weight"
K_UNET = "model.diffusion_model.input_blocks.1.0.in_layers.2.weight"
K_VAE = "first_stage_model.decoder.conv_in.weight"
K_TE = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"


def lerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    return torch.lerp(a.float(), b.float(), t)  # weighted_sum of two models, as the method computes it


def assert_one_line_refusal(code, err, out_path, *needles):
    assert code == 2, err
    assert err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)
    assert not Path(out_path).exists()
    assert not [p for p in Path(out_path).parent.iterdir() if p.name.startswith(".") or "partial" in p.name]


def rewrite(src, dst, change) -> Path:
    state = load_file(src)
    change(state)
    return save_state_dict(state, dst)


# ---- fp8 ---------------------------------------------------------------------------------------------

def _to_fp8(dtype):
    def change(state):
        for k, v in state.items():
            if v.is_floating_point():
                state[k] = v.to(dtype)
    return change


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_inputs_are_merged_like_any_float(sd1_family, tmp_path, run_cli, fp8):
    _, (a, b, _) = sd1_family
    a8 = rewrite(a, tmp_path / "a8.safetensors", _to_fp8(fp8))
    b8 = rewrite(b, tmp_path / "b8.safetensors", _to_fp8(fp8))
    A, B = load_file(a8), load_file(b8)
    out = tmp_path / "m.safetensors"
    code, _, err = run_cli("merge", "--models", a8, b8, "--alpha", "0.3", "--out", out, "--no-progress")
    assert code == 0, err
    merged = load_file(out)
    changed = 0
    for key in (K_UNET, K_VAE, K_TE):
        assert merged[key].dtype == fp8  # default: each key keeps its dtype
        expected = to_output_dtype(lerp(A[key], B[key], 0.3), fp8)
        assert torch.equal(merged[key].view(torch.uint8), expected.view(torch.uint8)), key
        changed += not torch.equal(merged[key].view(torch.uint8), A[key].view(torch.uint8))
    assert changed == 3  # merged, not copies of A
    # --dtype fp16 casts every float key, merged or not
    out16 = tmp_path / "m16.safetensors"
    code, _, err = run_cli("merge", "--models", a8, b8, "--alpha", "0.3", "--dtype", "fp16", "--out", out16,
                           "--no-progress")
    assert code == 0, err
    merged16 = load_file(out16)
    assert {v.dtype for v in merged16.values() if v.is_floating_point()} == {torch.float16}
    assert torch.equal(merged16[K_UNET], lerp(A[K_UNET], B[K_UNET], 0.3).half())


@pytest.mark.parametrize(("flag", "dtype", "limit"), [("fp8_e4m3", torch.float8_e4m3fn, 448.0),
                                                      ("fp8_e5m2", torch.float8_e5m2, 57344.0)])
def test_fp8_output_saturates_and_rounds_to_nearest(sd1_fp32_family, tmp_path, flag, dtype, limit):
    _, (a, b) = sd1_fp32_family
    big = 3 * limit

    def spike(state):
        state[K_UNET][0, 0, 0, 0] = big
        state[K_UNET][0, 0, 0, 1] = -big

    a2, b2 = rewrite(a, tmp_path / "a.safetensors", spike), rewrite(b, tmp_path / "b.safetensors", spike)
    out = tmp_path / "m.safetensors"
    merge_to_file(Recipe(models=[str(a2), str(b2)], alpha=0.5, dtype=flag, out=str(out)))
    merged, A, B = load_file(out), load_file(a2), load_file(b2)
    got = merged[K_UNET]
    assert got.dtype == dtype
    assert got[0, 0, 0, 0].float() == limit and got[0, 0, 0, 1].float() == -limit  # saturated, not NaN / inf
    assert torch.isfinite(got.float()).all()
    # round to nearest, ties to even: the same as torch's cast of the float32 result where in range
    reference = lerp(A[K_UNET], B[K_UNET], 0.5)
    inside = reference.abs() <= limit
    assert torch.equal(got.float()[inside], reference.to(dtype).float()[inside])
    assert merged["cond_stage_model.transformer.text_model.embeddings.position_ids"].dtype == torch.int64


def test_fp8_rounding_is_to_nearest_even():
    # 1.0625 lies halfway between e4m3's 1.0 and 1.125: ties go to the even mantissa (1.0); 1.1875 to 1.25
    t = torch.tensor([1.0625, 1.1875, 1000.0, -1000.0])
    assert to_output_dtype(t, torch.float8_e4m3fn).float().tolist() == [1.0, 1.25, 448.0, -448.0]


# ---- other architectures and unknown keys --------------------------------------------------------------

def _flux_keys(prefix="", chroma=False) -> dict[str, torch.Tensor]:
    t = {}
    for i in range(2):
        for side in ("img", "txt"):
            t[f"{prefix}double_blocks.{i}.{side}_attn.qkv.weight"] = torch.zeros(12, 4)
            if not chroma:
                t[f"{prefix}double_blocks.{i}.{side}_mod.lin.weight"] = torch.zeros(24, 4)
    t[f"{prefix}single_blocks.0.linear1.weight"] = torch.zeros(20, 4)
    t[f"{prefix}img_in.weight"] = torch.zeros(4, 16)
    t[f"{prefix}final_layer.linear.weight"] = torch.zeros(16, 4)
    if chroma:
        t[f"{prefix}distilled_guidance_layer.in_proj.weight"] = torch.zeros(4, 4)
    return t


def _sd3_keys() -> dict[str, torch.Tensor]:
    p = "model.diffusion_model."
    return {f"{p}joint_blocks.0.x_block.attn.qkv.weight": torch.zeros(12, 4),
            f"{p}joint_blocks.0.context_block.attn.qkv.weight": torch.zeros(12, 4),
            f"{p}x_embedder.proj.weight": torch.zeros(128, 16, 2, 2),
            "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.zeros(4),
            "first_stage_model.decoder.conv_in.weight": torch.zeros(4, 4, 3, 3)}


FOREIGN = {
    "flux-bare": (lambda: _flux_keys(), "Flux.1"),
    "flux-prefixed": (lambda: {**_flux_keys("model.diffusion_model."), "vae.decoder.conv_in.weight": torch.zeros(1)},
                      "Flux.1"),
    "chroma": (lambda: _flux_keys(chroma=True), "Chroma"),
    "sd3": (_sd3_keys, "SD3"),
    "lora": (lambda: {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
                      "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}, "LoRA"),
    "controlnet": (lambda: {"control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3)}, "ControlNet"),
    "vae": (lambda: {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3), "decoder.conv_in.weight": torch.zeros(8, 4, 3, 3)},
            "VAE"),
}


@pytest.mark.parametrize("kind", sorted(FOREIGN))
def test_other_architectures_are_refused_in_one_line(sd1_family, tmp_path, run_cli, kind):
    build, what = FOREIGN[kind]
    foreign = tmp_path / f"{kind}.safetensors"
    save_file(build(), foreign)
    out = tmp_path / "out" / "m.safetensors"
    out.parent.mkdir()
    _, (a, _, _) = sd1_family
    for models in ([foreign, foreign], [a, foreign], [foreign, a]):
        code, _, err = run_cli("merge", "--models", *models, "--out", out, "--no-progress")
        assert_one_line_refusal(code, err, out, str(foreign), what)
    code, _, err = run_cli("info", foreign)
    assert code == 2 and what in err


def test_a_key_outside_the_layout_is_refused_not_copied(sd1_family, tmp_path, run_cli):
    _, (a, b, _) = sd1_family
    for name, key, needle in (("unet", "model.diffusion_model.input_blocks.12.0.in_layers.2.weight", "13 input blocks"),
                              ("unet-module", "model.diffusion_model.extra_embed.weight", "layout"),
                              # a Flux key in an SD1 file: refused as outside SD1's layout, Flux now being merged
                              ("stray", "model.diffusion_model.double_blocks.0.img_attn.qkv.weight", "layout"),
                              ("top", "embedding_manager.embedder.weight", "layout"),
                              ("scaled-fp8", "model.diffusion_model.input_blocks.1.0.in_layers.2.scale_weight",
                               "layout"),
                              ("sdxl-te-in-sd1", "conditioner.embedders.1.model.ln_final.weight", "text encoder")):
        def add(state, key=key):
            state[key] = torch.ones(3, 3, dtype=torch.float16)
        odd = rewrite(b, tmp_path / f"{name}.safetensors", add)
        out = tmp_path / name / "m.safetensors"
        out.parent.mkdir()
        code, _, err = run_cli("merge", "--models", a, odd, "--out", out, "--no-progress")
        assert code == 2 and err.count("\n") == 1 and str(odd) in err, err
        assert needle in err and (key in err or needle != "layout"), err
        assert not out.exists()


def test_unet_only_files_are_detected_by_structure(sd1_family, sd2_family, sdxl_family, tmp_path, run_cli):
    for arch, (_, (a, *_)) in (("sd1", sd1_family), ("sd2", sd2_family), ("sdxl", sdxl_family)):
        unet = {k: v for k, v in load_file(a).items() if k.startswith("model.diffusion_model.")}
        path = tmp_path / f"{arch}-unet.safetensors"
        save_file(unet, path)
        code, out, err = run_cli("info", path, "--json")
        assert code == 0, err
        assert json.loads(out)["architecture"] == arch


# ---- the default α -------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["model_stock", "ties", "ties_soup", "task_arithmetic"])
def test_default_alpha_reproduces_the_published_method(sd1_family, tmp_path, run_cli, method):
    base, fts = sd1_family
    outs = {}
    for name, extra in (("default", []), ("one", ["--alpha", "1"]), ("half", ["--alpha", "0.5"])):
        outs[name] = tmp_path / f"{name}.safetensors"
        code, _, err = run_cli("merge", "--method", method, "--models", *fts, "--base", base, *extra,
                               "--out", outs[name], "--no-progress")
        assert code == 0, err
    default, one, half = (load_file(outs[n]) for n in ("default", "one", "half"))
    assert all(torch.equal(default[k], one[k]) for k in default)
    assert not torch.equal(default[K_UNET], half[K_UNET])
    with safe_open(outs["default"], "pt") as f:
        assert json.loads(f.metadata()["sd_merge_recipe"])["alpha"] == 1.0


def test_default_alpha_of_interpolations_and_recipe_files(sd1_family, tmp_path, run_cli):
    base, (a, b, _) = sd1_family
    out = tmp_path / "ws.safetensors"
    merge_to_file(Recipe(models=[str(a), str(b)], out=str(out)))
    A, B = load_file(a), load_file(b)
    assert torch.equal(load_file(out)[K_UNET], lerp(A[K_UNET], B[K_UNET], 0.5).half())
    recipe = tmp_path / "r.yaml"  # a recipe file without alpha: the method's default, as on the command line
    recipe.write_text(yaml.safe_dump({"models": [str(a), str(b)], "base": str(base), "method": "ties_soup",
                                      "out": "from-file.safetensors"}))
    code, _, err = run_cli("merge", "--recipe", recipe, "--no-progress")
    assert code == 0, err
    explicit = tmp_path / "explicit.safetensors"
    merge_to_file(Recipe(models=[str(a), str(b)], base=str(base), method="ties_soup", alpha=1.0, out=str(explicit)))
    assert load_file(tmp_path / "from-file.safetensors")[K_UNET].equal(load_file(explicit)[K_UNET])
    code, text, _ = run_cli("methods", "--json")
    defaults = {m["name"]: m["default_alpha"] for m in json.loads(text)}
    assert defaults["weighted_sum"] == defaults["slerp"] == 0.5
    assert defaults["model_stock"] == defaults["ties"] == defaults["tsd"] == defaults["dare"] == 1.0


# ---- existing outputs ----------------------------------------------------------------------------------

def test_existing_output_is_refused_unless_overwrite(sd1_family, tmp_path, run_cli):
    _, (a, b, _) = sd1_family
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"precious")
    code, _, err = run_cli("merge", "--models", a, b, "--out", out, "--no-progress")
    assert code == 2 and "already exists" in err and "--overwrite" in err and str(out) in err
    code, _, err = run_cli("merge", "--models", a, b, "--out", out, "--preview", "--no-progress")
    assert code == 2 and "already exists" in err
    assert out.read_bytes() == b"precious"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"models": [str(a), str(b)], "out": str(out)}))
    code, text, _ = run_cli("batch", recipe, "--no-progress")
    assert code == 1 and "already exists" in text and out.read_bytes() == b"precious"
    code, _, err = run_cli("batch", recipe, "--overwrite", "--no-progress")
    assert code == 0, err
    assert K_UNET in load_file(out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_file_that_appears_during_the_merge_is_not_replaced(sd1_family, tmp_path):
    _, (a, b, _) = sd1_family
    out = tmp_path / "m.safetensors"

    def progress(done, total, key):
        if not out.exists():
            out.write_bytes(b"someone else's")

    with pytest.raises(MergeLabError, match="already exists"):
        merge_to_file(Recipe(models=[str(a), str(b)], out=str(out)), progress=progress)
    assert out.read_bytes() == b"someone else's"
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# ---- inpainting / instruct-pix2pix ---------------------------------------------------------------------

def _widen(channels):
    def change(state):
        w = state[FIRST_CONV]
        extra = torch.randn(w.shape[0], channels - w.shape[1], *w.shape[2:], generator=torch.Generator().manual_seed(3))
        state[FIRST_CONV] = torch.cat([w, extra.to(w.dtype)], dim=1)
    return change


@pytest.mark.parametrize(("family", "channels", "variant"), [("sd1", 9, "inpaint"), ("sd1", 8, "instruct-pix2pix"),
                                                           ("sdxl", 9, "inpaint")])
def test_make_an_inpainting_version(request, tmp_path, run_cli, family, channels, variant):
    base, (custom, other, _) = request.getfixturevalue(f"{family}_family")
    inpaint = rewrite(base, tmp_path / "inpaint.safetensors", _widen(channels))  # A: the base's inpainting model
    out = tmp_path / "m.safetensors"
    code, _, err = run_cli("merge", "--method", "add_difference", "--models", inpaint, custom, base,
                           "--out", out, "--no-progress")
    assert code == 0, err
    merged, A, B, C = load_file(out), load_file(inpaint), load_file(custom), load_file(base)
    assert merged[FIRST_CONV].shape == A[FIRST_CONV].shape
    expected = (A[FIRST_CONV][:, :4].float() + (B[FIRST_CONV].float() - C[FIRST_CONV].float())).half()
    assert torch.equal(merged[FIRST_CONV][:, :4], expected)
    assert torch.equal(merged[FIRST_CONV][:, 4:], A[FIRST_CONV][:, 4:])  # A's extra channels, kept
    assert torch.equal(merged[K_UNET], (A[K_UNET].float() + (B[K_UNET].float() - C[K_UNET].float())).half())
    code, text, _ = run_cli("info", out, "--json")
    assert variant in json.loads(text)["variants"]
    if variant == "inpaint":
        with safe_open(out, "pt") as f:
            assert f.metadata()["modelspec.architecture"].endswith("/inpaint")
    # weighted sum too
    ws = tmp_path / "ws.safetensors"
    merge_to_file(Recipe(models=[str(inpaint), str(other)], alpha=0.25, out=str(ws)))
    merged, O = load_file(ws), load_file(other)
    assert torch.equal(merged[FIRST_CONV][:, :4], lerp(A[FIRST_CONV][:, :4], O[FIRST_CONV], 0.25).half())
    assert torch.equal(merged[FIRST_CONV][:, 4:], A[FIRST_CONV][:, 4:])
    in_memory = merge_to_state_dict(Recipe(models=[str(inpaint), str(other)], alpha=0.25)).state_dict  # the host's way
    assert all(torch.equal(in_memory[k], merged[k]) for k in merged)
    # the inpainting model in any other place is refused, saying to put it first
    for models in ([custom, inpaint, base], [custom, base, inpaint]):
        bad = tmp_path / "bad.safetensors"
        code, _, err = run_cli("merge", "--method", "add_difference", "--models", *models, "--out", bad,
                               "--no-progress")
        assert_one_line_refusal(code, err, bad, str(inpaint), "put it first", FIRST_CONV)


# ---- old SD1 text-encoder names ------------------------------------------------------------------------

def _old_te_names(state):
    for k in list(state):
        if k.startswith("cond_stage_model.transformer.text_model."):
            state[k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer.")] = state.pop(k)


def test_old_sd1_text_encoder_names_are_matched_and_renamed(sd1_family, tmp_path, run_cli):
    _, (a, b, _) = sd1_family
    old = rewrite(a, tmp_path / "old.safetensors", _old_te_names)
    assert not any("text_model" in k for k in load_file(old))
    out, reference = tmp_path / "m.safetensors", tmp_path / "ref.safetensors"
    code, _, err = run_cli("merge", "--models", old, b, "--alpha", "0.4", "--out", out, "--no-progress")
    assert code == 0, err
    merge_to_file(Recipe(models=[str(a), str(b)], alpha=0.4, out=str(reference)))
    merged, ref = load_file(out), load_file(reference)
    assert set(merged) == set(ref)  # current names only
    assert all(torch.equal(merged[k], ref[k]) for k in ref)
    assert not torch.equal(merged[K_TE], load_file(a)[K_TE])


# ---- dtypes per component, EMA copies, --prune, markers -----------------------------------------------

EMA_KEY = "model_ema.diffusion_modelinput_blocks10in_layers2weight"
LEFTOVERS = ("model_ema.decay", EMA_KEY, "alphas_cumprod", "betas", "first_stage_model.loss.logvar")


def _like_a_download(state):
    for k in list(state):
        if k.startswith("first_stage_model."):
            state[k] = state[k].float()  # an fp32 VAE beside an fp16 UNet
    state[EMA_KEY] = state[K_UNET].float().clone()
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    state["alphas_cumprod"] = torch.linspace(1, 0.01, 10)
    state["betas"] = torch.linspace(0.0001, 0.02, 10)
    state["first_stage_model.loss.logvar"] = torch.zeros(())
    state["v_pred"] = torch.tensor([])
    state["ztsnr"] = torch.tensor([])


def test_mixed_dtypes_ema_prune_and_markers(sd1_family, tmp_path, run_cli):
    _, (a, b, _) = sd1_family
    a2 = rewrite(a, tmp_path / "a.safetensors", _like_a_download)
    b2 = rewrite(b, tmp_path / "b.safetensors", _like_a_download)
    A = load_file(a2)
    kept = tmp_path / "kept.safetensors"
    code, _, err = run_cli("merge", "--models", a2, b2, "--out", kept, "--no-progress")
    assert code == 0, err
    merged = load_file(kept)
    assert merged[K_VAE].dtype == torch.float32 and merged[K_UNET].dtype == torch.float16
    for key in LEFTOVERS:  # kept by default, unmerged: the first model's
        assert torch.equal(merged[key], A[key]), key
    assert "v_pred" in merged and "ztsnr" in merged
    cast = tmp_path / "cast.safetensors"
    code, _, err = run_cli("merge", "--models", a2, b2, "--dtype", "bf16", "--out", cast, "--no-progress")
    assert code == 0, err
    merged = load_file(cast)
    assert {k for k, v in merged.items() if v.is_floating_point() and v.dtype != torch.bfloat16} == set()
    assert merged[EMA_KEY].dtype == torch.bfloat16 and merged["model_ema.num_updates"].dtype == torch.int32
    pruned = tmp_path / "pruned.safetensors"
    code, _, err = run_cli("merge", "--models", a2, b2, "--prune", "--out", pruned, "--no-progress")
    assert code == 0, err
    merged = load_file(pruned)
    assert not any(k.startswith("model_ema.") or k in LEFTOVERS for k in merged)
    assert {"v_pred", "ztsnr", "cond_stage_model.transformer.text_model.embeddings.position_ids"} <= set(merged)
    with safe_open(pruned, "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["sd_merge_recipe"])["prune"] is True and meta["modelspec.prediction_type"] == "v"


# ---- SDXL refiner --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def refiner_family(tmp_path_factory):
    return make_family("sdxl-refiner", tmp_path_factory.mktemp("refiner"), finetunes=2, width=TEST_WIDTH,
                       vocab=TEST_VOCAB, prefix="refiner")


def test_two_refiners_merge_and_a_refiner_with_a_base_is_refused(refiner_family, sdxl_family, tmp_path, run_cli):
    _, (r1, r2) = refiner_family
    code, text, err = run_cli("info", r1, "--json")
    assert code == 0, err
    report = json.loads(text)
    assert report["architecture"] == "sdxl-refiner"
    out = tmp_path / "m.safetensors"
    values = ",".join(["0"] + ["1"] * 25)  # 26 values: BASE (the OpenCLIP-G text encoder) 0, the UNet 1
    code, _, err = run_cli("merge", "--models", r1, r2, "--blocks", values, "--out", out, "--no-progress")
    assert code == 0, err
    merged, R1, R2 = load_file(out), load_file(r1), load_file(r2)
    te = "conditioner.embedders.0.model.transformer.resblocks.0.attn.in_proj_weight"
    unet = "model.diffusion_model.input_blocks.11.0.in_layers.2.weight"
    assert torch.equal(merged[te], R1[te]) and torch.equal(merged[unet], R2[unet])
    with safe_open(out, "pt") as f:
        assert f.metadata()["modelspec.architecture"] == "stable-diffusion-xl-v1-refiner"
    _, (x, _, _) = sdxl_family
    bad = tmp_path / "bad.safetensors"
    code, _, err = run_cli("merge", "--models", r1, x, "--out", bad, "--no-progress")
    assert_one_line_refusal(code, err, bad, "sdxl-refiner", "different architectures")
