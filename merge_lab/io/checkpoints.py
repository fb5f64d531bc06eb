"""Opening input checkpoints: .safetensors (streamed) and legacy .ckpt / .pt pickles (weights only)."""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from collections.abc import Callable

import torch

from merge_lab.errors import CheckpointError
from merge_lab.io.header import DTYPE_NAMES, Header, TensorInfo, valid_text
from merge_lab.io.reader import SafetensorsReader

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


# torch.load(weights_only=True) is the only way we unpickle, and it is only safe from torch 2.10 on:
# GHSA-53q9-r3pm-6pq6 / CVE-2025-32434 (code execution despite weights_only, fixed in 2.6.0) and
# CVE-2026-24747 (memory corruption in the weights-only unpickler, fixed in 2.10.0). A web UI may run an
# older torch: there, pickles are refused and safetensors still work.
MIN_SAFE_TORCH = (2, 10)


def _torch_version(text: str) -> tuple[int, int]:
    parts = re.match(r"(\d+)\.(\d+)", text)
    return (int(parts.group(1)), int(parts.group(2))) if parts else (0, 0)


def _unpickler_reason(e: BaseException) -> str:
    """The one useful sentence of torch's multi-paragraph weights-only error (which also suggests
    weights_only=False: we never repeat that advice)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).split("Check the documentation of torch.load")[0]
    for marker in ("WeightsUnpickler error:", "from a trusted source."):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
            break
    text = " ".join(text.split(" Please use ")[0].split()).rstrip(".")
    return text[:160] or _first_line(e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:160]


class PickleReader:
    """A .ckpt / .pt file loaded with ``torch.load(weights_only=True)``: tensors and plain containers only,
    so a pickle that would run code or build other objects is refused before anything executes."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        if _torch_version(torch.__version__) < MIN_SAFE_TORCH:
            raise CheckpointError(
                f"refused: loading pickle checkpoints safely needs torch >= {'.'.join(map(str, MIN_SAFE_TORCH))} "
                f"(this is torch {torch.__version__}, whose weights-only loader has known code-execution "
                "bugs); convert the file to .safetensors with a current torch", path=self.path)
        obj = self._load()
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a state dict", path=self.path)
        self._tensors: dict[str, torch.Tensor] = {}
        infos: dict[str, TensorInfo] = {}
        for key, value in obj.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                continue  # optimizer state, step counters, …: not weights
            if not valid_text(key):
                raise CheckpointError("tensor name is not valid Unicode (lone surrogate)", path=self.path, key=key)
            if value.dtype not in DTYPE_NAMES:
                raise CheckpointError(f"unsupported dtype {value.dtype}", path=self.path, key=key)
            if value.layout != torch.strided or value.is_quantized:
                raise CheckpointError(f"unsupported tensor layout {value.layout}", path=self.path, key=key)
            self._tensors[key] = value
            nbytes = value.numel() * value.element_size()
            infos[key] = TensorInfo(key, DTYPE_NAMES[value.dtype], tuple(value.shape), 0, nbytes)
        self.header = Header(self.path, os.path.getsize(self.path), 0, infos, {})

    def _load(self):
        try:
            try:
                return torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except (RuntimeError, ValueError) as e:
                if "mmap" not in str(e) and "zip" not in str(e).lower():
                    raise
                # the legacy (non-zip) format cannot be memory-mapped; same weights-only unpickler
                return torch.load(self.path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError("refused: the pickle holds something other than tensors, or is damaged; "
                                  f"nothing in it was run (weights-only loader: {_unpickler_reason(e)})",
                                  path=self.path) from None
        except MemoryError:
            raise CheckpointError("cannot load checkpoint: out of memory", path=self.path) from None
        except Exception as e:  # torch.load has many failure modes on a damaged file; none of them ran code
            raise CheckpointError(f"cannot load checkpoint: {type(e).__name__}: {_first_line(e)}",
                                  path=self.path) from None

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.header.tensors

    @property
    def metadata(self) -> dict[str, str]:
        return {}

    def keys(self):
        return self._tensors.keys()

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        t = self._tensors[key]
        if rows is not None and t.dim():
            t = t[rows[0]:rows[1]]
        return t.contiguous().clone()

    def close(self) -> None:
        self._tensors.clear()


def open_checkpoint(path: str | os.PathLike, rename: Callable[[str], str] | None = None
                    ) -> SafetensorsReader | PickleReader:
    """A reader of the file; with `rename` (the architectures' old-name aliases, merge_lab.archs.current_key_name)
    its keys take their current names."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError("file not found", path=path)
    if not os.path.isfile(path):
        raise CheckpointError("not a file", path=path)
    reader = PickleReader(path) if path.lower().endswith(PICKLE_SUFFIXES) else SafetensorsReader(path)
    if rename is None:
        reader.renamed_keys = 0
        return reader
    try:
        rename_legacy_keys(reader, rename)
    except BaseException:
        reader.close()
        raise
    return reader


def rename_legacy_keys(reader: SafetensorsReader | PickleReader, current_key_name: Callable[[str], str]) -> int:
    """Give the reader's keys their current names, in place (a key's name is only the label of its offsets);
    returns how many were renamed, also kept as `reader.renamed_keys`. A file holding a key under both its
    old and its current name is refused: which one the host would load is not ours to guess."""
    tensors = reader.header.tensors
    renamed = {key: current_key_name(key) for key in tensors}
    count = sum(1 for old, new in renamed.items() if old != new)
    reader.renamed_keys = count
    if not count:
        return 0
    seen: dict[str, str] = {}
    for old, new in renamed.items():
        if new in seen:
            raise CheckpointError(f"holds the text-encoder key both under its old name {seen[new]!r} and its "
                                  "current name", path=reader.header.path, key=new)
        seen[new] = old
    reader.header = dataclasses.replace(
        reader.header, tensors={new: dataclasses.replace(tensors[old], key=new) for old, new in renamed.items()})
    if isinstance(reader, PickleReader):
        reader._tensors = {renamed[k]: v for k, v in reader._tensors.items()}
    return count


def read_header_any(path: str | os.PathLike, rename: Callable[[str], str] | None = None) -> Header:
    """The header of a safetensors file, or the table of a pickle checkpoint (which must be loaded)."""
    reader = open_checkpoint(path, rename)
    try:
        return reader.header
    finally:
        reader.close()
