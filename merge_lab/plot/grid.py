"""Labelled image grids (the X/Y/Z plot's output), drawn with Pillow.

Column labels above, row labels on the left, a title band on top. Small images are scaled up by an integer
factor (nearest neighbour, so pixels stay exact) until their short side reaches `min_cell`, so that the
labels stay readable next to tiny previews. The text uses Pillow's bundled scalable font.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)
MUTED = (90, 90, 90)


@dataclass
class GridLayout:
    size: tuple[int, int]
    cell_size: tuple[int, int]
    scale: int
    boxes: dict[tuple[int, int], tuple[int, int, int, int]]  # (row, column) -> (left, top, right, bottom)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; words longer than a line are broken by characters."""
    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        current = ""
        for word in paragraph.split(" "):
            candidate = f"{current} {word}" if current else word
            if draw.textlength(candidate, font=font) <= width:
                current = candidate
                continue
            if current:
                lines.append(current)
            while draw.textlength(word, font=font) > width and len(word) > 1:
                cut = len(word)
                while cut > 1 and draw.textlength(word[:cut], font=font) > width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            current = word
        lines.append(current)
    return lines


def draw_grid(images: list[list[Image.Image]], column_labels: list[str], row_labels: list[str],
              title: str = "", *, min_cell: int = 128, margin: int = 4) -> tuple[Image.Image, GridLayout]:
    """A grid of `images[row][column]` (all the same size) with labels. Returns the image and its layout."""
    rows, cols = len(images), len(images[0]) if images else 0
    if not rows or not cols or any(len(r) != cols for r in images):
        raise ValueError("images must be a non-empty rectangular list of rows")
    if len(column_labels) != cols or len(row_labels) != rows:
        raise ValueError("one label per column and per row")
    w, h = images[0][0].size
    scale = max(1, math.ceil(min_cell / min(w, h)))
    cw, ch = w * scale, h * scale
    font_size = max(14, (cw + ch) // 25)
    font, small = _font(font_size), _font(max(12, font_size * 3 // 4))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = font_size + font_size // 3
    pad = max(6, font_size // 2)

    has_rows = any(label for label in row_labels)
    row_w = 0
    if has_rows:
        widest = max(probe.textlength(label, font=font) for label in row_labels)
        row_w = int(min(widest, max(cw, 12 * font_size))) + 2 * pad
    col_lines = [_wrap(probe, label, font, cw - 2 * pad) for label in column_labels]
    row_lines = [_wrap(probe, label, font, row_w - 2 * pad) if has_rows else [] for label in row_labels]
    header_h = (max(len(lines) for lines in col_lines) * line_h + 2 * pad) if any(column_labels) else 0

    grid_w = row_w + cols * cw + (cols + 1) * margin
    title_lines = _wrap(probe, title, small, grid_w - 2 * pad) if title else []
    title_h = len(title_lines) * line_h + 2 * pad if title_lines else 0
    grid_h = title_h + header_h + rows * ch + (rows + 1) * margin

    canvas = Image.new("RGB", (grid_w, grid_h), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    y = pad
    for line in title_lines:
        draw.text((pad, y), line, fill=MUTED, font=small)
        y += line_h
    boxes = {}
    top0 = title_h + header_h + margin
    for c, lines in enumerate(col_lines):
        left = row_w + margin + c * (cw + margin)
        ty = title_h + header_h - pad - len(lines) * line_h
        for line in lines:
            tw = draw.textlength(line, font=font)
            draw.text((left + (cw - tw) / 2, ty), line, fill=TEXT, font=font)
            ty += line_h
    for r in range(rows):
        top = top0 + r * (ch + margin)
        lines = row_lines[r]
        ty = top + (ch - len(lines) * line_h) / 2
        for line in lines:
            tw = draw.textlength(line, font=font)
            draw.text((row_w - pad - tw, ty), line, fill=TEXT, font=font)
            ty += line_h
        for c in range(cols):
            left = row_w + margin + c * (cw + margin)
            image = images[r][c].convert("RGB")
            if image.size != (w, h):
                raise ValueError("all grid images must have the same size")
            if scale > 1:
                image = image.resize((cw, ch), Image.Resampling.NEAREST)
            canvas.paste(image, (left, top))
            boxes[(r, c)] = (left, top, left + cw, top + ch)
    return canvas, GridLayout((grid_w, grid_h), (cw, ch), scale, boxes)
