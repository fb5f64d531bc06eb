"""`merge-lab setup-tokenizer`: build the CLIP vocabulary the previews need (once; PyPI at set-up time)."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("setup-tokenizer", help="build the CLIP tokenizer files for previews (fetches the "
                                               "open-clip-torch wheel from PyPI once)")
    p.add_argument("--from", dest="source", metavar="FILE",
                   help="build from a local open-clip-torch wheel or bpe_simple_vocab_16e6.txt(.gz) instead of "
                        "downloading")
    p.add_argument("--force", action="store_true", help="rebuild even when already built")
    p.add_argument("--quiet", action="store_true", help="print nothing when already built")
    return p


def run(args) -> int:
    from merge_lab.preview.tokenizer import OPEN_CLIP_WHEEL, build, is_built

    already = is_built() and not args.force
    folder = build(args.source, force=args.force)
    if already:
        if not args.quiet:
            print(f"CLIP tokenizer already built in {folder}")
    else:
        origin = args.source or f"{OPEN_CLIP_WHEEL} (PyPI)"
        print(f"built the CLIP tokenizer (49408 tokens) from {origin} into {folder}")
    return 0
