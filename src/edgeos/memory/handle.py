"""``ctx.memory``: one agent's long-term memory, as a step (or a command) uses it.

``remember`` and ``forget`` check their input at once (a bad one raises and buffers
nothing) and are buffered; :meth:`AgentMemory.apply` writes the buffer inside the caller's
transaction: for a step, the transaction that commits the step and its journal record, so
a step's memory writes commit or roll back with the step, and a step that is run again
(after a crash, a failure, an answer) never writes twice. ``recall`` reads what is
committed (not the step's own pending writes). Texts are embedded when remembered, on the
step's thread, so nothing heavy runs while the write lock is held.

In a run, what each recall found (record ids and scores, and a digest of what was asked:
no memory content) is journaled with the step (``memory_recalled``), as are the ids of the
records it remembered (``memory_written``): replay serves a step the same records again
(see :mod:`edgeos.memory.replayed`).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from edgeos.errors import EdgeOSError, InvalidRequestError
from edgeos.memory import retention, store
from edgeos.memory.store import MemoryRecord, NewRecord
from edgeos.state import journal
from edgeos.state.ids import new_id

if TYPE_CHECKING:
    import sqlite3

    from edgeos.manifests.agent import Memory as MemoryConfig
    from edgeos.memory.embeddings import EmbeddingModel, InferFn
    from edgeos.runtime import ModelHost
    from edgeos.state import Database

MAX_K = 1000


@dataclass
class Applied:
    """What one :meth:`AgentMemory.apply` wrote."""

    remembered: list[str] = field(default_factory=list)
    forgotten: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)


class AgentMemory:
    """Remember, recall and forget by meaning, for one agent."""

    def __init__(
        self,
        db: Database,
        host: ModelHost | None,
        agent: str,
        config: MemoryConfig,
        *,
        infer: InferFn | None = None,
        now: float | None = None,
        run_id: str | None = None,
        step: str | None = None,
        step_index: int | None = None,
        error: type[EdgeOSError] = InvalidRequestError,
    ) -> None:
        self.db = db
        self.host = host
        self.agent = agent
        self.config = config
        self._infer = infer
        self._now = now
        self.run_id = run_id
        self.step = step
        self.step_index = step_index
        # A step's misuse raises its StepError (not retried); a command's, InvalidRequestError.
        self._error = error
        self._puts: list[NewRecord] = []
        self._forget_subjects: list[str] = []
        self._forget_ids: list[str] = []
        self._used: set[str] = set()
        #: What each recall of a run's step asked (a digest) and found, for the journal.
        self._recalls: list[dict[str, Any]] = []
        self._model: EmbeddingModel | None = None

    # -- the API of ctx.memory ----------------------------------------------------------
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
        """Keep ``text`` (with JSON ``metadata``) for later recall; returns its id.

        ``subject`` names whose data it is (``forget(subject=...)`` erases all of it);
        ``ttl`` is a duration (``"30d"``, seconds) after which it expires (default:
        ``memory.retention.ttl``; never past ``memory.retention.max_ttl``); ``importance``
        (0 to 1) weighs in ranking and eviction; ``vector`` gives the embedding instead of computing it. Written when the step
        commits; a bad argument raises and writes nothing.
        """
        where = f"agent '{self.agent}' memory.remember"
        text = self._check_text(text, where)
        meta = self._check_metadata(metadata, where)
        subject = self._check_subject(subject, where)
        now = self.now()
        seconds = self._check_ttl(ttl, where)
        if isinstance(importance, bool) or not isinstance(importance, int | float):
            raise self._error(f"{where}: importance must be a number from 0 to 1")
        if not 0.0 <= float(importance) <= 1.0:
            raise self._error(f"{where}: importance {importance} is not between 0 and 1")
        try:
            rows = store.field_rows(meta, self.config.fields, where)
        except InvalidRequestError as exc:
            raise self._error(str(exc)) from None
        vec = self._vectors([text], vector, where)[0]
        record = NewRecord(
            id=new_id(),
            agent=self.agent,
            text=text,
            metadata=meta,
            subject=subject,
            importance=float(importance),
            model=self.model().key,
            created_at=now,
            expires_at=None if seconds is None else now + seconds,
            vector=vec.tobytes(),
            run_id=self.run_id,
            fields=rows,
        )
        cap = self.config.retention.max_bytes
        if cap is not None and record.size > cap:
            raise self._error(
                f"{where}: the record takes {record.size} bytes, more than the agent's "
                f"memory.retention.max_bytes ({cap})"
            )
        self._puts.append(record)
        return record.id

    def recall(
        self,
        query: str | Sequence[float],
        k: int = 5,
        *,
        where: Mapping[str, Any] | None = None,
    ) -> list[MemoryRecord]:
        """The ``k`` records that best match ``query`` (text, or a vector), filtered by
        ``where`` (``{"subject": "alice"}``, ``{"supplier": ["acme", "zenith"]}``) before
        ranking, so ``k`` come back whenever ``k`` match. Expired records never do, nor
        records of another embedding model until they are embedded again (see
        :meth:`outdated`)."""
        from edgeos.memory.search import recall

        label = f"agent '{self.agent}' memory.recall"
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
            raise self._error(f"{label}: k must be a whole number from 1 to {MAX_K}")
        try:
            filters = store.check_where(where, self.config.fields, label)
        except InvalidRequestError as exc:
            raise self._error(str(exc)) from None
        if isinstance(query, str):
            vec = self._vectors([self._check_text(query, label)], None, label)[0]
        else:
            vec = self._vectors([""], query, label)[0]
        found = recall(
            self.db,
            agent=self.agent,
            model=self.model().key,
            query=vec,
            k=k,
            where=filters,
            ranking=self.config.ranking,
            now=self.now(),
        )
        self._used.update(r.id for r in found)
        if self.run_id is not None:
            self._recalls.append(
                {"asked": asked(query, k, filters),
                 # Exact: a step's output may hold the scores, and replay compares it.
                 "found": [[r.id, r.similarity, r.score] for r in found]}
            )  # fmt: skip
        return found

    def outdated(self) -> int:
        """How many of the agent's records recall does not see yet: embedded by another
        model, waiting to be embedded again with the current one (``memory.reembed``)."""
        from edgeos.memory.reembed import outdated

        return outdated(self.db.reader(), self.agent, self.model().key)

    def forget(self, *, subject: str | None = None, id: str | None = None) -> None:
        """Erase the agent's records about ``subject``, or the record ``id``, when the step
        commits: text, vector and derived rows, with their bytes overwritten."""
        where = f"agent '{self.agent}' memory.forget"
        if (subject is None) == (id is None):
            raise self._error(f"{where}: give exactly one of subject= or id=")
        if subject is not None:
            self._forget_subjects.append(self._check_subject(subject, where) or "")
        elif not isinstance(id, str) or not id:
            raise self._error(f"{where}: id must be a record id (text)")
        else:
            self._forget_ids.append(id)

    # -- committing ---------------------------------------------------------------------
    @property
    def pending(self) -> bool:
        """Whether anything waits to be written."""
        return bool(
            self._puts or self._forget_subjects or self._forget_ids or self._used or self._recalls
        )

    def apply(self, conn: sqlite3.Connection, at: float) -> Applied:
        """Write what is buffered inside the caller's transaction, then empty the buffer.

        For a step this runs in its commit transaction: with a run it also appends a
        ``memory_written`` journal record and a ``memory_recalled`` one (ids, scores and
        digests only: the journal is never erased, so it holds no memory content).
        """
        done = Applied()
        for subject in self._forget_subjects:
            done.forgotten += store.delete_where(
                conn, "agent = ? AND subject = ?", (self.agent, subject)
            )
        done.forgotten += store.delete_ids(conn, self.agent, self._forget_ids)
        for record in self._puts:
            store.insert(conn, record)
            done.remembered.append(record.id)
        store.touch(conn, self._used, at)
        if self._puts:
            removed = retention.enforce(conn, self.agent, self.config.retention, at)
            done.expired, done.evicted = removed.expired, removed.evicted
        if self.run_id is not None and (done.remembered or done.forgotten or done.evicted):
            journal.append(
                conn, self.run_id, "memory_written",
                {"index": self.step_index, "remembered": done.remembered,
                 "forgotten": done.forgotten, "expired": len(done.expired),
                 "evicted": done.evicted},
                step=self.step, at=at,
            )  # fmt: skip
        if self.run_id is not None and self._recalls:
            journal.append(
                conn, self.run_id, "memory_recalled",
                {"index": self.step_index, "recalls": self._recalls}, step=self.step, at=at,
            )  # fmt: skip
        if done.forgotten:
            # The freed pages hold zeros now; older copies of them may still sit in the
            # WAL until a checkpoint, which has to wait for this transaction to end.
            threading.Thread(target=_checkpoint, args=(self.db,), daemon=True).start()
        self._puts, self._forget_subjects, self._forget_ids = [], [], []
        self._used = set()
        self._recalls = []
        return done

    def commit(self) -> Applied:
        """Write what is buffered in a transaction of its own (commands and tools)."""
        with self.db.transaction() as conn:
            return self.apply(conn, self.now())

    # -- helpers ------------------------------------------------------------------------
    def now(self) -> float:
        """The time records are stamped with: the step's (fixed), else the clock."""
        return self._now if self._now is not None else time.time()

    def model(self) -> EmbeddingModel:
        """The agent's embedding model (tokenizer and dimension), read once."""
        if self._model is None:
            from edgeos.memory.embeddings import describe

            if self.host is None:
                raise self._error(
                    f"agent '{self.agent}' memory needs the node's model host to embed text"
                )
            self._model = describe(self.host, self.config.embedding_model)
        return self._model

    def _vectors(self, texts: list[str], given: Sequence[float] | None, where: str) -> Any:
        import numpy as np

        from edgeos.memory.embeddings import embed, host_infer

        model = self.model()
        if given is not None:
            try:
                vec = np.asarray(given, np.float32).reshape(-1)
            except (TypeError, ValueError):
                raise self._error(f"{where}: vector must be a list of numbers") from None
            if vec.shape != (model.dim,):
                raise self._error(
                    f"{where}: vector has {vec.size} dimensions; embedding model "
                    f"'{model.name}' gives {model.dim}"
                )
            norm = float(np.linalg.norm(vec))
            if not math.isfinite(norm) or norm == 0.0:
                raise self._error(f"{where}: vector must be finite and not all zeros")
            return (vec / norm).reshape(1, -1)
        infer = self._infer
        if infer is None:
            assert self.host is not None  # model() needed it
            infer = host_infer(self.host)
        return embed(model, texts, infer)

    def _check_text(self, text: Any, where: str) -> str:
        if not isinstance(text, str) or not text.strip():
            raise self._error(f"{where}: text must be non-empty text")
        size = len(text.encode())
        if size > self.config.max_text_bytes:
            raise self._error(
                f"{where}: text is {size} bytes, more than memory.max_text_bytes "
                f"({self.config.max_text_bytes})"
            )
        return text

    def _check_metadata(self, metadata: Any, where: str) -> dict[str, Any]:
        if metadata is None:
            return {}
        if not isinstance(metadata, Mapping) or not all(isinstance(k, str) for k in metadata):
            raise self._error(f"{where}: metadata must be a mapping with text keys")
        try:
            encoded = orjson.dumps(dict(metadata), option=orjson.OPT_SERIALIZE_NUMPY)
        except TypeError as exc:
            raise self._error(f"{where}: metadata is not JSON: {exc}") from None
        if len(encoded) > store.MAX_METADATA_BYTES:
            raise self._error(
                f"{where}: metadata is {len(encoded)} bytes as JSON, more than "
                f"{store.MAX_METADATA_BYTES}"
            )
        value: dict[str, Any] = orjson.loads(encoded)
        return value

    def _check_subject(self, subject: Any, where: str) -> str | None:
        if subject is None:
            return None
        if not isinstance(subject, str) or not subject.strip():
            raise self._error(f"{where}: subject must be non-empty text")
        if len(subject) > store.MAX_SUBJECT_CHARS:
            raise self._error(f"{where}: subject is longer than {store.MAX_SUBJECT_CHARS}")
        return subject

    def _check_ttl(self, ttl: float | str | None, where: str) -> float | None:
        """The record's life in seconds (None: for ever), within ``max_ttl``."""
        if ttl is None:
            return self.config.retention.life(None)
        from edgeos.manifests.durations import parse_duration

        try:
            seconds = parse_duration(ttl)
        except ValueError as exc:
            raise self._error(f"{where}: ttl {exc}") from None
        if not math.isfinite(seconds) or seconds <= 0:
            raise self._error(f"{where}: ttl must be a positive duration, not {ttl!r}")
        return self.config.retention.life(seconds)


