"""The θ-per-block heatmap (blocks × pairs, with the mean), drawn with Pillow.

Text in the image is ASCII plus the middle dot: Pillow's bundled font has no Greek letters or minus sign,
and a system font cannot be assumed.
"""

from __future__ import annotations

import math
import os

from PIL import Image, ImageDraw, ImageFont

from merge_lab.analysis import WHOLE_MODEL, AnalysisReport

# Viridis (perceptually uniform, readable in grey and by colour-blind readers), sampled at 9 points.
_VIRIDIS = [(68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141), (39, 173, 129),
            (92, 200, 99), (170, 220, 50), (253, 231, 37)]
UNDEFINED_FILL = (225, 225, 225)
GRID = (255, 255, 255)
TEXT = (20, 20, 20)


def colour(fraction: float) -> tuple[int, int, int]:
    x = min(1.0, max(0.0, fraction)) * (len(_VIRIDIS) - 1)
    i = min(int(x), len(_VIRIDIS) - 2)
    f = x - i
    a, b = _VIRIDIS[i], _VIRIDIS[i + 1]
    return tuple(round(a[c] + (b[c] - a[c]) * f) for c in range(3))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the bitmap font
        return ImageFont.load_default()


def _nice_range(values: list[float]) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    span = hi - lo
    step = 10 ** math.floor(math.log10(span))
    for m in (1, 2, 5, 10):
        if span / (step * m) <= 6:
            step *= m
            break
    return math.floor(lo / step) * step, math.ceil(hi / step) * step


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    box = draw.textbbox((0, 0), text, font=font)
    return box[2] - box[0], box[3] - box[1]


def render_heatmap(report: AnalysisReport, path: str | os.PathLike) -> str:
    """Write the heatmap PNG: one row per block (the whole model last), one column per pair of models and
    the mean; cells coloured by θ on a scale fitted to the data (colour bar on the right), undefined
    angles grey and marked."""
    columns = [*report.pair_labels, "mean"]
    rows = report.blocks
    cells = [[*b.angles, b.mean_angle] for b in rows]
    defined = [v for row in cells for v in row if v is not None]
    vmin, vmax = _nice_range(defined) if defined else (0.0, 90.0)

    font, small, title_font = _font(15), _font(13), _font(18)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell_w = max(78, *(_text_size(probe, c, font)[0] + 16 for c in columns))
    cell_h = 26
    label_w = max(_text_size(probe, b.block, font)[0] for b in rows) + 24 if rows else 60
    gap = 10  # between the blocks and the whole-model row
    title = "Angle between models per block (degrees)"
    subtitle = (f"{report.arch}: task vectors (model - {report.base})" if report.base
                else f"{report.arch}: raw weights (no base)")
    legend = [f"{i + 1} = {name}" for i, name in enumerate(report.models)]
    legend.append("column a·b: angle between models a and b; mean: arccos of the mean cosine")
    legend.append("undefined: a zero-norm vector in that block (no angle)")
    top = 16 + 26 + 22 + 14 + cell_h
    grid_h = cell_h * len(rows) + (gap if rows and rows[-1].block == WHOLE_MODEL else 0)
    mean_gap = 8  # sets the mean column apart from the pairs
    bar_x = label_w + cell_w * len(columns) + mean_gap + 30
    bar_w = 22
    tick_w = max(_text_size(probe, f"{v:g}°", small)[0] for v in (vmin, vmax)) + 40
    width = max(bar_x + bar_w + tick_w, max(_text_size(probe, t, small)[0] for t in legend) + 40,
                _text_size(probe, subtitle, font)[0] + 40)
    height = top + grid_h + 24 + 20 * len(legend) + 16
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)

    draw.text((16, 14), title, fill=TEXT, font=title_font)
    draw.text((16, 42), subtitle, fill=(70, 70, 70), font=font)
    for c, name in enumerate(columns):
        w, _ = _text_size(draw, name, font)
        x0 = label_w + c * cell_w + (mean_gap if c == len(columns) - 1 else 0)
        draw.text((x0 + (cell_w - w) / 2, top - cell_h + 4), name, fill=TEXT, font=font)

    y = top
    for r, block in enumerate(rows):
        if block.block == WHOLE_MODEL and r:
            y += gap
        draw.text((12, y + 5), block.block, fill=TEXT, font=font)
        for c, value in enumerate(cells[r]):
            x0, y0 = label_w + c * cell_w + (mean_gap if c == len(columns) - 1 else 0), y
            box = (x0, y0, x0 + cell_w - 2, y0 + cell_h - 2)
            if value is None:
                draw.rectangle(box, fill=UNDEFINED_FILL)
                for k in range(-cell_h, cell_w, 8):  # hatching: undefined is not a colour on the scale
                    draw.line((x0 + max(k, 0), y0 + max(-k, 0), x0 + min(k + cell_h - 2, cell_w - 2),
                               y0 + min(cell_w - 2 - k, cell_h - 2)), fill=(200, 200, 200))
                text, fill = "undefined", (90, 90, 90)
                label_font = small
            else:
                fraction = (value - vmin) / (vmax - vmin)
                draw.rectangle(box, fill=colour(fraction))
                text, fill = f"{value:.1f}", ((255, 255, 255) if fraction < 0.6 else TEXT)
                label_font = font
            w, _ = _text_size(draw, text, label_font)
            draw.text((x0 + (cell_w - 2 - w) / 2, y0 + 5), text, fill=fill, font=label_font)
        y += cell_h

    # colour bar with ticks
    bar_top, bar_bottom = top, top + grid_h - 2
    for yy in range(bar_top, bar_bottom + 1):
        fraction = 1 - (yy - bar_top) / max(bar_bottom - bar_top, 1)
        draw.line((bar_x, yy, bar_x + bar_w, yy), fill=colour(fraction))
    draw.rectangle((bar_x, bar_top, bar_x + bar_w, bar_bottom), outline=(120, 120, 120))
    ticks = 5
    for i in range(ticks + 1):
        value = vmin + (vmax - vmin) * i / ticks
        yy = bar_bottom - (bar_bottom - bar_top) * i / ticks
        draw.line((bar_x + bar_w, yy, bar_x + bar_w + 5, yy), fill=(90, 90, 90))
        draw.text((bar_x + bar_w + 8, yy - 8), f"{value:g}°", fill=TEXT, font=small)
    draw.text((bar_x - 6, top - cell_h + 4), "deg", fill=TEXT, font=font)

    y = top + grid_h + 16
    for line in legend:
        draw.text((16, y), line, fill=(60, 60, 60), font=small)
        y += 20
    image.save(path, format="PNG")
    return os.fspath(path)
