"""The T5 tokenizer for offline Flux / Chroma / SD3 previews, found once at set-up, never at render time.

Every Flux-family and SD3 checkpoint conditions on T5-XXL v1.1, whose tokenizer is Google's 32000-piece
SentencePiece unigram model plus 100 ``<extra_id_N>`` tokens (ids 0 ``<pad>``, 1 ``</s>``, 2 ``<unk>``). No
package on PyPI installs it, but one ships it as data: the source distribution of
``stable-diffusion-cpp-python`` vendors stable-diffusion.cpp, which embeds Hugging Face's ``tokenizer.json``
of T5 (the file transformers' ``T5TokenizerFast`` reads) as a byte array in
``src/tokenizers/vocab/clip_t5.hpp``. ``merge-lab setup-tokenizer`` downloads that sdist from PyPI once
(20 MB; nothing is installed or built), takes the one array out, checks its sha256 and writes
``tokenizer.json`` into ``$MERGE_LAB_T5_TOKENIZER_DIR`` (default ``<cache dir>/t5-tokenizer``).

Offline, ``--t5-from`` takes instead the tokenizer a user already has: a ``tokenizer.json`` or a folder
holding one (ComfyUI's ``comfy/text_encoders/t5_tokenizer/``, a Hugging Face snapshot of
``google/t5-v1_1-xxl`` or of a Flux / SD3 repository's ``tokenizer_2`` / ``tokenizer_3``), or that sdist.
Whatever the source, the result must tokenize as T5 does (checked on a sentence whose ids are known).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tarfile
import tempfile
import urllib.request
from functools import cache
from pathlib import Path

from merge_lab.errors import MergeLabError
from merge_lab.io.hashing import cache_dir
from merge_lab.preview.tokenizer import TokenizerMissing

SDIST_PROJECT = "stable-diffusion-cpp-python"
SDIST_VERSION = "0.4.7"
SDIST_MEMBER = "vendor/stable-diffusion.cpp/src/tokenizers/vocab/clip_t5.hpp"
ARRAY_NAME = "t5_tokenizer_json_str"
# sha256 of the tokenizer.json bytes embedded in stable-diffusion.cpp (Hugging Face's T5 v1.1 tokenizer).
TOKENIZER_JSON_SHA256 = "fe2ebbbbde2985be723e0ce18217853e4020c5e9d35bd07be2c27ab9d3ead57a"
VOCAB_SIZE = 32100  # 32000 pieces + 100 extra ids (T5's embedding has 32128 rows: 28 are never used)
# T5's ids of a known sentence (a source that is not T5's tokenizer is refused): "▁a" is "▁" + "a".
CHECK_TEXT = "a photo of a cat"
CHECK_IDS = [3, 9, 1202, 13, 3, 9, 1712, 1]
BUILD_HINT = ("run `merge-lab setup-tokenizer` once (fetches the stable-diffusion-cpp-python sdist from PyPI; "
              "`make setup` does it) or `merge-lab setup-tokenizer --t5-from <tokenizer.json or its folder>`")


class T5TokenizerMissing(TokenizerMissing):
    """The T5 tokenizer has not been set up yet."""


def t5_tokenizer_dir() -> Path:
    env = os.environ.get("MERGE_LAB_T5_TOKENIZER_DIR")
    return Path(env) if env else cache_dir() / "t5-tokenizer"


def is_built(folder: Path | None = None) -> bool:
    return ((folder or t5_tokenizer_dir()) / "tokenizer.json").is_file()


def _from_header(text: str) -> bytes:
    start = text.find(f"{ARRAY_NAME}[] = {{")
    if start < 0:
        raise MergeLabError(f"holds no {ARRAY_NAME} array")
    body = text[text.index("{", start) + 1:text.index("};", start)]
    return bytes(int(h, 16) for h in re.findall(r"0x([0-9a-fA-F]{2})", body))


def _read_source(source: Path) -> bytes:
    """tokenizer.json bytes from a tokenizer.json, a folder with one, the sdist or the extracted header."""
    try:
        if source.is_dir():
            if (source / "tokenizer.json").is_file():
                return (source / "tokenizer.json").read_bytes()
            raise MergeLabError("has no tokenizer.json (a spiece.model alone is not enough: use the folder's "
                                "tokenizer.json, or the default set-up)", path=source)
        if source.name.endswith((".tar.gz", ".tgz")):
            with tarfile.open(source) as sdist:
                member = next((m for m in sdist.getmembers() if m.name.endswith(SDIST_MEMBER)), None)
                if member is None:
                    raise MergeLabError(f"has no {SDIST_MEMBER}", path=source)
                return _from_header(sdist.extractfile(member).read().decode("utf-8"))
        if source.suffix in (".hpp", ".h"):
            return _from_header(source.read_text(encoding="utf-8"))
        return source.read_bytes()
    except (OSError, tarfile.TarError, UnicodeDecodeError) as e:
        raise MergeLabError(f"cannot read the T5 tokenizer source: {e}", path=source) from None


def _download_sdist(into: Path) -> Path:
    """The pinned sdist from PyPI (its sha256 from PyPI's JSON API is checked)."""
    api = f"https://pypi.org/pypi/{SDIST_PROJECT}/json"
    try:
        with urllib.request.urlopen(api, timeout=60) as r:
            files = json.load(r)["releases"][SDIST_VERSION]
        sdist = next(f for f in files if f["packagetype"] == "sdist")
        target = into / sdist["filename"]
        with urllib.request.urlopen(sdist["url"], timeout=300) as r, open(target, "wb") as out:
            shutil.copyfileobj(r, out)
    except (OSError, KeyError, StopIteration, ValueError) as e:
        raise MergeLabError(f"cannot fetch {SDIST_PROJECT}=={SDIST_VERSION} from PyPI ({e}); download its sdist "
                            "by hand and pass `merge-lab setup-tokenizer --t5-from <file.tar.gz>`") from None
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    if digest != sdist["digests"]["sha256"]:
        raise MergeLabError(f"the downloaded {sdist['filename']} does not match PyPI's sha256")
    return target


def _check(data: bytes, source: str) -> None:
    """A source other than the pinned one is taken when it tokenizes exactly as T5 does."""
    if hashlib.sha256(data).hexdigest() == TOKENIZER_JSON_SHA256:
        return
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_str(data.decode("utf-8"))
    except Exception as e:  # any parse failure: not a tokenizer.json
        raise MergeLabError(f"is not a tokenizer.json ({e})", path=source) from None
    if tok.encode(CHECK_TEXT).ids != CHECK_IDS or tok.get_vocab_size() != VOCAB_SIZE:
        raise MergeLabError("is not T5's tokenizer (its ids for a test sentence differ)", path=source)


def build(source: str | os.PathLike | None = None, *, dest: str | os.PathLike | None = None,
          force: bool = False) -> Path:
    """Write tokenizer.json (and the configs T5TokenizerFast reads) into `dest` (default t5_tokenizer_dir())."""
    folder = Path(dest) if dest else t5_tokenizer_dir()
    if is_built(folder) and not force:
        return folder
    with tempfile.TemporaryDirectory(prefix="merge-lab-t5-") as tmp:
        path = Path(source) if source else _download_sdist(Path(tmp))
        data = _read_source(path)
        _check(data, str(path))
        folder.mkdir(parents=True, exist_ok=True)
        files = {
            "tokenizer.json": data,
            "special_tokens_map.json": json.dumps({"eos_token": "</s>", "pad_token": "<pad>",
                                                   "unk_token": "<unk>"}).encode(),
            "tokenizer_config.json": json.dumps({"tokenizer_class": "T5Tokenizer", "model_max_length": 512,
                                                 "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
                                                 "extra_ids": 100}).encode(),
        }
        for name, content in files.items():  # each file appears complete or not at all
            partial = folder / f".{name}.partial"
            partial.write_bytes(content)
            os.replace(partial, folder / name)
    _load.cache_clear()
    return folder


def t5_tokenizer(model_max_length: int = 512):
    """A transformers T5TokenizerFast with T5's real vocabulary, from the set-up folder (no hub access)."""
    folder = t5_tokenizer_dir()
    if not is_built(folder):
        raise T5TokenizerMissing(f"T5 tokenizer not found in {folder}: {BUILD_HINT}")
    return _load(str(folder), model_max_length)


@cache
def _load(folder: str, model_max_length: int):
    from transformers import T5TokenizerFast

    return T5TokenizerFast(tokenizer_file=str(Path(folder) / "tokenizer.json"), model_max_length=model_max_length,
                           eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=100)
