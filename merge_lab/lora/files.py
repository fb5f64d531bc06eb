"""A LoRA file read into modules: every key of the file belongs to exactly one module of a known adapter
type, or the file is refused naming the key (never a key silently skipped).

Names as the trainers write them: kohya sd-scripts (`lora_unet_…`, `lora_te…_…` + `.lora_down.weight`,
`.lora_up.weight`, `.alpha`, LoCon's `.lora_mid.weight`), LyCORIS (`.hada_w1_a` … LoHa, `.lokr_w1` … LoKr,
`.diff` / `.diff_b` full, `.dora_scale`), diffusers / PEFT (`.lora_A.weight`, `.lora_B.weight`,
`.lora_magnitude_vector`, the older `.lora.down.weight` and attention-processor `….processor.to_q_lora.down`).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import torch

from merge_lab.errors import CheckpointError
from merge_lab.io.header import FLOAT_DTYPES
from merge_lab.io.reader import SafetensorsReader

# (suffix, our part name), longest first so that `.lora_down.weight` is not read as `.weight`
_PARTS = sorted([
    (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".lora_mid.weight", "mid"), (".alpha", "alpha"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".dora_scale", "dora_scale"), (".lora_magnitude_vector", "dora_scale"),
    (".lora_magnitude_vector.weight", "dora_scale"),
    (".hada_w1_a", "w1a"), (".hada_w1_b", "w1b"), (".hada_w2_a", "w2a"), (".hada_w2_b", "w2b"), (".hada_t1", "t1"),
    (".hada_t2", "t2"),
    (".lokr_w1", "w1"), (".lokr_w1_a", "w1a"), (".lokr_w1_b", "w1b"), (".lokr_w2", "w2"), (".lokr_w2_a", "w2a"),
    (".lokr_w2_b", "w2b"), (".lokr_t2", "t2"),
    (".diff", "diff"), (".diff_b", "diff_b"),
], key=lambda p: -len(p[0]))
# diffusers' attention-processor LoRAs: `….attn1.processor.to_q_lora.down.weight` is the module `….attn1.to_q`
_PROCESSOR = re.compile(r"^(?P<attn>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$")
# a PEFT file saved from a wrapped model
_PEFT_WRAPPER = "base_model.model."

KINDS = ("lora", "loha", "lokr", "full")
_KIND_PARTS = {
    "lora": ({"down", "up"}, {"mid", "alpha", "dora_scale"}),
    "loha": ({"w1a", "w1b", "w2a", "w2b"}, {"t1", "t2", "alpha", "dora_scale"}),
    "lokr": (set(), {"w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2", "alpha", "dora_scale"}),
    "full": (set(), {"diff", "diff_b"}),
}


@dataclass
class LoraModule:
    """One adapted layer: its name as the file spells it, the adapter type and the file's keys of its parts."""

    name: str
    kind: str = ""
    parts: dict[str, str] = field(default_factory=dict)  # part -> key in the file

    @property
    def rank(self) -> int | None:
        return None


@dataclass
class LoraFile:
    path: str
    reader: SafetensorsReader
    modules: dict[str, LoraModule]
    metadata: dict[str, str]

    def tensor(self, module: LoraModule, part: str) -> torch.Tensor | None:
        key = module.parts.get(part)
        return None if key is None else self.reader.read(key)

    def alpha(self, module: LoraModule) -> float | None:
        t = self.tensor(module, "alpha")
        return None if t is None else float(t.float().reshape(-1)[0])

    def close(self) -> None:
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _split_key(key: str) -> tuple[str, str] | None:
    m = _PROCESSOR.match(key)
    if m:
        proj = m["proj"] + (".0" if m["proj"] == "to_out" else "")
        return f"{m['attn']}.{proj}", m["part"]
    for suffix, part in _PARTS:
        if key.endswith(suffix) and len(key) > len(suffix):
            return key[: -len(suffix)], part
    return None


def _kind(module: LoraModule, path: str) -> str:
    parts = set(module.parts)
    for kind in KINDS:
        required, optional = _KIND_PARTS[kind]
        if required <= parts and parts <= required | optional:
            if kind == "lokr" and not ({"w1"} & parts or {"w1a", "w1b"} <= parts):
                continue
            if kind == "lokr" and not ({"w2"} & parts or {"w2a", "w2b"} <= parts):
                continue
            if kind == "full" and "diff" not in parts and "diff_b" not in parts:
                continue
            if kind == "lokr" and not parts & {"w1", "w1a", "w2", "w2a"}:
                continue
            return kind
    first = module.parts[sorted(module.parts)[0]]
    raise CheckpointError(f"module {module.name!r} has the parts {', '.join(sorted(parts))}, which no LoRA / "
                          "LyCORIS type we know combines (LoRA: down + up, LoHa: hada_w1_a.., LoKr: lokr_w1..)",
                          path=path, key=first)


def open_lora(path: str | os.PathLike) -> LoraFile:
    """Read a LoRA file's header into modules. Raises CheckpointError naming the file and key for a key of
    no known adapter part, a non-float factor, or a module whose parts make no known type."""
    path = os.fspath(path)
    if not path.lower().endswith(".safetensors"):
        raise CheckpointError("a LoRA must be a .safetensors file (pickled .pt / .ckpt LoRAs are not read)",
                              path=path)
    reader = SafetensorsReader(path)
    try:
        modules: dict[str, LoraModule] = {}
        for key, info in reader.tensors.items():
            split = _split_key(key)
            if split is None:
                raise CheckpointError("is not a part of any LoRA / LyCORIS / PEFT module we know (a checkpoint "
                                      "given as --lora?)", path=path, key=key)
            name, part = split
            if name.startswith(_PEFT_WRAPPER):
                name = name[len(_PEFT_WRAPPER):]
            if not info.is_float and info.dtype not in FLOAT_DTYPES:
                raise CheckpointError(f"dtype {info.dtype} of a LoRA factor is not floating point", path=path,
                                      key=key)
            module = modules.setdefault(name, LoraModule(name))
            if part in module.parts:
                raise CheckpointError(f"module {name!r} has two {part} tensors", path=path, key=key)
            module.parts[part] = key
        if not modules:
            raise CheckpointError("holds no tensors: not a LoRA", path=path)
        for module in modules.values():
            module.kind = _kind(module, path)
        return LoraFile(path, reader, modules, dict(reader.metadata))
    except BaseException:
        reader.close()
        raise
