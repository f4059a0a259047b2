"""Inline SVG line plots (no plotting library needed)."""

from __future__ import annotations

import math
from html import escape
from typing import Mapping, Sequence

# A few distinct colours for series (tab10-like).
SERIES_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                 "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering ``[lo, hi]`` (1/2/5 x 10^k steps)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(1, n)
    mag = 10.0 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, t = [], first
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1e4 or a < 1e-3:
        return f"{v:.1e}"
    return f"{v:.4g}"


def svg_line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                  width: int = 640, height: int = 320, title: str = "",
                  xlabel: str = "", ylabel: str = "", log_y: bool = False) -> str:
    """An SVG line chart: one ``<polyline>`` per series (with one point per finite ``(x, y)``).

    ``series`` maps a legend name to ``(xs, ys)``. Non-finite points are dropped (and with
    ``log_y``, non-positive ones). Returns the ``<svg>`` element as a string.
    """
    clean: dict[str, list[tuple[float, float]]] = {}
    for name, (xs, ys) in series.items():
        pts = []
        for x, y in zip(xs, ys):
            try:
                x, y = float(x), float(y)
            except (TypeError, ValueError):
                continue
            if not (math.isfinite(x) and math.isfinite(y)) or (log_y and y <= 0):
                continue
            pts.append((x, math.log10(y) if log_y else y))
        clean[name] = pts

    ml, mr, mt, mb = 64, 16, 30 if title else 12, 44
    pw, ph = width - ml - mr, height - mt - mb
    allp = [p for pts in clean.values() for p in pts]
    parts = [f'<svg width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="11">',
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="white"/>']
    if title:
        parts.append(f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" font-size="13" '
                     f'font-weight="bold">{escape(title)}</text>')
    if not allp:
        parts.append(f'<text x="{width / 2:.1f}" y="{height / 2:.1f}" text-anchor="middle">no data</text>')
        parts.append("</svg>")
        return "".join(parts)

    x0, x1 = min(p[0] for p in allp), max(p[0] for p in allp)
    y0, y1 = min(p[1] for p in allp), max(p[1] for p in allp)
    if x1 == x0:
        x0, x1 = x0 - 0.5, x1 + 0.5
    if y1 == y0:
        y0, y1 = y0 - 0.5, y1 + 0.5
    pad = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad, y1 + pad

    def sx(x: float) -> float:
        return ml + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return mt + ph - (y - y0) / (y1 - y0) * ph

    # axes, grid and ticks
    parts.append(f'<rect x="{ml}" y="{mt}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    for t in nice_ticks(x0, x1, 6):
        px = sx(t)
        parts.append(f'<line x1="{px:.1f}" y1="{mt}" x2="{px:.1f}" y2="{mt + ph}" stroke="#eee"/>')
        parts.append(f'<text x="{px:.1f}" y="{mt + ph + 14}" text-anchor="middle">{_fmt(t)}</text>')
    for t in nice_ticks(y0, y1, 5):
        py = sy(t)
        label = _fmt(10.0 ** t) if log_y else _fmt(t)
        parts.append(f'<line x1="{ml}" y1="{py:.1f}" x2="{ml + pw}" y2="{py:.1f}" stroke="#eee"/>')
        parts.append(f'<text x="{ml - 4}" y="{py + 4:.1f}" text-anchor="end">{label}</text>')
    if xlabel:
        parts.append(f'<text x="{ml + pw / 2:.1f}" y="{height - 6}" text-anchor="middle">{escape(xlabel)}</text>')
    if ylabel:
        parts.append(f'<text x="14" y="{mt + ph / 2:.1f}" text-anchor="middle" '
                     f'transform="rotate(-90 14 {mt + ph / 2:.1f})">{escape(ylabel)}</text>')

    # series and legend
    for i, (name, pts) in enumerate(clean.items()):
        color = SERIES_COLORS[i % len(SERIES_COLORS)]
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" '
                     f'data-series="{escape(name)}" points="{coords}"/>')
        ly = mt + 12 + 14 * i
        parts.append(f'<line x1="{ml + pw - 110}" y1="{ly - 4}" x2="{ml + pw - 94}" y2="{ly - 4}" '
                     f'stroke="{color}" stroke-width="2"/>')
        parts.append(f'<text x="{ml + pw - 90}" y="{ly}">{escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)
