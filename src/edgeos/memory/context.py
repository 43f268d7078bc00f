"""``ctx.context``: a run's short-term context, scratch values and conversational turns.

It lives with the run: each step reads what earlier steps of the same run wrote, its own
writes are buffered and committed with the step (like its effects), and everything is
purged in the transaction that journals the run's outcome (:func:`purge`), overwritten
on disk (``secure_delete``). Standard library and orjson only: the executor imports this.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from edgeos.errors import EdgeOSError, InvalidRequestError

if TYPE_CHECKING:
    from edgeos.state import Database

MAX_KEY_CHARS = 256
MAX_VALUE_BYTES = 1024 * 1024
MAX_TURN_BYTES = 64 * 1024

_MISSING = object()


@dataclass(frozen=True)
class Turn:
    """One turn of a conversation: who spoke, what they said, when (the step's time)."""

    role: str
    text: str
    at: float


class RunScratch:
    """The run's context as one step sees it: committed values plus its own writes."""

    def __init__(
        self,
        db: Database | None,
        run_id: str,
        *,
        now: float,
        error: type[EdgeOSError] = InvalidRequestError,
    ) -> None:
        self._db = db
        self.run_id = run_id
        self._now = now
        self._error = error
        self._values: dict[str, Any] | None = None
        self._turns: list[Turn] | None = None
        self._set: dict[str, str] = {}
        self._deleted: set[str] = set()
        self._new_turns: list[Turn] = []

    # -- values -------------------------------------------------------------------------
    def get(self, key: str, default: Any = None) -> Any:
        """The value under ``key`` (a copy), or ``default``."""
        value = self._load().get(self._key(key), _MISSING)
        return default if value is _MISSING else orjson.loads(orjson.dumps(value))

    def set(self, key: str, value: Any) -> None:
        """Keep a JSON value under ``key`` for the rest of the run."""
        key = self._key(key)
        try:
            encoded = orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
        except TypeError as exc:
            raise self._error(f"run context value for {key!r} is not JSON: {exc}") from None
        if len(encoded) > MAX_VALUE_BYTES:
            raise self._error(
                f"run context value for {key!r} is {len(encoded)} bytes, more than "
                f"{MAX_VALUE_BYTES}"
            )
        self._load()[key] = orjson.loads(encoded)
        self._set[key] = encoded.decode()
        self._deleted.discard(key)

    def delete(self, key: str) -> None:
        """Drop ``key`` (nothing happens if it is not there)."""
        key = self._key(key)
        if self._load().pop(key, _MISSING) is not _MISSING:
            self._set.pop(key, None)
            self._deleted.add(key)

    def keys(self) -> list[str]:
        """Every key, sorted."""
        return sorted(self._load())

    def __getitem__(self, key: str) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self.set(key, value)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key in self._load()

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    # -- turns --------------------------------------------------------------------------
    def turns(self, last: int | None = None) -> list[Turn]:
        """The conversation so far (the ``last`` turns when given), oldest first."""
        turns = self._load_turns() + self._new_turns
        return turns[-last:] if last else turns

    def add_turn(self, role: str, text: str) -> None:
        """Append a turn (``role`` like ``user`` or ``agent``) at the step's time."""
        if not isinstance(role, str) or not role.strip() or len(role) > 64:
            raise self._error("a turn's role must be non-empty text of at most 64 characters")
        if not isinstance(text, str) or len(text.encode()) > MAX_TURN_BYTES:
            raise self._error(f"a turn's text must be text of at most {MAX_TURN_BYTES} bytes")
        self._new_turns.append(Turn(role, text, self._now))

    # -- committing ---------------------------------------------------------------------
    @property
    def pending(self) -> bool:
        """Whether the step changed anything."""
        return bool(self._set or self._deleted or self._new_turns)

    def apply(self, conn: sqlite3.Connection, at: float) -> None:
        """Write the step's changes inside its commit transaction."""
        conn.executemany(
            "INSERT INTO run_context (run_id, key, value) VALUES (?, ?, ?) "
            "ON CONFLICT (run_id, key) DO UPDATE SET value = excluded.value",
            [(self.run_id, k, v) for k, v in self._set.items()],
        )
        conn.executemany(
            "DELETE FROM run_context WHERE run_id = ? AND key = ?",
            [(self.run_id, k) for k in self._deleted],
        )
        if self._new_turns:
            start = conn.execute(
                "SELECT coalesce(max(n), 0) FROM run_turns WHERE run_id = ?", (self.run_id,)
            ).fetchone()[0]
            conn.executemany(
                "INSERT INTO run_turns (run_id, n, role, text, at) VALUES (?, ?, ?, ?, ?)",
                [(self.run_id, start + i + 1, t.role, t.text, t.at)
                 for i, t in enumerate(self._new_turns)],
            )  # fmt: skip
        self._set, self._deleted, self._new_turns = {}, set(), []

    # -- reading ------------------------------------------------------------------------
    def _key(self, key: Any) -> str:
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_CHARS:
            raise self._error(f"a run context key is text of 1 to {MAX_KEY_CHARS} characters")
        return key

    def _load(self) -> dict[str, Any]:
        if self._values is None:
            rows = [] if self._db is None else self._db.reader().execute(
                "SELECT key, value FROM run_context WHERE run_id = ?", (self.run_id,)
            )  # fmt: skip
            self._values = {k: orjson.loads(v) for k, v in rows}
        return self._values

    def _load_turns(self) -> list[Turn]:
        if self._turns is None:
            rows = [] if self._db is None else self._db.reader().execute(
                "SELECT role, text, at FROM run_turns WHERE run_id = ? ORDER BY n", (self.run_id,)
            )  # fmt: skip
            self._turns = [Turn(r, t, a) for r, t, a in rows]
        return self._turns


def purge(conn: sqlite3.Connection, run_id: str) -> None:
    """Remove a run's context and turns, overwriting their bytes (the run has finished)."""
    # Most runs keep neither: one look, instead of five statements, at every run's end.
    held = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM run_context WHERE run_id = ?) "
        "OR EXISTS (SELECT 1 FROM run_turns WHERE run_id = ?)",
        (run_id, run_id),
    ).fetchone()[0]
    if not held:
        return
    previous = conn.execute("PRAGMA secure_delete").fetchone()[0]
    conn.execute("PRAGMA secure_delete = ON")
    try:
        conn.execute("DELETE FROM run_context WHERE run_id = ?", (run_id,))
        conn.execute("DELETE FROM run_turns WHERE run_id = ?", (run_id,))
    finally:
        conn.execute(f"PRAGMA secure_delete = {int(previous)}")


def serve_callback(scratch: RunScratch, message: dict[str, Any]) -> dict[str, Any]:
    """Answer a step in a worker process using ``ctx.context`` (see ``agents._worker``).

    Keys and texts are checked by the scratch itself, as for a step in a thread.
    """
    op = message.get("op")
    key: Any = message.get("key")
    if op == "get":
        value = scratch.get(key, _MISSING)
        return {"found": False} if value is _MISSING else {"found": True, "value": value}
    if op == "set":
        scratch.set(key, message.get("value"))
        return {}
    if op == "delete":
        scratch.delete(key)
        return {}
    if op == "keys":
        return {"keys": scratch.keys()}
    if op == "turns":
        last = message.get("last")
        turns = scratch.turns(last if isinstance(last, int) else None)
        return {"turns": [[t.role, t.text, t.at] for t in turns]}
    if op == "add_turn":
        role: Any = message.get("role")
        text: Any = message.get("text")
        scratch.add_turn(role, text)
        return {}
    raise InvalidRequestError(f"an agent worker asked the run context for unknown {op!r}")
