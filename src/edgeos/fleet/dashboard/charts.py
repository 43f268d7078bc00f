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
