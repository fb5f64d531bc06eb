"""`merge-lab setup-tokenizer`: build the CLIP and T5 tokenizers the previews need (once; PyPI at set-up time)."""

from __future__ import annotations


def add_parser(sub):
    p = sub.add_parser("setup-tokenizer", help="build the CLIP and T5 tokenizer files for previews (fetches the "
                                               "open-clip-torch wheel and the stable-diffusion-cpp-python sdist "
                                               "from PyPI once)")
    p.add_argument("--from", dest="source", metavar="FILE",
                   help="build CLIP's from a local open-clip-torch wheel or bpe_simple_vocab_16e6.txt(.gz) instead "
                        "of downloading")
    p.add_argument("--t5-from", dest="t5_source", metavar="PATH",
                   help="take T5's from a tokenizer.json, a folder holding one (ComfyUI's "
                        "comfy/text_encoders/t5_tokenizer, a Flux / SD3 repository's tokenizer_2) or the "
                        "stable-diffusion-cpp-python sdist instead of downloading")
    p.add_argument("--no-t5", action="store_true", help="only the CLIP tokenizer (no Flux / Chroma / SD3 previews)")
    p.add_argument("--force", action="store_true", help="rebuild even when already built")
    p.add_argument("--quiet", action="store_true", help="print nothing when already built")
    return p


def run(args) -> int:
    from merge_lab.preview import t5_tokenizer
    from merge_lab.preview.tokenizer import OPEN_CLIP_WHEEL, build, is_built

    steps = [("CLIP tokenizer (49408 tokens)", is_built, build, args.source, f"{OPEN_CLIP_WHEEL} (PyPI)")]
    if not args.no_t5:
        steps.append(("T5 tokenizer (32100 tokens)", t5_tokenizer.is_built, t5_tokenizer.build, args.t5_source,
                      f"{t5_tokenizer.SDIST_PROJECT}=={t5_tokenizer.SDIST_VERSION} sdist (PyPI)"))
    for what, built, make, source, default_origin in steps:
        already = built() and not args.force
        folder = make(source, force=args.force)
        if already:
            if not args.quiet:
                print(f"{what} already built in {folder}")
        else:
            print(f"built the {what} from {source or default_origin} into {folder}")
    return 0
