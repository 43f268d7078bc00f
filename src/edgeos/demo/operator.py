"""The demo's scripted operator: answers the node's approvals over its HTTP API.

It polls ``GET /api/approvals`` and answers each open question with
``POST /api/approvals/{id}``, as a person at a console would: it agrees with the agent's
proposal most of the time and overrides it now and then (a seeded draw), so the human
override rate in the KPIs is real and not zero.

With a fleet (:class:`FleetDesk`), every ``fleet_every``-th question is answered there
instead, as an operator at the fleet's dashboard would: once the node has reported it,
through ``POST /api/v1/approvals/{device}/{escalation}``; the node hears the answer on its
long poll and applies it. A question the fleet has not seen within
:data:`FLEET_PATIENCE_S` is answered on the node after all.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import httpx

from edgeos.demo.background import BackgroundThread
from edgeos.errors import EdgeOSError
from edgeos.node.tokens import bearer

#: How long a question meant for the fleet waits to be reported there.
FLEET_PATIENCE_S = 6.0


@dataclass
class FleetDesk:
    """Where the operator answers through the fleet: its URL, an operator token, and
    which questions go there (every ``fleet_every``-th)."""

    url: str
    token: str
    device_id: Callable[[], str | None]
    fleet_every: int = 2
    _device: str | None = field(default=None, init=False)

    def device(self) -> str | None:
        """The node's device id, once it has enrolled."""
        if self._device is None:
            self._device = self.device_id()
        return self._device


@dataclass(frozen=True)
class Answer:
    """One answer the operator gave."""

    escalation_id: str
    question: str
    proposal: Any
    choice: Any
    accepted: bool
    """False when the node said it was already answered (or timed out)."""
    via_fleet: bool = False
    """Answered at the fleet (the node applies it on its long poll)."""

    @property
    def override(self) -> bool:
        """The answer differs from the agent's proposal."""
        return self.proposal is not None and self.choice != self.proposal


class ScriptedOperator(BackgroundThread):
    thread_name = "demo-operator"

    """Answers approvals in a background thread until stopped.

    ``override_rate`` is the chance of choosing another option than the proposal; the
    draws come from ``seed``, so a run with the same questions gets the same answers.
    """

    def __init__(
        self,
        node_url: str,
        *,
        override_rate: float = 0.25,
        seed: int = 5,
        poll_interval: float = 0.1,
        name: str = "demo-operator",
        fleet: FleetDesk | None = None,
        token: str | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= override_rate <= 1.0:
            raise ValueError("override_rate must be in [0, 1]")
        self.node_url = node_url
        self.token = token
        self.override_rate = override_rate
        self.poll_interval = poll_interval
        self.name = name
        self.answers: list[Answer] = []
        self.errors: list[str] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.fleet = fleet
        self._seen = 0
        # Questions left for the fleet: escalation id -> when first seen on the node.
        self._for_fleet: dict[str, float] = {}
        self._sent_to_fleet: set[str] = set()
        self._fleet_client: Any = None

    @property
    def answered(self) -> int:
        """Answers the node accepted."""
        with self._lock:
            return sum(1 for a in self.answers if a.accepted)

    @property
    def overrides(self) -> int:
        """Accepted answers that overrode the agent's proposal."""
        with self._lock:
            return sum(1 for a in self.answers if a.accepted and a.override)

    def choose(self, options: list[Any], proposal: Any, default: Any) -> Any:
        """Agree with the proposal, or with probability ``override_rate`` pick another option."""
        preferred = proposal if proposal in options else default
        others = [o for o in options if o != preferred]
        if others and self._rng.random() < self.override_rate:
            return others[0] if len(others) == 1 else self._rng.choice(others)
        return preferred

    @property
    def via_fleet(self) -> int:
        """Answers given at the fleet and taken there."""
        with self._lock:
            return sum(1 for a in self.answers if a.accepted and a.via_fleet)

    def answer_open(self, client: httpx.Client) -> int:
        """Answer every open approval once; returns how many were accepted."""
        accepted = 0
        response = client.get("/api/approvals")
        response.raise_for_status()
        open_ids = {item["id"] for item in response.json()}
        self._for_fleet = {k: v for k, v in self._for_fleet.items() if k in open_ids}
        self._sent_to_fleet &= open_ids
        for item in response.json():
            if self._leave_to_fleet(item):
                continue
            choice = self.choose(item["options"], item.get("proposal"), item.get("default"))
            reply = client.post(
                f"/api/approvals/{item['id']}",
                json={"choice": choice, "by": self.name, "note": "scripted demo operator"},
            )
            # 409: answered meanwhile (by the timeout, or someone else): not ours to count.
            if reply.status_code not in (200, 409):
                reply.raise_for_status()
            done = reply.status_code == 200
            with self._lock:
                self.answers.append(
                    Answer(item["id"], item["question"], item.get("proposal"), choice, done)
                )
            accepted += done
        return accepted

    def _leave_to_fleet(self, item: dict[str, Any]) -> bool:
        """Whether ``item`` is (still) to be answered at the fleet rather than here."""
        if self.fleet is None:
            return False
        key = item["id"]
        if key in self._sent_to_fleet:
            return True  # answered there: the node applies it on its long poll
        first = self._for_fleet.get(key)
        if first is None:
            self._seen += 1
            if self._seen % self.fleet.fleet_every:
                return False
            self._for_fleet[key] = first = time.monotonic()
        if time.monotonic() - first > FLEET_PATIENCE_S:
            return False  # the fleet never saw it: answer here after all
        if self._answer_at_fleet(item):
            self._sent_to_fleet.add(key)
        return True

    def _answer_at_fleet(self, item: dict[str, Any]) -> bool:
        """Answer ``item`` at the fleet if it has it open there; True once answered."""
        assert self.fleet is not None
        device = self.fleet.device()
        if device is None:
            return False
        if self._fleet_client is None:
            from edgeos.fleet.client import FleetClient

            self._fleet_client = FleetClient.login(self.fleet.url, self.fleet.token)
        waiting = {e["id"] for e in self._fleet_client.approvals(state="open", device=device)}
        if item["id"] not in waiting:
            return False
        choice = self.choose(item["options"], item.get("proposal"), item.get("default"))
        try:
            self._fleet_client.answer_approval(device, item["id"], choice,
                                               "scripted demo operator, at the fleet")  # fmt: skip
            done = True
        except EdgeOSError:  # answered or timed out on the node meanwhile
            done = False
        with self._lock:
            self.answers.append(
                Answer(item["id"], item["question"], item.get("proposal"), choice, done, True)
            )
        return True

    def _loop(self) -> None:
        with httpx.Client(
            base_url=self.node_url, headers=bearer(self.token), timeout=5.0
        ) as client:
            try:
                while not self._stop.wait(self.poll_interval):
                    try:
                        self.answer_open(client)
                    except (httpx.HTTPError, EdgeOSError) as exc:
                        # The node (or the fleet) may be restarting or stopping: note it
                        # and poll again.
                        with self._lock:
                            self.errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                if self._fleet_client is not None:
                    self._fleet_client.close()

    def __enter__(self) -> ScriptedOperator:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
