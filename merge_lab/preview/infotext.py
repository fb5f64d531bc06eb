"""PNG metadata of a preview: the web UI's infotext ("parameters": what its PNG Info tab and 'send to txt2img'
read) and the recipe JSON ("merge_lab_recipe"), written as PNG text chunks and read back; and how images and
in-memory merges are named. No diffusers here: reading a preview's metadata needs none.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from merge_lab import __version__
from merge_lab.preview.settings import PreviewSettings, find_sampler


def _quote(value: Any) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def _number(value: float) -> str:
    return f"{value:g}"


def infotext(settings: PreviewSettings, model_name: str | None, model_hash: str | None,
             recipe: Mapping[str, Any] | None = None) -> str:
    """The web UI's generation-parameters text (what its PNG Info tab and 'send to txt2img' read)."""
    width = settings.width or 0
    height = settings.height or 0
    fields: list[tuple[str, Any]] = [
        ("Steps", settings.steps),
        ("Sampler", find_sampler(settings.sampler).label),
        ("CFG scale", _number(float(settings.cfg_scale))),
        ("Seed", settings.seed),
        ("Size", f"{width}x{height}"),
        ("Model hash", model_hash),
        ("Model", model_name),
    ]
    if recipe is not None and recipe.get("recipe_hash"):
        fields.append(("Merge recipe hash", recipe["recipe_hash"]))
    fields.append(("Version", f"merge-lab {__version__}"))
    params = ", ".join(f"{k}: {_quote(v)}" for k, v in fields if v not in (None, ""))
    lines = [settings.prompt]
    if settings.negative_prompt:
        lines.append(f"Negative prompt: {settings.negative_prompt}")
    lines.append(params)
    return "\n".join(lines)


_PARAM = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, str]:
    """Read an infotext back: {"Prompt", "Negative prompt", "Steps", "Sampler", …} (values as text)."""
    lines = text.strip().split("\n")
    params_line = lines[-1] if len(lines) > 1 or _PARAM.match(lines[-1] or "") else ""
    body = lines[:-1] if params_line else lines
    prompt, negative, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(params_line):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        out[key.strip()] = value
    return out


PNG_TEXT_KEYS = ("parameters", "merge_lab_recipe")


def save_png(image, path: str | os.PathLike) -> Path:
    """Save with the "parameters" (infotext) and "merge_lab_recipe" text chunks from ``image.info``."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngInfo()
    for key in PNG_TEXT_KEYS:
        value = image.info.get(key)
        if isinstance(value, str):
            info.add_text(key, value)  # tEXt when latin-1, else iTXt (UTF-8)
    tmp = path.with_name(f".{path.name}.partial")
    image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp, path)
    return path


def read_png_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """{"parameters": infotext, "fields": parsed infotext, "recipe": recipe dict or None} of a preview PNG."""
    from PIL import Image

    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}) or {})
    params = text.get("parameters", "")
    recipe = None
    if "merge_lab_recipe" in text:
        with contextlib.suppress(ValueError):
            recipe = json.loads(text["merge_lab_recipe"])
    return {"parameters": params, "fields": parse_infotext(params) if params else {}, "recipe": recipe}


def image_file_name(model_name: str, seed: int, suffix: str = "") -> str:
    safe = re.sub(r"[^\w.+-]+", "_", model_name).strip("_") or "preview"
    return f"{safe}-s{seed}{suffix}.png"


def merged_model_name(result) -> str:
    """How an in-memory merge is named in infotexts: the output file's stem, else method + recipe hash."""
    if getattr(result, "out", None):
        return Path(result.out).stem
    return f"merged-{result.method}-{result.fingerprint[:10]}"
