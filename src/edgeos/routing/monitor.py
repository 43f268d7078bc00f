"""The link monitor: for each venue, whether it is online, its RTT, throughput and latency.

Two sources, both cheap. Passively, every real call reports its latency and the bytes
it moved (or that it failed to reach the venue). Actively, each remote venue is probed
(``GET /v2/health/ready``) every ``interval`` seconds by a thread that sleeps on an
event between probes: no busy polling, and stopping wakes it at once. One failed probe
or call marks a venue offline, so a lost link is seen within one interval; the next
successful probe marks it online again.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from edgeos.errors import EdgeOSError
from edgeos.routing.venues import Venue

log = logging.getLogger("edgeos.routing")


@dataclass(frozen=True)
class LinkState:
    """A venue's link as last measured."""

    venue: str
    online: bool
    #: When ``online`` last changed (monotonic seconds).
    since: float
    #: Round-trip time of the last successful probe (ms); None before one.
    rtt_ms: float | None
    #: Bytes per second moved by the last call that reported its bytes.
    throughput_bps: float | None
    #: Latency percentiles over the window of recent calls (ms); None before any call.
    p50_ms: float | None
    p95_ms: float | None
    calls: int
    #: Calls under way now (the venue's queue depth, as far as this node knows).
    in_flight: int
    last_error: str | None


class _Link:
    def __init__(self, venue: str, window: int, now: float) -> None:
        self.venue = venue
        self.online = True
        self.since = now
        self.rtt_ms: float | None = None
        self.throughput_bps: float | None = None
        self.latencies: deque[float] = deque(maxlen=window)
        self.calls = 0
        self.in_flight = 0
        self.last_error: str | None = None


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0-1) of sorted ``ordered`` by the nearest-rank method."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class LinkMonitor:
    """Online state, RTT, throughput and latency of every venue."""

    def __init__(
        self,
        venues: Sequence[Venue],
        *,
        interval: float = 2.0,
        window: int = 200,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.clock = clock
        self._venues = {v.info.name: v for v in venues}
        now = clock()
        self._links = {name: _Link(name, window, now) for name in self._venues}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- readings -----------------------------------------------------------------------
    def state(self, venue: str) -> LinkState:
        """The venue's link now."""
        with self._lock:
            link = self._links[venue]
            window = sorted(link.latencies)  # once for both percentiles: on every decision
            return LinkState(
                venue, link.online, link.since, link.rtt_ms, link.throughput_bps,
                percentile(window, 0.5) if window else None,
                percentile(window, 0.95) if window else None,
                link.calls, link.in_flight, link.last_error,
            )  # fmt: skip

    def states(self) -> list[LinkState]:
        """Every venue's link, by name."""
        return [self.state(name) for name in sorted(self._links)]

    # -- passive measurements -----------------------------------------------------------
    @contextmanager
    def calling(self, venue: str) -> Iterator[None]:
        """Count a call in flight to ``venue`` while the block runs."""
        with self._lock:
            self._links[venue].in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._links[venue].in_flight -= 1

    def call_succeeded(self, venue: str, latency_s: float, moved_bytes: int = 0) -> None:
        """A real call came back: its latency joins the window; the venue is online."""
        with self._lock:
            link = self._links[venue]
            link.latencies.append(latency_s * 1000)
            link.calls += 1
            if moved_bytes and latency_s > 0:
                link.throughput_bps = moved_bytes / latency_s
            self._set(link, True, None)

    def link_failed(self, venue: str, error: str) -> None:
        """A call or probe could not reach ``venue``: it is offline until a probe succeeds."""
        with self._lock:
            self._set(self._links[venue], False, error)

    def _set(self, link: _Link, online: bool, error: str | None) -> None:
        if error is not None:
            link.last_error = error
        if link.online != online:
            link.online = online
            link.since = self.clock()
            if online:
                log.warning("venue %s is back online", link.venue)
            else:
                log.warning("venue %s is offline: %s", link.venue, error)

    # -- probes -------------------------------------------------------------------------
    def probe(self, venue: str) -> bool:
        """Probe one venue now; whether it answered."""
        started = time.perf_counter()
        try:
            self._venues[venue].probe()
        except EdgeOSError as exc:
            self.link_failed(venue, str(exc))
            return False
        rtt = (time.perf_counter() - started) * 1000
        with self._lock:
            link = self._links[venue]
            link.rtt_ms = rtt
            self._set(link, True, None)
        return True

    def start(self) -> None:
        """Probe every remote venue now and then every ``interval`` seconds, each on a thread."""
        self._stop.clear()
        for name, venue in self._venues.items():
            if venue.info.on_device:
                continue
            thread = threading.Thread(
                target=self._probe_forever, args=(name,), name=f"edgeos-probe-{name}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop probing (wakes the probe threads at once). Safe to call twice."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads = []

    def _probe_forever(self, venue: str) -> None:
        while not self._stop.is_set():
            self.probe(venue)
            self._stop.wait(self.interval)
