"""`merge-lab` command line. Each subcommand lives in merge_lab/commands/<name>.py and exposes
``add_parser(subparsers)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import signal
import sys
import threading

from merge_lab import __version__
from merge_lab.errors import MergeLabError, one_line_path

COMMANDS = ["info", "merge", "convert", "lora", "batch", "preview", "xyz", "methods", "presets", "analyze", "demo", "bench",
            "setup_tokenizer", "ui"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="merge-lab", description="Stable Diffusion checkpoint merger")
    parser.add_argument("--version", action="version", version=f"merge-lab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f".commands.{name}", __package__)
        p = module.add_parser(sub)
        p.set_defaults(_run=module.run)
    return parser


# Flags whose value may start with a minus sign ("--weights -1,1": negate the first model's task vector).
NEGATIVE_VALUE_FLAGS = ("--weights",)
_NEGATIVE_VALUE = re.compile(r"-[\d.][\d.,eE+\s-]*")


def attach_negative_values(argv: list[str]) -> list[str]:
    """Write `--weights -1,1` as `--weights=-1,1`: argparse takes a value that starts with '-' for an option
    unless it is one plain negative number, and would answer "expected one argument"."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in NEGATIVE_VALUE_FLAGS and i + 1 < len(argv) and _NEGATIVE_VALUE.fullmatch(argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so that every `finally` and `with` cleans up."""


def _terminate(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    # Before torch loads (the commands import it): OpenMP threads that spin while waiting made previews
    # 20-50x slower on a busy 2-core machine; passive waiting costs next to nothing when it is idle.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    argv = attach_negative_values(list(sys.argv[1:] if argv is None else argv))
    args = build_parser().parse_args(argv)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return int(args._run(args) or 0)
    except MergeLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a file-system error no code path turned into a MergeLabError: still one line
        where = f"{one_line_path(e.filename)}: " if e.filename else ""
        print(f"error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if not getattr(e, "partial_kept", None):
            print("interrupted: no partial output was left behind", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
