"""The one exception type users see: a single line naming the file and, where there is one, the key."""

from __future__ import annotations

import os
import reprlib

# A name or value from a file may be megabytes long (a fuzzed header, a YAML alias bomb): the message
# shows at most this many characters of it.
MAX_SHOWN = 200

_shown = reprlib.Repr()
_shown.maxstring = MAX_SHOWN
_shown.maxother = MAX_SHOWN
_shown.maxlong = 40


def show(value: object) -> str:
    """A short, one-line repr of a user-supplied value for an error message (bounded in size and depth)."""
    return _shown.repr(value)


def one_line_path(path: str | os.PathLike) -> str:
    text = os.fspath(path)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if len(text) > 4 * MAX_SHOWN:
        text = text[: 4 * MAX_SHOWN] + "…"
    # A file name may hold newlines or escape sequences: print those escaped, never raw.
    if not text.isprintable():
        text = text.encode("unicode_escape", "backslashreplace").decode("ascii")
    # surrogates from undecodable file names would make print() fail
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class MergeLabError(Exception):
    """A user-facing error: its message is one line, and says which file and key are at fault."""

    def __init__(self, message: str, *, path: str | os.PathLike | None = None, key: str | None = None):
        parts = []
        if path is not None:
            parts.append(f"{one_line_path(path)}:")
        if key is not None:
            parts.append(f"key {show(key)}:")
        parts.append(" ".join(str(message).split()))  # one line, always
        text = " ".join(parts).encode("utf-8", "backslashreplace").decode("utf-8")
        super().__init__(text)
        self.path = None if path is None else os.fspath(path)
        self.key = key


class CheckpointError(MergeLabError):
    """The checkpoint file itself is unreadable, malformed or unsafe."""


class RecipeError(MergeLabError):
    """The recipe (CLI flags, recipe file, UI or API body) is invalid."""


class MergeCancelled(MergeLabError):
    """The user cancelled a merge; nothing was written."""
