"""Our Flux.1 dev and SD3 Medium key sets against ones read off real files: sd-mecha ships each model config as
the keys and shapes of a real checkpoint (flux-flux.yaml: a ComfyUI all-in-one Flux.1 dev; sd3-comfyui.yaml:
ComfyUI's SD3 Medium with its text encoders). Every key and shape must agree; the real files' extra keys are
the ones our records keep or drop by name (logit scales, ComfyUI's sampling schedule)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from merge_lab import archs
from merge_lab.archs.blocks import key_role

sd_mecha = pytest.importorskip("sd_mecha")
CONFIGS = Path(sd_mecha.__file__).parent / "extensions" / "builtin" / "model_configs"


def _real(name):
    config = yaml.safe_load((CONFIGS / name).read_text())
    return {k: tuple(v["shape"]) for keys in config["components"].values() for k, v in keys.items()}


@pytest.mark.parametrize(("file", "arch"), [("flux-flux.yaml", "flux-dev"), ("sd3-comfyui.yaml", "sd3-medium")])
def test_layout_is_a_real_files_key_set(file, arch):
    real, ours = _real(file), archs.layout_for(arch).shapes()
    assert set(ours) <= set(real)
    assert {k: real[k] for k in ours} == ours
    assert {key_role(k, arch) for k in set(real) - set(ours)} <= {"kept", "leftover"}
    counts = {p: sum(k.startswith(p) for k in ours) for p in ("text_encoders.clip_l.", "text_encoders.t5xxl.")}
    assert counts == ({"text_encoders.clip_l.": 196, "text_encoders.t5xxl.": 219} if arch == "flux-dev" else
                      {"text_encoders.clip_l.": 197, "text_encoders.t5xxl.": 219})
