"""Self-contained HTML: tables, inline-image figures, sections and the page writer.

The page embeds everything (images as base64 PNG data URIs, plots as inline SVG, CSS in a
``<style>`` element); it loads nothing from the network or the disk.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from labelwise.io import atomic_write_text
from labelwise.report.images import png_data_uri

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;
color:#222;line-height:1.4;padding:0 12px}
h1{font-size:24px;margin-bottom:4px}h2{font-size:19px;border-bottom:1px solid #ddd;padding-bottom:4px;margin-top:32px}
h3{font-size:15px;margin:16px 0 6px}
.meta{color:#666;font-size:13px}
table.lw{border-collapse:collapse;margin:8px 0 16px;font-size:13px}
table.lw th,table.lw td{border:1px solid #ccc;padding:3px 8px;text-align:right}
table.lw th{background:#f3f3f3}table.lw td:first-child,table.lw th:first-child{text-align:left}
table.lw caption{caption-side:top;text-align:left;font-weight:bold;padding:4px 0}
.row{display:flex;flex-wrap:wrap;gap:8px;align-items:flex-start;margin-bottom:10px}
figure{margin:0;text-align:center;font-size:12px;color:#444}
figure img{display:block;image-rendering:pixelated;border:1px solid #ddd}
.swatch{display:inline-block;width:12px;height:12px;border:1px solid #999;vertical-align:middle;margin-right:4px}
.headline{display:flex;gap:16px;flex-wrap:wrap}
.headline div{background:#f6f8fa;border:1px solid #ddd;border-radius:6px;padding:8px 14px}
.headline b{display:block;font-size:20px}
"""


@dataclass
class Section:
    """One ``<section>`` of a report: a heading and a block of (already safe) HTML."""

    title: str
    html: str
    anchor: str = ""

    @property
    def slug(self) -> str:
        return self.anchor or "".join(c if c.isalnum() else "-" for c in self.title.lower()).strip("-")

    def render(self) -> str:
        return (f'<section id="{escape(self.slug)}">\n<h2>{escape(self.title)}</h2>\n'
                f"{self.html}\n</section>")


def format_value(v: Any, digits: int = 3) -> str:
    """Cell text: floats with ``digits`` decimals, NaN/None as an en dash, the rest via ``str``."""
    if v is None:
        return "&ndash;"
    if isinstance(v, (float, np.floating)):
        if math.isinf(float(v)):
            return "&infin;" if v > 0 else "&minus;&infin;"
        if math.isnan(float(v)):
            return "&ndash;"
        return f"{float(v):.{digits}f}"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return escape(str(v))


def html_table(header: Sequence[str], rows: Iterable[Sequence[Any]], caption: str = "",
               digits: int = 3, raw_first_column: bool = False) -> str:
    """An HTML table; values are escaped and floats formatted (``raw_first_column`` keeps
    column-0 cells as given HTML, e.g. for colour swatches)."""
    out = ['<table class="lw">']
    if caption:
        out.append(f"<caption>{escape(caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{escape(str(h))}</th>" for h in header) + "</tr></thead><tbody>")
    for row in rows:
        cells = []
        for j, v in enumerate(row):
            cells.append(f"<td>{v if (raw_first_column and j == 0) else format_value(v, digits)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def img_html(image: np.ndarray, caption: str = "", width: int | None = None, alt: str = "") -> str:
    """A ``<figure>`` with the image inline as a base64 PNG and an optional caption."""
    w = f' width="{int(width)}"' if width else ""
    cap = f"<figcaption>{escape(caption)}</figcaption>" if caption else ""
    return (f'<figure><img src="{png_data_uri(image)}" alt="{escape(alt or caption)}"{w}/>'
            f"{cap}</figure>")


def figure_row(figures: Iterable[str], title: str = "") -> str:
    """Figures side by side (a flex row), with an optional ``<h3>`` above."""
    head = f"<h3>{escape(title)}</h3>" if title else ""
    return head + '<div class="row">' + "".join(figures) + "</div>"


def swatch(rgb: Sequence[int]) -> str:
    r, g, b = (int(c) for c in rgb[:3])
    return f'<span class="swatch" style="background:rgb({r},{g},{b})"></span>'


def headline(items: Sequence[tuple[str, Any]], digits: int = 3) -> str:
    """Big-number boxes: ``[(label, value), ...]``."""
    return '<div class="headline">' + "".join(
        f"<div>{escape(label)}<b>{format_value(v, digits)}</b></div>" for label, v in items) + "</div>"


def render_report(sections: Sequence[Section | tuple[str, str]], title: str = "labelwise report",
                  subtitle: str = "") -> str:
    """The full HTML page (string) for ``sections`` (``Section`` or ``(title, html)`` pairs)."""
    secs = [s if isinstance(s, Section) else Section(*s) for s in sections]
    stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    meta = escape(subtitle) + (" &middot; " if subtitle else "") + f"generated {stamp}"
    toc = "".join(f'<li><a href="#{escape(s.slug)}">{escape(s.title)}</a></li>' for s in secs)
    body = "\n".join(s.render() for s in secs)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>\n"
            f"<h1>{escape(title)}</h1><p class=\"meta\">{meta}</p>\n<ul>{toc}</ul>\n{body}\n</body></html>\n")


def write_report(path: str | Path, sections: Sequence[Section | tuple[str, str]],
                 title: str = "labelwise report", subtitle: str = "") -> Path:
    """Render ``sections`` into one self-contained HTML file at ``path`` (atomic write)."""
    path = Path(path)
    atomic_write_text(path, render_report(sections, title=title, subtitle=subtitle))
    return path
