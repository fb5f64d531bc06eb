"""The one exception type users see: a single line naming the file and, where there is one, the key."""

from __future__ import annotations

import os


class MergeLabError(Exception):
    """A user-facing error: its message is one line, and says which file and key are at fault."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, key: str | None = None):
        parts = []
        if path is not None:
            parts.append(f"{os.fspath(path)}:")
        if key is not None:
            parts.append(f"key {key!r}:")
        parts.append(" ".join(str(message).split()))  # one line, always
        super().__init__(" ".join(parts))
        self.path = None if path is None else os.fspath(path)
        self.key = key


class CheckpointError(MergeLabError):
    """The checkpoint file itself is unreadable, malformed or unsafe."""


class RecipeError(MergeLabError):
    """The recipe (CLI flags, recipe file, UI or API body) is invalid."""


class MergeCancelled(MergeLabError):
    """The user cancelled a merge; nothing was written."""
