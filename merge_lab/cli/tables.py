"""Plain-text tables the commands print (and the analysis report a user reads)."""

from __future__ import annotations

from merge_lab.analysis import AnalysisReport


def format_table(header: tuple[str, ...], rows: list[tuple]) -> str:
    """A markdown table (readable in a terminal, pasteable into an issue)."""
    cells = [tuple(map(str, header)), *[tuple(map(str, r)) for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def format_angle(value: float | None) -> str:
    return "undefined" if value is None else f"{value:.2f}"


def format_report(report: AnalysisReport) -> str:
    """The table a user reads: blocks as rows, θ in degrees for every pair, the mean (and t with a base)."""
    lines = []
    what = f"task vectors (model − {report.base})" if report.base else "raw weights (no base given)"
    lines.append(f"θ per block in degrees, {report.arch}, between {what}:")
    for i, name in enumerate(report.models):
        lines.append(f"  {i + 1} = {name}")
    header = ["block", "keys", *(f"θ {p}" for p in report.pair_labels), "mean"]
    if report.base:
        header.append("stock t")
    rows = []
    for b in report.blocks:
        row = [b.block, str(b.keys), *(format_angle(a) for a in b.angles), format_angle(b.mean_angle)]
        if report.base:
            row.append("-" if b.model_stock_t is None else f"{b.model_stock_t:.3f}")
        rows.append(row)
    lines.append("")
    lines.append(format_table(header, rows))
    lines.append("")
    lines.append("mean: arccos of the mean cosine over the defined pairs (Model Stock's c); undefined: a zero "
                 "norm (the vectors are 0 in that block)" + ("; stock t: Model Stock's factor for the block"
                                                             if report.base else ""))
    return "\n".join(lines)
