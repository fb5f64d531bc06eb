"""`merge-lab lora bake | merge | extract`: LoRAs into a checkpoint, LoRAs into one, a LoRA out of two models."""

from __future__ import annotations

import argparse
import sys

from merge_lab.cli.args import add_lora_arguments, lora_entries
from merge_lab.cli.progress import print_written, write_with_progress
from merge_lab.engine.recipe import DTYPE_CHOICES, Recipe
from merge_lab.errors import RecipeError


def add_parser(sub):
    p = sub.add_parser("lora", help="bake LoRAs into a checkpoint, merge LoRAs, extract a LoRA from two models")
    lsub = p.add_subparsers(dest="lora_command", required=True, metavar="ACTION")

    bake = lsub.add_parser("bake", help="W += strength · block weight · ΔW for every layer the LoRAs touch",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    bake.add_argument("--model", required=True, help="the checkpoint (.safetensors)")
    add_lora_arguments(bake, required=True)
    bake.add_argument("--dtype", choices=DTYPE_CHOICES, help="output dtype (default: each key keeps its own)")
    bake.add_argument("--prune", action="store_const", const=True, help="drop training leftovers too")
    bake.add_argument("--out", required=True, help="output .safetensors file")
    bake.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    bake.add_argument("--no-progress", action="store_true", help="no progress bar")

    merge = lsub.add_parser("merge", help="LoRAs into one LoRA: exact (ranks concatenated) or re-ranked by SVD")
    merge.add_argument("--lora", action="append", required=True, metavar="FILE[:STRENGTH]")
    merge.add_argument("--rank", type=int, help="re-rank every layer to this rank by SVD (default: exact, the "
                                                "ranks concatenated)")
    merge.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="factor dtype (default: the first LoRA's)")
    merge.add_argument("--out", required=True)
    merge.add_argument("--overwrite", action="store_true")

    extract = lsub.add_parser("extract", help="a LoRA of the difference FT − BASE, layer by layer, by truncated SVD")
    extract.add_argument("--model", required=True, help="the fine-tuned checkpoint")
    extract.add_argument("--base", required=True, help="the checkpoint it was tuned from")
    extract.add_argument("--rank", type=int, required=True, help="rank of linear and 1×1 convolution layers")
    extract.add_argument("--conv-rank", dest="conv_rank", type=int,
                         help="rank of 3×3 convolutions (default: none extracted, as kohya's default)")
    extract.add_argument("--threshold", type=float, default=0.0,
                         help="skip a layer whose difference has a largest singular value at most this")
    extract.add_argument("--text-encoder", dest="text_encoder", action="store_true",
                         help="also extract the text encoders' differences")
    extract.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                         help="factor dtype (kohya's default: fp32)")
    extract.add_argument("--no-progress", action="store_true", help="no progress bar")
    extract.add_argument("--out", required=True)
    extract.add_argument("--overwrite", action="store_true")
    return p


def run(args) -> int:
    if args.lora_command == "bake":
        return _bake(args)
    from merge_lab.lora import tools

    if args.lora_command == "merge":
        report = tools.merge_loras([_spec(t) for t in args.lora], args.out, rank=args.rank, dtype=args.dtype,
                                    overwrite=args.overwrite)
    else:
        report = tools.extract_lora(args.model, args.base, args.out, rank=args.rank, conv_rank=args.conv_rank,
                                    threshold=args.threshold, text_encoder=args.text_encoder,
                                    dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress, notify=lambda n: print(n, file=sys.stderr))
    print(report)
    return 0


def _spec(text):
    from merge_lab.lora import LoraSpec

    return LoraSpec.parse(text)


def _bake(args) -> int:
    loras = lora_entries(args)
    if not loras:
        raise RecipeError("no --lora given")
    recipe = Recipe(models=[args.model], method="passthrough", loras=loras, dtype=args.dtype,
                    prune=bool(args.prune), lora_unmatched=args.lora_unmatched or "error", out=args.out)
    result = write_with_progress(recipe, no_progress=args.no_progress, overwrite=args.overwrite)
    print_written(result, f"{result.arch}: {len(loras)} LoRA(s) baked, {result.keys} keys, {result.seconds:.2f} s")
    return 0
