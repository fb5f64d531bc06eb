"""Opening input checkpoints: .safetensors (streamed) and legacy .ckpt / .pt pickles (weights only)."""

from __future__ import annotations

import os
import pickle
import zipfile

import torch

from .errors import CheckpointError
from .safetensors_io import DTYPE_NAMES, Header, SafetensorsReader, TensorInfo

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


class PickleReader:
    """A .ckpt / .pt file loaded with ``torch.load(weights_only=True)``: tensors and plain containers only,
    so a pickle that would run code or build other objects is refused before anything executes."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            try:
                obj = torch.load(self.path, map_location="cpu", weights_only=True, mmap=True)
            except (RuntimeError, ValueError) as e:
                if "mmap" not in str(e) and "zip" not in str(e).lower():
                    raise
                obj = torch.load(self.path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except pickle.UnpicklingError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"refused: the pickle holds more than tensors (weights-only load: {first[:160]})",
                                  path=self.path) from None
        except (OSError, EOFError, RuntimeError, ValueError, zipfile.BadZipFile, TypeError, AttributeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"cannot load checkpoint: {first[:160]}", path=self.path) from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict):
            raise CheckpointError("checkpoint is not a state dict", path=self.path)
        self._tensors: dict[str, torch.Tensor] = {}
        infos: dict[str, TensorInfo] = {}
        for key, value in obj.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                continue
            if value.dtype not in DTYPE_NAMES:
                raise CheckpointError(f"unsupported dtype {value.dtype}", path=self.path, key=key)
            self._tensors[key] = value
            nbytes = value.numel() * value.element_size()
            infos[key] = TensorInfo(key, DTYPE_NAMES[value.dtype], tuple(value.shape), 0, nbytes)
        self.header = Header(self.path, os.path.getsize(self.path), 0, infos, {})

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


def open_checkpoint(path: str | os.PathLike) -> SafetensorsReader | PickleReader:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError("file not found", path=path)
    if not os.path.isfile(path):
        raise CheckpointError("not a file", path=path)
    if path.lower().endswith(PICKLE_SUFFIXES):
        return PickleReader(path)
    return SafetensorsReader(path)


def read_header_any(path: str | os.PathLike) -> Header:
    """The header of a safetensors file, or the table of a pickle checkpoint (which must be loaded)."""
    reader = open_checkpoint(path)
    try:
        return reader.header
    finally:
        reader.close()
