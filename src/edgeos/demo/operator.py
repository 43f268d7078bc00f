"""The demo's scripted operator: answers the node's approvals over its HTTP API.

It polls ``GET /api/approvals`` and answers each open question with
``POST /api/approvals/{id}``, as a person at a console would: it agrees with the agent's
proposal most of the time and overrides it now and then (a seeded draw), so the human
override rate in the KPIs is real and not zero.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import httpx

from edgeos.demo.background import BackgroundThread


@dataclass(frozen=True)
class Answer:
    """One answer the operator gave."""

    escalation_id: str
    question: str
    proposal: Any
    choice: Any
    accepted: bool
    """False when the node said it was already answered (or timed out)."""

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
    ) -> None:
        super().__init__()
        if not 0.0 <= override_rate <= 1.0:
            raise ValueError("override_rate must be in [0, 1]")
        self.node_url = node_url
        self.override_rate = override_rate
        self.poll_interval = poll_interval
        self.name = name
        self.answers: list[Answer] = []
        self.errors: list[str] = []
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

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

    def answer_open(self, client: httpx.Client) -> int:
        """Answer every open approval once; returns how many were accepted."""
        accepted = 0
        response = client.get("/api/approvals")
        response.raise_for_status()
        for item in response.json():
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

    def _loop(self) -> None:
        with httpx.Client(base_url=self.node_url, timeout=5.0) as client:
            while not self._stop.wait(self.poll_interval):
                try:
                    self.answer_open(client)
                except httpx.HTTPError as exc:
                    # The node may be restarting or stopping: note it and poll again.
                    with self._lock:
                        self.errors.append(f"{type(exc).__name__}: {exc}")

    def __enter__(self) -> ScriptedOperator:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
