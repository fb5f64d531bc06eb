"""`merge-lab ui`: the web UI's Merge Lab tab on its own, with diffusers previews, on this machine only
(127.0.0.1) unless --listen."""

from __future__ import annotations

import argparse


def add_parser(sub):
    p = sub.add_parser("ui", help="serve the Merge Lab tab in a browser (standalone, diffusers previews)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models-dir", dest="models_dir", action="append", required=True, metavar="DIR",
                   help="folder of checkpoints to merge (repeatable); merges are saved into the first")
    p.add_argument("--lora-dir", dest="lora_dir", action="append", metavar="DIR",
                   help="folder of LoRAs to bake (repeatable; default: the model folders)")
    p.add_argument("--port", type=int, default=7870, help="port to serve on")
    p.add_argument("--listen", action="store_true",
                   help="accept connections from other machines (bind 0.0.0.0 instead of 127.0.0.1)")
    return p


def run(args) -> int:
    from merge_lab_extension.standalone import serve

    serve(args.models_dir, listen=args.listen, port=args.port, block=True, lora_folders=args.lora_dir)
    return 0
