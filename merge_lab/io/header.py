"""The safetensors header: dtype tables, size limits, `TensorInfo` / `Header` and the strict `read_header`.

Every file is validated here before any tensor is read, with a clear one-line error for every malformed
file (what is checked, in order: `read_header`). The reader, the writer (which re-reads the header of its
output) and the pickled-checkpoint loader build on these types, so this module imports nothing of ours
but the errors.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass

import torch

from merge_lab.errors import CheckpointError, show

# A header longer than this is refused before it is read (safetensors' own limit is 100 MB).
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_NDIM = 16
_U64_MAX = (1 << 64) - 1  # safetensors sizes and offsets are u64 (usize)
# torch sizes are int64: a larger dimension (possible in an empty tensor, [0, 2**64 - 1]) is refused
# here rather than by torch deep inside a merge.
_MAX_DIM = (1 << 63) - 1

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
ITEMSIZE = {name: torch.empty((), dtype=dt).element_size() for name, dt in DTYPES.items()}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


@dataclass(frozen=True)
class TensorInfo:
    key: str
    dtype: str  # safetensors dtype name, e.g. "F16"
    shape: tuple[int, ...]
    begin: int  # absolute offsets in the file
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_DTYPES

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class Header:
    path: str
    file_size: int
    data_start: int
    tensors: dict[str, TensorInfo]  # in file (offset) order
    metadata: dict[str, str]


def _fail(path, reason, key=None):
    raise CheckpointError(f"not a valid safetensors file: {reason}", path=path, key=key)


def _no_duplicates(pairs):
    out = dict(pairs)  # called for every JSON object: the common case stays in C
    if len(out) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise ValueError(f"duplicate JSON key {show(k)}")
            seen.add(k)
    return out


def _no_constants(name):
    raise ValueError(f"{name} is not JSON")  # Python's json accepts NaN / Infinity; safetensors does not


def valid_text(s: str) -> bool:
    """False for strings holding lone surrogates (a JSON \\ud800 escape): they are not Unicode text."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_prefix_and_json(path: str) -> tuple[int, int, bytes]:
    """(file size, header length, header bytes); never reads more than the file holds or the limit allows."""
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; the fstat below then refuses it.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise CheckpointError(f"cannot open: {e.strerror or e}", path=path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise CheckpointError("not a regular file", path=path)
        size = st.st_size
        prefix = _pread_exactly(fd, min(8, size), 0)
        if len(prefix) < 8:
            _fail(path, f"file is {size} bytes, too short for a header")
        (n,) = struct.unpack("<Q", prefix)
        if n > MAX_HEADER_BYTES:
            _fail(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
        if 8 + n > size:
            _fail(path, f"header length {n} runs past the end of the file ({size} bytes): truncated?")
        raw = _pread_exactly(fd, n, 8)
    except OSError as e:
        raise CheckpointError(f"cannot read: {e.strerror or e}", path=path) from None
    finally:
        os.close(fd)
    if len(raw) != n:
        _fail(path, "file shrank while reading the header")
    return size, n, raw


def _pread_exactly(fd: int, n: int, offset: int) -> bytes:
    """Up to `n` bytes at `offset` (fewer only if the file ends first)."""
    chunks, done = [], 0
    while done < n:
        chunk = os.pread(fd, n - done, offset + done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _usize_product(values) -> int | None:
    """The product, or None when some partial product leaves the u64 range (safetensors' checked_mul)."""
    product = 1
    for v in values:
        product *= v
        if product > _U64_MAX:
            return None
    return product


def read_header(path: str | os.PathLike) -> Header:
    """Read and validate a safetensors header without reading any tensor data.

    Raises CheckpointError (one line, naming the file and key) for every malformed file. What is checked,
    in order: the file is a regular file; the 8-byte length fits the file and the 100 MB limit; the header
    is strict UTF-8 JSON (no duplicate keys, no NaN/Infinity, no lone surrogates) and an object; the
    ``__metadata__`` maps strings to strings; every tensor has a known dtype, a shape of at most 16
    dimensions, each from 0 to 2**63 - 1 (torch's int64 sizes), whose size in bits fits in u64, and
    ``data_offsets`` [begin, end] with end - begin equal to that byte size; the tensors, in offset order,
    tile the data section exactly (no overlap, no hole, nothing after the last one), as the safetensors
    library requires.
    Memory: nothing is allocated from a size the file claims; the header bytes (at most the file size)
    and their parsed JSON are the only allocations.
    """
    path = os.fspath(path)
    size, n, raw = _read_prefix_and_json(path)
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        _fail(path, f"header is not valid UTF-8 JSON ({first[:120]})")
    del raw
    if not isinstance(obj, dict):
        _fail(path, f"header is a JSON {type(obj).__name__}, not an object")

    data_start = 8 + n
    data_size = size - data_start
    metadata: dict[str, str] = {}
    raw_meta = obj.pop("__metadata__", None)
    if raw_meta is not None:
        if not isinstance(raw_meta, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and valid_text(k) and valid_text(v)
            for k, v in raw_meta.items()
        ):
            _fail(path, "__metadata__ must map strings to strings")
        metadata = dict(raw_meta)

    infos: list[TensorInfo] = []
    for key, entry in obj.items():
        if not valid_text(key):
            _fail(path, "tensor name is not valid Unicode (lone surrogate)", key)
        if not isinstance(entry, dict):
            _fail(path, "tensor entry is not an object", key)
        dtype = entry.get("dtype")
        shape = entry.get("shape")
        offsets = entry.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            _fail(path, f"unsupported dtype {show(dtype)} (supported: {', '.join(DTYPES)})", key)
        if (not isinstance(shape, list) or len(shape) > MAX_NDIM
                or not all(type(d) is int and 0 <= d <= _MAX_DIM for d in shape)):
            _fail(path, f"bad shape {show(shape)} (at most {MAX_NDIM} non-negative integers)", key)
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(type(o) is int and 0 <= o <= _U64_MAX for o in offsets)):
            _fail(path, f"bad data_offsets {show(offsets)} (two non-negative integers)", key)
        numel = _usize_product(shape)
        if numel is None or numel * ITEMSIZE[dtype] * 8 > _U64_MAX:
            _fail(path, f"shape {show(shape)} is too large", key)
        begin, end = offsets
        if begin > end:
            _fail(path, f"data_offsets {offsets} are not ordered", key)
        if end > data_size:
            _fail(path, f"tensor data ends at byte {end}, past the data section ({data_size} bytes): truncated?",
                  key)
        expected = numel * ITEMSIZE[dtype]
        if end - begin != expected:
            _fail(path, f"shape {shape} of {dtype} needs {expected} bytes, data_offsets give {end - begin}", key)
        infos.append(TensorInfo(key, dtype, tuple(shape), data_start + begin, data_start + end))

    infos.sort(key=lambda t: (t.begin, t.end))
    position = data_start
    for info in infos:
        if info.begin < position:
            _fail(path, "tensor data overlaps another tensor's", info.key)
        if info.begin > position:
            _fail(path, f"{info.begin - position} bytes before this tensor's data belong to no tensor", info.key)
        position = info.end
    if position != size:
        _fail(path, f"{size - position} bytes after the last tensor's data belong to no tensor")
    return Header(path, size, data_start, {t.key: t for t in infos}, metadata)
