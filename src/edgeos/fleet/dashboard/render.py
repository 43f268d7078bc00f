"""HTML for the dashboard: the page frame, tables, forms, with everything escaped.

Pages are plain f-strings over :func:`esc`: every value that came from a device, an
operator or the database goes through it (or through a helper that calls it), so a
hostname like ``<script>`` shows as text.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from edgeos.fleet.auth import Operator

PREFIX = "/ui"
_NAV = (
    ("", "Fleet"),
    ("/approvals", "Approvals"),
    ("/rollouts", "Rollouts"),
    ("/artifacts", "Artifacts"),
    ("/audit", "Audit"),
)


def esc(value: Any) -> str:
    """``value`` as text safe inside HTML content and quoted attributes."""
    return html.escape("" if value is None else str(value), quote=True)


def url(*parts: str) -> str:
    """A dashboard URL from path parts, each percent-encoded."""
    return PREFIX + "".join("/" + quote(p, safe="") for p in parts)


def when(ts: float | None) -> str:
    """A Unix time as UTC text, or a dash."""
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S")


def link(href: str, text: Any) -> str:
    """An escaped link."""
    return f'<a href="{esc(href)}">{esc(text)}</a>'


def badge(text: Any, kind: str | None = None) -> str:
    """A small coloured label; ``kind`` picks the colour (defaults to the text)."""
    return f'<span class="badge b-{esc(kind or text)}">{esc(text)}</span>'


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], empty: str = "nothing yet") -> str:
    """A table; cells are HTML already (escape values with :func:`esc` first)."""
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    if not body:
        return f'<p class="muted">{esc(empty)}</p>'
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>'


def form(action: str, csrf: str, fields: str, button: str, *, danger: bool = False) -> str:
    """A POST form carrying the session's CSRF secret."""
    cls = "danger" if danger else "primary"
    return (
        f'<form method="post" action="{esc(action)}" class="inline">'
        f'<input type="hidden" name="csrf" value="{esc(csrf)}">{fields}'
        f'<button type="submit" class="{cls}">{esc(button)}</button></form>'
    )


def page(title: str, body: str, operator: Operator | None = None, csrf: str = "") -> str:
    """A whole page: header with navigation (when signed in), then ``body``."""
    nav = ""
    if operator is not None:
        links = "".join(f'<a href="{PREFIX}{path}/">{esc(name)}</a>' if path == "" else
                        f'<a href="{PREFIX}{path}">{esc(name)}</a>' for path, name in _NAV)  # fmt: skip
        scopes = ", ".join(s for s in ("read", "deploy", "admin") if s in operator.scopes)
        logout = form(f"{PREFIX}/logout", csrf, "", "Sign out")
        nav = (
            f'<nav>{links}</nav><div class="who">{esc(operator.name)} '
            f'<span class="muted">({esc(scopes)})</span> {logout}</div>'
        )
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)} · edgeos fleet</title>"
        f'<link rel="stylesheet" href="{PREFIX}/static/app.css"></head><body>'
        f'<header><a class="brand" href="{PREFIX}/">edgeos fleet</a>{nav}</header>'
        f"<main><h1>{esc(title)}</h1>{body}</main></body></html>"
    )
