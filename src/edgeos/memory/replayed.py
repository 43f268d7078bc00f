"""``ctx.memory`` on replay: a step recalls what it recalled the first time, and writes nothing.

A run's journal holds, per step, what each recall asked (a digest) and found (record ids
and scores), and the ids of the records it remembered (see :mod:`edgeos.memory.handle`).
:class:`ReplayedMemory` serves them back in the same order: the records are read again by
id, so a step sees the text it saw then, however much memory has grown, shrunk or been
re-ranked since. Nothing is searched and nothing is embedded (replay may run without the
embedding model), and ``remember`` and ``forget`` write nothing: replay never commits.

What no longer matches the journal is a difference: a recall that asks something else,
more or fewer recalls or remembered records than the step made. A record erased since
(``forget``, retention) cannot be served: the step sees the others, and replay says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from edgeos.errors import EdgeOSError, InvalidRequestError
from edgeos.memory import store
from edgeos.memory.handle import MAX_K, AgentMemory, asked
from edgeos.memory.store import MemoryRecord
from edgeos.state.ids import new_id

if TYPE_CHECKING:
    from edgeos.manifests.agent import Memory as MemoryConfig
    from edgeos.state import Database


class ReplayedMemory(AgentMemory):
    """One replayed step's ``ctx.memory``: the journaled recalls, served in order."""

    def __init__(
        self,
        db: Database,
        agent: str,
        config: MemoryConfig,
        *,
        recalls: Sequence[Mapping[str, Any]],
        remembered: Sequence[str],
        now: float,
        step: str,
        step_index: int,
        error: type[EdgeOSError],
    ) -> None:
        super().__init__(
            db, None, agent, config, now=now, step=step, step_index=step_index, error=error
        )
        self._journaled = list(recalls)
        self._ids = list(remembered)
        self._recalled = 0
        self._remembered = 0
        #: What differs from the journal, in words (replay reports them).
        self.differences: list[str] = []
        #: What replay could not serve as it was (records erased since).
        self.notes: list[str] = []

    def remember(
        self,
        text: str,
        metadata: Mapping[str, Any] | None = None,
        *,
        subject: str | None = None,
        ttl: float | str | None = None,
        importance: float = 0.5,
        vector: Sequence[float] | None = None,
    ) -> str:
        """The id the step's record got the first time; nothing is written."""
        self._check_text(text, f"agent '{self.agent}' memory.remember")
        n, self._remembered = self._remembered, self._remembered + 1
        return self._ids[n] if n < len(self._ids) else new_id()

    def recall(
        self,
        query: str | Sequence[float],
        k: int = 5,
        *,
        where: Mapping[str, Any] | None = None,
    ) -> list[MemoryRecord]:
        """The records the step's recall of the same rank found the first time, as they
        were ranked then."""
        label = f"agent '{self.agent}' memory.recall"
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise self._error(f"{label}: k must be a whole number from 1 to {MAX_K}")
        try:
            filters = store.check_where(where, self.config.fields, label)
        except InvalidRequestError as exc:
            raise self._error(str(exc)) from None
        n, self._recalled = self._recalled, self._recalled + 1
        if n >= len(self._journaled):
            self.differences.append(f"recall {n + 1} was not made the first time: it finds nothing")
            return []
        entry = self._journaled[n]
        if asked(query, k, filters) != entry["asked"]:
            self.differences.append(
                f"recall {n + 1} asks something else than the first time; it is served "
                "what was found then"
            )
        found = [store.get(self.db.reader(), record_id) for record_id, _, _ in entry["found"]]
        erased = sum(record is None for record in found)
        if erased:
            self.notes.append(
                f"recall {n + 1}: {erased} of the {len(found)} records it found were erased "
                "since; the step sees the others"
            )
        return [
            replace(record, similarity=similarity, score=score)
            for record, (_, similarity, score) in zip(found, entry["found"], strict=True)
            if record is not None
        ]

    def forget(self, *, subject: str | None = None, id: str | None = None) -> None:
        """Checked as in a run; nothing is erased."""
        if (subject is None) == (id is None):
            raise self._error(f"agent '{self.agent}' memory.forget: give exactly one of "
                              "subject= or id=")  # fmt: skip

    def finish(self) -> list[str]:
        """Every difference, once the step has returned (including calls it no longer makes)."""
        out = list(self.differences)
        if self._recalled < len(self._journaled):
            out.append(f"recalls {self._recalled} time(s), journaled {len(self._journaled)}")
        if self._remembered != len(self._ids):
            out.append(f"remembers {self._remembered} record(s), journaled {len(self._ids)}")
        return out