def asked(query: str | Sequence[float], k: int, where: Mapping[str, list[str]]) -> str:
    """A digest of a recall's arguments: replay tells the same question from another
    without the journal holding the query's words."""
    shown = query if isinstance(query, str) else [float(x) for x in query]
    return journal.digest({"query": shown, "k": k, "where": dict(where)})


def _checkpoint(db: Database) -> None:
    with contextlib.suppress(EdgeOSError):  # closed meanwhile: the next checkpoint does it
        db.checkpoint()


_ARGS = {
    "remember": ("text", "metadata", "subject", "ttl", "importance", "vector"),
    "recall": ("query", "k", "where"),
    "forget": ("subject", "id"),
}


def serve_callback(memory: AgentMemory, message: Mapping[str, Any]) -> dict[str, Any]:
    """Answer a step in a worker process calling ``ctx.memory`` (see ``agents._worker``)."""
    op = str(message.get("op"))
    names = _ARGS.get(op)
    if names is None:
        raise InvalidRequestError(f"an agent worker asked memory for an unknown operation {op!r}")
    given = dict(message.get("args") or {})
    args = {name: given[name] for name in names if name in given}
    if op == "remember":
        text = args.pop("text", None)
        return {"id": memory.remember(text, **args)}
    if op == "recall":
        query = args.pop("query", None)
        return {"records": [r.to_json() for r in memory.recall(query, **args)]}
    memory.forget(**args)
    return {}
