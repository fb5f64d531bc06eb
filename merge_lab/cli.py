"""`merge-lab` command line. Each subcommand lives in merge_lab/commands/<name>.py and exposes
``add_parser(subparsers)`` and ``run(args) -> int``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from . import __version__
from .errors import MergeLabError

COMMANDS = ["info", "merge", "batch", "preview", "xyz", "methods", "presets", "analyze", "demo", "bench",
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


def main(argv: list[str] | None = None) -> int:
    # Before torch loads (the commands import it): OpenMP threads that spin while waiting made previews
    # 20-50x slower on a busy 2-core machine; passive waiting costs next to nothing when it is idle.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except MergeLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
