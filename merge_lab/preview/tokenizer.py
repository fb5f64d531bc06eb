"""The CLIP tokenizer for offline previews, built once from the BPE merges file OpenAI published.

Every SD text encoder (CLIP ViT-L, OpenCLIP ViT-H and ViT-bigG) uses the same 49408-token byte-level BPE.
Its source, ``bpe_simple_vocab_16e6.txt.gz``, ships inside the ``open-clip-torch`` wheel on PyPI. We take
that one file from the wheel (``pip download --no-deps``; the package itself is not installed: it needs
torchvision) and write the two files transformers' ``CLIPTokenizer`` reads, ``vocab.json`` and
``merges.txt``, into ``$MERGE_LAB_TOKENIZER_DIR`` (default ``<cache dir>/clip-tokenizer``, the cache dir
of :func:`merge_lab.io.hashing.cache_dir`). ``make setup`` runs this (``merge-lab setup-tokenizer``); nothing is
committed and nothing is fetched at render time.

The vocabulary is: the 256 byte symbols, the same with the end-of-word marker ``</w>``, one token per merge
(48894), then ``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from functools import cache
from pathlib import Path

from merge_lab.errors import MergeLabError
from merge_lab.io.hashing import cache_dir

OPEN_CLIP_WHEEL = "open-clip-torch==3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
# sha256 of the decompressed merges file (the same text since CLIP's first release).
BPE_TEXT_SHA256 = "67603cfda2e032ad77b5f8808af37789d590db664b26df8705d2bf8b3c553fc8"
VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 2 * 256 - 2  # 48894
FILES = ("vocab.json", "merges.txt")
BUILD_HINT = "run `merge-lab setup-tokenizer` once (fetches the open-clip-torch wheel from PyPI; `make setup` does it)"


class TokenizerMissing(MergeLabError):
    """The CLIP vocabulary has not been built yet."""


def tokenizer_dir() -> Path:
    env = os.environ.get("MERGE_LAB_TOKENIZER_DIR")
    return Path(env) if env else cache_dir() / "clip-tokenizer"


def is_built(folder: Path | None = None) -> bool:
    folder = folder or tokenizer_dir()
    return all((folder / name).is_file() for name in FILES)


def vocabulary_files() -> list[Path]:
    folder = tokenizer_dir()
    if not is_built(folder):
        raise TokenizerMissing(f"CLIP tokenizer not found in {folder}: {BUILD_HINT}")
    return [folder / name for name in FILES]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-level alphabet: printable bytes map to themselves, the others to unused code points.
    The order matters (it is the order of the first 256 token ids): printable bytes first, then the rest."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def vocabulary_from_bpe(text: str) -> tuple[dict[str, int], list[str]]:
    """(token -> id, merges) from the text of bpe_simple_vocab_16e6.txt."""
    lines = text.split("\n")
    merges = lines[1:1 + N_MERGES]  # line 0 is a version header
    if len(merges) != N_MERGES or any(len(m.split()) != 2 for m in merges):
        raise MergeLabError("the BPE merges file is not CLIP's (unexpected merges)")
    symbols = list(bytes_to_unicode().values())
    tokens = [*symbols, *(s + "</w>" for s in symbols), *("".join(m.split()) for m in merges),
              "<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise MergeLabError(f"the BPE merges file gives {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab, merges


def _read_bpe_text(source: Path) -> str:
    try:
        if source.suffix == ".whl" or zipfile.is_zipfile(source):
            with zipfile.ZipFile(source) as wheel:
                data = wheel.read(BPE_MEMBER)
        else:
            data = source.read_bytes()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except (OSError, KeyError, zipfile.BadZipFile) as e:
        raise MergeLabError(f"cannot read the CLIP BPE file: {e}", path=source) from None
    if hashlib.sha256(data).hexdigest() != BPE_TEXT_SHA256:
        raise MergeLabError("is not CLIP's bpe_simple_vocab_16e6.txt(.gz) (sha256 differs)", path=source)
    return data.decode("utf-8")


def _download_wheel(into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           OPEN_CLIP_WHEEL, "-d", str(into)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise MergeLabError("cannot run pip to fetch the open-clip-torch wheel; download it by hand and pass "
                            "`merge-lab setup-tokenizer --from open_clip_torch-*.whl`") from None
    except subprocess.CalledProcessError as e:
        last = (e.stderr or e.stdout or "").strip().splitlines()
        raise MergeLabError(f"pip download {OPEN_CLIP_WHEEL} failed: {last[-1] if last else e}; or pass "
                            "`merge-lab setup-tokenizer --from <wheel or .txt.gz>`") from None
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise MergeLabError(f"pip download {OPEN_CLIP_WHEEL} produced no wheel")
    return wheels[0]


def build(source: str | os.PathLike | None = None, *, dest: str | os.PathLike | None = None,
          force: bool = False) -> Path:
    """Build vocab.json and merges.txt into `dest` (default tokenizer_dir()) from `source` (an open-clip-torch
    wheel or the .txt.gz / .txt merges file; default: download the wheel with pip). Returns the folder."""
    folder = Path(dest) if dest else tokenizer_dir()
    if is_built(folder) and not force:
        return folder
    with tempfile.TemporaryDirectory(prefix="merge-lab-tokenizer-") as tmp:
        tmp_path = Path(tmp)
        path = Path(source) if source else _download_wheel(tmp_path)
        vocab, merges = vocabulary_from_bpe(_read_bpe_text(path))
        staging = tmp_path / "out"
        staging.mkdir()
        (staging / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (staging / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        folder.mkdir(parents=True, exist_ok=True)
        for name in FILES:  # each file appears complete or not at all
            shutil.copyfile(staging / name, folder / f".{name}.partial")
            os.replace(folder / f".{name}.partial", folder / name)
    load_vocabulary.cache_clear()
    _load_tokenizer.cache_clear()
    return folder


@cache
def load_vocabulary(folder: str) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token -> id, merges) of a built folder."""
    root = Path(folder)
    vocab = json.loads((root / "vocab.json").read_text(encoding="utf-8"))
    lines = (root / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split()) for line in lines if line]
    return vocab, merges


def clip_tokenizer(pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """A transformers CLIPTokenizer with the real CLIP vocabulary, from the built folder (no hub access)."""
    folder = vocabulary_files()[0].parent  # a clear error when not built
    return _load_tokenizer(str(folder), pad_token, model_max_length)


@cache
def _load_tokenizer(folder: str, pad_token: str, model_max_length: int):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(folder, local_files_only=True, pad_token=pad_token,
                                         model_max_length=model_max_length)
