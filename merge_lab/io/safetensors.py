"""Safetensors files: a strict header reader, a streaming tensor reader and a streaming writer.

Why not ``safetensors.safe_open`` for the reads: it memory-maps the whole file, and every page it touches
stays in our resident set until the file is closed, so a merge of four SDXL files would show ~28 GB RSS.
We validate the header ourselves (a clear one-line error for every malformed file, before any tensor is
read) and read each tensor, or a range of its rows, with ``preadv`` into a buffer we own. The format is
still safetensors' own: outputs are checked by re-reading them, and the tests load them with safetensors.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import queue
import secrets
import stat
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_lab.errors import CheckpointError, show

try:
    import fcntl  # POSIX: a resumable partial file is locked while a merge writes it
except ImportError:  # Windows
    fcntl = None

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


class SafetensorsReader:
    """Reads tensors (or ranges of rows) from a validated file with preadv; safe to share between threads."""

    def __init__(self, path: str | os.PathLike):
        self.header = read_header(path)
        self.path = self.header.path
        try:
            self._fd = os.open(self.path, os.O_RDONLY)
        except OSError as e:
            raise CheckpointError(f"cannot open: {e.strerror or e}", path=self.path) from None
        self._lock = threading.Lock()  # only guards close()

    @property
    def tensors(self) -> dict[str, TensorInfo]:
        return self.header.tensors

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    def keys(self) -> Iterable[str]:
        return self.header.tensors.keys()

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The tensor `key`, or rows [start, stop) of its first dimension, as a fresh CPU tensor."""
        info = self.header.tensors[key]
        if rows is None or not info.shape:
            begin, nbytes, shape = info.begin, info.nbytes, info.shape
        else:
            start, stop = rows
            row_bytes = info.nbytes // info.shape[0] if info.shape[0] else 0
            begin = info.begin + start * row_bytes
            nbytes = (stop - start) * row_bytes
            shape = (stop - start, *info.shape[1:])
        buf = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            self._pread_into(buf, begin, key)
        return buf.view(info.torch_dtype).reshape(shape)

    def _pread_into(self, buf: torch.Tensor, offset: int, key: str) -> None:
        view = memoryview(buf.numpy())
        done = 0
        total = len(view)
        while done < total:
            try:
                n = os.preadv(self._fd, [view[done:]], offset + done)
            except OSError as e:
                raise CheckpointError(f"read failed: {e.strerror or e}", path=self.path, key=key) from None
            if n <= 0:
                raise CheckpointError("file ended before the tensor's data: truncated?", path=self.path, key=key)
            done += n

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()


@dataclass(frozen=True)
class OutputEntry:
    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


PARTIAL_SUFFIX = ".partial"


def temporary_path_for(target: Path) -> Path:
    """A fresh hidden name beside `target` (same file system, so the final rename is atomic); unique per
    call, so two merges to the same target (two UI requests) never share a temporary file."""
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU tensor (any dtype, bf16 included)."""
    t = t.contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _text(s: str) -> str:
    return s if valid_text(s) else s.encode("utf-8", "replace").decode("utf-8")


def _sync_directory(folder: Path) -> None:
    """Make the rename durable; best effort (some file systems refuse fsync on a directory)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# The kernel writes dirty pages back on its own only past ~10% of RAM, so a merge used to end with its whole
# output in memory and the final fsync waited seconds on the disk with the CPU idle (3-4 s for 2 GB here,
# SD1.5 and I/O floor alike). Syncing every SYNC_BYTES from a thread of its own overlaps the disk with the merge.
SYNC_BYTES = 256 << 20


