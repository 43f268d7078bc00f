"""The fleet link's state, as ``edgeos node status`` shows it.

``online``; ``offline`` (since when, the last error; retried with backoff); ``revoked``
(the fleet refused the certificate) and ``certificate expired``: the node keeps running
what it last committed, says so, and asks again only slowly, unless a join token lets it
enroll again; ``not enrolled`` and ``enrolling`` before that.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("edgeos.sync")

#: States in which the fleet refuses the node's certificate: no use asking often.
REFUSED = ("revoked", "certificate expired")


@dataclass
class Link:
    """How the node stands with its fleet: ``not enrolled``, ``enrolling``, ``online``,
    ``offline``, ``revoked`` or ``certificate expired``; since when; the last sync and error."""

    state: str
    since: float
    last_sync: float | None = None
    last_error: str | None = None

    def move(self, new: str, error: str | None, now: float) -> None:
        """Enter state ``new`` (logged when it changes); ``error`` is why, or None."""
        if new != self.state:
            level = logging.WARNING if new in (*REFUSED, "not enrolled") else logging.INFO
            log.log(level, "fleet link: %s%s", new, f" ({error})" if error else "")
            self.state, self.since = new, now
        self.last_error = error

    @classmethod
    def at_start(cls, enrolled: bool, saved: Any, now: float) -> Link:
        """The link when the node starts: offline until it syncs, if it has enrolled;
        the last sync of its last life (``saved``, the stored link) for the status."""
        if not enrolled:
            link = cls("not enrolled", now)
        else:
            link = cls("offline", now, last_error="not synced since the node started")
        if isinstance(saved, dict) and isinstance(saved.get("last_sync"), int | float):
            link.last_sync = float(saved["last_sync"])
        return link

    def to_json(self) -> dict[str, Any]:
        """The link's part of the status."""
        return {
            "link_state": self.state, "link_since": self.since,
            "last_sync": self.last_sync, "last_error": self.last_error,
        }  # fmt: skip
