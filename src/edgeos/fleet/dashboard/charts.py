"""KPI charts over time, drawn on the server as inline SVG.

No chart library and no script: the pages' Content Security Policy allows none, and a
few polylines are all a KPI series needs. Each chart shows one quantity (a latency in
ms, or a rate) for one or more series over the same time range.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from edgeos.fleet.dashboard.render import esc

_W, _H = 560, 180  # the drawing's own units; CSS scales it to the card
_LEFT, _RIGHT, _TOP, _BOTTOM = 48, 10, 10, 24


@dataclass(frozen=True)
class Series:
    """One line: its name and its points (time, value or None where nothing is known)."""

    name: str
    points: Sequence[tuple[float, float | None]]


def _clock(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M")


def _label(value: float, percent: bool) -> str:
    if percent:
        return f"{value * 100:.0f}%"
    return f"{value:.0f}" if value >= 10 else f"{value:.2g}"


def line_chart(
    title: str, series: Sequence[Series], *, start: float, end: float, percent: bool = False
) -> str:
    """A titled SVG line chart of ``series`` between ``start`` and ``end``.

    ``percent`` draws rates (0 to 1) on a 0-100% axis; otherwise the axis starts at 0 and
    ends a little above the largest value.
    """
    values = [v for s in series for _, v in s.points if v is not None]
    if not values:
        return (
            f'<figure class="chart"><figcaption>{esc(title)}</figcaption>'
            '<p class="muted">no data in this range</p></figure>'
        )
    top = 1.0 if percent else max(values) * 1.15 or 1.0
    span = max(end - start, 1.0)
    width, height = _W - _LEFT - _RIGHT, _H - _TOP - _BOTTOM

    def x(t: float) -> float:
        return _LEFT + (t - start) / span * width

    def y(v: float) -> float:
        return _TOP + height - v / top * height

    parts = []
    for fraction in (0.0, 0.5, 1.0):
        gy = y(top * fraction)
        parts.append(
            f'<line class="grid" x1="{_LEFT}" y1="{gy:.1f}" x2="{_W - _RIGHT}" y2="{gy:.1f}"/>'
            f'<text class="axis" x="{_LEFT - 6}" y="{gy + 4:.1f}" text-anchor="end">'
            f"{esc(_label(top * fraction, percent))}</text>"
        )
    for t, anchor in ((start, "start"), (end, "end")):
        parts.append(
            f'<text class="axis" x="{x(t):.1f}" y="{_H - 6}" text-anchor="{anchor}">'
            f"{esc(_clock(t))} UTC</text>"
        )
    legend = []
    for index, s in enumerate(series):
        known = [(t, v) for t, v in s.points if v is not None]
        cls = f"s{index % 4}"
        if len(known) == 1:  # one point draws no line: show it as a dot
            t, v = known[0]
            parts.append(f'<circle class="{cls}" cx="{x(t):.1f}" cy="{y(v):.1f}" r="3"/>')
        elif known:
            path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in known)
            parts.append(f'<polyline class="{cls}" points="{path}"/>')
        legend.append(f'<span class="key {cls}">{esc(s.name)}</span>')
    return (
        f'<figure class="chart"><figcaption>{esc(title)} {"".join(legend)}</figcaption>'
        f'<svg viewBox="0 0 {_W} {_H}" role="img" aria-label="{esc(title)}">'
        f"{''.join(parts)}</svg></figure>"
    )


@dataclass(frozen=True)
class Bar:
    """One span on a timeline: its label, depth in the trace's tree, start and end (s)."""

    label: str
    depth: int
    start: float
    end: float
    failed: bool = False


_ROW, _LABEL_W, _TL_W = 22, 230, 760


def _duration(seconds: float) -> str:
    ms = seconds * 1000
    return f"{ms:.0f} ms" if ms >= 10 else f"{ms:.2g} ms"


def timeline(title: str, bars: Sequence[Bar]) -> str:
    """A titled SVG timeline: one row per bar (indented by depth), bars on a shared time
    axis from the first start to the last end; each bar's title gives its duration."""
    if not bars:
        return (
            f'<figure class="chart timeline"><figcaption>{esc(title)}</figcaption>'
            '<p class="muted">no spans</p></figure>'
        )
    origin = min(b.start for b in bars)
    span = max(max(b.end for b in bars) - origin, 1e-6)
    width = _TL_W - _LABEL_W - _RIGHT
    height = _TOP + len(bars) * _ROW + _BOTTOM

    def x(t: float) -> float:
        return _LABEL_W + (t - origin) / span * width

    parts = []
    for fraction in (0.0, 0.5, 1.0):
        gx = _LABEL_W + fraction * width
        anchor = ("start", "middle", "end")[int(fraction * 2)]
        parts.append(
            f'<line class="grid" x1="{gx:.1f}" y1="{_TOP}" x2="{gx:.1f}" y2="{height - _BOTTOM}"/>'
            f'<text class="axis" x="{gx:.1f}" y="{height - 6}" text-anchor="{anchor}">'
            f"{esc(_duration(span * fraction))}</text>"
        )
    for row, bar in enumerate(bars):
        y = _TOP + row * _ROW
        label = (
            bar.label
            if len(bar.label) <= 34 - 2 * bar.depth
            else bar.label[: 31 - 2 * bar.depth] + "…"
        )
        left = x(bar.start)
        # A span too short to see at this scale still gets a visible sliver.
        wide = max(x(bar.end) - left, 2.0)
        cls = "bar bad" if bar.failed else f"bar s{min(bar.depth, 3)}"
        parts.append(
            f"<g><title>{esc(bar.label)}: {esc(_duration(bar.end - bar.start))}</title>"
            f'<text class="label" x="{6 + 12 * bar.depth}" y="{y + 15}">{esc(label)}</text>'
            f'<rect class="{cls}" x="{left:.1f}" y="{y + 4}" width="{wide:.1f}" '
            f'height="{_ROW - 8}" rx="2"/></g>'
        )
    return (
        f'<figure class="chart timeline"><figcaption>{esc(title)}</figcaption>'
        f'<svg viewBox="0 0 {_TL_W} {height}" role="img" aria-label="{esc(title)}">'
        f"{''.join(parts)}</svg></figure>"
    )
