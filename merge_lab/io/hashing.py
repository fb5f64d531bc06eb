"""Model hashes as the web UI shows them: sha256 of the file, AutoV2 (its first 10 hex digits) and the
legacy hash (first 8 hex digits of the sha256 of the 0x10000 bytes at offset 0x100000).

Hashing a 7 GB file takes seconds, so sha256 results are cached by (path, size, mtime) in
``$MERGE_LAB_CACHE`` (default ``~/.cache/merge-lab``), like the web UI's own ``cache.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

CHUNK = 16 << 20
_lock = threading.Lock()


def cache_dir() -> Path:
    return Path(os.environ.get("MERGE_LAB_CACHE") or Path.home() / ".cache" / "merge-lab")


def _cache_file() -> Path:
    return cache_dir() / "hashes.json"


def _load_cache() -> dict:
    try:
        return json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _stat_key(path: str) -> tuple[str, str]:
    st = os.stat(path)
    return os.path.realpath(path), f"{st.st_size}:{st.st_mtime_ns}"


def sha256_file(path: str | os.PathLike, *, use_cache: bool = True) -> str:
    path = os.fspath(path)
    real, stamp = _stat_key(path)
    if use_cache:
        with _lock:
            hit = _load_cache().get(real)
        if hit and hit.get("stamp") == stamp:
            return hit["sha256"]
    h = hashlib.sha256()
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    digest = h.hexdigest()
    if use_cache:
        remember_sha256(path, digest)
    return digest


def remember_sha256(path: str | os.PathLike, digest: str) -> None:
    """Record a hash computed elsewhere (e.g. while writing the file)."""
    real, stamp = _stat_key(os.fspath(path))
    with _lock:
        cache = _load_cache()
        cache[real] = {"stamp": stamp, "sha256": digest}
        target = _cache_file()
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}")
            tmp.write_text(json.dumps(cache))
            os.replace(tmp, target)
        except OSError:
            pass  # a read-only cache only costs time


def legacy_hash(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def autov2(sha256: str) -> str:
    return sha256[:10]
