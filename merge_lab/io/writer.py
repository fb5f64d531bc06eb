"""`SafetensorsWriter`: streams a safetensors file whose header is known up front, and moves it into place.

Also what only writing needs: `OutputEntry` (one tensor of the header to write), the temporary name beside
the target, `tensor_bytes`, `BackgroundSync` (an fdatasync every `SYNC_BYTES` while the merge runs),
`JOURNAL_INTERVAL_S`, `EXISTS_MESSAGE` and the no-clobber final move. The resume journal kept with
`resume=True` is in `merge_lab.io.resume`. `SYNC_BYTES` and `JOURNAL_INTERVAL_S` live here, where they are
read (tests patch them here).
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
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from merge_lab.errors import CheckpointError
from merge_lab.io.header import DTYPE_NAMES, ITEMSIZE, read_header, valid_text
from merge_lab.io.resume import (
    PARTIAL_SUFFIX,
    ResumeJournal,
    _read_exact,
    _stable_header_digest,
    resumable_path_for,
)

try:
    import fcntl  # POSIX: a resumable partial file is locked while a merge writes it
except ImportError:  # Windows
    fcntl = None


@dataclass(frozen=True)
class OutputEntry:
    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


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