class BackgroundSync:
    """fdatasync of a file being written, on a thread, whenever SYNC_BYTES more have been written; a
    failure is kept for the writer to raise (the next write or the close)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.pending = 0
        self.closed = False
        self.error: OSError | None = None
        self.condition = threading.Condition()
        self.thread = threading.Thread(target=self._loop, name="merge-lab-sync", daemon=True)
        self.thread.start()

    def wrote(self, nbytes: int) -> None:
        with self.condition:
            self.pending += nbytes
            if self.pending >= SYNC_BYTES:
                self.condition.notify()

    def _loop(self) -> None:
        sync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync
        while True:
            with self.condition:
                while not self.closed and self.pending < SYNC_BYTES:
                    self.condition.wait()
                if self.closed:
                    return
                self.pending = 0
            try:
                sync(self.fd)
            except OSError as e:
                self.error = e
                return

    def check(self) -> None:
        """Raise the error of a sync that failed, if one did."""
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Stop (after a sync under way: the fd must outlive it)."""
        with self.condition:
            self.closed = True
            self.condition.notify()
        self.thread.join()


JOURNAL_INTERVAL_S = 2.0  # resume mode: how often the journal records the tensors safely on disk


def resumable_path_for(target: Path) -> Path:
    """The fixed partial file of a resumable merge to `target` (found again by the next --resume)."""
    return target.with_name(f".{target.name}{PARTIAL_SUFFIX}")


def _stable_header_digest(header: dict) -> str:
    """The header's sha256 without its date: two runs of the same merge (same recipe, inputs by hash,
    keys, shapes and dtypes) agree on it."""
    meta = {k: v for k, v in header.get("__metadata__", {}).items() if k != "modelspec.date"}
    stable = {**header, "__metadata__": meta}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()


def _read_exact(f, offset: int, n: int) -> bytes:
    f.seek(offset)
    data = f.read(n)
    if len(data) != n:
        raise OSError(errno.EIO, "partial output shorter than its header")
    return data


class ResumeJournal:
    """`.NAME.partial.json` beside the partial file: which merge it belongs to and how far it got."""

    def __init__(self, partial: Path, header_digest: str):
        self.path = partial.with_name(partial.name + ".json")
        self.partial = partial
        self.header_digest = header_digest

    def load(self) -> dict | None:
        """The journal's state when it belongs to this merge and its partial file holds what it claims."""
        try:
            state = json.loads(self.path.read_text())
            size = os.lstat(self.partial).st_size
        except (OSError, ValueError):
            return None
        if not isinstance(state, dict) or state.get("header") != self.header_digest:
            return None
        if not isinstance(state.get("entries"), int) or not isinstance(state.get("bytes"), int):
            return None
        return state if state["entries"] > 0 and state["bytes"] <= size else None

    def save(self, entries: int, nbytes: int) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps({"header": self.header_digest, "entries": entries, "bytes": nbytes}))
        os.replace(tmp, self.path)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


EXISTS_MESSAGE = "already exists; nothing was overwritten (use --overwrite to replace it)"


