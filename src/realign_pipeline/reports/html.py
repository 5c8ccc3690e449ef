"""Building blocks of a self-contained HTML report: tables, image grids and an SVG bar chart.

No JavaScript and no plotting library: the page is plain HTML with inline SVG; images are linked by paths
relative to the page (URL-quoted), so the report folder can be moved or served as it is.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7", "#9c755f")
PUBLISHED_PALETTE = ("#bab0ac", "#8c8c8c", "#d4a6c8", "#a0cbe8", "#ffbe7d", "#8cd17d")


def escape(text: object) -> str:
    return html.escape(str(text), quote=True)


def html_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A table of plain-text cells (escaped)."""
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def image_grid(rows: Sequence[tuple[str, Sequence[tuple[str, str]]]], size: int = 128) -> str:
    """Rows of ``(label, [(relative image path, caption), ...])`` as a grid of thumbnails with captions."""
    lines = ['<table class="grid">']
    for label, cells in rows:
        tiles = "".join(
            f'<td><img src="{quote(path)}" width="{size}" height="{size}" loading="lazy" alt="{escape(caption)}">'
            f"<br><small>{escape(caption)}</small></td>"
            for path, caption in cells
        )
        lines.append(f"<tr><th>{escape(label)}</th>{tiles}</tr>")
    lines.append("</table>")
    return "\n".join(lines)


@dataclass(frozen=True)
class BarSeries:
    """One series of a grouped bar chart: a value (and optionally an interval) per group; ``published`` series
    are drawn in grey tones with a hatched look and "(published)" in the legend."""

    name: str
    values: dict[str, float | None]
    intervals: dict[str, tuple[float, float] | None] = field(default_factory=dict)
    published: bool = False


def bar_chart_svg(groups: Sequence[str], series: Sequence[BarSeries], title: str = "", maximum: float = 1.0) -> str:
    """A grouped bar chart: one group per entry of ``groups``, one bar per series (missing values leave a gap),
    error bars where a series gives an interval, values from 0 to ``maximum``."""
    if maximum <= 0:
        raise ValueError(f"maximum must be positive, got {maximum}")
    bar, gap, plot_height, left, top = 14, 24, 220, 40, 30
    group_width = bar * max(len(series), 1) + gap
    width = left + group_width * len(groups) + 20
    legend_top = top + plot_height + 40
    height = legend_top + 16 * len(series) + 10
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-size="11">']
    parts.append(f'<text x="{left}" y="16" font-weight="bold">{escape(title)}</text>')
    for tick in range(0, 11, 2):
        value = maximum * tick / 10
        y = top + plot_height * (1 - tick / 10)
        parts.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="4" y="{y + 4:.1f}">{value:.2f}</text>')
    colours, published_colours = iter(PALETTE * 4), iter(PUBLISHED_PALETTE * 4)
    fills = [next(published_colours) if s.published else next(colours) for s in series]
    for g, group in enumerate(groups):
        x0 = left + g * group_width + gap / 2
        parts.append(f'<text x="{x0:.1f}" y="{top + plot_height + 14}">{escape(group)}</text>')
        for s, (one, fill) in enumerate(zip(series, fills)):
            value = one.values.get(group)
            if value is None:
                continue
            x = x0 + s * bar
            bar_height = plot_height * max(0.0, min(value, maximum)) / maximum
            dash = ' stroke="#333" stroke-dasharray="2,2"' if one.published else ""
            parts.append(
                f'<rect x="{x:.1f}" y="{top + plot_height - bar_height:.1f}" width="{bar - 2}" '
                f'height="{bar_height:.1f}" fill="{fill}"{dash}><title>{escape(one.name)}: {value:.3f}</title></rect>'
            )
            interval = one.intervals.get(group)
            if interval is not None:
                low, high = (top + plot_height * (1 - max(0.0, min(v, maximum)) / maximum) for v in interval)
                middle = x + (bar - 2) / 2
                parts.append(
                    f'<line x1="{middle:.1f}" x2="{middle:.1f}" y1="{low:.1f}" y2="{high:.1f}" stroke="#000"/>'
                )
    for s, (one, fill) in enumerate(zip(series, fills)):
        y = legend_top + 16 * s
        label = f"{one.name} (published)" if one.published else one.name
        parts.append(f'<rect x="{left}" y="{y - 9}" width="10" height="10" fill="{fill}"/>')
        parts.append(f'<text x="{left + 14}" y="{y}">{escape(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


STYLE = """body{font-family:sans-serif;margin:1.5em;max-width:1400px}table{border-collapse:collapse;margin:.5em 0}
td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;vertical-align:top}table.grid td{text-align:center}
h2{border-bottom:1px solid #999}details{margin:.3em 0}"""


def html_page(title: str, sections: Sequence[tuple[str, str]]) -> str:
    """A whole page: ``title`` and ``(heading, HTML body)`` sections in order."""
    body = "\n".join(f"<section><h2>{escape(heading)}</h2>\n{content}\n</section>" for heading, content in sections)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f"<style>{STYLE}</style></head>\n<body><h1>{escape(title)}</h1>\n{body}\n</body></html>\n"
    )
