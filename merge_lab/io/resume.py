"""The journal of a resumable merge (`--resume`): the fixed partial file's name and the journal beside it.

`ResumeJournal` records which merge a partial file belongs to (the digest of its header without the date)
and how many whole tensors are safely on disk; `SafetensorsWriter` (`merge_lab.io.writer`) keeps it when
asked to resume. A module of its own so the writer holds only writing; it needs nothing but the standard
library. `PARTIAL_SUFFIX` is here, beside the partial file's fixed name; the writer's temporary names
share it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
from pathlib import Path

PARTIAL_SUFFIX = ".partial"


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