def _move_no_clobber(source: Path, target: Path) -> None:
    """Rename `source` to `target` unless `target` exists (FileExistsError): a hard link is created only if
    the name is free, atomically; where the file system has no hard links, a checked rename."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise
    except OSError:
        if os.path.lexists(target):
            raise FileExistsError(errno.EEXIST, "exists", str(target)) from None
        os.replace(source, target)
        return
    os.unlink(source)


class SafetensorsWriter:
    """Writes a safetensors file whose header is known up front; tensors must arrive in header order.

    The data goes to a temporary file beside the target, which replaces the target only after the
    header has been re-read and the size checked; on any failure the temporary file is removed.
    The sha256 of the file is computed while it is written.
    """

    def __init__(self, target: str | os.PathLike, entries: list[OutputEntry], metadata: dict[str, str], *,
                 resume: bool = False, overwrite: bool = False):
        """`resume`: write to a fixed partial file beside the target (`.NAME.partial`) with a journal of the
        tensors safely on disk, keep both when the merge stops, and continue an earlier partial file of the
        same merge (same header but for its date) instead of starting over. `entries_done` says where.
        `overwrite`: replace an existing target; without it an existing file is refused, here and again
        at the final rename (a file that appeared meanwhile is not replaced either)."""
        self.target = Path(target)
        self.overwrite = overwrite
        if not overwrite and os.path.lexists(self.target):
            raise CheckpointError(EXISTS_MESSAGE, path=self.target)
        self.entries = entries
        # Metadata values may come from file names (the title): undecodable bytes become U+FFFD here, as
        # a lone surrogate would make the header invalid JSON for safetensors.
        meta = {_text(k): _text(v) for k, v in metadata.items()}
        header: dict = {"__metadata__": meta} if meta else {}
        offset = 0
        self._data_ends = []
        for e in entries:
            header[e.key] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
            self._data_ends.append(offset)
        blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        blob += b" " * (-len(blob) % 8)  # 8-byte aligned data, as safetensors writes it
        self._header_blob = struct.pack("<Q", len(blob)) + blob
        self.data_size = offset
        self._next = 0
        self._written = 0
        self._sha = hashlib.sha256()
        self.resume = resume
        self.entries_done = 0  # entries already in the file when it was opened (a resumed merge)
        self.resume_note = ""
        self._journal_time = 0.0
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            if resume:
                self.tmp_path = resumable_path_for(self.target)
                self._journal = ResumeJournal(self.tmp_path, _stable_header_digest(header))
                self._file = self._open_resumable()
            else:
                self.tmp_path = temporary_path_for(self.target)
                # O_EXCL: never write through a file or link someone else put there; mode 0o666 lets the
                # umask decide the output's permissions, as for any file the user creates.
                fd = os.open(self.tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0),
                             0o666)
                self._file = os.fdopen(fd, "wb")
        except OSError as e:
            raise CheckpointError(f"cannot write: {e.strerror or e}", path=self.target) from None
        self.expected_size = len(self._header_blob) + offset
        # sha256 runs at ~1-2 GB/s on one core: hash on a thread of its own, overlapping the merge.
        self._hash_queue: queue.Queue = queue.Queue(maxsize=16)
        self._hasher = threading.Thread(target=self._hash_loop, name="merge-lab-sha256", daemon=True)
        self._hasher.start()
        self._sync = BackgroundSync(self._file.fileno())
        if self.entries_done == 0:
            self._write_raw(self._header_blob)

    def _open_resumable(self):
        """Open the fixed partial file: continue it when its journal matches this merge, else start over."""
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        fd = os.open(self.tmp_path, flags, 0o666)
        f = os.fdopen(fd, "r+b")
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise CheckpointError("another merge is writing this output (its partial file is locked)",
                                  path=self.target) from None
        state = self._journal.load()
        if state is None:
            f.truncate(0)
            self.resume_note = "no earlier partial output of this merge: starting from the first key"
            return f
        header_len = struct.unpack("<Q", _read_exact(f, 0, 8))[0]
        # The earlier header is kept as it was (its modelspec.date is when the merge began); the journal
        # checked that it equals this merge's header in everything else.
        self._header_blob = _read_exact(f, 0, 8 + header_len)
        done_bytes = state["bytes"]
        f.truncate(done_bytes)  # anything after the last journal entry may be half written
        f.seek(0)
        remaining = done_bytes
        while remaining:  # the sha256 of the whole file covers the part written before, too
            chunk = f.read(min(remaining, 1 << 24))
            if not chunk:
                raise OSError(errno.EIO, "partial output shorter than its journal")
            self._sha.update(chunk)
            remaining -= len(chunk)
        f.seek(done_bytes)
        self._next = self.entries_done = state["entries"]
        self.resume_note = (f"resuming at tensor {self.entries_done + 1} of {len(self.entries)} "
                            f"({done_bytes / 1e9:.2f} GB already written)")
        return f

    def _checkpoint(self, force: bool = False) -> None:
        """Resume mode: after a tensor is complete, record (at most every JOURNAL_INTERVAL_S) how many
        tensors are on disk: data synced first, then the journal replaced atomically."""
        now = time.monotonic()
        if not force and now - self._journal_time < JOURNAL_INTERVAL_S:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        done = len(self._header_blob) + (self._data_ends[self._next - 1] if self._next else 0)
        self._journal.save(self._next, done)  # whole tensors only: a half-written one is redone
        self._journal_time = now

    def _hash_loop(self) -> None:
        while (item := self._hash_queue.get()) is not None:
            self._sha.update(item[0])

    def _stop_hasher(self, discard: bool = False) -> None:
        if discard:  # aborting: the pending chunks need no hash
            with contextlib.suppress(queue.Empty):
                while True:
                    self._hash_queue.get_nowait()
        if self._hasher.is_alive():
            self._hash_queue.put(None)
            self._hasher.join()

    def _write_raw(self, data, owner=None) -> None:
        try:
            self._sync.check()
            self._file.write(data)
            self._sync.wrote(len(data))
        except OSError as e:
            self.abort()
            raise CheckpointError(f"write failed: {e.strerror or e}", path=self.target) from None
        self._hash_queue.put((data, owner))  # owner keeps the tensor behind `data` alive until hashed

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Write the next tensor (or the next rows of it: call again with the same key until complete)."""
        entry = self.entries[self._next]
        if key != entry.key:
            raise RuntimeError(f"writer expected {entry.key!r}, got {key!r}")
        if DTYPE_NAMES.get(tensor.dtype) != entry.dtype:
            raise RuntimeError(f"{key}: dtype {tensor.dtype} != header dtype {entry.dtype}")
        data = tensor_bytes(tensor)
        self._write_raw(data, tensor)
        self._written += len(data)
        if self._written > entry.nbytes:
            raise RuntimeError(f"{key}: more data than its shape {entry.shape} holds")
        if self._written == entry.nbytes:
            self._next += 1
            self._written = 0
            if self.resume:
                try:
                    self._checkpoint()
                except OSError as e:
                    self.abort()
                    raise CheckpointError(f"write failed: {e.strerror or e}", path=self.target) from None

    def finish(self) -> str:
        """Verify and move into place; returns the sha256 of the file."""
        try:
            if self._next != len(self.entries):
                raise RuntimeError(f"output incomplete: {len(self.entries) - self._next} tensors not written")
            try:
                self._file.flush()
                self._sync.close()
                self._sync.check()
                os.fsync(self._file.fileno())  # the data is on disk before the name points at it
                self._file.close()
                self._stop_hasher()
                size = os.path.getsize(self.tmp_path)
            except OSError as e:
                raise CheckpointError(f"write failed: {e.strerror or e}", path=self.target) from None
            if size != self.expected_size:
                raise CheckpointError(f"output is {size} bytes, expected {self.expected_size}", path=self.target)
            check = read_header(self.tmp_path)
            if {t.key: (t.dtype, t.shape) for t in check.tensors.values()} != {
                e.key: (e.dtype, e.shape) for e in self.entries
            }:
                raise CheckpointError("output header does not re-read as written", path=self.target)
            try:
                if self.overwrite:
                    os.replace(self.tmp_path, self.target)
                else:
                    _move_no_clobber(self.tmp_path, self.target)
            except FileExistsError:
                raise CheckpointError(EXISTS_MESSAGE, path=self.target) from None
            except OSError as e:
                raise CheckpointError(f"cannot move the finished file into place: {e.strerror or e}",
                                      path=self.target) from None
        except BaseException:
            self.abort()
            raise
        if self.resume:
            self._journal.remove()
        _sync_directory(self.target.parent)
        return self._sha.hexdigest()

    def abort(self) -> None:
        if self.resume:  # keep what is on disk for the next --resume; the journal says how much is good
            with contextlib.suppress(Exception):
                if not self._file.closed and self._next > self.entries_done:
                    self._checkpoint(force=True)
        self._sync.close()  # before the fd closes: a sync under way must not meet a reused fd number
        with contextlib.suppress(Exception):
            self._file.close()
        self._stop_hasher(discard=True)  # no thread left waiting on the queue of a dead merge
        if not self.resume:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp_path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
