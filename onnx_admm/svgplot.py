"""Small inline SVG charts for the HTML report: horizontal bar panels and line charts.

The report must open anywhere, offline, as one file, so its figures are SVG text drawn here rather
than images from a plotting library (matplotlib is not a dependency). Every string placed in the
SVG goes through ``html.escape``: layer names come from the model file and may hold markup. The
``<svg>`` elements carry no ``xmlns``: inline in HTML5 it is implied, and the file then holds no URL.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape

# Colour-blind-safe (Okabe-Ito), in the order series get them.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000")
_FONT = 12
_CHAR = 6.6  # mean width of a 12px sans-serif character, to size the label column


@dataclass(frozen=True)
class Panel:
    """One column of bars: a value per row (None: no bar, shown as "-"), drawn on [0, ``top``]."""

    title: str
    values: Sequence[float | None]
    top: float
    fmt: Callable[[float], str]
    color: str = PALETTE[0]
    css: str = ""  # a class every bar of the panel gets besides "bar", for styling and tests


def bar_panels(labels: Sequence[str], panels: Sequence[Panel], *, width: int = 1040, title: str = "") -> str:
    """Horizontal bars, one row per label and one panel per measure, side by side.

    Each row is a ``<g class="row">`` holding one ``<rect class="bar ...">`` per panel whose value is
    known, with the value written after the bar.
    """
    label_w = min(260, int(_CHAR * max((len(s) for s in labels), default=4)) + 16)
    row_h, top_h = 24, 34
    panel_w = (width - label_w) / max(len(panels), 1)
    bar_room = panel_w - 80  # leaves room for the value text after a full bar
    height = top_h + row_h * len(labels) + 8
    out = [_open(width, height, title)]
    for p, panel in enumerate(panels):
        x0 = label_w + p * panel_w
        out.append(_text(x0, 16, panel.title, weight="bold"))
        out.append(f'<line x1="{x0:.1f}" y1="{top_h - 6}" x2="{x0:.1f}" y2="{height - 6}" class="axis"/>')
    for r, label in enumerate(labels):
        y = top_h + r * row_h
        out.append('<g class="row">')
        out.append(_text(label_w - 8, y + 15, _clip(label, label_w), anchor="end", tip=label))
        for p, panel in enumerate(panels):
            x0 = label_w + p * panel_w
            value = panel.values[r]
            if value is None or not math.isfinite(value):
                out.append(_text(x0 + 6, y + 15, "-", cls="muted"))
                continue
            w = max(0.0, min(1.0, value / panel.top)) * bar_room if panel.top > 0 else 0.0
            # A tiny nonzero value still gets a visible sliver, else 0.4% reads as nothing kept.
            w = max(w, 1.5) if value > 0 else 0.0
            out.append(f'<rect class="bar {escape(panel.css)}" x="{x0 + 1:.1f}" y="{y + 4}" width="{w:.1f}" '
                       f'height="{row_h - 8}" fill="{panel.color}"><title>{escape(label)}: '
                       f'{escape(panel.fmt(value))}</title></rect>')
            out.append(_text(x0 + w + 6, y + 15, panel.fmt(value)))
        out.append("</g>")
    out.append("</svg>")
    return "".join(out)


@dataclass(frozen=True)
class Series:
    """A line: points (x, y); None values break it."""

    name: str
    points: Sequence[tuple[float, float | None]]
    color: str = PALETTE[0]
    dashed: bool = False
    markers: bool = True


@dataclass(frozen=True)
class LineChart:
    """Axes, titles and vertical markers (x, label) such as stage boundaries."""

    title: str = ""
    x_label: str = ""
    y_label: str = ""
    y_fmt: Callable[[float], str] = field(default=lambda v: f"{v:.3g}")
    marks: Sequence[tuple[float, str]] = ()
    y_range: tuple[float, float] | None = None  # default: the data's, padded
    # Room either side of the first and last x, so that a lone point or a mark's label is not on the frame.
    x_pad: float = 0.5


def line_chart(series: Sequence[Series], chart: LineChart, *, width: int = 1040, height: int = 260) -> str:
    """Lines on shared axes, with a legend under the plot; ``<polyline class="series">`` per unbroken run."""
    xs = [x for s in series for x, y in s.points if y is not None and math.isfinite(y)]
    ys = [y for s in series for x, y in s.points if y is not None and math.isfinite(y)]
    if not xs:
        return '<p class="muted">no data to plot</p>'
    left, right, top, bottom = 64, 16, 30, 40
    # Legend columns: four for short names (layer names), two for long ones.
    columns = 4 if max(len(s.name) for s in series) <= 28 else 2
    legend_rows = math.ceil(len(series) / columns)
    total_h = height + 12 + 18 * legend_rows
    x_lo, x_hi = min(xs) - chart.x_pad, max(xs) + chart.x_pad
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    y_lo, y_hi = chart.y_range or _padded(min(ys), max(ys))
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (x - x_lo) / (x_hi - x_lo) * plot_w

    def py(y: float) -> float:
        return top + (1 - (min(max(y, y_lo), y_hi) - y_lo) / (y_hi - y_lo)) * plot_h

    out = [_open(width, total_h, chart.title), _text(left, 18, chart.title, weight="bold")]
    for tick in _ticks(y_lo, y_hi):
        out.append(f'<line x1="{left}" y1="{py(tick):.1f}" x2="{width - right}" y2="{py(tick):.1f}" class="grid"/>')
        out.append(_text(left - 6, py(tick) + 4, chart.y_fmt(tick), anchor="end", cls="muted"))
    for tick in _ticks(x_lo, x_hi, integer=True):
        out.append(_text(px(tick), top + plot_h + 16, f"{tick:g}", anchor="middle", cls="muted"))
    for x, label in chart.marks:
        out.append(f'<line x1="{px(x):.1f}" y1="{top}" x2="{px(x):.1f}" y2="{top + plot_h}" class="mark"/>')
        out.append(_text(px(x) + 4, top + 12, label, cls="muted label"))
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" class="frame"/>')
    out.append(_text(left + plot_w / 2, top + plot_h + 32, chart.x_label, anchor="middle"))
    out.append(_text(14, top + plot_h / 2, chart.y_label, anchor="middle",
                     transform=f"rotate(-90 14 {top + plot_h / 2:.1f})"))
    for s in series:
        dash = ' stroke-dasharray="5 4"' if s.dashed else ""
        for run in _runs(s.points):
            pts = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in run)
            out.append(f'<polyline class="series" points="{pts}" fill="none" stroke="{s.color}" '
                       f'stroke-width="2"{dash}><title>{escape(s.name)}</title></polyline>')
            if s.markers:
                out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{s.color}"/>' for x, y in run]
    for k, s in enumerate(series):
        lx, ly = left + (k % columns) * (plot_w / columns), height + 14 + 18 * (k // columns)
        dash = ' stroke-dasharray="5 4"' if s.dashed else ""
        out.append(f'<line x1="{lx:.1f}" y1="{ly - 4}" x2="{lx + 22:.1f}" y2="{ly - 4}" stroke="{s.color}" '
                   f'stroke-width="2"{dash}/>')
        out.append(_text(lx + 28, ly, _clip(s.name, plot_w / columns - 34), tip=s.name))
    out.append("</svg>")
    return "".join(out)


def _open(width: float, height: float, title: str) -> str:
    return (f'<svg class="chart" width="{width}" height="{height:.0f}" viewBox="0 0 {width} {height:.0f}" '
            f'role="img" aria-label="{escape(title)}">')


def _text(x: float, y: float, text: str, *, anchor: str = "start", cls: str = "", weight: str = "",
          tip: str | None = None, transform: str = "") -> str:
    attrs = f'x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"'
    attrs += f' class="{cls}"' if cls else ""
    attrs += f' font-weight="{weight}"' if weight else ""
    attrs += f' transform="{transform}"' if transform else ""
    title = f"<title>{escape(tip)}</title>" if tip is not None and tip != text else ""
    return f"<text {attrs}>{title}{escape(text)}</text>"


def _clip(text: str, room: float) -> str:
    """``text`` shortened with an ellipsis to fit ``room`` pixels (the full text stays in a tooltip)."""
    fits = max(4, int(room / _CHAR))
    return text if len(text) <= fits else text[:fits - 1] + "\u2026"


def _runs(points: Sequence[tuple[float, float | None]]) -> list[list[tuple[float, float]]]:
    runs: list[list[tuple[float, float]]] = [[]]
    for x, y in points:
        if y is None or not math.isfinite(y):
            runs.append([])
        else:
            runs[-1].append((x, y))
    return [run for run in runs if run]


def _padded(lo: float, hi: float) -> tuple[float, float]:
    if hi == lo:
        pad = abs(hi) * 0.1 or 1.0
        return lo - pad, hi + pad
    pad = (hi - lo) * 0.08
    return lo - pad, hi + pad


def _ticks(lo: float, hi: float, integer: bool = False, count: int = 5) -> list[float]:
    """About ``count`` round values (1, 2 or 5 times a power of ten apart) inside [lo, hi]."""
    raw = (hi - lo) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next((m for m in (1, 2, 5, 10) if step * m >= raw), 10)
    if integer:
        step = max(1.0, round(step))
    first = math.ceil(lo / step) * step
    return [first + k * step for k in range(int((hi - first) / step + 1e-9) + 1)]
