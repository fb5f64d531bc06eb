"""What a preview renders, and where: :class:`PreviewSettings` (checked before any work), the samplers (our
option names, the web UI's labels, the diffusers schedulers) and the render device and dtype.

Nothing here imports diffusers, so the command line builds its options from it cheaply. Weights are held once,
in the render dtype: CUDA renders in float16; on CPU ``dtype="auto"`` renders in float32 unless the float32
weights would exceed :data:`FP32_CPU_LIMIT` (8 GiB), then in bfloat16 (a real SDXL: 3.47 B parameters = 6.9 GB
in bf16 instead of 13.9 GB in fp32).
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch

from merge_lab.errors import MergeLabError

# ----------------------------------------------------------------------------------------------------
# samplers
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sampler:
    name: str  # our option value
    label: str  # the web UI's name (what the infotext says)
    scheduler: str  # diffusers class
    options: tuple[tuple[str, Any], ...] = ()


SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("euler", "Euler", "EulerDiscreteScheduler"),
        Sampler("euler_a", "Euler a", "EulerAncestralDiscreteScheduler"),
        Sampler("heun", "Heun", "HeunDiscreteScheduler"),
        Sampler("dpmpp_2m", "DPM++ 2M", "DPMSolverMultistepScheduler", (("algorithm_type", "dpmsolver++"),)),
        Sampler("dpmpp_2m_karras", "DPM++ 2M Karras", "DPMSolverMultistepScheduler",
                (("algorithm_type", "dpmsolver++"), ("use_karras_sigmas", True))),
        Sampler("dpmpp_2m_sde", "DPM++ 2M SDE", "DPMSolverMultistepScheduler",
                (("algorithm_type", "sde-dpmsolver++"),)),
        Sampler("dpm2", "DPM2", "KDPM2DiscreteScheduler"),
        Sampler("dpm2_a", "DPM2 a", "KDPM2AncestralDiscreteScheduler"),
        Sampler("lms", "LMS", "LMSDiscreteScheduler"),
        Sampler("ddim", "DDIM", "DDIMScheduler"),
        Sampler("pndm", "PLMS", "PNDMScheduler"),
        Sampler("unipc", "UniPC", "UniPCMultistepScheduler"),
    )
}


def find_sampler(name: str) -> Sampler:
    """By our name (euler_a) or the web UI's label (Euler a), case-insensitive."""
    key = name.strip().lower()
    for s in SAMPLERS.values():
        if key in (s.name, s.label.lower()):
            return s
    raise MergeLabError(f"unknown sampler {name!r} (valid: {', '.join(SAMPLERS)})")


# ----------------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------------

DTYPE_CHOICES = ("auto", "fp32", "bf16", "fp16")
PREDICTION_CHOICES = ("auto", "epsilon", "v_prediction")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Above this many bytes of float32 weights, CPU previews use bfloat16 (a real SDXL is 13.9 GB in fp32, which
# does not fit a 24 GB machine next to a merge; SD1.x / SD2.x are 4.3 / 5.2 GB and stay in fp32).
FP32_CPU_LIMIT = 8 << 30
MAX_SEED = 2**32 - 1


@dataclass
class PreviewSettings:
    """What to render. Sizes default to the model's native resolution (512, SD2 768-v 768, SDXL 1024)."""

    prompt: str = "a photo of a cat"
    negative_prompt: str = ""
    seed: int = 0  # -1: a random seed (resolved once, see resolved())
    steps: int = 20
    width: int | None = None
    height: int | None = None
    sampler: str = "euler_a"
    cfg_scale: float = 7.0
    batch_size: int = 1  # images per render; image i uses seed + i
    dtype: str = "auto"  # auto | fp32 | bf16 | fp16
    device: str = "auto"  # auto (cuda when available) | cpu | cuda[:N]
    # auto: the checkpoint's metadata, else the release's (SD2 without metadata: the web UI's test)
    prediction: str = "auto"  # auto | epsilon | v_prediction

    def validate(self) -> None:
        def bad(msg):
            raise MergeLabError(f"preview: {msg}")

        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            bad("prompt and negative prompt must be text")
        if type(self.seed) is not int or not -1 <= self.seed <= MAX_SEED:
            bad(f"seed must be an integer from 0 to {MAX_SEED} (or -1 for random), got {self.seed!r}")
        if type(self.steps) is not int or not 1 <= self.steps <= 500:
            bad(f"steps must be an integer from 1 to 500, got {self.steps!r}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (type(v) is not int or v < 8 or v % 8 or v > 4096):
                bad(f"{name} must be a multiple of 8 from 8 to 4096, got {v!r}")
        find_sampler(self.sampler)
        if isinstance(self.cfg_scale, bool) or not isinstance(self.cfg_scale, (int, float)) or \
                not 0 <= self.cfg_scale <= 50:
            bad(f"CFG scale must be a number from 0 to 50, got {self.cfg_scale!r}")
        if type(self.batch_size) is not int or not 1 <= self.batch_size <= 64:
            bad(f"batch size must be an integer from 1 to 64, got {self.batch_size!r}")
        if self.dtype not in DTYPE_CHOICES:
            bad(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", str(self.device)):
            bad(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.prediction not in PREDICTION_CHOICES:
            bad(f"prediction must be one of {', '.join(PREDICTION_CHOICES)}, got {self.prediction!r}")

    def resolved(self) -> PreviewSettings:
        """A copy with a concrete seed (-1 → a random one), validated."""
        self.validate()
        if self.seed == -1:
            return replace(self, seed=random.randint(0, MAX_SEED - 64))
        return replace(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def torch_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MergeLabError("preview: device cuda requested but torch sees no CUDA device")
    return device


def render_dtype(name: str, device: torch.device, n_params: int) -> torch.dtype:
    if name != "auto":
        return TORCH_DTYPES[name]
    if device.type == "cuda":
        return torch.float16
    return torch.float32 if 4 * n_params <= FP32_CPU_LIMIT else torch.bfloat16
